"""A journal's edited model written to a folder, and such a folder loaded back.

Weight editors export a plain Hugging Face folder that needs no lledit.
Memory editors (ELDER, GRACE, MEMOIR) keep their edits in adapters, a codebook or a memory
that are routed per sequence, which plain transformers cannot run: they
export an lledit folder instead, holding a manifest that names the base
model and method and the editor's own safetensors and JSON (no pickles),
which `load_edited` opens in one call.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from lledit.edit import EditMethod
from lledit.journal import APPLIED, MEMORY_METHODS, Journal, JournaledModel
from lledit.methods import METHODS, config_fields, make_editor
from lledit.model import DEFAULT_MODEL, ModelHandle, load_model

MANIFEST = "lledit.json"
FORMAT = "lledit-edited-model"


def journal_model(journal: Journal) -> str | None:
    """The base model the journal's batches were written for (None: the default model)."""
    written_for = {batch.model for batch in journal.batches()}
    if len(written_for) != 1:
        raise ValueError(
            f"the journal holds batches for {sorted(written_for) or 'no model'}; "
            "name the base model with --model"
        )
    (name,) = written_for
    return None if name == DEFAULT_MODEL else name


def export_journal(
    journal: Journal, out: str | Path, *, model: str | None = None, dtype: str = "float32"
) -> bool:
    """Write the journal's edited model to `out`; True if it is a plain transformers folder.

    `model` is the base model, by default the one the journal was written for.
    """
    out = Path(out)
    if model is None:
        model = journal_model(journal)
    handle = load_model(model, dtype=dtype)
    applied = journal.batches(status=APPLIED)
    memory = sorted({batch.method for batch in applied} & MEMORY_METHODS)
    if not memory:
        JournaledModel(handle, journal)
        handle.model.save_pretrained(out)
        handle.tokenizer.save_pretrained(out)
        return True
    (method,) = memory
    fields = {name for name, _, _ in config_fields(method)}
    written = applied[-1].method_config
    editor = make_editor(method, handle, **{k: v for k, v in written.items() if k in fields})
    JournaledModel(handle, journal, editor)
    editor.save(out)
    manifest = {"format": FORMAT, "method": method, "base_model": handle.name, "dtype": dtype}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return False


def load_edited(
    directory: str | Path,
    *,
    device: str | torch.device = "cpu",
    dtype: str | None = None,
    allow_download: bool = False,
) -> tuple[ModelHandle, EditMethod]:
    """The base model with the exported editor attached, ready to generate or edit on.

    `dtype` defaults to the one the folder was exported with.
    """
    directory = Path(directory)
    path = directory / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(
            f"{directory} is not an lledit folder (no {MANIFEST}); a plain transformers "
            "folder loads with load_model"
        )
    manifest: dict[str, Any] = json.loads(path.read_text())
    if manifest.get("format") != FORMAT or manifest.get("method") not in METHODS:
        raise ValueError(f"{path}: not an lledit edited-model manifest")
    base = manifest["base_model"]
    handle = load_model(
        None if base == DEFAULT_MODEL else base,
        device=device,
        dtype=dtype or manifest["dtype"],
        allow_download=allow_download,
    )
    editor = make_editor(manifest["method"], handle)
    editor.load(directory)
    return handle, editor
