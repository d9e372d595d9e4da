"""Weighted k-nearest-neighbour classifier on frozen features (InstDisc / MoCo evaluation protocol).

For each query, the k most cosine-similar memory-bank features vote for their class with weight
``exp(sim / T)``; the class with the largest summed weight is the prediction (Wu et al. 2018, used by MoCo,
DINO with T = 0.07, k = 20 / 200). Queries are processed in chunks with one matrix product, one ``topk`` and
one ``scatter_add`` each: no per-sample Python loop.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["knn_accuracy", "knn_predict"]


def check_features(train_feats, train_labels, val_feats, val_labels) -> None:
    """Raise ValueError unless features are [N, C] / [M, C] with labels [N] / [M], both sets non-empty."""
    if train_feats.ndim != 2 or val_feats.ndim != 2 or train_feats.shape[1] != val_feats.shape[1]:
        raise ValueError(
            f"features must be [N, C] and [M, C] with the same C, got {list(train_feats.shape)} and "
            f"{list(val_feats.shape)}"
        )
    if train_labels.shape != (train_feats.shape[0],) or val_labels.shape != (val_feats.shape[0],):
        raise ValueError(
            f"labels must be [N] and [M] matching the features, got {list(train_labels.shape)} for "
            f"{train_feats.shape[0]} and {list(val_labels.shape)} for {val_feats.shape[0]} features"
        )
    if train_feats.shape[0] == 0 or val_feats.shape[0] == 0:
        raise ValueError(f"empty memory bank or query set ({train_feats.shape[0]} train, {val_feats.shape[0]} val)")


def knn_predict(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    queries: torch.Tensor,
    *,
    k: int,
    temperature: float,
    num_classes: int,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """Class votes of the weighted kNN: float32 [M, num_classes], the summed ``exp(sim/T)`` per class, each row
    scaled by ``exp(-max_sim/T)`` (a per-query constant, so the ranking of classes is that of ``exp(sim/T)``).

    train_feats [N, C] and queries [M, C] (any float dtype; L2-normalised here, so similarities are cosines),
    train_labels int64 [N] in [0, num_classes). k is clamped to N. Memory per chunk: chunk_size x N floats.
    """
    train = F.normalize(train_feats.float(), dim=1)
    labels = train_labels.to(train.device, torch.int64)
    k = min(int(k), train.shape[0])
    votes = []
    for start in range(0, queries.shape[0], chunk_size):
        q = F.normalize(queries[start : start + chunk_size].to(train.device).float(), dim=1)
        sims, idx = (q @ train.T).topk(k, dim=1)  # [q, k]
        # exp((s - s_max) / T): the same per-query ranking as exp(s / T) without overflow for small T (e^(1/T)
        # passes fp32's 3.4e38 below T = 0.0113).
        weights = ((sims - sims[:, :1]) / temperature).exp()
        chunk = torch.zeros(q.shape[0], num_classes, device=train.device, dtype=torch.float32)
        votes.append(chunk.scatter_add_(1, labels[idx], weights))
    return torch.cat(votes)


def knn_accuracy(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    val_feats: torch.Tensor,
    val_labels: torch.Tensor,
    k: int = 20,
    temperature: float = 0.07,
    num_classes: int | None = None,
    *,
    chunk_size: int = 1024,
) -> dict:
    """Weighted-kNN accuracy of ``val_feats`` against the memory bank ``train_feats``.

    Shapes: train_feats [N, C], train_labels int [N], val_feats [M, C], val_labels int [M]; labels in
    [0, num_classes) (default: 1 + the largest label seen). Runs on the device of ``train_feats``.
    Returns ``{"top1", "top5" (only with >= 5 classes), "k", "n_train", "n_val"}``, accuracies as fractions in
    [0, 1] (one host sync at the end). A vote tie goes to the lower class index.
    """
    check_features(train_feats, train_labels, val_feats, val_labels)
    if k < 1 or temperature <= 0:
        raise ValueError(f"k must be >= 1 and temperature > 0, got k={k!r}, temperature={temperature!r}")
    val_labels = val_labels.to(train_feats.device, torch.int64)
    low = min(int(train_labels.min()), int(val_labels.min()))
    high = max(int(train_labels.max()), int(val_labels.max()))
    if num_classes is None:
        num_classes = high + 1
    if low < 0 or high >= num_classes:
        raise ValueError(f"labels must lie in [0, num_classes={num_classes}), got values in [{low}, {high}]")
    votes = knn_predict(
        train_feats, train_labels, val_feats, k=k, temperature=temperature, num_classes=num_classes,
        chunk_size=chunk_size,
    )  # fmt: skip
    # Stable descending sort: ties go to the lower class index, reproducibly on every device.
    pred = votes.sort(dim=1, descending=True, stable=True).indices[:, :5]
    hits = pred == val_labels[:, None]
    result = {"top1": hits[:, 0].float().mean().item()}
    if num_classes >= 5:
        result["top5"] = hits.any(dim=1).float().mean().item()
    result.update(k=min(int(k), train_feats.shape[0]), n_train=train_feats.shape[0], n_val=val_feats.shape[0])
    return result
