"""What a hypernetwork editor edits and how it is trained: one dataclass for all three."""

from __future__ import annotations

import math
from dataclasses import dataclass

from lledit import checks
from lledit.hypernet.network import Hypernetwork, ModuleShape, check_null_space_threshold
from lledit.model import ModelHandle


@dataclass
class HypernetTrainConfig:
    """How a hypernetwork editor is built and trained; the defaults suit SmolLM2-135M."""

    layers: str | None = None
    """Edited decoder layers, e.g. "21-26" (see `lledit.layers.parse_layers`);
    None: the `upper` band (21-26 of 30)."""
    part: str = "mlp_out"
    """The weights edited in each layer (see `lledit.layers.PARTS`)."""
    rank: int = 64
    """Width of the network's low-rank blocks; 64 is MEND's choice, ample for
    SmolLM2's 576/1536-wide keys and gradients."""
    n_blocks: int = 2
    """Residual blocks of the network, as in MEND."""
    steps: int = 400
    """Optimizer steps."""
    batch_size: int = 10
    """Edits per training batch: the benchmark's batch size, so the network is
    trained on what it will edit."""
    trajectory_length: int = 1
    """T: batches applied in sequence before the model is restored."""
    backtrack_depth: int = 1
    """D: the losses of this many most recent batches are judged after each edit."""
    decay: float = 0.95
    """μ: weight of the loss of the batch i steps back is μ^i."""
    discount: float = 1.0
    """The loss after batch t of a trajectory is weighted discount^t."""
    locality_weight: float = 10.0
    """Weight of the KL from the previous weights on unrelated prompts (MEND's
    and MALMEN's 10; RLEdit's 100, docs/methods/rledit.md)."""
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
    """Weight of the update's squared size in the loss; 0: none, as in MEND and
    MALMEN."""
    step_every: int | None = None
    """Optimizer step every this many batches of a trajectory; None: once per trajectory."""
    trajectories_per_step: int = 1
    """Trajectories run side by side whose gradients are averaged in each
    optimizer step: the global batch, split evenly across the processes of a
    distributed run (`lledit train --nproc`); 1, as the papers train."""
    meta_lr: float = 1e-3
    """Adam learning rate of the network."""
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
    null_space_threshold: float = 0.0
    """With `key_ridge`: multiply every update by AlphaEdit's projector onto
    the directions ordinary keys leave unused (eigenvalues of C below this
    fraction of the largest), in training and then in editing; 0: none
    (docs/methods/rledit.md)."""
    key_samples: int = 20000
    """Keys the statistics of `key_ridge` average over (cached once per model)."""
    warmup_batches: int = 10
    """Batches whose keys and gradients fill the input normaliser and scale the
    step size and ridge to the model before training."""
    grad_clip: float = 1.0
    """Largest norm of the network's gradient per optimizer step."""
    checkpoint_every: int = 50
    """Steps between checkpoints (`--resume` continues from the last)."""
    validation_edits: int = 100
    """Held-out training edits applied in sequence after training, written to
    `validation.json`."""
    seed: int = 0
    """Seed of the network's initialisation and of the order of training edits."""

    def __post_init__(self) -> None:
        checks.at_least(
            self, 1, "rank", "n_blocks", "steps", "batch_size", "trajectory_length",
            "backtrack_depth", "checkpoint_every", "locality_tokens", "key_samples", "step_every",
            "trajectories_per_step",
        )  # fmt: skip
        checks.at_least(self, 0, "validation_edits", "warmup_batches")
        checks.positive(self, "initial_step", "initial_ridge")
        check_null_space_threshold(self.null_space_threshold, self.key_ridge)

    @property
    def steps_per_trajectory(self) -> int:
        return math.ceil(self.trajectory_length / (self.step_every or self.trajectory_length))


def edited_modules(handle: ModelHandle, config: HypernetTrainConfig) -> list[ModuleShape]:
    """The modules `config` names on this model, with their shapes."""
    modules = []
    for name in handle.edited_modules(config.layers, config.part, "upper"):
        d_out, d_in = handle.weight_of(name).shape
        modules.append(ModuleShape(name, d_out, d_in))
    return modules


def untrained_network(
    handle: ModelHandle, config: HypernetTrainConfig, update_rule: str
) -> Hypernetwork:
    """A network of `config`'s size for the modules it names, at its initialisation,
    on the model's device."""
    return Hypernetwork(
        edited_modules(handle, config),
        config.rank,
        config.n_blocks,
        update_rule,
        key_ridge=config.key_ridge,
        null_space_threshold=config.null_space_threshold,
    ).to(handle.device)
