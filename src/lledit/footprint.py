"""What an editor holds on the model's device beyond the weights, counted before loading.

Each method's `memory_share()` adds up the largest tensors its code keeps at
once, from the shapes of the modules it edits, so that `load_model` can
refuse a model and method that will not fit before it loads anything. The
counts follow docs/scaling.md ("What a method holds per edited module").
Activations are left out: batches of ten short prompts need little beside
the d_in x d_in matrices that dominate at 7-8B shapes.
"""

from __future__ import annotations

from collections.abc import Sequence

from lledit.model import ModelHandle

FLOAT32 = 4
FLOAT64 = 8
TRAINED = 4 * FLOAT32
"""Bytes per trained float32 value: the value, its gradient and Adam's two moments."""


def module_shapes(handle: ModelHandle, modules: Sequence[str]) -> list[tuple[int, int]]:
    """(d_out, d_in) of each module, read from its weight (on the meta device too)."""
    return [tuple(handle.weight_of(name).shape) for name in modules]


def undo_share(handle: ModelHandle, modules: Sequence[str]) -> int:
    """A weight-editing batch's float32 delta per module, kept for exact undo
    (the weights before it go to host memory)."""
    return sum(FLOAT32 * d_out * d_in for d_out, d_in in module_shapes(handle, modules))


def trained_share(handle: ModelHandle, modules: Sequence[str]) -> int:
    """Float32 deltas of whole weights trained with Adam (fine-tuning, MEMOIR's memory)."""
    return sum(TRAINED * d_out * d_in for d_out, d_in in module_shapes(handle, modules))


def statistics_share(handle: ModelHandle, modules: Sequence[str]) -> int:
    """Gathering key statistics: every module's float64 sum at once, and one
    forward's float32 product being added to it."""
    widths = [d_in for _, d_in in module_shapes(handle, modules)]
    return sum(FLOAT64 * d * d for d in widths) + FLOAT32 * max(widths, default=0) ** 2


def squares(handle: ModelHandle, modules: Sequence[str]) -> list[int]:
    """d_in² of each module: the size of its key statistics."""
    return [d_in * d_in for _, d_in in module_shapes(handle, modules)]


def closed_form_share(handle: ModelHandle, modules: Sequence[str], held: int) -> int:
    """MEMIT's and AlphaEdit's: the statistics while gathered; then `held` float32
    d_in x d_in matrices per module and one module's float64 solve (copies of
    them, the system and the solver's copy of it); and the batch's undo record."""
    sizes = squares(handle, modules)
    editing = held * FLOAT32 * sum(sizes) + 4 * FLOAT64 * max(sizes)
    return max(statistics_share(handle, modules), editing) + undo_share(handle, modules)
