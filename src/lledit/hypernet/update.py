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


PRECISION_COLUMNS = 2048
"""Columns of a float32 P made float64 at a time: a 14336-wide P is never
copied whole (1.6 GB in float64), only 2048 of its columns (0.23 GB)."""


def times_precision(keys64: torch.Tensor, precision: torch.Tensor) -> torch.Tensor:
    """K P in float64, for float64 keys and a float32 or float64 P, without a float64
    copy of a float32 P."""
    if precision.dtype == torch.float64:
        return keys64 @ precision
    return torch.cat(
        [keys64 @ block.double() for block in precision.split(PRECISION_COLUMNS, dim=1)], dim=1
    )


class _RidgeSolve(torch.autograd.Function):
    """ΔW = Dᵀ (K P Kᵀ + e^λ I)⁻¹ K P, with the meta-gradient written out.

    This is MALMEN's least-squares solution (KᵀK + e^λ C)⁻¹ KᵀD,
    with P = C⁻¹ (C = I unless key statistics are given), transposed to
    (d_out, d_in) and solved in the tokens x tokens form, which is much smaller
    than d_in x d_in. Backward: with G = ∂L/∂ΔW and S = K P Kᵀ + e^λ I,
    ∂L/∂D = S⁻¹ K P Gᵀ (which equals K M with M = (KᵀK + e^λ C)⁻¹ Gᵀ) and
    ∂L/∂λ = -e^λ ⟨∂L/∂D, S⁻¹ D⟩ (= -e^λ ⟨M, C ΔWᵀ⟩). The keys and P are
    data, not parameters, and get no gradient.
    """

    @staticmethod
    def forward(ctx, keys, values, log_ridge, key_precision):
        # The tokens x tokens system is small; float64 keeps it solvable for any ridge.
        keys64 = keys.double()
        projected = keys64 if key_precision is None else times_precision(keys64, key_precision)
        ridge = log_ridge.double().exp()
        gram = projected @ keys64.T
        gram.diagonal().add_(ridge)
        factor = torch.linalg.cholesky(gram)
        solved = torch.cholesky_solve(values.double(), factor)
        ctx.save_for_backward(projected, factor, solved, ridge)
        return (solved.T @ projected).to(values.dtype)

    @staticmethod
    def backward(ctx, grad_delta):
        projected, factor, solved, ridge = ctx.saved_tensors
        grad_values = torch.cholesky_solve(projected @ grad_delta.double().T, factor)
        grad_log_ridge = -ridge * (grad_values * solved).sum()
        return None, grad_values.to(grad_delta.dtype), grad_log_ridge.to(grad_delta.dtype), None


def least_squares_update(
    keys: torch.Tensor,
    values: torch.Tensor,
    log_ridge: torch.Tensor,
    key_precision: torch.Tensor | None = None,
) -> torch.Tensor:
    """The update that maps each key to its value difference, all edits at once.

    Solving jointly keeps the edits of one batch from cancelling each other;
    the ridge e^λ keeps the solve well conditioned when keys are near-parallel.
    With `key_precision` = C⁻¹, C the second moment of the module's keys over
    ordinary text, the ridge penalises the change of ordinary outputs,
    e^λ E‖ΔW k‖², instead of e^λ ‖ΔW‖² (MEMIT's C₀).
    """
    return _RidgeSolve.apply(keys, values, log_ridge, key_precision)


def precision_with_keys(precision: torch.Tensor, keys: torch.Tensor, weight: float) -> torch.Tensor:
    """(P⁻¹ + w KᵀK)⁻¹ from P, by the Woodbury identity, in float64.

    Holding earlier edits' keys K in the ridge makes a later update leave
    their outputs alone. The (tokens x tokens) solve costs far less than
    inverting the d_in x d_in matrix. P is kept symmetric, and its correction
    formed as YᵀY through the Cholesky factor of the inner matrix: a P that
    drifts from symmetry over many held batches makes K P Kᵀ indefinite once
    the keys are large (a diverging model's), and the next ridge solve fails.
    """
    precision, keys = precision.double(), keys.double()
    projected = keys @ precision
    inner = projected @ keys.T
    inner.diagonal().add_(1 / weight)
    whitened = torch.linalg.solve_triangular(torch.linalg.cholesky(inner), projected, upper=False)
    held = precision - whitened.T @ whitened
    return held.add_(held.T.clone()).mul_(0.5)
