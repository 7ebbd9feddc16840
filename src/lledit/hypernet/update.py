"""Turning pseudo keys and gradients into a weight update (MEND; MALMEN and RLEdit).

All updates are in the (d_out, d_in) orientation of `nn.Linear` and in float32.
"""

from __future__ import annotations

import torch


def mend_update(
    pseudo_keys: torch.Tensor, pseudo_grads: torch.Tensor, log_lr: torch.Tensor
) -> torch.Tensor:
    """MEND: ΔW = -η Σ_tokens g̃ k̃ᵀ."""
    return -log_lr.exp() * pseudo_grads.T @ pseudo_keys


def value_differences(
    keys: torch.Tensor,
    pseudo_keys: torch.Tensor,
    pseudo_grads: torch.Tensor,
    log_lr: torch.Tensor,
) -> torch.Tensor:
    """MALMEN's per-token change of the module output: d = -η (k·k̃) g̃."""
    return -log_lr.exp() * (keys * pseudo_keys).sum(dim=1, keepdim=True) * pseudo_grads


class _RidgeSolve(torch.autograd.Function):
    """ΔW = Dᵀ (K Kᵀ + e^λ I)⁻¹ K, with the meta-gradient written out.

    This is the least-squares solution (KᵀK + e^λ I)⁻¹ KᵀD of DESIGN §3.1,
    transposed to (d_out, d_in) and solved in the tokens x tokens form, which
    is much smaller than d_in x d_in. Backward: with G = ∂L/∂ΔW and
    S = K Kᵀ + e^λ I, ∂L/∂D = S⁻¹ K Gᵀ (which equals K M with
    M = (KᵀK + e^λ I)⁻¹ Gᵀ) and ∂L/∂λ = -e^λ ⟨∂L/∂D, S⁻¹ D⟩ (= -e^λ ⟨M, ΔWᵀ⟩).
    The keys are data, not parameters, and get no gradient.
    """

    @staticmethod
    def forward(ctx, keys, values, log_ridge):
        # The tokens x tokens system is small; float64 keeps it solvable for any ridge.
        keys64 = keys.double()
        ridge = log_ridge.double().exp()
        gram = keys64 @ keys64.T
        gram.diagonal().add_(ridge)
        factor = torch.linalg.cholesky(gram)
        solved = torch.cholesky_solve(values.double(), factor)
        ctx.save_for_backward(keys64, factor, solved, ridge)
        return (solved.T @ keys64).to(values.dtype)

    @staticmethod
    def backward(ctx, grad_delta):
        keys64, factor, solved, ridge = ctx.saved_tensors
        grad_values = torch.cholesky_solve(keys64 @ grad_delta.double().T, factor)
        grad_log_ridge = -ridge * (grad_values * solved).sum()
        return None, grad_values.to(grad_delta.dtype), grad_log_ridge.to(grad_delta.dtype)


def least_squares_update(
    keys: torch.Tensor, values: torch.Tensor, log_ridge: torch.Tensor
) -> torch.Tensor:
    """The update that maps each key to its value difference, all edits at once.

    Solving jointly keeps the edits of one batch from cancelling each other;
    the ridge e^λ keeps the solve well conditioned when keys are near-parallel.
    """
    return _RidgeSolve.apply(keys, values, log_ridge)
