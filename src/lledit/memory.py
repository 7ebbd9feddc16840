"""What the memory editors (ELDER, GRACE, MEMOIR) share.

They leave the model's weights alone: their edits live in the editor, attached
to the model as forward hooks, and decide once per sequence (with
`SequenceWatch`) what every token of it gets. Applied batches are held in
order so that any one can be undone exactly, and the whole memory saves to a
folder as one safetensors file and one JSON file.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch.utils.hooks import RemovableHandle

from lledit.data.request import EditRequest
from lledit.edit import added_weights
from lledit.footprint import FLOAT32, TRAINED
from lledit.model import ModelHandle, SequenceWatch
from lledit.tokens import TokenBatch

logger = logging.getLogger(__name__)


def train_until_likely(
    handle: ModelHandle,
    tokens: TokenBatch,
    optimizer: torch.optim.Optimizer,
    steps: int,
    early_stop: float,
) -> tuple[int, float]:
    """Step `optimizer` on the targets' cross-entropy until their geometric mean
    probability reaches `early_stop` or `steps` steps have run; the steps taken and
    that probability. The editor's hooks decide what the optimizer trains."""
    for step in range(steps + 1):
        loss = F.cross_entropy(handle.target_logits(tokens), tokens.target_ids)
        probability = math.exp(-loss.item())
        if probability >= early_stop or step == steps:
            break
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return step, probability


class HeldBatch:
    """One applied batch as the editor holds it; `undone` once it is undone."""

    undone: bool = False


class MemoryEdit:
    """One batch applied by a memory editor: undo removes exactly that batch.

    `held` is what a journal keeps of it, for the editor's `hold` to put back
    after a restart. `deltas` are the changes to the editor's own tensors
    (`tensors()`), which a journal replays and undoes itself; `on_undo` is
    then all it asks of the editor once it has.
    """

    def __init__(
        self,
        editor: MemoryEditor,
        batch: HeldBatch,
        held: dict[str, torch.Tensor] | None = None,
        deltas: dict[str, torch.Tensor] | None = None,
        before: dict[str, torch.Tensor] | None = None,
        after: dict[str, torch.Tensor] | None = None,
    ) -> None:
        self._editor = editor
        self._batch = batch
        self.held = held or {}
        self.deltas = deltas or {}
        self._before = before or {}
        self._after = after or {}
        """The editor's tensors around the batch (by `tensors()` name), kept only
        as long as this record: a journal drops it and undoes the deltas itself."""
        self.on_undo = functools.partial(editor._undo, batch)
        """Forget the batch, leaving the editor's tensors to whoever undid their
        deltas; it does not keep this record (and `before`, `after`) alive."""

    def undo(self) -> None:
        self._editor._undo(self._batch, self._take_back)

    @torch.no_grad()
    def _take_back(self) -> None:
        """Put the editor's tensors back to before the batch.

        Undoing the latest batch restores them bit for bit. If later batches
        changed them since, the change this batch made is subtracted instead.
        """
        current = self._editor.tensors()
        if all(torch.equal(current[name], after) for name, after in self._after.items()):
            for name, before in self._before.items():
                current[name].copy_(before)
        else:
            for name, before in self._before.items():
                current[name].sub_(self._after[name] - before)


class MemoryEditor:
    """Hooks owned by the editor, per-thread state, held batches and the saved folder.

    A subclass sets `label` and the two file names, attaches its hooks with
    `_attach`, builds what it holds of a batch in `_held_batch` (from a batch
    just applied, or from a journal's record after a restart), adds it with
    `_add_batch`, and drops in `_changed` whatever it caches from the held
    batches.
    """

    edits_weights: ClassVar[bool] = False
    label: ClassVar[str]
    """How messages name the method (e.g. "ELDER")."""
    tensors_file: ClassVar[str]
    config_file: ClassVar[str]
    name: ClassVar[str]

    def __init__(self, handle: ModelHandle) -> None:
        self.handle = handle
        self._hooks: list[RemovableHandle] = []
        self._watch: SequenceWatch | None = None
        self._local = threading.local()
        """Per-thread state of the forward in progress (training, routing)."""
        self._batches: list[Any] = []

    def _attach(self, hooks: list[RemovableHandle]) -> None:
        """Start watching sequences and keep `hooks` (registered by the subclass) to remove."""
        self._watch = SequenceWatch(self.handle)
        self._hooks = hooks

    def remove(self) -> None:
        """Detach every hook: the model behaves as if the editor never existed."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        if self._watch is not None:
            self._watch.remove()
            self._watch = None

    def prepare(self) -> None:
        return None

    def memory_share(self) -> int:
        """The trained tensors with Adam's state, and the three copies a batch
        makes of them (before, change, after). What grows with the edits held
        (keys, codes, a codebook) is left out: the stream's length is not known
        when the model loads."""
        values = sum(tensor.numel() for tensor in self.tensors().values())
        return (TRAINED + 3 * FLOAT32) * values

    def _one_module(self, layers: str | None, part: str, only: Literal["first", "last"]) -> str:
        """The one module `layers` and `part` name (by default `only` the first or the
        last layer of the `upper` band), or a ValueError naming them all."""
        modules = self.handle.edited_modules(layers, part, "upper", only=only)
        if len(modules) != 1:
            raise ValueError(
                f"{self.label} adapts one module, but layers {layers!r} with part "
                f"{part!r} name {len(modules)}: {', '.join(modules)}"
            )
        return modules[0]

    def tensors(self) -> dict[str, torch.Tensor]:
        """The editor's own tensors that batches change by `MemoryEdit.deltas`, by name
        (none by default: the batch's held part is the whole change)."""
        return {}

    def _snapshot(self) -> dict[str, torch.Tensor]:
        """A copy of `tensors()`, to train from and to go back to."""
        return {name: tensor.detach().clone() for name, tensor in self.tensors().items()}

    @torch.no_grad()
    def _set_tensors(self, values: dict[str, torch.Tensor]) -> None:
        current = self.tensors()
        for name, value in values.items():
            current[name].copy_(value)

    @torch.no_grad()
    def _settle(
        self, before: dict[str, torch.Tensor]
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """The change training made to `tensors()` since `before`, and the tensors
        after it, set to `before + change`: the one expression a journal replays,
        so that a replay gives them bit for bit. A non-finite change is refused
        (`NonFiniteUpdateError`) before anything is set; the caller puts `before`
        back."""
        deltas = {
            name: (tensor.detach() - before[name]).float()
            for name, tensor in self.tensors().items()
        }
        after = added_weights(before, deltas)
        self._set_tensors(after)
        return deltas, after

    def _held_batch(
        self, held: dict[str, torch.Tensor], requests: Sequence[EditRequest]
    ) -> HeldBatch:
        """What the editor holds of a batch, from what a journal keeps of it."""
        raise NotImplementedError

    def _add_batch(self, batch: HeldBatch) -> HeldBatch:
        self._batches.append(batch)
        self._changed()
        return batch

    def hold(
        self, held: dict[str, torch.Tensor], requests: Sequence[EditRequest]
    ) -> Callable[[], None]:
        """Hold a journaled batch again after a restart (the journal has put its change
        to `tensors()` back); returns what forgets it."""
        return functools.partial(self._undo, self._add_batch(self._held_batch(held, requests)))

    def _changed(self) -> None:
        """Drop what is cached from the held batches, now that they changed."""

    def _undo(self, batch: Any, take_back: Callable[[], None] | None = None) -> None:
        """Stop holding `batch`, after `take_back` has undone its change to the tensors."""
        if batch.undone:
            raise RuntimeError("this edit was already undone")
        if batch not in self._batches:
            raise RuntimeError(
                "this edit is no longer held by the editor (it loaded a saved state since)"
            )
        if take_back is not None:
            take_back()
        self._batches.remove(batch)
        batch.undone = True
        self._changed()

    def _write(
        self, directory: str | Path, tensors: dict[str, torch.Tensor], record: dict[str, Any]
    ) -> None:
        """The memory's tensors as safetensors and `record` (with method and model) as JSON."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {key: value.detach().cpu().contiguous() for key, value in tensors.items()}
        save_file(tensors, str(directory / self.tensors_file))
        record = {"method": self.name, "model": self.handle.name, **record}
        (directory / self.config_file).write_text(json.dumps(record, indent=2) + "\n")

    def _read(self, directory: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """The record and tensors `_write` left in `directory`, written by this method."""
        directory = Path(directory)
        if not (directory / self.config_file).is_file():
            raise FileNotFoundError(
                f"no saved {self.label} editor in {directory} (missing {self.config_file})"
            )
        record = json.loads((directory / self.config_file).read_text())
        if record.get("method") != self.name:
            raise ValueError(
                f"{directory} holds a '{record.get('method')}' editor, not {self.label}"
            )
        if record["model"] != self.handle.name:
            logger.warning(
                "loading %s saved for model '%s' into '%s'",
                self.label,
                record["model"],
                self.handle.name,
            )
        return record, load_file(str(directory / self.tensors_file))
