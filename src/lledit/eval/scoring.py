"""Teacher-forced scoring of many (prompt, target) pairs, batched."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lledit.model import ModelHandle
from lledit.tokens import collate, encode_pairs

DEFAULT_EVAL_BATCH_SIZE = 64


@dataclass
class PairScores:
    """Per-pair results: one entry per (prompt, target) pair, in input order."""

    token_accuracy: torch.Tensor
    exact: torch.Tensor
    logprob: torch.Tensor
    predictions: list[torch.Tensor]


@torch.no_grad()
def score_pairs(
    handle: ModelHandle,
    prompts: Sequence[str],
    targets: Sequence[str],
    *,
    batch_size: int = DEFAULT_EVAL_BATCH_SIZE,
    padding_side: str = "right",
) -> PairScores:
    """Score each target as the continuation of its prompt.

    Pairs are sorted by length before batching so padding stays small; the
    results come back in the original order. `predictions` holds the argmax
    token at every target position (used to measure locality).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    pairs = encode_pairs(handle.tokenizer, prompts, targets)
    count = len(pairs)
    token_accuracy = torch.zeros(count)
    exact = torch.zeros(count, dtype=torch.bool)
    logprob = torch.zeros(count)
    predictions: list[torch.Tensor] = [torch.empty(0, dtype=torch.long)] * count
    order = sorted(range(count), key=lambda index: len(pairs[index].ids))
    for start in range(0, count, batch_size):
        chunk = order[start : start + batch_size]
        batch = collate([pairs[i] for i in chunk], handle.tokenizer.pad_token_id, padding_side)
        batch = batch.to(handle.device)
        logits = handle.target_logits(batch)
        token_logprobs = logits.log_softmax(-1).gather(1, batch.target_ids[:, None])[:, 0]
        predicted = logits.argmax(-1)
        lengths = torch.tensor(batch.target_lengths, device=logits.device)
        owner = torch.repeat_interleave(torch.arange(len(chunk), device=logits.device), lengths)
        correct = torch.zeros(len(chunk), device=logits.device).index_add_(
            0, owner, (predicted == batch.target_ids).float()
        )
        sums = torch.zeros(len(chunk), device=logits.device).index_add_(0, owner, token_logprobs)
        index = torch.tensor(chunk)
        token_accuracy[index] = (correct / lengths).cpu()
        exact[index] = (correct == lengths).cpu()
        logprob[index] = sums.cpu()
        for position, tokens in zip(
            chunk, predicted.cpu().split(batch.target_lengths), strict=True
        ):
            predictions[position] = tokens
    return PairScores(token_accuracy, exact, logprob, predictions)
