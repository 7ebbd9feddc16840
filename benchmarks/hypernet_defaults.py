"""Short training runs behind the hypernetwork defaults, compared on held-out edits.

Each setting (`--setting "l2_weight=1e-2,rank=16"`, repeatable; an empty
string is the method's defaults) trains a fresh network for `--steps`
optimizer steps on the training split of `--data` and reports the validation
metrics (the held-out training edits applied in sequence, then evaluated;
`--validation-edits 0` skips them). With `--eval-edits N` it also applies N
eval edits of `--data` in sequence and scores the final model in both modes
(teacher-forced, and the model's own answers), which shows how the updates
add up over a sequence far longer than the validation's. `--keep DIR` keeps
each network in `DIR/<setting>`. Run:

    python benchmarks/hypernet_defaults.py --method malmen --steps 30
    python benchmarks/hypernet_defaults.py --method rledit --steps 100 --eval-edits 1000 \
        --setting "locality_weight=10" --setting "" --setting "locality_weight=300"

Where RLEdit edits (docs/methods/rledit.md): part and layer band at a short
budget, judged over 1000 zsRE edits:

    python benchmarks/hypernet_defaults.py --method rledit --steps 100 --eval-edits 1000 \
        --validation-edits 0 --grid layers
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from lledit import load_dataset, load_model
from lledit.hypernet.training import HypernetTrainer
from lledit.methods import method_class, parse_settings, train_config_class

GRIDS = {  # overrides of the method's training config
    "defaults": [
        "locality_weight=1,initial_step=0.3",
        "locality_weight=10,initial_step=0.1",
        "locality_weight=10,initial_step=0.1,part=mlp_in",
        "locality_weight=10,initial_step=0.1,rank=16",
    ],
    "layers": [  # SmolLM2-135M has 30 decoder layers; the paper edits gate/up of 22-30 of 32
        "part=mlp_out,layers=21-26",
        "part=mlp_in,layers=21-26",
        "part=mlp_in,layers=23-28",
        "part=mlp,layers=21-26",
        "part=mlp_out,layers=12-17",
        "part=mlp_in,layers=12-17",
    ],
}
METRICS = ("efficacy", "generalization", "specificity", "locality")
ANSWER_METRICS = ("efficacy_em", "efficacy_prefix", "generalization_em", "locality_same")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--method", default="malmen")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--validation-edits", type=int, default=50)
    parser.add_argument("--setting", action="append", help="training settings key=value,...")
    parser.add_argument("--grid", choices=sorted(GRIDS), default="defaults")
    parser.add_argument("--data", default="zsre", help="training and eval data")
    parser.add_argument("--eval-edits", type=int, default=0, help="eval edits in sequence")
    parser.add_argument("--keep", type=Path, help="keep each trained network here")
    args = parser.parse_args()

    handle = load_model()
    data = load_dataset(args.data, "train", limit=2000)
    config_class = train_config_class(args.method)
    evaluation = load_dataset(args.data, "eval", limit=args.eval_edits) if args.eval_edits else None
    columns = [f"validation {name}" for name in METRICS] if args.validation_edits else []
    if evaluation is not None:
        columns += [f"{args.eval_edits} edits: {name}" for name in METRICS + ANSWER_METRICS]
        columns += ["s/edit"]
    print("| settings | " + " | ".join(columns) + " | train s |")
    print("|---" * (2 + len(columns)) + "|")
    for text in args.setting if args.setting is not None else GRIDS[args.grid]:
        overrides = parse_settings(args.method, [p for p in text.split(",") if p], config_class)
        config = config_class(
            **{"steps": args.steps, "validation_edits": args.validation_edits, **overrides}
        )
        with tempfile.TemporaryDirectory() as scratch:
            out = (
                args.keep / (text.replace("=", "-").replace(",", "_") or "defaults")
                if args.keep
                else scratch
            )
            trainer = HypernetTrainer(
                handle, method_class(args.method), config, data.requests, out, data.to_dict()
            )
            trainer.train()
            report = trainer.validate()
        scores = [report["metrics"][name] for name in METRICS] if report else []
        if evaluation is not None:
            result = trainer.edit_sequence(evaluation.requests, dataset=evaluation.to_dict())
            scores += [result.metrics[name] for name in METRICS + ANSWER_METRICS]
            scores += [result.timing["per_edit_s"]]
        cells = " | ".join(f"{score:.3f}" for score in scores)
        print(f"| {text or 'defaults'} | {cells} | {trainer.elapsed_s:.0f} |", flush=True)


if __name__ == "__main__":
    main()
