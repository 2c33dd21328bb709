"""The SwAV reference's optimiser, ``optim.lars_exclude=none``: apex's LARC (clip=False, trust 0.001) around
``torch.optim.SGD(model.parameters(), momentum=0.9, weight_decay=1e-6)``, as facebookresearch/swav
main_swav.py builds it - every parameter, BatchNorm weights and biases included, gets the trust ratio and
the weight decay.

One step, per parameter w with gradient g (apex/parallel/LARC.py, scaling mode; wd = the group's weight
decay, which LARC takes over from SGD):

    if ||w|| != 0 and ||g|| != 0:
        adaptive_lr = trust * ||w|| / (||g|| + wd * ||w|| + eps)
        g = (g + wd * w) * adaptive_lr
    (else g unchanged, and no weight decay: a zero-initialised bias takes a plain SGD step)
    buf = g on the first step, else momentum * buf + g;   w -= lr * buf      (SGD, dampening 0, no Nesterov)

timm's Lars (swavkit's ``lars_exclude=bn_bias`` route, swavkit/optim.py) computes the same ratio but adds
the weight decay even when ||g|| = 0, so the reference's exact rule lives here. Parameters without a
gradient (the prototypes while frozen: their .grad is None) are skipped, as SGD skips them.
"""

from __future__ import annotations

import torch


class ReferenceLARC(torch.optim.Optimizer):
    """apex LARC (clip=False) + SGD momentum; the momentum buffers sit in ``state[p]["momentum_buffer"]``
    like torch's SGD and timm's Lars, so a checkpoint has the same layout."""

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 1e-6,
                 trust_coefficient: float = 0.001, eps: float = 1e-8):
        if lr < 0 or momentum < 0 or weight_decay < 0 or trust_coefficient <= 0:
            raise ValueError(f"ReferenceLARC: lr {lr}, momentum {momentum}, weight_decay {weight_decay} must be >= 0 "
                             f"and trust_coefficient {trust_coefficient} > 0")
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                                      trust_coefficient=trust_coefficient, eps=eps))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            wd, trust, eps = group["weight_decay"], group["trust_coefficient"], group["eps"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                # norms in fp32 whatever the parameter's dtype; a host sync per parameter is avoided by
                # deciding the zero-norm case with torch.where instead of Python's if
                w_norm, g_norm = p.detach().float().norm(), grad.float().norm()
                adapt = (w_norm != 0) & (g_norm != 0)
                ratio = torch.where(adapt, trust * w_norm / (g_norm + wd * w_norm + eps), torch.ones_like(w_norm))
                decay = torch.where(adapt, torch.full_like(w_norm, wd), torch.zeros_like(w_norm))
                grad = (grad + decay.to(p.dtype) * p) * ratio.to(p.dtype)  # a new tensor: p.grad stays as it was
                state = self.state[p]
                buf = state.get("momentum_buffer")
                if group["momentum"] == 0:
                    update = grad
                elif buf is None:
                    update = state["momentum_buffer"] = grad.detach().clone()
                else:
                    update = buf.mul_(group["momentum"]).add_(grad)
                p.add_(update, alpha=-group["lr"])
        return loss


__all__ = ["ReferenceLARC"]
