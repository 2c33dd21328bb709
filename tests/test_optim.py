"""LARS: the weights' step is scaled by the trust ratio whatever the weight decay; biases and norms get SGD."""

import pytest
import torch

from swavkit.core.optim import build_optimizer

TRUST = 0.001


def one_lars_step(weight_decay: float) -> tuple[torch.nn.Linear, dict]:
    """One LARS step (lr 1, no momentum) on a Linear layer with known gradients; returns the layer after
    the step and the weight, bias and their gradients before it."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(6, 4)
    before = {"w": layer.weight.detach().clone(), "b": layer.bias.detach().clone(),
              "gw": torch.randn(4, 6), "gb": torch.randn(4)}
    layer.weight.grad, layer.bias.grad = before["gw"].clone(), before["gb"].clone()
    optimizer = build_optimizer(layer, "lars", lr=1.0, weight_decay=weight_decay, momentum=0.0,
                                trust_coefficient=TRUST)
    optimizer.step()
    return layer, before


@pytest.mark.parametrize("weight_decay", [0.0, 1e-6, 0.1])
def test_lars_adapts_the_weights_even_without_weight_decay(weight_decay):
    layer, before = one_lars_step(weight_decay)
    w, g = before["w"], before["gw"]
    # LARS (You et al. 2017; apex LARC without clipping, as the SwAV reference): the decayed gradient is
    # scaled by trust * |w| / (|g| + weight_decay * |w|)
    ratio = TRUST * w.norm() / (g.norm() + weight_decay * w.norm())
    expected = w - ratio * (g + weight_decay * w)
    torch.testing.assert_close(layer.weight.detach(), expected)
    # with weight decay 0, timm's Lars used to skip the adaptation: the step was the raw gradient, ~1/ratio
    # times larger
    assert (layer.weight.detach() - w).norm() < 0.01 * g.norm()


def test_biases_get_plain_sgd_without_decay():
    layer, before = one_lars_step(weight_decay=0.1)
    torch.testing.assert_close(layer.bias.detach(), before["b"] - before["gb"])
