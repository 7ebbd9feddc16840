"""The hypernetwork: pseudo keys and pseudo gradients from captured (k, g) pairs.

One small residual network per module shape serves every edited module of that
shape; a per-module scale and shift in each block tell the modules apart. The
inputs are normalised by per-module running statistics that move at each
optimizer step while training and are frozen at edit time.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lledit.hypernet.capture import Captured
from lledit.hypernet.update import least_squares_update, mend_update, value_differences
from lledit.moments import Moments, feature_moments, merged_moments
from lledit.stats import null_space_projection

UPDATE_RULES = ("mend", "least_squares")
KEY_RIDGE_FLOOR = 1e-3


def check_null_space_threshold(threshold: float, key_ridge: bool) -> None:
    """Refuse a projection threshold outside [0, 1), or one without key statistics."""
    if not (math.isfinite(threshold) and 0 <= threshold < 1):
        raise ValueError(f"null_space_threshold must be in [0, 1), got {threshold}")
    if threshold and not key_ridge:
        raise ValueError(
            "null_space_threshold projects updates by the key statistics of key_ridge; "
            "the network has none"
        )


@dataclass(frozen=True)
class ModuleShape:
    """An edited module and its weight's (d_out, d_in) shape."""

    name: str
    d_out: int
    d_in: int


class RunningNormaliser(nn.Module):
    """Per-module mean and standard deviation of the inputs, moved only in training mode.

    In training mode each input's moments are set aside and merged into the
    statistics at the next optimizer step (`commit`), so every input of one
    step is normalised alike, whichever trajectory or process it came from,
    and processes training together stay identical. The merge is exact
    (`lledit.moments`) and the variance the unbiased one; in eval mode nothing
    moves, so the same input always gives the same output at edit time.
    """

    def __init__(self, n_modules: int, dim: int) -> None:
        super().__init__()
        self.register_buffer("count", torch.zeros(n_modules, dtype=torch.float64))
        self.register_buffer("mean", torch.zeros(n_modules, dim, dtype=torch.float64))
        self.register_buffer("sum_squares", torch.zeros(n_modules, dim, dtype=torch.float64))
        self.pending: dict[int, Moments] = {}
        """Per module, the moments of the inputs seen since the last `commit`."""

    @torch.no_grad()
    def update(self, index: int, values: torch.Tensor) -> None:
        """Merge `values` into module `index`'s statistics now."""
        self._merge(index, feature_moments(values))

    @torch.no_grad()
    def _merge(self, index: int, moments: Moments) -> None:
        current = (self.count[index], self.mean[index], self.sum_squares[index])
        count, mean, squares = merged_moments(current, moments)
        self.count[index], self.mean[index], self.sum_squares[index] = count, mean, squares

    @torch.no_grad()
    def commit(self, pending: Sequence[dict[int, Moments]]) -> None:
        """Merge the moments set aside, of this process or of each in rank order."""
        for moments_of_modules in pending:
            for index, moments in sorted(moments_of_modules.items()):
                self._merge(index, moments)
        self.pending = {}

    def forward(self, index: int, values: torch.Tensor) -> torch.Tensor:
        if self.training:
            own = feature_moments(values.detach())
            self.pending[index] = merged_moments(self.pending.get(index), own)
        count = self.count[index]
        if count < 2:
            return values - self.mean[index].float()
        std = (self.sum_squares[index] / (count - 1)).sqrt().float()
        return (values - self.mean[index].float()) / (std + 1e-6)


class ShapeNetwork(nn.Module):
    """n residual blocks `y + scale[m] * (relu(y A + b) B) + shift[m]` of rank r.

    A is random and B zero, so the network starts as the identity while B
    still receives a gradient.
    """

    def __init__(self, dim: int, n_modules: int, rank: int, n_blocks: int) -> None:
        super().__init__()
        self.down = nn.Parameter(torch.randn(n_blocks, dim, rank) / dim**0.5)
        self.bias = nn.Parameter(torch.zeros(n_blocks, rank))
        self.up = nn.Parameter(torch.zeros(n_blocks, rank, dim))
        self.scale = nn.Parameter(torch.ones(n_blocks, n_modules, dim))
        self.shift = nn.Parameter(torch.zeros(n_blocks, n_modules, dim))
        self.normaliser = RunningNormaliser(n_modules, dim)

    def forward(self, index: int, inputs: torch.Tensor) -> torch.Tensor:
        hidden = self.normaliser(index, inputs)
        for block in range(self.down.shape[0]):
            low_rank = torch.relu(hidden @ self.down[block] + self.bias[block]) @ self.up[block]
            hidden = hidden + self.scale[block, index] * low_rank + self.shift[block, index]
        return hidden


class Hypernetwork(nn.Module):
    """Maps each edited module's captured (k, g) to a weight update.

    `log_lr` (η) and `log_ridge` (λ) are learned per module. With `key_ridge`,
    the least-squares ridge is shaped by each module's key statistics
    (`set_key_statistics`), which are saved with the network.
    """

    def __init__(
        self,
        modules: Sequence[ModuleShape],
        rank: int,
        n_blocks: int,
        update_rule: str,
        key_ridge: bool = False,
        null_space_threshold: float = 0.0,
    ) -> None:
        super().__init__()
        if update_rule not in UPDATE_RULES:
            raise ValueError(f"update_rule must be one of {UPDATE_RULES}, not {update_rule!r}")
        if rank < 1 or n_blocks < 1:
            raise ValueError(f"rank and n_blocks must be at least 1, got {rank}, {n_blocks}")
        if key_ridge and update_rule != "least_squares":
            raise ValueError("key_ridge shapes the least-squares ridge; the mend rule has none")
        self.modules_edited = list(modules)
        self.update_rule = update_rule
        self.key_ridge = key_ridge
        self.project_updates(null_space_threshold)
        by_shape: dict[str, list[ModuleShape]] = {}
        for module in self.modules_edited:
            by_shape.setdefault(f"{module.d_in}x{module.d_out}", []).append(module)
        self._slot = {
            module.name: (shape, slot)
            for shape, members in by_shape.items()
            for slot, module in enumerate(members)
        }
        self.networks = nn.ModuleDict(
            {
                shape: ShapeNetwork(
                    members[0].d_in + members[0].d_out, len(members), rank, n_blocks
                )
                for shape, members in by_shape.items()
            }
        )
        self.log_lr = nn.Parameter(torch.zeros(len(self.modules_edited)))
        self.log_ridge = nn.Parameter(torch.zeros(len(self.modules_edited)))
        if key_ridge:
            for index, module in enumerate(self.modules_edited):
                self.register_buffer(f"key_precision_{index}", torch.eye(module.d_in))

    def set_key_statistics(self, name: str, second_moment: torch.Tensor) -> None:
        """Use C = `second_moment` in module `name`'s ridge.

        C is scaled to mean eigenvalue 1, and a small floor keeps directions
        that ordinary text never takes (e.g. after a LayerNorm) regularised.
        """
        d_in = second_moment.shape[0]
        scaled = second_moment.double() * (d_in / second_moment.diagonal().sum().double())
        scaled.diagonal().add_(KEY_RIDGE_FLOOR)
        precision = torch.linalg.inv(scaled)
        self.key_precision(name).copy_((precision + precision.T) / 2)
        self._null_spaces.pop(name, None)

    def project_updates(self, threshold: float) -> None:
        """Multiply every update by AlphaEdit's projector onto the directions that
        ordinary keys leave unused (eigenvalues of C below `threshold` times the
        largest), so their outputs stay as they were; 0: no projection."""
        check_null_space_threshold(threshold, self.key_ridge)
        self.null_space_threshold = threshold
        self._null_spaces: dict[str, torch.Tensor] = {}

    def null_space(self, name: str) -> torch.Tensor:
        """The projector of `project_updates` for module `name`, from its ridge's statistics."""
        if name not in self._null_spaces:
            scaled = torch.linalg.inv(self.key_precision(name).double())
            scaled.diagonal().sub_(KEY_RIDGE_FLOOR)  # the floor shifts every eigenvalue alike
            self._null_spaces[name] = null_space_projection(scaled, self.null_space_threshold)
        return self._null_spaces[name]

    def load_state_dict(self, *args: Any, **kwargs: Any) -> Any:
        self._null_spaces = {}  # new statistics, new projectors
        return super().load_state_dict(*args, **kwargs)

    def key_precision(self, name: str) -> torch.Tensor | None:
        """P = C⁻¹ of module `name`'s ridge, or None for the plain ridge."""
        if not self.key_ridge:
            return None
        return getattr(self, f"key_precision_{self.module_names.index(name)}")

    @property
    def module_names(self) -> list[str]:
        return [m.name for m in self.modules_edited]

    def observe(self, name: str, captured: Captured) -> None:
        """Add captured inputs to module `name`'s normaliser statistics, nothing else."""
        shape, slot = self._slot[name]
        inputs = torch.cat([captured.keys, captured.value_grads], dim=1)
        self.networks[shape].normaliser.update(slot, inputs)

    def pending_statistics(self) -> dict[str, dict[int, Moments]]:
        """What each shape's normaliser has set aside since the last step, on the CPU."""
        return {
            shape: {
                index: tuple(part.cpu() for part in moments)
                for index, moments in network.normaliser.pending.items()
            }
            for shape, network in self.networks.items()
        }

    def commit_statistics(self, pending: Sequence[dict[str, dict[int, Moments]]]) -> None:
        """Merge `pending_statistics()` of every process, in rank order, into the normalisers."""
        for shape, network in self.networks.items():
            network.normaliser.commit([of_process[shape] for of_process in pending])

    def pseudo(self, name: str, captured: Captured) -> tuple[torch.Tensor, torch.Tensor]:
        """Pseudo keys k̃ (tokens, d_in) and pseudo gradients g̃ (tokens, d_out)."""
        shape, slot = self._slot[name]
        inputs = torch.cat([captured.keys, captured.value_grads], dim=1)
        outputs = self.networks[shape](slot, inputs)
        d_in = captured.keys.shape[1]
        return outputs[:, :d_in], outputs[:, d_in:]

    def delta(
        self, name: str, captured: Captured, key_precision: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The (d_out, d_in) float32 update of module `name`; `key_precision`
        replaces the ridge's P (the editor's, holding earlier edits' keys)."""
        index = self.module_names.index(name)
        pseudo_keys, pseudo_grads = self.pseudo(name, captured)
        if self.update_rule == "mend":
            return mend_update(pseudo_keys, pseudo_grads, self.log_lr[index])
        values = value_differences(captured.keys, pseudo_keys, pseudo_grads, self.log_lr[index])
        if key_precision is None:
            key_precision = self.key_precision(name)
        update = least_squares_update(captured.keys, values, self.log_ridge[index], key_precision)
        if self.null_space_threshold:
            update = update @ self.null_space(name).to(update.device)
        return update

    def deltas(
        self,
        captured: dict[str, Captured],
        key_precisions: Mapping[str, torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        key_precisions = key_precisions or {}
        return {
            name: self.delta(name, captured[name], key_precisions.get(name))
            for name in self.module_names
        }
