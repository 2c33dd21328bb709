"""Sinkhorn-Knopp code assignment (SwAV, Caron et al. 2020, eq. 3 and its solution).

Q* = Diag(u) exp(C^T Z / epsilon) Diag(v): the codes are the exponentiated scores with one scaling per
prototype (u, length K) and one per sample (v, length B), chosen so that every prototype receives
1/K of the mass and every sample 1/B. We iterate on the two scaling vectors with matrix-vector products
instead of rescaling the whole K x B matrix twice per iteration, which reads the big matrix twice per
iteration and never writes it; the result is the same as the reference's alternating normalisation.
"""

from __future__ import annotations

import torch

from swavkit import distributed


class NonFiniteCodesError(FloatingPointError):
    """Sinkhorn produced NaN/inf codes (almost always because the scores were already non-finite)."""


@torch.no_grad()
def sinkhorn(scores: torch.Tensor, epsilon: float = 0.05, n_iters: int = 3, *,
             dtype: torch.dtype = torch.float32, distributed_sums: bool = True,
             check_finite: bool = False) -> torch.Tensor:
    """Equipartitioned soft codes for a batch of prototype scores.

    Args:
        scores: [B, K] cosine scores of this rank's B samples against K prototypes (any float dtype;
            values far outside [-1, 1] are fine).
        epsilon: entropy regulariser; codes are exp(scores / epsilon) before rescaling.
        n_iters: Sinkhorn-Knopp iterations (each = one prototype step and one sample step).
        dtype: float32 by default; float64 for very small epsilon.
        distributed_sums: in a torch.distributed run, all-reduce the per-prototype sums so the
            constraint "every prototype gets 1/K of the mass" holds over the global batch.
        check_finite: raise :class:`NonFiniteCodesError` on NaN/inf (one host sync).

    Returns:
        Q: [B, K] codes in ``dtype``; every row (sample) sums to 1 and every column (prototype) sums
        to about B_global / K over all ranks.
    """
    B, K = scores.shape
    # Subtracting each sample's own max cannot change the result (a per-sample factor is absorbed by
    # v) but it bounds every exponent by 0, so nothing can overflow, even at epsilon 0.01 in fp16
    # inputs, and it needs no communication since a sample lives on one rank.
    P = scores.detach().to(dtype)
    P = (P - P.amax(dim=1, keepdim=True)).mul_(1.0 / epsilon).exp_()  # [B, K], values in (0, 1]

    B_global = torch.tensor([float(B)], dtype=dtype, device=P.device)
    if distributed_sums:
        distributed.all_reduce_sum(B_global)

    tiny = torch.finfo(dtype).tiny
    v = torch.ones(B, dtype=dtype, device=P.device)  # per-sample scaling
    u = torch.empty(K, dtype=dtype, device=P.device)  # per-prototype scaling
    for _ in range(n_iters):
        # prototype step: row sums of Q = Diag(u) P^T Diag(v) must be 1/K
        row_sums = torch.mv(P.t(), v)  # [K]
        if distributed_sums:
            distributed.all_reduce_sum(row_sums)
        # A prototype whose every exponent underflowed (or went subnormal, whose reciprocal is inf)
        # gets no mass instead of inf * 0 = NaN.
        torch.where(row_sums > tiny, (row_sums * K).reciprocal(), torch.zeros_like(row_sums), out=u)
        # sample step: column sums must be 1/B_global
        col_sums = torch.mv(P, u)  # [B]
        v = (col_sums * B_global).reciprocal_()

    # Final column normalisation to sum 1 (reference: Q *= B after the last 1/B step).
    Q = P.mul_(u).mul_((v * B_global).unsqueeze(1))
    if check_finite and not bool(torch.isfinite(Q).all()):
        raise NonFiniteCodesError(
            "Sinkhorn produced non-finite codes: the prototype scores contain NaN/inf. Likely causes: a "
            "learning rate that is too high, or fp16 overflow in the backbone (use precision=bf16 or fp32)")
    return Q
