"""Hypernetwork checkpoints: safetensors for tensors, JSON for everything else.

A checkpoint directory holds `network.safetensors` (the network with its
normaliser statistics), `optimizer.safetensors` plus the optimizer's settings in
`checkpoint.json`, and `checkpoint.json` (method, model, edited modules with
their shapes, training config, training data with its sha256, progress).
Files are written under temporary names and renamed into place, JSON last, so
an interrupted save leaves the previous checkpoint readable.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from lledit.hypernet.network import Hypernetwork, ModuleShape

FORMAT_VERSION = 1
META_FILE = "checkpoint.json"
NETWORK_FILE = "network.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"


class CheckpointError(ValueError):
    """A checkpoint is missing, damaged, or does not fit the model or method."""


def _replace(write, path: Path) -> None:
    partial = path.with_name(path.name + ".partial")
    write(partial)
    os.replace(partial, path)


def save_checkpoint(
    directory: str | Path,
    network: Hypernetwork,
    meta: dict[str, Any],
    optimizer: torch.optim.Optimizer | None = None,
) -> None:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {name: tensor.detach().contiguous() for name, tensor in network.state_dict().items()}
    _replace(lambda path: save_file(state, str(path)), directory / NETWORK_FILE)
    meta = {
        **meta,
        "format": FORMAT_VERSION,
        "update_rule": network.update_rule,
        "key_ridge": network.key_ridge,
        "null_space_threshold": network.null_space_threshold,
        "modules": [vars(module) for module in network.modules_edited],
    }
    if optimizer is not None:
        tensors, settings = _optimizer_tensors(optimizer)
        _replace(lambda path: save_file(tensors, str(path)), directory / OPTIMIZER_FILE)
        meta["optimizer"] = settings
    text = json.dumps(meta, indent=2) + "\n"
    _replace(lambda path: path.write_text(text), directory / META_FILE)


def read_meta(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / META_FILE
    if not path.is_file():
        raise CheckpointError(
            f"no checkpoint in {directory}: {META_FILE} is missing "
            "(train one with `lledit train --method ... --out DIR`)"
        )
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{path} is not valid JSON: {error}") from None
    if meta.get("format") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has format {meta.get('format')!r}; this lledit reads format {FORMAT_VERSION}"
        )
    for key in ("method", "model", "modules", "update_rule", "rank", "n_blocks"):
        if key not in meta:
            raise CheckpointError(f"{path} lacks the field '{key}'")
    return meta


def load_network(directory: str | Path) -> tuple[Hypernetwork, dict[str, Any]]:
    """The trained network (in eval mode, normaliser frozen) and the checkpoint's metadata."""
    meta = read_meta(directory)
    modules = [ModuleShape(**module) for module in meta["modules"]]
    network = Hypernetwork(
        modules,
        meta["rank"],
        meta["n_blocks"],
        meta["update_rule"],
        key_ridge=meta.get("key_ridge", False),
        null_space_threshold=meta.get("null_space_threshold", 0.0),
    )
    path = Path(directory) / NETWORK_FILE
    try:
        state = load_file(str(path))
    except (FileNotFoundError, SafetensorError, OSError) as error:
        raise CheckpointError(f"cannot read {path}: {error}") from None
    try:
        network.load_state_dict(state)
    except RuntimeError as error:
        raise CheckpointError(f"{path} does not match {META_FILE}: {error}") from None
    return network.eval(), meta


def check_fits(
    meta: dict[str, Any], method: str, model_name: str, shapes: dict[str, tuple]
) -> None:
    """Refuse a checkpoint trained for another method, model, or module shapes."""
    if meta["method"] != method:
        raise CheckpointError(f"the checkpoint was trained for '{meta['method']}', not '{method}'")
    if meta["model"] != model_name:
        raise CheckpointError(
            f"the checkpoint was trained on model '{meta['model']}', not '{model_name}'"
        )
    for module in meta["modules"]:
        expected = (module["d_out"], module["d_in"])
        found = shapes.get(module["name"])
        if found != expected:
            what = "is missing" if found is None else f"has shape {found}"
            raise CheckpointError(
                f"the checkpoint edits '{module['name']}' of shape {expected}; "
                f"in this model it {what}"
            )


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    state = optimizer.state_dict()
    tensors = {}
    for index, values in state["state"].items():
        for key, value in values.items():
            tensors[f"{index}.{key}"] = torch.as_tensor(value).detach().clone().contiguous()
    return tensors, {"param_groups": state["param_groups"]}


def load_optimizer(directory: str | Path, optimizer: torch.optim.Optimizer) -> None:
    meta = read_meta(directory)
    path = Path(directory) / OPTIMIZER_FILE
    if "optimizer" not in meta:
        raise CheckpointError(f"{directory} holds no optimizer state to resume from")
    try:
        tensors = load_file(str(path))
    except (FileNotFoundError, SafetensorError, OSError) as error:
        raise CheckpointError(f"cannot read {path}: {error}") from None
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["optimizer"]["param_groups"]})
