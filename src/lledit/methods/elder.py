"""ELDER: a mixture of LoRAs on a few MLP layers, routed once per sequence.

Li et al., "ELDER: Enhancing Lifelong Model Editing with Mixture-of-LoRA",
AAAI 2025. Each adapted projection gets N LoRAs. A router per layer scores
them from one query per sequence, the residual stream below the adapted
layers at the last prompt token, and the k best are added with their scores
(not renormalised). Every token of the sequence uses that allocation,
including tokens generated later from a KV cache.

Each edit gets a random allocation before training, and a guided loss pulls
the routers towards it, so that inputs carrying the same knowledge pick the
same LoRAs. Training routes as inference does (the routers' own top k); only
the loss knows the allocation. At inference an input whose allocation code
(which k of N LoRAs each layer picks, L·N bits) is not within the deferral
radius of an edit's code (Hamming distance to the nearest one not below ε)
goes through the untouched model, bit for bit.

Departures from the paper (docs/methods/elder.md has the measurements): by
default each batch opens one LoRA of its own per adapted layer
(`batch_rank`), trained on its edits alone and frozen afterwards, instead of
retraining the shared mixture; the routers then only give the codes the
deferral compares, and an input that passes uses the LoRA of the passing
edit whose code is nearest. The routers are refitted after each batch to
the new edits' queries and a bounded sample of the held ones (`router_steps`,
`router_fit_edits`); the query comes from a lower layer
(`query_layer`); N is 8; and an input that names an edit's subject within
its last words passes whatever its code (`subject_gate`, `subject_window`),
codes within ε = 16 of 48 bits judging only edits without a subject. With
`batch_rank=0`, the shared mixture: after its batch an edit's allocation is
the LoRAs it was trained through, not its random draw; each batch rehearses
earlier edits (`replay`, `anchor_weight`); r is 32 rather than 8.

The adapters are forward hooks on the projections, owned by the editor: the
model's modules, weights and state dict stay as they were.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from lledit import checks
from lledit.data.request import EditRequest
from lledit.edit import NonFiniteUpdateError, replayable_generator
from lledit.memory import HeldBatch, MemoryEdit, MemoryEditor, train_until_likely
from lledit.model import ModelHandle, edit_batch, hidden_of

logger = logging.getLogger(__name__)


@dataclass
class ElderConfig:
    """Settings of ELDER; the defaults suit SmolLM2-135M (30 layers, hidden 576)."""

    layers: str | None = None
    """Adapted decoder layers, e.g. "21-26" (see `lledit.layers.parse_layers`);
    None: the `upper` band (21-26 of 30, the paper's Llama-2 choice)."""
    part: str = "mlp_out"
    """The projection adapted in each layer (see `lledit.layers.PARTS`); it
    must name one module per layer."""
    query_layer: int | None = None
    """Decoder layer whose output at the last prompt token is the routers'
    query; None: the layer at 28% depth (8 of 30), or the one just below the
    first adapted layer if that is lower. Lower than the paper's choice, so
    that more rephrases pass the deferral (docs/methods/elder.md)."""
    n_loras: int = 8
    """N: LoRAs per adapted layer. 8 rather than the paper's 4, whose few codes
    crowded over 1000 edits (docs/methods/elder.md)."""
    rank: int = 32
    """r: rank of each LoRA. 32 rather than the paper's 8: higher
    efficacy and generalization over 1000 edits (docs/methods/elder.md)."""
    top_k: int = 2
    """k: LoRAs each layer adds for one sequence."""
    guide_weight: float = 0.01
    """λ: weight of the guided loss -Σ log s_j over each edit's allocation."""
    deferral_radius: int = 16
    """ε: an input uses the adapters when the Hamming distance from its
    allocation code to an edit's code is below ε (codes of 48 bits differ in
    at most 24). With the subject gate on, this judges only edits without a
    subject and passes given embeddings. Without the gate, 4 kept locality at
    1.0 over 1000 zsRE edits (docs/methods/elder.md)."""
    subject_gate: bool = True
    """An edit with a subject lets an input use the adapters when its prompt
    names that subject (as a whole word, ignoring case), whatever its code;
    the codes then only choose among the edits it names. Edits without a
    subject, and passes given embeddings rather than token ids, are judged on
    codes within ε. Neighbourhood prompts (another subject, the same relation)
    route like the edit but rarely name its subject: CounterFact locality went
    from 0.06 to 0.98 over 1000 edits. Codes within ε as well held back nearly
    a third of the rephrases the LoRA per batch answers (docs/methods/elder.md)."""
    subject_window: int | None = 12
    """With the subject gate, at most this many words may follow the subject's
    last mention in the prompt: the prompt asks about the subject rather than
    naming it in passing. 12, the most in any zsRE or CounterFact train
    prompt or rephrase; it took CounterFact's perplexity rise on ordinary text
    from 56% to 7% (docs/methods/elder.md). None: anywhere."""
    steps: int = 50
    """Most Adam iterations per edit batch."""
    early_stop: float = 0.95
    """Training of a batch stops once the geometric mean probability of the new
    edits' target tokens, and that of the rehearsed edits', each reach this;
    1: run every step. Stopping early changes the LoRAs less per batch, so
    earlier edits hold better (docs/methods/elder.md)."""
    replay: int = 60
    """Earlier edits rehearsed with each new batch, taken in turn from every
    edit still held, so that none waits longer than the others; 0: none, as
    in the paper, where each batch overwrote the shared LoRAs
    (docs/methods/elder.md)."""
    anchor_weight: float = 1.0
    """Weight of the guided loss on every held edit's stored query (no model
    pass needed), which keeps the routers sending earlier edits to their
    allocations while a batch trains; 0: none, as in the paper."""
    lr: float = 5e-3
    """Adam learning rate. The paper's 1e-4 was for 7B models; LoRA B starts
    at zero, and a small model needs a larger rate (docs/methods/elder.md)."""
    router_steps: int = 300
    """After each batch, at most this many Adam steps on the routers alone (no
    model pass) until every query it fits (`router_fit_edits`) again picks the
    LoRAs it was trained through; 0: none. Without it, edits' layer choices
    drift as later batches retrain the routers."""
    router_fit_edits: int = 1000
    """At most this many held edits, drawn afresh each batch, join the new
    batch's in that refit; 0: all. Every refit step routes each query it
    fits, and past about 2000 held edits a refit of all of them no longer
    converges within `router_steps`: batches were 2.3 times slower after 4560
    CounterFact edits. 1000 fit in about 60 steps, and a stream of up to 1000
    edits refits as before (docs/methods/elder.md)."""
    seed: int = 0
    """Seed of the LoRA and router initialisation and of the edits' allocations."""
    batch_rank: int = 64
    """Above 0: each batch opens one LoRA of this rank on every adapted layer,
    trains it on the batch's own edits alone and freezes it; the N LoRAs are
    not used, the routers only give the codes that the deferral compares, and
    an input that passes uses the LoRA of the passing edit whose code is
    nearest (the newest on a tie). Nothing is rehearsed (`rank`, `replay`,
    `anchor_weight` and `guide_weight` do not apply): earlier edits cannot
    drift, and a batch trains only its own LoRA. Over 1000 zsRE edits it
    answered more edits and rephrases than the shared mixture in under a
    quarter of the edit time. 0: the paper's shared mixture, which every
    batch retrains (docs/methods/elder.md)."""

    def __post_init__(self) -> None:
        checks.at_least(self, 1, "n_loras", "rank", "top_k", "steps", "deferral_radius")
        checks.at_least(self, 0, "subject_window", "batch_rank")
        checks.non_negative(
            self, "anchor_weight", "guide_weight", "replay", "router_steps", "router_fit_edits"
        )
        checks.positive(self, "lr")
        checks.fraction(self, "early_stop")
        if self.top_k > self.n_loras:
            raise ValueError(
                f"top_k ({self.top_k}) cannot exceed n_loras ({self.n_loras}): "
                "each layer picks k of its N LoRAs"
            )


def _lowest_mean_probability(token_losses: torch.Tensor, new_tokens: torch.Tensor) -> float:
    """The lower geometric mean target probability of the new and the rehearsed
    edits, which `ElderConfig.early_stop` judges apart."""
    groups = [token_losses[new_tokens], token_losses[~new_tokens]]
    return min(math.exp(-group.mean().item()) for group in groups if group.numel())


def default_query_layer(num_layers: int, first_adapted: int) -> int:
    """The layer at 28% depth (8 of 30), or the one just below the adapters if that is lower."""
    return min(int(0.28 * num_layers), first_adapted - 1)


def initial_lora_a(shape: tuple[int, ...], d_in: int, generator: torch.Generator) -> torch.Tensor:
    """LoRA A drawn uniformly within ±1/√d_in (B starts at zero)."""
    bound = 1 / math.sqrt(d_in)
    return torch.rand(shape, generator=generator) * 2 * bound - bound


def lora_delta(x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor) -> torch.Tensor:
    """B A x for x (batch, tokens, d_in) and one LoRA, A (r, d_in) and B (d_out, r),
    or one per sequence, A (batch, r, d_in) and B (batch, d_out, r)."""
    return (x @ lora_a.mT) @ lora_b.mT


class MixtureOfLoRA(nn.Module):
    """N LoRAs for one linear layer, of which the k chosen per sequence count.

    `forward` returns Σ_{j∈top-k} s_j B_j A_j x for each sequence's own
    indices and scores; the layer's own output is added by the hook that
    attaches it. Every LoRA runs, weighted by its score where chosen and by
    0 elsewhere, so unselected LoRAs receive exactly zero gradient. Gathering
    the chosen ones instead would cost less, but the backward pass of a
    gather with repeated indices adds its terms in no fixed order on several
    CPU threads, and training would no longer repeat bit for bit (a journal's
    restart depends on it). B starts at zero: a fresh mixture changes nothing.
    """

    def __init__(
        self, d_in: int, d_out: int, n_loras: int, rank: int, generator: torch.Generator
    ) -> None:
        super().__init__()
        self.lora_a = nn.Parameter(initial_lora_a((n_loras, rank, d_in), d_in, generator))
        self.lora_b = nn.Parameter(torch.zeros(n_loras, d_out, rank))

    @classmethod
    def for_layer(
        cls, layer: nn.Module, n_loras: int, rank: int, generator: torch.Generator
    ) -> MixtureOfLoRA:
        """A mixture shaped for `layer`: `nn.Linear` (weight d_out by d_in) or
        GPT-2's `Conv1D` (weight stored transposed, d_in by d_out)."""
        if isinstance(layer, Conv1D):
            d_in, d_out = layer.weight.shape
        elif isinstance(layer, nn.Linear):
            d_out, d_in = layer.weight.shape
        else:
            raise TypeError(f"cannot adapt a {type(layer).__name__}; it is not a linear layer")
        return cls(d_in, d_out, n_loras, rank, generator)

    def forward(
        self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor
    ) -> torch.Tensor:
        """x (batch, tokens, d_in), indices and weights (batch, k) → (batch, tokens, d_out)."""
        dense = torch.zeros(*weights.shape[:-1], self.lora_a.shape[0], device=weights.device)
        dense = dense.scatter(-1, indices, weights)  # (batch, N): 0 for unselected LoRAs
        hidden = torch.einsum("btd,nrd->btnr", x, self.lora_a) * dense[:, None, :, None]
        return torch.einsum("btnr,nor->bto", hidden, self.lora_b)


@dataclass
class Routing:
    """The allocation of one forward pass, one row per sequence."""

    queries: torch.Tensor
    """(batch, hidden) the routers' input."""
    log_probs: torch.Tensor
    """(batch, L, N) log of the router scores s."""
    indices: torch.Tensor
    """(batch, L, k) the chosen LoRAs of each layer."""
    weights: torch.Tensor
    """(batch, L, k) their scores, not renormalised."""
    rows: torch.Tensor | None
    """Rows that use the adapters; None: every row."""
    loras: torch.Tensor | None = None
    """With `batch_rank`, at inference: (batch,) the batch LoRA each row uses."""

    @property
    def batch_size(self) -> int:
        return self.queries.shape[0]


def allocation_codes(indices: torch.Tensor, n_loras: int) -> torch.Tensor:
    """(batch, L, k) chosen LoRAs → (batch, L·N) bit codes (bool)."""
    bits = torch.zeros(*indices.shape[:-1], n_loras, dtype=torch.bool, device=indices.device)
    return bits.scatter_(-1, indices, True).flatten(1)


@dataclass(eq=False)
class _Batch(HeldBatch):
    """The edits of one applied batch and the parameters around it."""

    requests: list[EditRequest]
    """The edits, kept for rehearsal with later batches."""
    allocation: torch.Tensor
    """(edits, L, k) the LoRAs each edit was trained through; the routers are held to them."""
    queries: torch.Tensor
    """(edits, hidden) each edit prompt's query; its code follows the current routers."""
    rehearsal_end: int
    """Where the next batch's rehearsal starts among the edits held with this one."""
    loras: list[tuple[torch.Tensor, torch.Tensor]] | None = None
    """With `batch_rank`: per adapted layer, A (n, r, d_in) and B (n, d_out, r) of
    the batch's own LoRAs (n = 1, or one per batch of a loaded editor)."""
    edit_loras: torch.Tensor | None = None
    """With `batch_rank`: (edits,) which of `loras` each edit was trained through."""


class ElderEdit(MemoryEdit):
    """One ELDER batch: undo drops its codes and its change to adapters and routers."""

    _editor: ElderEditor
    _batch: _Batch

    @property
    def allocation(self) -> torch.Tensor:
        """(edits, L, k) the LoRAs each edit was trained through, which the routers are held to."""
        return self._batch.allocation

    @property
    def codes(self) -> torch.Tensor:
        """(edits, L·N) the allocation codes the current routers give the batch's edits."""
        return self._editor._codes_of(self._batch.queries)


class ElderEditor(MemoryEditor):
    name: ClassVar[str] = "elder"
    description: ClassVar[str] = (
        "ELDER: mixture of LoRAs routed per sequence, guided loss, deferral by allocation code"
    )
    config_class: ClassVar[type] = ElderConfig
    label: ClassVar[str] = "ELDER"
    tensors_file: ClassVar[str] = "elder.safetensors"
    config_file: ClassVar[str] = "elder.json"

    def __init__(self, handle: ModelHandle, config: ElderConfig | None = None) -> None:
        super().__init__(handle)
        self._build(config or ElderConfig())

    def _resolve(self, config: ElderConfig) -> tuple[tuple[int, ...], int, list[str]]:
        """The adapted layers, the query layer and the adapted modules `config` names."""
        handle = self.handle
        modules = handle.edited_modules(config.layers, config.part, "upper")
        layers = tuple(sorted({handle.layer_of(module) for module in modules}))
        if len(modules) != len(layers):
            raise ValueError(
                f"part {config.part!r} names {len(modules) // len(layers)} modules per layer; "
                "ELDER adapts one per layer"
            )
        query_layer = config.query_layer
        if query_layer is None:
            query_layer = default_query_layer(handle.num_layers, layers[0])
        if not 0 <= query_layer < layers[0]:
            raise ValueError(
                f"query_layer must lie below every adapted layer (0-{layers[0] - 1}), "
                f"got {query_layer}"
            )
        return layers, query_layer, modules

    def _tensor_shapes(
        self, config: ElderConfig, modules: list[str], edits: int, batch_loras: int
    ) -> dict[str, tuple]:
        """The shape of every saved tensor for `config`, `edits` held edits and
        `batch_loras` LoRAs opened by batches (with `batch_rank`) on this model."""
        width = self.handle.model.get_input_embeddings().weight.shape[1]
        shapes: dict[str, tuple] = {
            "router": (len(modules), config.n_loras, width),
            "allocations": (edits, len(modules), config.top_k),
            "queries": (edits, width),
        }
        n, rank = config.n_loras, config.rank
        if config.batch_rank:
            n, rank = batch_loras, config.batch_rank
            shapes["edit_loras"] = (edits,)
        for position, name in enumerate(modules):
            d_out, d_in = self.handle.weight_of(name).shape
            shapes[f"adapters.{position}.lora_a"] = (n, rank, d_in)
            shapes[f"adapters.{position}.lora_b"] = (n, d_out, rank)
        return shapes

    def _build(self, config: ElderConfig) -> None:
        """Set up adapters, routers and hooks for `config` (replacing any earlier ones)."""
        handle = self.handle
        layers, query_layer, modules = self._resolve(config)
        generator = torch.Generator().manual_seed(config.seed)
        adapters = nn.ModuleList(
            MixtureOfLoRA.for_layer(handle.module(name), config.n_loras, config.rank, generator)
            for name in ([] if config.batch_rank else modules)
        )
        width = handle.model.get_input_embeddings().weight.shape[1]
        router = torch.randn(len(layers), config.n_loras, width, generator=generator)
        self.remove()
        self.config = config
        self.layers = layers
        self.modules = modules
        self.query_layer = query_layer
        self.deferral_radius = config.deferral_radius
        self.device = handle.weight_of(modules[0]).device
        """Where ELDER's adapters, routers and held edits live: its first module's
        device (the layers of a sharded model may sit on others)."""
        self.adapters = adapters.to(self.device)
        self.router = nn.Parameter((router / math.sqrt(width)).to(self.device))
        self._batches: list[_Batch] = []
        self._codes: torch.Tensor | None = None
        self._subjects: list[tuple[str, re.Pattern[str], list[int]]] | None = None
        self._bank: tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor] | None = None
        query = handle.module(handle.decoder_layer(query_layer))
        hooks = [query.register_forward_hook(self._on_query)]
        for position, name in enumerate(modules):
            hooks.append(handle.module(name).register_forward_hook(self._adapter_hook(position)))
        self._attach(hooks)

    def config_dict(self) -> dict[str, Any]:
        return {
            **asdict(self.config),
            "modules": self.modules,
            "query_layer": self.query_layer,
            "deferral_radius": self.deferral_radius,
        }

    # Routing -----------------------------------------------------------------------------------

    def _parameters(self) -> list[nn.Parameter]:
        return list(self.tensors().values())

    def _route(self, queries: torch.Tensor) -> Routing:
        """Scores and top-k choices of every layer's router for (batch, hidden) queries."""
        logits = torch.einsum("bd,lnd->bln", queries, self.router)
        log_probs = logits.log_softmax(dim=-1)
        top, indices = log_probs.topk(self.config.top_k, dim=-1)
        return Routing(queries, log_probs, indices, top.exp(), rows=None)

    def _codes_of(self, queries: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return allocation_codes(self._route(queries).indices, self.config.n_loras)

    def _stored_codes(self) -> torch.Tensor | None:
        """The codes of every held edit under the current routers (None: no edits)."""
        if self._codes is None and self._batches:
            self._codes = self._codes_of(self._held()[2])
        return self._codes

    def _held_subjects(self) -> list[tuple[str, re.Pattern[str], list[int]]]:
        """Each distinct subject of the held edits, case-folded, with its whole-word
        pattern and the edits that have it (positions in `_stored_codes`)."""
        if self._subjects is None:
            edits: dict[str, list[int]] = {}
            requests = (r for batch in self._batches for r in batch.requests)
            for index, request in enumerate(requests):
                if request.subject:
                    edits.setdefault(request.subject.casefold(), []).append(index)
            self._subjects = [
                (subject, re.compile(rf"(?<!\w){re.escape(subject)}(?!\w)"), indices)
                for subject, indices in edits.items()
            ]
        return self._subjects

    def _nearest_passing(
        self, codes: torch.Tensor, stored: torch.Tensor, prompts: list[str] | None
    ) -> torch.Tensor:
        """For each input, the held edit it uses the adapters through (-1: none).

        An edit lets an input through when its code lies within ε of the input's
        (Hamming distance below ε); when `prompts` are given (the subject gate),
        an edit with a subject lets it through when the prompt asks about that
        subject instead, whatever the code. Of those, the one whose code is
        nearest counts, the newest on a tie. Every code has exactly L·k bits set,
        so distance = 2 (L·k - overlap).
        """
        overlap = codes.float() @ stored.float().T
        passing = 2 * (len(self.layers) * self.config.top_k) - 2 * overlap < self.deferral_radius
        if prompts is not None:
            texts = [prompt.casefold() for prompt in prompts]
            columns, asked = [], []
            for subject, pattern, edits in self._held_subjects():
                named = [subject in text and self._asks(pattern, text) for text in texts]
                columns += edits
                asked += [named] * len(edits)
            if columns:
                passing[:, columns] = torch.tensor(asked, device=passing.device).T
        newest_first = overlap.masked_fill(~passing, -1).flip(dims=(1,))
        nearest = stored.shape[0] - 1 - newest_first.argmax(dim=1)
        return torch.where(passing.any(dim=1), nearest, -1)

    def _asks(self, subject: re.Pattern[str], text: str) -> bool:
        """Whether `text` names `subject`, within `subject_window` words of its end."""
        ends = [match.end() for match in subject.finditer(text)]
        window = self.config.subject_window
        return bool(ends) and (window is None or len(text[ends[-1] :].split()) <= window)

    @property
    def current_routing(self) -> Routing | None:
        """The routing of the latest forward pass in this thread (None: all deferred)."""
        return getattr(self._local, "routing", None)

    def _on_query(self, module: nn.Module, args: tuple, output: Any) -> None:
        """Route each sequence once, on the pass that reads its whole prompt."""
        training = getattr(self._local, "training", False)
        stored = self._stored_codes()
        if self._watch.extends_cache:
            routing = self.current_routing
            if stored is not None and routing is not None:
                batch = hidden_of(output).shape[0]
                if routing.batch_size != batch:
                    raise RuntimeError(
                        f"a pass extending a KV cache of {batch} sequences follows a prompt "
                        f"pass of {routing.batch_size}; run the prompts through the model first"
                    )
            return None
        if stored is None and not training:
            self._local.routing = None
            return None
        hidden = hidden_of(output)
        batch, length = hidden.shape[:2]
        ends = self._watch.prompt_ends(batch, length, hidden.device)
        queries = hidden[torch.arange(batch, device=hidden.device), ends].float()
        routing = self._route(queries.to(self.device))
        if not training:
            codes = allocation_codes(routing.indices, self.config.n_loras)
            prompts = self._watch.prompt_texts() if self.config.subject_gate else None
            nearest = self._nearest_passing(codes, stored, prompts)
            within = nearest >= 0
            routing.rows = None if bool(within.all()) else within.nonzero()[:, 0]
            if self.config.batch_rank:
                routing.loras = self._batch_lora_bank()[1][nearest.clamp(min=0)]
        self._local.routing = routing
        return None

    def _delta(
        self, position: int, x: torch.Tensor, routing: Routing, rows: torch.Tensor | None
    ) -> torch.Tensor:
        """What the adapters add to layer `position`'s output for inputs `x`
        (float32), the routing's `rows` of the pass (None: all)."""
        select = slice(None) if rows is None else rows
        training_loras = getattr(self._local, "batch_loras", None)
        if training_loras is not None:
            return lora_delta(x, *training_loras[position])
        if routing.loras is not None:
            lora_a, lora_b = self._batch_lora_bank()[0][position]
            loras = routing.loras[select]
            return lora_delta(x, lora_a[loras], lora_b[loras])
        indices, weights = routing.indices[:, position], routing.weights[:, position]
        return self.adapters[position](x, indices[select], weights[select])

    def _adapter_hook(self, position: int):
        def add_loras(module: nn.Module, args: tuple, output: torch.Tensor) -> Any:
            routing = self.current_routing
            if routing is None:
                return None
            x, rows = args[0].to(self.device), routing.rows
            if rows is None:
                delta = self._delta(position, x.float(), routing, None).to(output.device)
                return (output.float() + delta).to(output.dtype)
            if rows.numel() == 0:
                return None
            delta = self._delta(position, x[rows].float(), routing, rows).to(output.device)
            edited = output.clone()
            rows = rows.to(output.device)
            edited[rows] = (output[rows].float() + delta).to(output.dtype)
            return edited

        return add_loras

    @torch.no_grad()
    def codes(self, prompts: Sequence[str]) -> torch.Tensor:
        """(len(prompts), L·N) allocation codes the routers give these bare prompts."""
        encoded = self.handle.tokenizer(list(prompts), return_tensors="pt", padding=True)
        encoded = encoded.to(self.handle.device)
        captured: list[torch.Tensor] = []
        watch = self._watch

        def capture(module: nn.Module, args: tuple, output: Any) -> None:
            hidden = hidden_of(output)
            ends = watch.prompt_ends(hidden.shape[0], hidden.shape[1], hidden.device)
            rows = torch.arange(hidden.shape[0], device=hidden.device)
            captured.append(hidden[rows, ends].float().to(self.device))

        query = self.handle.module(self.handle.decoder_layer(self.query_layer))
        hook = query.register_forward_hook(capture)
        try:
            self.handle.model.base_model(**encoded, use_cache=False)
        finally:
            hook.remove()
        return self._codes_of(captured[0])

    # Editing -----------------------------------------------------------------------------------

    def _allocations(self, prompts: Sequence[str]) -> torch.Tensor:
        """A random allocation (k LoRAs per layer) per prompt, drawn before training.

        The draw is seeded by `seed` and the prompt alone, so it does not depend
        on what was edited or undone before: a stream replayed from a journal
        draws what the uninterrupted one drew.
        """
        shape = (len(self.layers), self.config.n_loras)
        draws = [
            torch.rand(shape, generator=replayable_generator(self.config.seed, prompt))
            for prompt in prompts
        ]
        return torch.stack(draws).argsort(dim=-1)[..., : self.config.top_k].to(self.device)

    def _rehearsal(
        self, requests: list[EditRequest], allocations: torch.Tensor
    ) -> tuple[list[EditRequest], torch.Tensor, int]:
        """The next `replay` held edits in turn, from where the latest held batch's
        rehearsal ended, with their allocations, and where the next one starts."""
        count = min(self.config.replay, len(requests))
        start = self._batches[-1].rehearsal_end if self._batches else 0
        chosen = [(start + offset) % len(requests) for offset in range(count)]
        end = (start + count) % max(len(requests), 1)
        return [requests[index] for index in chosen], allocations[chosen], end

    @contextmanager
    def _training(
        self,
        before: dict[str, torch.Tensor],
        batch_loras: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
    ) -> Iterator[None]:
        """Forward passes in this thread train (through `batch_loras`, with
        `batch_rank`); whatever fails inside puts the editor's tensors back to
        `before`."""
        self._local.training = True
        self._local.batch_loras = batch_loras
        try:
            yield
        except BaseException:
            self._set_tensors(before)
            raise
        finally:
            self._local.training = False
            self._local.routing = None
            self._local.batch_loras = None

    def apply(self, batch: Sequence[EditRequest]) -> ElderEdit:
        """Train adapters and routers on the batch's prompts, with `replay`
        earlier edits rehearsed alongside, and keep the new edits' queries.

        Only the edit prompts are trained on; rephrases are left for evaluation.
        """
        if not batch:
            raise ValueError("an edit batch must hold at least one request")
        batch = list(batch)
        if self.config.batch_rank:
            return self._apply_batch_lora(batch)
        allocation = self._allocations([request.prompt for request in batch])
        held_requests, held_allocations, held_queries = self._held()
        rehearsed, rehearsed_allocation, rehearsal_end = self._rehearsal(
            held_requests, held_allocations
        )
        trained = batch + rehearsed
        allocations = torch.cat([allocation, rehearsed_allocation])
        tokens = edit_batch(
            self.handle, [r.prompt for r in trained], [r.target_new for r in trained]
        )
        new_tokens = tokens.target_rows < len(batch)
        before = self._snapshot()
        optimizer = torch.optim.Adam(self._parameters(), lr=self.config.lr)
        with self._training(before):
            with self.handle.frozen_below(self.layers[0], tokens):
                for step in range(self.config.steps + 1):
                    logits = self.handle.target_logits(tokens)
                    routing = self.current_routing
                    token_losses = F.cross_entropy(logits, tokens.target_ids, reduction="none")
                    edit_loss = token_losses.mean()
                    probability = _lowest_mean_probability(token_losses, new_tokens)
                    if probability >= self.config.early_stop or step == self.config.steps:
                        break
                    optimizer.zero_grad(set_to_none=True)
                    guide = -routing.log_probs.gather(-1, allocations).sum(dim=(1, 2)).mean()
                    loss = edit_loss + self.config.guide_weight * guide
                    if len(held_queries) and self.config.anchor_weight:
                        held = self._route(held_queries).log_probs.gather(-1, held_allocations)
                        loss = loss - self.config.anchor_weight * held.sum(dim=(1, 2)).mean()
                    loss.backward()
                    optimizer.step()
            queries = routing.queries[: len(batch)].detach()
            trained_through = routing.indices[: len(batch)].detach().clone()
            self._fit_routers(held_queries, held_allocations, queries, trained_through, batch)
            logger.debug(
                "elder batch of %d: %d steps, p(target) %.3f", len(batch), step, probability
            )
            deltas, after = self._settle(before)
        record = self._add_batch(_Batch(batch, trained_through, queries, rehearsal_end))
        held = {
            "allocation": trained_through,
            "queries": queries,
            "rehearsal_end": torch.tensor(rehearsal_end),
        }
        return ElderEdit(self, record, held, deltas, before, after)

    def _apply_batch_lora(self, batch: list[EditRequest]) -> ElderEdit:
        """Train a fresh LoRA per adapted layer on the batch's edits alone, refit
        the routers so that every held edit's query gives its allocation code,
        and hold the LoRAs with the batch (`batch_rank`)."""
        prompts = [request.prompt for request in batch]
        allocation = self._allocations(prompts)
        _, held_allocations, held_queries = self._held()
        generator = replayable_generator(self.config.seed, *prompts)
        rank = self.config.batch_rank
        loras = []
        for name in self.modules:
            d_out, d_in = self.handle.weight_of(name).shape
            lora_a = initial_lora_a((rank, d_in), d_in, generator).to(self.device)
            lora_b = torch.zeros(d_out, rank, device=self.device)
            loras.append((lora_a.requires_grad_(), lora_b.requires_grad_()))
        tokens = edit_batch(self.handle, prompts, [request.target_new for request in batch])
        before = self._snapshot()
        optimizer = torch.optim.Adam([t for pair in loras for t in pair], lr=self.config.lr)
        with self._training(before, loras):
            with self.handle.frozen_below(self.layers[0], tokens):
                step, probability = train_until_likely(
                    self.handle, tokens, optimizer, self.config.steps, self.config.early_stop
                )
            queries = self.current_routing.queries.detach()
            logger.debug(
                "elder batch LoRA for %d edits: %d steps, p(target) %.3f",
                len(batch),
                step,
                probability,
            )
            if not all(torch.isfinite(t).all() for pair in loras for t in pair):
                raise NonFiniteUpdateError(
                    "ELDER's batch LoRA training diverged (non-finite values); the batch "
                    "was rejected and the editor left unchanged"
                )
            self._fit_routers(held_queries, held_allocations, queries, allocation, batch)
            deltas, after = self._settle(before)
        held = {
            "allocation": allocation,
            "queries": queries,
            "rehearsal_end": torch.tensor(0),
            "edit_loras": torch.zeros(len(batch), dtype=torch.long),
        }
        for position, (lora_a, lora_b) in enumerate(loras):
            held[f"lora_a.{position}"] = lora_a.detach()[None]
            held[f"lora_b.{position}"] = lora_b.detach()[None]
        record = self._add_batch(self._held_batch(held, batch))
        return ElderEdit(self, record, held, deltas, before, after)

    def _held_batch(self, held: dict[str, torch.Tensor], requests: Sequence[EditRequest]) -> _Batch:
        """The edits (for rehearsal), their allocations and queries, where rehearsal
        stands, and with `batch_rank` the batch's own LoRAs."""
        device = self.device
        loras, edit_loras = None, None
        if "edit_loras" in held:
            edit_loras = held["edit_loras"].to(device)
            loras = [
                (held[f"lora_a.{position}"].to(device), held[f"lora_b.{position}"].to(device))
                for position in range(len(self.modules))
            ]
        return _Batch(
            list(requests),
            held["allocation"].to(device),
            held["queries"].to(device),
            int(held["rehearsal_end"]),
            loras,
            edit_loras,
        )

    def _batch_lora_bank(self) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor]:
        """Every held batch's LoRAs stacked per adapted layer, A (n, r, d_in) and
        B (n, d_out, r), and (edits,) the one each held edit was trained through."""
        if self._bank is None:
            edit_loras, opened = [], 0
            for batch in self._batches:
                edit_loras.append(batch.edit_loras + opened)
                opened += batch.loras[0][0].shape[0]
            stacks, rank = [], self.config.batch_rank
            for position, name in enumerate(self.modules):
                d_out, d_in = self.handle.weight_of(name).shape
                lora_a = [torch.zeros(0, rank, d_in, device=self.device)]
                lora_b = [torch.zeros(0, d_out, rank, device=self.device)]
                for batch in self._batches:
                    lora_a.append(batch.loras[position][0])
                    lora_b.append(batch.loras[position][1])
                stacks.append((torch.cat(lora_a), torch.cat(lora_b)))
            empty = torch.zeros(0, dtype=torch.long, device=self.device)
            self._bank = (stacks, torch.cat([empty, *edit_loras]))
        return self._bank

    def _fit_routers(
        self,
        held_queries: torch.Tensor,
        held_allocations: torch.Tensor,
        queries: torch.Tensor,
        allocations: torch.Tensor,
        batch: Sequence[EditRequest],
    ) -> None:
        """Train the routers alone until the new batch's queries, and at most
        `router_fit_edits` held ones, each pick their allocation again.

        The held sample is drawn from the batch's prompts, so a stream replayed
        from a journal refits on what the uninterrupted one did.
        """
        limit = self.config.router_fit_edits
        if limit and len(held_queries) > limit:
            generator = replayable_generator(self.config.seed, "router", *(r.prompt for r in batch))
            chosen = torch.randperm(len(held_queries), generator=generator)[:limit]
            chosen = chosen.to(held_queries.device)
            held_queries, held_allocations = held_queries[chosen], held_allocations[chosen]
        queries = torch.cat([held_queries, queries])
        allocations = torch.cat([held_allocations, allocations])
        optimizer = torch.optim.Adam([self.router], lr=self.config.lr)
        wanted = allocation_codes(allocations, self.config.n_loras)
        for _ in range(self.config.router_steps):
            routing = self._route(queries)
            if torch.equal(allocation_codes(routing.indices, self.config.n_loras), wanted):
                break
            optimizer.zero_grad(set_to_none=True)
            loss = -routing.log_probs.gather(-1, allocations).sum(dim=(1, 2)).mean()
            loss.backward()
            optimizer.step()

    def _changed(self) -> None:
        self._codes = None
        self._subjects = None
        self._bank = None

    def tensors(self) -> dict[str, torch.Tensor]:
        """Routers and LoRAs by name (as a journal stores their deltas)."""
        named = {"elder.router": self.router}
        for position, adapter in enumerate(self.adapters):
            named[f"elder.adapters.{position}.lora_a"] = adapter.lora_a
            named[f"elder.adapters.{position}.lora_b"] = adapter.lora_b
        return named

    # Saving ------------------------------------------------------------------------------------

    def _held(self) -> tuple[list[EditRequest], torch.Tensor, torch.Tensor]:
        """Every held edit: the requests, their allocations and their queries."""
        if not self._batches:
            device = self.device
            allocations = torch.zeros(0, len(self.layers), self.config.top_k, dtype=torch.long)
            queries = torch.zeros(0, self.router.shape[-1])
            return [], allocations.to(device), queries.to(device)
        requests = [request for batch in self._batches for request in batch.requests]
        allocations = torch.cat([batch.allocation for batch in self._batches])
        return requests, allocations, torch.cat([batch.queries for batch in self._batches])

    def save(self, directory: str | Path) -> None:
        """Adapters, routers and the held edits' queries and allocations as
        safetensors; the settings and the edits' prompts and targets (for
        rehearsal) as JSON."""
        requests, allocations, queries = self._held()
        tensors = {
            "router": self.router.detach(),
            "allocations": allocations,
            "queries": queries,
        }
        for position, adapter in enumerate(self.adapters):
            tensors[f"adapters.{position}.lora_a"] = adapter.lora_a.detach()
            tensors[f"adapters.{position}.lora_b"] = adapter.lora_b.detach()
        batch_loras = 0
        if self.config.batch_rank:
            stacks, tensors["edit_loras"] = self._batch_lora_bank()
            for position, (lora_a, lora_b) in enumerate(stacks):
                tensors[f"adapters.{position}.lora_a"] = lora_a
                tensors[f"adapters.{position}.lora_b"] = lora_b
            batch_loras = stacks[0][0].shape[0]
        record = {
            "config": asdict(self.config),
            "batch_loras": batch_loras,
            "modules": self.modules,
            "query_layer": self.query_layer,
            "rehearsal_start": self._batches[-1].rehearsal_end if self._batches else 0,
            "edits": [
                {"prompt": r.prompt, "target_new": r.target_new, "subject": r.subject}
                for r in requests
            ],
        }
        self._write(directory, tensors, record)

    def load(self, directory: str | Path) -> None:
        """Take over a saved editor: its settings, adapters, routers and edits.

        Everything is checked against this model before anything changes. The
        loaded edits count as one earlier batch that cannot be undone; batches
        applied before loading can no longer be undone.
        """
        record, tensors = self._read(directory)
        config = ElderConfig(**record["config"])
        _, _, modules = self._resolve(config)
        if modules != record["modules"]:
            raise ValueError(
                f"{directory} adapts {record['modules']}; on this model its settings name {modules}"
            )
        shapes = self._tensor_shapes(
            config, modules, len(record["edits"]), int(record.get("batch_loras", 0))
        )
        for key, shape in shapes.items():
            if key not in tensors or tuple(tensors[key].shape) != shape:
                found = tuple(tensors[key].shape) if key in tensors else "nothing"
                raise ValueError(f"{directory}: '{key}' should have shape {shape}, found {found}")
        requests = [
            EditRequest(edit["prompt"], edit["target_new"], subject=edit.get("subject"))
            for edit in record["edits"]
        ]
        rehearsal_start = int(record.get("rehearsal_start", 0))
        self._build(config)
        with torch.no_grad():
            self.router.copy_(tensors["router"])
            for position, adapter in enumerate(self.adapters):
                adapter.lora_a.copy_(tensors[f"adapters.{position}.lora_a"])
                adapter.lora_b.copy_(tensors[f"adapters.{position}.lora_b"])
        if requests:
            held = {
                "allocation": tensors["allocations"],
                "queries": tensors["queries"],
                "rehearsal_end": torch.tensor(rehearsal_start),
            }
            if config.batch_rank:
                held["edit_loras"] = tensors["edit_loras"]
                for position in range(len(modules)):
                    held[f"lora_a.{position}"] = tensors[f"adapters.{position}.lora_a"]
                    held[f"lora_b.{position}"] = tensors[f"adapters.{position}.lora_b"]
            self._batches = [self._held_batch(held, requests)]
