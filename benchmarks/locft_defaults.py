"""How LocFT-BF's defaults were chosen on the default model.

Each setting (`--set "replay=30,lr=1e-3"`, repeatable; an empty string is the
defaults) edits the first `--edits` zsRE eval requests in batches of 10 on a
fresh copy of the default model and scores every edit on the final model in
both modes: teacher-forced efficacy, the strict and lenient answer rates of
edit prompts and rephrases, whether unrelated answers stayed the same, and
the edit time.

Run: `python benchmarks/locft_defaults.py [--edits 100] [--set SETTINGS ...]`.
"""

from __future__ import annotations

import argparse

from lledit import load_dataset, load_model, make_editor, run_lifelong
from lledit.methods import parse_settings

SETTINGS = [
    "replay=0",
    "replay=30",
    "",  # the defaults
    "replay=-1",  # the paper's: every earlier edit, every batch
    "lr=1e-3",
    "append_eos=false",
]
METRICS = (
    "efficacy",
    "efficacy_em",
    "efficacy_prefix",
    "generalization_em",
    "generalization_prefix",
    "locality_same",
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--edits", type=int, default=100)
    parser.add_argument("--set", dest="settings", action="append", default=None)
    arguments = parser.parse_args()
    requests = load_dataset("zsre", "eval").requests[: arguments.edits]
    print("| settings | " + " | ".join(METRICS) + " | s/edit |")
    print("|---" * (len(METRICS) + 2) + "|")
    for text in arguments.settings or SETTINGS:
        settings = parse_settings("locft", [s for s in text.split(",") if s.strip()])
        handle = load_model()
        result = run_lifelong(handle, make_editor("locft", handle, **settings), requests, 10)
        scores = " | ".join(f"{result.metrics[name]:.3f}" for name in METRICS)
        seconds = result.timing["per_edit_s"]
        print(f"| {text or 'defaults'} | {scores} | {seconds:.2f} |", flush=True)


if __name__ == "__main__":
    main()
