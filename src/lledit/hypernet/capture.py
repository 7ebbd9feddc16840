"""Keys and value gradients of the edited modules on the answer tokens.

The weight gradient of a linear module is a sum over tokens of `g kᵀ` (value
gradient times key), so the (k, g) pairs of the positions that predict the
answer are a rank-one-per-token factorisation of it. They are what the
hypernetwork reads, and what UltraEdit's closed form is computed from. One
forward and one backward through the model per batch; no weight of the model
receives a gradient.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lledit.model import ModelHandle, at_positions
from lledit.tokens import TokenBatch


@dataclass
class Captured:
    """Float32 keys (tokens, d_in) and value gradients (tokens, d_out) of one module."""

    keys: torch.Tensor
    value_grads: torch.Tensor


def keys_of(captured: Mapping[str, Captured]) -> dict[str, torch.Tensor]:
    """Each module's keys alone: what an editor holds of a batch, without its gradients."""
    return {name: module.keys for name, module in captured.items()}


def sequence_losses(logits: torch.Tensor, tokens: TokenBatch) -> torch.Tensor:
    """Cross-entropy of each pair's target, averaged over its own tokens.

    Averaging per sequence (not over the whole batch) keeps the size of each
    edit's gradient independent of the batch size it came in.
    """
    token_losses = F.cross_entropy(logits, tokens.target_ids, reduction="none")
    lengths = torch.tensor(tokens.target_lengths, device=logits.device, dtype=logits.dtype)
    per_sequence = torch.zeros(len(tokens.target_lengths), device=logits.device)
    return per_sequence.index_add(0, tokens.target_rows, token_losses) / lengths


def capture_gradients(
    handle: ModelHandle, module_names: Sequence[str], tokens: TokenBatch
) -> dict[str, Captured]:
    """(k, g) of every module in `module_names` at the positions that predict a target token.

    The loss is the sum over pairs of their mean token cross-entropy. The
    backward pass stops at the lowest edited module, since nothing below it
    needs a gradient.
    """
    rows, positions = tokens.target_rows, tokens.target_positions - 1
    device = handle.device  # a sharded model's modules may sit elsewhere
    keys: dict[str, torch.Tensor] = {}
    value_grads: dict[str, torch.Tensor] = {}
    hooks = []

    def recorder(name: str):
        def record(module, inputs, output):
            keys[name] = at_positions(inputs[0], rows, positions).detach().float().to(device)
            if not output.requires_grad:
                output.requires_grad_(True)

            def record_grad(grad: torch.Tensor) -> None:
                value_grads[name] = at_positions(grad, rows, positions).detach().float().to(device)

            output.register_hook(record_grad)

        return record

    try:
        for name in module_names:
            hooks.append(handle.module(name).register_forward_hook(recorder(name)))
        with torch.enable_grad():
            loss = sequence_losses(handle.target_logits(tokens), tokens).sum()
            loss.backward()
    finally:
        for hook in hooks:
            hook.remove()
    missing = [name for name in module_names if name not in value_grads]
    if missing:
        raise RuntimeError(f"no gradient reached {missing}; do they feed the output?")
    return {name: Captured(keys[name], value_grads[name]) for name in module_names}
