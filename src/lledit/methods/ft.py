"""FT-L: constrained fine-tuning of one MLP weight on the edit loss.

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

from lledit.data.request import EditRequest
from lledit.methods.base import WeightDelta, apply_weight_deltas
from lledit.model import ModelHandle
from lledit.tokens import edit_batch


@dataclass
class FTConfig:
    """Settings of FT-L; the defaults suit SmolLM2-135M."""

    layer: int | None = None
    """Decoder layer whose MLP output projection is tuned; None: the middle of
    the model's default edit layers (21 of 30 on SmolLM2-135M)."""
    module: str | None = None
    """Full module name to tune instead of `layer` (e.g. `model.layers.3.mlp.up_proj`)."""
    steps: int = 15
    lr: float = 5e-3
    norm_bound: float = 1e-2
    """Largest change allowed to any single weight entry."""

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps must be at least 1, got {self.steps}")
        if not (self.lr > 0 and self.norm_bound > 0):
            raise ValueError(
                f"lr and norm_bound must be positive, got {self.lr}, {self.norm_bound}"
            )


class FineTune:
    name: ClassVar[str] = "ft"
    description: ClassVar[str] = "FT-L: fine-tune one MLP weight, change bounded per entry"
    config_class: ClassVar[type] = FTConfig

    def __init__(self, handle: ModelHandle, config: FTConfig | None = None) -> None:
        self.handle = handle
        self.config = config or FTConfig()
        if self.config.module is not None:
            self.module_name = self.config.module
        else:
            layer = self.config.layer
            if layer is None:
                layers = handle.default_edit_layers
                layer = layers[len(layers) // 2]
            self.module_name = handle.layer_module(layer, handle.arch.mlp_out)
        handle.weight_of(self.module_name)

    def prepare(self) -> None:
        return None

    def config_dict(self) -> dict[str, Any]:
        return {**asdict(self.config), "module": self.module_name}

    def apply(self, batch: Sequence[EditRequest]) -> WeightDelta:
        if not batch:
            raise ValueError("an edit batch must hold at least one request")
        tokens = edit_batch(self.handle, [r.prompt for r in batch], [r.target_new for r in batch])
        weight = self.handle.weight_of(self.module_name)
        delta = torch.zeros(weight.shape, device=weight.device, dtype=torch.float32)
        delta.requires_grad_(True)
        optimizer = torch.optim.Adam([delta], lr=self.config.lr)

        def add_delta(module, inputs, output):
            return output + F.linear(inputs[0], delta.to(inputs[0].dtype))

        hook = self.handle.module(self.module_name).register_forward_hook(add_delta)
        try:
            for _ in range(self.config.steps):
                optimizer.zero_grad(set_to_none=True)
                logits = self.handle.target_logits(tokens)
                loss = F.cross_entropy(logits, tokens.target_ids)
                loss.backward()
                optimizer.step()
                with torch.no_grad():
                    delta.clamp_(-self.config.norm_bound, self.config.norm_bound)
        finally:
            hook.remove()
        return apply_weight_deltas(self.handle, {self.module_name: delta.detach()})
