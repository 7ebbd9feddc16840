"""Answer-mode evaluation against teacher-forced evaluation of the same edits.

Both evaluate the same zsRE edits on the default model, side by side in one
run, each with the unedited model's locality reference it needs (the
teacher-forced argmax tokens; the answers). The target is answer mode at most
3x the teacher-forced time.
Run: `python benchmarks/answer_eval_speed.py [--edits 1000]`.
"""

from __future__ import annotations

import argparse
import time

import torch

from lledit import evaluate, load_dataset, load_model
from lledit.eval.answers import answer_reference, evaluate_answers
from lledit.eval.metrics import locality_reference


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--edits", type=int, default=1000)
    parser.add_argument("--data", default="zsre")
    arguments = parser.parse_args()

    handle = load_model()
    requests = load_dataset(arguments.data, "eval", limit=arguments.edits).requests
    evaluate(handle, requests[:8])  # warm-up
    evaluate_answers(handle, requests[:8])

    started = time.perf_counter()
    teacher, _ = evaluate(handle, requests, reference=locality_reference(handle, requests))
    teacher_s = time.perf_counter() - started

    started = time.perf_counter()
    answers, _ = evaluate_answers(handle, requests, reference=answer_reference(handle, requests))
    answer_s = time.perf_counter() - started

    print(f"model {handle.name}, {len(requests)} {arguments.data} edits (unedited model), "
          f"{torch.get_num_threads()} threads")  # fmt: skip
    print(f"teacher-forced: {teacher_s:7.1f} s  efficacy {teacher['efficacy']:.3f}")
    print(f"answer mode:    {answer_s:7.1f} s  efficacy_em {answers['efficacy_em']:.3f}, "
          f"efficacy_prefix {answers['efficacy_prefix']:.3f}")  # fmt: skip
    print(f"ratio answer / teacher: {answer_s / teacher_s:.2f}x (target at most 3x)")


if __name__ == "__main__":
    main()
