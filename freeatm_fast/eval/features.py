"""Frozen-backbone feature extraction for kNN and linear-probe evaluation."""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

__all__ = ["extract_features"]

_AUTOCAST = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def _pooled(out: torch.Tensor | tuple | list) -> torch.Tensor:
    """Backbone output -> [B, C]: timm models built with num_classes=0 already pool; feature maps [B, C, h, w]
    are average-pooled here, and a (features, ...) tuple contributes its first entry."""
    if isinstance(out, (tuple, list)):
        out = out[0]
    if out.ndim == 4:
        return out.float().mean(dim=(2, 3))
    if out.ndim != 2:
        raise ValueError(
            f"backbone output has shape {list(out.shape)}; expected pooled features [B, C] or maps [B, C, h, w] "
            f"(build the timm model with num_classes=0)"
        )
    return out.float()


def extract_features(
    backbone: nn.Module,
    dataset: Dataset,
    *,
    batch_size: int,
    device: str | torch.device,
    num_workers: int = 0,
    channels_last: bool = False,
    max_images: int = 0,
    precision: str = "fp32",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``backbone`` over a labelled dataset of ``(image [3,S,S], label)`` and return its features.

    Returns ``(feats, labels)`` on the CPU: feats float32 [N, C], each row L2-normalised; labels int64 [N].
    N = len(dataset), or at most ``max_images`` when that is > 0 (the first batches in loader order).
    Runs under ``torch.inference_mode`` with every module in eval mode; each module's train/eval flag is restored
    afterwards. ``precision`` "bf16" / "fp16" autocasts the forward (features are normalised in fp32).
    Features stay on ``device`` until the end: one device-to-host copy, no per-batch synchronisation.
    """
    if precision not in _AUTOCAST:
        raise ValueError(f"precision must be one of {list(_AUTOCAST)}, got {precision!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
    device = torch.device(device)
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
        drop_last=False,
        persistent_workers=False,
    )
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    autocast_dtype = _AUTOCAST[precision]
    amp = (
        torch.autocast(device_type=device.type, dtype=autocast_dtype)
        if autocast_dtype is not None
        else contextlib.nullcontext()
    )
    modes = [(m, m.training) for m in backbone.modules()]
    feats, labels = [], []
    seen = 0
    backbone.eval()
    try:
        with torch.inference_mode(), amp:
            for images, targets in loader:
                if max_images and seen >= max_images:
                    break
                if max_images and seen + len(images) > max_images:
                    images, targets = images[: max_images - seen], targets[: max_images - seen]
                seen += len(images)
                images = images.to(device, non_blocking=True).contiguous(memory_format=memory_format)
                feats.append(F.normalize(_pooled(backbone(images)), dim=1))
                labels.append(torch.as_tensor(targets, dtype=torch.int64))
    finally:
        for module, training in modes:
            module.training = training
    if not feats:
        size = len(dataset) if hasattr(dataset, "__len__") else "?"
        raise ValueError(f"no images to extract features from ({type(dataset).__name__} of {size} samples)")
    # The one host sync of the extraction; inference tensors are cloned so callers may use them with autograd.
    return torch.cat(feats).cpu().clone(), torch.cat(labels).clone()
