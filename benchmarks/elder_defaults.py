"""How ELDER's and GRACE's defaults were chosen, and ELDER's deferral trade-off.

ELDER: each training setting (`--elder "replay=30,n_loras=8"`, repeatable;
an empty string is the defaults) edits `--edits` eval requests of `--data` in
sequence (batches of 10) and then scores all of them on the final model once
per deferral radius ε. ε only decides at inference whether an input's
allocation code is close enough to an edit's, so one edit sequence gives the
whole ε table: a larger ε lets more rephrases (generalization) but also more
unrelated prompts (locality) through the adapters. After the table come
efficacy_exact and generalization_exact at each setting's own ε over the
edits in tenths by age, oldest first.

GRACE: the distance from each edit prompt's key to its rephrases' keys and to
unrelated prompts' keys, which brackets a sensible radius, then the metrics
at a few radii.

Run: `python benchmarks/elder_defaults.py [--edits 100] [--data zsre|counterfact]
[--elder SETTINGS ...] [--no-grace]`.
"""

from __future__ import annotations

import argparse
import time

import torch

from lledit import evaluate, load_dataset, load_model, make_editor
from lledit.eval import locality_reference
from lledit.methods import parse_settings

ELDER_SETTINGS = [
    "batch_rank=0,replay=0,early_stop=1",  # the paper's training: every step, no rehearsal
    "batch_rank=0,replay=0",
    "batch_rank=0",  # the shared mixture, with rehearsal
    "",  # the defaults: a LoRA per batch
]
RADII = (4, 8, 12, 16, 25)  # codes of 48 bits differ in at most 24
GRACE_RADII = (1.0, 10.0, 30.0)
METRICS = (
    "efficacy_exact",
    "generalization_exact",
    "locality",
    "efficacy",
    "generalization",
    "specificity",
    "specificity_exact",
)


def edit_all(editor, requests, batch_size: int) -> float:
    """Apply every batch in order; the seconds per edit."""
    started = time.perf_counter()
    for start in range(0, len(requests), batch_size):
        editor.apply(requests[start : start + batch_size])
    return (time.perf_counter() - started) / len(requests)


def by_age(scores: list[dict], metric: str, parts: int = 10) -> str:
    """The metric averaged over each tenth of the edits, oldest first: whether
    early edits were forgotten or late ones left under-trained."""
    size = max(1, len(scores) // parts)
    chunks = [scores[start : start + size] for start in range(0, len(scores), size)]
    return " ".join(f"{sum(s[metric] for s in chunk) / len(chunk):.2f}" for chunk in chunks)


def row(label: str, metrics: dict[str, float], per_edit: float) -> str:
    scores = " | ".join(f"{metrics[name]:.3f}" for name in METRICS)
    return f"| {label} | {scores} | {per_edit:.2f} |"


@torch.no_grad()
def grace_key_distances(handle, requests) -> str:
    """Median distance from each prompt's GRACE key to its rephrase's and to other prompts'."""
    editor = make_editor("grace", handle)
    module = handle.module(editor.module_name)
    editor.remove()
    texts = [r.prompt for r in requests] + [r.rephrases[0] for r in requests]
    encoded = handle.tokenizer(texts, return_tensors="pt", padding=True).to(handle.device)
    mask = encoded["attention_mask"]
    positions = torch.arange(mask.shape[1], device=mask.device)
    last = torch.where(mask.bool(), positions, -1).amax(dim=1)  # either padding side
    captured: list[torch.Tensor] = []
    hook = module.register_forward_pre_hook(
        lambda mod, inputs: captured.append(inputs[0][torch.arange(len(texts)), last].float())
    )
    try:
        handle.model.base_model(**encoded, use_cache=False)
    finally:
        hook.remove()
    keys, rephrase_keys = captured[0].split(len(requests))
    to_rephrase = (keys - rephrase_keys).norm(dim=1)
    others = torch.cdist(keys, keys)
    others = others[~torch.eye(len(keys), dtype=torch.bool, device=keys.device)]
    return (
        f"GRACE key norm {keys.norm(dim=1).median():.1f}; distance to own rephrase "
        f"{to_rephrase.median():.1f}, to another edit prompt {others.median():.1f} (medians)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--edits", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=10)
    parser.add_argument("--data", default="zsre", help="dataset (default: zsre)")
    parser.add_argument("--elder", action="append", help="ELDER settings key=value,...")
    parser.add_argument("--no-grace", action="store_true", help="skip the GRACE tables")
    args = parser.parse_args()
    torch.manual_seed(0)
    handle = load_model()
    requests = load_dataset(args.data, "eval", limit=args.edits).requests
    reference = locality_reference(handle, requests)
    header = "| " + " | ".join(METRICS) + " | s/edit |"
    print(f"ELDER, {len(requests)} {args.data} edits in batches of {args.batch_size}\n")
    print("| settings | ε " + header)
    print("|---" * (len(METRICS) + 3) + "|")
    ages: list[str] = []
    for text in args.elder or ELDER_SETTINGS:
        label = text or "defaults"
        settings = parse_settings("elder", [part for part in text.split(",") if part])
        editor = make_editor("elder", handle, **settings)
        per_edit = edit_all(editor, requests, args.batch_size)
        for radius in RADII:
            editor.deferral_radius = radius
            metrics, scores = evaluate(handle, requests, reference=reference)
            print(row(f"{label} | {radius}", metrics, per_edit), flush=True)
            if radius == editor.config.deferral_radius:
                ages.extend(
                    f"{label}, ε {radius}: {name} by age, oldest tenth first: "
                    + by_age(scores, name)
                    for name in ("efficacy_exact", "generalization_exact")
                )
        editor.remove()
    print("\n" + "\n".join(ages))
    if args.no_grace:
        return
    print("\n" + grace_key_distances(handle, requests) + "\n")
    print("| GRACE radius " + header)
    print("|---" * (len(METRICS) + 2) + "|")
    for radius in GRACE_RADII:
        editor = make_editor("grace", handle, radius=radius)
        per_edit = edit_all(editor, requests, args.batch_size)
        metrics, _ = evaluate(handle, requests, reference=reference)
        print(row(f"{radius:g}", metrics, per_edit), flush=True)
        editor.remove()


if __name__ == "__main__":
    main()
