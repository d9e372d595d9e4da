"""The toy world: procedural images of coloured shapes with captions and exact instance masks (DESIGN §6).

Every image holds one *main* object (30-60% of the side) whose shape is the image's class ``label``, and 0-3
smaller distractors (any shape, a colour other than the main one's), drawn in object order on a textured
background (stripes, checker, dots, gradient or noise, random colours); later objects occlude earlier ones.
Masks are the *visible* part of each object, exact and binary (uint8 0/255, no anti-aliasing), at the image's
resolution, so they are the ground truth for mask-quality tests. Captions name every object::

    "a red circle, a small blue star and a green square on a striped background"

Images come in groups of :data:`IMAGES_PER_CAPTION` that share one caption (the same objects, colours and
background kind; new positions, sizes, rotations and background colours), like several diffusion samples of
one prompt; that is what StableRep's caption groups need. Sample ``i`` of a split depends only on
``(seed, split, i)`` (its caption on ``(seed, split, i // IMAGES_PER_CAPTION)``).

The shards follow DESIGN §5 exactly (``freeatm verify`` accepts them). Besides the required fields, each
sample's meta holds ``label`` (int), ``label_name``, ``split``, ``background``, ``caption_group``, and each
object ``shape``, ``colour``, ``rgb`` (the exact painted colour) and ``small``.

Use::

    root = default_toyworld(cfg.data)        # built on first use under $FREEATM_CACHE, then reused
    train_dir, val_dir = root / "train", root / "val"
"""

from __future__ import annotations

import fcntl
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from freeatm_fast.data.shards import (
    SHARD_SUFFIX,
    Sample,
    ShardWriter,
    atomic_write_bytes,
    read_index,
    sample_key,
    update_index,
)

__all__ = [
    "BACKGROUNDS",
    "CLASSES",
    "COLOURS",
    "IMAGES_PER_CAPTION",
    "SPLITS",
    "TOYWORLD_VERSION",
    "ToySample",
    "build_toyworld",
    "cached_toyworld",
    "caption_plan",
    "caption_text",
    "default_toyworld",
    "generated_toyworld_dir",
    "render_sample",
    "toyworld_cache_dir",
]

log = logging.getLogger(__name__)

# Bumped whenever rendering changes, so cached data sets of an older renderer are never reused.
TOYWORLD_VERSION = 2
CLASSES = ("circle", "square", "triangle", "diamond", "star", "cross", "hexagon", "ring")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "purple": (140, 60, 190),
    "orange": (245, 140, 30),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
# background kind -> the caption's adjective
BACKGROUNDS = ("striped", "checkered", "dotted", "gradient", "noisy")
SPLITS = ("train", "val")
IMAGES_PER_CAPTION = 4
# Like real object categories, each class has a typical colour (class i: the i-th colour of COLOURS): the main
# object wears it with this probability, any other colour otherwise. Distractors take any shape and any colour
# but the main object's, so a class's colour also shows up on distractors: a representation has to find the
# main object (and its shape) to classify, while colour alone gets part of the way, as it does on ImageNet.
TYPICAL_COLOUR_PROB = 0.75

# Object sizes as a share of the image side (the shape's circumscribed diameter).
_MAIN_SIZE = (0.3, 0.6)
_SMALL_SIZE = (0.15, 0.22)
_DISTRACTOR_SIZE = (0.22, 0.3)
# Shapes whose look survives any rotation; the others turn by at most +-20 degrees so that a square never
# becomes a diamond and a cross never an "x".
_FREE_ROTATION = frozenset({"triangle", "star", "hexagon"})
_SMALL_ROTATION = math.radians(20)
# A layout is kept when every object keeps this share of its own in-image area visible (not occluded);
# after _LAYOUT_TRIES the best layout found is used.
_MIN_VISIBLE_SHARE = 0.5
_LAYOUT_TRIES = 30
# Background colours stay this far (RGB Euclidean) from every object colour, so objects stay visible.
_MIN_COLOUR_DISTANCE = 90.0
_COLOUR_JITTER = 15  # per-image brightness offset of an object's palette colour, +-
_SPLIT_IDS = {name: i for i, name in enumerate(SPLITS)}
_CAPTION_STREAM = 1  # SeedSequence tag separating caption draws from per-image draws


@dataclass(frozen=True, eq=False)
class ToySample:
    """One rendered sample before JPEG encoding.

    image: uint8 [S, S, 3]; masks: uint8 [K, S, S] with values 0/255 (visible part of each object, in object
    order); meta: the KEY.json object (DESIGN §5 fields plus the toy-world extras).
    """

    image: np.ndarray
    masks: np.ndarray
    meta: dict


# --------------------------------------------------------------------------------------------------
# Shapes: inside tests in the object's local frame (u, v scaled so the circumscribed radius is 1)


def _regular_polygon(u: np.ndarray, v: np.ndarray, n: int) -> np.ndarray:
    """Inside a regular n-gon with circumradius 1 and a vertex on +v (pointing up in image coordinates)."""
    r = np.hypot(u, v)
    phi = np.arctan2(u, -v)  # angle from "up"
    sector = 2 * np.pi / n
    a = np.mod(phi, sector) - sector / 2
    return r * np.cos(a) <= np.cos(np.pi / n)


def _star(u: np.ndarray, v: np.ndarray, points: int = 5, inner: float = 0.45) -> np.ndarray:
    """Inside a star polygon with outer radius 1 and inner radius ``inner``, one tip up."""
    r = np.hypot(u, v)
    phi = np.arctan2(u, -v)
    half = np.pi / points
    a = np.abs(np.mod(phi + half, 2 * half) - half)  # angle from the nearest tip, in [0, half]
    px, py = r * np.cos(a), r * np.sin(a)
    # Edge from the tip T=(1, 0) to the inner vertex I=(inner cos half, inner sin half): inside when P lies
    # on the origin's side of the line TI.
    ix, iy = inner * np.cos(half), inner * np.sin(half)
    ex, ey = ix - 1.0, iy
    return ex * py - ey * (px - 1.0) <= 0.0  # cross((I - T), (P - T)) has the origin's sign (0 - ey*(-1) < 0)


def _inside(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    au, av = np.abs(u), np.abs(v)
    if shape == "circle":
        return u * u + v * v <= 1.0
    if shape == "ring":
        r2 = u * u + v * v
        return (r2 <= 1.0) & (r2 >= 0.55**2)
    if shape == "square":
        return np.maximum(au, av) <= 0.75
    if shape == "diamond":  # a rhombus, taller than wide, so that it differs from a turned square
        return au / 0.62 + av <= 1.0
    if shape == "triangle":
        return _regular_polygon(u, v, 3)
    if shape == "hexagon":
        return _regular_polygon(u, v, 6)
    if shape == "star":
        return _star(u, v)
    if shape == "cross":
        return ((au <= 0.95) & (av <= 0.32)) | ((au <= 0.32) & (av <= 0.95))
    raise ValueError(f"unknown toy-world shape {shape!r}; known: {list(CLASSES)}")


def _shape_window(shape: str, cx: float, cy: float, radius: float, angle: float, size: int):
    """The shape centred at (cx, cy) with circumradius ``radius`` and rotation ``angle``, rasterised on pixel
    centres inside its bounding square only: returns ((y0, y1, x0, x1), bool [y1-y0, x1-x0])."""
    x0, x1 = max(0, math.floor(cx - radius)), min(size, math.ceil(cx + radius) + 1)
    y0, y1 = max(0, math.floor(cy - radius)), min(size, math.ceil(cy + radius) + 1)
    dx = (np.arange(x0, x1, dtype=np.float32) + 0.5 - cx) / radius
    dy = (np.arange(y0, y1, dtype=np.float32) + 0.5 - cy) / radius
    c, s = math.cos(angle), math.sin(angle)
    u = c * dx[None, :] + s * dy[:, None]
    v = -s * dx[None, :] + c * dy[:, None]
    return (y0, y1, x0, x1), _inside(shape, u, v)


# --------------------------------------------------------------------------------------------------
# Backgrounds


def _background_colours(rng: np.random.Generator, avoid: list[tuple[int, int, int]]) -> tuple[np.ndarray, np.ndarray]:
    """Two RGB colours (float32 [3]) 30-80 apart (a visible but quiet texture), both far from every colour in
    ``avoid`` (the objects' colours) so that objects stand out; the best of 32 candidate pairs."""
    c1 = rng.uniform(0, 255, size=(32, 3))
    direction = rng.normal(size=(32, 3))
    direction /= np.linalg.norm(direction, axis=1, keepdims=True) + 1e-9
    c2 = np.clip(c1 + direction * rng.uniform(30, 80, size=(32, 1)), 0, 255)
    avoid_arr = np.asarray(avoid, dtype=np.float64).reshape(-1, 3)
    dist = np.minimum(
        np.linalg.norm(c1[:, None] - avoid_arr[None], axis=-1).min(1),
        np.linalg.norm(c2[:, None] - avoid_arr[None], axis=-1).min(1),
    )
    ok = np.flatnonzero(dist >= _MIN_COLOUR_DISTANCE)
    j = int(ok[0]) if len(ok) else int(np.argmax(dist))
    return c1[j].astype(np.float32), c2[j].astype(np.float32)


def _background(kind: str, rng: np.random.Generator, size: int, c1: np.ndarray, c2: np.ndarray, xs, ys) -> np.ndarray:
    """float32 [S, S, 3] texture of ``kind`` between colours c1 and c2."""
    if kind == "striped":
        theta = rng.uniform(0, np.pi)
        period = rng.uniform(size / 10, size / 4)
        t = (np.mod((xs * math.cos(theta) + ys * math.sin(theta)) / period, 1.0) < 0.5).astype(np.float32)
    elif kind == "checkered":
        cell = rng.uniform(size / 12, size / 5)
        ox, oy = rng.uniform(0, cell, size=2)
        t = (np.mod(np.floor((xs + ox) / cell) + np.floor((ys + oy) / cell), 2) == 1).astype(np.float32)
    elif kind == "dotted":
        spacing = rng.uniform(size / 8, size / 4)
        radius = spacing * rng.uniform(0.2, 0.35)
        ox, oy = rng.uniform(0, spacing, size=2)
        gx = np.mod(xs + ox, spacing) - spacing / 2
        gy = np.mod(ys + oy, spacing) - spacing / 2
        t = (gx * gx + gy * gy <= radius * radius).astype(np.float32)
    elif kind == "gradient":
        theta = rng.uniform(0, 2 * np.pi)
        proj = xs * math.cos(theta) + ys * math.sin(theta)
        t = ((proj - proj.min()) / max(float(np.ptp(proj)), 1e-6)).astype(np.float32)
    elif kind == "noisy":
        cells = max(2, size // 8)
        coarse = rng.uniform(0, 1, size=(cells + 1, cells + 1)).astype(np.float32)
        # bilinear upsampling of the coarse field by separable interpolation weights
        pos = (np.arange(size, dtype=np.float32) + 0.5) * cells / size
        i0 = np.minimum(pos.astype(np.int64), cells - 1)
        w = pos - i0
        rows = coarse[i0] * (1 - w)[:, None] + coarse[i0 + 1] * w[:, None]  # [S, cells+1]
        t = rows[:, i0] * (1 - w)[None, :] + rows[:, i0 + 1] * w[None, :]
        t = np.clip(t + rng.normal(0, 0.08, size=(size, size)).astype(np.float32), 0, 1)
    else:
        raise ValueError(f"unknown toy-world background {kind!r}; known: {list(BACKGROUNDS)}")
    return c1 * (1 - t)[..., None] + c2 * t[..., None]


# --------------------------------------------------------------------------------------------------
# One sample


def _rng(seed: int, split: str, *stream: int) -> tuple[np.random.Generator, int]:
    if split not in _SPLIT_IDS:
        raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")
    ss = np.random.SeedSequence([int(seed), _SPLIT_IDS[split], *stream])
    return np.random.default_rng(ss), int(ss.generate_state(1)[0])


def caption_plan(seed: int, split: str, group: int) -> dict:
    """What the caption of group ``group`` says: objects (shape, colour, small) in order, background kind."""
    rng, _ = _rng(seed, split, _CAPTION_STREAM, group)
    label = int(rng.integers(len(CLASSES)))
    colour_names = list(COLOURS)
    if rng.random() < TYPICAL_COLOUR_PROB:
        main_colour = colour_names[label % len(colour_names)]
    else:
        atypical = [c for i, c in enumerate(colour_names) if i != label % len(colour_names)]
        main_colour = atypical[int(rng.integers(len(atypical)))]
    others = [c for c in colour_names if c != main_colour]
    objects = [{"shape": CLASSES[label], "colour": main_colour, "small": False}]
    for _ in range(int(rng.integers(0, 4))):
        objects.append(
            {
                "shape": CLASSES[int(rng.integers(len(CLASSES)))],
                "colour": others[int(rng.integers(len(others)))],
                "small": bool(rng.random() < 0.5),
            }
        )
    background = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
    return {"label": label, "objects": objects, "background": background}


def caption_text(objects: list[dict], background: str) -> tuple[str, list[list[int]]]:
    """Caption text and, per object, the [start, end) word span of its colour..shape words."""
    words: list[str] = []
    spans = []
    for j, obj in enumerate(objects):
        if j > 0:
            words.append("and" if j == len(objects) - 1 else "")
        first = "small" if obj["small"] else obj["colour"]
        words.extend(["an" if first[0] in "aeiou" else "a"] + (["small"] if obj["small"] else []))
        start = len(words)
        words.extend([obj["colour"], obj["shape"]])
        spans.append([start, len(words)])
    # commas attach to the previous word; the empty placeholders mark where a comma goes
    out: list[str] = []
    remap = []
    for w in words:
        if w == "":
            out[-1] += ","
            remap.append(None)
        else:
            remap.append(len(out))
            out.append(w)
    spans = [[remap[s], remap[e - 1] + 1] for s, e in spans]
    text = " ".join(out) + f" on a {background} background"
    return text, spans


def _layout(rng, plan_objects: list[dict], size: int) -> tuple[list[dict], np.ndarray]:
    """Sample positions/sizes/rotations until every object keeps _MIN_VISIBLE_SHARE of itself visible.

    Returns (placed objects, owner map int8 [S, S]: -1 = background, k = object k is on top there).
    """
    best = None
    for _ in range(_LAYOUT_TRIES):
        placed, own = [], []
        owner = np.full((size, size), -1, dtype=np.int8)
        for k, obj in enumerate(plan_objects):
            lo, hi = _MAIN_SIZE if k == 0 else (_SMALL_SIZE if obj["small"] else _DISTRACTOR_SIZE)
            radius = rng.uniform(lo, hi) * size / 2
            margin = 0.6 * radius
            cx, cy = rng.uniform(margin, size - margin, size=2)
            limit = np.pi if obj["shape"] in _FREE_ROTATION else _SMALL_ROTATION
            angle = rng.uniform(-limit, limit) if obj["shape"] not in ("circle", "ring") else 0.0
            (y0, y1, x0, x1), inside = _shape_window(obj["shape"], cx, cy, radius, angle, size)
            owner[y0:y1, x0:x1][inside] = k
            own.append(int(inside.sum()))
            placed.append({"cx": float(cx), "cy": float(cy), "radius": float(radius), "angle": float(angle)})
        vis = np.bincount(owner.ravel().astype(np.int64) + 1, minlength=len(own) + 1)[1:]
        share = float((vis / np.maximum(np.asarray(own), 1)).min())
        if best is None or share > best[0]:
            best = (share, placed, owner)
        if share >= _MIN_VISIBLE_SHARE:
            break
    return best[1], best[2]


def render_sample(seed: int, split: str, index: int, image_size: int = 64) -> ToySample:
    """Render sample ``index`` of ``split`` (deterministic in (seed, split, index, image_size))."""
    if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or index < 0:
        raise ValueError(f"index must be a non-negative int, got {index!r}")
    if not (isinstance(image_size, int) and image_size >= 16):
        raise ValueError(f"image_size must be an int >= 16, got {image_size!r}")
    index = int(index)
    group = index // IMAGES_PER_CAPTION
    plan = caption_plan(seed, split, group)
    rng, sample_seed = _rng(seed, split, index)
    size = image_size
    placed, owner = _layout(rng, plan["objects"], size)
    rgbs = []
    for obj in plan["objects"]:
        shift = int(rng.integers(-_COLOUR_JITTER, _COLOUR_JITTER + 1))
        rgbs.append(tuple(int(c) for c in np.clip(np.asarray(COLOURS[obj["colour"]]) + shift, 0, 255)))
    c1, c2 = _background_colours(rng, rgbs)
    grid = np.arange(size, dtype=np.float32) + 0.5
    xs, ys = np.meshgrid(grid, grid)  # pixel centres, [S, S] each
    image = _background(plan["background"], rng, size, c1, c2, xs, ys)
    image = np.clip(np.rint(image), 0, 255).astype(np.uint8)
    # paint the visible part of each object with its exact colour
    palette = np.asarray(rgbs, dtype=np.uint8)
    fg = owner >= 0
    image[fg] = palette[owner[fg]]

    k = len(plan["objects"])
    masks = (owner[None] == np.arange(k, dtype=np.int8)[:, None, None]).astype(np.uint8) * 255
    caption, spans = caption_text(plan["objects"], plan["background"])
    objects = []
    for j, obj in enumerate(plan["objects"]):
        ys_j, xs_j = np.nonzero(masks[j])
        if len(xs_j):
            box = [int(xs_j.min()), int(ys_j.min()), int(xs_j.max()) + 1, int(ys_j.max()) + 1]
        else:  # fully occluded after _LAYOUT_TRIES (practically never): an empty box at the shape's centre
            cx, cy = int(placed[j]["cx"]), int(placed[j]["cy"])
            box = [cx, cy, cx, cy]
        objects.append(
            {
                "word": f"{obj['colour']} {obj['shape']}",
                "tokens": spans[j],
                "box": box,
                "area": float(len(xs_j)) / (size * size),
                "score": 1.0,
                "shape": obj["shape"],
                "colour": obj["colour"],
                "rgb": list(rgbs[j]),
                "small": obj["small"],
            }
        )
    meta = {
        "caption": caption,
        "seed": sample_seed,
        "model": "toyworld",
        "size": [size, size],
        "mask_size": size,
        "objects": objects,
        "label": plan["label"],
        "label_name": CLASSES[plan["label"]],
        "split": split,
        "background": plan["background"],
        "caption_group": group,
    }
    return ToySample(image, masks, meta)


# --------------------------------------------------------------------------------------------------
# Shard directories


def _generator_config(split: str, num_images: int, image_size: int, seed: int, shard_size: int) -> dict:
    return {
        "generator": "toyworld",
        "toyworld_version": TOYWORLD_VERSION,
        "split": split,
        "num_images": num_images,
        "image_size": image_size,
        "seed": seed,
        "shard_size": shard_size,
        "images_per_caption": IMAGES_PER_CAPTION,
        "classes": list(CLASSES),
        "colours": {name: list(rgb) for name, rgb in COLOURS.items()},
        "typical_colour_prob": TYPICAL_COLOUR_PROB,
        "backgrounds": list(BACKGROUNDS),
    }


def _write_split(out: Path, split: str, num_images: int, image_size: int, seed: int, shard_size: int) -> int:
    """Write the missing shards of one split; returns how many samples were rendered now."""
    out.mkdir(parents=True, exist_ok=True)
    config = _generator_config(split, num_images, image_size, seed, shard_size)
    if (out / "index.json").exists():
        update_index(out, config)  # raises early when the directory holds a different data set
    rendered = 0
    for j in range(math.ceil(num_images / shard_size)):
        name = f"shard-{j:06d}"
        if (out / f"{name}{SHARD_SUFFIX}").exists():
            continue  # complete shards are kept (a shard only appears complete, ShardWriter is atomic)
        with ShardWriter(out, name) as writer:
            for i in range(j * shard_size, min((j + 1) * shard_size, num_images)):
                s = render_sample(seed, split, i, image_size)
                writer.write(Sample(sample_key(i), s.image, s.masks, s.meta))
                rendered += 1
        update_index(out, config)
    update_index(out, config)
    return rendered


def build_toyworld(
    root: str | os.PathLike, *, train_images: int, val_images: int, image_size: int = 64, seed: int = 0, shard_size=500
) -> dict[str, Path]:
    """Write the toy world as shard directories ``root/train`` and ``root/val`` (DESIGN §5, with index.json).

    Resumable: complete shards are kept and only missing ones are rendered (each shard is written atomically).
    Raises ValueError when ``root`` already holds a toy world made with other settings. Returns
    ``{"train": root/"train", "val": root/"val"}``.
    """
    for name, value in (("train_images", train_images), ("val_images", val_images), ("seed", seed)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"build_toyworld: {name} must be an int >= 0, got {value!r}")
    if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size <= 0:
        raise ValueError(f"build_toyworld: shard_size must be a positive int, got {shard_size!r}")
    root = Path(root)
    paths = {}
    start = time.perf_counter()
    rendered = 0
    for split, n in (("train", train_images), ("val", val_images)):
        paths[split] = root / split
        rendered += _write_split(paths[split], split, n, image_size, seed, shard_size)
    if rendered:
        log.info(f"toy world: rendered {rendered} images into {root} in {time.perf_counter() - start:.1f} s")
    return paths


def toyworld_cache_dir() -> Path:
    """``$FREEATM_CACHE`` (default ``~/.cache/freeatm_fast``)."""
    return Path(os.environ.get("FREEATM_CACHE") or "~/.cache/freeatm_fast").expanduser()


def cached_toyworld(
    *, train_images: int = 4000, val_images: int = 1000, image_size: int = 64, seed: int = 0, cache_dir=None
) -> Path:
    """The toy world with these settings under the cache directory, built on first use; returns its root.

    The directory is named by the settings (``toyworld-v2-64px-4000-1000-s0``) and holds ``train/``, ``val/``
    and ``complete.json`` once built. An exclusive ``fcntl`` lock on a sibling ``.lock`` file makes processes
    started together (ranks of one job) build it once; the others wait and then reuse it.
    """
    cache = Path(cache_dir) if cache_dir is not None else toyworld_cache_dir()
    name = f"toyworld-v{TOYWORLD_VERSION}-{image_size}px-{train_images}-{val_images}-s{seed}"
    root = cache / name
    marker = root / "complete.json"
    if marker.is_file():
        return root
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / f".{name}.lock", "a") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)  # released when the file closes
        if marker.is_file():  # another process built it while this one waited
            return root
        log.warning(f"building the toy world in {root} (first use; later runs reuse it)")
        build_toyworld(root, train_images=train_images, val_images=val_images, image_size=image_size, seed=seed)
        counts = {split: read_index(root / split)["num_samples"] for split in SPLITS}
        info = {"train_images": train_images, "val_images": val_images, "image_size": image_size, "seed": seed}
        if counts != {"train": train_images, "val": val_images}:
            raise RuntimeError(f"{root}: toy world build produced {counts} samples, expected {info}")
        done = {**info, "version": TOYWORLD_VERSION, "classes": list(CLASSES)}
        atomic_write_bytes(marker, (json.dumps(done) + "\n").encode())
    return root


def generated_toyworld_dir(cfg_data: Any) -> Path:
    """Where ``data.toy_source=model`` keeps its generated train split: ``$FREEATM_CACHE/toygen-<model>-<N>-s<seed>``
    (``<model>``: "toy", or a digest of a model folder's path). Written by ``freeatm_fast.toy.data``; its
    ``complete.json`` records the model weights' digest, so new weights regenerate it."""
    import hashlib

    model = str(cfg_data.toy_model)
    tag = model if model.replace("-", "").isalnum() else hashlib.sha1(model.encode()).hexdigest()[:10]
    return toyworld_cache_dir() / f"toygen-{tag}-{cfg_data.toy_train_images}-s{cfg_data.toy_seed}"


def default_toyworld(cfg_data: Any = None) -> Path:
    """The embedded default data set for a ``DataConfig`` (its ``toy_*`` fields; None = the defaults).

    Returns the root: train split at ``root / "train"``, val split at ``root / "val"``.
    """
    if cfg_data is None:
        return cached_toyworld()
    return cached_toyworld(
        train_images=cfg_data.toy_train_images,
        val_images=cfg_data.toy_val_images,
        image_size=cfg_data.toy_image_size,
        seed=cfg_data.toy_seed,
    )
