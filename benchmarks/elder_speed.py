"""Inference cost of an attached ELDER editor against the unedited model.

Two copies of the default model are loaded; one gets `--edits` zsRE edits.
Both then run the same forward passes on batches of unrelated prompts (the
locality questions of later zsRE records), in alternation, and the median of
the per-batch time ratios is reported with the share of prompts that went
through the adapters rather than being deferred. Run:

    python benchmarks/elder_speed.py [--edits 50]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from lledit import load_dataset, load_model, make_editor


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--edits", type=int, default=50)
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()

    base, edited = load_model(), load_model()
    editor = make_editor("elder", edited)
    requests = load_dataset("zsre", "eval").requests
    for start in range(0, args.edits, 10):
        editor.apply(requests[start : min(start + 10, args.edits)])
    unrelated = [p for r in requests[args.edits :] for p, _ in r.locality]
    unrelated = unrelated[: (args.batches + 1) * args.batch_size]
    plain, attached, adapted = [], [], 0
    with torch.no_grad():
        for start in range(0, len(unrelated), args.batch_size):
            prompts = unrelated[start : start + args.batch_size]
            encoded = base.tokenizer(prompts, return_tensors="pt", padding=True)
            times = []
            for handle in (base, edited):
                started = time.perf_counter()
                handle.model(**encoded.to(handle.device), use_cache=False)
                times.append(time.perf_counter() - started)
            if start:  # the first batch warms up and is not counted
                plain.append(times[0])
                attached.append(times[1])
                adapted += _adapted(editor.current_routing, len(prompts))
    ratio = statistics.median(a / p for a, p in zip(attached, plain, strict=True))
    print(f"{len(plain)} batches of {args.batch_size} unrelated prompts, {base.name}")
    print(f"unedited model: median {statistics.median(plain) * 1000:.0f} ms/batch")
    print(f"with ELDER, {args.edits} edits: median {statistics.median(attached) * 1000:.0f} ms")
    print(f"ratio (median of per-batch ratios): {ratio:.2f}x")
    print(f"prompts that used the adapters: {adapted}/{len(plain) * args.batch_size}")


def _adapted(routing, batch: int) -> int:
    """How many sequences of the latest forward went through the adapters."""
    if routing is None:
        return 0
    return batch if routing.rows is None else routing.rows.numel()


if __name__ == "__main__":
    main()
