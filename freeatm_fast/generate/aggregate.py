"""From captured cross-attention maps to per-object masks, boxes, scores and patch importance (DESIGN.md §4).

Recipe (each choice a knob of :class:`AggregateConfig`):

1. each resolution's mean map ``[B', K, h, w]`` is upsampled (bicubic) to ``S x S``, clamped at 0 (bicubic
   overshoots), and normalised per token (divided by its maximum);
2. the resolutions are averaged;
3. the sub-word tokens of one object word are averaged: soft masks ``[B', O, S, S]`` in ``[0, 1]``;
4. binary masks: each pixel goes to the argmax of ``[tau, soft_1, ..., soft_O]`` (``tau`` = background score; ties go
   to the background, then to the earlier object);
5. per object: box of the largest 4-connected component of its binary mask (scaled to image pixels), area = fraction
   of the image covered by the binary mask, score = mean soft value inside it (0 for an empty mask);
6. patch importance ``[B', L]``: the foreground map ``max over objects`` of the soft masks, averaged per cell of a
   ``g x g`` patch grid (``L = g²``). The max, not the sum: overlapping objects do not count twice and the
   importance stays in ``[0, 1]`` like the masks.

Steps 1-4 and 6 are batched torch on the maps' device; the connected components (step 5) run on CPU numpy after the
batch is done (vectorised label propagation with pointer jumping: no Python loop over pixels).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

UPSAMPLE_MODES = ("bicubic", "bilinear", "nearest")
NORMALIZATIONS = ("max", "minmax")
IMPORTANCE_MODES = ("max", "sum")
_EPS = 1e-12


@dataclass(frozen=True)
class AggregateConfig:
    """Knobs of the mask recipe.

    Attributes:
        resolutions: which captured resolutions to average (``None``: all that are passed in).
        upsample: interpolation to the mask size: "bicubic" (default), "bilinear" or "nearest".
        mask_size: side ``S`` of the square masks (SD 1.5 at 512²: 64, the latent size).
        normalize: per-token normalisation: "max" (``m / max m``) or "minmax" (``(m - min) / (max - min)``).
        tau: constant background score of the argmax, in ``[0, 1]``.
        patch_grid: side ``g`` of the patch grid of the importance (14: ViT-B/16 at 224²); ``L = g²``.
        importance: "max" (default) or "sum" (clamped to 1) over objects, before averaging per patch.
    """

    resolutions: tuple[int, ...] | None = None
    upsample: str = "bicubic"
    mask_size: int = 64
    normalize: str = "max"
    tau: float = 0.4
    patch_grid: int = 14
    importance: str = "max"

    def __post_init__(self):
        if self.resolutions is not None:
            res = tuple(self.resolutions)
            if not res or any(not isinstance(r, int) or isinstance(r, bool) or r < 1 for r in res):
                raise ValueError(f"AggregateConfig.resolutions must be positive ints or None, got {self.resolutions!r}")
            object.__setattr__(self, "resolutions", res)
        if self.upsample not in UPSAMPLE_MODES:
            raise ValueError(f"AggregateConfig.upsample must be one of {UPSAMPLE_MODES}, got {self.upsample!r}")
        if not isinstance(self.mask_size, int) or isinstance(self.mask_size, bool) or self.mask_size < 1:
            raise ValueError(f"AggregateConfig.mask_size must be a positive int, got {self.mask_size!r}")
        if self.normalize not in NORMALIZATIONS:
            raise ValueError(f"AggregateConfig.normalize must be one of {NORMALIZATIONS}, got {self.normalize!r}")
        if not isinstance(self.tau, (int, float)) or not 0.0 <= float(self.tau) <= 1.0:
            raise ValueError(f"AggregateConfig.tau must be a number in [0, 1], got {self.tau!r}")
        object.__setattr__(self, "tau", float(self.tau))
        if not isinstance(self.patch_grid, int) or isinstance(self.patch_grid, bool) or self.patch_grid < 1:
            raise ValueError(f"AggregateConfig.patch_grid must be a positive int, got {self.patch_grid!r}")
        if self.importance not in IMPORTANCE_MODES:
            raise ValueError(f"AggregateConfig.importance must be one of {IMPORTANCE_MODES}, got {self.importance!r}")


@dataclass(frozen=True)
class AggregateResult:
    """Masks of one batch, on CPU. ``O`` = the most objects of any sample; entries past ``num_objects[i]`` are padding.

    Attributes:
        soft: ``[B', O, S, S]`` float32 in ``[0, 1]`` (zeros for padding).
        binary: ``[B', O, S, S]`` bool, disjoint across objects.
        labels: ``[B', S, S]`` int64: 0 = background, ``o + 1`` = object ``o``.
        boxes: ``[B', O, 4]`` float32 ``(x0, y0, x1, y1)`` in image pixels, ``[x0, x1) x [y0, y1)``; zeros when empty.
        areas: ``[B', O]`` float32, fraction of the image in the binary mask.
        scores: ``[B', O]`` float32, mean soft value inside the binary mask (0 when empty).
        importance: ``[B', L]`` float32 patch importance, ``L = patch_grid²`` in row-major order.
        valid: ``[B', O]`` bool, True for real objects.
        num_objects: objects per sample.
    """

    soft: torch.Tensor
    binary: torch.Tensor
    labels: torch.Tensor
    boxes: torch.Tensor
    areas: torch.Tensor
    scores: torch.Tensor
    importance: torch.Tensor
    valid: torch.Tensor
    num_objects: tuple[int, ...]

    def sample(self, i: int) -> dict[str, torch.Tensor]:
        """Sample ``i`` without padding: soft/binary ``[O_i, S, S]``, boxes ``[O_i, 4]``, areas/scores ``[O_i]``, ..."""
        n = self.num_objects[i]
        return {
            "soft": self.soft[i, :n],
            "binary": self.binary[i, :n],
            "labels": self.labels[i],
            "boxes": self.boxes[i, :n],
            "areas": self.areas[i, :n],
            "scores": self.scores[i, :n],
            "importance": self.importance[i],
        }


def _check_maps(maps_by_res: Mapping[int, torch.Tensor], config: AggregateConfig) -> list[torch.Tensor]:
    if not isinstance(maps_by_res, Mapping) or not maps_by_res:
        raise ValueError(f"aggregate: maps_by_res must be a non-empty {{resolution: [B', K, h, w]}}, got {maps_by_res}")
    wanted = tuple(maps_by_res) if config.resolutions is None else config.resolutions
    missing = [r for r in wanted if r not in maps_by_res]
    if missing:
        raise ValueError(f"aggregate: resolutions {missing} requested but only {sorted(maps_by_res)} were captured")
    maps = []
    for r in wanted:
        m = maps_by_res[r]
        if not isinstance(m, torch.Tensor) or m.dim() != 4 or not m.is_floating_point():
            what = f"{m.dtype} {tuple(m.shape)}" if isinstance(m, torch.Tensor) else type(m).__name__
            raise ValueError(f"aggregate: maps at resolution {r} must be a float tensor [B', K, h, w], got {what}")
        if maps and (m.shape[:2] != maps[0].shape[:2] or m.device != maps[0].device):
            raise ValueError(
                f"aggregate: maps at resolution {r} are {tuple(m.shape)} on {m.device}, but resolution {wanted[0]} "
                f"is {tuple(maps[0].shape)} on {maps[0].device}: B' and K must agree"
            )
        maps.append(m)
    return maps


def _span_weights(spans: Sequence[Sequence[Sequence[int]]], B: int, K: int) -> tuple[torch.Tensor, list[int]]:
    """``[B', O, K]`` averaging weights (``1/len(span)`` on the span's columns) and the object count per sample."""
    if len(spans) != B:
        raise ValueError(f"aggregate: spans must hold one list per map row (B'={B}), got {len(spans)}")
    for b, sample in enumerate(spans):
        if isinstance(sample, (str, bytes)) or not isinstance(sample, Sequence):
            raise ValueError(f"aggregate: spans[{b}] must be a list of token-column lists, got {sample!r}")
    counts = [len(s) for s in spans]
    n_obj = max(counts, default=0)
    weights = torch.zeros(B, n_obj, K, dtype=torch.float32)
    for b, sample in enumerate(spans):
        for o, cols in enumerate(sample):
            if isinstance(cols, (torch.Tensor, np.ndarray)):
                cols = cols.tolist()
            ok = isinstance(cols, Sequence) and not isinstance(cols, (str, bytes)) and len(cols) > 0
            ok = ok and all(isinstance(c, (int, np.integer)) and 0 <= c < K for c in cols)
            if not ok or len(set(cols)) != len(cols):
                raise ValueError(
                    f"aggregate: spans[{b}][{o}] must be a non-empty list of distinct token columns in [0, {K}), "
                    f"got {cols!r}"
                )
            cols = [int(c) for c in cols]
            weights[b, o, cols] = 1.0 / len(cols)
    return weights, counts


def token_maps(maps_by_res: Mapping[int, torch.Tensor], config: AggregateConfig) -> torch.Tensor:
    """Steps 1-2: ``[B', K, S, S]`` per-token maps in ``[0, 1]``, averaged over the configured resolutions."""
    S = config.mask_size
    total = None
    maps = _check_maps(maps_by_res, config)
    for m in maps:
        kw = {} if config.upsample == "nearest" else {"align_corners": False}
        up = F.interpolate(m.float(), size=(S, S), mode=config.upsample, **kw).clamp_(min=0.0)
        hi = up.amax(dim=(2, 3), keepdim=True)
        if config.normalize == "max":
            up = up / hi.clamp(min=_EPS)
        else:
            lo = up.amin(dim=(2, 3), keepdim=True)
            up = (up - lo) / (hi - lo).clamp(min=_EPS)
        total = up if total is None else total + up
    return total / len(maps)


def largest_component_boxes(binary: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Bounding box of the largest 4-connected component of each mask.

    Args:
        binary: bool ``[M, H, W]``.

    Returns:
        boxes int64 ``[M, 4]`` ``(x0, y0, x1, y1)`` with exclusive ends, in mask pixels (zeros for an empty mask), and
        the component sizes int64 ``[M]``. Ties between equal-size components go to the first in raster order.
    """
    binary = np.ascontiguousarray(binary, dtype=bool)
    if binary.ndim != 3:
        raise ValueError(f"largest_component_boxes: expected [M, H, W] masks, got shape {binary.shape}")
    M, H, W = binary.shape
    boxes = np.zeros((M, 4), dtype=np.int64)
    sizes = np.zeros(M, dtype=np.int64)
    if M == 0 or not binary.any():
        return boxes, sizes
    none = M * H * W  # label of background pixels: larger than every pixel index
    lab = np.where(binary, np.arange(M * H * W).reshape(M, H, W), none)
    # Min-label propagation between 4-neighbours, with pointer jumping (a label is a pixel index of the same
    # component, so lab[lab[p]] is a smaller-or-equal label of p's component): converges in a few dozen sweeps even
    # for long snakes, instead of one sweep per pixel of the longest path.
    while True:
        new = lab.copy()
        np.minimum(new[:, 1:], lab[:, :-1], out=new[:, 1:])
        np.minimum(new[:, :-1], lab[:, 1:], out=new[:, :-1])
        np.minimum(new[:, :, 1:], lab[:, :, :-1], out=new[:, :, 1:])
        np.minimum(new[:, :, :-1], lab[:, :, 1:], out=new[:, :, :-1])
        new[~binary] = none
        flat = new.reshape(-1)
        fg = flat < none
        flat[fg] = flat[flat[fg]]
        if np.array_equal(new, lab):
            break
        lab = new
    flat = lab.reshape(-1)
    fg_idx = np.flatnonzero(flat < none)
    roots = flat[fg_idx]
    counts = np.bincount(roots, minlength=M * H * W)
    comp = np.flatnonzero(counts)  # component roots, ascending = raster order within each mask
    comp_mask = comp // (H * W)
    # Largest component per mask: sort by (mask, -size, root) and keep each mask's first.
    order = np.lexsort((comp, -counts[comp], comp_mask))
    first = np.ones(len(order), dtype=bool)
    first[1:] = comp_mask[order][1:] != comp_mask[order][:-1]
    best = order[first]
    chosen = np.full(M, -1, dtype=np.int64)
    chosen[comp_mask[best]] = comp[best]
    sizes[comp_mask[best]] = counts[comp[best]]
    pix_mask = fg_idx // (H * W)
    keep = roots == chosen[pix_mask]
    pix, m = fg_idx[keep], pix_mask[keep]
    y, x = (pix % (H * W)) // W, pix % W
    x0 = np.full(M, W, dtype=np.int64)
    y0 = np.full(M, H, dtype=np.int64)
    x1 = np.zeros(M, dtype=np.int64)
    y1 = np.zeros(M, dtype=np.int64)
    np.minimum.at(x0, m, x)
    np.minimum.at(y0, m, y)
    np.maximum.at(x1, m, x + 1)
    np.maximum.at(y1, m, y + 1)
    has = sizes > 0
    boxes[has] = np.stack([x0, y0, x1, y1], axis=1)[has]
    return boxes, sizes


def aggregate(
    maps_by_res: Mapping[int, torch.Tensor],
    spans: Sequence[Sequence[Sequence[int]]],
    config: AggregateConfig,
    *,
    image_size: tuple[int, int],
) -> AggregateResult:
    """Masks, boxes, areas, scores and patch importance of one batch (the recipe in the module docstring).

    Args:
        maps_by_res: ``{resolution: [B', K, h, w]}`` mean maps (``MapCapture.maps()``); grids may be non-square.
        spans: per sample (``B'`` of them), per object word, the columns (in ``0..K-1``) of its sub-word tokens.
        config: :class:`AggregateConfig`.
        image_size: ``(W, H)`` of the generated images in pixels, for the boxes.

    Returns:
        :class:`AggregateResult` on CPU.
    """
    try:
        img_w, img_h = (int(v) for v in image_size)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"aggregate: image_size must be (W, H), got {image_size!r}") from exc
    if img_w < 1 or img_h < 1:
        raise ValueError(f"aggregate: image_size must be positive, got {image_size!r}")
    tok = token_maps(maps_by_res, config)  # [B', K, S, S]
    B, K, S, _ = tok.shape
    weights, counts = _span_weights(spans, B, K)
    n_obj = weights.shape[1]
    valid = torch.arange(n_obj)[None, :] < torch.tensor(counts)[:, None]  # [B', O]
    soft = torch.einsum("bok,bkst->bost", weights.to(tok.device), tok).clamp_(0.0, 1.0)

    # Argmax over [tau, soft_1..soft_O]; padding objects can never win.
    candidates = soft.masked_fill(~valid.to(tok.device)[:, :, None, None], -1.0)
    background = torch.full((B, 1, S, S), config.tau, device=tok.device)
    labels = torch.cat([background, candidates], dim=1).argmax(dim=1)  # [B', S, S]
    binary = labels[:, None] == torch.arange(1, n_obj + 1, device=tok.device)[None, :, None, None]

    n_in = binary.sum(dim=(2, 3))
    areas = n_in.float() / (S * S)
    scores = (soft * binary).sum(dim=(2, 3)) / n_in.clamp(min=1)

    if n_obj == 0:
        fg = torch.zeros(B, S, S, device=tok.device)
    elif config.importance == "max":
        fg = soft.amax(dim=1)  # padding objects are all zeros
    else:
        fg = soft.sum(dim=1).clamp(max=1.0)
    g = config.patch_grid
    importance = F.adaptive_avg_pool2d(fg[:, None], (g, g)).reshape(B, g * g)

    soft, binary, labels = soft.cpu(), binary.cpu(), labels.cpu()
    boxes_px, _ = largest_component_boxes(binary.reshape(B * n_obj, S, S).numpy())
    scale = np.array([img_w / S, img_h / S, img_w / S, img_h / S], dtype=np.float64)
    boxes = torch.from_numpy((boxes_px * scale).astype(np.float32)).reshape(B, n_obj, 4)
    return AggregateResult(
        soft=soft,
        binary=binary,
        labels=labels,
        boxes=boxes,
        areas=areas.cpu(),
        scores=scores.cpu(),
        importance=importance.cpu(),
        valid=valid,
        num_objects=tuple(counts),
    )


def box_in_pixels(box: Sequence[float]) -> list[int]:
    """``(x0, y0, x1, y1)`` float box rounded outward to whole pixels (for the shard JSON)."""
    x0, y0, x1, y1 = box
    return [math.floor(x0), math.floor(y0), math.ceil(x1), math.ceil(y1)]
