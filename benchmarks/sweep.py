"""How LocFT-BF's, UltraEdit's, MEMOIR's and ELDER's defaults were chosen on the default model.

Each setting of `--method` (`--set "replay=30,lr=1e-3"`, repeatable; an
empty string is the defaults; without `--set`, the method's list below)
edits the first `--edits` requests of the eval split of `--data` in batches
of 10 on a fresh copy of the default model and scores every edit on the
final model in both modes: teacher-forced efficacy, the strict and lenient
answer rates of edit prompts and rephrases, whether unrelated answers
stayed the same, and the edit time.

Run: `python benchmarks/sweep.py --method locft [--data zsre] [--edits 100] [--set SETTINGS ...]`.
"""

from __future__ import annotations

import argparse

from lledit import load_dataset, load_model, make_editor, run_lifelong
from lledit.methods import parse_settings

SETTINGS = {
    "locft": [
        "replay=0",
        "replay=30",
        "",  # the defaults
        "replay=-1",  # the paper's: every earlier edit, every batch
        "lr=1e-3",
        "append_eos=false",
    ],
    "ultraedit": ["lr=1e-5", "lr=1e-4", "", "lr=3e-3", "lr=1e-2", "part=mlp_in", "layers=12-17"],
    "memoir": ["threshold=0.4", "threshold=0.5", "", "threshold=0.7", "active=0.125", "layers=21"],
    "elder": [
        "subject_gate=false,deferral_radius=4",
        "deferral_radius=4",
        "deferral_radius=8",
        "deferral_radius=12",
        "",  # the defaults: the subject gate, ε = 16
        "deferral_radius=25",
    ],
}
METRICS = (
    "efficacy",
    "generalization",
    "specificity",
    "locality",
    "efficacy_em",
    "efficacy_prefix",
    "generalization_em",
    "generalization_prefix",
    "locality_same",
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", choices=sorted(SETTINGS), required=True)
    parser.add_argument("--data", default="zsre")
    parser.add_argument("--edits", type=int, default=100)
    parser.add_argument("--set", dest="settings", action="append", default=None)
    arguments = parser.parse_args()
    method = arguments.method
    dataset = load_dataset(arguments.data, "eval", limit=arguments.edits)
    print("| settings | " + " | ".join(METRICS) + " | s/edit |")
    print("|---" * (len(METRICS) + 2) + "|")
    for text in arguments.settings or SETTINGS[method]:
        settings = parse_settings(method, [s for s in text.split(",") if s.strip()])
        handle = load_model()
        editor = make_editor(method, handle, **settings)
        result = run_lifelong(handle, editor, dataset.requests, 10, style=dataset.style)
        scores = " | ".join(f"{result.metrics.get(name, float('nan')):.3f}" for name in METRICS)
        seconds = result.timing["per_edit_s"]
        print(f"| {text or 'defaults'} | {scores} | {seconds:.2f} |", flush=True)


if __name__ == "__main__":
    main()
