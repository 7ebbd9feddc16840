"""Answer scoring: is what the edited model *says* the new answer?

The second metric family beside the teacher-forced one (`metrics.py`). Each
edit prompt, rephrase, locality and portability prompt is answered greedily
(`generation.py`) with a budget of the expected answer's token count plus a
margin, and the answer is compared with the expected one the usual QA way
(case, punctuation, articles and white space normalised):

- `*_em`: the answer is the expected one and stops there (strict);
- `*_prefix`: the answer begins with the expected one (lenient);
- `locality_same`: the answer to a locality prompt is the same string as the
  unedited model's answer to it;
- `fluency`: weighted 2- and 3-gram entropy of free generations from
  CounterFact's `generation_prompts`, as ROME and MEMIT define it.

The same code serves both data styles: for CounterFact-style data the
locality answer is the true object, so `specificity_prefix` asks whether a
neighbourhood prompt is still answered with it.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections import Counter
from collections.abc import Sequence

from lledit.data.request import EditRequest
from lledit.eval.generation import (
    DEFAULT_GENERATION_BATCH_SIZE,
    generate_answers,
    generate_continuations,
)
from lledit.eval.metrics import mean_or_none
from lledit.model import ModelHandle

ANSWER_METRICS = (
    "efficacy_em",
    "efficacy_prefix",
    "generalization_em",
    "generalization_prefix",
    "specificity_em",
    "specificity_prefix",
    "locality_same",
    "portability_em",
    "portability_prefix",
    "fluency",
)
ANSWER_MARGIN_TOKENS = 4
"""Tokens allowed beyond the expected answer's length: room for the answer to
end (a period, a newline) and for a different, slightly longer answer."""
FLUENCY_TOKENS = 64
"""Length of the free generations that fluency is measured on."""

_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """Lower case, no punctuation, no articles, single spaces (SQuAD's normalisation)."""
    text = "".join(
        " " if unicodedata.category(char).startswith("P") else char for char in text.lower()
    )
    return " ".join(_ARTICLES.sub(" ", text).split())


def answer_matches(answer: str, expected: str) -> tuple[bool, bool]:
    """(exact match, answer begins with `expected`) after normalisation.

    An expected answer that normalises to nothing (an article alone, say) is
    compared case-folded instead, so it cannot match every answer.
    """
    wanted = normalize_answer(expected)
    said = normalize_answer(answer)
    if not wanted:
        wanted, said = expected.strip().casefold(), answer.strip().casefold()
    exact = said == wanted
    return exact, exact or said.startswith(wanted + " ")


def ngram_entropy(
    text: str, ns: Sequence[int] = (2, 3), weights: Sequence[float] = (2, 4)
) -> float:
    """Weighted mean entropy (bits) of the n-gram distributions of a text's words.

    ROME's fluency measure: low when a generation repeats itself.
    """
    words = text.split()
    entropies = []
    for n in ns:
        grams = Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))
        total = sum(grams.values())
        entropies.append(
            -sum(c / total * math.log2(c / total) for c in grams.values()) if total else 0.0
        )
    return sum(w * e for w, e in zip(weights, entropies, strict=True)) / sum(weights)


def _budgets(handle: ModelHandle, expected: Sequence[str]) -> list[int]:
    """Token budgets: each expected answer's length plus the margin, tokenised at once."""
    if not expected:
        return []
    texts = [" " + answer.strip() for answer in expected]
    encoded = handle.tokenizer(texts, add_special_tokens=False)["input_ids"]
    return [len(ids) + ANSWER_MARGIN_TOKENS for ids in encoded]


def answer_reference(
    handle: ModelHandle,
    requests: Sequence[EditRequest],
    *,
    batch_size: int = DEFAULT_GENERATION_BATCH_SIZE,
) -> list[list[str]]:
    """The unedited model's answers to every locality prompt, for `locality_same`."""
    prompts = [prompt for request in requests for prompt, _ in request.locality]
    budgets = _budgets(handle, [answer for request in requests for _, answer in request.locality])
    answers = iter(generate_answers(handle, prompts, budgets, batch_size=batch_size))
    return [[next(answers) for _ in request.locality] for request in requests]


def evaluate_answers(
    handle: ModelHandle,
    requests: Sequence[EditRequest],
    *,
    reference: list[list[str]] | None = None,
    batch_size: int = DEFAULT_GENERATION_BATCH_SIZE,
) -> tuple[dict[str, float], list[dict[str, float | None]]]:
    """Answer-mode scores of every request on the model as it is now.

    Returns the averages over requests and the per-request scores; a metric
    with nothing to measure is left out of the averages, as in `evaluate`.
    """
    if reference is not None and len(reference) != len(requests):
        raise ValueError(f"reference covers {len(reference)} requests, not {len(requests)}")
    prompts: list[str] = []
    expected: list[str] = []
    plans = []
    for request in requests:
        plan: dict[str, list[int]] = {}
        groups = {
            "efficacy": [(request.prompt, request.target_new)],
            "generalization": [(p, request.target_new) for p in request.rephrases],
            "specificity": list(request.locality),
            "portability": list(request.portability),
        }
        for group, pairs in groups.items():
            plan[group] = list(range(len(prompts), len(prompts) + len(pairs)))
            prompts += [prompt for prompt, _ in pairs]
            expected += [answer for _, answer in pairs]
        plans.append(plan)
    answers = generate_answers(handle, prompts, _budgets(handle, expected), batch_size=batch_size)
    matches = [answer_matches(a, e) for a, e in zip(answers, expected, strict=True)]

    fluency_prompts = [prompt for request in requests for prompt in request.generation_prompts]
    free = iter(
        generate_continuations(
            handle,
            fluency_prompts,
            [FLUENCY_TOKENS] * len(fluency_prompts),
            batch_size=batch_size,
            stop_at_answer_end=False,
        )
    )

    per_edit: list[dict[str, float | None]] = []
    for position, (request, plan) in enumerate(zip(requests, plans, strict=True)):
        row: dict[str, float | None] = {}
        for group, indices in plan.items():
            row[f"{group}_em"] = mean_or_none([float(matches[i][0]) for i in indices])
            row[f"{group}_prefix"] = mean_or_none([float(matches[i][1]) for i in indices])
        row["locality_same"] = None
        if reference is not None:
            row["locality_same"] = mean_or_none(
                [
                    float(answers[i] == before)
                    for i, before in zip(plan["specificity"], reference[position], strict=True)
                ]
            )
        entropies = [ngram_entropy(next(free)) for _ in request.generation_prompts]
        row["fluency"] = mean_or_none(entropies)
        per_edit.append(row)

    averages = {}
    for name in ANSWER_METRICS:
        value = mean_or_none([row[name] for row in per_edit if row.get(name) is not None])
        if value is not None:
            averages[name] = value
    return averages, per_edit
