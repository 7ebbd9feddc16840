"""Restart equivalence on the default model: a journaled stream stopped and restarted
ends bit for bit where an uninterrupted one does.

For each method, four batches of two built-in edits go through a journal
in one process, with an undo of the first batch after the second; the same
stream is then run again up to the undo, the process's model, editor and
journal are dropped (the journal's lock released, as a kill leaves it),
and a fresh model and editor replay the journal and apply the last two
batches, which are computed with whatever the editor held of the earlier
ones. Weights, the editor's own tensors and the logits of a few prompts
are compared exactly. The tests check every method on tiny models;
this is the same on SmolLM2-135M.

Run: `python benchmarks/restart_equivalence.py [--methods ft,alphaedit,rledit,elder,grace]
[--checkpoint rledit=runs/ckpt/rledit]`.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from lledit import load_dataset, load_model, make_editor
from lledit.journal import Journal, JournaledModel

PROBES = ["The capital of France is", "The Eiffel Tower is in", "Water boils at"]


def run(path: Path, method: str, settings: dict, events: list) -> JournaledModel:
    handle = load_model()
    model = JournaledModel(handle, Journal(path), make_editor(method, handle, **settings))
    for event in events:
        if event == "undo 1":
            model.undo(1)
        else:
            model.apply(event)
    return model


def state(model: JournaledModel) -> dict[str, torch.Tensor]:
    """Every weight, the editor's own tensors and the probes' logits."""
    handle = model.handle
    tensors = {f"weight {name}": value for name, value in handle.model.state_dict().items()}
    editor_tensors = getattr(model.editor, "tensors", dict)()
    tensors |= {f"editor {name}": value for name, value in editor_tensors.items()}
    encoded = handle.tokenizer(PROBES, return_tensors="pt", padding=True)
    with torch.no_grad():
        tensors["logits"] = handle.model(**encoded, use_cache=False).logits
    return tensors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="ft,alphaedit,rledit,elder,grace")
    parser.add_argument("--checkpoint", action="append", default=[], help="METHOD=DIR")
    arguments = parser.parse_args()
    checkpoints = dict(item.split("=", 1) for item in arguments.checkpoint)
    requests = load_dataset("builtin", "train").requests
    batches = [requests[i : i + 2] for i in range(0, 8, 2)]
    events = [batches[0], batches[1], "undo 1", batches[2], batches[3]]
    print("| method | identical | differing | seconds |")
    print("|---|---|---|---|")
    for method in [m.strip() for m in arguments.methods.split(",") if m.strip()]:
        settings = {"checkpoint": checkpoints[method]} if method in checkpoints else {}
        started = time.perf_counter()
        with tempfile.TemporaryDirectory() as folder:
            straight = state(run(Path(folder) / "straight.db", method, settings, events))
            first = run(Path(folder) / "restarted.db", method, settings, events[:3])
            first.journal.release_lock()
            del first
            restarted = state(run(Path(folder) / "restarted.db", method, settings, events[3:]))
        differing = [
            name
            for name, value in straight.items()
            if name not in restarted or not torch.equal(restarted[name], value)
        ]
        seconds = time.perf_counter() - started
        verdict = "yes" if not differing and restarted.keys() == straight.keys() else "no"
        print(f"| {method} | {verdict} | {', '.join(differing[:3]) or '-'} | {seconds:.0f} |")


if __name__ == "__main__":
    main()
