"""Edit time per edit of several methods, side by side on the default model.

Each method is prepared once (statistics, networks: not timed), then edits
the same `--batches` batches of 10 zsRE eval requests, each undone before the
next, so every batch is timed on the unedited model; the methods take turns
batch by batch, so that a slow spell of the machine falls on all of them.
Reports the median seconds per edit and the ratio to the first method.

Run: `python benchmarks/edit_speed.py [--methods ultraedit,alphaedit,rledit]
[--checkpoint rledit=runs/ckpt/rledit] [--batches 5]`.
"""

from __future__ import annotations

import argparse
import statistics
import time

from lledit import load_dataset, load_model, make_editor


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="ultraedit,alphaedit,rledit")
    parser.add_argument("--checkpoint", action="append", default=[], help="METHOD=DIR")
    parser.add_argument("--batches", type=int, default=5)
    arguments = parser.parse_args()
    checkpoints = dict(item.split("=", 1) for item in arguments.checkpoint)
    methods = [m.strip() for m in arguments.methods.split(",") if m.strip()]
    handle = load_model()
    requests = load_dataset("zsre", "eval").requests[: 10 * arguments.batches]
    editors = {}
    for method in methods:
        settings = {"checkpoint": checkpoints[method]} if method in checkpoints else {}
        editors[method] = make_editor(method, handle, **settings)
        editors[method].prepare()
    seconds: dict[str, list[float]] = {method: [] for method in methods}
    for start in range(0, len(requests), 10):
        for method, editor in editors.items():
            started = time.perf_counter()
            applied = editor.apply(requests[start : start + 10])
            seconds[method].append((time.perf_counter() - started) / 10)
            applied.undo()
    first = statistics.median(seconds[methods[0]])
    print(f"| method | s/edit (median of {arguments.batches} batches) | / {methods[0]} |")
    print("|---|---|---|")
    for method in methods:
        median = statistics.median(seconds[method])
        print(f"| {method} | {median:.3f} | {median / first:.1f} |")


if __name__ == "__main__":
    main()
