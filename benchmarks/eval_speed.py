"""Evaluation throughput: the batched evaluator against one prompt at a time.

Both score the same 300 zsRE edit prompts with their new targets on the
default model, side by side in one run, and must agree on every score.
Run: `python benchmarks/eval_speed.py [--prompts 300] [--batch-size 64]`.
"""

from __future__ import annotations

import argparse
import time

import torch

from lledit import load_dataset, load_model
from lledit.eval.scoring import score_pairs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--data", default="zsre")
    arguments = parser.parse_args()

    handle = load_model()
    requests = load_dataset(arguments.data, "eval", limit=arguments.prompts).requests
    prompts = [request.prompt for request in requests]
    targets = [request.target_new for request in requests]
    score_pairs(handle, prompts[:8], targets[:8])  # warm-up

    started = time.perf_counter()
    batched = score_pairs(handle, prompts, targets, batch_size=arguments.batch_size)
    batched_s = time.perf_counter() - started

    started = time.perf_counter()
    single = [
        score_pairs(handle, [p], [t], batch_size=1) for p, t in zip(prompts, targets, strict=True)
    ]
    single_s = time.perf_counter() - started

    single_logprob = torch.cat([scores.logprob for scores in single])
    torch.testing.assert_close(batched.logprob, single_logprob, atol=1e-3, rtol=1e-4)
    same_accuracy = torch.equal(
        batched.token_accuracy, torch.cat([scores.token_accuracy for scores in single])
    )

    count = len(prompts)
    threads = torch.get_num_threads()
    print(f"model {handle.name}, {count} {arguments.data} prompts, {threads} threads")
    print(f"batched (batch {arguments.batch_size}): {count / batched_s:8.1f} prompts/s")
    print(f"one at a time:          {count / single_s:8.1f} prompts/s")
    print(f"speed-up: {single_s / batched_s:.1f}x (token accuracies identical: {same_accuracy})")


if __name__ == "__main__":
    main()
