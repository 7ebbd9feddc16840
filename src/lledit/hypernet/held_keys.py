"""Earlier batches' keys held in each edited module's least-squares ridge.

With keys K_p held at weight w, a batch's update solves
(KᵀK + e^λ C + w K_pᵀK_p)⁻¹ KᵀD instead of (KᵀK + e^λ C)⁻¹ KᵀD, so it
leaves the outputs of the earlier batches' keys alone (AlphaEdit keeps its
earlier edits' keys the same way). The solve takes P = (C + w e^-λ K_pᵀK_p)⁻¹
in place of C⁻¹.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch

from lledit.edit import HeldBatches
from lledit.hypernet.network import Hypernetwork, ModuleShape
from lledit.hypernet.update import precision_with_keys


class HeldKeys:
    """The keys held so far and each module's P with them (float64)."""

    def __init__(self, network: Hypernetwork, weight: float, device: torch.device | str) -> None:
        self.check(network.update_rule, weight)
        self.network = network
        self.weight = weight
        self.device = device
        self._held = HeldBatches(self._reset, self._add)
        """Each held batch's keys, in the order held; S and P are formed again by
        holding the remaining batches in order when one is released, which is
        also more precise than taking its keys out by the Woodbury identity."""

    @torch.no_grad()
    def _reset(self) -> None:
        self.precisions = {m.name: self._unheld(m) for m in self.network.modules_edited}

    @staticmethod
    def check(update_rule: str, weight: float) -> None:
        """Refuse a weight that cannot be used: below zero, or with no ridge to hold keys in."""
        if not (math.isfinite(weight) and weight >= 0):
            raise ValueError(f"earlier_keys_weight must be >= 0, got {weight}")
        if weight and update_rule != "least_squares":
            raise ValueError(
                f"earlier_keys_weight holds keys in the least-squares ridge; "
                f"the {update_rule} update has none"
            )

    def _unheld(self, module: ModuleShape) -> torch.Tensor:
        precision = self.network.key_precision(module.name)
        if precision is None:
            return torch.eye(module.d_in, dtype=torch.float64, device=self.device)
        return precision.detach().double().to(self.device)

    def _key_weights(self) -> list[float]:
        """A held key's weight against each module's ridge e^λ: w e^-λ."""
        return (self.weight / self.network.log_ridge.detach().exp()).tolist()

    def hold(self, keys: Mapping[str, torch.Tensor]) -> Callable[[], None]:
        """Add one batch's keys (tokens, d_in) in every module; returns what lets go of them."""
        return self._held.hold(keys)

    @torch.no_grad()
    def _add(self, keys: Mapping[str, torch.Tensor]) -> None:
        for module, weight in zip(self.network.modules_edited, self._key_weights(), strict=True):
            name, module_keys = module.name, keys[module.name].double()
            self.precisions[name] = precision_with_keys(self.precisions[name], module_keys, weight)
