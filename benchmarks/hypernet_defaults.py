"""Short training runs behind the hypernetwork defaults, compared on held-out edits.

Each setting (`--setting "l2_weight=1e-2,rank=16"`, repeatable; an empty
string is the method's defaults) trains a fresh network for `--steps`
optimizer steps on the zsRE training split and reports the validation metrics
(the held-out training edits applied in sequence, then evaluated). With
`--eval-edits N` it also applies N zsRE eval edits in sequence and scores the
final model, which shows how the updates add up over a sequence far longer
than the validation's. Run:

    python benchmarks/hypernet_defaults.py --method malmen --steps 30
    python benchmarks/hypernet_defaults.py --method rledit --steps 100 --eval-edits 1000 \
        --setting "locality_weight=10" --setting "" --setting "locality_weight=300"
"""

from __future__ import annotations

import argparse
import tempfile

from lledit import load_dataset, load_model
from lledit.hypernet.training import HypernetTrainer
from lledit.methods import method_class, parse_settings, train_config_class

SETTINGS = [  # overrides of the method's training config
    "locality_weight=1,initial_step=0.3",
    "locality_weight=10,initial_step=0.1",
    "locality_weight=10,initial_step=0.1,part=mlp_in",
    "locality_weight=10,initial_step=0.1,rank=16",
]
METRICS = ("efficacy", "generalization", "specificity", "locality")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--method", default="malmen")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--validation-edits", type=int, default=50)
    parser.add_argument("--setting", action="append", help="training settings key=value,...")
    parser.add_argument("--eval-edits", type=int, default=0, help="zsRE eval edits in sequence")
    args = parser.parse_args()

    handle = load_model()
    data = load_dataset("zsre", "train", limit=2000)
    config_class = train_config_class(args.method)
    eval_requests = (
        load_dataset("zsre", "eval", limit=args.eval_edits).requests if args.eval_edits else []
    )
    columns = [f"validation {name}" for name in METRICS]
    if args.eval_edits:
        columns += [f"{args.eval_edits} edits: {name}" for name in METRICS]
    print("| settings | " + " | ".join(columns) + " | train s |")
    print("|---" * (2 + len(columns)) + "|")
    for text in args.setting if args.setting is not None else SETTINGS:
        overrides = parse_settings(args.method, [p for p in text.split(",") if p], config_class)
        config = config_class(
            **{"steps": args.steps, "validation_edits": args.validation_edits, **overrides}
        )
        with tempfile.TemporaryDirectory() as out:
            trainer = HypernetTrainer(
                handle, method_class(args.method), config, data.requests, out, data.to_dict()
            )
            trainer.train()
            report = trainer.validate()
        scores = [report["metrics"][name] for name in METRICS]
        if args.eval_edits:
            result = trainer.edit_sequence(eval_requests)
            scores += [result.metrics[name] for name in METRICS]
        cells = " | ".join(f"{score:.3f}" for score in scores)
        print(f"| {text or 'defaults'} | {cells} | {trainer.elapsed_s:.0f} |", flush=True)


if __name__ == "__main__":
    main()
