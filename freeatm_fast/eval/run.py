"""High-level evaluation: kNN and linear probe of a backbone as configured by ``cfg.eval``.

The training engine calls :func:`evaluate` at the end of a run (on one rank); ``freeatm eval`` calls it for a
saved backbone. Empty ``eval.train_root`` / ``eval.root`` mean the toy world's train / val split
(``freeatm_fast.data.toyworld.default_toyworld``, built on first use).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch
from torch import nn

from freeatm_fast.config import Config

__all__ = ["evaluate", "resolve_roots", "summary_line"]


def resolve_roots(
    cfg: Config, train_root: str | os.PathLike | None = None, val_root: str | os.PathLike | None = None
) -> tuple[Path, Path]:
    """(memory-bank / probe-training set, validation set): the arguments, else ``cfg.eval.train_root`` /
    ``cfg.eval.root``, else the toy world's ``train`` / ``val`` split for ``cfg.data``."""
    train = str(train_root or cfg.eval.train_root)
    val = str(val_root or cfg.eval.root)
    if not train or not val:
        # Imported here: the toy world module pulls in the data pipeline and builds the data set on first use.
        from freeatm_fast.data.toyworld import default_toyworld

        toy = Path(default_toyworld(cfg.data))
        train = train or str(toy / "train")
        val = val or str(toy / "val")
    return Path(train), Path(val)


def _check_same_classes(train_set, val_set, train_root: Path, val_root: Path) -> None:
    """ImageFolders number classes by sorted folder name: both sets must hold the same class folders."""
    train_classes = getattr(train_set, "classes", None)
    val_classes = getattr(val_set, "classes", None)
    if train_classes is not None and val_classes is not None and train_classes != val_classes:
        only_train = sorted(set(train_classes) - set(val_classes))[:5]
        only_val = sorted(set(val_classes) - set(train_classes))[:5]
        raise ValueError(
            f"{train_root} and {val_root} hold different class folders (only in train: {only_train}, only in val: "
            f"{only_val}); ImageFolder labels would not correspond"
        )


def evaluate(
    backbone: nn.Module,
    cfg: Config,
    *,
    device: str | torch.device | None = None,
    train_root: str | os.PathLike | None = None,
    val_root: str | os.PathLike | None = None,
) -> dict:
    """Extract frozen features of ``backbone`` on the train and val sets, then run kNN (``cfg.eval.knn``) and the
    linear probe (``cfg.eval.linear``).

    backbone: a module mapping float32 [B, 3, S, S] (ImageNet-normalised) to features [B, C] (or maps
        [B, C, h, w], average-pooled), already on ``device`` (default: the device of its first parameter).
        S = ``cfg.eval.image_size``, or ``cfg.data.image_size`` when that is 0.
    Returns a JSON-serialisable dict: ``knn`` / ``linear`` (see ``knn_accuracy`` / ``linear_probe``; present when
    enabled), ``train_root``, ``val_root``, ``image_size``, ``crop_ratio``, ``feature_dim``, ``n_train``,
    ``n_val``, ``num_classes``, ``seconds``. Autocast follows ``cfg.train.precision`` on CUDA (fp32 on CPU).
    """
    from freeatm_fast.eval.datasets import open_labelled
    from freeatm_fast.eval.features import extract_features
    from freeatm_fast.eval.knn import knn_accuracy
    from freeatm_fast.eval.linear import linear_probe

    start = time.perf_counter()
    ev = cfg.eval
    if device is None:
        first = next(backbone.parameters(), None)
        device = first.device if first is not None else torch.device("cpu")
    device = torch.device(device)
    train_root, val_root = resolve_roots(cfg, train_root, val_root)
    image_size = ev.image_size or cfg.data.image_size
    train_set = open_labelled(train_root, image_size, ev.crop_ratio)
    val_set = open_labelled(val_root, image_size, ev.crop_ratio)
    _check_same_classes(train_set, val_set, train_root, val_root)
    extract = dict(
        batch_size=ev.batch_size,
        device=device,
        num_workers=cfg.data.num_workers,
        channels_last=cfg.model.channels_last,
        precision=cfg.train.precision if device.type == "cuda" else "fp32",
    )
    train_feats, train_labels = extract_features(backbone, train_set, max_images=ev.max_train_images, **extract)
    val_feats, val_labels = extract_features(backbone, val_set, **extract)
    num_classes = int(max(train_labels.max(), val_labels.max())) + 1
    result: dict = {
        "train_root": str(train_root),
        "val_root": str(val_root),
        "image_size": image_size,
        "crop_ratio": ev.crop_ratio,
        "feature_dim": train_feats.shape[1],
        "n_train": train_feats.shape[0],
        "n_val": val_feats.shape[0],
        "num_classes": num_classes,
    }
    # kNN and the probe run where the features were made (a GPU makes a 1M-image memory bank cheap).
    train_feats, val_feats = train_feats.to(device), val_feats.to(device)
    if ev.knn:
        result["knn"] = knn_accuracy(
            train_feats, train_labels, val_feats, val_labels, ev.knn_k, ev.knn_temperature, num_classes
        )
        result["knn"]["temperature"] = ev.knn_temperature
    if ev.linear:
        result["linear"] = linear_probe(
            train_feats, train_labels, val_feats, val_labels, epochs=ev.linear_epochs, lr=ev.linear_lr,
            num_classes=num_classes, seed=cfg.train.seed,
        )  # fmt: skip
    result["seconds"] = round(time.perf_counter() - start, 3)
    return result


def summary_line(result: dict) -> str:
    """One human-readable line from an :func:`evaluate` result, e.g.
    ``knn top1 87.20% top5 99.10% (k=20, T=0.07) | 1000 val / 4000 train images, 10 classes, 64px, 3.1 s``."""
    parts = []
    if "knn" in result:
        knn = result["knn"]
        top5 = f" top5 {100 * knn['top5']:.2f}%" if "top5" in knn else ""
        parts.append(f"knn top1 {100 * knn['top1']:.2f}%{top5} (k={knn['k']}, T={knn.get('temperature', '?')})")
    if "linear" in result:
        lin = result["linear"]
        top5 = f" top5 {100 * lin['top5']:.2f}%" if "top5" in lin else ""
        parts.append(f"linear top1 {100 * lin['top1']:.2f}%{top5} ({lin['epochs']} epochs)")
    parts.append(
        f"{result['n_val']} val / {result['n_train']} train images, {result['num_classes']} classes, "
        f"{result['image_size']}px, {result['seconds']:.1f} s"
    )
    return " | ".join(parts)
