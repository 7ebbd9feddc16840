"""FT-L: constrained fine-tuning of a few weights (by default one MLP projection) on the edit loss.

The change is trained as a separate delta attached by a forward hook, so the
model's weights are untouched until the finished, checked delta is added in
one step. After every optimiser step the delta is clamped to an L-infinity
ball (`norm_bound`), the constraint of the original FT-L baseline.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from lledit import checks
from lledit.data.request import EditRequest
from lledit.edit import WeightDelta, added_deltas, apply_weight_deltas, trainable_deltas
from lledit.footprint import trained_share, undo_share
from lledit.model import ModelHandle, edit_batch


@dataclass
class FTConfig:
    """Settings of FT-L; the defaults suit SmolLM2-135M."""

    layers: str | None = None
    """Tuned decoder layers, e.g. "21" or "20-22" (see `lledit.layers.parse_layers`);
    None: the first layer of the `upper` band (21 of 30)."""
    part: str = "mlp_out"
    """The weights tuned in each layer (see `lledit.layers.PARTS`)."""
    steps: int = 15
    """Adam steps per batch; chosen with `lr` and `norm_bound` by the sweep in
    `benchmarks/ft_defaults.py` (docs/methods/ft.md)."""
    lr: float = 5e-3
    """Adam learning rate of the delta."""
    norm_bound: float = 1e-2
    """Largest change allowed to any single weight entry."""

    def __post_init__(self) -> None:
        checks.at_least(self, 1, "steps")
        checks.positive(self, "lr", "norm_bound")


class FineTune:
    name: ClassVar[str] = "ft"
    description: ClassVar[str] = "FT-L: fine-tune an MLP weight, change bounded per entry"
    config_class: ClassVar[type] = FTConfig

    def __init__(self, handle: ModelHandle, config: FTConfig | None = None) -> None:
        self.handle = handle
        self.config = config or FTConfig()
        self.modules = handle.edited_modules(
            self.config.layers, self.config.part, "upper", only="first"
        )

    def prepare(self) -> None:
        return None

    def config_dict(self) -> dict[str, Any]:
        return {**asdict(self.config), "modules": self.modules}

    def memory_share(self) -> int:
        """The trained deltas with Adam's state, and the batch's undo record."""
        return trained_share(self.handle, self.modules) + undo_share(self.handle, self.modules)

    def apply(self, batch: Sequence[EditRequest]) -> WeightDelta:
        if not batch:
            raise ValueError("an edit batch must hold at least one request")
        tokens = edit_batch(self.handle, [r.prompt for r in batch], [r.target_new for r in batch])
        deltas = trainable_deltas(self.handle, self.modules)
        optimizer = torch.optim.Adam(deltas.values(), lr=self.config.lr)
        with added_deltas(self.handle, deltas):
            for _ in range(self.config.steps):
                optimizer.zero_grad(set_to_none=True)
                logits = self.handle.target_logits(tokens)
                loss = F.cross_entropy(logits, tokens.target_ids)
                loss.backward()
                optimizer.step()
                with torch.no_grad():
                    for delta in deltas.values():
                        delta.clamp_(-self.config.norm_bound, self.config.norm_bound)
        return apply_weight_deltas(
            self.handle, {name: delta.detach() for name, delta in deltas.items()}
        )
