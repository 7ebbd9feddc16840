"""How FT-L's defaults were chosen on the default model.

Each setting edits two batches of 10 built-in eval requests (each batch on the
unedited model, undone afterwards) and reports the metrics on those edits
right after the batch. Run: `python benchmarks/ft_defaults.py`.
"""

from __future__ import annotations

import time

import torch

from lledit import evaluate, load_dataset, load_model, make_editor
from lledit.eval import locality_reference

SETTINGS = [  # (layer, lr, norm_bound, steps)
    (18, 1e-3, 5e-3, 25),
    (18, 5e-3, 5e-3, 25),
    (18, 5e-3, 1e-2, 25),
    (12, 5e-3, 5e-3, 25),
    (15, 5e-3, 1e-2, 25),
    (21, 5e-3, 1e-2, 25),
    (21, 5e-3, 1e-2, 15),
    (21, 5e-3, 1.5e-2, 25),
    (23, 5e-3, 1e-2, 25),
]
METRICS = ("efficacy", "generalization", "specificity", "locality")


def main() -> None:
    torch.manual_seed(0)
    handle = load_model()
    requests = load_dataset("builtin", "eval").requests
    batches = [requests[0:10], requests[10:20]]
    references = [locality_reference(handle, batch) for batch in batches]
    print("| layer | lr | norm_bound | steps | " + " | ".join(METRICS) + " | edit s/batch |")
    print("|---" * (5 + len(METRICS)) + "|")
    for layer, lr, bound, steps in SETTINGS:
        editor = make_editor("ft", handle, layers=str(layer), lr=lr, norm_bound=bound, steps=steps)
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
        print(f"| {layer} | {lr:g} | {bound:g} | {steps} | {scores} | {seconds:.1f} |")


if __name__ == "__main__":
    main()
