"""Edit-quality metrics, for zsRE-style and CounterFact-style data.

zsRE-style ("qa"): teacher-forced token accuracy of the new target on the edit
prompt (`efficacy`) and its rephrases (`generalization`), of the gold answer on
the locality prompts (`specificity`), the fraction of locality answer tokens
whose argmax is unchanged from the unedited model (`locality`), of the
answers that follow from the new fact (`portability`, where the data has
them), and `*_exact` variants that count a prompt only when every target
token is right.

CounterFact-style ("counterfact"): P(new) > P(true) on the edit prompt and on
the paraphrases, P(true) > P(new) on the neighbourhood prompts, plus the same
`locality` and `portability` as above.

These are teacher-forced: the target is fed to the model. `answers.py` scores
what the model says when it has to answer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from lledit.data.request import EditRequest
from lledit.eval.scoring import DEFAULT_EVAL_BATCH_SIZE, score_pairs
from lledit.model import ModelHandle

STYLES = ("qa", "counterfact")
METRICS = {
    "qa": (
        "efficacy",
        "generalization",
        "specificity",
        "locality",
        "efficacy_exact",
        "generalization_exact",
        "specificity_exact",
        "portability",
        "portability_exact",
    ),
    "counterfact": ("efficacy", "generalization", "specificity", "locality", "portability"),
}

LocalityReference = list[list[torch.Tensor]]
"""Per request, per locality pair: the unedited model's argmax answer tokens."""


@dataclass
class _Jobs:
    """All pairs to score, gathered so that one batched pass scores them."""

    prompts: list[str] = field(default_factory=list)
    targets: list[str] = field(default_factory=list)

    def add(self, prompt: str, target: str) -> int:
        self.prompts.append(prompt)
        self.targets.append(target)
        return len(self.prompts) - 1


def mean_or_none(values: Sequence[float]) -> float | None:
    """The mean, or None when there is nothing to measure (a metric left out)."""
    return sum(values) / len(values) if values else None


def locality_reference(
    handle: ModelHandle,
    requests: Sequence[EditRequest],
    *,
    batch_size: int = DEFAULT_EVAL_BATCH_SIZE,
) -> LocalityReference:
    """The unedited model's predictions on every locality answer, for `locality`."""
    jobs = _Jobs()
    owners = [[jobs.add(p, a) for p, a in request.locality] for request in requests]
    if not jobs.prompts:
        return [[] for _ in requests]
    scores = score_pairs(handle, jobs.prompts, jobs.targets, batch_size=batch_size)
    return [[scores.predictions[index] for index in indices] for indices in owners]


def evaluate(
    handle: ModelHandle,
    requests: Sequence[EditRequest],
    *,
    style: str = "qa",
    reference: LocalityReference | None = None,
    batch_size: int = DEFAULT_EVAL_BATCH_SIZE,
) -> tuple[dict[str, float], list[dict[str, float | None]]]:
    """Score every request on the model as it is now.

    Returns the averages over requests and the per-request scores. A metric
    with nothing to measure (no rephrases, no locality pairs, no reference) is
    left out of the averages.
    """
    if style not in STYLES:
        raise ValueError(f"unknown metric style '{style}'; choose one of {STYLES}")
    if reference is not None and len(reference) != len(requests):
        raise ValueError(f"reference covers {len(reference)} requests, not {len(requests)}")
    if style == "counterfact":
        for position, request in enumerate(requests):
            if request.target_true is None:
                raise ValueError(
                    f"request {position} ({request.id or request.prompt!r}) has no target_true, "
                    "which CounterFact-style metrics compare against"
                )
    jobs = _Jobs()
    planned = []
    for request in requests:
        prompts = [request.prompt, *request.rephrases]
        plan = {
            "new": [jobs.add(p, request.target_new) for p in prompts],
            "locality": [jobs.add(p, a) for p, a in request.locality],
            "portability": [jobs.add(p, a) for p, a in request.portability],
        }
        if style == "counterfact":
            plan["true"] = [jobs.add(p, request.target_true) for p in prompts]
            neighbours = [p for p, _ in request.locality]
            plan["neighbour_new"] = [jobs.add(p, request.target_new) for p in neighbours]
            plan["neighbour_true"] = [jobs.add(p, request.target_true) for p in neighbours]
        planned.append(plan)
    scores = score_pairs(handle, jobs.prompts, jobs.targets, batch_size=batch_size)
    accuracy, exact, logprob = scores.token_accuracy, scores.exact, scores.logprob

    per_edit: list[dict[str, float | None]] = []
    for position, plan in enumerate(planned):
        edit, *rephrases = plan["new"]
        row: dict[str, float | None]
        if style == "qa":
            row = {
                "efficacy": float(accuracy[edit]),
                "generalization": mean_or_none([float(accuracy[i]) for i in rephrases]),
                "specificity": mean_or_none([float(accuracy[i]) for i in plan["locality"]]),
                "efficacy_exact": float(exact[edit]),
                "generalization_exact": mean_or_none([float(exact[i]) for i in rephrases]),
                "specificity_exact": mean_or_none([float(exact[i]) for i in plan["locality"]]),
            }
        else:
            wins = [
                float(logprob[n] > logprob[t])
                for n, t in zip(plan["new"], plan["true"], strict=True)
            ]
            kept = zip(plan["neighbour_true"], plan["neighbour_new"], strict=True)
            row = {
                "efficacy": wins[0],
                "generalization": mean_or_none(wins[1:]),
                "specificity": mean_or_none([float(logprob[t] > logprob[n]) for t, n in kept]),
            }
        row["portability"] = mean_or_none([float(accuracy[i]) for i in plan["portability"]])
        if style == "qa":
            row["portability_exact"] = mean_or_none([float(exact[i]) for i in plan["portability"]])
        row["locality"] = None
        if reference is not None:
            unchanged = [
                float((scores.predictions[i] == before).float().mean())
                for i, before in zip(plan["locality"], reference[position], strict=True)
            ]
            row["locality"] = mean_or_none(unchanged)
        per_edit.append(row)

    averages = {}
    for name in METRICS[style]:
        value = mean_or_none([row[name] for row in per_edit if row.get(name) is not None])
        if value is not None:
            averages[name] = value
    return averages, per_edit
