"""MEMOIR: a residual memory beside one MLP projection, written and read through sparse masks.

Wang, Qin et al., "MEMOIR: Lifelong Model Editing with Minimal Overwrite and
Informed Retention for LLMs", NeurIPS 2025. A zero-initialised memory W_m,
as wide as the adapted projection (one MLP output projection), adds
W_m (M ⊙ a) to its output, where a is the projection's input and M a
sparse mask chosen per sequence by TopHash: the `active` largest entries of
the sequence's fingerprint (the mean of a over the prompt's tokens, in
magnitude), moved through a fixed random permutation, so that each edit
writes a spread-out set of W_m's columns and different edits mostly write
different ones.

Training an edit trains only the columns of its mask. At inference a
sequence uses the memory only if its mask overlaps some held edit's mask in
at least `threshold` of the `active` columns; otherwise, and before any
edit, the projection's output is untouched, bit for bit. The decision is
made on the pass that reads the prompt and kept for tokens generated from
a KV cache. Where the paper is not specific (the fingerprint's tokens, the
optimiser, early stopping), the choices are the measured ones on
docs/methods/memoir.md.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from lledit import checks
from lledit.data.request import EditRequest
from lledit.memory import HeldBatch, MemoryEdit, MemoryEditor, train_until_likely
from lledit.model import ModelHandle, edit_batch

logger = logging.getLogger(__name__)


@dataclass
class MemoirConfig:
    """Settings of MEMOIR; the defaults suit SmolLM2-135M (docs/methods/memoir.md)."""

    layers: str | None = None
    """The one decoder layer whose projection gets the memory, e.g. "25"; None:
    the last layer of the `upper` band (26 of 30; the paper edits a late layer)."""
    part: str = "mlp_out"
    """The projection the memory sits beside (see `lledit.layers.PARTS`); it
    must name one module."""
    active: float = 0.25
    """k as a fraction of the projection's input width: the memory columns one
    sequence reads and one edit writes. A quarter, the paper's 4096 of 14336
    on Llama-3-8B (384 of 1536 on SmolLM2)."""
    threshold: float = 0.5
    """τ: a sequence uses the memory when its mask shares at least this
    fraction of its columns with some held edit's mask. Over 50 zsRE edits on
    SmolLM2, 0.4 let unrelated prompts through and 0.6 lost rephrases
    (docs/methods/memoir.md)."""
    steps: int = 50
    """Most Adam iterations that train the memory on one batch."""
    early_stop: float = 0.95
    """Training stops once the geometric mean probability of the batch's target
    tokens reaches this; 1: run every step."""
    lr: float = 1e-2
    """Adam learning rate of the memory."""
    seed: int = 0
    """Seed of the permutation TopHash applies to the chosen columns."""

    def __post_init__(self) -> None:
        checks.at_least(self, 1, "steps")
        checks.positive(self, "lr")
        checks.fraction(self, "active", "threshold", "early_stop")


@dataclass(eq=False)
class _Masks(HeldBatch):
    """The masks of one applied batch's edits."""

    masks: torch.Tensor
    """(edits, d_in) bool: the memory columns each edit was written through."""


class MEMOIR(MemoryEditor):
    name: ClassVar[str] = "memoir"
    description: ClassVar[str] = (
        "MEMOIR: zero-initialised residual memory at one MLP projection, sparse TopHash masks"
    )
    config_class: ClassVar[type] = MemoirConfig
    label: ClassVar[str] = "MEMOIR"
    tensors_file: ClassVar[str] = "memoir.safetensors"
    config_file: ClassVar[str] = "memoir.json"

    def __init__(self, handle: ModelHandle, config: MemoirConfig | None = None) -> None:
        super().__init__(handle)
        self._build(config or MemoirConfig())

    def _resolve(self, config: MemoirConfig) -> str:
        """The module `config` names on this model."""
        return self._one_module(config.layers, config.part, "last")

    def _build(self, config: MemoirConfig) -> None:
        handle = self.handle
        module_name = self._resolve(config)
        d_out, d_in = handle.weight_of(module_name).shape
        generator = torch.Generator().manual_seed(config.seed)
        self.remove()
        self.config = config
        self.module_name = module_name
        self._layer = handle.layer_of(module_name)
        self.active = max(1, round(config.active * d_in))
        """k: the memory columns one mask holds."""
        device = handle.weight_of(module_name).device
        self.memory = nn.Parameter(torch.zeros(d_out, d_in, device=device))
        self.permutation = torch.randperm(d_in, generator=generator).to(device)
        self._batches: list[_Masks] = []
        self._stored: torch.Tensor | None = None
        self._attach([handle.module(module_name).register_forward_hook(self._on_module)])

    def config_dict(self) -> dict[str, Any]:
        return {**asdict(self.config), "modules": [self.module_name], "active_columns": self.active}

    def tensors(self) -> dict[str, torch.Tensor]:
        """The memory, by the name a journal stores its deltas under."""
        return {"memoir.memory": self.memory}

    def _stored_masks(self) -> torch.Tensor | None:
        """(edits, d_in) every held edit's mask as float, concatenated once per change."""
        if self._stored is None and self._batches:
            self._stored = torch.cat([batch.masks for batch in self._batches]).float()
        return self._stored

    def _changed(self) -> None:
        self._stored = None

    # Masks and the hook ------------------------------------------------------------------------

    def _masks(self, x: torch.Tensor) -> torch.Tensor:
        """(batch, d_in) bool TopHash masks of a pass whose input to the module is x."""
        prompt = self._watch.prompt_positions(x.shape[0], x.shape[1], x.device)
        weights = prompt.float() / prompt.sum(dim=1, keepdim=True).clamp(min=1)
        fingerprint = torch.einsum("bt,btd->bd", weights, x.float())
        top = fingerprint.abs().topk(self.active, dim=-1).indices
        masks = torch.zeros(fingerprint.shape, dtype=torch.bool, device=x.device)
        return masks.scatter_(-1, self.permutation[top], True)

    def _within(self, masks: torch.Tensor) -> torch.Tensor:
        """Whether each mask shares at least `threshold` of its columns with a held edit's."""
        stored = self._stored_masks()
        if stored is None:
            return torch.zeros(masks.shape[0], dtype=torch.bool, device=masks.device)
        overlap = (masks.float() @ stored.T).amax(dim=1) / self.active
        return overlap >= self.config.threshold

    def _memory_output(self, x: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """W_m (M ⊙ x) for each row's own mask, float32."""
        return F.linear(x.float() * masks[:, None, :], self.memory)

    def _on_module(self, module: nn.Module, args: tuple, output: torch.Tensor) -> Any:
        x = args[0]
        training = getattr(self._local, "training", None)
        if training is not None:
            return (output.float() + self._memory_output(x, training)).to(output.dtype)
        if self._watch.extends_cache:
            routing = getattr(self._local, "routing", None)
            if routing is None:
                return None
            if routing[0].shape[0] != output.shape[0]:
                raise RuntimeError(
                    f"a pass extending a KV cache of {output.shape[0]} sequences follows a "
                    f"prompt pass of {routing[0].shape[0]}; run the prompts through the model first"
                )
        else:
            self._local.routing = None
            if self._stored_masks() is None:
                return None
            masks = self._masks(x)
            self._local.routing = routing = (masks, self._within(masks).nonzero()[:, 0])
        masks, rows = routing
        if rows.numel() == 0:
            return None
        edited = output.clone()
        read = self._memory_output(x[rows], masks[rows])
        edited[rows] = (output[rows].float() + read).to(output.dtype)
        return edited

    # Editing -----------------------------------------------------------------------------------

    def apply(self, batch: Sequence[EditRequest]) -> MemoryEdit:
        """Train the memory through each edit's own mask; only the masked columns change."""
        if not batch:
            raise ValueError("an edit batch must hold at least one request")
        tokens = edit_batch(self.handle, [r.prompt for r in batch], [r.target_new for r in batch])
        before = self._snapshot()
        optimizer = torch.optim.Adam([self.memory], lr=self.config.lr)
        captured: list[torch.Tensor] = []
        capture = self.handle.module(self.module_name).register_forward_pre_hook(
            lambda module, args: captured.append(self._masks(args[0]))
        )
        try:
            with self.handle.frozen_below(self._layer, tokens):
                with torch.no_grad(), self.handle.prompt_ends(tokens.prompt_ends):
                    self.handle.model.base_model(
                        input_ids=tokens.input_ids,
                        attention_mask=tokens.attention_mask,
                        position_ids=tokens.position_ids,
                        use_cache=False,
                    )
                capture.remove()
                masks = self._local.training = captured[0]
                step, probability = train_until_likely(
                    self.handle, tokens, optimizer, self.config.steps, self.config.early_stop
                )
            logger.debug(
                "memoir batch of %d: %d steps, p(target) %.3f", len(batch), step, probability
            )
            deltas, after = self._settle(before)
        except BaseException:
            self._set_tensors(before)
            raise
        finally:
            capture.remove()
            self._local.training = None
        held = {"masks": masks}
        record = self._add_batch(self._held_batch(held, batch))
        return MemoryEdit(self, record, held, deltas, before, after)

    def _held_batch(self, held: dict[str, torch.Tensor], requests: Sequence[EditRequest]) -> _Masks:
        """The batch's masks (`requests` are not needed)."""
        return _Masks(held["masks"].to(self.memory.device).bool())

    # Saving ------------------------------------------------------------------------------------

    def save(self, directory: str | Path) -> None:
        """The memory and every held edit's mask as safetensors, the settings as JSON."""
        stored = self._stored_masks()
        if stored is None:
            stored = torch.zeros(0, self.memory.shape[1])
        masks = stored.bool()
        record = {
            "config": {**asdict(self.config), "layers": str(self._layer)},
            "module": self.module_name,
            "edits": int(masks.shape[0]),
        }
        self._write(directory, {"memory": self.memory.detach(), "masks": masks}, record)

    def load(self, directory: str | Path) -> None:
        """Take over a saved memory, its masks and its settings.

        Shapes are checked against this model before anything changes. The
        loaded edits count as one earlier batch that cannot be undone; batches
        applied before loading can no longer be undone.
        """
        record, tensors = self._read(directory)
        try:
            config = MemoirConfig(**record["config"])
        except TypeError as error:
            raise ValueError(f"{directory}: unknown settings ({error})") from None
        shape = tuple(self.handle.weight_of(self._resolve(config)).shape)
        memory, masks = tensors["memory"], tensors["masks"]
        if tuple(memory.shape) != shape or masks.shape[1:] != shape[1:]:
            raise ValueError(
                f"{directory}: a memory of shape {tuple(memory.shape)} does not fit "
                f"'{record['module']}' ({shape})"
            )
        self._build(config)
        with torch.no_grad():
            self.memory.copy_(memory)
        if masks.shape[0]:
            self._add_batch(self._held_batch({"masks": masks}, []))
