"""Sinkhorn-Knopp code assignment (SwAV, Caron et al. 2020, eq. 3 and its solution).

Q* = Diag(u) exp(C^T Z / epsilon) Diag(v): the codes are the exponentiated scores with one scaling per
prototype (u, length K) and one per sample (v, length B), chosen so that every prototype receives
1/K of the mass and every sample 1/B. We iterate on the two scaling vectors with matrix-vector products
instead of rescaling the whole K x B matrix twice per iteration, which reads the big matrix twice per
iteration and never writes it; the result is the same as the reference's alternating normalisation.
"""

from __future__ import annotations

import math

import torch

from swavkit.runtime import distributed


class NonFiniteCodesError(FloatingPointError):
    """Sinkhorn produced NaN/inf codes (almost always because the scores were already non-finite)."""


@torch.no_grad()
def sinkhorn(scores: torch.Tensor, epsilon: float = 0.05, n_iters: int = 3, *,
             dtype: torch.dtype = torch.float32, distributed_sums: bool = True,
             out: torch.Tensor | None = None, cuda_graph: bool = False) -> torch.Tensor:
    """Equipartitioned soft codes for a batch of prototype scores.

    Args:
        scores: [B, K] cosine scores of this rank's B samples against K prototypes (any float dtype;
            values far outside [-1, 1] are fine).
        epsilon: entropy regulariser; codes are exp(scores / epsilon) before rescaling.
        n_iters: Sinkhorn-Knopp iterations (each = one prototype step and one sample step).
        dtype: float32 by default; float64 for very small epsilon.
        distributed_sums: in a torch.distributed run, all-reduce the per-prototype sums so the
            constraint "every prototype gets 1/K of the mass" holds over the global batch.
        out: optional preallocated [B, K] ``dtype`` buffer that receives Q, so a training step allocates
            nothing of size B x K here (a fresh 4096 x 3000 tensor costs ~35 ms of page faults on a CPU).
        cuda_graph: opt-in; with CUDA scores and ``out`` in a one-process run, replay a captured CUDA
            graph of the iterations (one launch instead of ~25; same codes). Measured on an H200: 3x the
            eager call at B 1024, 1.4x at B 4096 (benchmarks/README.md). The trainer does not use it (see
            ``_CudaGraphs``).

    Returns:
        Q: [B, K] codes in ``dtype``; every row (sample) sums to 1 and every column (prototype) sums
        to about B_global / K over all ranks.

    Raises:
        NonFiniteCodesError: the scores themselves hold NaN/inf (checked with one host sync).
        ValueError: ``n_iters`` < 1.

    Example:
        >>> import torch, swavkit
        >>> embeddings = torch.nn.functional.normalize(torch.randn(256, 128), dim=1)   # [B, d], unit rows
        >>> prototypes = torch.nn.functional.normalize(torch.randn(3000, 128), dim=1)  # [K, d], unit rows
        >>> scores = embeddings @ prototypes.T                                          # [B, K] cosines
        >>> Q = swavkit.sinkhorn(scores, epsilon=0.05, n_iters=3)
        >>> tuple(Q.shape), torch.allclose(Q.sum(dim=1), torch.ones(256))
        ((256, 3000), True)
    """
    B, K = scores.shape
    if n_iters < 1:
        raise ValueError(f"sinkhorn: n_iters must be >= 1, got {n_iters}")
    # All-reduces only when other ranks exist: a one-process run has nothing to wait for.
    across_ranks = distributed_sums and distributed.world_size() > 1
    if cuda_graph and scores.is_cuda and out is not None and not across_ranks:
        Q, check = _GRAPHS.run(scores.detach(), epsilon, n_iters, dtype, out)
    else:
        Q, check = _scaled_codes(scores.detach().to(dtype), epsilon, n_iters, across_ranks, out)
    # Beyond roughly 85 nats of spread (fp32), e.g. epsilon 0.01 with outlying samples or prototypes, the
    # scalings themselves leave the float range; the log-domain version then gives the right answer
    # slowly. ``check`` is one number, non-finite exactly then (see _scaled_codes): one sync, not B x K.
    # Across ranks the decision must be the same everywhere: the fallback runs all-reduces of its own, and
    # ranks that took different branches would wait for each other forever.
    if _any_rank(~torch.isfinite(check), across_ranks):
        if _any_rank(~torch.isfinite(scores).all(), across_ranks):
            raise NonFiniteCodesError(
                "Sinkhorn got non-finite prototype scores (NaN/inf). Likely causes: a learning rate that is too "
                "high, or fp16 overflow in the backbone (use train.precision=bf16 or fp32)")
        B_global = torch.tensor([float(B)], dtype=dtype, device=scores.device)
        if across_ranks:
            distributed.all_reduce_sum(B_global)
        Q = _sinkhorn_log_domain(scores.detach().to(dtype), epsilon, n_iters, B_global, across_ranks)
        if out is not None:
            Q = out.copy_(Q)
    return Q


def _any_rank(flag: torch.Tensor, across_ranks: bool) -> bool:
    """A 0-d bool flag -> True if it is set on this rank (or, across ranks, on any rank). One host sync."""
    if across_ranks:
        flag = distributed.all_reduce_max(flag.float().reshape(1))[0] > 0
    return bool(flag)


def _scaled_codes(S: torch.Tensor, epsilon: float, n_iters: int, across_ranks: bool,
                  out: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The scaling iterations on S [B, K] -> (Q [B, K] (in ``out`` when given), check: a 0-d tensor that
    is finite exactly when Q can be trusted). No host sync and no host-to-device copy unless
    ``across_ranks``, so a CUDA graph can capture it."""
    B, K = S.shape
    # Overflow: exp(scores / epsilon) is e^20 at cosine 1 and epsilon 0.05 (fp16 max is 65504), and far
    # more for unnormalised scores. We factor Q0 = exp((S - m) / epsilon) with m the global max as
    # P * v0, where P = exp((S - m_b) / epsilon) uses each sample's own max m_b (every column of P has
    # a 1, so it never underflows to all zeros) and v0_b = exp((m_b - m) / epsilon) <= 1. A global
    # factor is removed by the first prototype step, so this is exactly the reference algorithm, with
    # every exponent <= 0. Where the reference's columns underflow to 0/0 = NaN, v0_b is 0 and the
    # first sample step restores a finite scaling.
    sample_max = S.amax(dim=1, keepdim=True)  # [B, 1]
    global_max = sample_max.max().reshape(1)
    if across_ranks:
        distributed.all_reduce_max(global_max)
    P = torch.sub(S, sample_max, out=out).mul_(1.0 / epsilon).exp_()  # [B, K], values in (0, 1]
    v = (sample_max.squeeze(1) - global_max).mul_(1.0 / epsilon).exp_()  # [B] per-sample scaling

    # The iterations below carry the scalings pre-multiplied by the constants of the constraints, so that
    # each half-step is a matrix-vector product and a division (fewer kernels: on a GPU their launches,
    # not the arithmetic, are the cost). With u, v the textbook scalings (Q = Diag(v) P Diag(u) up to the
    # final factor B) they are w = K v and x = B u. The loop starts from w = v0 instead of K v0, so the
    # first prototype step divides B / K instead of B (no extra kernel for the factor K, and x stays
    # B u from the start, where overflow is judged).
    if across_ranks:
        B_global = torch.tensor([float(B)], dtype=S.dtype, device=P.device)
        distributed.all_reduce_sum(B_global)
        first_numerator = B_global / K
    else:
        # a 0-d CPU tensor is a scalar to ops on any device (torch.div needs a tensor numerator)
        B_global = torch.tensor(float(B), dtype=S.dtype)
        first_numerator = torch.tensor(float(B) / K, dtype=S.dtype)
    K_scalar = torch.tensor(float(K), dtype=S.dtype)

    w = v
    for i in range(n_iters):
        # prototype step: x_k = B_global / (P^T w)_k makes every prototype's mass 1/K
        row_sums = torch.mv(P.t(), w)  # [K]
        if across_ranks:
            distributed.all_reduce_sum(row_sums)
        # A sum so small that x_k overflows (every exponent of that prototype underflowed, or nearly)
        # gives x_k = 0 instead of inf, and inf * 0 = NaN in the codes; a NaN sum (NaN scores) also
        # gives 0. Either way the prototype would get no mass, which the exact solution never does:
        # ``check`` below sends such a result to the log-domain fallback.
        x = torch.div(first_numerator if i == 0 else B_global, row_sums)
        x = x.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)  # [K]
        # sample step: w_b = K / (P x)_b makes every sample's codes sum to 1 (after the final step)
        col_sums = torch.mv(P, x)  # [B]
        if i + 1 < n_iters:
            w = torch.div(K_scalar, col_sums)
    # Q = Diag(1 / (P x)) P Diag(x): rows sum to exactly 1, as the reference's final "Q *= B".
    Q = P.mul_(x).div_(col_sums.unsqueeze(1))
    # Rows sum to 1, so Q.sum() is ~B unless some entry is NaN/inf; dividing by the smallest prototype
    # scaling makes it inf too when a prototype got no mass (x_k = 0).
    return Q, Q.sum() / x.amin()


class _CudaGraphs:
    """Captured CUDA graphs of ``_scaled_codes``, one per (shape, dtypes, epsilon, iterations, ``out``).

    On a GPU one call is ~25 small kernels, so its cost is the host launching them, not the GPU: an H200
    took ~410 us per eager call at both B 1024 and 4096 (K 3000), where the arithmetic takes a fraction.
    A replay launches them all at once. A caller that passes the same ``out`` buffer every step needs a
    handful of graphs; the oldest is dropped beyond ``capacity``.

    Why the trainer leaves it off: captured in torch's default "global" mode, the capture raced with the
    DataLoader's pin-memory thread (its cudaHostAlloc invalidates a global capture) and killed 2 of 3
    GPU training runs. "thread_local" mode, used below, is PyTorch's documented answer to exactly that,
    but no GPU training run has confirmed it yet, and the gain is under 1 % of a resnet50 step.
    """

    def __init__(self, capacity: int = 4):
        self.capacity = capacity
        # key -> (static scores, graph, static check); the graph writes Q into the caller's ``out``
        self.entries: dict[tuple, tuple[torch.Tensor, torch.cuda.CUDAGraph, torch.Tensor]] = {}

    def run(self, scores: torch.Tensor, epsilon: float, n_iters: int, dtype: torch.dtype,
            out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        key = (tuple(scores.shape), scores.dtype, dtype, float(epsilon), int(n_iters), scores.device,
               out.data_ptr(), tuple(out.shape), out.dtype)
        entry = self.entries.get(key)
        if entry is None:
            entry = self.entries[key] = self._capture(scores, epsilon, n_iters, dtype, out)
            while len(self.entries) > self.capacity:
                self.entries.pop(next(iter(self.entries)))
        static_scores, graph, check = entry
        static_scores.copy_(scores)
        graph.replay()
        return out, check

    @staticmethod
    def _capture(scores, epsilon, n_iters, dtype, out):
        static_scores = scores.clone()
        with torch.cuda.device(scores.device):
            # one eager run on a side stream first (cuBLAS handles and workspaces are created outside the capture)
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                _scaled_codes(static_scores.to(dtype), epsilon, n_iters, False, out)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            # thread_local: other threads' CUDA calls (the DataLoader's pinned allocations) must not
            # invalidate this capture
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                _, check = _scaled_codes(static_scores.to(dtype), epsilon, n_iters, False, out)
        return static_scores, graph, check


_GRAPHS = _CudaGraphs()


def _logsumexp_over_samples(L: torch.Tensor, distributed_sums: bool) -> torch.Tensor:
    """log sum_b exp(L[b, k]) over the samples of every rank -> [K]."""
    m = L.amax(dim=0)
    if distributed_sums:
        distributed.all_reduce_max(m)
    total = (L - m).exp().sum(dim=0)
    if distributed_sums:
        distributed.all_reduce_sum(total)
    return m + total.log()


def _sinkhorn_log_domain(S: torch.Tensor, epsilon: float, n_iters: int, B_global: torch.Tensor,
                         distributed_sums: bool) -> torch.Tensor:
    """Same iterations on log u and log v with log-sum-exp: never overflows, about 3x slower. S: [B, K]."""
    B, K = S.shape
    L = S / epsilon
    log_v = torch.zeros(B, dtype=S.dtype, device=S.device)
    log_B = B_global.log()
    for _ in range(n_iters):
        log_u = -math.log(K) - _logsumexp_over_samples(L + log_v.unsqueeze(1), distributed_sums)
        log_v = -log_B - torch.logsumexp(L + log_u.unsqueeze(0), dim=1)
    return (L + log_u.unsqueeze(0) + (log_v + log_B).unsqueeze(1)).exp_()
