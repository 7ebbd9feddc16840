"""UltraEdit: a closed-form update from keys and gradients under lifelong normalisation.

Gu et al., "UltraEdit: Training-, Subject-, and Memory-Free Lifelong Editing
in Large Language Models", 2025. No training, no subject, no memory beside
the model: one forward and backward pass per batch gives, for every edited
projection, the keys k (its input) and value gradients g (the loss's
gradient at its output) at the positions that predict the targets. The
features [k, g] are normalised with statistics kept across the whole stream
(lifelong normalisation: count, mean and spread of every feature seen so
far, the batch included), each key's pseudo value is v = -lr ‖k̂‖² ĝ, and
the update is the ridge least-squares map from the keys to those values,
ΔW = ((KᵀK + ridge·I)⁻¹ KᵀV)ᵀ.

The statistics are merged batch by batch with Chan et al.'s pairwise formula
in float64 (the reference code's running update mixes an unbiased variance
into the sum of squares, which it should not), one set per edited module.
They are formed again from the batches still held when one is undone, so
they always equal those of an editor that never saw the undone batch, and
each batch's own statistics are what a journal keeps of it.
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
from lledit.footprint import undo_share
from lledit.hypernet.capture import capture_gradients
from lledit.model import ModelHandle, edit_batch
from lledit.moments import Moments, feature_moments, merged_moments

EPSILON = torch.finfo(torch.float32).eps
"""Added to every feature's spread before dividing by it."""


@dataclass
class UltraEditConfig:
    """Settings of UltraEdit; the defaults suit SmolLM2-135M (docs/methods/ultraedit.md)."""

    layers: str | None = None
    """Edited decoder layers (see `lledit.layers.parse_layers`); None: the `upper`
    band (21-26 of 30), the band lledit's hypernetwork editors edit."""
    part: str = "mlp_out"
    """The projections edited in each layer (see `lledit.layers.PARTS`)."""
    lr: float = 3e-4
    """Step size of the pseudo values v = -lr ‖k̂‖² ĝ. Over 1000 zsRE edits on
    SmolLM2, 1e-3 (best over 50) wore the model down to an efficacy of 0.30;
    3e-4 kept 0.64, 1e-4 0.55 (docs/methods/ultraedit.md)."""
    ridge: float = 1.0
    """λ of the least-squares map from keys to pseudo values, (KᵀK + λI)⁻¹KᵀV;
    the reference code's identity."""

    def __post_init__(self) -> None:
        checks.positive(self, "lr", "ridge")


PARTS = ("count", "mean", "squares")
"""How a batch's `Moments` are named in what a journal keeps of it."""


def normalised(features: torch.Tensor, statistics: Moments) -> torch.Tensor:
    """(features - mean) / (spread + ε), with the spread the sample standard deviation."""
    count, mean, squares = statistics
    spread = (squares / (count - 1).clamp(min=1)).sqrt()
    return (features.double() - mean) / (spread + EPSILON)


class UltraEdit:
    name: ClassVar[str] = "ultraedit"
    description: ClassVar[str] = (
        "UltraEdit: closed-form update from keys and gradients, lifelong normalisation"
    )
    config_class: ClassVar[type] = UltraEditConfig

    def __init__(self, handle: ModelHandle, config: UltraEditConfig | None = None) -> None:
        self.handle = handle
        self.config = config or UltraEditConfig()
        self.modules = handle.edited_modules(self.config.layers, self.config.part, "upper")
        self.statistics: dict[str, Moments] = {}
        """Per module, the statistics of every held batch's features together."""
        self._held = HeldBatches(self._no_statistics, self._add)
        """Each held batch's own statistics, per module, in the order applied."""

    def prepare(self) -> None:
        return None

    def config_dict(self) -> dict[str, Any]:
        return {**asdict(self.config), "modules": self.modules}

    def memory_share(self) -> int:
        """The batch's undo record: the statistics are per feature and the
        solve is tokens by tokens, small beside it."""
        return undo_share(self.handle, self.modules)

    @torch.no_grad()
    def _shift(self, keys: torch.Tensor, value_grads: torch.Tensor, stats: Moments):
        """ΔW (d_out, d_in) mapping each key to its pseudo value."""
        features = normalised(torch.cat([keys, value_grads], dim=-1), stats)
        keys_hat, grads_hat = features.split([keys.shape[1], value_grads.shape[1]], dim=-1)
        values = -self.config.lr * (keys_hat**2).sum(dim=-1, keepdim=True) * grads_hat
        # (KᵀK + rI)⁻¹KᵀV = Kᵀ(KKᵀ + rI)⁻¹V: the tokens x tokens form of the
        # same solve, far smaller than d_in x d_in (205M entries at d_in = 14336).
        keys = keys.double()
        system = keys @ keys.T
        system.diagonal().add_(self.config.ridge)
        return (keys.T @ torch.linalg.solve(system, values.double())).T.float()

    def apply(self, batch: Sequence[EditRequest]) -> WeightDelta:
        if not batch:
            raise ValueError("an edit batch must hold at least one request")
        tokens = edit_batch(self.handle, [r.prompt for r in batch], [r.target_new for r in batch])
        captured = capture_gradients(self.handle, self.modules, tokens)
        deltas, held = {}, {}
        for name in self.modules:
            keys, value_grads = captured[name].keys, captured[name].value_grads
            own = feature_moments(torch.cat([keys, value_grads], dim=-1))
            held |= {f"{name}.{part}": value for part, value in zip(PARTS, own, strict=True)}
            stats = merged_moments(self.statistics.get(name), own)
            deltas[name] = self._shift(keys, value_grads, stats)
        hold = functools.partial(self.hold, requests=batch)
        return apply_weight_deltas(self.handle, deltas, held=held, hold=hold)

    def hold(
        self, held: dict[str, torch.Tensor], requests: Sequence[EditRequest]
    ) -> Callable[[], None]:
        """Count a batch's features in the statistics: one just applied, or a journaled
        one after a restart (its statistics are all it needs, not its `requests`).
        Returns what takes them out again."""
        return self._held.hold(held)

    def _no_statistics(self) -> None:
        self.statistics = {}

    def _add(self, held: dict[str, torch.Tensor]) -> None:
        for name in self.modules:
            own = tuple(held[f"{name}.{part}"] for part in PARTS)
            self.statistics[name] = merged_moments(self.statistics.get(name), own)
