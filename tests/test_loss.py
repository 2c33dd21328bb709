import math

import torch

from swavkit.core.loss import FeatureQueue, swapped_prediction_loss


def test_loss_matches_hand_computation():
    # V=3 crops, B=1, K=2; crop 0 is the only assignment crop with code q = [1, 0].
    scores = torch.tensor([[[0.1, 0.0]], [[0.2, -0.2]], [[0.0, 0.3]]])
    T = 0.1
    q = torch.tensor([[1.0, 0.0]])

    def log_p0(s):  # log softmax(s / T)[0]
        return s[0] / T - math.log(math.exp(s[0] / T) + math.exp(s[1] / T))

    expected = -(log_p0([0.2, -0.2]) + log_p0([0.0, 0.3])) / 2  # mean over v != 0
    loss = swapped_prediction_loss(scores, {0: q}, T)
    assert abs(loss.item() - expected) < 1e-6


def test_loss_equals_naive_double_loop():
    g = torch.Generator().manual_seed(0)
    V, B, K = 5, 4, 7
    scores = torch.randn(V, B, K, generator=g)
    codes = {0: torch.softmax(torch.randn(B, K, generator=g), 1), 1: torch.softmax(torch.randn(B, K, generator=g), 1)}
    naive = 0.0
    for i, q in codes.items():
        per_i = 0.0
        for v in range(V):
            if v != i:
                per_i += -(q * torch.log_softmax(scores[v] / 0.1, dim=1)).sum(1).mean()
        naive += per_i / (V - 1)
    naive /= len(codes)
    torch.testing.assert_close(swapped_prediction_loss(scores, codes, 0.1), naive)


def test_uniform_codes_give_ln_k():
    """The collapse signature: uniform codes with uniform predictions give exactly ln K."""
    V, B, K = 4, 3, 50
    loss = swapped_prediction_loss(torch.zeros(V, B, K), {0: torch.full((B, K), 1.0 / K)}, 0.1)
    assert abs(loss.item() - math.log(K)) < 1e-5


def test_queue_fifo_wraparound_and_state_dict():
    queue = FeatureQueue(n_crops=2, length=5, dim=3)
    assert not queue.is_full
    pushed = []
    for step in range(4):  # 4 pushes of 2 rows = 8 rows into a queue of 5: wraps around
        batch = torch.full((2, 2, 3), float(step))
        batch[1] += 100
        batch[:, 1] += 0.5
        queue.push(batch)
        pushed.append(batch)
    assert queue.is_full and int(queue.n_filled) == 5
    # newest first: step 3 rows, then step 2 rows, then the newer half of step 1
    expected_crop0 = torch.tensor([3.0, 3.5, 2.0, 2.5, 1.0])
    torch.testing.assert_close(queue.embeddings[0, :, 0], expected_crop0)
    torch.testing.assert_close(queue.embeddings[1, :, 0], expected_crop0 + 100)

    restored = FeatureQueue(n_crops=2, length=5, dim=3)
    restored.load_state_dict(queue.state_dict())
    assert restored.is_full
    torch.testing.assert_close(restored.embeddings, queue.embeddings)


def test_queue_push_larger_than_queue_keeps_newest():
    queue = FeatureQueue(1, 3, 2)
    queue.push(torch.arange(10.0).view(1, 5, 2))
    assert queue.is_full
    torch.testing.assert_close(queue.embeddings[0], torch.arange(4.0, 10.0).view(3, 2))
