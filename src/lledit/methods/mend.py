"""MEND: a hypernetwork turns the edit's gradient into a rank-one-per-token update.

ΔW = -η Σ g̃ k̃ᵀ, trained one batch at a time on the original model.
"""

from __future__ import annotations

from typing import ClassVar

from lledit.hypernet import HypernetEditor, HypernetTrainConfig


class MEND(HypernetEditor):
    name: ClassVar[str] = "mend"
    description: ClassVar[str] = "MEND: hypernetwork, gradient -> rank-one update (needs training)"
    update_rule: ClassVar[str] = "mend"
    train_config_class: ClassVar[type] = HypernetTrainConfig
