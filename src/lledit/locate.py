"""Locate-then-edit (MEMIT, AlphaEdit): the math both methods share.

An edit is written into the MLP output projections of a few consecutive
layers. Each projection maps a key (its input at the subject's last token) to a
value that the residual stream carries on. For every edit a target hidden
state z at the last edited ("critical") layer is found by gradient steps; the
gap between z and the current hidden state is divided over the edited layers
and each layer's share is written into its projection in closed form, with
the second moment C = E[k kᵀ] of keys over generic text telling which
directions ordinary inputs use (and so must be disturbed as little as
possible).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from platformdirs import user_cache_dir
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from safetensors.torch import load_file, save_file
from transformers import GenerationConfig

from lledit.data.request import EditRequest
from lledit.methods.base import NonFiniteUpdateError
from lledit.model import ModelHandle
from lledit.tokens import EncodedPair, TokenBatch, collate, encode_pairs

logger = logging.getLogger(__name__)

PREFIX_STARTS = ("The", "Therefore", "Because", "I", "You", "In", "It", "When", "After", "We")
"""First words of the random prefixes put before edit prompts (as in MEMIT)."""

TEXT_STARTS = (
    *PREFIX_STARTS,
    "A",
    "This",
    "There",
    "He",
    "She",
    "According to",
    "One",
    "My",
)
"""First words of the text sampled from the model for key statistics."""

STATS_VERSION = 1
"""Bumped whenever the way statistics are computed changes, so old caches are not reused."""


class SubjectNotFoundError(ValueError):
    """A request's subject does not occur in its prompt."""


@dataclass
class LocateConfig:
    """Settings shared by MEMIT and AlphaEdit.

    The defaults are meant for SmolLM2-135M (30 layers, 576 hidden, 1536 MLP)
    on CPU; they follow MEMIT/AlphaEdit scaled to a small model and are still
    to be confirmed by measurement.
    """

    layers: str | None = None
    """Edited layers: "4,5,6,7,8" or "4-8"; the last one is the critical layer.
    None: five consecutive low-middle layers (4-8 on a 30-layer model)."""
    module: str | None = None
    """The projection edited in each layer (e.g. `mlp.down_proj`); None: the MLP
    output projection. It must write into the residual stream."""
    value_steps: int = 10
    """Most gradient steps of the target-value optimisation."""
    value_lr: float = 1.0
    """Adam learning rate of the target-value optimisation."""
    clamp: float = 0.75
    """Largest norm of the hidden-state change, as a fraction of the hidden state's norm."""
    kl_weight: float = 0.0625
    """Weight of the KL term that keeps the subject's other predictions ("{subject} is a")."""
    early_stop: float = 0.9
    """Stop the value optimisation once the mean probability of the targets reaches this."""
    prefix_count: int = 2
    """Random prefixes (sampled from the model) that keys and values are averaged over."""
    prefix_length: int = 6
    """Tokens sampled for each prefix after its first word."""
    stats_corpus: str | None = None
    """Text file for the key statistics (one document per line, or blank-line
    separated); None: text sampled from the model itself."""
    stats_samples: int = 20000
    """Number of keys (token positions) the statistics average over."""
    seed: int = 0
    """Seed of the sampled prefixes and statistics text."""

    def __post_init__(self) -> None:
        if self.value_steps < 0:
            raise ValueError(f"value_steps must be at least 0, got {self.value_steps}")
        if self.prefix_count < 0 or self.prefix_length < 1:
            raise ValueError(
                f"prefix_count must be >= 0 and prefix_length >= 1, "
                f"got {self.prefix_count}, {self.prefix_length}"
            )
        if self.stats_samples < 1:
            raise ValueError(f"stats_samples must be at least 1, got {self.stats_samples}")
        if not (self.value_lr > 0 and self.clamp > 0 and self.kl_weight >= 0):
            raise ValueError(
                f"value_lr and clamp must be positive and kl_weight >= 0, got "
                f"{self.value_lr}, {self.clamp}, {self.kl_weight}"
            )
        if not 0 < self.early_stop <= 1:
            raise ValueError(f"early_stop must be in (0, 1], got {self.early_stop}")


# Subject positions ----------------------------------------------------------------------------


def subject_span(request: EditRequest) -> tuple[int, int] | None:
    """Character span of the subject in the prompt; None if the request has no subject.

    The first case-sensitive match wins; failing that, the first match
    ignoring case. A subject that is not in the prompt is an error, since
    editing at the wrong token silently writes the fact somewhere useless.
    """
    if request.subject is None:
        return None
    start = request.prompt.find(request.subject)
    if start >= 0:
        return start, start + len(request.subject)
    match = re.search(re.escape(request.subject), request.prompt, re.IGNORECASE)
    if match is None:
        name = f"request {request.id!r}" if request.id is not None else "a request"
        raise SubjectNotFoundError(
            f"{name}: subject {request.subject!r} does not occur in prompt {request.prompt!r}"
        )
    return match.span()


def token_positions(
    tokenizer, texts: Sequence[str], spans: Sequence[tuple[int, int] | None]
) -> tuple[list[list[int]], list[int]]:
    """Token ids of each text and the index of the last token overlapping its span.

    Offsets come from the tokeniser itself, so a subject whose first token
    carries the preceding space, or that starts the text, is found all the
    same. A span of None means the last token of the text (requests without a
    subject are edited at the last prompt token).
    """
    if not getattr(tokenizer, "is_fast", False):
        raise TypeError("finding subject tokens needs a fast tokenizer (with offset mappings)")
    if not texts:
        return [], []
    encoded = tokenizer(list(texts), return_offsets_mapping=True)
    positions = []
    for text, span, ids, offsets in zip(
        texts, spans, encoded["input_ids"], encoded["offset_mapping"], strict=True
    ):
        if span is None:
            positions.append(len(ids) - 1)
            continue
        start, end = span
        overlapping = [i for i, (s, e) in enumerate(offsets) if s < end and e > start]
        if not overlapping:
            raise SubjectNotFoundError(f"no token of {text!r} covers characters {start}-{end}")
        positions.append(overlapping[-1])
    return [list(ids) for ids in encoded["input_ids"]], positions


# Running the model and reading it ------------------------------------------------------------


class _Enough(Exception):
    """Raised from a hook once everything needed is captured, to skip the rest of a forward."""


def _hidden_of(output: Any) -> torch.Tensor:
    """A decoder layer's hidden states, whether the layer returns a tensor or a tuple."""
    return output if isinstance(output, torch.Tensor) else output[0]


def _with_hidden(output: Any, hidden: torch.Tensor) -> Any:
    return hidden if isinstance(output, torch.Tensor) else (hidden, *output[1:])


def _run(handle: ModelHandle, batch: TokenBatch) -> torch.Tensor | None:
    """The final hidden states; None if a hook ended the forward early."""
    try:
        return handle.model.base_model(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            position_ids=batch.position_ids,
            use_cache=False,
        ).last_hidden_state
    except _Enough:
        return None


@contextmanager
def added_deltas(handle: ModelHandle, deltas: Mapping[str, torch.Tensor]) -> Iterator[None]:
    """Run the model as if each (d_out, d_in) delta were added to its module's weight.

    The weights are not touched, so nothing needs restoring if computing the
    rest of an update fails.
    """

    def hook_for(delta: torch.Tensor):
        def add(module, inputs, output):
            return output + F.linear(inputs[0], delta.to(inputs[0].dtype))

        return add

    hooks = [
        handle.module(name).register_forward_hook(hook_for(delta)) for name, delta in deltas.items()
    ]
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()


def _layer_name(handle: ModelHandle, layer: int) -> str:
    return f"{handle.arch.layers}.{layer}"


@dataclass
class _Contexts:
    """Every request's prompt, alone and after each prefix, with its subject token."""

    tokens: TokenBatch
    positions: torch.Tensor
    owner: torch.Tensor
    """The request each row belongs to."""
    plain: torch.Tensor
    """The row of each request's prompt without a prefix."""


def _context_texts(
    requests: Sequence[EditRequest], prefixes: Sequence[str]
) -> tuple[list[str], list[tuple[int, int] | None], list[int]]:
    texts, spans, owner = [], [], []
    for index, request in enumerate(requests):
        span = subject_span(request)
        for prefix in ("", *prefixes):
            texts.append(prefix + request.prompt)
            spans.append(None if span is None else (span[0] + len(prefix), span[1] + len(prefix)))
            owner.append(index)
    return texts, spans, owner


def _contexts(
    handle: ModelHandle, requests: Sequence[EditRequest], prefixes: Sequence[str]
) -> _Contexts:
    texts, spans, owner = _context_texts(requests, prefixes)
    ids, positions = token_positions(handle.tokenizer, texts, spans)
    tokens = collate([EncodedPair(i, len(i)) for i in ids], handle.tokenizer.pad_token_id)
    device = handle.device
    return _Contexts(
        tokens=tokens.to(device),
        positions=torch.tensor(positions, device=device),
        owner=torch.tensor(owner, device=device),
        plain=torch.arange(0, len(texts), 1 + len(prefixes), device=device),
    )


@torch.no_grad()
def _keys_and_hidden(
    handle: ModelHandle, contexts: _Contexts, module: str, layer: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys of `module` averaged over each request's contexts (n, d_in), and the
    output of decoder layer `layer` at each plain prompt's subject token (n, d)."""
    rows = torch.arange(len(contexts.positions), device=handle.device)
    captured: dict[str, torch.Tensor] = {}

    def keep_key(mod, inputs):
        captured["key"] = inputs[0][rows, contexts.positions].float()

    def keep_hidden(mod, inputs, output):
        hidden = _hidden_of(output)
        captured["hidden"] = hidden[contexts.plain, contexts.positions[contexts.plain]].float()
        raise _Enough

    hooks = [
        handle.module(module).register_forward_pre_hook(keep_key),
        handle.module(_layer_name(handle, layer)).register_forward_hook(keep_hidden),
    ]
    try:
        _run(handle, contexts.tokens)
    finally:
        for hook in hooks:
            hook.remove()
    count = int(contexts.owner.max()) + 1
    sums = torch.zeros(count, captured["key"].shape[1], device=handle.device)
    sums.index_add_(0, contexts.owner, captured["key"])
    per_request = torch.bincount(contexts.owner, minlength=count).unsqueeze(1)
    return sums / per_request, captured["hidden"]


# Random prefixes ------------------------------------------------------------------------------


def _rng_devices(handle: ModelHandle) -> list[int]:
    device = handle.device
    return [device.index or 0] if device.type == "cuda" else []


@torch.no_grad()
def _sampling(tokenizer, top_k: int, length: int) -> GenerationConfig:
    """Top-k sampling of exactly `length` new tokens."""
    return GenerationConfig(
        do_sample=True,
        top_k=top_k,
        max_new_tokens=length,
        min_new_tokens=length,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )


def sample_prefixes(handle: ModelHandle, count: int, length: int, seed: int) -> list[str]:
    """Short texts sampled from the model, each ending in ". ", to put before prompts.

    Averaging keys and target values over a prompt in several contexts makes
    an edit hold beyond the exact wording of the request (MEMIT's context
    templates). Sampled with a fixed seed, so an editor's prefixes are
    reproducible; the global random state is left alone.
    """
    tokenizer = handle.tokenizer
    generation = _sampling(tokenizer, top_k=5, length=length)
    prefixes = []
    with torch.random.fork_rng(devices=_rng_devices(handle)):
        torch.manual_seed(seed)
        for index in range(count):
            start = tokenizer([PREFIX_STARTS[index % len(PREFIX_STARTS)]], return_tensors="pt")
            out = handle.model.generate(
                input_ids=start["input_ids"].to(handle.device),
                attention_mask=start["attention_mask"].to(handle.device),
                generation_config=generation,
            )
            text = tokenizer.decode(out[0], skip_special_tokens=True)
            prefixes.append(" ".join(text.split()) + ". ")
    return prefixes


# Target values --------------------------------------------------------------------------------


def target_values(
    handle: ModelHandle,
    requests: Sequence[EditRequest],
    layer: int,
    prefixes: Sequence[str],
    config: LocateConfig,
) -> torch.Tensor:
    """The hidden state z (n, d) at the output of decoder layer `layer`, at each
    request's subject token, that makes the model produce `target_new`.

    One change per request is added to the layer's output at the subject's
    last token, in the prompt and in each prefixed copy of it, and optimised
    on all requests together in one batched forward per step. The loss is the
    cross-entropy of the targets plus a KL term that keeps the model's
    prediction after "{subject} is a" (requests without a subject have no KL
    term); the change is clamped to `config.clamp` times the hidden state's
    norm, and the optimisation stops early once the mean target probability
    reaches `config.early_stop`.
    """
    tokenizer = handle.tokenizer
    texts, spans, owner = _context_texts(requests, prefixes)
    pairs = encode_pairs(tokenizer, texts, [requests[i].target_new for i in owner])
    _, positions = token_positions(tokenizer, texts, spans)
    rewrites = len(pairs)
    # The KL prompts "{subject} is a", one per request that has a subject.
    essence = [(i, r.subject) for i, r in enumerate(requests) if r.subject is not None]
    ids, kl_positions = token_positions(
        tokenizer, [f"{s} is a" for _, s in essence], [(0, len(s)) for _, s in essence]
    )
    pairs += [EncodedPair(i, len(i)) for i in ids]
    positions += kl_positions
    owner += [i for i, _ in essence]
    device = handle.device
    tokens = collate(pairs, tokenizer.pad_token_id).to(device)
    rows = torch.arange(len(pairs), device=device)
    positions_t = torch.tensor(positions, device=device)
    owner_t = torch.tensor(owner, device=device)
    plain = torch.arange(0, rewrites, 1 + len(prefixes), device=device)
    kl_rows = torch.arange(rewrites, len(pairs), device=device)
    kl_last = torch.tensor([len(i) - 1 for i in ids], dtype=torch.long, device=device)
    target_lengths = torch.tensor(tokens.target_lengths[:rewrites], device=device)

    width = handle.model.get_input_embeddings().weight.shape[1]
    delta = torch.zeros(len(requests), width, device=device, requires_grad=True)
    optimizer = torch.optim.Adam([delta], lr=config.value_lr)
    original: dict[str, torch.Tensor] = {}

    def add_delta(module, inputs, output):
        hidden = _hidden_of(output)
        if "hidden" not in original:
            original["hidden"] = hidden[plain, positions_t[plain]].detach().float()
        change = delta[owner_t].to(hidden.dtype)
        return _with_hidden(output, hidden.index_put((rows, positions_t), change, accumulate=True))

    head = handle.model.get_output_embeddings()
    hook = handle.module(_layer_name(handle, layer)).register_forward_hook(add_delta)
    try:
        for step in range(config.value_steps + 1):
            hidden = _run(handle, tokens)
            logits = head(hidden[tokens.target_rows, tokens.target_positions - 1]).float()
            token_nll = F.cross_entropy(logits, tokens.target_ids, reduction="none")
            row_nll = torch.zeros(rewrites, device=device).index_add(
                0, tokens.target_rows, token_nll
            )
            row_nll = row_nll / target_lengths
            loss = row_nll.mean()
            if essence:
                kl_logprobs = head(hidden[kl_rows, kl_last]).float().log_softmax(-1)
                if "kl" not in original:
                    original["kl"] = kl_logprobs.detach()
                kl = F.kl_div(kl_logprobs, original["kl"], log_target=True, reduction="batchmean")
                loss = loss + config.kl_weight * kl
            probability = row_nll.detach().neg().exp().mean().item()
            if probability >= config.early_stop or step == config.value_steps:
                break
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                limit = config.clamp * original["hidden"].norm(dim=1, keepdim=True)
                norm = delta.norm(dim=1, keepdim=True)
                delta.mul_(torch.where(norm > limit, limit / norm, torch.ones_like(norm)))
    finally:
        hook.remove()
    logger.debug("target values: %d steps, mean p(target) %.3f", step, probability)
    return original["hidden"] + delta.detach()


# Spreading the change over the layers ---------------------------------------------------------

Solver = Callable[[str, torch.Tensor, torch.Tensor], torch.Tensor]
"""(module, keys (d_in, n), residual (d_out, n)) -> the module's weight delta (d_out, d_in)."""


def _check_finite(name: str, value: torch.Tensor) -> None:
    if not torch.isfinite(value).all():
        raise NonFiniteUpdateError(
            f"the {name} of this batch are not finite; the batch was rejected "
            "and the model left unchanged"
        )


def layer_deltas(
    handle: ModelHandle,
    requests: Sequence[EditRequest],
    modules: Sequence[str],
    layer: int,
    prefixes: Sequence[str],
    config: LocateConfig,
    solve: Solver,
) -> dict[str, torch.Tensor]:
    """The weight delta of each edited module, lowest layer first (MEMIT's scheme).

    For module i of m, the keys are read with the deltas of the modules below
    already in effect, the residual z - h (h: the critical layer's current
    output) is divided by the m - i modules left, and `solve` turns keys and
    residual into the module's delta. The model's weights are not changed.
    """
    z = target_values(handle, requests, layer, prefixes, config)
    _check_finite("target values", z)
    contexts = _contexts(handle, requests, prefixes)
    deltas: dict[str, torch.Tensor] = {}
    for index, module in enumerate(modules):
        with added_deltas(handle, deltas):
            keys, hidden = _keys_and_hidden(handle, contexts, module, layer)
        _check_finite("keys", keys)
        residual = (z - hidden).T / (len(modules) - index)
        deltas[module] = solve(module, keys.T, residual)
    return deltas


# Closed forms -------------------------------------------------------------------------------


def memit_delta(
    residual: torch.Tensor, keys: torch.Tensor, covariance: torch.Tensor, weight: float
) -> torch.Tensor:
    """ΔW = R Kᵀ (λC + K Kᵀ)⁻¹ (MEMIT), solved in float64, returned in float32.

    It minimises ‖ΔW K - R‖² + λ tr(ΔW C ΔWᵀ): fit the new keys while moving
    the outputs of ordinary keys (second moment C) as little as possible.
    """
    k = keys.double()
    system = weight * covariance.to(k) + k @ k.T
    return torch.linalg.solve(system, k @ residual.double().T).T.float()


def null_space_projection(covariance: torch.Tensor, threshold: float) -> torch.Tensor:
    """P onto the eigenvectors of C whose eigenvalues are below `threshold` times the largest.

    Keys of ordinary text lie in the span of the large eigenvalues, so an
    update multiplied by P leaves their outputs (almost) unchanged. The
    threshold is relative, so it means the same whatever the scale of the keys.
    """
    values, vectors = torch.linalg.eigh(covariance.double())
    kept = vectors[:, values < threshold * values.max()]
    return (kept @ kept.T).float()


def alphaedit_delta(
    residual: torch.Tensor,
    keys: torch.Tensor,
    projection: torch.Tensor,
    past: torch.Tensor,
    l2: float,
) -> torch.Tensor:
    """ΔW = R Kᵀ P ((K_p K_pᵀ + K Kᵀ) P + l2·I)⁻¹ P (AlphaEdit), in float64, returned in float32.

    `past` is K_p K_pᵀ, the keys of earlier edits. The result minimises
    ‖ΔW K - R‖² + ‖ΔW K_p‖² + l2‖ΔW‖² over updates of the form ΔW P, so keys
    outside P's range are left exactly alone and earlier edits' keys are
    disturbed as little as the new fit allows.
    """
    k = keys.double()
    p = projection.to(k)
    identity = torch.eye(len(p), dtype=k.dtype, device=k.device)
    system = p @ (past.to(k) + k @ k.T) + l2 * identity
    return (torch.linalg.solve(system, p @ k @ residual.double().T).T @ p).float()


# Key statistics -------------------------------------------------------------------------------


def stats_dir() -> Path:
    return Path(user_cache_dir("lledit")) / "stats"


def read_corpus(path: str | Path) -> list[str]:
    """Documents of a text file: separated by blank lines if it has any, else one per line."""
    text = Path(path).read_text(encoding="utf-8")
    parts = re.split(r"\n\s*\n", text) if re.search(r"\n\s*\n", text) else text.splitlines()
    documents = [part.strip() for part in parts if part.strip()]
    if not documents:
        raise ValueError(f"the statistics corpus {path} holds no text")
    return documents


def _sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class _SecondMoment:
    """Σ k kᵀ over at most `budget` keys, accumulated in float64."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.count = 0
        self.total: torch.Tensor | None = None

    @property
    def full(self) -> bool:
        return self.count >= self.budget

    def add(self, keys: torch.Tensor) -> None:
        keys = keys[: self.budget - self.count].float()
        if self.total is None:
            self.total = torch.zeros(keys.shape[1], keys.shape[1], dtype=torch.float64)
            self.total = self.total.to(keys.device)
        self.total += (keys.T @ keys).double()
        self.count += len(keys)


def _stats_key(
    handle: ModelHandle,
    module: str,
    samples: int,
    corpus: str | None,
    seed: int,
    max_length: int,
    batch_size: int,
) -> dict[str, Any]:
    key: dict[str, Any] = {
        "version": STATS_VERSION,
        "model": handle.name,
        "module": module,
        "samples": samples,
        "max_length": max_length,
    }
    if corpus is None:
        # Sampling in batches of another size gives other text.
        key.update(source="sampled", seed=seed, batch_size=batch_size)
    else:
        key.update(source="corpus", corpus_sha256=_sha256(corpus))
    return key


def _stats_path(key: dict[str, Any]) -> Path:
    model = re.sub(r"[^A-Za-z0-9._-]+", "_", key["model"]).strip("_") or "model"
    source = (
        f"sampled-seed{key['seed']}-batch{key['batch_size']}"
        if key["source"] == "sampled"
        else f"corpus-{key['corpus_sha256'][:16]}"
    )
    name = f"{key['module']}.{source}.len{key['max_length']}.n{key['samples']}"
    return stats_dir() / model / f"{name}.safetensors"


def _load_stats(key: dict[str, Any]) -> torch.Tensor | None:
    path = _stats_path(key)
    settings = path.with_suffix(".json")
    if not (path.exists() and settings.exists()):
        return None
    try:
        if json.loads(settings.read_text())["key"] != key:
            return None
        return load_file(path)["covariance"]
    except (OSError, ValueError, KeyError) as error:
        logger.warning("ignoring unreadable statistics %s: %s", path, error)
        return None


def _save_stats(key: dict[str, Any], covariance: torch.Tensor, info: dict[str, Any]) -> None:
    path = _stats_path(key)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    save_file({"covariance": covariance.contiguous()}, str(partial))
    partial.replace(path)
    settings = path.with_suffix(".json")
    partial = settings.with_name(settings.name + ".partial")
    partial.write_text(json.dumps({"key": key, **info}, indent=2))
    partial.replace(settings)


def _stats_progress() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        transient=True,
    )


@contextmanager
def _collecting(
    handle: ModelHandle, moments: Mapping[str, _SecondMoment], mask: dict[str, torch.Tensor]
) -> Iterator[None]:
    """Feed every key that passes through the modules into their accumulators.

    `mask["tokens"]`, when set, picks the real (non-padding) positions of the
    current batch. Stops the forward once every accumulator is full.
    """

    def hook_for(moment: _SecondMoment):
        def collect(module, inputs):
            keys = inputs[0]
            keys = keys[mask["tokens"]] if "tokens" in mask else keys.reshape(-1, keys.shape[-1])
            moment.add(keys)
            if all(m.full for m in moments.values()):
                raise _Enough

        return collect

    hooks = [
        handle.module(name).register_forward_pre_hook(hook_for(moment))
        for name, moment in moments.items()
    ]
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()


def _collect_from_corpus(
    handle: ModelHandle,
    moments: Mapping[str, _SecondMoment],
    corpus: str,
    max_length: int,
    batch_size: int,
    advance: Callable[[], None],
) -> None:
    documents = read_corpus(corpus)
    tokenizer = handle.tokenizer
    mask: dict[str, torch.Tensor] = {}
    with _collecting(handle, moments, mask):
        for start in range(0, len(documents), batch_size):
            chunk = documents[start : start + batch_size]
            ids = tokenizer(chunk, truncation=True, max_length=max_length)["input_ids"]
            pairs = [EncodedPair(list(i), len(i)) for i in ids if i]
            if not pairs:
                continue
            batch = collate(pairs, tokenizer.pad_token_id).to(handle.device)
            mask["tokens"] = batch.attention_mask.bool()
            finished = _run(handle, batch) is None
            advance()
            if finished:
                return


def _collect_from_samples(
    handle: ModelHandle,
    moments: Mapping[str, _SecondMoment],
    seed: int,
    max_length: int,
    batch_size: int,
    advance: Callable[[], None],
) -> None:
    """Keys of text the model writes itself, read while it is being generated.

    Each generation step feeds the newest token through the model, so its
    keys pass the hooks exactly once; no second pass over the text is needed.
    """
    tokenizer = handle.tokenizer
    generation = _sampling(tokenizer, top_k=50, length=max_length)
    with (
        torch.random.fork_rng(devices=_rng_devices(handle)),
        _collecting(handle, moments, {}),
    ):
        torch.manual_seed(seed)
        for index in range(math.ceil(max(m.budget for m in moments.values()) / batch_size) + 1):
            first_word = TEXT_STARTS[index % len(TEXT_STARTS)]
            start = tokenizer([first_word] * batch_size, return_tensors="pt")
            try:
                handle.model.generate(
                    input_ids=start["input_ids"].to(handle.device),
                    attention_mask=start["attention_mask"].to(handle.device),
                    generation_config=generation,
                )
            except _Enough:
                return
            finally:
                advance()


@torch.no_grad()
def key_covariances(
    handle: ModelHandle,
    modules: Sequence[str],
    *,
    samples: int,
    corpus: str | None = None,
    seed: int = 0,
    max_length: int = 128,
    batch_size: int = 64,
) -> dict[str, torch.Tensor]:
    """C = E[k kᵀ] (float32, on the CPU) of the input of each module, over `samples` keys.

    The text is `corpus` (a file; see `read_corpus`) or, with none, text the
    model samples itself (seeded), so nothing needs downloading. Results are
    cached under the user cache directory, keyed by model name, module, sample
    count and source (the corpus's sha256), and reused whenever the same
    statistics are asked for again; a reloaded matrix is identical to the
    computed one.
    """
    width = max(handle.weight_of(module).shape[1] for module in modules)
    if samples < 2 * width:
        # Too few keys leave directions of ordinary text unseen; updates then use them.
        logger.warning(
            "key statistics over %d keys for %d-wide keys are poorly estimated; "
            "ask for at least %d",
            samples,
            width,
            4 * width,
        )
    keys = {
        module: _stats_key(handle, module, samples, corpus, seed, max_length, batch_size)
        for module in modules
    }
    result = {}
    for module, key in keys.items():
        cached = _load_stats(key)
        if cached is not None:
            logger.info("key statistics of %s loaded from %s", module, _stats_path(key))
            result[module] = cached
    missing = [module for module in modules if module not in result]
    if not missing:
        return result
    moments = {module: _SecondMoment(samples) for module in missing}
    source = "model samples" if corpus is None else Path(corpus).name
    with _stats_progress() as progress:
        task = progress.add_task(f"key statistics ({source})", total=samples)

        def advance() -> None:
            progress.update(task, completed=min(m.count for m in moments.values()))

        if corpus is None:
            _collect_from_samples(handle, moments, seed, max_length, batch_size, advance)
        else:
            _collect_from_corpus(handle, moments, corpus, max_length, batch_size, advance)
    for module, moment in moments.items():
        if moment.total is None:
            raise ValueError(f"no keys reached {module}; the statistics corpus gave no tokens")
        if moment.count < samples:
            logger.warning(
                "the statistics corpus gave %d keys, fewer than the %d asked for",
                moment.count,
                samples,
            )
        covariance = (moment.total / moment.count).float().cpu()
        info = {"count": moment.count, "dtype": str(handle.dtype).removeprefix("torch.")}
        if corpus is not None:
            info["corpus"] = str(corpus)
        _save_stats(keys[module], covariance, info)
        logger.info("key statistics of %s saved to %s", module, _stats_path(keys[module]))
        result[module] = covariance
    return {module: result[module] for module in modules}


# Which modules ---------------------------------------------------------------------------------


def default_layers(num_layers: int) -> tuple[int, ...]:
    """Five consecutive low-middle layers, where MEMIT and AlphaEdit edit (4-8 of 30)."""
    start = max(1, round(0.15 * num_layers))
    layers = tuple(range(start, min(start + 5, num_layers - 1)))
    return layers or (min(start, num_layers - 1),)


def parse_layers(text: str, num_layers: int) -> tuple[int, ...]:
    """ "4,5,6" or "4-8" (negative indices count from the end) as sorted layer indices."""
    layers: set[int] = set()
    for part in text.split(","):
        part = part.strip()
        bounds = re.fullmatch(r"(-?\d+)\s*-\s*(-?\d+)", part)
        try:
            if bounds:
                first, last = (int(b) for b in bounds.groups())
                layers.update(range(first, last + 1))
            else:
                layers.add(int(part))
        except ValueError:
            raise ValueError(f"layers {text!r}: cannot read {part!r} as a layer") from None
    for layer in layers:
        if not -num_layers <= layer < num_layers:
            raise ValueError(f"layer {layer} does not exist; the model has {num_layers} layers")
    if not layers:
        raise ValueError(f"layers {text!r} names no layer")
    return tuple(sorted({layer % num_layers for layer in layers}))


class Locator:
    """The shared part of a locate-then-edit editor for one model and one config.

    Holds the edited modules, the critical layer and the random prefixes
    (sampled once, by `prepare` or on first use).
    """

    def __init__(self, handle: ModelHandle, config: LocateConfig) -> None:
        self.handle = handle
        self.config = config
        if config.layers is None:
            self.layers = default_layers(handle.num_layers)
        else:
            self.layers = parse_layers(config.layers, handle.num_layers)
        self.part = config.module or handle.arch.mlp_out
        self.modules = [handle.layer_module(layer, self.part) for layer in self.layers]
        width = handle.model.get_input_embeddings().weight.shape[1]
        for module in self.modules:
            d_out = handle.weight_of(module).shape[0]
            if d_out != width:
                raise ValueError(
                    f"'{module}' writes {d_out} values, not the {width} of the residual "
                    "stream; edit an MLP output projection"
                )
        self.critical_layer = self.layers[-1]
        self.prefixes: list[str] | None = None

    def prepare(self) -> None:
        """Sample the prefixes (once)."""
        if self.prefixes is None:
            self.prefixes = sample_prefixes(
                self.handle, self.config.prefix_count, self.config.prefix_length, self.config.seed
            )

    def covariances(self) -> dict[str, torch.Tensor]:
        """The key statistics of every edited module, on the model's device."""
        stats = key_covariances(
            self.handle,
            self.modules,
            samples=self.config.stats_samples,
            corpus=self.config.stats_corpus,
            seed=self.config.seed,
        )
        return {module: value.to(self.handle.device) for module, value in stats.items()}

    def deltas(self, requests: Sequence[EditRequest], solve: Solver) -> dict[str, torch.Tensor]:
        """The weight delta of every edited module for one batch (see `layer_deltas`)."""
        if not requests:
            raise ValueError("an edit batch must hold at least one request")
        self.prepare()
        assert self.prefixes is not None
        return layer_deltas(
            self.handle,
            requests,
            self.modules,
            self.critical_layer,
            self.prefixes,
            self.config,
            solve,
        )

    def describe(self) -> dict[str, Any]:
        """The resolved layers and modules, for the results' record of settings."""
        return {"layers": ",".join(map(str, self.layers)), "module": self.part}
