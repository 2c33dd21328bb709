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


# --------------------------------------------------------------------------------------------------
# optim.lars_exclude=none: the SwAV reference's apex LARC (clip=False) over every parameter

def apex_larc_step(sgd: torch.optim.SGD, trust: float, eps: float = 1e-8) -> None:
    """apex.parallel.LARC.step with clip=False, as main_swav.py uses it, written out: LARC takes the weight
    decay over from SGD, rescales each gradient in place, then the wrapped SGD steps without decay."""
    with torch.no_grad():
        decays = []
        for group in sgd.param_groups:
            decays.append(group["weight_decay"])
            wd, group["weight_decay"] = group["weight_decay"], 0
            for p in group["params"]:
                if p.grad is None:
                    continue
                w_norm, g_norm = p.norm(), p.grad.norm()
                if w_norm != 0 and g_norm != 0:
                    adaptive_lr = trust * w_norm / (g_norm + w_norm * wd + eps)
                    p.grad += wd * p
                    p.grad *= adaptive_lr
    sgd.step()
    for group, wd in zip(sgd.param_groups, decays):
        group["weight_decay"] = wd


def small_net() -> torch.nn.Module:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                              torch.nn.Flatten(), torch.nn.Linear(4 * 4 * 4, 5), torch.nn.Linear(5, 2, bias=False))
    with torch.no_grad():
        net[1].weight.uniform_(0.5, 1.5)  # BN bias stays 0: the zero-norm case of the first step
    return net


def test_reference_larc_updates_a_bn_weight_by_the_formula():
    """Two steps (momentum included) of optim.lars_exclude=none on a BatchNorm weight, against the formula:
    adaptive_lr = trust ||w|| / (||g|| + wd ||w|| + eps); g' = (g + wd w) adaptive_lr; buf = g' then
    momentum buf + g'; w -= lr buf. The BN bias, at 0, takes a plain SGD step (apex adapts only when both
    norms are non-zero)."""
    net = small_net()
    lr, wd, momentum = 4.8, 1e-6, 0.9
    optimizer = build_optimizer(net, "lars", lr=lr, weight_decay=wd, momentum=momentum, trust_coefficient=TRUST,
                                lars_exclude="none")
    bn = net[1]
    w, buf = bn.weight.detach().clone().double(), None
    bias_before = bn.bias.detach().clone()
    for step in range(2):
        g = torch.randn(4, generator=torch.Generator().manual_seed(step)).double()
        bn.weight.grad, bn.bias.grad = g.float(), torch.full((4,), 0.5)
        optimizer.step()
        adaptive_lr = TRUST * w.norm() / (g.norm() + wd * w.norm() + 1e-8)
        scaled = (g + wd * w) * adaptive_lr
        buf = scaled if buf is None else momentum * buf + scaled
        w = w - lr * buf
        torch.testing.assert_close(bn.weight.detach().double(), w, rtol=1e-6, atol=1e-9)
        if step == 0:
            torch.testing.assert_close(bn.bias.detach(), bias_before - lr * 0.5)
    # the default (bn_bias) gives the same BN weight a plain SGD step, no decay, no trust ratio
    net = small_net()
    before = net[1].weight.detach().clone()
    sgd_like = build_optimizer(net, "lars", lr=lr, weight_decay=wd, momentum=momentum, trust_coefficient=TRUST)
    net[1].weight.grad = torch.ones(4)
    sgd_like.step()
    torch.testing.assert_close(net[1].weight.detach(), before - lr)


def test_reference_larc_equals_apex_larc_around_sgd_step_for_step():
    """Three steps on a conv + BN + linear net: every parameter (a zero-gradient one, a frozen one with no
    gradient) moves exactly as under SGD(momentum 0.9, wd 1e-6) wrapped by apex LARC(trust 0.001, clip=False)."""
    ours, theirs = small_net(), small_net()
    optimizer = build_optimizer(ours, "lars", lr=0.6, weight_decay=1e-6, momentum=0.9, trust_coefficient=TRUST,
                                lars_exclude="none")
    sgd = torch.optim.SGD(theirs.parameters(), lr=0.6, momentum=0.9, weight_decay=1e-6)
    x = torch.randn(8, 3, 6, 6, generator=torch.Generator().manual_seed(1))
    for step in range(3):
        for net in (ours, theirs):
            net.zero_grad(set_to_none=True)
            net(x).square().mean().backward()
            net[4].bias.grad.zero_()  # ||g|| = 0 with ||w|| != 0: apex adds no decay either
            if step == 0:
                net[5].weight.grad = None  # frozen this step (prototypes while frozen): no update at all
        optimizer.step()
        apex_larc_step(sgd, TRUST)
        for (name, a), b in zip(ours.named_parameters(), theirs.parameters()):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-8, msg=f"{name} differs at step {step}")


def test_paper_configs_use_the_reference_larc():
    from pathlib import Path

    from swavkit.config import load_config

    configs = Path(__file__).resolve().parent.parent / "configs"
    for name in ("imagenet_resnet50", "single_gpu_queue"):
        assert load_config([configs / f"{name}.yaml"]).optim.lars_exclude == "none", name
    assert load_config([]).optim.lars_exclude == "bn_bias"
