"""GRACE: a key-value codebook on one layer, with a deferral radius per entry.

Hartvigsen et al., "Aging with GRACE: Lifelong Model Editing with Discrete
Key-Value Adaptors", NeurIPS 2023. The adapted module is one MLP output
projection (layer 21's `mlp.down_proj` on SmolLM2-135M). The key of a
sequence is that module's input, the MLP's inner activation, at the last
prompt token. Each edit adds one entry: its key, a value vector trained so
that the model predicts the target, and a radius ε.

A sequence whose key lies within the radius of some entry (Euclidean) takes
the value of the nearest such entry as the module's output at every position
of the sequence, and at every token generated from it with a KV cache (GRACE's
"replace all"). Any other sequence gets the module's untouched output, bit for
bit. Entries never move or merge: every edit adds its own entry with the
initial radius, and overlapping regions are resolved by the nearest key
(simpler than GRACE's radius expansion and splitting).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from lledit import checks
from lledit.data.request import EditRequest
from lledit.edit import NonFiniteUpdateError
from lledit.memory import HeldBatch, MemoryEdit, MemoryEditor, train_until_likely
from lledit.model import ModelHandle, edit_batch

logger = logging.getLogger(__name__)


@dataclass
class GRACEConfig:
    """Settings of GRACE; the defaults suit SmolLM2-135M."""

    layers: str | None = None
    """The one decoder layer that carries the codebook, e.g. "21"; None: the
    first layer of the `upper` band (21 of 30)."""
    part: str = "mlp_out"
    """The module of that layer whose output the codebook replaces (see
    `lledit.layers.PARTS`); it must name one module."""
    radius: float = 10.0
    """ε: the deferral radius of every new entry, a Euclidean distance between
    keys. Sized for SmolLM2-135M's keys (norm about 15): it reaches most
    rephrases and no unrelated prompt (docs/methods/grace.md)."""
    steps: int = 50
    """Most Adam iterations that train the values of one batch."""
    early_stop: float = 0.9
    """Training stops once the geometric mean probability of the batch's target
    tokens reaches this; 1: run every step."""
    lr: float = 0.5
    """Adam learning rate of the values; large, since a value vector starts
    from the layer's output and must move far within `steps`."""

    def __post_init__(self) -> None:
        checks.at_least(self, 1, "steps")
        checks.positive(self, "lr", "radius")
        checks.fraction(self, "early_stop")


@dataclass(eq=False)
class _Entries(HeldBatch):
    """The codebook entries one batch added."""

    keys: torch.Tensor
    values: torch.Tensor
    radii: torch.Tensor


class GRACE(MemoryEditor):
    name: ClassVar[str] = "grace"
    description: ClassVar[str] = (
        "GRACE: codebook of trained output values at one layer, keyed by the last prompt token"
    )
    config_class: ClassVar[type] = GRACEConfig
    label: ClassVar[str] = "GRACE"
    tensors_file: ClassVar[str] = "grace.safetensors"
    config_file: ClassVar[str] = "grace.json"

    def __init__(self, handle: ModelHandle, config: GRACEConfig | None = None) -> None:
        super().__init__(handle)
        self._build(config or GRACEConfig())

    def _resolve(self, config: GRACEConfig) -> str:
        """The module `config` names on this model."""
        return self._one_module(config.layers, config.part, "first")

    def _build(self, config: GRACEConfig) -> None:
        handle = self.handle
        module_name = self._resolve(config)
        d_out, d_in = handle.weight_of(module_name).shape
        self.remove()
        self.config = config
        self.module_name = module_name
        self.key_width, self.value_width = d_in, d_out
        self._layer = handle.layer_of(module_name)
        self._batches: list[_Entries] = []
        self._codebook: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self._attach([handle.module(module_name).register_forward_hook(self._on_module)])

    def config_dict(self) -> dict[str, Any]:
        return {**asdict(self.config), "modules": [self.module_name]}

    @property
    def size(self) -> int:
        """Entries in the codebook."""
        return sum(entries.keys.shape[0] for entries in self._batches)

    def _entries(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """(keys, values, radii) of every stored entry, concatenated once per change."""
        if self._codebook is None and self._batches:
            self._codebook = tuple(
                torch.cat([getattr(entries, part) for entries in self._batches])
                for part in ("keys", "values", "radii")
            )
        return self._codebook

    # The hook ----------------------------------------------------------------------------------

    def _on_module(self, module: nn.Module, args: tuple, output: torch.Tensor) -> Any:
        training = getattr(self._local, "training", None)
        if training is not None:
            return self._training_output(args[0], output, training)
        codebook = self._entries()
        if self._watch.extends_cache:
            chosen = getattr(self._local, "chosen", None)
            if codebook is None or chosen is None:
                return None
            if chosen.shape[0] != output.shape[0]:
                raise RuntimeError(
                    f"a pass extending a KV cache of {output.shape[0]} sequences follows a "
                    f"prompt pass of {chosen.shape[0]}; run the prompts through the model first"
                )
        else:
            self._local.chosen = chosen = None
            if codebook is None:
                return None
            keys, _, radii = codebook
            distance = torch.cdist(
                self._keys(args[0]), keys, compute_mode="donot_use_mm_for_euclid_dist"
            )
            distance = distance.masked_fill(distance > radii, math.inf)
            nearest = distance.argmin(dim=1)
            chosen = torch.where(distance.isfinite().any(dim=1), nearest, -1)
            self._local.chosen = chosen
        rows = (chosen >= 0).nonzero()[:, 0]
        if rows.numel() == 0:
            return None
        edited = output.clone()
        values = codebook[1][chosen[rows]].to(output.dtype)
        edited[rows] = values[:, None, :].expand(-1, output.shape[1], -1)
        return edited

    def _keys(self, x: torch.Tensor) -> torch.Tensor:
        """(batch, d_in) the module's input at each row's last prompt token, float32."""
        ends = self._watch.prompt_ends(x.shape[0], x.shape[1], x.device)
        return x[torch.arange(x.shape[0], device=x.device), ends].float()

    def _training_output(self, x: torch.Tensor, output: torch.Tensor, state: dict) -> torch.Tensor:
        """While values train: capture keys (and start values from the output there) on
        the first pass, then replace every position of row i with value i."""
        if "values" not in state:
            state["keys"] = self._keys(x).detach()
            ends = self._watch.prompt_ends(x.shape[0], x.shape[1], x.device)
            start = output[torch.arange(x.shape[0], device=x.device), ends].detach().float()
            state["values"] = nn.Parameter(start)
            return output
        return state["values"][:, None, :].expand(-1, output.shape[1], -1).to(output.dtype)

    # Editing -----------------------------------------------------------------------------------

    def apply(self, batch: Sequence[EditRequest]) -> MemoryEdit:
        """Add one entry per edit; the batch's values train together, one forward per step."""
        if not batch:
            raise ValueError("an edit batch must hold at least one request")
        tokens = edit_batch(self.handle, [r.prompt for r in batch], [r.target_new for r in batch])
        state: dict[str, torch.Tensor] = {}
        self._local.training = state
        try:
            with self.handle.frozen_below(self._layer, tokens):
                with torch.no_grad():
                    self.handle.target_logits(tokens)
                optimizer = torch.optim.Adam([state["values"]], lr=self.config.lr)
                step, probability = train_until_likely(
                    self.handle, tokens, optimizer, self.config.steps, self.config.early_stop
                )
            logger.debug(
                "grace batch of %d: %d steps, p(target) %.3f", len(batch), step, probability
            )
        finally:
            self._local.training = None
        values = state["values"].detach()
        if not torch.isfinite(values).all():
            raise NonFiniteUpdateError(
                "GRACE's value training diverged (non-finite values); the batch was "
                "rejected and the codebook left unchanged"
            )
        radii = torch.full((len(batch),), self.config.radius, device=values.device)
        held = {"keys": state["keys"], "values": values, "radii": radii}
        return MemoryEdit(self, self._add_batch(self._held_batch(held, batch)), held)

    def _held_batch(
        self, held: dict[str, torch.Tensor], requests: Sequence[EditRequest]
    ) -> _Entries:
        """The batch's entries, which are the whole edit (`requests` are not needed)."""
        device = self.handle.weight_of(self.module_name).device
        return _Entries(*(held[part].to(device) for part in ("keys", "values", "radii")))

    def _changed(self) -> None:
        """The concatenated codebook is rebuilt from the held entries."""
        self._codebook = None

    # Saving ------------------------------------------------------------------------------------

    def save(self, directory: str | Path) -> None:
        """Keys, values and radii as safetensors, the settings as JSON."""
        codebook = self._entries()
        if codebook is None:
            codebook = (
                torch.zeros(0, self.key_width),
                torch.zeros(0, self.value_width),
                torch.zeros(0),
            )
        tensors = dict(zip(("keys", "values", "radii"), codebook, strict=True))
        record = {
            # The layer as resolved, so that a load edits the same module.
            "config": {**asdict(self.config), "layers": str(self._layer)},
            "module": self.module_name,
            "entries": int(codebook[0].shape[0]),
        }
        self._write(directory, tensors, record)

    def load(self, directory: str | Path) -> None:
        """Take over a saved codebook and its settings.

        Widths are checked against this model before anything changes. The
        loaded entries count as one earlier batch that cannot be undone;
        batches applied before loading can no longer be undone.
        """
        record, tensors = self._read(directory)
        try:
            config = GRACEConfig(**record["config"])
        except TypeError as error:
            raise ValueError(f"{directory}: unknown settings ({error})") from None
        d_out, d_in = self.handle.weight_of(self._resolve(config)).shape
        keys, values, radii = tensors["keys"], tensors["values"], tensors["radii"]
        if keys.shape[1:] != (d_in,) or values.shape[1:] != (d_out,):
            raise ValueError(
                f"{directory}: keys/values of width {keys.shape[1]}/{values.shape[1]} do not "
                f"fit '{record['module']}' ({d_in} in, {d_out} out)"
            )
        self._build(config)
        if keys.shape[0]:
            device = self.handle.weight_of(self.module_name).device
            self._batches = [_Entries(keys.to(device), values.to(device), radii.to(device))]
