"""Long streams: each method's edit time and memory per batch as the edits pile up.

Each method (in a process of its own, so that memory is its own) edits the
CounterFact eval split in batches of 10 on the default model, through a
journal, until `--edits` are applied or its time budget is spent; per batch
it records the seconds the batch took, the process's resident memory and the
journal's size on disk. Writes `OUT/<method>.jsonl` per method (a line per
batch, as it goes) and
`OUT/long_stream.png` (batch time, memory and journal size against edits
applied), and prints the table for docs/scaling.md: how far each method got,
the median batch time over its first 1000 edits, the median over its last 10
batches, their ratio, and its memory growth.

Run: `python benchmarks/long_stream.py [--methods ft,grace] [--budget-min 30]
[--edits 10000] [--checkpoint rledit=DIR] [--out runs/long_stream]`. By default
every method runs; the hypernetwork methods read their trained networks from
`runs/ckpt/<method>` (`lledit train -m <method> --data zsre --out
runs/ckpt/<method>`) unless `--checkpoint` names another folder.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lledit.journal import Journal

ROOT = Path(__file__).resolve().parents[1]
BATCH = 10
SMOOTHING = 25


def resident_mib() -> float:
    """This process's resident memory now (Linux), else its peak so far."""
    statm = Path("/proc/self/statm")
    if statm.exists():
        return int(statm.read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    import torch

    from lledit.eval.lifelong import peak_memory_mb

    return peak_memory_mb(torch.device("cpu"))


def journal_bytes(journal: Journal) -> int:
    """The journal's size on disk: its database files and its folder of deltas."""
    files = [*journal.path.parent.glob(f"{journal.path.name}*"), *journal.delta_dir.iterdir()]
    return sum(path.stat().st_size for path in files if path.is_file())


def run_one(method: str, edits: int, budget_s: float, checkpoint: str | None, out: Path) -> None:
    """One method's stream, a line of OUT/<method>.jsonl per batch."""
    from lledit import load_dataset, load_model, make_editor
    from lledit.journal import Journal, JournaledModel

    handle = load_model()
    editor = make_editor(method, handle, **({"checkpoint": checkpoint} if checkpoint else {}))
    requests = load_dataset("counterfact", "eval", limit=edits).requests
    database = out / f"{method}.db"
    for stale in out.glob(f"{method}.db*"):
        if stale.is_dir():
            shutil.rmtree(stale)
        else:
            stale.unlink()
    lines = out / f"{method}.jsonl"
    lines.unlink(missing_ok=True)
    started = time.perf_counter()
    with Journal(database) as journal, lines.open("a") as log:
        edited = JournaledModel(handle, journal, editor)
        for start in range(0, len(requests), BATCH):
            batch_started = time.perf_counter()
            edited.apply(requests[start : start + BATCH])
            seconds = time.perf_counter() - batch_started
            on_disk = journal_bytes(journal)
            batch = {
                "edits": start + BATCH,
                "seconds": seconds,
                "resident_mib": resident_mib(),
                "journal_mib": on_disk / 2**20,
            }
            log.write(json.dumps(batch) + "\n")
            log.flush()
            if time.perf_counter() - started > budget_s:
                break


def summary(record: dict) -> list[str]:
    batches = record["batches"]
    first = [b["seconds"] for b in batches if b["edits"] <= 1000]
    last = [b["seconds"] for b in batches[-10:]]
    growth = batches[-1]["resident_mib"] - batches[0]["resident_mib"]
    return [
        record["method"],
        str(batches[-1]["edits"]),
        f"{statistics.median(first):.2f}",
        f"{statistics.median(last):.2f}",
        f"{statistics.median(last) / statistics.median(first):.2f}",
        f"{batches[0]['resident_mib']:.0f} → {batches[-1]['resident_mib']:.0f} ({growth:+.0f})",
        f"{batches[-1]['journal_mib'] / 1024:.2f}",
    ]


def plot(records: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    colours = plt.get_cmap("tab20").colors  # eleven methods: the default cycle has ten
    for record, colour in zip(records, colours[::2] + colours[1::2], strict=False):
        batches = record["batches"]
        edits = [b["edits"] for b in batches]
        seconds = [b["seconds"] for b in batches]
        # A running median over SMOOTHING batches: single batches jitter with the machine.
        smoothed = [
            statistics.median(seconds[max(0, i - SMOOTHING + 1) : i + 1])
            for i in range(len(seconds))
        ]
        axes[0].plot(edits, smoothed, label=record["method"], color=colour)
        axes[1].plot(edits, [b["resident_mib"] for b in batches], color=colour)
        axes[2].plot(edits, [b["journal_mib"] / 1024 for b in batches], color=colour)
    titles = (
        f"seconds per batch of 10 (median of {SMOOTHING})",
        "resident memory (MiB)",
        "journal on disk (GiB)",
    )
    for axis, title in zip(axes, titles, strict=True):
        axis.set_title(title)
        axis.set_xlabel("edits applied")
    axes[0].set_yscale("log")
    axes[0].legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default=None, help="Comma-separated; default every one.")
    parser.add_argument("--checkpoint", action="append", default=[], help="METHOD=DIR")
    parser.add_argument("--edits", type=int, default=10000)
    parser.add_argument("--budget-min", type=float, default=30.0)
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "long_stream")
    parser.add_argument("--only-report", action="store_true", help="Table and plot only.")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    arguments = parser.parse_args()
    arguments.out.mkdir(parents=True, exist_ok=True)
    checkpoints = dict(item.split("=", 1) for item in arguments.checkpoint)
    if arguments.one:
        budget = arguments.budget_min * 60
        run_one(
            arguments.one, arguments.edits, budget, checkpoints.get(arguments.one), arguments.out
        )
        return
    from lledit.hypernet.checkpoint import CheckpointError, read_meta
    from lledit.methods import METHODS, is_trained

    if arguments.methods:
        methods = [m.strip() for m in arguments.methods.split(",") if m.strip()]
    else:
        methods = [m for m in METHODS if m != "none"]
    if not arguments.only_report:
        for method in filter(is_trained, methods):  # before hours of other methods' streams
            checkpoints.setdefault(method, str(ROOT / "runs" / "ckpt" / method))
            try:
                read_meta(checkpoints[method])
            except CheckpointError as error:
                raise SystemExit(f"{method}: {error}; or pass --checkpoint {method}=DIR") from None
        for method in methods:
            command = [sys.executable, __file__, "--one", method, "--edits", str(arguments.edits)]
            command += ["--budget-min", str(arguments.budget_min), "--out", str(arguments.out)]
            command += [f"--checkpoint={m}={folder}" for m, folder in checkpoints.items()]
            subprocess.run(command, check=True)
    records = [
        {"method": m, "batches": [json.loads(line) for line in path.read_text().splitlines()]}
        for m in methods
        if (path := arguments.out / f"{m}.jsonl").exists()
    ]
    plot(records, arguments.out / "long_stream.png")
    header = ["method", "edits reached", "s/batch, first 1000", "s/batch, last 10 batches",
              "last / first", "resident MiB", "journal GiB"]  # fmt: skip
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for record in records:
        print("| " + " | ".join(summary(record)) + " |")
    print(f"plot: {arguments.out / 'long_stream.png'}")


if __name__ == "__main__":
    main()
