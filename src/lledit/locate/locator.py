"""A locate-then-edit editor's shared part: from a batch to each edited module's weight delta."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from lledit.data.request import EditRequest
from lledit.edit import NonFiniteUpdateError, added_deltas
from lledit.locate.config import LocateConfig
from lledit.locate.keys import keys_and_hidden, sample_prefixes, subject_contexts
from lledit.locate.values import target_values
from lledit.model import ModelHandle
from lledit.stats import key_covariances

Solver = Callable[[str, torch.Tensor, torch.Tensor], torch.Tensor]
"""(module, keys (d_in, n), residual (d_out, n)) -> the module's weight delta (d_out, d_in)."""


def _check_finite(name: str, value: torch.Tensor) -> None:
    if not torch.isfinite(value).all():
        raise NonFiniteUpdateError(
            f"the {name} of this batch are not finite; the batch was rejected "
            "and the model left unchanged"
        )


def layer_deltas(
    handle: ModelHandle,
    requests: Sequence[EditRequest],
    modules: Sequence[str],
    layer: int,
    prefixes: Sequence[str],
    config: LocateConfig,
    solve: Solver,
) -> dict[str, torch.Tensor]:
    """The weight delta of each edited module, lowest layer first (MEMIT's scheme).

    For module i of m, the keys are read with the deltas of the modules below
    already in effect, the residual z - h (h: the critical layer's current
    output) is divided by the m - i modules left, and `solve` turns keys and
    residual into the module's delta. The model's weights are not changed.
    """
    z = target_values(handle, requests, layer, prefixes, config)
    _check_finite("target values", z)
    contexts = subject_contexts(handle, requests, prefixes)
    deltas: dict[str, torch.Tensor] = {}
    for index, module in enumerate(modules):
        with added_deltas(handle, deltas):
            keys, hidden = keys_and_hidden(handle, contexts, module, layer)
        _check_finite("keys", keys)
        residual = (z - hidden).T / (len(modules) - index)
        deltas[module] = solve(module, keys.T, residual)
    return deltas


class Locator:
    """The shared part of a locate-then-edit editor for one model and one config.

    Holds the edited modules, the critical layer and the random prefixes
    (sampled once, by `prepare` or on first use).
    """

    def __init__(self, handle: ModelHandle, config: LocateConfig) -> None:
        self.handle = handle
        self.config = config
        self.modules = handle.edited_modules(config.layers, config.part, "lower")
        self.layers = tuple(handle.layer_of(module) for module in self.modules)
        width = handle.model.get_input_embeddings().weight.shape[1]
        for module in self.modules:
            d_out = handle.weight_of(module).shape[0]
            if d_out != width:
                raise ValueError(
                    f"'{module}' writes {d_out} values, not the {width} of the residual "
                    "stream; edit an MLP output projection"
                )
        self.critical_layer = self.layers[-1]
        self.prefixes: list[str] | None = None

    def prepare(self) -> None:
        """Sample the prefixes (once)."""
        if self.prefixes is None:
            self.prefixes = sample_prefixes(
                self.handle, self.config.prefix_count, self.config.prefix_length, self.config.seed
            )

    def covariances(self) -> dict[str, torch.Tensor]:
        """The key statistics of every edited module, on the model's device."""
        stats = key_covariances(
            self.handle,
            self.modules,
            samples=self.config.stats_samples,
            corpus=self.config.stats_corpus,
            seed=self.config.seed,
        )
        return {module: value.to(self.handle.device) for module, value in stats.items()}

    def deltas(self, requests: Sequence[EditRequest], solve: Solver) -> dict[str, torch.Tensor]:
        """The weight delta of every edited module for one batch (see `layer_deltas`)."""
        if not requests:
            raise ValueError("an edit batch must hold at least one request")
        self.prepare()
        assert self.prefixes is not None
        return layer_deltas(
            self.handle,
            requests,
            self.modules,
            self.critical_layer,
            self.prefixes,
            self.config,
            solve,
        )

    def describe(self) -> dict[str, Any]:
        """The resolved modules, for the results' record of settings."""
        return {"modules": self.modules}
