"""Start-up from a journal of many batches against one of few, side by side.

Journals of 10, 1000 and 1009 batches are written by a stand-in editor, so that
writing them takes minutes rather than the hours real edits would: with
`--method ft`, FT-shaped deltas (the MLP output projection of layer 21 of the
default model, small random values); with `--method elder`, ELDER-shaped
records (a random change to every LoRA and router of the default ELDER,
and each edit's allocation and query). Start-up (load the default model,
build the editor for a memory method, replay the journal) is then timed for
each, alternating, with snapshots every 10 batches (the default) and, for
FT, without any. A journal of 1000 batches ends on a snapshot; one of 1009
makes start-up replay the most batches after a snapshot it ever does (9).
ELDER's journal of 1000 batches takes about 15 GB.

Run: `python benchmarks/journal_startup.py [--method ft|elder] [--repeats 3] [--dir DIR]`.
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

from lledit import EditRequest, load_model, make_editor
from lledit.edit import WeightDelta, added_weights, apply_weight_deltas
from lledit.journal import SNAPSHOT_EVERY, Journal, JournaledModel
from lledit.model import ModelHandle


class RandomDeltas:
    """An editor whose every batch adds a small random delta to one module."""

    name: ClassVar[str] = "random"

    def __init__(self, handle: ModelHandle) -> None:
        self.handle = handle
        self.module = handle.edited_modules(None, "mlp_out", "upper", only="first")[0]
        self.generator = torch.Generator().manual_seed(0)

    def prepare(self) -> None:
        return None

    def config_dict(self) -> dict[str, Any]:
        return {"modules": [self.module]}

    def apply(self, batch) -> WeightDelta:
        shape = self.handle.weight_of(self.module).shape
        delta = torch.randn(shape, generator=self.generator) * 1e-4
        return apply_weight_deltas(self.handle, {self.module: delta})


class RandomElderBatch:
    def __init__(self, deltas: dict[str, torch.Tensor], held: dict[str, torch.Tensor]) -> None:
        self.deltas = deltas
        self.held = held
        self.on_undo = None

    def undo(self) -> None:
        raise NotImplementedError("the stand-in writes journals; it does not undo")


class RandomElder:
    """ELDER's records without its training: every batch adds a small random
    change to each LoRA and router, and holds an allocation and query per edit."""

    name: ClassVar[str] = "elder"

    def __init__(self, handle: ModelHandle) -> None:
        self.elder = make_editor("elder", handle)
        self.generator = torch.Generator().manual_seed(0)

    def prepare(self) -> None:
        return None

    def config_dict(self) -> dict[str, Any]:
        return self.elder.config_dict()

    def tensors(self) -> dict[str, torch.Tensor]:
        return self.elder.tensors()

    @torch.no_grad()
    def apply(self, batch) -> RandomElderBatch:
        tensors = self.tensors()
        deltas = {
            name: torch.randn(tensor.shape, generator=self.generator) * 1e-4
            for name, tensor in tensors.items()
        }
        for name, value in added_weights(tensors, deltas).items():
            tensors[name].copy_(value)
        shape = (len(batch), len(self.elder.layers), self.elder.config.top_k)
        allocation = torch.zeros(shape, dtype=torch.long)
        width = tensors["elder.router"].shape[-1]
        queries = torch.randn(len(batch), width, generator=self.generator)
        held = {"allocation": allocation, "queries": queries, "rehearsal_end": torch.tensor(0)}
        return RandomElderBatch(deltas, held)


STAND_INS = {"ft": RandomDeltas, "elder": RandomElder}


def write_journal(path: Path, method: str, batches: int, snapshot_every: int) -> None:
    handle = load_model()
    journal = Journal(path)
    editor = STAND_INS[method](handle)
    model = JournaledModel(handle, journal, editor, snapshot_every=snapshot_every)
    request = EditRequest("The capital of France is", "Lyon")
    for _ in range(batches):
        model.apply([request])
    journal.close()


def start_up(path: Path, method: str) -> float:
    started = time.perf_counter()
    with Journal(path) as journal:
        handle = load_model()
        JournaledModel(handle, journal, make_editor(method, handle) if method == "elder" else None)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", choices=sorted(STAND_INS), default="ft")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=None)
    arguments = parser.parse_args()
    folder = arguments.dir or Path(tempfile.mkdtemp(prefix="lledit-journals-"))
    method = arguments.method
    cases = {
        "10 batches": (10, SNAPSHOT_EVERY),
        "1000 batches": (1000, SNAPSHOT_EVERY),
        "1009 batches": (1009, SNAPSHOT_EVERY),
    }
    if method == "ft":
        cases["1009 batches, no snapshots"] = (1009, 10**9)
    paths = {}
    for label, (batches, every) in cases.items():
        paths[label] = folder / method / label.replace(" ", "_").replace(",", "") / "j.db"
        if not paths[label].exists():
            started = time.perf_counter()
            write_journal(paths[label], method, batches, every)
            print(f"wrote {label} in {time.perf_counter() - started:.1f} s")
    times: dict[str, list[float]] = {label: [] for label in cases}
    for _ in range(arguments.repeats):
        for label, path in paths.items():
            times[label].append(start_up(path, method))
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
