"""How MEMIT's and AlphaEdit's value-optimisation settings were chosen.

The target-value optimisation is most of a locate-then-edit batch's time
(a forward and a backward of the model per step, over every prompt and its
prefixed copies). Each setting edits two batches of 10 zsRE eval requests,
each batch on the unedited model and undone afterwards, and reports the
metrics on those edits right after the batch with the seconds per batch.
Run: `python benchmarks/locate_defaults.py [--method alphaedit]`.
"""

from __future__ import annotations

import argparse
import time

import torch

from lledit import evaluate, load_dataset, load_model, make_editor
from lledit.eval import locality_reference

SETTINGS = [  # (value_steps, prefix_count, value_lr, early_stop)
    (20, 3, 0.5, 0.9),
    (10, 3, 0.5, 0.9),
    (10, 2, 1.0, 0.9),
    (10, 2, 1.0, 0.7),
    (6, 1, 1.0, 0.7),
]
METRICS = ("efficacy", "generalization", "specificity", "locality")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="memit", choices=["memit", "alphaedit"])
    args = parser.parse_args()
    torch.manual_seed(0)
    handle = load_model()
    requests = load_dataset("zsre", "eval").requests
    batches = [requests[0:10], requests[10:20]]
    references = [locality_reference(handle, batch) for batch in batches]
    columns = "| value_steps | prefix_count | value_lr | early_stop | "
    print(columns + " | ".join(METRICS) + " | edit s/batch |")
    print("|---" * (5 + len(METRICS)) + "|")
    for steps, prefixes, lr, stop in SETTINGS:
        editor = make_editor(
            args.method,
            handle,
            value_steps=steps,
            prefix_count=prefixes,
            value_lr=lr,
            early_stop=stop,
        )
        editor.prepare()
        totals = dict.fromkeys(METRICS, 0.0)
        seconds = 0.0
        for batch, reference in zip(batches, references, strict=True):
            started = time.perf_counter()
            applied = editor.apply(batch)
            seconds += (time.perf_counter() - started) / len(batches)
            metrics, _ = evaluate(handle, batch, reference=reference)
            applied.undo()
            for name in METRICS:
                totals[name] += metrics[name] / len(batches)
        scores = " | ".join(f"{totals[name]:.3f}" for name in METRICS)
        settings = f"{steps} | {prefixes} | {lr:g} | {stop:g}"
        print(f"| {settings} | {scores} | {seconds:.1f} |", flush=True)


if __name__ == "__main__":
    main()
