"""FT, MEMIT, AlphaEdit and (given a checkpoint) RLEdit on the same edits, one table.

The lifelong protocol on `--edits` requests of one dataset in batches of
`--batch-size`, evaluated on each method's final model. Each method's
results.json is written as soon as it finishes, and results.md is rewritten
with every method done so far, so a long run that is stopped keeps what it
measured. Run:
`python benchmarks/locate_compare.py --data zsre --edits 1000 --out runs/locate-zsre \
    [--rledit-checkpoint runs/ckpt/rledit]`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lledit import load_dataset, load_model, make_editor, run_lifelong
from lledit.eval import markdown_table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="zsre", help="zsre or counterfact (or a file)")
    parser.add_argument("--edits", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=10)
    parser.add_argument("--methods", default="ft,memit,alphaedit")
    parser.add_argument("--rledit-checkpoint", type=Path, help="add rledit with this network")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    methods = [name for name in args.methods.split(",") if name]
    methods += ["rledit"] if args.rledit_checkpoint else []
    dataset = load_dataset(args.data, "eval", limit=args.edits)
    args.out.mkdir(parents=True, exist_ok=True)
    results = []
    for name in methods:
        handle = load_model()
        settings = {"checkpoint": args.rledit_checkpoint} if name == "rledit" else {}
        result = run_lifelong(
            handle,
            make_editor(name, handle, **settings),
            dataset.requests,
            args.batch_size,
            style=dataset.style,
            dataset=dataset.to_dict(),
        )
        (args.out / name).mkdir(exist_ok=True)
        result.save(args.out / name / "results.json")
        results.append(result)
        (args.out / "results.md").write_text(markdown_table(results))
        print(markdown_table(results), flush=True)


if __name__ == "__main__":
    main()
