"""Optimizers and learning-rate schedules for the engine (DESIGN §8).

``build_optimizer`` makes a plain torch optimizer over a method's parameter groups (SGD for MoCo, LARS for
SimCLR, AdamW for ViTs); DeepSpeed wraps it (ZeRO partitions its state). ``warmup_cosine`` is the schedule of
every config: linear warm-up from 0, then cosine decay to ``min_lr``.
"""

from __future__ import annotations

import math

import torch


class LARS(torch.optim.Optimizer):
    """SGD with momentum and layer-wise adaptive rate scaling (You et al. 2017), as used by SimCLR.

    For each parameter not in a group marked ``lars_exclude`` (biases and norm weights), the update
    ``g + wd * w`` is scaled by the trust ratio ``eta * ||w|| / ||g + wd * w||`` (1 where either norm is 0).
    Everything stays on the device: no host synchronisation.
    """

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0, eta: float = 0.001):
        if lr <= 0 or momentum < 0 or weight_decay < 0 or eta <= 0:
            raise ValueError(f"LARS: bad hyper-parameters lr={lr} momentum={momentum} wd={weight_decay} eta={eta}")
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            exclude = group.get("lars_exclude", False)
            for p in group["params"]:
                if p.grad is None:
                    continue
                d = p.grad
                if group["weight_decay"]:
                    d = d.add(p, alpha=group["weight_decay"])
                if not exclude:
                    w_norm = torch.linalg.vector_norm(p)
                    d_norm = torch.linalg.vector_norm(d)
                    trust = torch.where(
                        (w_norm > 0) & (d_norm > 0), group["eta"] * w_norm / d_norm, torch.ones_like(w_norm)
                    )
                    d = d.mul(trust)
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = d.clone()
                else:
                    state["momentum_buffer"].mul_(group["momentum"]).add_(d)
                p.add_(state["momentum_buffer"], alpha=-group["lr"])
        return loss


def scaled_lr(base_lr: float, global_batch: int) -> float:
    """The linear scaling rule: ``base_lr`` is given for a global batch of 256."""
    return base_lr * global_batch / 256.0


def build_optimizer(
    name: str, groups: list[dict], *, lr: float, momentum: float, betas: tuple
) -> torch.optim.Optimizer:
    """``name`` in sgd | lars | adamw; ``groups`` from ``method.param_groups(weight_decay)``."""
    if name == "sgd":
        clean = [{k: v for k, v in g.items() if k != "lars_exclude"} for g in groups]
        return torch.optim.SGD(clean, lr=lr, momentum=momentum)
    if name == "lars":
        return LARS(groups, lr=lr, momentum=momentum)
    if name == "adamw":
        clean = [{k: v for k, v in g.items() if k != "lars_exclude"} for g in groups]
        return torch.optim.AdamW(clean, lr=lr, betas=tuple(betas))
    raise ValueError(f"train.optimizer must be sgd, lars or adamw, got {name!r}")


def warmup_cosine(step: int, *, max_steps: int, warmup_steps: int, min_ratio: float) -> float:
    """LR multiplier at ``step``: ``(step+1)/warmup`` during warm-up, then cosine from 1 to ``min_ratio``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, max_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(
    optimizer: torch.optim.Optimizer, *, max_steps: int, warmup_steps: int, min_ratio: float
) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: warmup_cosine(step, max_steps=max_steps, warmup_steps=warmup_steps, min_ratio=min_ratio),
    )
