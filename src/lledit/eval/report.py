"""Reports of lifelong runs: a Markdown table, a console table, a curve plot."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from rich.table import Table

from lledit.eval.lifelong import LifelongResult
from lledit.eval.metrics import METRICS

TIMING_COLUMNS = ("per_edit_s", "setup_s", "edit_s", "eval_s")


def _metric_columns(results: Sequence[LifelongResult]) -> list[str]:
    names = [name for result in results for name in METRICS[result.dataset["style"]]]
    present = {name for result in results for name in result.metrics}
    return [name for name in dict.fromkeys(names) if name in present]


def _rows(results: Sequence[LifelongResult]) -> tuple[list[str], list[list[str]]]:
    metric_names = _metric_columns(results)
    header = ["method", *metric_names, *TIMING_COLUMNS]
    rows = []
    for result in results:
        metrics = [
            f"{result.metrics[name]:.3f}" if name in result.metrics else "-"
            for name in metric_names
        ]
        timings = [f"{result.timing[name]:.4f}" for name in TIMING_COLUMNS]
        rows.append([result.method, *metrics, *timings])
    return header, rows


def markdown_table(results: Sequence[LifelongResult]) -> str:
    """One row per run; the runs should share model, data, N and B."""
    header, rows = _rows(results)
    first = results[0]
    lines = [
        f"Model `{first.model}`, data `{first.dataset.get('name', '?')}` "
        f"({first.dataset['style']}-style metrics), {first.n_edits} edits in batches of "
        f"{first.batch_size}, evaluated on the final model.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
    ]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def console_table(results: Sequence[LifelongResult]) -> Table:
    """The main columns only, so the table fits a terminal; the Markdown has all."""
    header, rows = _rows(results)
    shown = [
        i
        for i, name in enumerate(header)
        if not name.endswith("_exact") and name not in ("edit_s", "eval_s")
    ]
    header = [header[i] for i in shown]
    rows = [[row[i] for i in shown] for row in rows]
    first = results[0]
    table = Table(
        title=f"{first.model} · {first.dataset.get('name', '?')} · "
        f"{first.n_edits} edits, batches of {first.batch_size}"
    )
    for position, name in enumerate(header):
        table.add_column(name, justify="left" if position == 0 else "right")
    for row in rows:
        table.add_row(*row)
    return table


def plot_curves(results: Sequence[LifelongResult], path: str | Path) -> Path | None:
    """Metrics against edits applied; one panel per metric, one line per method.

    Returns None (and writes nothing) when no run has a curve.
    """
    with_curve = [result for result in results if result.curve]
    if not with_curve:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in _metric_columns(with_curve) if not n.endswith("_exact")]
    figure, axes = plt.subplots(1, len(names), figsize=(3.6 * len(names), 3.2), squeeze=False)
    for axis, name in zip(axes[0], names, strict=True):
        for result in with_curve:
            points = [point for point in result.curve if name in point]
            axis.plot(
                [point["edits"] for point in points],
                [point[name] for point in points],
                marker="o",
                markersize=3,
                label=result.method,
            )
        axis.set_title(name)
        axis.set_xlabel("edits applied")
        axis.set_ylim(-0.02, 1.02)
        axis.grid(alpha=0.3)
    axes[0][0].legend()
    first = with_curve[0]
    figure.suptitle(
        f"{first.model} · {first.dataset.get('name', '?')} · batches of {first.batch_size}",
        fontsize=10,
    )
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
