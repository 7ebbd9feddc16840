"""Editing with a trained hypernetwork: capture, transform, solve, add. Nothing trains here."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import torch

from lledit.data.request import EditRequest
from lledit.hypernet.capture import capture_gradients
from lledit.hypernet.checkpoint import check_fits, load_network, read_meta
from lledit.hypernet.network import Hypernetwork, ModuleShape
from lledit.hypernet.update import precision_with_keys
from lledit.methods.base import WeightDelta, apply_weight_deltas
from lledit.model import ModelHandle
from lledit.tokens import edit_batch


@dataclass
class HypernetEditConfig:
    checkpoint: str | None = None
    """Folder written by `lledit train` for this method and model."""
    earlier_keys_weight: float = 0.0
    """Least-squares rule only: each batch's update also keeps the outputs of
    every earlier batch's keys, each weighted this much against fitting one
    of its own (AlphaEdit's earlier-edit keys, here in the ridge); 0: every
    batch is solved on its own, as in MALMEN and RLEdit."""

    def __post_init__(self) -> None:
        weight = self.earlier_keys_weight
        if not (math.isfinite(weight) and weight >= 0):
            raise ValueError(f"earlier_keys_weight must be >= 0, got {weight}")


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
        if self.config.earlier_keys_weight and self.update_rule != "least_squares":
            raise ValueError(
                f"earlier_keys_weight holds keys in the least-squares ridge; "
                f"'{self.name}' has no ridge"
            )
        self.meta = read_meta(self.config.checkpoint)
        check_fits(self.meta, self.name, handle.name, self._shapes(self.meta))
        self._key_precisions: dict[str, torch.Tensor] = {}
        self._held_keys: dict[str, torch.Tensor] = {}
        """Per module, Σ kkᵀ over the held batches' keys (float64)."""

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
        editor._key_precisions, editor._held_keys = {}, {}
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
            deltas = self.network.deltas(captured, self._held_precisions())
        if not self.config.earlier_keys_weight:
            return apply_weight_deltas(self.handle, deltas)
        keys = {name: captured[name].keys for name in deltas}
        applied = apply_weight_deltas(self.handle, deltas, on_undo=lambda: self._release(keys))
        self._hold(keys)  # only a batch that was applied
        return applied

    def _unheld_precision(self, module: ModuleShape) -> torch.Tensor:
        precision = self.network.key_precision(module.name)
        if precision is None:
            return torch.eye(module.d_in, dtype=torch.float64, device=self.handle.device)
        return precision.double()

    def _held_precisions(self) -> dict[str, torch.Tensor] | None:
        """Per module, the ridge's P with every held batch's keys (float64)."""
        if not self.config.earlier_keys_weight:
            return None
        if not self._key_precisions:
            for module in self.network.modules_edited:
                self._key_precisions[module.name] = self._unheld_precision(module)
                self._held_keys[module.name] = torch.zeros_like(self._key_precisions[module.name])
        return self._key_precisions

    def _key_weights(self) -> list[float]:
        """A held key's weight against each module's ridge e^λ: w e^-λ."""
        return (self.config.earlier_keys_weight / self.network.log_ridge.exp()).tolist()

    @torch.no_grad()
    def _hold(self, keys: dict[str, torch.Tensor]) -> None:
        precisions = self._held_precisions()
        for module, weight in zip(self.network.modules_edited, self._key_weights(), strict=True):
            name, module_keys = module.name, keys[module.name].double()
            self._held_keys[name] += module_keys.T @ module_keys
            precisions[name] = precision_with_keys(precisions[name], module_keys, weight)

    @torch.no_grad()
    def _release(self, keys: dict[str, torch.Tensor]) -> None:
        """Forget an undone batch's keys: P = (C + w e^-λ S)⁻¹ again from C and
        the keys still held (S), since taking them out by the Woodbury identity
        loses precision when a held key outweighs the ridge many times over."""
        for module, weight in zip(self.network.modules_edited, self._key_weights(), strict=True):
            name, module_keys = module.name, keys[module.name].double()
            self._held_keys[name] -= module_keys.T @ module_keys
            unheld = self._unheld_precision(module)
            identity = torch.eye(module.d_in, dtype=torch.float64, device=unheld.device)
            system = identity + weight * unheld @ self._held_keys[name]
            self._key_precisions[name] = torch.linalg.solve(system, unheld)
