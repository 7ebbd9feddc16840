"""MALMEN: the hypernetwork's value differences solved jointly by least squares.

ΔW = (KᵀK + e^λ I)⁻¹ KᵀD over all edits of a batch, trained one batch at a
time on the original model.
"""

from __future__ import annotations

from typing import ClassVar

from lledit.hypernet import HypernetEditor, HypernetTrainConfig


class MALMEN(HypernetEditor):
    name: ClassVar[str] = "malmen"
    description: ClassVar[str] = "MALMEN: hypernetwork + least-squares update (needs training)"
    update_rule: ClassVar[str] = "least_squares"
    train_config_class: ClassVar[type] = HypernetTrainConfig
