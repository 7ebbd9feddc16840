"""Training a hypernetwork editor: MEND and MALMEN one batch at a time, RLEdit on trajectories.

One loop serves all three. A trajectory starts from the original model and
applies T batches in sequence with the current network; after batch t the
loss is, with backtracking depth D and decay μ,

    Σ_{i<D} μ^i [CE(rephrases of batch t-i | W_t) + c_loc KL(W_{t-1} ‖ W_t on its locality prompts)
                 + c_drift KL(W_0 ‖ W_t on the same prompts)]
    + l2 ‖ΔW_t‖²,

whose gradient reaches the network only through ΔW_t (earlier edits are the
environment). MEND and MALMEN are the case T = D = 1: edit the original model,
judge, revert. The D backtracking losses share one forward pass, and the
optimizer may step every few batches inside a trajectory (`step_every`).

Several trajectories may run side by side (`trajectories_per_step`), batch t
of each before batch t+1 of any, with their gradients averaged at every
step; spread over processes (`lledit.hypernet.distributed`), each runs its
share and they average together, so N processes train the network one
process would with the same settings.
"""

from __future__ import annotations

import json
import math
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from lledit import progress
from lledit.data.request import EditRequest
from lledit.edit import add_weight_deltas
from lledit.eval.lifelong import LifelongResult, run_lifelong
from lledit.hypernet.capture import capture_gradients, keys_of
from lledit.hypernet.checkpoint import (
    CheckpointError,
    load_network,
    load_optimizer,
    read_meta,
    save_checkpoint,
)
from lledit.hypernet.config import HypernetTrainConfig, untrained_network
from lledit.hypernet.distributed import Ranks, average_gradients, barrier, gathered
from lledit.hypernet.editor import HypernetEditor
from lledit.hypernet.held_keys import HeldKeys
from lledit.hypernet.losses import (
    LossBatch,
    locality_log_probs,
    weight_gradients,
    weighted_loss,
)
from lledit.model import ModelHandle, batch_tokens
from lledit.stats import key_covariances
from lledit.tokens import EncodedPair, encode_pairs

VALIDATION_FILE = "validation.json"


class _Examples:
    """Training requests tokenised once, on first use."""

    def __init__(
        self, handle: ModelHandle, requests: Sequence[EditRequest], locality_tokens: int
    ) -> None:
        self.handle = handle
        self.requests = requests
        self.locality_tokens = locality_tokens
        self._cache: dict[int, tuple[EncodedPair, LossBatch]] = {}

    def get(self, index: int) -> tuple[EncodedPair, LossBatch]:
        if index not in self._cache:
            request = self.requests[index]
            tokenizer = self.handle.tokenizer
            prompts = [request.prompt, *request.rephrases]
            rephrases = encode_pairs(tokenizer, prompts, [request.target_new] * len(prompts))
            locality = [
                EncodedPair(pair.ids[: pair.target_start + self.locality_tokens], pair.target_start)
                for pair in encode_pairs(
                    tokenizer, [p for p, _ in request.locality], [a for _, a in request.locality]
                )
            ]
            self._cache[index] = (rephrases[0], LossBatch(rephrases, locality))
        return self._cache[index]

    def batch(self, indices: Sequence[int]) -> tuple[list[EncodedPair], LossBatch]:
        edits, rephrases, locality = [], [], []
        for index in indices:
            edit, loss_batch = self.get(index)
            edits.append(edit)
            rephrases.extend(loss_batch.rephrases)
            locality.extend(loss_batch.locality)
        return edits, LossBatch(rephrases, locality)


@dataclass
class _Trajectory:
    """One trajectory under way: its batches, what its losses look back on, and
    the edited weights as its batches so far left them (None while it runs
    alone on this process: the model holds them)."""

    batches: list[list[int]]
    weights: dict[str, torch.Tensor] | None
    held: HeldKeys | None
    history: deque[LossBatch]
    original: deque[torch.Tensor]
    totals: dict[str, float] = field(
        default_factory=lambda: {"rephrase": 0.0, "locality": 0.0, "drift": 0.0, "l2": 0.0}
    )


class HypernetTrainer:
    """Trains one hypernetwork editor on one model; checkpoints to `out` and resumes from it.

    Under torchrun each process builds its own trainer on its own copy of the
    model; only the main one writes the checkpoint.
    """

    def __init__(
        self,
        handle: ModelHandle,
        editor_class: type[HypernetEditor],
        config: HypernetTrainConfig,
        requests: Sequence[EditRequest],
        out: str | Path,
        data_info: dict[str, Any] | None = None,
    ) -> None:
        self.handle, self.editor_class, self.config = handle, editor_class, config
        self.method = editor_class.name
        self.ranks = Ranks.current()
        if config.trajectories_per_step % self.ranks.size:
            raise ValueError(
                f"trajectories_per_step {config.trajectories_per_step} cannot be split evenly "
                f"across {self.ranks.size} processes"
            )
        self.out = Path(out)
        self.data_info = data_info or {}
        if len(requests) < config.validation_edits + config.batch_size:
            raise ValueError(
                f"{len(requests)} training requests are too few: {config.validation_edits} are "
                f"held out for validation and a batch needs {config.batch_size}"
            )
        without_locality = [i for i, r in enumerate(requests) if not r.locality]
        if without_locality:
            first = requests[without_locality[0]]
            raise ValueError(
                f"training needs locality pairs; request {without_locality[0]} "
                f"({first.id or repr(first.prompt)}) has none"
            )
        split = len(requests) - config.validation_edits
        self.train_examples = _Examples(handle, requests[:split], config.locality_tokens)
        self.validation_requests = list(requests[split:])
        HeldKeys.check(editor_class.update_rule, config.earlier_keys_weight)
        torch.manual_seed(config.seed)
        self.network = untrained_network(handle, config, editor_class.update_rule)
        scalars = [self.network.log_lr, self.network.log_ridge]
        others = [p for p in self.network.parameters() if all(p is not s for s in scalars)]
        self.optimizer = torch.optim.Adam(
            [{"params": others, "lr": config.meta_lr}, {"params": scalars, "lr": config.scalar_lr}]
        )
        self.module_names = self.network.module_names
        self.original = {n: handle.weight_of(n).detach().clone() for n in self.module_names}
        self.steps_done = 0
        self.trajectories_done = 0
        self.elapsed_s = 0.0
        self.losses: list[dict[str, float]] = []
        self._order: list[int] = []
        self._order_key: tuple[int, int] | None = None

    # --- data order: a pure function of (seed, position), so resuming is exact

    def _indices(self, start: int, count: int, stream: int = 0) -> list[int]:
        """Requests at positions start.. of an endless stream of seeded per-epoch shuffles."""
        n = len(self.train_examples.requests)
        chosen = []
        for position in range(start, start + count):
            key = (position // n, stream)
            if self._order_key != key:
                seed = self.config.seed * 7919 + key[0] * 31 + stream
                generator = torch.Generator().manual_seed(seed)
                self._order = torch.randperm(n, generator=generator).tolist()
                self._order_key = key
            chosen.append(self._order[position % n])
        return chosen

    def _trajectory_batches(self, trajectory: int) -> list[list[int]]:
        size, length = self.config.batch_size, self.config.trajectory_length
        flat = self._indices(trajectory * size * length, size * length)
        return [flat[i : i + size] for i in range(0, len(flat), size)]

    # --- initialisation

    @torch.no_grad()
    def _warm_up(self) -> None:
        """Fill the normaliser's statistics and scale η and λ to the model before training."""
        config, network = self.config, self.network
        if config.key_ridge:
            statistics = key_covariances(self.handle, self.module_names, samples=config.key_samples)
            for name, second_moment in statistics.items():
                network.set_key_statistics(name, second_moment.to(self.handle.device))
        size = config.batch_size
        batches = [
            self._indices(i * size, size, stream=1) for i in range(max(1, config.warmup_batches))
        ]
        captures = []
        for indices in batches:
            edits, _ = self.train_examples.batch(indices)
            captured = capture_gradients(
                self.handle, self.module_names, batch_tokens(self.handle, edits)
            )
            for name in self.module_names:
                network.observe(name, captured[name])
            captures.append(captured)
        network.eval()  # the statistics are filled; the scale probes below must not add to them
        for index, name in enumerate(self.module_names):
            keys = torch.cat([c[name].keys for c in captures])
            precision = network.key_precision(name)
            projected = keys if precision is None else keys @ precision
            key_scale = (projected * keys).sum(1).mean()
            network.log_ridge[index] = math.log(config.initial_ridge * key_scale)
            network.log_lr[index] = 0.0
            weight = self.handle.weight_of(name).float()
            ratios = []
            for captured in captures:
                change = captured[name].keys @ network.delta(name, captured[name]).T
                output = captured[name].keys @ weight.T
                ratios.append((change.norm(dim=1) / output.norm(dim=1).clamp_min(1e-8)).median())
            network.log_lr[index] = math.log(
                config.initial_step / float(torch.stack(ratios).median())
            )

    # --- one trajectory

    def _restore(self) -> None:
        with torch.no_grad():
            for name, weight in self.original.items():
                self.handle.weight_of(name).copy_(weight)

    @torch.no_grad()
    def _original_log_probs(self, loss_batch: LossBatch) -> torch.Tensor:
        """The original model's log-probabilities at the batch's locality answer tokens."""
        edited = {name: self.handle.weight_of(name).clone() for name in self.module_names}
        self._restore()
        try:
            return locality_log_probs(self.handle, [loss_batch])
        finally:
            for name, weight in edited.items():
                self.handle.weight_of(name).copy_(weight)

    def _start(self, trajectory: int, alone: bool) -> _Trajectory:
        config = self.config
        held = None
        if config.earlier_keys_weight:
            held = HeldKeys(self.network, config.earlier_keys_weight, self.handle.device)
        return _Trajectory(
            batches=self._trajectory_batches(trajectory),
            weights=None if alone else dict(self.original),
            held=held,
            history=deque(maxlen=config.backtrack_depth),
            original=deque(maxlen=config.backtrack_depth),
        )

    def _edit_and_judge(self, trajectory: _Trajectory, t: int) -> None:
        """Batch t of `trajectory`: edit with the current network, judge, and add the
        gradient of the judgement to the network's."""
        config, network, handle = self.config, self.network, self.handle
        if trajectory.weights is not None:
            with torch.no_grad():
                for name, weight in trajectory.weights.items():
                    handle.weight_of(name).copy_(weight)
        edits, loss_batch = self.train_examples.batch(trajectory.batches[t])
        captured = capture_gradients(handle, self.module_names, batch_tokens(handle, edits))
        history = trajectory.history
        history.appendleft(loss_batch)
        reference = locality_log_probs(handle, history)
        original_reference = None
        if config.drift_weight:
            trajectory.original.appendleft(self._original_log_probs(loss_batch))
            original_reference = torch.cat(list(trajectory.original))
        held = trajectory.held
        deltas = network.deltas(captured, None if held is None else held.precisions)
        add_weight_deltas(handle, {n: d.detach() for n, d in deltas.items()})
        if held is not None:
            held.hold(keys_of(captured))
        weights = [config.decay**i for i in range(len(history))]
        parts, grads = weight_gradients(
            handle,
            self.module_names,
            lambda: weighted_loss(
                handle,
                history,
                weights,
                reference,
                config.locality_weight,
                original_reference,
                config.drift_weight,
            ),
        )
        scale = config.discount**t
        torch.autograd.backward(
            [deltas[n] for n in self.module_names],
            [
                scale * (grads[n] + 2 * config.l2_weight * deltas[n].detach())
                for n in self.module_names
            ],
        )
        if trajectory.weights is not None:
            trajectory.weights = {
                n: handle.weight_of(n).detach().clone() for n in self.module_names
            }
        totals = trajectory.totals
        totals["rephrase"] += parts.rephrase
        totals["locality"] += parts.locality
        totals["drift"] += parts.drift
        totals["l2"] += sum(float(d.detach().pow(2).sum()) for d in deltas.values())

    def _step(self) -> None:
        """One optimizer step on the gradients of every trajectory of the group, on
        every process; the normaliser takes in what they all saw."""
        config = self.config
        average_gradients(self.network.parameters(), config.trajectories_per_step, self.ranks)
        self.network.commit_statistics(gathered(self.network.pending_statistics(), self.ranks))
        torch.nn.utils.clip_grad_norm_(self.network.parameters(), config.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.steps_done += 1

    def _run_group(self, group: int, on_step) -> None:
        """The `trajectories_per_step` trajectories of `group` (this process's share),
        batch by batch in lockstep, stepping every `step_every` batches."""
        config = self.config
        share = config.trajectories_per_step // self.ranks.size
        first = group * config.trajectories_per_step + self.ranks.rank * share
        trajectories = [self._start(first + i, alone=share == 1) for i in range(share)]
        step_every = config.step_every or config.trajectory_length
        try:
            for t in range(config.trajectory_length):
                for trajectory in trajectories:
                    self._edit_and_judge(trajectory, t)
                if (t + 1) % step_every == 0 or t + 1 == config.trajectory_length:
                    self._step()
                    on_step()
        finally:
            self._restore()
        self.trajectories_done += config.trajectories_per_step
        own = [
            {k: v / config.trajectory_length for k, v in trajectory.totals.items()}
            for trajectory in trajectories
        ]
        for losses in gathered(own, self.ranks):
            self.losses.extend({"step": self.steps_done, **record} for record in losses)

    # --- the loop, checkpoints, validation

    def meta(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "model": self.handle.name,
            "rank": self.config.rank,
            "n_blocks": self.config.n_blocks,
            "train_config": asdict(self.config),
            "data": self.data_info,
            "steps_done": self.steps_done,
            "trajectories_done": self.trajectories_done,
            "elapsed_s": round(self.elapsed_s, 1),
            "losses": self.losses,
        }

    def save(self) -> None:
        """Write the checkpoint (the main process only; the others hold the same)."""
        if self.ranks.main:
            save_checkpoint(self.out, self.network, self.meta(), self.optimizer)

    def resume(self) -> None:
        """Continue from the checkpoint in `out`; model, data and settings must match."""
        meta = read_meta(self.out)
        for key, value in (("method", self.method), ("model", self.handle.name)):
            if meta[key] != value:
                raise CheckpointError(
                    f"cannot resume: {self.out} was trained with {key} {meta[key]!r}"
                )
        if meta.get("data", {}).get("sha256") != self.data_info.get("sha256"):
            raise CheckpointError(f"cannot resume: {self.out} was trained on other data")
        ignored = {"steps", "checkpoint_every"}
        changed = [
            f.name
            for f in fields(self.config)
            if f.name not in ignored
            and meta["train_config"].get(f.name, f.default) != getattr(self.config, f.name)
        ]
        if changed:
            raise CheckpointError(
                f"cannot resume: settings differ from the checkpoint's: {', '.join(changed)}"
            )
        network, _ = load_network(self.out)
        self.network.load_state_dict(network.state_dict())
        load_optimizer(self.out, self.optimizer)
        self.steps_done = meta["steps_done"]
        self.trajectories_done = meta["trajectories_done"]
        self.elapsed_s = meta["elapsed_s"]
        self.losses = meta["losses"]

    def train(self) -> None:
        config = self.config
        groups = math.ceil(config.steps / config.steps_per_trajectory)
        save_every = max(1, config.checkpoint_every // config.steps_per_trajectory)
        if self.steps_done == 0:
            # The main process first, so that it alone computes and caches key statistics.
            if not self.ranks.main:
                barrier(self.ranks)
            self._warm_up()
            if self.ranks.main:
                barrier(self.ranks)
        self.network.train()
        description = f"{self.method}: training"
        with progress.task(description, total=config.steps, completed=self.steps_done) as task:
            while self.trajectories_done < groups * config.trajectories_per_step:
                group = self.trajectories_done // config.trajectories_per_step
                started = time.perf_counter()
                self._run_group(group, task.advance)
                self.elapsed_s += time.perf_counter() - started
                last = self.losses[-1]
                task.update(
                    status=f"rephrase {last['rephrase']:.3f} locality {last['locality']:.4f}"
                )
                if (group + 1) % save_every == 0:
                    self.save()
        self.network.eval()
        self.save()

    def edit_sequence(
        self,
        requests: Sequence[EditRequest],
        *,
        dataset: dict[str, Any] | None = None,
    ) -> LifelongResult:
        """The current network edits `requests` in sequence, as at test time, and
        the final model is scored in the style of `dataset` (else of the training
        data); the model is restored afterwards."""
        editor = self.editor_class.from_network(self.handle, self.network)
        style = (dataset or self.data_info).get("style", "qa")
        try:
            return run_lifelong(
                self.handle,
                editor,
                requests,
                self.config.batch_size,
                style=style,
                dataset=dataset,
            )
        finally:
            self._restore()

    def validate(self) -> dict[str, Any]:
        """The lifelong protocol on the held-out training edits; written to `validation.json`."""
        if not self.validation_requests:
            return {}
        result = self.edit_sequence(
            self.validation_requests,
            dataset={"name": "held-out training edits", **self.data_info},
        )
        report = {
            "n_edits": result.n_edits,
            "batch_size": result.batch_size,
            "metrics": result.metrics,
            "timing": result.timing,
        }
        (self.out / VALIDATION_FILE).write_text(json.dumps(report, indent=2) + "\n")
        return report
