"""Which modules a method edits, said one way for every method.

A method's config names decoder layers with `layers` and the weights inside
each layer with `part`; `ModelHandle.edited_modules` turns the two into
module names, and fills in the default layers of the method's band when
`layers` is None.
"""

from __future__ import annotations

import re
from typing import Literal

PARTS = ("mlp_in", "mlp_out", "mlp")
"""Part names every architecture resolves: the MLP's input projections (gate/up,
or GPT-2's c_fc), its output projection (down, or c_proj), or both. Any other
part is read as a module path inside a decoder layer (e.g. `self_attn.o_proj`)."""

Band = Literal["lower", "upper"]
"""Where a method edits by default: `lower`, five consecutive layers from 15%
depth (4-8 of 30), where MEMIT and AlphaEdit write facts into the MLP outputs;
`upper`, six consecutive layers from 70% depth (21-26 of 30), where the
hypernetwork editors, ELDER, GRACE and FT edit (one-module methods take its
first layer)."""


def default_layers(num_layers: int, band: Band) -> tuple[int, ...]:
    """The default layers of `band` on a model with `num_layers` decoder layers."""
    if band == "lower":
        first = max(1, round(0.15 * num_layers))
        layers = tuple(range(first, min(first + 5, num_layers - 1)))
        return layers or (min(first, num_layers - 1),)
    if band == "upper":
        first = min(max(1, int(0.7 * num_layers)), num_layers - 1)
        return tuple(range(first, min(first + 6, num_layers)))
    raise ValueError(f"band must be 'lower' or 'upper', not {band!r}")


def parse_layers(text: str, num_layers: int) -> tuple[int, ...]:
    """Layer indices from "4,5,6", "4-8", "-6--1" or "20,-1", sorted and distinct.

    Negative indices count from the end (-1 is the last layer), in lists and
    in ranges alike; a range runs from its first to its last layer inclusive.
    """
    layers: set[int] = set()

    def index(word: str) -> int:
        layer = int(word)
        if not -num_layers <= layer < num_layers:
            raise ValueError(
                f"layers {text!r}: layer {layer} does not exist; "
                f"the model has {num_layers} layers (0 to {num_layers - 1}, or -{num_layers} to -1)"
            )
        return layer % num_layers

    for item in text.split(","):
        item = item.strip()
        bounds = re.fullmatch(r"(-?\d+)\s*-\s*(-?\d+)", item)
        if bounds is None and not re.fullmatch(r"-?\d+", item):
            raise ValueError(
                f"layers {text!r}: cannot read {item!r}; write them like '4-8', '20,22' or '-3--1'"
            )
        if bounds is None:
            layers.add(index(item))
            continue
        first, last = (index(bound) for bound in bounds.groups())
        if first > last:
            raise ValueError(f"layers {text!r}: the range {item!r} runs backwards")
        layers.update(range(first, last + 1))
    return tuple(sorted(layers))
