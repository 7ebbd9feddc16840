"""RLEdit: MALMEN's update, with the network trained on whole edit sequences.

Training treats lifelong editing as a sequential decision problem: the network
edits T batches in a row, and after each it is judged on the D most recent
batches (decayed by μ), on locality against the previous weights, and on the
size of its update, so it learns updates that suit an already edited model.
A second, lighter locality term against the original weights judges what
the trajectory has changed so far.
Its least-squares ridge is shaped by the statistics of ordinary keys, so
updates stay out of the directions ordinary text uses, and it holds the keys
of the batches applied before (in training, those of the trajectory), so a
new update leaves earlier edits alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from lledit.hypernet import HypernetEditConfig, HypernetEditor, HypernetTrainConfig


@dataclass
class RLEditTrainConfig(HypernetTrainConfig):
    """Trajectory training; the defaults suit SmolLM2-135M."""

    steps: int = 300
    """Six trajectories of 50 batches; longer training fit the trained horizon
    better and 1000-edit sequences worse (docs/methods/rledit.md)."""
    trajectory_length: int = 50
    """Half the 100 batches of the 1000-edit benchmark; longer trajectories
    did better over it than 20 (docs/methods/rledit.md)."""
    backtrack_depth: int = 2
    """D: each edit is also judged on the batch before it, as in the paper."""
    locality_weight: float = 100.0
    """Ten times MEND's and MALMEN's: with 10, 100 batches of updates added up
    to a wrecked model (docs/methods/rledit.md)."""
    drift_weight: float = 3.0
    """The KL from the original weights, which judges what the trajectory has
    changed so far; 3 raised every metric over 1000 edits, 10 lost
    (docs/methods/rledit.md)."""
    l2_weight: float = 1e-4
    """A small penalty on the update's size, so that updates summed over a
    long sequence stay bounded."""
    step_every: int | None = 1
    """An optimizer step after every batch of a trajectory, as the paper's
    per-step reinforcement does."""
    key_ridge: bool = True
    """Shape the ridge by ordinary keys' statistics: better efficacy and
    locality than the plain ridge over 1000 edits (docs/methods/rledit.md)."""
    earlier_keys_weight: float = 0.03
    """Trained as it edits (`RLEditConfig.earlier_keys_weight`): better
    edits, a little less locality (docs/methods/rledit.md)."""


@dataclass
class RLEditConfig(HypernetEditConfig):
    """Editing with a trained RLEdit network; the defaults suit SmolLM2-135M."""

    earlier_keys_weight: float = 0.03
    """Each update keeps the outputs of earlier batches' keys, weighted this
    much; 0.03 gave the best locality at near-best efficacy, and much more
    leaves new edits too little room (docs/methods/rledit.md)."""


class RLEdit(HypernetEditor):
    name: ClassVar[str] = "rledit"
    description: ClassVar[str] = "RLEdit: hypernetwork trained on edit sequences (needs training)"
    update_rule: ClassVar[str] = "least_squares"
    config_class: ClassVar[type] = RLEditConfig
    train_config_class: ClassVar[type] = RLEditTrainConfig
