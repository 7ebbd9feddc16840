"""The results page: every method on zsRE and CounterFact, both scoring modes,
general abilities before and after, and the strict answer rate with and
without EOS appended to the targets.

Each run (default model, 1000 edits in batches of 10) is written to
`RUNS/<dataset>/<method>[+eos]/results.json` and skipped when that file
exists or `docs/results.json` holds it already (drop its record there to run
it again), so the table can be built over several sittings (a method that
appends EOS itself, as LocFT-BF does, is run as it is and, for the
comparison, without it: `<method>-eos`). Methods that need a trained
network take it from `--checkpoint METHOD=DIR`, or for one dataset only
from `--checkpoint DATASET/METHOD=DIR` (which wins), and are left out
without one. Then `docs/results.md` and `docs/results.json` are rebuilt from
every finished run and the records already there.

Run: `python benchmarks/results_table.py [--runs runs/results] [--datasets zsre]
[--methods ft,grace] [--checkpoint rledit=runs/ckpt/rledit]
[--checkpoint counterfact/rledit=runs/ckpt/rledit-cf] [--only-docs]`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
from pathlib import Path

from rich.console import Console

from lledit import METHODS, load_dataset, load_model, make_editor, progress, run_lifelong
from lledit.cli import ProgressBars
from lledit.eval.general import load_general, score_general
from lledit.eval.lifelong import LifelongResult
from lledit.eval.report import (
    AGE_METRICS,
    by_age,
    general_table,
    plot_comparison,
    plot_retention_by_age,
    run_label,
)
from lledit.hypernet.checkpoint import CheckpointError, read_meta
from lledit.methods import is_trained

DATASETS = ("zsre", "counterfact")
EDITS, BATCH = 1000, 10
ROOT = Path(__file__).resolve().parents[1]
RECORDS = ROOT / "docs" / "results.json"
TEACHER = ("efficacy", "generalization", "specificity", "locality", "portability")
STRICT = ("efficacy_exact", "generalization_exact")
TIMING = ("per_edit_s", "setup_s")
ANSWER = (
    "efficacy_em", "efficacy_prefix", "generalization_em", "generalization_prefix",
    "specificity_prefix", "locality_same", "portability_em",
)  # fmt: skip


def run_missing(
    runs: Path, datasets: list[str], methods: list[str], checkpoints: dict[str, str]
) -> None:
    """Run every (dataset, method, EOS) combination that has no results.json yet:
    first every method as it is (the table's rows), then the EOS variants (one
    column of it), so that a sitting cut short leaves whole rows."""
    suite = load_general()
    runs.mkdir(parents=True, exist_ok=True)
    before_file = runs / "general_before.json"
    network = {
        (dataset_name, method): checkpoints.get(f"{dataset_name}/{method}", checkpoints.get(method))
        for dataset_name in datasets
        for method in methods
        if is_trained(method)
    }
    left_out = {run for run, checkpoint in network.items() if checkpoint is None}
    for dataset_name, method in sorted(left_out):
        logging.warning("%s on %s: no --checkpoint given, left out", method, dataset_name)
    on_record = {_key(record) for record in _records_on_file()}
    planned = [
        (dataset_name, method, suffix)
        for dataset_name in datasets
        for method in methods
        if (dataset_name, method) not in left_out
        for suffix in _variants(method)
        if not (runs / dataset_name / (method + suffix) / "results.json").exists()
        and (method + suffix, f"{dataset_name}/eval") not in on_record
    ]
    planned.sort(key=lambda run: bool(run[2]))  # stable: rows first, then variants
    loaded = {name: load_dataset(name, "eval", limit=EDITS) for name, _, _ in planned}
    for dataset_name, method, suffix in planned:
        dataset = loaded[dataset_name]
        settings = {"checkpoint": network[dataset_name, method]} if is_trained(method) else {}
        if suffix == "-eos":
            settings["append_eos"] = False
        handle = load_model()
        before = None
        if not suffix:
            if not before_file.exists():
                before_file.write_text(json.dumps(score_general(handle, suite)))
            before = json.loads(before_file.read_text())
        result = run_lifelong(
            handle,
            make_editor(method, handle, **settings),
            dataset.requests,
            BATCH,
            style=dataset.style,
            dataset=dataset.to_dict(),
            # The variant is there for the strict answer rate: answers only.
            scoring="answer" if suffix else "both",
            append_eos=suffix == "+eos",
            general=None if suffix else suite,
            general_before=before,
        )
        out = runs / dataset_name / (method + suffix)
        out.mkdir(parents=True, exist_ok=True)
        result.save(out / "results.json")
        logging.warning("%s: %s", out, result.metrics)


def _appends_eos_itself(method: str) -> bool:
    return bool(getattr(METHODS[method].config_class(), "append_eos", False))


def _variants(method: str) -> tuple[str, ...]:
    """The runs of a method: as it is, and with EOS appended to the targets
    while editing (`+eos`), or without it for a method that appends it itself
    (`-eos`). The unedited reference writes no targets: one run."""
    if method == "none":
        return ("",)
    return ("", "-eos") if _appends_eos_itself(method) else ("", "+eos")


def _settings_since_changed(result: LifelongResult) -> list[str]:
    """The method settings whose default has changed since `result` was run (not the
    ones a run sets on purpose: its network, EOS for the `-eos` variant; nor those
    left to the method to resolve, None on either side)."""
    defaults = dataclasses.asdict(METHODS[result.method].config_class())
    recorded = result.method_config
    return sorted(
        name
        for name, value in defaults.items()
        if name not in ("checkpoint", "append_eos")
        and recorded.get(name) is not None and value is not None
        and recorded[name] != value
    )  # fmt: skip


def _cell(result: LifelongResult | None, name: str) -> str:
    if result is None or name not in result.metrics:
        return "-"
    return f"{result.metrics[name]:.3f}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def _record(result: LifelongResult) -> dict:
    """A run as one docs/results.json record: everything the page is drawn from, so
    that it can be rebuilt without the run's directory (per-edit scores are kept as
    their means by tenth of edit age, the retention plot's points)."""
    record = {
        "method": result.method,
        "dataset": result.dataset.get("name"),
        "dataset_style": result.dataset.get("style"),
        "n_edits": result.n_edits,
        "batch_size": result.batch_size,
        "protocol": result.protocol,
        "method_config": result.method_config,
        "metrics": result.metrics,
        "timing": result.timing,
        "general": result.general,
        "retention_by_age": {
            name: by_age(result, name)
            for name in AGE_METRICS
            if any(name in row for row in result.per_edit)
        },
    }
    checkpoint = result.method_config.get("checkpoint")
    if checkpoint:
        try:
            record["network_trained_on"] = read_meta(ROOT / checkpoint)["data"]["name"]
        except (CheckpointError, KeyError):  # the network is not on this machine
            record["network_trained_on"] = "unknown"
    return record


def _from_record(record: dict) -> LifelongResult:
    """A docs/results.json record as a run; one per-edit row per tenth of age, which
    `by_age` reads back as the recorded means. Records written before the method's
    settings and by-age means were kept have neither."""
    by_tenth = record.get("retention_by_age", {})
    tenths = range(10 if by_tenth else 0)
    per_edit = [{name: means[i] for name, means in by_tenth.items()} for i in tenths]
    return LifelongResult(
        method=record["method"],
        method_config=record.get("method_config", {}),
        model="",
        dataset={"name": record["dataset"], "style": record["dataset_style"]},
        n_edits=record["n_edits"],
        batch_size=record["batch_size"],
        seed=0,
        metrics=record["metrics"],
        timing=record["timing"],
        peak_memory_mb=0.0,
        per_edit=per_edit,
        protocol=record["protocol"],
        general=record["general"],
    )


def _key(record: dict) -> tuple[str, str]:
    """Which run a record is: the method with its variant, and the dataset."""
    return run_label(_from_record(record)), record["dataset"]


def _records_on_file() -> list[dict]:
    """The records docs/results.json holds now."""
    return json.loads(RECORDS.read_text()) if RECORDS.exists() else []


def _records(runs: Path) -> list[dict]:
    """The record of every finished run under `runs`, and every record of
    docs/results.json whose run is not among them (run in an earlier sitting whose
    directory is not here)."""
    records = [_record(LifelongResult.load(path)) for path in runs.glob("*/*/results.json")]
    here = {_key(record) for record in records}
    records += [record for record in _records_on_file() if _key(record) not in here]
    return sorted(records, key=lambda record: _key(record)[::-1])


def write_docs(runs: Path) -> None:
    """docs/results.md and docs/results.json from every finished run under `runs` and
    the runs already on record in docs/results.json (a run here replaces its record)."""
    records = _records(runs)
    results = [_from_record(record) for record in records]
    variant_of = {id(result): run_label(result).removeprefix(result.method) for result in results}
    RECORDS.write_text(json.dumps(records, indent=2) + "\n")

    lines = [
        "# Results",
        "",
        f"Every registered method on the default model (SmolLM2-135M-Instruct, float32, CPU), "
        f"{EDITS} edits in batches of {BATCH}, scored on the final model. Regenerate with "
        "`python benchmarks/results_table.py` (runs are resumable; `--only-docs` rebuilds this "
        "page from the runs at hand and the records of `docs/results.json`, which hold the "
        "same numbers). MEND, MALMEN and "
        "RLEdit edit with a network trained beforehand with the default settings (`lledit "
        "train -m METHOD --data DATASET --out DIR`, then `--checkpoint [DATASET/]METHOD=DIR`)"
        f"{_networks(records)}.",
        "",
        "Teacher-forced metrics feed the target to the model; answer metrics score its own "
        "greedy answer, cut at EOS, a newline or the end of the first clause (`_em`: the answer "
        "is the target; `_prefix`: it begins with it; `locality_same`: a locality answer is the "
        "unedited model's). See `docs/evaluation.md`.",
    ]
    for dataset in (f"{name}/eval" for name in DATASETS):
        of_dataset = [r for r in results if r.dataset.get("name") == dataset]
        by_variant = {
            suffix: {r.method: r for r in of_dataset if variant_of[id(r)] == suffix}
            for suffix in ("", "+eos", "-eos")
        }
        plain = by_variant[""]
        # With and without EOS while editing: the method as it is on the side it takes.
        eos = by_variant["+eos"] | {m: r for m, r in plain.items() if _appends_eos_itself(m)}
        no_eos = by_variant["-eos"] | {m: r for m, r in plain.items() if not _appends_eos_itself(m)}
        if not plain and not eos:
            continue
        methods = [m for m in METHODS if m in plain or m in eos]
        lines += ["", f"## {dataset}", "", "### Both scoring modes", ""]
        header = ["method", *TEACHER, *STRICT, *ANSWER, *TIMING]
        rows = []
        for method in methods:
            result = plain.get(method)
            metrics = [_cell(result, name) for name in (*TEACHER, *STRICT, *ANSWER)]
            timing = [f"{result.timing[k]:.3f}" if result else "-" for k in TIMING]
            rows.append([method, *metrics, *timing])
        lines += _table(header, rows)
        lines += ["", "### Strict answers with and without EOS appended while editing", ""]
        header = ["method", "efficacy_em", "efficacy_em +eos", "generalization_em",
                  "generalization_em +eos", "locality_same", "locality_same +eos"]  # fmt: skip
        rows = []
        for method in methods:
            runs_of_method = (no_eos.get(method), eos.get(method))
            cells = [
                _cell(run, name)
                for name in ("efficacy_em", "generalization_em", "locality_same")
                for run in runs_of_method
            ]
            rows.append([method, *cells])
        lines += _table(header, rows)
        row_runs = [plain[m] for m in methods if m in plain]
        general = general_table(row_runs)
        if general:
            lines += ["", "### General abilities", "", general.rstrip("\n")]
        lines += _plots(row_runs, dataset.split("/")[0])
    changed = {id(r): _settings_since_changed(r) for r in results}
    stale = {
        f"{run_label(r)} · {r.dataset.get('name')} ({', '.join(changed[id(r)])})"
        for r in results
        if changed[id(r)]
    }
    if stale:
        lines += [
            "",
            "Run before a default changed, with the settings named: "
            f"{', '.join(sorted(stale))}; the method's page has the measurements behind "
            "the new default.",
        ]
    labels = sorted({run_label(r) + " · " + str(r.dataset.get("name")) for r in results})
    lines += ["", f"Runs on this page: {', '.join(labels) or 'none yet'}."]
    missing = [m for m in METHODS if not any(r.method == m for r in results)]
    if missing:
        lines += ["", f"Not measured yet: {', '.join(missing)}."]
    (ROOT / "docs" / "results.md").write_text("\n".join(lines) + "\n")


def _networks(records: list[dict]) -> str:
    """Which trained network each dataset's rows edited with, and what it was trained on."""
    used = sorted(
        {
            (r["method"], r["dataset"], r["method_config"]["checkpoint"], r["network_trained_on"])
            for r in records
            if r.get("method_config", {}).get("checkpoint")
        }
    )
    parts = [
        f"{method} on {dataset}: `{checkpoint}`, trained on {trained}"
        for method, dataset, checkpoint, trained in used
    ]
    return ": " + "; ".join(parts) if parts else ""


def _plots(results: list[LifelongResult], name: str) -> list[str]:
    """The comparison and retention-by-age plots of one dataset's rows, drawn into
    docs/img/ (as `lledit report` draws them), and the page's lines that show them."""
    if not results:
        return []
    images = ROOT / "docs" / "img"
    images.mkdir(exist_ok=True)
    lines = ["", "### Plots", ""]
    comparison = plot_comparison(results, images / f"results-{name}-comparison.png")
    lines += [f"![{name}: every metric of every method](img/{comparison.name})"]
    retention = plot_retention_by_age(results, images / f"results-{name}-retention-by-age.png")
    if retention is not None:
        lines += ["", f"![{name}: efficacy and generalization by edit age](img/{retention.name})"]
    undrawn = [run_label(r) for r in results if not r.per_edit]
    if retention is not None and undrawn:
        lines += [
            "",
            f"Not in the by-age plot, their per-edit scores not on record: {', '.join(undrawn)}.",
        ]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, default=ROOT / "runs" / "results")
    parser.add_argument("--datasets", default=",".join(DATASETS))
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--checkpoint", action="append", default=[], help="METHOD=DIR")
    parser.add_argument("--only-docs", action="store_true")
    arguments = parser.parse_args()
    logging.basicConfig(format="%(message)s")
    checkpoints = dict(item.split("=", 1) for item in arguments.checkpoint)
    if not arguments.only_docs:
        datasets = [d.strip() for d in arguments.datasets.split(",") if d.strip()]
        methods = [m.strip() for m in arguments.methods.split(",") if m.strip()]
        with progress.reporting(ProgressBars(Console())):
            run_missing(arguments.runs, datasets, methods, checkpoints)
    write_docs(arguments.runs)


if __name__ == "__main__":
    main()
