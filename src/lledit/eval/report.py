"""Reports of lifelong runs: Markdown tables, a console table, and plots (the
curve over edits, the metrics side by side, retention by edit age)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.table import Table

from lledit.eval.answers import ANSWER_METRICS
from lledit.eval.lifelong import LifelongResult
from lledit.eval.metrics import METRICS

TIMING_COLUMNS = ("per_edit_s", "setup_s", "edit_s", "eval_s")
AGE_METRICS = ("efficacy", "generalization", "efficacy_em", "generalization_em")
"""The metrics plotted by edit age: forgetting shows as the oldest edits falling."""


def _metric_columns(results: Sequence[LifelongResult]) -> list[str]:
    names = [name for result in results for name in METRICS[result.dataset["style"]]]
    names += ANSWER_METRICS
    present = {name for result in results for name in result.metrics}
    return [name for name in dict.fromkeys(names) if name in present]


def run_label(result: LifelongResult) -> str:
    """The method, marked with the protocol options that change what it wrote
    (and `-eos` for a method that appends EOS itself, run without it)."""
    label = result.method
    if result.protocol.get("append_eos"):
        label += "+eos"
    elif result.method_config.get("append_eos") is False:
        label += "-eos"
    if result.protocol.get("chat_template"):
        label += "+chat"
    return label


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
        rows.append([run_label(result), *metrics, *timings])
    return header, rows


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def _describe(result: LifelongResult) -> str:
    return (
        f"Model `{result.model}`, data `{result.dataset.get('name', '?')}` "
        f"({result.dataset['style']}-style metrics), {result.n_edits} edits in batches of "
        f"{result.batch_size}, evaluated on the final model."
    )


def markdown_table(results: Sequence[LifelongResult]) -> str:
    """One row per run; the runs should share model, data, N and B."""
    header, rows = _rows(results)
    lines = [_describe(results[0]), "", *_table(header, rows)]
    general = general_table(results)
    if general:
        lines += ["", general.rstrip("\n")]
    return "\n".join(lines) + "\n"


def general_table(results: Sequence[LifelongResult]) -> str:
    """General-ability accuracy before -> after per task, the mean after/before
    over the tasks above chance, and perplexity; empty when no run scored them."""
    scored = [result for result in results if result.general.get("after")]
    if not scored:
        return ""
    tasks = list(dict.fromkeys(t for r in scored for t in r.general["before"]["tasks"]))
    header = ["method", *tasks, "mean after/before", "Δ log-lik.", "perplexity"]
    rows = []
    for result in scored:
        before, after = result.general["before"], result.general["after"]
        cells = [run_label(result)]
        for task in tasks:
            if task not in before["tasks"]:
                cells.append("-")
                continue
            was, now = before["tasks"][task], after["tasks"][task]
            mark = "" if was["above_chance"] else " (chance)"
            cells.append(f"{was['accuracy']:.2f} → {now['accuracy']:.2f}{mark}")
        mean = result.general["retention"].get("mean_accuracy_ratio")
        cells.append("-" if mean is None else f"{mean:.3f}")
        changes = [
            after["tasks"][task]["correct_logprob"] - before["tasks"][task]["correct_logprob"]
            for task in before["tasks"]
            if task in after["tasks"]
        ]
        cells.append(f"{sum(changes) / len(changes):+.3f}")
        if "perplexity" in before:
            cells.append(f"{before['perplexity']:.4g} → {after['perplexity']:.4g}")
        else:
            cells.append("-")
        rows.append(cells)
    note = (
        "General abilities, accuracy before → after editing; `(chance)` marks a task the "
        "unedited model is not above chance on, left out of the mean after/before. "
        "Δ log-lik.: the mean change of the correct option's log-likelihood over all tasks."
    )
    return "\n".join([note, "", *_table(header, rows)]) + "\n"


def comparison_markdown(results: Sequence[LifelongResult]) -> str:
    """Runs grouped by model, data, N and B: one table per group, then general abilities."""
    groups: dict[tuple, list[LifelongResult]] = {}
    for result in results:
        key = (result.model, result.dataset.get("name"), result.n_edits, result.batch_size)
        groups.setdefault(key, []).append(result)
    sections = []
    for members in groups.values():
        header, rows = _rows(members)
        sections.append("\n".join([_describe(members[0]), "", *_table(header, rows)]) + "\n")
        general = general_table(members)
        if general:
            sections.append(general)
    return "\n".join(sections)


def console_table(results: Sequence[LifelongResult]) -> Table:
    """The main columns only, so the table fits a terminal; the Markdown has all."""
    header, rows = _rows(results)
    hidden = ("edit_s", "eval_s", "specificity", "portability", "fluency")
    shown = [
        i
        for i, name in enumerate(header)
        if not name.endswith(("_exact", "_prefix")) and not name.startswith(hidden)
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


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(figure, path: str | Path) -> Path:
    path = Path(path)
    figure.tight_layout()
    figure.savefig(path, dpi=120, bbox_inches="tight")
    _pyplot().close(figure)
    return path


def _styles(results: Sequence[LifelongResult]) -> list[dict[str, Any]]:
    """A colour per method, and a dashed line or hatched bar for its variants
    (+eos, -eos, +chat), so that a method's runs read as one family however
    many are drawn; labels name the dataset only when runs differ in it."""
    methods = list(dict.fromkeys(result.method for result in results))
    palette = _pyplot().get_cmap("tab10" if len(methods) <= 10 else "tab20")
    several_datasets = len({r.dataset.get("name") for r in results}) > 1
    styles = []
    for result in results:
        label = run_label(result)
        variant = label != result.method
        if several_datasets:
            label += f" · {result.dataset.get('name', '?')}"
        styles.append(
            {
                "label": label,
                "color": palette(methods.index(result.method) % palette.N),
                "line": "--" if variant else "-",
                "hatch": "///" if variant else None,
            }
        )
    return styles


def _legend_beside(figure, axes) -> None:
    """One legend for every panel, right of them: each run once, whichever panels it is in."""
    entries: dict[str, Any] = {}
    for axis in axes:
        handles, labels = axis.get_legend_handles_labels()
        entries.update({label: handle for handle, label in zip(handles, labels, strict=True)})
    figure.legend(
        list(entries.values()), list(entries), loc="center left", bbox_to_anchor=(1.0, 0.5),
        fontsize=8,
    )  # fmt: skip


def plot_curves(results: Sequence[LifelongResult], path: str | Path) -> Path | None:
    """Metrics against edits applied; one panel per metric, one line per method.

    Returns None (and writes nothing) when no run has a curve.
    """
    with_curve = [result for result in results if result.curve]
    if not with_curve:
        return None
    plt = _pyplot()
    names = [n for n in _metric_columns(with_curve) if not n.endswith(("_exact", "_prefix"))]
    names = [n for n in names if n != "fluency"]
    figure, axes = plt.subplots(1, len(names), figsize=(3.6 * len(names), 3.2), squeeze=False)
    styles = _styles(with_curve)
    for axis, name in zip(axes[0], names, strict=True):
        for result, style in zip(with_curve, styles, strict=True):
            points = [point for point in result.curve if name in point]
            axis.plot(
                [point["edits"] for point in points],
                [point[name] for point in points],
                marker="o",
                markersize=3,
                color=style["color"],
                linestyle=style["line"],
                label=style["label"],
            )
        axis.set_title(name)
        axis.set_xlabel("edits applied")
        axis.set_ylim(-0.02, 1.02)
        axis.grid(alpha=0.3)
    _legend_beside(figure, axes[0])
    first = with_curve[0]
    figure.suptitle(
        f"{first.model} · {first.dataset.get('name', '?')} · batches of {first.batch_size}",
        fontsize=10,
    )
    return _save(figure, path)


def by_age(result: LifelongResult, metric: str, bins: int = 10) -> list[float | None]:
    """Mean of a per-edit metric over `bins` groups of edits in the order they were
    applied: the first value is the oldest tenth, the last the newest."""
    values = [row.get(metric) for row in result.per_edit]
    means: list[float | None] = []
    for index in range(bins):
        group = values[index * len(values) // bins : (index + 1) * len(values) // bins]
        kept = [value for value in group if value is not None]
        means.append(sum(kept) / len(kept) if kept else None)
    return means


def plot_retention_by_age(results: Sequence[LifelongResult], path: str | Path) -> Path | None:
    """Efficacy and generalization by decile of edit age (oldest first), one line per run.

    Returns None (and writes nothing) when no run has per-edit scores of those metrics.
    """
    names = [
        name for name in AGE_METRICS if any(name in row for r in results for row in r.per_edit)
    ]
    if not names:
        return None
    plt = _pyplot()
    figure, axes = plt.subplots(1, len(names), figsize=(3.8 * len(names), 3.4), squeeze=False)
    deciles = list(range(1, 11))
    styles = _styles(results)
    for axis, name in zip(axes[0], names, strict=True):
        for result, style in zip(results, styles, strict=True):
            means = by_age(result, name)
            if all(value is None for value in means):
                continue
            axis.plot(
                deciles,
                [float("nan") if v is None else v for v in means],
                marker="o",
                markersize=3,
                color=style["color"],
                linestyle=style["line"],
                label=style["label"],
            )
        axis.set_title(name)
        axis.set_xlabel("edit age (tenths, oldest first)")
        axis.set_xticks(deciles)
        axis.set_ylim(-0.02, 1.02)
        axis.grid(alpha=0.3)
    _legend_beside(figure, axes[0])
    figure.suptitle("retention by edit age, on the final model", fontsize=10)
    return _save(figure, path)


def plot_comparison(results: Sequence[LifelongResult], path: str | Path) -> Path:
    """The headline metrics of every run as grouped bars, teacher-forced beside answered."""
    plt = _pyplot()
    names = [n for n in _metric_columns(results) if not n.endswith("_exact") and n != "fluency"]
    width_inches = min(24.0, max(6.0, 0.2 * len(names) * len(results) + 2))
    figure, axis = plt.subplots(figsize=(width_inches, 4.5))
    width = 0.8 / len(results)
    for position, (result, style) in enumerate(zip(results, _styles(results), strict=True)):
        axis.bar(
            [i + position * width for i in range(len(names))],
            [result.metrics.get(name, 0.0) for name in names],
            width=width,
            color=style["color"],
            hatch=style["hatch"],
            edgecolor="white" if style["hatch"] else None,
            label=style["label"],
        )
    axis.set_xticks([i + 0.4 - width / 2 for i in range(len(names))])
    axis.set_xticklabels(names, rotation=40, ha="right", fontsize=8)
    axis.set_ylim(0, 1.02)
    axis.grid(axis="y", alpha=0.3)
    _legend_beside(figure, [axis])
    return _save(figure, path)


def load_runs(paths: Sequence[str | Path]) -> list[LifelongResult]:
    """Every results.json in the given run folders (a folder of several methods
    holds one per method) or given directly."""
    results = []
    for path in map(Path, paths):
        if path.is_file():
            files = [path]
        elif (path / "results.json").is_file():
            files = [path / "results.json"]
        else:
            files = sorted(path.glob("*/results.json"))
        if not files:
            raise FileNotFoundError(f"no results.json in {path} or its folders")
        for file in files:
            try:
                results.append(LifelongResult.load(file))
            except (json.JSONDecodeError, TypeError, KeyError) as error:
                raise ValueError(f"{file}: not a lledit results file ({error})") from None
    return results
