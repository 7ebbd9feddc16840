"""Short training runs behind the hypernetwork defaults, compared on held-out edits.

Each setting trains a fresh network for `--steps` optimizer steps on the zsRE
training split and reports the validation metrics (the held-out training edits
applied in sequence, then evaluated). Run:

    python benchmarks/hypernet_defaults.py --method malmen --steps 30
    python benchmarks/hypernet_defaults.py --method rledit --steps 40
"""

from __future__ import annotations

import argparse
import tempfile

from lledit import load_dataset, load_model
from lledit.hypernet.training import HypernetTrainer
from lledit.methods import method_class, train_config_class

SETTINGS = [  # overrides of the method's training config
    {"locality_weight": 1.0, "initial_step": 0.3},
    {"locality_weight": 10.0, "initial_step": 0.1},
    {"locality_weight": 10.0, "initial_step": 0.1, "part": "mlp_in"},
    {"locality_weight": 10.0, "initial_step": 0.1, "rank": 16},
]
METRICS = ("efficacy", "generalization", "specificity", "locality")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--method", default="malmen")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--validation-edits", type=int, default=50)
    args = parser.parse_args()

    handle = load_model()
    data = load_dataset("zsre", "train", limit=2000)
    print("| settings | " + " | ".join(METRICS) + " | train s |")
    print("|---" * (2 + len(METRICS)) + "|")
    for overrides in SETTINGS:
        config = train_config_class(args.method)(
            steps=args.steps, validation_edits=args.validation_edits, **overrides
        )
        with tempfile.TemporaryDirectory() as out:
            trainer = HypernetTrainer(
                handle, method_class(args.method), config, data.requests, out, data.to_dict()
            )
            trainer.train(show_progress=False)
            report = trainer.validate(show_progress=False)
        scores = " | ".join(f"{report['metrics'][name]:.3f}" for name in METRICS)
        described = ", ".join(f"{k}={v}" for k, v in overrides.items())
        print(f"| {described} | {scores} | {trainer.elapsed_s:.0f} |")


if __name__ == "__main__":
    main()
