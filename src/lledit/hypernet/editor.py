"""Editing with a trained hypernetwork: capture, transform, solve, add. Nothing trains here."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from lledit.data.request import EditRequest
from lledit.edit import WeightDelta, apply_weight_deltas
from lledit.footprint import FLOAT32, FLOAT64, squares, undo_share
from lledit.hypernet.capture import capture_gradients, keys_of
from lledit.hypernet.checkpoint import NETWORK_FILE, check_fits, load_network, read_meta
from lledit.hypernet.held_keys import HeldKeys
from lledit.hypernet.network import Hypernetwork, check_null_space_threshold
from lledit.model import ModelHandle, bytes_of, edit_batch


@dataclass
class HypernetEditConfig:
    checkpoint: str | None = None
    """Folder written by `lledit train` for this method and model."""
    earlier_keys_weight: float = 0.0
    """Least-squares rule only: each batch's update also keeps the outputs of
    every earlier batch's keys, each weighted this much against fitting one
    of its own (AlphaEdit's earlier-edit keys, here in the ridge); 0: every
    batch is solved on its own, as in the MALMEN and RLEdit papers."""
    null_space_threshold: float | None = None
    """Networks with key statistics only: project every update onto the null
    space of ordinary keys at this threshold (`HypernetTrainConfig`'s setting
    of the same name); None: as the network was trained."""


class HypernetEditor:
    """The editor shared by MEND, MALMEN and RLEdit; they differ in update rule and training.

    Per batch: one forward and backward of the model to capture (k, g), the
    network without gradients (its normaliser frozen), the update, one checked
    addition. Undo subtracts the stored update. With `earlier_keys_weight`
    the editor holds the keys of the batches it applied (undo releases them);
    a new editor, such as a service restarted from its journal, starts
    without them.
    """

    name: ClassVar[str]
    description: ClassVar[str]
    update_rule: ClassVar[str]
    config_class: ClassVar[type] = HypernetEditConfig
    train_config_class: ClassVar[type]

    def __init__(self, handle: ModelHandle, config: HypernetEditConfig | None = None) -> None:
        self.handle = handle
        self.config = config or self.config_class()
        self.network: Hypernetwork | None = None
        if self.config.checkpoint is None:
            raise ValueError(
                f"'{self.name}' edits with a trained network: give its folder with "
                f"--checkpoint DIR (or checkpoint=DIR); train one with "
                f"`lledit train --method {self.name} --out DIR`"
            )
        HeldKeys.check(self.update_rule, self.config.earlier_keys_weight)
        self.meta = read_meta(self.config.checkpoint)
        if self.config.null_space_threshold is not None:
            key_ridge = bool(self.meta.get("key_ridge"))
            check_null_space_threshold(self.config.null_space_threshold, key_ridge)
        check_fits(self.meta, self.name, handle.name, self._shapes(self.meta))
        self.modules = [module["name"] for module in self.meta["modules"]]
        self.held: HeldKeys | None = None
        """The keys of the batches applied so far (with `earlier_keys_weight`)."""

    def _shapes(self, meta: dict[str, Any]) -> dict[str, tuple[int, int]]:
        shapes = {}
        for module in meta["modules"]:
            try:
                shapes[module["name"]] = tuple(self.handle.weight_of(module["name"]).shape)
            except (KeyError, TypeError):
                continue
        return shapes

    @classmethod
    def from_network(cls, handle: ModelHandle, network: Hypernetwork) -> HypernetEditor:
        """An editor around a network in memory (used to validate during training)."""
        editor = cls.__new__(cls)
        editor.handle, editor.config, editor.meta = handle, cls.config_class(), {}
        editor.held = None
        editor.network = network.eval()
        editor.modules = list(network.module_names)
        return editor

    def prepare(self) -> None:
        if self.network is None:
            network, _ = load_network(self.config.checkpoint)
            if self.config.null_space_threshold is not None:
                network.project_updates(self.config.null_space_threshold)
            self.network = network.to(self.handle.device)

    @property
    def trained_style(self) -> str | None:
        """The style ("qa", "counterfact") of the data the network was trained on, if recorded."""
        return self.meta.get("data", {}).get("style")

    def config_dict(self) -> dict[str, Any]:
        trained = self.meta.get("train_config", {})
        return {**asdict(self.config), "modules": self.modules, "trained_with": trained}

    def memory_share(self) -> int:
        """The network (its file's size until it is loaded), the held keys' P of
        every module (float64), the null-space projectors (float32, each formed
        in float64) and the batch's undo record."""
        sizes = squares(self.handle, self.modules)
        if self.network is None:
            share = (Path(self.config.checkpoint) / NETWORK_FILE).stat().st_size
        else:
            share = bytes_of([*self.network.parameters(), *self.network.buffers()])
        if self.config.earlier_keys_weight:
            share += FLOAT64 * sum(sizes)
        if self.config.null_space_threshold is not None:
            share += FLOAT32 * sum(sizes) + 3 * FLOAT64 * max(sizes)
        return share + undo_share(self.handle, self.modules)

    def apply(self, batch: Sequence[EditRequest]) -> WeightDelta:
        if not batch:
            raise ValueError("an edit batch must hold at least one request")
        self.prepare()
        tokens = edit_batch(self.handle, [r.prompt for r in batch], [r.target_new for r in batch])
        captured = capture_gradients(self.handle, self.network.module_names, tokens)
        held = self._held_keys() if self.config.earlier_keys_weight else None
        with torch.no_grad():
            deltas = self.network.deltas(captured, None if held is None else held.precisions)
        if held is None:
            return apply_weight_deltas(self.handle, deltas)
        hold = functools.partial(self.hold, requests=batch)
        return apply_weight_deltas(self.handle, deltas, held=keys_of(captured), hold=hold)

    def _held_keys(self) -> HeldKeys:
        """The keys held so far, made on first use."""
        self.prepare()
        if self.held is None:
            self.held = HeldKeys(self.network, self.config.earlier_keys_weight, self.handle.device)
        return self.held

    def hold(
        self, keys: dict[str, torch.Tensor], requests: Sequence[EditRequest]
    ) -> Callable[[], None]:
        """Hold a batch's keys in the ridge: one just applied, or a journaled one
        after a restart (the keys are all it needs, not the `requests`).
        Returns what releases them."""
        if not keys:  # a batch applied without holding keys (earlier_keys_weight 0)
            return lambda: None
        return self._held_keys().hold(keys)
