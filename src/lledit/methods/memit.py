"""MEMIT: many facts written at once into the MLP output projections of a few layers.

Target hidden states are found for every edit of a batch, and the change is
spread over the edited layers with the closed form
ΔW = R Kᵀ (λC₀ + K Kᵀ)⁻¹, C₀ the second moment of keys over generic text
(Meng et al., "Mass-Editing Memory in a Transformer", ICLR 2023).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import torch

from lledit import checks
from lledit.data.request import EditRequest
from lledit.edit import WeightDelta, apply_weight_deltas
from lledit.footprint import closed_form_share
from lledit.locate import LocateConfig, Locator
from lledit.model import ModelHandle


def memit_delta(
    residual: torch.Tensor, keys: torch.Tensor, covariance: torch.Tensor, weight: float
) -> torch.Tensor:
    """ΔW = R Kᵀ (λC + K Kᵀ)⁻¹ (MEMIT), solved in float64, returned in float32.

    It minimises ‖ΔW K - R‖² + λ tr(ΔW C ΔWᵀ): fit the new keys while moving
    the outputs of ordinary keys (second moment C) as little as possible.
    """
    k = keys.double()
    system = weight * covariance.to(k) + k @ k.T
    return torch.linalg.solve(system, k @ residual.double().T).T.float()


@dataclass
class MEMITConfig(LocateConfig):
    """Settings of MEMIT (see `LocateConfig` for the shared ones)."""

    mom2_weight: float = 2000.0
    """λ: how strongly the outputs of ordinary keys are held in place. MEMIT
    used 15000 on 16k-wide MLPs; scaled down for SmolLM2's 1536-wide one,
    not swept (docs/methods/memit.md)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        checks.positive(self, "mom2_weight")


class MEMIT:
    name: ClassVar[str] = "memit"
    description: ClassVar[str] = "MEMIT: closed-form update of the MLP outputs of a few layers"
    config_class: ClassVar[type] = MEMITConfig

    def __init__(self, handle: ModelHandle, config: MEMITConfig | None = None) -> None:
        self.handle = handle
        self.config = config or MEMITConfig()
        self.locator = Locator(handle, self.config)
        self._covariances: dict[str, torch.Tensor] | None = None

    def prepare(self) -> None:
        """Compute or load the key statistics and sample the prefixes."""
        if self._covariances is None:
            self._covariances = self.locator.covariances()
        self.locator.prepare()

    def config_dict(self) -> dict[str, Any]:
        return {**asdict(self.config), **self.locator.describe()}

    def memory_share(self) -> int:
        """C of every module held while editing (see `closed_form_share`)."""
        return closed_form_share(self.handle, self.locator.modules, held=1)

    def _solve(self, module: str, keys: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        assert self._covariances is not None
        return memit_delta(residual, keys, self._covariances[module], self.config.mom2_weight)

    def apply(self, batch: Sequence[EditRequest]) -> WeightDelta:
        if not batch:
            raise ValueError("an edit batch must hold at least one request")
        self.prepare()
        return apply_weight_deltas(self.handle, self.locator.deltas(batch, self._solve))
