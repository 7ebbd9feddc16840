"""Start-up from a journal of many batches against one of few, side by side.

Journals of 10 and of 1000 batches are written with FT-shaped deltas (the MLP
output projection of layer 21 of the default model, small random values) by
a stand-in editor, so that writing them takes seconds rather than the hours
real edits would. Start-up (load the default model, replay the journal) is
then timed for each, alternating, with snapshots every 100 batches (the
default) and, for comparison, without any.

Run: `python benchmarks/journal_startup.py [--repeats 3] [--dir /tmp/journals]`.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, ClassVar

import torch

from lledit import EditRequest, load_model
from lledit.edit import WeightDelta, apply_weight_deltas
from lledit.journal import Journal, JournaledModel
from lledit.model import ModelHandle


class RandomDeltas:
    """An editor whose every batch adds a small random delta to one module."""

    name: ClassVar[str] = "random"

    def __init__(self, handle: ModelHandle) -> None:
        self.handle = handle
        self.module = handle.edited_modules(None, "mlp_out", "upper", first_only=True)[0]
        self.generator = torch.Generator().manual_seed(0)

    def prepare(self) -> None:
        return None

    def config_dict(self) -> dict[str, Any]:
        return {"modules": [self.module]}

    def apply(self, batch) -> WeightDelta:
        shape = self.handle.weight_of(self.module).shape
        delta = torch.randn(shape, generator=self.generator) * 1e-4
        return apply_weight_deltas(self.handle, {self.module: delta})


def write_journal(path: Path, batches: int, snapshot_every: int) -> None:
    handle = load_model()
    journal = Journal(path)
    model = JournaledModel(handle, journal, RandomDeltas(handle), snapshot_every=snapshot_every)
    request = EditRequest("The capital of France is", "Lyon")
    for _ in range(batches):
        model.apply([request])
    journal.close()


def start_up(path: Path) -> float:
    started = time.perf_counter()
    with Journal(path) as journal:
        JournaledModel(load_model(), journal)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=None)
    arguments = parser.parse_args()
    folder = arguments.dir or Path(tempfile.mkdtemp(prefix="lledit-journals-"))
    cases = {
        "10 batches": (10, 100),
        "1000 batches, snapshots every 100": (1000, 100),
        "1000 batches, no snapshots": (1000, 10**9),
    }
    paths = {}
    for label, (batches, every) in cases.items():
        paths[label] = folder / label.replace(" ", "_").replace(",", "") / "j.db"
        if not paths[label].exists():
            started = time.perf_counter()
            write_journal(paths[label], batches, every)
            print(f"wrote {label} in {time.perf_counter() - started:.1f} s")
    times: dict[str, list[float]] = {label: [] for label in cases}
    for _ in range(arguments.repeats):
        for label, path in paths.items():
            times[label].append(start_up(path))
    base = statistics.median(times["10 batches"])
    print("| journal | start-up s (median) | / 10 batches |")
    print("|---|---|---|")
    for label, measured in times.items():
        median = statistics.median(measured)
        print(f"| {label} | {median:.2f} | {median / base:.2f} |")
    if arguments.dir is None:
        shutil.rmtree(folder)


if __name__ == "__main__":
    main()
