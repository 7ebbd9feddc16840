"""The editing losses a hypernetwork is trained on, and their gradient w.r.t. the edited weights.

The gradient with respect to each edited weight is read through a zero "probe"
added to the module's output (`output + probe x`), so it comes out in the
(d_out, d_in) orientation for `nn.Linear` and GPT-2's `Conv1D` alike and no
model parameter ever needs `requires_grad`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lledit.hypernet.capture import sequence_losses
from lledit.model import ModelHandle, batch_tokens
from lledit.tokens import EncodedPair


@dataclass
class LossBatch:
    """The pairs one batch of training edits is judged on.

    `rephrases`: the edit prompt and its rephrases with the new target;
    `locality`: unrelated prompts with their answers, whose predictive
    distributions must not move.
    """

    rephrases: list[EncodedPair]
    locality: list[EncodedPair]


@dataclass
class LossParts:
    total: torch.Tensor
    rephrase: float
    locality: float
    drift: float = 0.0


def locality_log_probs(handle: ModelHandle, batches: Sequence[LossBatch]) -> torch.Tensor:
    """Log-probabilities of the model as it is now at every locality answer token."""
    tokens = batch_tokens(handle, [pair for batch in batches for pair in batch.locality])
    with torch.no_grad():
        return handle.target_logits(tokens).log_softmax(dim=-1)


def weighted_loss(
    handle: ModelHandle,
    batches: Sequence[LossBatch],
    weights: Sequence[float],
    reference: torch.Tensor,
    locality_weight: float,
    original_reference: torch.Tensor | None = None,
    drift_weight: float = 0.0,
) -> LossParts:
    """Σ_i w_i [CE(rephrases of batch i) + c_loc KL(reference ‖ model) on its locality prompts
    + c_drift KL(original_reference ‖ model) on the same prompts, when given].

    Every batch's pairs go through one forward pass. CE is the mean over a
    batch's pairs of their per-pair mean; KL is the mean over a batch's
    locality answer tokens.
    """
    rephrase_pairs = [pair for batch in batches for pair in batch.rephrases]
    locality_pairs = [pair for batch in batches for pair in batch.locality]
    tokens = batch_tokens(handle, rephrase_pairs + locality_pairs)
    logits = handle.target_logits(tokens)

    n_rephrases = len(rephrase_pairs)
    pair_weights = _spread([len(batch.rephrases) for batch in batches], weights)
    rephrase = (
        sequence_losses(logits, tokens)[:n_rephrases] * pair_weights.to(logits.device)
    ).sum()

    is_locality = tokens.target_rows >= n_rephrases
    log_probs = logits[is_locality].log_softmax(dim=-1)
    token_counts = [sum(len(pair.target_ids) for pair in batch.locality) for batch in batches]
    token_weights = _spread(token_counts, weights).to(logits.device)

    def divergence(reference: torch.Tensor) -> torch.Tensor:
        return ((reference.exp() * (reference - log_probs)).sum(dim=-1) * token_weights).sum()

    locality = divergence(reference)
    total = rephrase + locality_weight * locality
    if original_reference is None:
        return LossParts(total, rephrase.item(), locality.item())
    drift = divergence(original_reference)
    return LossParts(total + drift_weight * drift, rephrase.item(), locality.item(), drift.item())


def _spread(counts: Sequence[int], weights: Sequence[float]) -> torch.Tensor:
    """Each batch's weight shared evenly among its `count` items, batch after batch."""
    return torch.cat(
        [
            torch.full((count,), weight / count)
            for count, weight in zip(counts, weights, strict=True)
        ]
    )


def weight_gradients(
    handle: ModelHandle, module_names: Sequence[str], loss_fn
) -> tuple[LossParts, dict[str, torch.Tensor]]:
    """`loss_fn()` and its float32 gradient w.r.t. each named module's (d_out, d_in) weight."""
    weights = {name: handle.weight_of(name) for name in module_names}
    probes = {
        name: torch.zeros(w.shape, device=w.device, dtype=w.dtype).requires_grad_(True)
        for name, w in weights.items()
    }

    def add_probe(name: str):
        def hook(module, inputs, output):
            return output + F.linear(inputs[0], probes[name])

        return hook

    hooks = [handle.module(name).register_forward_hook(add_probe(name)) for name in module_names]
    try:
        with torch.enable_grad():
            parts = loss_fn()
            grads = torch.autograd.grad(parts.total, list(probes.values()))
    finally:
        for hook in hooks:
            hook.remove()
    return parts, {
        name: grad.float().to(handle.device) for name, grad in zip(module_names, grads, strict=True)
    }
