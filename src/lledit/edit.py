"""The edit core every layer shares: the method protocol, applied batches, exact weight deltas."""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, ClassVar, Generic, Protocol, TypeVar, runtime_checkable

import torch
import torch.nn.functional as F

from lledit.data.request import EditRequest
from lledit.model import ModelHandle

T = TypeVar("T")


class NonFiniteUpdateError(RuntimeError):
    """An edit produced NaN or infinite values; the model was left unchanged."""


class AppliedEdit(Protocol):
    """One applied batch: records what changed so that `undo` can revert it."""

    def undo(self) -> None: ...


@runtime_checkable
class EditMethod(Protocol):
    """An editor bound to one model.

    `prepare` does one-off work (statistics, loading a trained network) and is
    timed as set-up; `apply` writes one batch into the model (an empty batch is
    a ValueError) and returns what undoes it exactly. `config_dict` is the
    JSON record of the settings, with `modules`, the names of the modules the
    method edits as resolved on this model. An editor whose later batches
    depend on earlier ones (held keys, a memory) records that in the applied
    batch's `held` and takes it back after a restart with
    `hold(held, requests) -> release`. `memory_share` counts the bytes it
    will hold on the model's device beyond the weights (see `lledit.footprint`);
    it works on a handle whose weights are on the meta device, so that a model
    is refused before it loads.
    `tests/test_contract.py` checks every registered method against this.
    """

    name: ClassVar[str]

    def prepare(self) -> None: ...

    def memory_share(self) -> int: ...

    def apply(self, batch: Sequence[EditRequest]) -> AppliedEdit: ...

    def config_dict(self) -> dict[str, Any]: ...


def edits_weights(method: EditMethod) -> bool:
    """Whether every batch the method applies is a `WeightDelta` (or changes nothing).

    Only such batches can be journaled and replayed. Methods that keep edits
    in their own memory (adapters, a codebook) say so with the class
    attribute `edits_weights = False`; the rest need not declare anything.
    """
    return getattr(method, "edits_weights", True)


class NoChange:
    """The record of a batch that changed nothing."""

    def undo(self) -> None:
        return None


def _added(weight: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """`weight + delta`, computed in float32 and stored in the weight's dtype.

    Every application of a delta (editing, undo, replaying a journal) goes
    through this one expression, so replaying the same deltas in the same
    order gives the same weights bit for bit.
    """
    return (weight.float() + delta.to(weight.device).float()).to(weight.dtype)


class WeightDelta:
    """Weight deltas added to some modules, undoable exactly.

    The weights as they were before the edit are kept in host memory, so a
    record holds no accelerator memory beyond its deltas. Undoing the latest
    edit restores them bit for bit; if the weights moved on since (a later
    edit that is still applied), the delta that this edit added is subtracted.
    """

    def __init__(
        self,
        handle: ModelHandle,
        before: dict[str, torch.Tensor],
        deltas: dict[str, torch.Tensor],
        on_undo: Callable[[], None] | None = None,
        held: dict[str, torch.Tensor] | None = None,
    ) -> None:
        self._handle = handle
        self.before = before
        self.deltas = deltas
        """The (d_out, d_in) float32 delta added to each module's weight."""
        self.on_undo = on_undo
        """What the editor forgets of this batch once it is undone (the keys it
        holds); a journal that rebuilds the weights itself calls it alone."""
        self.held = held or {}
        """What the editor holds of this batch for later ones (its keys, per module);
        a journal keeps it, and a restarted editor takes it back with `hold`."""
        self._undone = False

    @torch.no_grad()
    def undo(self) -> None:
        if self._undone:
            raise RuntimeError("this edit was already undone")
        for name, before in self.before.items():
            weight = self._handle.weight_of(name)
            before = before.to(weight.device)
            if torch.equal(weight, _added(before, self.deltas[name])):
                weight.copy_(before)
            else:
                weight.copy_(_added(weight, -self.deltas[name]))
        if self.on_undo is not None:
            self.on_undo()
        self._undone = True


@torch.no_grad()
def added_weights(
    weights: Mapping[str, torch.Tensor],
    deltas: Mapping[str, torch.Tensor],
    *,
    check: bool = True,
) -> dict[str, torch.Tensor]:
    """New tensors `weight + delta` for each delta, all checked before any is returned.

    Shapes and finiteness of the deltas and of the sums are checked, so a
    rejected update changes nothing anywhere. A journal replaying deltas that
    passed these checks when they were applied (their files' hashes match)
    passes `check=False`: the same sums come out, and checking every entry
    again dominated start-up.
    """
    if not check:
        return {name: _added(weights[name], delta) for name, delta in deltas.items()}
    for name, delta in deltas.items():
        if delta.shape != weights[name].shape:
            raise ValueError(
                f"delta for '{name}' has shape {tuple(delta.shape)}, "
                f"the weight has {tuple(weights[name].shape)}"
            )
        if not torch.isfinite(delta).all():
            raise NonFiniteUpdateError(
                f"the update for '{name}' is not finite; the batch was rejected "
                "and the model left unchanged"
            )
    updated = {name: _added(weights[name], delta) for name, delta in deltas.items()}
    for name, value in updated.items():
        if not torch.isfinite(value).all():
            raise NonFiniteUpdateError(
                f"adding the update to '{name}' overflows {value.dtype}; "
                "the batch was rejected and the model left unchanged"
            )
    return updated


@torch.no_grad()
def add_weight_deltas(handle: ModelHandle, deltas: Mapping[str, torch.Tensor]) -> None:
    """Add each (d_out, d_in) delta to its module's weight, all or nothing (`added_weights`).

    Keeps no undo record: replaying a journal needs none.
    """
    weights = {name: handle.weight_of(name) for name in deltas}
    for name, value in added_weights(weights, deltas).items():
        weights[name].copy_(value)


def apply_weight_deltas(
    handle: ModelHandle,
    deltas: Mapping[str, torch.Tensor],
    held: dict[str, torch.Tensor] | None = None,
    hold: Callable[[dict[str, torch.Tensor]], Callable[[], None]] | None = None,
) -> WeightDelta:
    """`add_weight_deltas`, returning the record that undoes it exactly.

    The record takes the deltas as they are (float32 ones are not copied), so
    the caller must not change them afterwards. `held` is what the editor
    keeps of the batch for later ones; once the deltas are in, `hold(held)`
    gives it to the editor, and what that returns is what the undo releases.
    A batch that is rejected is never held.
    """
    before = {name: handle.weight_of(name).detach().to("cpu", copy=True) for name in deltas}
    add_weight_deltas(handle, deltas)
    deltas = {name: delta.detach().float() for name, delta in deltas.items()}
    release = None if hold is None or held is None else hold(held)
    return WeightDelta(handle, before, deltas, release, held)


def replayable_generator(seed: int, *texts: str) -> torch.Generator:
    """A generator seeded by `seed` and `texts` alone (the prompts it draws for), so
    that a stream replayed from a journal draws what the uninterrupted one drew,
    whatever was edited or undone before."""
    digest = hashlib.sha256("\n".join([str(seed), *texts]).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))


class HeldBatches(Generic[T]):
    """What an editor holds of each applied batch for later ones, in order, and the
    state it derives from them (held keys' sums, normalisation statistics).

    The state is always `add` folded over the batches still held, from `reset`:
    releasing a batch forms it again rather than taking the batch out, so it is
    bit for bit what an editor that never held the batch has (one restarted
    from a journal, say).
    """

    def __init__(
        self,
        reset: Callable[[], None] | None = None,
        add: Callable[[T], None] | None = None,
    ) -> None:
        self.items: list[T] = []
        self._reset = reset or (lambda: None)
        self._add = add or (lambda item: None)
        self._reset()

    def hold(self, item: T) -> Callable[[], None]:
        """Hold `item` after the others; returns what releases it."""
        self.items.append(item)
        self._add(item)
        return functools.partial(self.release, item)

    def release(self, item: T) -> None:
        self.items = [held for held in self.items if held is not item]
        self._reset()
        for held in self.items:
            self._add(held)


def trainable_deltas(handle: ModelHandle, names: Sequence[str]) -> dict[str, torch.Tensor]:
    """A zero float32 (d_out, d_in) delta per module, to train under `added_deltas`."""
    return {
        name: torch.zeros(
            handle.weight_of(name).shape,
            device=handle.weight_of(name).device,
            dtype=torch.float32,
            requires_grad=True,
        )
        for name in names
    }


@contextmanager
def added_deltas(handle: ModelHandle, deltas: Mapping[str, torch.Tensor]) -> Iterator[None]:
    """Run the model as if each (d_out, d_in) delta were added to its module's weight.

    The weights are not touched, so nothing needs restoring if computing the
    rest of an update fails.
    """

    def hook_for(delta: torch.Tensor):
        def add(module, inputs, output):
            return output + F.linear(inputs[0], delta.to(inputs[0].dtype))

        return add

    hooks = [
        handle.module(name).register_forward_hook(hook_for(delta)) for name, delta in deltas.items()
    ]
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()
