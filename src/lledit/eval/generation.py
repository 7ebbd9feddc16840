"""Greedy answers: what the model says when asked, stopped where an answer ends.

Answer scoring asks the model to *answer*, not to agree with a target it is fed.
Each prompt is continued greedily through the model's own `generate` (KV cache
included, so editors that route once per sequence see generation as a user's
request does) and the continuation is cut at the end of the answer: EOS, a
newline, or the end of the first clause. Prompts are batched with left padding;
a row's answer does not depend on the batch it was in (tested).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from lledit.model import ModelHandle
from lledit.tokens import EncodedPair, collate

DEFAULT_GENERATION_BATCH_SIZE = 32

# A clause ends at , ; ! ? or a period followed by white space, but not at the
# period of an initial ("J. K. Rowling") or of a one-letter abbreviation ("D. C.").
_CLAUSE_END = re.compile(r"(?<!\b[A-Za-z])\.(?=\s)|[,;!?](?=\s)|\n")


def cut_answer(text: str) -> str:
    """The answer part of a continuation: leading white space dropped, then
    everything from the first newline or clause end on."""
    text = text.lstrip()
    match = _CLAUSE_END.search(text)
    return (text[: match.start()] if match else text).strip()


class _AnswerEnded(StoppingCriteria):
    """Marks a row done once its answer has ended or its own token budget is spent."""

    def __init__(self, tokenizer, prompt_length: int, budgets: torch.Tensor) -> None:
        self.tokenizer = tokenizer
        self.prompt_length = prompt_length
        self.budgets = budgets

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        generated = input_ids[:, self.prompt_length :]
        texts = self.tokenizer.batch_decode(generated, skip_special_tokens=True)
        ended = [_CLAUSE_END.search(text.lstrip()) is not None for text in texts]
        done = torch.tensor(ended, device=input_ids.device)
        return done | (generated.shape[1] >= self.budgets.to(input_ids.device))


def _until_eos(tokens: list[int], eos_id: int | None, budget: int) -> list[int]:
    tokens = tokens[:budget]
    return tokens[: tokens.index(eos_id)] if eos_id in tokens else tokens


@torch.no_grad()
def generate_continuations(
    handle: ModelHandle,
    prompts: Sequence[str],
    budgets: Sequence[int],
    *,
    batch_size: int = DEFAULT_GENERATION_BATCH_SIZE,
    stop_at_answer_end: bool = True,
) -> list[str]:
    """Greedy continuation of each prompt, at most `budgets[i]` new tokens.

    With `stop_at_answer_end` a row stops as soon as its answer has ended (the
    text is returned uncut; `cut_answer` cuts it); otherwise it runs to its
    budget or EOS (free text, as fluency needs). Prompts are sorted by length
    and batched with left padding; results come back in input order.
    """
    if len(prompts) != len(budgets):
        raise ValueError(f"{len(prompts)} prompts but {len(budgets)} budgets")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if any(budget < 1 for budget in budgets):
        raise ValueError("every token budget must be at least 1")
    if not prompts:
        return []
    tokenizer = handle.tokenizer
    encoded = tokenizer(list(prompts))["input_ids"]
    context = getattr(handle.model.config, "max_position_embeddings", None)
    for index, ids in enumerate(encoded):
        if context is not None and len(ids) + budgets[index] > context:
            raise ValueError(
                f"prompt {index} ({len(ids)} tokens) plus {budgets[index]} new tokens "
                f"exceeds the model's context of {context}"
            )
    eos_id = tokenizer.eos_token_id
    answers = [""] * len(prompts)
    order = sorted(range(len(prompts)), key=lambda index: len(encoded[index]))
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        # Prompts alone: pairs with an empty target, left-padded for generation.
        prompts_only = [EncodedPair(encoded[i], len(encoded[i])) for i in chunk]
        padded = collate(prompts_only, tokenizer.pad_token_id, padding_side="left")
        input_ids, attention_mask = padded.input_ids, padded.attention_mask
        chunk_budgets = torch.tensor([budgets[i] for i in chunk])
        stopping = (
            StoppingCriteriaList([_AnswerEnded(tokenizer, input_ids.shape[1], chunk_budgets)])
            if stop_at_answer_end
            else None
        )
        output = handle.model.generate(
            input_ids=input_ids.to(handle.device),
            attention_mask=attention_mask.to(handle.device),
            max_new_tokens=int(chunk_budgets.max()),
            do_sample=False,
            num_beams=1,
            eos_token_id=eos_id,
            pad_token_id=tokenizer.pad_token_id,
            stopping_criteria=stopping,
            temperature=None,
            top_p=None,
            top_k=None,
        )
        generated = output[:, input_ids.shape[1] :].tolist()
        for row, index in enumerate(chunk):
            tokens = _until_eos(generated[row], eos_id, budgets[index])
            answers[index] = tokenizer.decode(tokens, skip_special_tokens=True)
    return answers


def generate_answers(
    handle: ModelHandle,
    prompts: Sequence[str],
    budgets: Sequence[int],
    *,
    batch_size: int = DEFAULT_GENERATION_BATCH_SIZE,
) -> list[str]:
    """The model's answer to each prompt: greedy, cut by `cut_answer`."""
    continuations = generate_continuations(handle, prompts, budgets, batch_size=batch_size)
    return [cut_answer(text) for text in continuations]
