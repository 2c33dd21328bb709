import math

import pytest
import torch

from swavkit.core.sinkhorn import NonFiniteCodesError, sinkhorn


def reference_sinkhorn(scores: torch.Tensor, epsilon: float, n_iters: int) -> torch.Tensor:
    """The SwAV paper's alternating normalisation on the K x B matrix, written naively in float64."""
    Q = torch.exp(scores.double() / epsilon).t()
    K, B = Q.shape
    Q /= Q.sum()
    for _ in range(n_iters):
        Q /= Q.sum(dim=1, keepdim=True)
        Q /= K
        Q /= Q.sum(dim=0, keepdim=True)
        Q /= B
    Q *= B
    return Q.t()


def cosine_scores(B: int, K: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    z = torch.nn.functional.normalize(torch.randn(B, 16, generator=g), dim=1)
    c = torch.nn.functional.normalize(torch.randn(K, 16, generator=g), dim=1)
    return z @ c.t()


def test_matches_reference_algorithm():
    scores = cosine_scores(64, 30)
    ours = sinkhorn(scores, 0.05, 3)
    torch.testing.assert_close(ours.double(), reference_sinkhorn(scores, 0.05, 3), rtol=1e-5, atol=1e-7)


def test_marginals_converge_to_equipartition():
    B, K = 256, 20
    Q = sinkhorn(cosine_scores(B, K, seed=1), epsilon=0.05, n_iters=50)
    torch.testing.assert_close(Q.sum(dim=1), torch.ones(B), rtol=0, atol=1e-5)  # each sample: a distribution
    torch.testing.assert_close(Q.sum(dim=0) / B, torch.full((K,), 1.0 / K), rtol=1e-3, atol=1e-5)  # 1/K mass


def test_rows_are_distributions_after_three_iterations():
    Q = sinkhorn(cosine_scores(128, 300, seed=2), 0.05, 3)
    assert (Q >= 0).all()
    torch.testing.assert_close(Q.sum(dim=1), torch.ones(128), rtol=0, atol=1e-5)


@pytest.mark.parametrize("scale", [1.0, 30.0, 1000.0])
@pytest.mark.parametrize("epsilon", [0.05, 0.01])
def test_stable_far_outside_unit_range(scale, epsilon):
    """exp(1000/0.01) overflows any float; max-subtraction keeps every exponent <= 0."""
    scores = cosine_scores(64, 50, seed=3) * scale
    Q = sinkhorn(scores, epsilon, 3)
    assert torch.isfinite(Q).all()
    torch.testing.assert_close(Q.sum(dim=1), torch.ones(64), rtol=0, atol=1e-4)


def test_cold_prototype_at_small_epsilon_keeps_its_mass():
    """A prototype far from every sample: its scaling is large but finite in float32, and the exact
    solution still gives it 1/K of the mass. (A version that carried an extra factor K in the scaling
    overflowed it to inf -> 0 here and returned finite but wrong codes.)"""
    scores = cosine_scores(256, 30, seed=5) * 0.1
    scores[:, 0] -= 0.85
    torch.testing.assert_close(sinkhorn(scores, 0.01, 3).double(), reference_sinkhorn(scores, 0.01, 3),
                               rtol=1e-4, atol=1e-6)


def test_prototype_beyond_float_range_falls_back_instead_of_losing_its_mass():
    """Past float32's range the scaling of a cold prototype overflows; rather than giving that prototype
    no mass (finite, wrong codes), the call takes the log-domain route and matches the reference."""
    scores = cosine_scores(128, 20, seed=6) * 0.1
    scores[:, 0] -= 1.5  # 150+ nats below the rest at epsilon 0.01
    Q = sinkhorn(scores, 0.01, 3)
    ref = reference_sinkhorn(scores, 0.01, 3)
    assert ref[:, 0].sum() > 0.5  # the reference (float64) does give it mass
    torch.testing.assert_close(Q.double(), ref, rtol=1e-4, atol=1e-6)


def test_half_precision_scores_and_fp64_option():
    scores = cosine_scores(32, 40, seed=4)
    q16 = sinkhorn(scores.half(), 0.05, 3)
    q64 = sinkhorn(scores, 0.05, 3, dtype=torch.float64)
    assert q16.dtype == torch.float32 and q64.dtype == torch.float64
    torch.testing.assert_close(q16.double(), q64, atol=5e-3, rtol=0)


def test_argmax_follows_scores_when_sharp():
    """With well-separated clusters that are balanced, codes pick the matching prototype."""
    K = 4
    labels = torch.arange(64) % K
    scores = torch.full((64, K), -1.0)
    scores[torch.arange(64), labels] = 1.0
    Q = sinkhorn(scores, 0.05, 3)
    assert torch.equal(Q.argmax(dim=1), labels)


def test_non_finite_scores_raise_clear_error():
    scores = cosine_scores(8, 5)
    scores[0, 0] = math.nan
    with pytest.raises(NonFiniteCodesError, match="non-finite"):
        sinkhorn(scores, 0.05, 3)


def test_small_epsilon_matches_float64_reference():
    """epsilon 0.01 on cosines: exponents reach 100 (overflow for a naive fp32 exp), we still match."""
    scores = cosine_scores(64, 30, seed=5)
    torch.testing.assert_close(sinkhorn(scores, 0.01, 3).double(), reference_sinkhorn(scores, 0.01, 3),
                               rtol=1e-4, atol=1e-6)


def test_log_domain_fallback_equals_reference():
    from swavkit.core.sinkhorn import _sinkhorn_log_domain

    scores = cosine_scores(48, 20, seed=6).double()
    Q = _sinkhorn_log_domain(scores, 0.05, 3, torch.tensor([48.0], dtype=torch.float64), False)
    torch.testing.assert_close(Q, reference_sinkhorn(scores, 0.05, 3), rtol=1e-9, atol=1e-12)


def test_out_buffer_is_used_and_result_unchanged():
    scores = cosine_scores(32, 12, seed=7)
    buffer = torch.empty(32, 12)
    Q = sinkhorn(scores, 0.05, 3, out=buffer)
    assert Q.data_ptr() == buffer.data_ptr()
    torch.testing.assert_close(Q, sinkhorn(scores, 0.05, 3), rtol=0, atol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on a lent GPU machine)")
def test_cuda_graph_replay_equals_eager_and_follows_new_scores():
    """The opt-in graph path (an ``out`` buffer reused every call) replays a captured graph: each replay
    must see the new scores and give the eager codes; the finiteness check still runs after it.
    (Passed on an H200 with the global capture mode; rerun it when a GPU is lent.)"""
    buffer = torch.empty(256, 300, device="cuda")
    for seed, epsilon in ((0, 0.05), (1, 0.05), (2, 0.05), (3, 0.01)):  # capture, replays, a second graph
        scores = cosine_scores(256, 300, seed=seed).cuda()
        graphed = sinkhorn(scores, epsilon, 3, out=buffer, cuda_graph=True).clone()
        eager = sinkhorn(scores, epsilon, 3)
        torch.testing.assert_close(graphed, eager, rtol=1e-5, atol=1e-8)
        torch.testing.assert_close(graphed.double().cpu(), reference_sinkhorn(scores.cpu(), epsilon, 3),
                                   rtol=1e-4, atol=1e-7)
    scores[0, 0] = math.nan
    with pytest.raises(NonFiniteCodesError, match="non-finite"):
        sinkhorn(scores, 0.01, 3, out=buffer, cuda_graph=True)
