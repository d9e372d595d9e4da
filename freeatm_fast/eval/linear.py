"""Linear probe on frozen, pre-extracted features: multinomial logistic regression.

Features are standardised with the training set's mean and standard deviation (the same statistics are applied
to the validation features), then a linear classifier is fitted with

- ``solver="sgd"`` (default): mini-batch SGD with momentum 0.9 and a cosine learning-rate schedule over
  ``epochs`` (the MoCo / SimCLR linear-evaluation recipe, on cached features instead of images), or
- ``solver="lbfgs"``: full-batch L-BFGS with a strong-Wolfe line search, ``epochs`` iterations (``lr`` unused);
  the problem is convex, so this converges without tuning on sets that fit in memory.

The weights start at zero and the only randomness is the SGD batch order, drawn from a generator seeded with
``seed``: the result is deterministic for a given seed and device.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from freeatm_fast.eval.knn import check_features

__all__ = ["linear_probe"]


def _accuracy(logits: torch.Tensor, labels: torch.Tensor) -> dict:
    top = logits.sort(dim=1, descending=True, stable=True).indices[:, :5]
    hits = top == labels[:, None]
    out = {"top1": hits[:, 0].float().mean().item()}
    if logits.shape[1] >= 5:
        out["top5"] = hits.any(dim=1).float().mean().item()
    return out


def linear_probe(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    val_feats: torch.Tensor,
    val_labels: torch.Tensor,
    *,
    epochs: int = 30,
    lr: float = 0.1,
    weight_decay: float = 1e-4,
    batch_size: int = 256,
    num_classes: int | None = None,
    solver: str = "sgd",
    seed: int = 0,
) -> dict:
    """Fit a linear classifier on ``train_feats`` and report accuracy on ``val_feats``.

    Shapes: train_feats [N, C], train_labels int [N], val_feats [M, C], val_labels int [M]; labels in
    [0, num_classes) (default: 1 + the largest label). Runs on the device of ``train_feats``, in fp32.
    ``weight_decay`` is an L2 penalty ``wd/2 * |W|^2`` on the weights (not the bias).
    Returns ``{"top1", "top5" (only with >= 5 classes), "train_top1", "epochs", "n_train", "n_val"}``,
    accuracies as fractions in [0, 1].
    """
    check_features(train_feats, train_labels, val_feats, val_labels)
    if solver not in ("sgd", "lbfgs"):
        raise ValueError(f"solver must be 'sgd' or 'lbfgs', got {solver!r}")
    if epochs < 1 or lr <= 0 or weight_decay < 0 or batch_size < 1:
        raise ValueError(
            f"need epochs >= 1, lr > 0, weight_decay >= 0, batch_size >= 1; got epochs={epochs!r}, lr={lr!r}, "
            f"weight_decay={weight_decay!r}, batch_size={batch_size!r}"
        )
    device = train_feats.device
    y_train = train_labels.to(device, torch.int64)
    y_val = val_labels.to(device, torch.int64)
    high = max(int(y_train.max()), int(y_val.max()))
    low = min(int(y_train.min()), int(y_val.min()))
    num_classes = high + 1 if num_classes is None else num_classes
    if low < 0 or high >= num_classes:
        raise ValueError(f"labels must lie in [0, num_classes={num_classes}), got values in [{low}, {high}]")

    x_train = train_feats.float()
    mean = x_train.mean(dim=0)
    std = x_train.std(dim=0, unbiased=False).clamp_min(1e-6)
    x_train = (x_train - mean) / std
    x_val = (val_feats.to(device).float() - mean) / std

    n, c = x_train.shape
    weight = torch.zeros(num_classes, c, device=device, requires_grad=True)
    bias = torch.zeros(num_classes, device=device, requires_grad=True)

    def loss_on(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(F.linear(x, weight, bias), y) + 0.5 * weight_decay * weight.square().sum()

    with torch.enable_grad():
        if solver == "lbfgs":
            opt = torch.optim.LBFGS(
                [weight, bias], lr=1.0, max_iter=epochs, history_size=20, line_search_fn="strong_wolfe"
            )

            def closure() -> torch.Tensor:
                opt.zero_grad(set_to_none=True)
                loss = loss_on(x_train, y_train)
                loss.backward()
                return loss

            opt.step(closure)
        else:
            opt = torch.optim.SGD([weight, bias], lr=lr, momentum=0.9)
            gen = torch.Generator().manual_seed(seed)
            steps_per_epoch = math.ceil(n / batch_size)
            total = epochs * steps_per_epoch
            step = 0
            for _ in range(epochs):
                order = torch.randperm(n, generator=gen).to(device)
                for start in range(0, n, batch_size):
                    for group in opt.param_groups:
                        group["lr"] = 0.5 * lr * (1.0 + math.cos(math.pi * step / total))
                    idx = order[start : start + batch_size]
                    opt.zero_grad(set_to_none=True)
                    loss_on(x_train[idx], y_train[idx]).backward()
                    opt.step()
                    step += 1

    with torch.no_grad():
        result = _accuracy(F.linear(x_val, weight, bias), y_val)
        result["train_top1"] = _accuracy(F.linear(x_train, weight, bias), y_train)["top1"]
    result.update(epochs=epochs, n_train=n, n_val=x_val.shape[0])
    return result
