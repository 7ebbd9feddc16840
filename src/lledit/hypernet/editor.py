"""Editing with a trained hypernetwork: capture, transform, solve, add. Nothing trains here."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import torch

from lledit.data.request import EditRequest
from lledit.hypernet.capture import capture_gradients
from lledit.hypernet.checkpoint import check_fits, load_network, read_meta
from lledit.hypernet.network import Hypernetwork
from lledit.methods.base import WeightDelta, apply_weight_deltas
from lledit.model import ModelHandle
from lledit.tokens import edit_batch


@dataclass
class HypernetEditConfig:
    checkpoint: str | None = None
    """Folder written by `lledit train` for this method and model."""


class HypernetEditor:
    """The editor shared by MEND, MALMEN and RLEdit; they differ in update rule and training.

    Per batch: one forward and backward of the model to capture (k, g), the
    network without gradients (its normaliser frozen), the update, one checked
    addition. Undo subtracts the stored update.
    """

    name: ClassVar[str]
    description: ClassVar[str]
    update_rule: ClassVar[str]
    config_class: ClassVar[type] = HypernetEditConfig
    train_config_class: ClassVar[type]

    def __init__(self, handle: ModelHandle, config: HypernetEditConfig | None = None) -> None:
        self.handle = handle
        self.config = config or HypernetEditConfig()
        self.network: Hypernetwork | None = None
        if self.config.checkpoint is None:
            raise ValueError(
                f"'{self.name}' edits with a trained network: give its folder with "
                f"--checkpoint DIR (or checkpoint=DIR); train one with "
                f"`lledit train --method {self.name} --out DIR`"
            )
        self.meta = read_meta(self.config.checkpoint)
        check_fits(self.meta, self.name, handle.name, self._shapes(self.meta))

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
        editor.handle, editor.config, editor.meta = handle, HypernetEditConfig(), {}
        editor.network = network.eval()
        return editor

    def prepare(self) -> None:
        if self.network is None:
            network, _ = load_network(self.config.checkpoint)
            self.network = network.to(self.handle.device)

    def config_dict(self) -> dict[str, Any]:
        trained = self.meta.get("train_config", {})
        return {**asdict(self.config), "trained_with": trained}

    def apply(self, batch: Sequence[EditRequest]) -> WeightDelta:
        if not batch:
            raise ValueError("an edit batch must hold at least one request")
        self.prepare()
        tokens = edit_batch(self.handle, [r.prompt for r in batch], [r.target_new for r in batch])
        captured = capture_gradients(self.handle, self.network.module_names, tokens)
        with torch.no_grad():
            deltas = self.network.deltas(captured)
        return apply_weight_deltas(self.handle, deltas)
