"""RLEdit's edit time against one plain forward+backward of the model, side by side.

The floor for a gradient-based editor is one forward and one backward through
the model per batch. For each batch of 10 zsRE eval edits this times, in
alternation, (a) a plain training step's forward+backward with every weight
requiring a gradient, and (b) `editor.apply` (capture, network, solve, add),
undone afterwards. Run:

    python benchmarks/hypernet_speed.py --checkpoint runs/ckpt/rledit [--method rledit]
"""

from __future__ import annotations

import argparse
import statistics
import time

from lledit import load_dataset, load_model, make_editor
from lledit.hypernet.capture import sequence_losses
from lledit.model import edit_batch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--method", default="rledit")
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=10)
    args = parser.parse_args()

    handle = load_model()
    editor = make_editor(args.method, handle, checkpoint=args.checkpoint)
    editor.prepare()
    requests = load_dataset("zsre", "eval", limit=args.batches * args.batch_size).requests
    batches = [requests[i : i + args.batch_size] for i in range(0, len(requests), args.batch_size)]
    parameters = list(handle.model.parameters())
    plain, editing = [], []
    for batch in [batches[0], *batches]:  # the first batch warms up and is not counted
        tokens = edit_batch(handle, [r.prompt for r in batch], [r.target_new for r in batch])
        for parameter in parameters:
            parameter.requires_grad_(True)
        started = time.perf_counter()
        sequence_losses(handle.target_logits(tokens), tokens).sum().backward()
        plain.append(time.perf_counter() - started)
        for parameter in parameters:
            parameter.requires_grad_(False)
            parameter.grad = None
        started = time.perf_counter()
        applied = editor.apply(batch)
        editing.append(time.perf_counter() - started)
        applied.undo()
    plain, editing = plain[1:], editing[1:]
    ratio = statistics.median(e / p for e, p in zip(editing, plain, strict=True))
    print(f"{len(plain)} batches of {args.batch_size} edits, {handle.name}, {handle.device}")
    print(f"plain forward+backward: median {statistics.median(plain) * 1000:.0f} ms/batch")
    print(f"{args.method} apply:        median {statistics.median(editing) * 1000:.0f} ms/batch")
    print(f"ratio (median of per-batch ratios): {ratio:.2f}x")


if __name__ == "__main__":
    main()
