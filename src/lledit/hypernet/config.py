"""What a hypernetwork editor edits and how it is trained: one dataclass for all three."""

from __future__ import annotations

import math
from dataclasses import dataclass

from lledit.hypernet.network import ModuleShape
from lledit.model import ModelHandle

PARTS = ("mlp_in", "mlp_out", "mlp")


@dataclass
class HypernetTrainConfig:
    """How a hypernetwork editor is built and trained; the defaults suit SmolLM2-135M."""

    layers: str | None = None
    """Decoder layers to edit, e.g. "22-27" or "20,22"; None: `default_layers`."""
    part: str = "mlp_out"
    """Which MLP weights: `mlp_in` (gate/up or c_fc), `mlp_out` (down or c_proj), `mlp` (both)."""
    rank: int = 64
    n_blocks: int = 2
    steps: int = 400
    """Optimizer steps."""
    batch_size: int = 10
    trajectory_length: int = 1
    """T: batches applied in sequence before the model is restored."""
    backtrack_depth: int = 1
    """D: the losses of this many most recent batches are judged after each edit."""
    decay: float = 0.95
    """μ: weight of the loss of the batch i steps back is μ^i."""
    discount: float = 1.0
    """The loss after batch t of a trajectory is weighted discount^t."""
    locality_weight: float = 10.0
    drift_weight: float = 0.0
    """Weight of the KL from the original model (not the previous weights) on
    the same locality prompts, which judges the change a trajectory has added
    up so far; 0: none."""
    earlier_keys_weight: float = 0.0
    """Least-squares rule only: within a trajectory, each batch's update is
    solved with the keys of the trajectory's earlier batches held in the
    ridge, as the editor's setting of the same name does; 0: none."""
    locality_tokens: int = 4
    """Locality answers are judged on at most this many leading tokens (long answers cost time)."""
    l2_weight: float = 0.0
    step_every: int | None = None
    """Optimizer step every this many batches of a trajectory; None: once per trajectory."""
    meta_lr: float = 1e-3
    scalar_lr: float = 2e-2
    """Learning rate of the per-module log step size and log ridge."""
    initial_step: float = 0.1
    """Initial size of a batch's change of module output, relative to the output."""
    initial_ridge: float = 0.1
    """Initial ridge, relative to the mean squared key norm (of kᵀC⁻¹k with `key_ridge`)."""
    key_ridge: bool = False
    """Least-squares rule only: shape the ridge by the second moment C of each
    module's keys over text the model samples itself (MEMIT's C₀), so an
    update is held back where it would change the outputs of ordinary
    inputs, not evenly in every direction."""
    key_samples: int = 20000
    """Keys the statistics of `key_ridge` average over (cached once per model)."""
    warmup_batches: int = 10
    grad_clip: float = 1.0
    checkpoint_every: int = 50
    validation_edits: int = 100
    seed: int = 0

    def __post_init__(self) -> None:
        if self.part not in PARTS:
            raise ValueError(f"part must be one of {PARTS}, not {self.part!r}")
        positive = ("rank", "n_blocks", "steps", "batch_size", "trajectory_length")
        for name in (
            *positive,
            "backtrack_depth",
            "checkpoint_every",
            "locality_tokens",
            "key_samples",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.step_every is not None and self.step_every < 1:
            raise ValueError(f"step_every must be at least 1, got {self.step_every}")
        if not (self.initial_step > 0 and self.initial_ridge > 0):
            raise ValueError(
                f"initial_step and initial_ridge must be positive, "
                f"got {self.initial_step}, {self.initial_ridge}"
            )
        if self.validation_edits < 0 or self.warmup_batches < 0:
            raise ValueError("validation_edits and warmup_batches cannot be negative")

    @property
    def steps_per_trajectory(self) -> int:
        return math.ceil(self.trajectory_length / (self.step_every or self.trajectory_length))


def default_layers(handle: ModelHandle) -> list[int]:
    """The upper layers a hypernetwork edits by default: 21-26 on a 30-layer model."""
    n = handle.num_layers
    first, last = int(0.73 * n), max(int(0.73 * n) + 1, int(0.93 * n))
    return list(range(first, min(last, n)))


def parse_layers(text: str, n_layers: int) -> list[int]:
    layers: list[int] = []
    for part in text.split(","):
        start, dash, end = part.strip().partition("-")
        try:
            chosen = range(int(start), int(end) + 1) if dash else [int(start)]
        except ValueError:
            raise ValueError(f"layers {text!r}: write them like '22-27' or '20,22'") from None
        layers.extend(chosen)
    bad = [layer for layer in layers if not 0 <= layer < n_layers]
    if bad or not layers:
        raise ValueError(f"layers {text!r}: the model has layers 0-{n_layers - 1}")
    return sorted(set(layers))


def edited_modules(handle: ModelHandle, config: HypernetTrainConfig) -> list[ModuleShape]:
    layers = (
        parse_layers(config.layers, handle.num_layers) if config.layers else default_layers(handle)
    )
    arch = handle.arch
    parts = {"mlp_in": arch.mlp_in, "mlp_out": (arch.mlp_out,), "mlp": (*arch.mlp_in, arch.mlp_out)}
    modules = []
    for layer in layers:
        for part in parts[config.part]:
            name = handle.layer_module(layer, part)
            d_out, d_in = handle.weight_of(name).shape
            modules.append(ModuleShape(name, d_out, d_in))
    return modules
