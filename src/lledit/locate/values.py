"""The hidden state that makes the model say the new target, found by gradient steps."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from lledit.data.request import EditRequest
from lledit.locate.config import LocateConfig
from lledit.locate.keys import context_texts, token_positions
from lledit.model import ModelHandle, final_hidden, hidden_of
from lledit.tokens import EncodedPair, collate, encode_pairs, suffix_of

logger = logging.getLogger(__name__)


def _with_hidden(output: Any, hidden: torch.Tensor) -> Any:
    """A decoder layer's output with its hidden states replaced."""
    return hidden if isinstance(output, torch.Tensor) else (hidden, *output[1:])


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
    on all requests together in one batched forward per step. The tokens
    before the subject's are the same at every step: they run once into a KV
    cache, and each step runs the subject token and what follows. The loss
    is the cross-entropy of the targets plus a KL term that keeps the model's
    prediction after "{subject} is a" (requests without a subject have no KL
    term); the change is clamped to `config.clamp` times the hidden state's
    norm, and the optimisation stops early once the mean target probability
    reaches `config.early_stop`.
    """
    tokenizer = handle.tokenizer
    texts, spans, owner = context_texts(requests, prefixes)
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
    # Every row's subject token in one column, the first of each step's pass.
    aligned = collate(pairs, tokenizer.pad_token_id, align=positions).to(device)
    column = max(positions)
    prefix = handle.prefix_cache(aligned, column) if column else None
    tokens = suffix_of(aligned, column)
    owner_t = torch.tensor(owner, device=device)
    plain = torch.arange(0, rewrites, 1 + len(prefixes), device=device)
    kl_rows = torch.arange(rewrites, len(pairs), device=device)
    kl_last = torch.tensor(
        [len(i) - 1 - p for i, p in zip(ids, kl_positions, strict=True)],
        dtype=torch.long,
        device=device,
    )
    target_lengths = torch.tensor(tokens.target_lengths[:rewrites], device=device)

    width = handle.model.get_input_embeddings().weight.shape[1]
    delta = torch.zeros(len(requests), width, device=device, requires_grad=True)
    optimizer = torch.optim.Adam([delta], lr=config.value_lr)
    original: dict[str, torch.Tensor] = {}

    def add_delta(module, inputs, output):
        hidden = hidden_of(output)
        if "hidden" not in original:
            at = hidden[plain.to(hidden.device), 0]  # the subject token: the suffix's first
            original["hidden"] = at.detach().float().to(device)
        change = delta[owner_t].to(hidden.device, hidden.dtype)
        edited = torch.cat([hidden[:, :1] + change[:, None], hidden[:, 1:]], dim=1)
        return _with_hidden(output, edited)

    hook = handle.module(handle.decoder_layer(layer)).register_forward_hook(add_delta)
    try:
        # Layers 0 to `layer` see the same tokens at every step: they run once and are
        # replayed, and the hook adds the change to `layer`'s replayed output.
        with handle.frozen_below(layer + 1, tokens):
            for step in range(config.value_steps + 1):
                hidden = final_hidden(handle, tokens, prefix)
                logits = handle.logits_at(hidden, tokens.target_rows, tokens.target_positions - 1)
                token_nll = F.cross_entropy(logits, tokens.target_ids, reduction="none")
                row_nll = torch.zeros(rewrites, device=device).index_add(
                    0, tokens.target_rows, token_nll
                )
                row_nll = row_nll / target_lengths
                loss = row_nll.mean()
                if essence:
                    kl_logprobs = handle.logits_at(hidden, kl_rows, kl_last).log_softmax(-1)
                    if "kl" not in original:
                        original["kl"] = kl_logprobs.detach()
                    kl = F.kl_div(
                        kl_logprobs, original["kl"], log_target=True, reduction="batchmean"
                    )
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
