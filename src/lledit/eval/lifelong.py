"""The lifelong protocol: apply N requests in batches of B to one model, then
evaluate every edit on the final model (DESIGN §4)."""

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
from pathlib import Path
from typing import Any

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from lledit import __version__
from lledit.data.request import EditRequest
from lledit.eval.metrics import evaluate, locality_reference
from lledit.eval.scoring import DEFAULT_EVAL_BATCH_SIZE
from lledit.methods.base import EditMethod
from lledit.model import ModelHandle

logger = logging.getLogger(__name__)


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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> LifelongResult:
        return cls(**json.loads(Path(path).read_text()))


def _peak_memory_mb(device: torch.device) -> float:
    """Peak GPU memory on CUDA; otherwise the process's peak resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def _progress() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        transient=False,
    )


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
    show_progress: bool = True,
) -> LifelongResult:
    """Edit `handle` with every request, `batch_size` at a time, in order.

    `eval_every=k` also evaluates all edits applied so far after every k
    batches, giving a curve. Only `method.prepare` counts as set-up time, only
    `method.apply` as edit time; evaluation (including the unedited model's
    reference predictions for `locality`) is timed apart.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if not requests:
        raise ValueError("no edit requests to apply")
    if eval_every is not None and eval_every < 1:
        raise ValueError(f"eval_every must be at least 1, got {eval_every}")
    random.seed(seed)
    torch.manual_seed(seed)
    if handle.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(handle.device)

    batches = [list(requests[i : i + batch_size]) for i in range(0, len(requests), batch_size)]
    timing = {"setup_s": 0.0, "edit_s": 0.0, "eval_s": 0.0}

    started = time.perf_counter()
    reference = locality_reference(handle, requests, batch_size=eval_batch_size)
    timing["eval_s"] += time.perf_counter() - started

    started = time.perf_counter()
    method.prepare()
    timing["setup_s"] = time.perf_counter() - started

    curve = []
    with _progress() as progress:
        task = progress.add_task(
            f"{method.name}: editing", total=len(batches), status="", visible=show_progress
        )
        applied = 0
        for number, batch in enumerate(batches, start=1):
            started = time.perf_counter()
            method.apply(batch)
            timing["edit_s"] += time.perf_counter() - started
            applied += len(batch)
            if eval_every and number % eval_every == 0 and number < len(batches):
                started = time.perf_counter()
                metrics, _ = evaluate(
                    handle,
                    requests[:applied],
                    style=style,
                    reference=reference[:applied],
                    batch_size=eval_batch_size,
                )
                timing["eval_s"] += time.perf_counter() - started
                curve.append({"edits": applied, **metrics})
                progress.update(task, status=f"efficacy {metrics['efficacy']:.3f}")
            progress.advance(task)

    started = time.perf_counter()
    metrics, per_edit = evaluate(
        handle, requests, style=style, reference=reference, batch_size=eval_batch_size
    )
    timing["eval_s"] += time.perf_counter() - started
    if eval_every:
        curve.append({"edits": len(requests), **metrics})
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
        peak_memory_mb=_peak_memory_mb(handle.device),
        curve=curve,
        per_edit=[
            {"id": request.id, **scores} for request, scores in zip(requests, per_edit, strict=True)
        ],
        environment={
            "lledit": __version__,
            "torch": torch.__version__,
            "python": platform.python_version(),
            "device": str(handle.device),
            "dtype": str(handle.dtype).removeprefix("torch."),
            "threads": str(torch.get_num_threads()),
        },
    )
