"""Shared hypernetwork machinery of MEND, MALMEN and RLEdit.

`lledit.hypernet.training` holds the trainer; it is imported on its own because
it runs the evaluation protocol, which imports the methods.
"""

from lledit.hypernet.checkpoint import CheckpointError, load_network, save_checkpoint
from lledit.hypernet.config import HypernetTrainConfig
from lledit.hypernet.editor import HypernetEditConfig, HypernetEditor
from lledit.hypernet.network import Hypernetwork, ModuleShape

__all__ = [
    "CheckpointError",
    "HypernetEditConfig",
    "HypernetEditor",
    "HypernetTrainConfig",
    "Hypernetwork",
    "ModuleShape",
    "load_network",
    "save_checkpoint",
]
