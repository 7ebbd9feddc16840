"""The lifelong protocol: apply N requests in batches of B to one model, then
evaluate every edit on the final model, teacher-forced, by the
model's own answers, or both; optionally with its general abilities before and
after."""

from __future__ import annotations

import json
import logging
import platform
import random
import resource
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch

from lledit import progress
from lledit.data.request import EditRequest
from lledit.edit import EditMethod
from lledit.eval.answers import ANSWER_MARGIN_TOKENS, answer_reference, evaluate_answers
from lledit.eval.general import GeneralSuite, config_dict, retention, score_general
from lledit.eval.metrics import evaluate, locality_reference
from lledit.eval.scoring import DEFAULT_EVAL_BATCH_SIZE
from lledit.model import ModelHandle
from lledit.tokens import in_chat_template, with_eos

logger = logging.getLogger(__name__)

SCORINGS = ("teacher", "answer", "both")


@dataclass
class LifelongResult:
    method: str
    method_config: dict[str, Any]
    model: str
    dataset: dict[str, Any]
    n_edits: int
    batch_size: int
    seed: int
    metrics: dict[str, float]
    timing: dict[str, float]
    peak_memory_mb: float
    curve: list[dict[str, float]] = field(default_factory=list)
    per_edit: list[dict[str, Any]] = field(default_factory=list)
    environment: dict[str, str] = field(default_factory=dict)
    protocol: dict[str, Any] = field(default_factory=dict)
    """How edits were written and scored: scoring mode, EOS appended, chat template."""
    general: dict[str, Any] = field(default_factory=dict)
    """General abilities: config, before, after, retention (empty when not scored)."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> LifelongResult:
        return cls(**json.loads(Path(path).read_text()))


def peak_memory_mb(device: torch.device) -> float:
    """Peak GPU memory on CUDA; otherwise the process's peak resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def _general_point(scores: dict[str, Any]) -> dict[str, float]:
    """General-ability scores as flat curve columns."""
    point = {f"general_{name}": task["accuracy"] for name, task in scores["tasks"].items()}
    if "perplexity" in scores:
        point["perplexity"] = scores["perplexity"]
    return point


class _Scorer:
    """Scores the requests applied so far in the chosen modes, against references
    taken from the unedited model."""

    def __init__(
        self,
        handle: ModelHandle,
        requests: Sequence[EditRequest],
        *,
        scoring: str,
        style: str,
        batch_size: int,
    ) -> None:
        self.handle, self.requests, self.style = handle, requests, style
        self.batch_size = batch_size
        self.teacher_reference = self.answer_reference = None
        if scoring != "answer":
            self.teacher_reference = locality_reference(handle, requests, batch_size=batch_size)
        if scoring != "teacher":
            self.answer_reference = answer_reference(handle, requests, batch_size=batch_size)

    def __call__(self, count: int) -> tuple[dict[str, float], list[dict[str, Any]]]:
        requests = self.requests[:count]
        metrics: dict[str, float] = {}
        rows: list[dict[str, Any]] = [{} for _ in requests]
        if self.teacher_reference is not None:
            averages, per_edit = evaluate(
                self.handle,
                requests,
                style=self.style,
                reference=self.teacher_reference[:count],
                batch_size=self.batch_size,
            )
            metrics.update(averages)
            for row, scores in zip(rows, per_edit, strict=True):
                row.update(scores)
        if self.answer_reference is not None:
            averages, per_edit = evaluate_answers(
                self.handle,
                requests,
                reference=self.answer_reference[:count],
                batch_size=self.batch_size,
            )
            metrics.update(averages)
            for row, scores in zip(rows, per_edit, strict=True):
                row.update(scores)
        return metrics, rows


def run_lifelong(
    handle: ModelHandle,
    method: EditMethod,
    requests: Sequence[EditRequest],
    batch_size: int,
    *,
    eval_every: int | None = None,
    style: str = "qa",
    dataset: dict[str, Any] | None = None,
    seed: int = 0,
    eval_batch_size: int = DEFAULT_EVAL_BATCH_SIZE,
    scoring: str = "both",
    append_eos: bool = False,
    chat_template: bool = False,
    general: GeneralSuite | None = None,
    general_before: dict[str, Any] | None = None,
) -> LifelongResult:
    """Edit `handle` with every request, `batch_size` at a time, in order.

    `scoring` picks the metric families: teacher-forced, the model's own
    answers, or both. `append_eos` edits each target followed by the
    tokenizer's EOS, so the model learns to stop after the new answer (it is
    scored without). `chat_template` wraps every prompt in the model's chat
    template, for editing and scoring alike. `general` scores general
    abilities on the unedited and the final model (and along the curve);
    `general_before` passes the unedited model's scores when they are known
    already (several methods compared on one model).

    `eval_every=k` also evaluates all edits applied so far after every k
    batches, giving a curve. Only `method.prepare` counts as set-up time, only
    `method.apply` as edit time; evaluation (including the unedited model's
    references for `locality` and `locality_same`) is timed apart.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if not requests:
        raise ValueError("no edit requests to apply")
    if eval_every is not None and eval_every < 1:
        raise ValueError(f"eval_every must be at least 1, got {eval_every}")
    if scoring not in SCORINGS:
        raise ValueError(f"unknown scoring {scoring!r}; choose one of {SCORINGS}")
    trained_style = getattr(method, "trained_style", None)
    if trained_style is not None and trained_style != style:
        # A network learns the prompts and targets of its training data; on
        # another style its numbers say little about what it could do.
        logger.warning(
            "%s's network was trained on %s data and edits %s data here; "
            "train one on this dataset's train split (`lledit train --data`)",
            method.name,
            trained_style,
            style,
        )
    random.seed(seed)
    torch.manual_seed(seed)
    if handle.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(handle.device)
    if chat_template:
        requests = [in_chat_template(handle.tokenizer, request) for request in requests]
    written = [with_eos(handle.tokenizer, r) for r in requests] if append_eos else list(requests)

    batches = [written[i : i + batch_size] for i in range(0, len(written), batch_size)]
    timing = {"setup_s": 0.0, "edit_s": 0.0, "eval_s": 0.0}

    started = time.perf_counter()
    score = _Scorer(handle, requests, scoring=scoring, style=style, batch_size=eval_batch_size)
    general_scores: dict[str, Any] = {}
    if general is not None:
        general_scores = {"config": config_dict(general.config)}
        general_scores["before"] = general_before or score_general(handle, general)
    timing["eval_s"] += time.perf_counter() - started

    started = time.perf_counter()
    method.prepare()
    timing["setup_s"] = time.perf_counter() - started

    curve = []
    headline = "efficacy" if scoring != "answer" else "efficacy_em"
    with progress.task(f"{method.name}: editing", total=len(batches)) as task:
        applied = 0
        for number, batch in enumerate(batches, start=1):
            started = time.perf_counter()
            method.apply(batch)
            timing["edit_s"] += time.perf_counter() - started
            applied += len(batch)
            if eval_every and number % eval_every == 0 and number < len(batches):
                started = time.perf_counter()
                metrics, _ = score(applied)
                point = {"edits": applied, **metrics}
                if general is not None:
                    point.update(_general_point(score_general(handle, general)))
                curve.append(point)
                timing["eval_s"] += time.perf_counter() - started
                task.update(status=f"{headline} {metrics[headline]:.3f}")
            task.advance()

    started = time.perf_counter()
    metrics, per_edit = score(len(requests))
    if general is not None:
        general_scores["after"] = score_general(handle, general)
        general_scores["retention"] = retention(general_scores["before"], general_scores["after"])
    timing["eval_s"] += time.perf_counter() - started
    if eval_every:
        point = {"edits": len(requests), **metrics}
        if general is not None:
            point.update(_general_point(general_scores["after"]))
        curve.append(point)
    timing["per_edit_s"] = timing["edit_s"] / len(requests)

    return LifelongResult(
        method=method.name,
        method_config=method.config_dict(),
        model=handle.name,
        dataset={"style": style, **(dataset or {})},
        n_edits=len(requests),
        batch_size=batch_size,
        seed=seed,
        metrics=metrics,
        timing=timing,
        peak_memory_mb=peak_memory_mb(handle.device),
        curve=curve,
        per_edit=[
            {"id": request.id, **scores} for request, scores in zip(requests, per_edit, strict=True)
        ],
        environment={
            "lledit": version("lledit"),
            "torch": torch.__version__,
            "python": platform.python_version(),
            "device": str(handle.device),
            "dtype": str(handle.dtype).removeprefix("torch."),
            "threads": str(torch.get_num_threads()),
        },
        protocol={
            "scoring": scoring,
            "append_eos": append_eos,
            "chat_template": chat_template,
            "answer_margin_tokens": ANSWER_MARGIN_TOKENS,
        },
        general=general_scores,
    )
