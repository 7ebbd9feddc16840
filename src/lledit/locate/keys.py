"""Where an edit is written: the subject's last token, in the prompt and in sampled contexts.

A locate-then-edit method reads each edited module's input (its key) at the
subject's last token, averaged over the prompt alone and after a few short
texts sampled from the model (MEMIT's context templates).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lledit.data.request import EditRequest
from lledit.model import (
    ModelHandle,
    StopForward,
    at_positions,
    final_hidden,
    hidden_of,
    rng_devices,
    sampling_config,
)
from lledit.tokens import EncodedPair, TokenBatch, collate

PREFIX_STARTS = ("The", "Therefore", "Because", "I", "You", "In", "It", "When", "After", "We")
"""First words of the random prefixes put before edit prompts (as in MEMIT)."""


class SubjectNotFoundError(ValueError):
    """A request's subject does not occur in its prompt."""


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


@dataclass
class Contexts:
    """Every request's prompt, alone and after each prefix, with its subject token."""

    tokens: TokenBatch
    positions: torch.Tensor
    owner: torch.Tensor
    """The request each row belongs to."""
    plain: torch.Tensor
    """The row of each request's prompt without a prefix."""


def context_texts(
    requests: Sequence[EditRequest], prefixes: Sequence[str]
) -> tuple[list[str], list[tuple[int, int] | None], list[int]]:
    """Each prompt alone and after each prefix, its subject's span there, and its request."""
    texts, spans, owner = [], [], []
    for index, request in enumerate(requests):
        span = subject_span(request)
        for prefix in ("", *prefixes):
            texts.append(prefix + request.prompt)
            spans.append(None if span is None else (span[0] + len(prefix), span[1] + len(prefix)))
            owner.append(index)
    return texts, spans, owner


def subject_contexts(
    handle: ModelHandle, requests: Sequence[EditRequest], prefixes: Sequence[str]
) -> Contexts:
    """`context_texts` tokenised on the model's device, with the subject token of each row."""
    texts, spans, owner = context_texts(requests, prefixes)
    ids, positions = token_positions(handle.tokenizer, texts, spans)
    tokens = collate([EncodedPair(i, len(i)) for i in ids], handle.tokenizer.pad_token_id)
    device = handle.device
    return Contexts(
        tokens=tokens.to(device),
        positions=torch.tensor(positions, device=device),
        owner=torch.tensor(owner, device=device),
        plain=torch.arange(0, len(texts), 1 + len(prefixes), device=device),
    )


@torch.no_grad()
def keys_and_hidden(
    handle: ModelHandle, contexts: Contexts, module: str, layer: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys of `module` averaged over each request's contexts (n, d_in), and the
    output of decoder layer `layer` at each plain prompt's subject token (n, d)."""
    rows = torch.arange(len(contexts.positions), device=handle.device)
    captured: dict[str, torch.Tensor] = {}

    def keep_key(mod, inputs):
        captured["key"] = at_positions(inputs[0], rows, contexts.positions).float().to(rows.device)

    def keep_hidden(mod, inputs, output):
        hidden = hidden_of(output)
        at = at_positions(hidden, contexts.plain, contexts.positions[contexts.plain])
        captured["hidden"] = at.float().to(rows.device)
        raise StopForward

    hooks = [
        handle.module(module).register_forward_pre_hook(keep_key),
        handle.module(handle.decoder_layer(layer)).register_forward_hook(keep_hidden),
    ]
    try:
        final_hidden(handle, contexts.tokens)
    finally:
        for hook in hooks:
            hook.remove()
    count = int(contexts.owner.max()) + 1
    sums = torch.zeros(count, captured["key"].shape[1], device=handle.device)
    sums.index_add_(0, contexts.owner, captured["key"])
    per_request = torch.bincount(contexts.owner, minlength=count).unsqueeze(1)
    return sums / per_request, captured["hidden"]


def sample_prefixes(handle: ModelHandle, count: int, length: int, seed: int) -> list[str]:
    """Short texts sampled from the model, each ending in ". ", to put before prompts.

    Averaging keys and target values over a prompt in several contexts makes
    an edit hold beyond the exact wording of the request (MEMIT's context
    templates). Sampled with a fixed seed, so an editor's prefixes are
    reproducible; the global random state is left alone.
    """
    tokenizer = handle.tokenizer
    generation = sampling_config(tokenizer, top_k=5, length=length)
    prefixes = []
    with torch.random.fork_rng(devices=rng_devices(handle)):
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
