"""AlphaEdit: MEMIT's update projected onto the null space of preserved knowledge.

The update is restricted to directions that keys of ordinary text do not use
(P, from the small eigenvalues of their second moment C₀), so what the model
already knows is left alone, and the keys of all earlier edits are kept in the
objective so later batches disturb them as little as possible:
ΔW = R Kᵀ P ((K_p K_pᵀ + K Kᵀ) P + l2·I)⁻¹ (Fang et al., "AlphaEdit:
Null-Space Constrained Knowledge Editing for Language Models", ICLR 2025).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import torch

from lledit import checks
from lledit.data.request import EditRequest
from lledit.edit import HeldBatches, WeightDelta, apply_weight_deltas
from lledit.footprint import closed_form_share
from lledit.locate import LocateConfig, Locator
from lledit.model import ModelHandle
from lledit.stats import null_space_projection


def alphaedit_delta(
    residual: torch.Tensor,
    keys: torch.Tensor,
    projection: torch.Tensor,
    past: torch.Tensor,
    l2: float,
) -> torch.Tensor:
    """ΔW = R Kᵀ P ((K_p K_pᵀ + K Kᵀ) P + l2·I)⁻¹ P (AlphaEdit), in float64, returned in float32.

    `past` is K_p K_pᵀ, the keys of earlier edits. The result minimises
    ‖ΔW K - R‖² + ‖ΔW K_p‖² + l2‖ΔW‖² over updates of the form ΔW P, so keys
    outside P's range are left exactly alone and earlier edits' keys are
    disturbed as little as the new fit allows. Formed in float64 too: in
    float32 the d_in-long sums would round differently with another thread
    count, and a journal restarted with other threads would not continue its
    run exactly.
    """
    k = keys.double()
    p = projection.to(k)
    system = p @ (past.to(k) + k @ k.T)
    system.diagonal().add_(l2)  # + l2·I, without a d_in x d_in identity
    return (torch.linalg.solve(system, p @ k @ residual.double().T).T @ p).float()


@dataclass
class AlphaEditConfig(LocateConfig):
    """Settings of AlphaEdit (see `LocateConfig` for the shared ones)."""

    null_space_threshold: float = 1e-2
    """Eigen-directions of C₀ with eigenvalues below this fraction of the largest
    form the null space the update may use; not swept on this model
    (docs/methods/alphaedit.md)."""
    l2: float = 10.0
    """Weight of ‖ΔW‖² in the objective (AlphaEdit's identity term)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        checks.fraction(self, "null_space_threshold")
        checks.positive(self, "l2")


class AlphaEdit:
    name: ClassVar[str] = "alphaedit"
    description: ClassVar[str] = (
        "AlphaEdit: MEMIT-style update in the null space of preserved and earlier-edited keys"
    )
    config_class: ClassVar[type] = AlphaEditConfig

    def __init__(self, handle: ModelHandle, config: AlphaEditConfig | None = None) -> None:
        self.handle = handle
        self.config = config or AlphaEditConfig()
        self.locator = Locator(handle, self.config)
        self.projections: dict[str, torch.Tensor] | None = None
        """P per edited module."""
        self.past_keys: dict[str, torch.Tensor] = {}
        """K_p K_pᵀ per module: the keys of every batch held, summed in order."""
        self._held = HeldBatches(self._no_keys, self._add_grams)
        """Each held batch's keys, (d_in, edits) per module, in the order applied."""
        self._pending: dict[str, torch.Tensor] = {}

    def prepare(self) -> None:
        """Compute or load the key statistics, derive P, and sample the prefixes."""
        if self.projections is None:
            self.projections = {
                module: null_space_projection(covariance, self.config.null_space_threshold)
                for module, covariance in self.locator.covariances().items()
            }
        self.locator.prepare()

    def config_dict(self) -> dict[str, Any]:
        return {**asdict(self.config), **self.locator.describe()}

    def memory_share(self) -> int:
        """P and the earlier keys' K_p K_pᵀ of every module held while editing
        (see `closed_form_share`)."""
        return closed_form_share(self.handle, self.locator.modules, held=2)

    def _solve(self, module: str, keys: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        assert self.projections is not None
        projection = self.projections[module]
        past = self.past_keys.get(module)
        if past is None:
            past = torch.zeros_like(projection)
        self._pending[module] = keys
        return alphaedit_delta(residual, keys, projection, past, self.config.l2)

    def apply(self, batch: Sequence[EditRequest]) -> WeightDelta:
        if not batch:
            raise ValueError("an edit batch must hold at least one request")
        self.prepare()
        self._pending = {}
        deltas = self.locator.deltas(batch, self._solve)
        hold = functools.partial(self.hold, requests=batch)
        return apply_weight_deltas(self.handle, deltas, held=self._pending, hold=hold)

    def hold(
        self, keys: dict[str, torch.Tensor], requests: Sequence[EditRequest]
    ) -> Callable[[], None]:
        """Protect a batch's keys: one just applied, or a journaled one after a restart.

        The keys are all that later batches need of it, not its `requests`."""
        return self._held.hold(keys)

    def _no_keys(self) -> None:
        self.past_keys = {}

    def _add_grams(self, keys: dict[str, torch.Tensor]) -> None:
        for module, module_keys in keys.items():
            gram = _gram(module_keys)
            past = self.past_keys.get(module)
            self.past_keys[module] = gram if past is None else past + gram


def _gram(keys: torch.Tensor) -> torch.Tensor:
    """K Kᵀ in float32 for keys (d_in, n); the same keys always give the same bits."""
    keys = keys.float()
    return keys @ keys.T
