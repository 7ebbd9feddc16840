"""lledit: lifelong knowledge editing of language models."""

from importlib.metadata import version

from lledit.data import EditRequest, InvalidEditError, load_dataset
from lledit.eval import LifelongResult, evaluate, run_lifelong
from lledit.export import load_edited
from lledit.methods import METHODS, make_editor
from lledit.model import ModelHandle, load_model

__version__ = version("lledit")

__all__ = [
    "METHODS",
    "EditRequest",
    "InvalidEditError",
    "LifelongResult",
    "ModelHandle",
    "__version__",
    "evaluate",
    "load_dataset",
    "load_edited",
    "load_model",
    "make_editor",
    "run_lifelong",
]
