"""Key statistics: the second moment C = E[k kᵀ] of a module's inputs over ordinary text.

Locate-then-edit methods (MEMIT, AlphaEdit) keep their updates out of the
directions C says ordinary inputs use, and hypernetwork editors can shape
their ridge by it. Computed once per model, module and source of text, and
cached under the user cache directory.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from platformdirs import user_cache_dir
from safetensors.torch import load_file, save_file

from lledit import progress
from lledit.model import ModelHandle, StopForward, final_hidden, rng_devices, sampling_config
from lledit.tokens import EncodedPair, collate

logger = logging.getLogger(__name__)

TEXT_STARTS = (
    "The",
    "Therefore",
    "Because",
    "I",
    "You",
    "In",
    "It",
    "When",
    "After",
    "We",
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
    """Σ k kᵀ over at most `budget` keys, summed in float64.

    Each forward's float32 product is added to the float64 total in place,
    with no float64 copy of it (1.6 GB for a 14336-wide module). A float32
    total would halve the sum's memory, but its rounding would then depend
    on how the thread count splits each product, and a journal restarted
    with other threads would compute other statistics than the run it
    continues.
    """

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
            self.total = keys.new_zeros(keys.shape[1], keys.shape[1], dtype=torch.float64)
        self.total += keys.T @ keys
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


def _load_stats(key: dict[str, Any], width: int) -> torch.Tensor | None:
    """The cached statistics of `key`, or None when there are none that fit
    `width`-wide keys (another model cached under the same name, say)."""
    path = _stats_path(key)
    settings = path.with_suffix(".json")
    if not (path.exists() and settings.exists()):
        return None
    try:
        if json.loads(settings.read_text())["key"] != key:
            return None
        covariance = load_file(path)["covariance"]
    except (OSError, ValueError, KeyError) as error:
        logger.warning("ignoring unreadable statistics %s: %s", path, error)
        return None
    if covariance.shape != (width, width):
        logger.warning(
            "ignoring statistics %s: they are %s but %s takes %d-wide keys "
            "(another model cached under the name %r?); computing them again",
            path,
            "x".join(map(str, covariance.shape)),
            key["module"],
            width,
            key["model"],
        )
        return None
    return covariance


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
            if "tokens" in mask:
                keys = keys[mask["tokens"].to(keys.device)]
            else:
                keys = keys.reshape(-1, keys.shape[-1])
            moment.add(keys)
            if all(m.full for m in moments.values()):
                raise StopForward

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
            finished = final_hidden(handle, batch) is None
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
    generation = sampling_config(tokenizer, top_k=50, length=max_length)
    with (
        torch.random.fork_rng(devices=rng_devices(handle)),
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
            except StopForward:
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
    widths = {module: handle.weight_of(module).shape[1] for module in modules}
    width = max(widths.values())
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
        cached = _load_stats(key, widths[module])
        if cached is not None:
            logger.info("key statistics of %s loaded from %s", module, _stats_path(key))
            result[module] = cached
    missing = [module for module in modules if module not in result]
    if not missing:
        return result
    moments = {module: _SecondMoment(samples) for module in missing}
    source = "model samples" if corpus is None else Path(corpus).name
    with progress.task(f"key statistics ({source})", total=samples) as task:

        def advance() -> None:
            task.update(completed=min(m.count for m in moments.values()))

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
        covariance = moment.total.div_(moment.count).float().cpu()
        info = {"count": moment.count, "dtype": str(handle.dtype).removeprefix("torch.")}
        if corpus is not None:
            info["corpus"] = str(corpus)
        _save_stats(keys[module], covariance, info)
        logger.info("key statistics of %s saved to %s", module, _stats_path(keys[module]))
        result[module] = covariance
    return {module: result[module] for module in modules}


def null_space_projection(covariance: torch.Tensor, threshold: float) -> torch.Tensor:
    """P onto the eigenvectors of C whose eigenvalues are below `threshold` times the largest.

    Keys of ordinary text lie in the span of the large eigenvalues, so an
    update multiplied by P leaves their outputs (almost) unchanged. The
    threshold is relative, so it means the same whatever the scale of the keys.
    """
    values, vectors = torch.linalg.eigh(covariance.double())
    kept = vectors[:, values < threshold * values.max()]
    return (kept @ kept.T).float()
