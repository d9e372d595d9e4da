"""View sampling for the torch loader (DESIGN §6): crops, mask warping, colour augmentation, k-means masks.

Everything here is deterministic given a ``numpy.random.Generator``: the loader seeds one per sample from
(seed, epoch, sample), so a batch's content never depends on worker scheduling.

The work is split in two so that the per-sample Python stays small:

- per sample (``TwoViews`` / ``MultiCrop`` / ``CaptionGroup`` ``__call__``): crop boxes (RandomResizedCrop, or
  instance-aware crops that keep an object visible), the crop/resize/flip of the image (PIL, bilinear, with
  sub-pixel boxes) and of the masks with exactly the same geometry (:func:`warp_masks`), and the colour
  augmentation *parameters*;
- per batch (``collate``): the colour augmentation itself (jitter, grayscale, blur, solarize) as vectorised
  torch ops over all views of the batch with their per-view parameters, then ImageNet normalisation.

Colour augmentation follows torchvision's ``ColorJitter`` (brightness, contrast, saturation, hue in a random
order per view, each clamped to [0, 1]) except for hue, which is a rotation of the chroma plane in YIQ space
(the linear form DALI's colour twist uses) instead of an HSV round trip. Gaussian blur draws sigma from
[0.1, 2.0] px *at 224 px* scaled to the view size (MoCo-v2 / BYOL's range, relative to the crop).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "RATIO",
    "CaptionGroup",
    "ColourAugment",
    "PROMPT_TEMPLATE",
    "MultiCrop",
    "SingleView",
    "TwoViews",
    "VLPView",
    "build_view_maker",
    "colour_augment",
    "crop_resize",
    "block_index",
    "instance_crops",
    "kmeans_masks",
    "mask_box",
    "patch_importance",
    "position_prompt",
    "random_resized_crop",
    "sample_pixels",
    "sample_size",
    "valid_objects",
    "view_boxes",
    "visible_fraction",
    "warp_masks",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RATIO = (3 / 4, 4 / 3)
RRC_TRIES = 10  # torchvision's RandomResizedCrop attempts before its centre-crop fallback
INSTANCE_TRIES = 50  # candidate crops per view for instance-aware sampling before the box fallback
BLUR_SIGMA_AT_224 = (0.1, 2.0)
_GRAY = (0.299, 0.587, 0.114)  # ITU-R 601 luma, as torchvision's rgb_to_grayscale

# --------------------------------------------------------------------------------------------------
# Crop boxes: float (x0, y0, x1, y1) in pixel coordinates of the source image


def _candidates(rng: np.random.Generator, width: int, height: int, scale, ratio, n: int):
    """n RandomResizedCrop candidates: boxes float64 [n, 4] and whether each fits in the image, bool [n]."""
    area = width * height * rng.uniform(scale[0], scale[1], size=n)
    log_r = rng.uniform(math.log(ratio[0]), math.log(ratio[1]), size=n)
    aspect = np.exp(log_r)
    w = np.sqrt(area * aspect)
    h = np.sqrt(area / aspect)
    fits = (w <= width) & (h <= height)
    w, h = np.minimum(w, width), np.minimum(h, height)
    x0 = rng.uniform(0, 1, size=n) * (width - w)
    y0 = rng.uniform(0, 1, size=n) * (height - h)
    return np.stack([x0, y0, x0 + w, y0 + h], axis=1), fits


def _centre_crop(width: int, height: int, ratio) -> np.ndarray:
    """torchvision's fallback: the largest centred box whose aspect is clamped into ``ratio``."""
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, width / ratio[0]
    elif in_ratio > ratio[1]:
        w, h = height * ratio[1], height
    else:
        w, h = width, height
    x0, y0 = (width - w) / 2, (height - h) / 2
    return np.array([x0, y0, x0 + w, y0 + h])


def random_resized_crop(
    rng: np.random.Generator, width: int, height: int, scale=(0.08, 1.0), ratio=RATIO, tries: int = RRC_TRIES
) -> np.ndarray:
    """RandomResizedCrop parameters: a float64 box [4] = (x0, y0, x1, y1) in image pixels.

    Area share uniform in ``scale``, log aspect uniform in ``ratio``, position uniform; the first of ``tries``
    candidates that fits, else the centre crop (torchvision's semantics, with sub-pixel boxes)."""
    boxes, fits = _candidates(rng, width, height, scale, ratio, tries)
    hit = np.flatnonzero(fits)
    return boxes[hit[0]] if len(hit) else _centre_crop(width, height, ratio)


def _integral(mask: np.ndarray) -> np.ndarray:
    """Zero-padded summed-area table, int64 [H+1, W+1], of a uint8 [H, W] mask."""
    out = np.zeros((mask.shape[0] + 1, mask.shape[1] + 1), dtype=np.int64)
    out[1:, 1:] = mask.cumsum(0, dtype=np.int64).cumsum(1)
    return out


def visible_fraction(mask: np.ndarray, boxes: np.ndarray, image_size: tuple[int, int], integral=None) -> np.ndarray:
    """Share of a mask's mass inside each box: float64 [n].

    mask: uint8 [Hm, Wm] (any resolution); boxes: float [n, 4] in pixels of an image of ``image_size`` = (W, H).
    A mask pixel counts as inside when its centre is. An empty mask gives 0."""
    hm, wm = mask.shape
    table = _integral(mask) if integral is None else integral
    total = table[-1, -1]
    if total == 0:
        return np.zeros(len(boxes))
    sx, sy = wm / image_size[0], hm / image_size[1]
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4) * np.array([sx, sy, sx, sy])
    # pixel j (centre j + 0.5) is inside [b0, b1) when ceil(b0 - 0.5) <= j < ceil(b1 - 0.5)
    x0, x1 = (np.clip(np.ceil(b[:, c] - 0.5), 0, wm).astype(np.int64) for c in (0, 2))
    y0, y1 = (np.clip(np.ceil(b[:, c] - 0.5), 0, hm).astype(np.int64) for c in (1, 3))
    inside = table[y1, x1] - table[y0, x1] - table[y1, x0] + table[y0, x0]
    return inside / total


def _box_crop(mask: np.ndarray, width: int, height: int, ratio) -> np.ndarray:
    """The crop covering a mask's bounding box (in image pixels), widened to an aspect within ``ratio``."""
    hm, wm = mask.shape
    ys, xs = np.nonzero(mask)
    sx, sy = width / wm, height / hm
    x0, x1 = xs.min() * sx, (xs.max() + 1) * sx
    y0, y1 = ys.min() * sy, (ys.max() + 1) * sy
    w, h = x1 - x0, y1 - y0
    w, h = min(max(w, h * ratio[0]), width), min(max(h, w / ratio[1]), height)
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    x0 = min(max(cx - w / 2, 0.0), width - w)
    y0 = min(max(cy - h / 2, 0.0), height - h)
    return np.array([x0, y0, x0 + w, y0 + h])


def instance_crops(
    rng: np.random.Generator,
    mask: np.ndarray,
    width: int,
    height: int,
    scale,
    min_visible: float,
    *,
    views: int = 2,
    ratio=RATIO,
    tries: int = INSTANCE_TRIES,
) -> np.ndarray:
    """Instance-aware crops (Free-ATM): float64 [views, 4] boxes, each keeping >= ``min_visible`` of the mask.

    mask: uint8 [Hm, Wm], non-empty, of an image of size (width, height). Per view, ``tries`` RandomResizedCrop
    candidates are drawn at once and the first that fits and keeps the object is used; when none does, the
    crop covering the object's bounding box (which keeps all of it)."""
    table = _integral(mask)
    if table[-1, -1] == 0:
        raise ValueError("instance_crops: the object's mask is empty")
    boxes, fits = _candidates(rng, width, height, scale, ratio, views * tries)  # all views' candidates at once
    ok = (fits & (visible_fraction(mask, boxes, (width, height), table) >= min_visible)).reshape(views, tries)
    boxes = boxes.reshape(views, tries, 4)
    first = ok.argmax(1)
    out = boxes[np.arange(views), first]
    for v in np.flatnonzero(~ok.any(1)):
        out[v] = _box_crop(mask, width, height, ratio)
    return out


# --------------------------------------------------------------------------------------------------
# Geometry applied to pixels


def crop_resize(image: Image.Image, box: np.ndarray, size: int, flip: bool) -> np.ndarray:
    """Crop ``box`` (float pixels) out of a PIL RGB image, resize to size x size (bilinear, antialiased when
    shrinking) and mirror horizontally when ``flip``: uint8 [size, size, 3]."""
    out = np.asarray(image.resize((size, size), Image.BILINEAR, box=tuple(float(v) for v in box)))
    return out[:, ::-1] if flip else out


def warp_masks(masks: np.ndarray, box: np.ndarray, image_size: tuple[int, int], flip: bool, out_size: int):
    """Apply an image crop/resize/flip to masks: uint8 [K, Hm, Wm] -> uint8 [K, M, M], M = ``out_size``.

    ``box`` is in pixels of the *image* (size ``image_size`` = (W, H)); masks may have another resolution, so
    the box is scaled by (Wm / W, Hm / H) and the masks go through the same PIL bilinear resize as the image
    in :func:`crop_resize`: the warped mask lies exactly where the warped image shows the object. Masks are
    resized four at a time as the channels of one CMYK image (PIL resamples CMYK channels independently)."""
    k, hm, wm = masks.shape
    sx, sy = wm / image_size[0], hm / image_size[1]
    mbox = (float(box[0]) * sx, float(box[1]) * sy, float(box[2]) * sx, float(box[3]) * sy)
    groups = -(-k // 4)
    packed = np.zeros((groups * 4, hm, wm), dtype=np.uint8)
    packed[:k] = masks
    out = np.empty((groups, out_size, out_size, 4), dtype=np.uint8)
    for g in range(groups):
        chunk = np.ascontiguousarray(packed[4 * g : 4 * g + 4].transpose(1, 2, 0))  # [Hm, Wm, 4]
        im = Image.frombuffer("CMYK", (wm, hm), chunk, "raw", "CMYK", 0, 1)
        out[g] = np.asarray(im.resize((out_size, out_size), Image.BILINEAR, box=mbox))
    out = out.transpose(0, 3, 1, 2).reshape(groups * 4, out_size, out_size)[:k]
    return np.ascontiguousarray(out[:, :, ::-1] if flip else out)


# --------------------------------------------------------------------------------------------------
# Colour augmentation: parameters per view (numpy, in the sample's RNG stream), ops per batch (torch)

# Layout of one view's parameter vector (float32 [NUM_COLOUR_PARAMS]).
P_JITTER, P_BRIGHT, P_CONTRAST, P_SAT, P_HUE = 0, 1, 2, 3, 4
P_ORDER = slice(5, 9)  # permutation of the four jitter ops (0 brightness, 1 contrast, 2 saturation, 3 hue)
P_GRAY, P_SIGMA, P_SOLARIZE = 9, 10, 11
NUM_COLOUR_PARAMS = 12


@dataclass(frozen=True)
class ColourAugment:
    """Colour augmentation settings (from ``DataConfig``): jitter strength s gives brightness/contrast/
    saturation factors in [max(0, 1 - s), 1 + s]; ``hue`` h gives a hue shift in [-h, h] (fraction of a turn;
    MoCo-v2 / SimCLR use 0.1 with s = 0.4)."""

    jitter: float = 0.4
    jitter_prob: float = 0.8
    grayscale_prob: float = 0.2
    blur_prob: float = 0.5
    solarize_prob: float = 0.0
    hue: float = 0.1

    @classmethod
    def from_config(cls, data: Any) -> ColourAugment:
        return cls(
            data.color_jitter, data.color_jitter_prob, data.grayscale_prob, data.blur_prob, data.solarize_prob, data.hue
        )

    def sample(self, rng: np.random.Generator, size: int) -> np.ndarray:
        """Parameters of one view of side ``size``: float32 [NUM_COLOUR_PARAMS] (layout: the P_* constants)."""
        p = np.zeros(NUM_COLOUR_PARAMS, dtype=np.float32)
        u = rng.random(4)  # one draw each for jitter, grayscale, blur, solarize: a fixed-length stream
        s = self.jitter
        lo = max(0.0, 1.0 - s)
        factors = rng.uniform(lo, 1.0 + s, size=3)
        hue = rng.uniform(-self.hue, self.hue)
        order = rng.permutation(4)
        sigma = rng.uniform(*BLUR_SIGMA_AT_224) * size / 224
        if u[0] < self.jitter_prob and s > 0:
            p[P_JITTER] = 1
        p[P_BRIGHT : P_SAT + 1] = factors
        p[P_HUE] = hue
        p[P_ORDER] = order
        p[P_GRAY] = u[1] < self.grayscale_prob
        p[P_SIGMA] = sigma if u[2] < self.blur_prob else 0.0
        p[P_SOLARIZE] = u[3] < self.solarize_prob
        return p


_RGB2YIQ = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
_YIQ2RGB = np.linalg.inv(_RGB2YIQ)
_LUMA_ROWS = np.tile(np.asarray(_GRAY), (3, 1))  # [3, 3]: every output channel = luma


def _slot_matrices(p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The colour jitter as linear maps: for each of the 4 order slots, a per-view RGB matrix and the
    contrast factor (1 where the slot is not contrast), float32 [4, N, 3, 3] and [4, N].

    brightness f: f*I; saturation f: f*I + (1-f)*luma rows; hue h: YIQ rotation by 2*pi*h; contrast f: f*I
    plus (1-f) * mean luma of the view (added by the caller, it depends on the pixels). Views without jitter
    get the identity in every slot."""
    n = len(p)
    eye = np.broadcast_to(np.eye(3), (n, 3, 3))
    f = p[:, P_BRIGHT : P_HUE + 1].astype(np.float64)
    theta = 2 * np.pi * f[:, 3]
    rot = np.zeros((n, 3, 3))
    rot[:, 0, 0] = 1
    rot[:, 1, 1], rot[:, 1, 2], rot[:, 2, 1], rot[:, 2, 2] = np.cos(theta), -np.sin(theta), np.sin(theta), np.cos(theta)
    op_mats = np.stack(
        [
            f[:, 0, None, None] * eye,
            f[:, 1, None, None] * eye,
            f[:, 2, None, None] * eye + (1 - f[:, 2, None, None]) * _LUMA_ROWS,
            _YIQ2RGB @ rot @ _RGB2YIQ,
        ]
    )  # [4 ops, N, 3, 3]
    jitter = p[:, P_JITTER] > 0
    order = p[:, P_ORDER].astype(np.int64)  # [N, 4 slots] -> op
    mats = np.empty((4, n, 3, 3))
    contrast = np.ones((4, n))
    for slot in range(4):
        op = order[:, slot]
        mats[slot] = np.where(jitter[:, None, None], op_mats[op, np.arange(n)], eye)
        contrast[slot] = np.where(jitter & (op == 1), f[:, 1], 1.0)
    return mats.astype(np.float32), contrast.astype(np.float32)


def _blur(x: torch.Tensor, sigma: np.ndarray) -> torch.Tensor:
    """Separable Gaussian blur with a per-view sigma in px (0 = unchanged): x [N, 3, H, W]; reflect padding.

    Kernels span +-ceil(3 sigma) px (at most the image side - 1)."""
    n, c, h, w = x.shape
    radius = max(1, min(math.ceil(3 * float(sigma.max())), min(h, w) - 1))
    t = np.arange(-radius, radius + 1, dtype=np.float64)
    s = np.maximum(sigma.astype(np.float64), 1e-6)[:, None]
    # each view's kernel is cut at its own +-ceil(3 sigma), so a view blurs the same in any batch
    k = np.exp(-0.5 * (t[None] / s) ** 2) * (np.abs(t)[None] <= np.ceil(3 * s))
    k /= k.sum(1, keepdims=True)  # sigma 0 -> a delta kernel
    k = torch.from_numpy(np.repeat(k, c, axis=0).astype(np.float32))  # [N*3, 2r+1]
    y = x.reshape(1, n * c, h, w)
    y = F.conv2d(F.pad(y, (radius, radius, 0, 0), mode="reflect"), k[:, None, None, :], groups=n * c)
    y = F.conv2d(F.pad(y, (0, 0, radius, radius), mode="reflect"), k[:, None, :, None], groups=n * c)
    return y.reshape(n, c, h, w)


def colour_augment(images: torch.Tensor, params, normalize: bool = True) -> torch.Tensor:
    """Apply per-view colour augmentation and ImageNet normalisation to a batch of views.

    images: uint8 [N, H, W, 3] (as the views are cropped) or float [N, 3, H, W] in [0, 1];
    params: float32 [N, NUM_COLOUR_PARAMS] (numpy or tensor) from :meth:`ColourAugment.sample`.
    Returns float32 [N, 3, H, W] (contiguous), normalised with ImageNet mean/std when ``normalize``.

    Whole-batch ops only (no per-view Python): each jitter slot is one batched 3x3 colour matrix (plus the
    contrast offset) and a clamp, grayscale another matrix, blur one grouped convolution per axis."""
    if images.dtype == torch.uint8:
        x = images.permute(0, 3, 1, 2).float().div_(255)
    else:
        x = images.float().clone()
    n, _, h, w = x.shape
    if n == 0:
        return x.contiguous()
    p = params.numpy() if isinstance(params, torch.Tensor) else np.asarray(params)
    flat = x.reshape(n, 3, h * w)
    luma = torch.tensor(_GRAY, dtype=torch.float32).view(1, 1, 3)
    if (p[:, P_JITTER] > 0).any():
        mats, contrast = _slot_matrices(p)
        for slot in range(4):
            out = torch.bmm(torch.from_numpy(mats[slot]), flat)
            cf = contrast[slot]
            if (cf != 1).any():
                mean = torch.bmm(luma.expand(n, 1, 3), flat).mean(-1, keepdim=True)  # [N, 1, 1]
                out += torch.from_numpy(1 - cf).view(n, 1, 1) * mean
            flat = out.clamp_(0, 1)
    gray = p[:, P_GRAY] > 0
    if gray.any():
        mats = np.where(gray[:, None, None], _LUMA_ROWS, np.eye(3)).astype(np.float32)
        flat = torch.bmm(torch.from_numpy(mats), flat)
    x = flat.reshape(n, 3, h, w)
    blur = np.flatnonzero(p[:, P_SIGMA] > 0)
    if len(blur) == n:
        x = _blur(x, p[:, P_SIGMA])
    elif len(blur):
        idx = torch.from_numpy(blur)
        x = x.index_copy(0, idx, _blur(x.index_select(0, idx), p[blur, P_SIGMA]))
    sol = p[:, P_SOLARIZE] > 0
    if sol.any():
        sel = torch.from_numpy(sol).view(n, 1, 1, 1)
        x = torch.where(sel & (x >= 0.5), 1 - x, x)
    if normalize:
        std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        x = (x - mean) / std
    return x.contiguous()


# --------------------------------------------------------------------------------------------------
# k-means segments (DetCon's unsupervised masks)


def kmeans_masks(
    image: np.ndarray, k: int, rng: np.random.Generator, *, iters: int = 6, max_side: int = 32, xy_weight: float = 0.5
) -> np.ndarray:
    """k-means segments of an image on colour + position: uint8 [k, H, W] masks (0/255) that partition it.

    image: uint8 [H, W, 3]. Features are RGB in [0, 1] and ``xy_weight`` * (x/W, y/H); k-means++ seeding and
    ``iters`` Lloyd iterations run on a strided subsample of at most ``max_side`` px per side, then every
    full-resolution pixel takes its nearest centre. Deterministic given ``rng``; a cluster that ends up
    empty gives an all-zero mask."""
    h, w = image.shape[:2]
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"kmeans_masks: image must be uint8 [H, W, 3], got {image.dtype} {list(image.shape)}")
    if k < 1:
        raise ValueError(f"kmeans_masks: k must be >= 1, got {k}")

    def features(step: int) -> np.ndarray:
        sub = image[step // 2 :: step, step // 2 :: step].astype(np.float32) / 255
        ys = (np.arange(step // 2, h, step, dtype=np.float32) + 0.5) / h * xy_weight
        xs = (np.arange(step // 2, w, step, dtype=np.float32) + 0.5) / w * xy_weight
        gy, gx = np.meshgrid(ys, xs, indexing="ij")
        return np.concatenate([sub, gx[..., None], gy[..., None]], axis=-1).reshape(-1, 5)

    def nearest(f: np.ndarray, c: np.ndarray) -> np.ndarray:
        d = (f * f).sum(1, keepdims=True) - 2 * f @ c.T + (c * c).sum(1)[None]
        return d.argmin(1)

    feats = features(max(1, math.ceil(max(h, w) / max_side)))
    n = len(feats)
    # k-means++ seeding
    centres = [feats[int(rng.integers(n))]]
    d2 = ((feats - centres[0]) ** 2).sum(1)
    for _ in range(1, k):
        total = float(d2.sum())
        j = int(rng.choice(n, p=d2 / total)) if total > 0 else int(rng.integers(n))
        centres.append(feats[j])
        d2 = np.minimum(d2, ((feats - feats[j]) ** 2).sum(1))
    c = np.stack(centres).astype(np.float32)
    for _ in range(iters):
        a = nearest(feats, c)
        counts = np.bincount(a, minlength=k)
        sums = np.stack([np.bincount(a, weights=feats[:, d], minlength=k) for d in range(5)], axis=1)
        nonempty = counts > 0
        c[nonempty] = (sums[nonempty] / counts[nonempty, None]).astype(np.float32)
    labels = nearest(features(1), c).reshape(h, w)
    return (labels[None] == np.arange(k)[:, None, None]).astype(np.uint8) * 255


# --------------------------------------------------------------------------------------------------
# View makers. Each has ``plan`` (sample + RNG -> every random decision: crop boxes, flips, colour parameters,
# the picked object; no pixels touched except for k-means masks) and ``__call__`` (plan + the pixel work, for
# the torch loader) and ``collate`` (per-sample dicts -> the batch). The DALI loader (dali.py) runs the same
# ``plan`` on the JPEG bytes' samples and does the pixel work in its pipeline, so both loaders draw the same
# random numbers for the same (seed, epoch, item).


def _stack_views(items: list[dict], field: str) -> torch.Tensor:
    return torch.from_numpy(np.stack([it[field] for it in items]))


def sample_size(sample: Any) -> tuple[int, int]:
    """(W, H) of a LabeledSample (PIL image) or LabeledRawSample (JPEG bytes + meta size)."""
    image = getattr(sample, "image", None)
    return image.size if image is not None else sample.size


def sample_pixels(sample: Any) -> np.ndarray:
    """uint8 [H, W, 3] pixels of a decoded or raw sample (a raw one is decoded here with PIL)."""
    image = getattr(sample, "image", None)
    if image is None:
        import io

        image = Image.open(io.BytesIO(sample.jpeg))
        image = image if image.mode == "RGB" else image.convert("RGB")
    return np.asarray(image)


def mask_box(box: np.ndarray, image_size: tuple[int, int], mask_shape: tuple[int, int]) -> np.ndarray:
    """An image-pixel crop box scaled to a mask of ``mask_shape`` = (Hm, Wm) covering the same image."""
    sx, sy = mask_shape[1] / image_size[0], mask_shape[0] / image_size[1]
    return np.asarray(box, dtype=np.float64) * np.array([sx, sy, sx, sy])


def valid_objects(masks: torch.Tensor, count: torch.Tensor, min_mass: float) -> torch.Tensor:
    """Object validity from warped masks: bool [B, K], object k < count[b] and mean(mask)/255 >= min_mass in
    every view. masks: uint8 [B, V, K, M, M] (V views) on any device; count: int64 [B]. Exact integer sums,
    then the same float64 divisions as numpy's mean, so both loaders agree bit for bit on equal masks."""
    b, v, k = masks.shape[:3]
    mass = masks.reshape(b, v, k, -1).sum(-1, dtype=torch.int64).double() / masks[0, 0, 0].numel() / 255
    ok = (mass >= min_mass).all(1)
    return ok & (torch.arange(k, device=masks.device)[None] < count.to(masks.device)[:, None])


def patch_importance(masks: torch.Tensor, grid: int) -> torch.Tensor:
    """Patch importance (DESIGN §4, MAE): mean over each patch of the union (max over objects) of the soft
    masks, float32 [B, grid*grid] in [0, 1], patches in row-major order as timm's ViT patch embedding.
    masks: uint8 [B, K, M, M] warped to the view; area averaging (exact when M is a multiple of grid)."""
    if masks.shape[1] == 0:
        return torch.zeros(masks.shape[0], grid * grid, device=masks.device)
    union = masks.amax(1, keepdim=True).float().div_(255)
    return F.adaptive_avg_pool2d(union, grid).flatten(1)


def view_boxes(boxes: np.ndarray, crop: np.ndarray, flip: bool, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Object boxes (x0, y0, x1, y1) in source-image pixels -> the same boxes in a view of side ``size`` made
    by cropping ``crop`` and mirroring when ``flip``; clipped to the view. Returns (float32 [K, 4], valid
    bool [K]: the clipped box is at least 1 px wide and high)."""
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    sx, sy = size / (crop[2] - crop[0]), size / (crop[3] - crop[1])
    x0, x1 = (np.clip((b[:, c] - crop[0]) * sx, 0, size) for c in (0, 2))
    y0, y1 = (np.clip((b[:, c] - crop[1]) * sy, 0, size) for c in (1, 3))
    if flip:
        x0, x1 = size - x1, size - x0
    out = np.stack([x0, y0, x1, y1], axis=1).astype(np.float32)
    return out, (x1 - x0 >= 1) & (y1 - y0 >= 1)


class TwoViews:
    """``data.views=two``: two augmented views with the masks warped alike (batch contract in loader.py).

    Per sample: the masks (the shard's, or k-means segments of the un-augmented image with
    ``data.masks=kmeans``), truncated to the first K = ``data.max_objects``; two crops (instance-aware with
    ``data.instance_views``: one object picked uniformly among those with a non-empty mask keeps
    >= ``data.min_visible`` of its area in each crop); flips; colour parameters."""

    num_views = 2

    def __init__(self, data: Any, min_mass: float = 0.01):
        self.data = data
        self.min_mass = float(min_mass)
        self.colour = ColourAugment.from_config(data)

    def plan(self, sample: Any, rng: np.random.Generator) -> dict:
        """The random decisions for one sample: masks uint8 [k, Hm, Wm] (k <= K), boxes float64 [2, 4] in image
        pixels, flips bool [2], colour float32 [2, P], obj (picked object or -1), size (W, H)."""
        d = self.data
        width, height = sample_size(sample)
        kmax = d.max_objects
        if d.masks == "kmeans":
            masks = kmeans_masks(sample_pixels(sample), d.kmeans_k, rng)[:kmax]
        else:
            masks = sample.masks[:kmax]
        k = len(masks)
        obj = -1
        if d.instance_views and k:
            present = np.flatnonzero(masks.reshape(k, -1).max(1) > 0)
            if len(present):
                obj = int(present[int(rng.integers(len(present)))])
        if obj >= 0:
            boxes = instance_crops(rng, masks[obj], width, height, d.crop_scale, d.min_visible)
        else:
            boxes = np.stack([random_resized_crop(rng, width, height, d.crop_scale) for _ in range(2)])
        flips = rng.random(2) < d.hflip_prob
        colour = np.stack([self.colour.sample(rng, d.image_size) for _ in range(2)])
        return {
            "index": sample.index,
            "label": sample.label,
            "masks": masks,
            "boxes": boxes,
            "flips": flips,
            "colour": colour,
            "obj": obj,
            "size": (width, height),
        }

    def __call__(self, sample: Any, rng: np.random.Generator) -> dict:
        d = self.data
        p = self.plan(sample, rng)
        boxes, flips, masks = p["boxes"], p["flips"], p["masks"]
        views = np.stack([crop_resize(sample.image, boxes[v], d.image_size, bool(flips[v])) for v in range(2)])
        warped = np.zeros((2, d.max_objects, d.mask_size, d.mask_size), dtype=np.uint8)
        for v in range(2):
            warped[v, : len(masks)] = warp_masks(masks, boxes[v], p["size"], bool(flips[v]), d.mask_size)
        return {
            "index": p["index"],
            "label": p["label"],
            "views": views,
            "masks": warped,
            "count": len(masks),
            "obj": p["obj"],
            "colour": p["colour"],
        }

    def collate(self, items: list[dict]) -> dict:
        """Per-sample dicts -> the batch: view1/view2 float32 [B,3,S,S], masks1/masks2 uint8 [B,K,M,M],
        valid bool [B,K], index/label int64 [B], obj int64 [B] (picked object, -1 = none)."""
        b = len(items)
        views = _stack_views(items, "views")  # [B, 2, S, S, 3]
        colour = _stack_views(items, "colour")  # [B, 2, P]
        s = views.shape[2]
        x = colour_augment(views.reshape(b * 2, s, s, 3), colour.reshape(b * 2, -1)).reshape(b, 2, 3, s, s)
        masks = _stack_views(items, "masks")  # [B, 2, K, M, M]
        count = torch.tensor([it["count"] for it in items], dtype=torch.int64)
        return {
            "index": torch.tensor([it["index"] for it in items], dtype=torch.int64),
            "label": torch.tensor([it["label"] for it in items], dtype=torch.int64),
            "view1": x[:, 0].contiguous(),
            "view2": x[:, 1].contiguous(),
            "masks1": masks[:, 0].contiguous(),
            "masks2": masks[:, 1].contiguous(),
            "valid": valid_objects(masks, count, self.min_mass),
            "obj": torch.tensor([it["obj"] for it in items], dtype=torch.int64),
        }


class SingleView:
    """``data.views=single`` (MAE): one view (RandomResizedCrop with ``data.crop_scale``, flip, colour from the
    config: MAE's recipe sets the colour probabilities to 0), its warped masks and the patch importance.

    Batch: image float32 [B,3,S,S], masks uint8 [B,K,M,M], valid bool [B,K] (object exists and covers
    >= freeatm.min_mass of the view), importance float32 [B,L] (:func:`patch_importance`, L = (S/P)^2 for
    P = ``data.patch_size``), index/label int64 [B]."""

    num_views = 1

    def __init__(self, data: Any, min_mass: float = 0.01):
        self.data = data
        self.min_mass = float(min_mass)
        self.colour = ColourAugment.from_config(data)
        self.grid = data.image_size // data.patch_size

    def plan(self, sample: Any, rng: np.random.Generator) -> dict:
        d = self.data
        width, height = sample_size(sample)
        box = random_resized_crop(rng, width, height, d.crop_scale)
        flip = bool(rng.random() < d.hflip_prob)
        colour = self.colour.sample(rng, d.image_size)
        return {
            "index": sample.index,
            "label": sample.label,
            "masks": sample.masks[: d.max_objects],
            "boxes": box[None],
            "flips": np.array([flip]),
            "colour": colour[None],
            "size": (width, height),
        }

    def __call__(self, sample: Any, rng: np.random.Generator) -> dict:
        d = self.data
        p = self.plan(sample, rng)
        box, flip, masks = p["boxes"][0], bool(p["flips"][0]), p["masks"]
        warped = np.zeros((d.max_objects, d.mask_size, d.mask_size), dtype=np.uint8)
        warped[: len(masks)] = warp_masks(masks, box, p["size"], flip, d.mask_size)
        return {
            "index": p["index"],
            "label": p["label"],
            "view": crop_resize(sample.image, box, d.image_size, flip),
            "masks": warped,
            "count": len(masks),
            "colour": p["colour"][0],
        }

    def collate(self, items: list[dict]) -> dict:
        masks = _stack_views(items, "masks")  # [B, K, M, M]
        count = torch.tensor([it["count"] for it in items], dtype=torch.int64)
        return {
            "index": torch.tensor([it["index"] for it in items], dtype=torch.int64),
            "label": torch.tensor([it["label"] for it in items], dtype=torch.int64),
            "image": colour_augment(_stack_views(items, "view"), _stack_views(items, "colour")),
            "masks": masks,
            "valid": valid_objects(masks[:, None], count, self.min_mass),
            "importance": patch_importance(masks, self.grid),
        }


PROMPT_TEMPLATE = " . The block {block} has a {object} ."  # Free-ATM's position prompt, appended to the caption


def block_index(box, size: float, grid: int = 3) -> int:
    """The grid cell (1-based, row-major: 1 = top left, grid*grid = bottom right) holding the centre of
    ``box`` (x0, y0, x1, y1) in a square view of side ``size``."""
    cx, cy = (float(box[0]) + float(box[2])) / 2, (float(box[1]) + float(box[3])) / 2
    col = min(max(int(cx / size * grid), 0), grid - 1)
    row = min(max(int(cy / size * grid), 0), grid - 1)
    return row * grid + col + 1


def position_prompt(
    caption: str,
    boxes: np.ndarray,
    valid: np.ndarray,
    words: list[str],
    rng: np.random.Generator,
    *,
    size: float,
    grid: int = 3,
    objects: int = 1,
    prob: float = 1.0,
) -> str:
    """The caption with Free-ATM position prompts: with probability ``prob``, for up to ``objects`` valid
    boxes (picked at random), ``PROMPT_TEMPLATE`` with the box's :func:`block_index` and the object's word.
    Draws a fixed amount of randomness (one uniform, one permutation of the K slots) whatever the outcome."""
    u = rng.random()
    order = rng.permutation(len(boxes))
    if u >= prob or objects == 0:
        return caption
    picks = [k for k in order if valid[k] and words[k]][:objects]
    if not picks:
        return caption
    # " . The block 1 has a red circle . The block 9 has a blue cross ."
    prompts = [PROMPT_TEMPLATE.format(block=block_index(boxes[k], size, grid), object=words[k]) for k in picks]
    return caption + prompts[0] + "".join(p.removeprefix(" .") for p in prompts[1:])


class VLPView:
    """``data.views=vlp`` (BLIP / ViLT): one view (RandomResizedCrop with ``data.crop_scale``, flip, colour)
    with the caption and the object boxes moved into the view. With ``prompts`` (``freeatm.enabled``), the
    caption carries position prompts (:func:`position_prompt`, settings ``vlp.prompt_*``) made from the
    boxes *in the view* (after the crop and flip).

    Batch: image float32 [B,3,S,S], caption list[str] [B], boxes float32 [B,K,4] (x0, y0, x1, y1 in view
    pixels, clipped; zero padded), box_valid bool [B,K] (object k exists and >= 1 px of its box is in the
    view), words list[list[str]] (each object's word, "" for padding), index/label int64 [B]."""

    num_views = 1

    def __init__(self, data: Any, prompts: bool = False, vlp: Any = None):
        self.data = data
        self.colour = ColourAugment.from_config(data)
        self.prompts = bool(prompts)
        self.grid = getattr(vlp, "prompt_grid", 3)
        self.prompt_objects = getattr(vlp, "prompt_objects", 1)
        self.prompt_prob = getattr(vlp, "prompt_prob", 1.0)

    def plan(self, sample: Any, rng: np.random.Generator) -> dict:
        d = self.data
        width, height = sample_size(sample)
        box = random_resized_crop(rng, width, height, d.crop_scale)
        flip = bool(rng.random() < d.hflip_prob)
        colour = self.colour.sample(rng, d.image_size)
        objects = sample.meta.get("objects", [])[: d.max_objects]
        boxes = np.zeros((d.max_objects, 4), dtype=np.float32)
        valid = np.zeros(d.max_objects, dtype=bool)
        if objects:
            vb, ok = view_boxes(np.array([o["box"] for o in objects], dtype=np.float64), box, flip, d.image_size)
            boxes[: len(objects)], valid[: len(objects)] = vb, ok
        words = [o.get("word", "") for o in objects] + [""] * (d.max_objects - len(objects))
        caption = sample.meta.get("caption", "")
        if self.prompts:
            caption = position_prompt(
                caption,
                boxes,
                valid,
                words,
                rng,
                size=d.image_size,
                grid=self.grid,
                objects=self.prompt_objects,
                prob=self.prompt_prob,
            )
        return {
            "index": sample.index,
            "label": sample.label,
            "caption": caption,
            "boxes_view": boxes,
            "box_valid": valid,
            "words": words,
            "boxes": box[None],
            "flips": np.array([flip]),
            "colour": colour[None],
            "size": (width, height),
        }

    def __call__(self, sample: Any, rng: np.random.Generator) -> dict:
        p = self.plan(sample, rng)
        p["view"] = crop_resize(sample.image, p["boxes"][0], self.data.image_size, bool(p["flips"][0]))
        p["colour"] = p["colour"][0]
        return p

    def collate(self, items: list[dict]) -> dict:
        return {
            "index": torch.tensor([it["index"] for it in items], dtype=torch.int64),
            "label": torch.tensor([it["label"] for it in items], dtype=torch.int64),
            "image": colour_augment(_stack_views(items, "view"), _stack_views(items, "colour")),
            "caption": [it["caption"] for it in items],
            "boxes": _stack_views(items, "boxes_view"),
            "box_valid": _stack_views(items, "box_valid"),
            "words": [it["words"] for it in items],
        }


class MultiCrop:
    """``data.views=multicrop``: ``data.global_crops`` views at ``data.image_size`` (scale ``data.crop_scale``)
    then ``data.local_crops`` views at ``data.local_size`` (scale ``data.local_scale``), SEER / SwAV style."""

    def __init__(self, data: Any):
        self.data = data
        self.colour = ColourAugment.from_config(data)
        self.num_views = data.global_crops + data.local_crops

    def crop_sizes(self) -> list[int]:
        """Side of each crop, in output order (global crops, then local crops)."""
        d = self.data
        return [d.image_size] * d.global_crops + [d.local_size] * d.local_crops

    def plan(self, sample: Any, rng: np.random.Generator) -> dict:
        """boxes float64 [V, 4], flips bool [V], colour float32 [V, P] for the V = global + local crops."""
        d = self.data
        width, height = sample_size(sample)
        boxes, flips, params = [], [], []
        for size, scale in [(d.image_size, d.crop_scale)] * d.global_crops + [
            (d.local_size, d.local_scale)
        ] * d.local_crops:
            boxes.append(random_resized_crop(rng, width, height, scale))
            flips.append(bool(rng.random() < d.hflip_prob))
            params.append(self.colour.sample(rng, size))
        return {
            "index": sample.index,
            "label": sample.label,
            "boxes": np.stack(boxes),
            "flips": np.array(flips, dtype=bool),
            "colour": np.stack(params),
            "size": (width, height),
        }

    def __call__(self, sample: Any, rng: np.random.Generator) -> dict:
        d = self.data
        p = self.plan(sample, rng)
        crops = [
            crop_resize(sample.image, p["boxes"][v], size, bool(p["flips"][v]))
            for v, size in enumerate(self.crop_sizes())
        ]
        g = d.global_crops
        return {
            "index": p["index"],
            "label": p["label"],
            "global": np.stack(crops[:g]),
            "global_colour": p["colour"][:g],
            "local": np.stack(crops[g:]) if d.local_crops else np.zeros((0, d.local_size, d.local_size, 3), np.uint8),
            "local_colour": p["colour"][g:],
        }

    def collate(self, items: list[dict]) -> dict:
        """-> crops: list of global_crops float32 [B,3,S,S] then local_crops [B,3,L,L]; index/label int64 [B]."""
        b = len(items)
        crops = []
        for field, n in (("global", self.data.global_crops), ("local", self.data.local_crops)):
            if n == 0:
                continue
            v = _stack_views(items, field)  # [B, n, s, s, 3]
            s = v.shape[2]
            x = colour_augment(v.reshape(b * n, s, s, 3), _stack_views(items, f"{field}_colour").reshape(b * n, -1))
            x = x.reshape(b, n, 3, s, s)
            crops += [x[:, j].contiguous() for j in range(n)]
        return {
            "index": torch.tensor([it["index"] for it in items], dtype=torch.int64),
            "label": torch.tensor([it["label"] for it in items], dtype=torch.int64),
            "crops": crops,
        }


class CaptionGroup:
    """``data.views=caption_group``: one item is ``data.group_size`` images sharing a caption (StableRep), one
    augmented view each (RandomResizedCrop with ``data.crop_scale``, flip, colour)."""

    def __init__(self, data: Any):
        self.data = data
        self.colour = ColourAugment.from_config(data)

    def plan(self, samples: list, rng: np.random.Generator, group: int) -> dict:
        """boxes float64 [G, 4], flips bool [G], colour float32 [G, P]: one view of each of the G samples."""
        d = self.data
        boxes, flips, params, sizes = [], [], [], []
        for sample in samples:
            width, height = sample_size(sample)
            boxes.append(random_resized_crop(rng, width, height, d.crop_scale))
            flips.append(bool(rng.random() < d.hflip_prob))
            params.append(self.colour.sample(rng, d.image_size))
            sizes.append((width, height))
        return {
            "indices": np.array([s.index for s in samples], dtype=np.int64),
            "label": samples[0].label,
            "group": group,
            "boxes": np.stack(boxes),
            "flips": np.array(flips, dtype=bool),
            "colour": np.stack(params),
            "sizes": sizes,
        }

    def __call__(self, samples: list, rng: np.random.Generator, group: int) -> dict:
        d = self.data
        p = self.plan(samples, rng, group)
        views = [crop_resize(s.image, p["boxes"][j], d.image_size, bool(p["flips"][j])) for j, s in enumerate(samples)]
        return {
            "indices": p["indices"],
            "label": p["label"],
            "group": group,
            "views": np.stack(views),
            "colour": p["colour"],
        }

    def collate(self, items: list[dict]) -> dict:
        """-> images float32 [B,G,3,S,S], group int64 [B] (caption id), index int64 [B] (first image of each
        group), indices int64 [B,G], label int64 [B]."""
        b = len(items)
        views = _stack_views(items, "views")  # [B, G, S, S, 3]
        g, s = views.shape[1], views.shape[2]
        x = colour_augment(views.reshape(b * g, s, s, 3), _stack_views(items, "colour").reshape(b * g, -1))
        indices = _stack_views(items, "indices")
        return {
            "index": indices[:, 0].clone(),
            "indices": indices,
            "label": torch.tensor([it["label"] for it in items], dtype=torch.int64),
            "group": torch.tensor([it["group"] for it in items], dtype=torch.int64),
            "images": x.reshape(b, g, 3, s, s),
        }


VIEW_MAKERS = {
    "two": TwoViews,
    "multicrop": MultiCrop,
    "caption_group": CaptionGroup,
    "single": SingleView,
    "vlp": VLPView,
}


def build_view_maker(cfg: Any) -> TwoViews | MultiCrop | CaptionGroup | SingleView | VLPView:
    """The view maker for ``cfg.data.views`` (``cfg``: a full Config; ``two`` and ``single`` also read
    ``freeatm.min_mass``)."""
    if cfg.data.views == "two":
        return TwoViews(cfg.data, cfg.freeatm.min_mass)
    if cfg.data.views == "single":
        return SingleView(cfg.data, cfg.freeatm.min_mass)
    if cfg.data.views == "vlp":
        return VLPView(cfg.data, prompts=cfg.freeatm.enabled, vlp=cfg.vlp)
    if cfg.data.views not in VIEW_MAKERS:
        raise ValueError(f"data.views must be one of {list(VIEW_MAKERS)}, got {cfg.data.views!r}")
    return VIEW_MAKERS[cfg.data.views](cfg.data)
