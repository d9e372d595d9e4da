"""Mask-quality evaluation (issue #8): how good are the free attention masks? ``freeatm eval masks``.

Every object word's mask is scored against a reference mask with two numbers:

- **IoU** of the binary mask (the DESIGN §4 rule, :func:`binary_masks`: each pixel goes to the argmax of
  ``[tau, soft_1, ..., soft_O]``, ties to the background) with the reference; **mIoU** is its mean over words;
- **pointing**: whether the most attended pixel (argmax of the soft mask; raster order on ties; an all-zero mask
  points nowhere) lies inside the reference.

A word whose reference is empty is left out of both and counted (``empty_reference``). Results come per word, per
word kind (:func:`word_kind`: ``colour`` "red", ``shape`` "circle", ``phrase`` "red circle", ``other``) and
overall. Two modes:

**Shard mode** (:func:`evaluate_shards`, ``freeatm eval masks DIR``): the masks a ``freeatm generate`` run stored
(``KEY.masks.u8``, soft, in ``objects`` order) against

- the exact masks of ``--reference REF_DIR`` (a shard directory whose samples share the keys and the object order,
  e.g. toy-world ground truth), or else
- a colour segmentation of the generated image: toy-world captions name a colour for every object ("a red
  circle, a small blue star and a green square on a striped background"; ``toyworld.COLOURS``), so the reference
  of a word is the set of pixels (image resized to the mask size: box filter down, bilinear up) within
  ``colour_distance`` (RGB Euclidean, default 60: the toy world jitters an object's colour by at most
  ``15·sqrt(3) = 26`` and keeps backgrounds at least 90 away) of the object's colour. That colour is the word itself
  (``red``), the colour word inside a phrase (``red circle``), or the colour word right before a shape word in
  the caption (``circle`` in "a red circle"; the word is located through the bracketed ``prompt`` of the sample, or
  by searching the caption in object order). Two objects of one colour share one reference, their union (counted
  in ``shared_colour``). A word without a findable colour is an error naming the key and the word, or is skipped
  and counted with ``skip_unknown``.

A shard holds only the final masks of one recipe, so this mode has no breakdown by resolution or timestep (the
recipe that made them is copied from ``index.json`` into the result).

**Re-noise mode** (:func:`evaluate_renoise`, ``freeatm eval masks --model M --toyworld``): exact ground truth,
with the model. Held-out toy-world images (the ``val`` split of ``toyworld.render_sample``, at the model's native
size) are encoded like a generated image (``vae.encode(2x-1)`` latent mean times the scaling factor; ``2x-1`` itself
for a pixel-space model without VAE), noised to timestep ``t`` with ``scheduler.add_noise`` (one fixed noise per
image, the same for every ``t``), and denoised by ONE UNet forward with their caption and the map capture
installed (``MapCapture``, fused processor), for each ``t`` of a grid (``(i + 0.5)·T/n``, ``i < n``: 50, 150, ...,
950 for n = 10). Each object has three words: its colour word, its shape word and the phrase (the sub-word tokens
of both averaged, as the recipe does for a multi-token object word); the binary rule runs per kind (the colour
words of an image compete with each other, not with its shape words), since each kind stands for a different way
of marking the object words of a prompt. The maps of every ``(resolution, t)`` stay on the host per batch; from
them every recipe of a grid is scored:

- resolutions: every non-empty subset of the captured ones (each upsampled, clamped, normalised per token, then
  averaged: ``aggregate.token_maps``), timestep window: all, or a contiguous third of the grid (low / mid / high
  noise), upsampling: bicubic or bilinear, per-token normalisation: max or min-max (``AggregateConfig.normalize``),
  and ``tau``.

The recipe with the best colour-word mIoU on a **validation** split (toy-world ``val`` indices ``[0, N)``) is chosen
(ties: the DESIGN §4 default, then grid order) and reported on a separate **test** split (``N`` rounded up to a
multiple of ``IMAGES_PER_CAPTION`` onwards, so no caption is shared), with the breakdown per word kind x resolution
x timestep window, the DESIGN default recipe's numbers next to it, and every recipe's val/test scores.

Outputs: ``OUT/eval_masks.json`` (written atomically) and ``OUT/eval_masks.png``, rows of words with the columns
image | soft mask (heat, the pointing pixel marked) | binary mask | reference, upscaled so 32-pixel images read.
"""

from __future__ import annotations

import io
import itertools
import json
import math
import os
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from freeatm_fast.data.toyworld import CLASSES, COLOURS, IMAGES_PER_CAPTION

__all__ = [
    "DEFAULT_COLOUR_DISTANCE",
    "DEFAULT_TAU",
    "DEFAULT_TAUS",
    "DEFAULT_UPSAMPLES",
    "DEFAULT_NORMALIZES",
    "JSON_NAME",
    "PNG_NAME",
    "WORD_KINDS",
    "binary_masks",
    "colour_reference",
    "evaluate_renoise",
    "evaluate_shards",
    "mask_scores",
    "object_char_spans",
    "object_colour",
    "summarise",
    "summary_line",
    "timestep_grid",
    "timestep_windows",
    "word_kind",
]

WORD_KINDS = ("colour", "shape", "phrase", "other")
RENOISE_KINDS = ("colour", "shape", "phrase")  # the three words of each toy-world object, in this order
DEFAULT_TAU = 0.4  # AggregateConfig's default (DESIGN §4)
DEFAULT_TAUS = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
DEFAULT_UPSAMPLES = ("bicubic", "bilinear")
DEFAULT_NORMALIZES = ("max", "minmax")  # AggregateConfig.normalize; "max" is the DESIGN §4 default
# RGB Euclidean distance to an object's palette colour: the toy world jitters each object's colour by +-15 per
# channel (at most 26) and keeps backgrounds >= 90 away from every object colour; 60 sits between the two.
DEFAULT_COLOUR_DISTANCE = 60.0
SELECT_KIND = "colour"  # the recipe is chosen on this kind's validation mIoU
JSON_NAME = "eval_masks.json"
PNG_NAME = "eval_masks.png"
# Noise of image i in the re-noise mode: its own CPU generator, seeded like generation's per-sample seeds.
_SEED_STRIDE = 1_000_003
_WORD = re.compile(r"[a-z]+")

# PNG layout: tiles at least this many pixels wide (32-pixel images x4), a label column and a header row.
TILE_MIN = 128
TILE_MAX = 256
LABEL_W = 170
HEADER_H = 18
PAD = 4
LINE_H = 14
COLUMNS = ("image", "soft mask", "binary mask", "reference")


# ----------------------------------------------------------------------------------------------------------------------
# Words and colours
# ----------------------------------------------------------------------------------------------------------------------


def word_kind(word: str) -> str:
    """``"colour"`` (a toy-world colour name), ``"shape"`` (a toy-world class), ``"phrase"`` (several words with a
    colour and a shape, "red circle"), else ``"other"``."""
    parts = _WORD.findall(str(word).lower())
    if len(parts) == 1 and parts[0] in COLOURS:
        return "colour"
    if len(parts) == 1 and parts[0] in CLASSES:
        return "shape"
    if any(p in COLOURS for p in parts) and any(p in CLASSES for p in parts):
        return "phrase"
    return "other"


def object_char_spans(meta: dict) -> list[tuple[int, int] | None]:
    """Character span ``[start, end)`` in ``meta["caption"]`` of each object word (None where it cannot be found).

    From the sample's bracketed ``prompt`` when it matches the caption and the object words (``freeatm generate``
    records it), else by searching each word (whole words, case-insensitive) in the caption, in object order.
    """
    caption = str(meta.get("caption", ""))
    words = [str(o.get("word", "")) for o in meta.get("objects", [])]
    prompt = meta.get("prompt")
    if isinstance(prompt, str) and "[" in prompt:
        from freeatm_fast.generate.prompts import parse_bracketed

        try:
            item = parse_bracketed(prompt)
        except ValueError:
            item = None
        if item is not None and item.text == caption and list(item.words) == words:
            return [o.char_span for o in item.objects]
    spans: list[tuple[int, int] | None] = []
    pos = 0
    for word in words:
        if not word.split():
            spans.append(None)
            continue
        pattern = re.compile(r"(?<!\w)" + r"\s+".join(re.escape(p) for p in word.split()) + r"(?!\w)", re.IGNORECASE)
        m = pattern.search(caption, pos) or pattern.search(caption)
        if m is None:
            spans.append(None)
        else:
            spans.append((m.start(), m.end()))
            pos = m.end()
    return spans


def object_colour(word: str, caption: str, span: tuple[int, int] | None, meta_colour: Any = None) -> str | None:
    """The toy-world colour name of an object word, or None.

    ``meta_colour`` (a toy-world object's ``colour`` field) wins when it is a colour name; then a colour word inside
    ``word`` ("red", "red circle"); then, for a shape word, the caption word right before ``span`` ("a small blue
    star": ``star`` is blue).
    """
    if isinstance(meta_colour, str) and meta_colour in COLOURS:
        return meta_colour
    parts = _WORD.findall(str(word).lower())
    for p in parts:
        if p in COLOURS:
            return p
    if span is not None and any(p in CLASSES for p in parts):
        before = _WORD.findall(caption[: span[0]].lower())
        if before and before[-1] in COLOURS:
            return before[-1]
    return None


def _resize_rgb(image, size: int) -> np.ndarray:
    """uint8 ``[size, size, 3]`` from a PIL image or uint8 array: box filter down, bilinear up."""
    from PIL import Image

    img = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image, dtype=np.uint8))
    img = img.convert("RGB")
    if img.size != (size, size):
        down = size < min(img.size)
        img = img.resize((size, size), Image.BOX if down else Image.BILINEAR)
    return np.asarray(img, dtype=np.uint8)


def colour_reference(image, rgb: Sequence[int], size: int, max_distance: float = DEFAULT_COLOUR_DISTANCE) -> np.ndarray:
    """bool ``[size, size]``: pixels of ``image`` (resized to ``size``) within ``max_distance`` (RGB Euclidean) of
    ``rgb``."""
    arr = _resize_rgb(image, size).astype(np.float32)
    dist = np.linalg.norm(arr - np.asarray(rgb, dtype=np.float32), axis=-1)
    return dist <= float(max_distance)


# ----------------------------------------------------------------------------------------------------------------------
# Binary rule and scores
# ----------------------------------------------------------------------------------------------------------------------


def binary_masks(soft: torch.Tensor, tau: float, valid: torch.Tensor | None = None) -> torch.Tensor:
    """The DESIGN §4 binary rule: each pixel goes to the argmax of ``[tau, soft_1, ..., soft_O]``.

    Args:
        soft: float ``[..., O, S, S]`` soft masks in ``[0, 1]``.
        tau: the constant background score; ties go to the background, then to the earlier object.
        valid: optional bool ``[..., O]``; invalid objects never win a pixel (padding, or words of another kind).

    Returns:
        bool ``[..., O, S, S]``, disjoint across objects (what ``aggregate`` stores as ``binary``).
    """
    if not isinstance(soft, torch.Tensor) or soft.dim() < 3:
        raise ValueError(f"binary_masks: soft must be a tensor [..., O, S, S], got {getattr(soft, 'shape', soft)}")
    cand = soft.float()
    if valid is not None:
        cand = cand.masked_fill(~valid.bool()[..., None, None], -1.0)
    background = torch.full_like(cand[..., :1, :, :], float(tau))
    labels = torch.cat([background, cand], dim=-3).argmax(dim=-3)  # [..., S, S]; first maximum on ties
    n_obj = soft.shape[-3]
    return labels.unsqueeze(-3) == torch.arange(1, n_obj + 1, device=soft.device).view(n_obj, 1, 1)


def mask_scores(soft: torch.Tensor, binary: torch.Tensor, reference: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """IoU and pointing of masks against references, all ``[..., S, S]``.

    Returns ``(iou, hit)``, both ``[...]``: float IoU of ``binary`` with ``reference`` (NaN where the reference is
    empty), and bool ``hit``: the argmax pixel of ``soft`` lies in the reference (False for an all-zero soft mask).
    """
    ref = reference.bool()
    ref_n = ref.flatten(-2).sum(-1)
    inter = (binary & ref).flatten(-2).sum(-1).float()
    union = (binary | ref).flatten(-2).sum(-1).float()
    iou = torch.where(ref_n > 0, inter / union.clamp(min=1.0), torch.full_like(inter, float("nan")))
    flat = soft.float().flatten(-2)
    idx = flat.argmax(dim=-1, keepdim=True)
    hit = ref.flatten(-2).gather(-1, idx).squeeze(-1) & (flat.amax(dim=-1) > 0)
    return iou, hit


def summarise(iou: Sequence[float] | np.ndarray, hit: Sequence[bool] | np.ndarray) -> dict:
    """``{"miou", "pointing", "n", "empty_reference"}`` over words; NaN IoUs (empty references) are left out.

    ``miou`` and ``pointing`` are None when no word has a reference.
    """
    iou = np.asarray(iou, dtype=np.float64).reshape(-1)
    hit = np.asarray(hit, dtype=bool).reshape(-1)
    ok = ~np.isnan(iou)
    n = int(ok.sum())
    return {
        "miou": float(iou[ok].mean()) if n else None,
        "pointing": float(hit[ok].mean()) if n else None,
        "n": n,
        "empty_reference": int((~ok).sum()),
    }


class _Acc:
    """Running IoU / pointing totals of one group of words (shard mode streams samples)."""

    def __init__(self):
        self.iou_sum = 0.0
        self.hits = 0
        self.n = 0
        self.empty = 0

    def add(self, iou: float, hit: bool) -> None:
        if math.isnan(iou):
            self.empty += 1
        else:
            self.iou_sum += iou
            self.hits += int(hit)
            self.n += 1

    def result(self) -> dict:
        return {
            "miou": self.iou_sum / self.n if self.n else None,
            "pointing": self.hits / self.n if self.n else None,
            "n": self.n,
            "empty_reference": self.empty,
        }


# ----------------------------------------------------------------------------------------------------------------------
# Output files
# ----------------------------------------------------------------------------------------------------------------------


def _heat(soft: np.ndarray) -> np.ndarray:
    """uint8 ``[H, W, 3]`` "hot" colour map of values in ``[0, 1]``: black, red, yellow, white."""
    v = np.clip(soft.astype(np.float32), 0.0, 1.0)
    rgb = np.stack([np.clip(3 * v, 0, 1), np.clip(3 * v - 1, 0, 1), np.clip(3 * v - 2, 0, 1)], axis=-1)
    return (rgb * 255).round().astype(np.uint8)


def _tile(arr: np.ndarray, side: int, smooth: bool):
    from PIL import Image

    img = Image.fromarray(arr)
    return img.resize((side, side), Image.BILINEAR if smooth else Image.NEAREST)


def _write_png(rows: list[dict], path: Path) -> None:
    """Rows of ``{image uint8 [H,W,3], soft [S,S], binary bool [S,S], reference bool [S,S], lines [str]}`` as a grid:
    label | image | soft (heat, pointing pixel marked with a cyan cross) | binary | reference."""
    from PIL import Image, ImageDraw

    from freeatm_fast.data.shards import atomic_write_bytes
    from freeatm_fast.generate.show import _font

    font = _font()
    side = min(TILE_MAX, max(TILE_MIN, max((r["image"].shape[1] for r in rows), default=TILE_MIN)))
    width = LABEL_W + len(COLUMNS) * (side + PAD) + PAD
    height = HEADER_H + max(1, len(rows)) * (side + PAD) + PAD
    grid = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for c, title in enumerate(COLUMNS):
        draw.text((LABEL_W + c * (side + PAD) + PAD, 2), title, fill=(0, 0, 0), font=font)
    if not rows:
        draw.text((PAD, HEADER_H + PAD), "no words with a reference to draw", fill=(0, 0, 0), font=font)
    for i, row in enumerate(rows):
        y = HEADER_H + i * (side + PAD) + PAD
        for j, line in enumerate(row["lines"]):
            draw.text((PAD, y + j * LINE_H), line, fill=(0, 0, 0), font=font)
        soft = np.asarray(row["soft"], dtype=np.float32)
        s = soft.shape[-1]
        tiles = [
            _tile(row["image"], side, smooth=True),
            _tile(_heat(soft), side, smooth=False),
            _tile(np.asarray(row["binary"], dtype=np.uint8) * 255, side, smooth=False),
            _tile(np.asarray(row["reference"], dtype=np.uint8) * 255, side, smooth=False),
        ]
        for c, tile in enumerate(tiles):
            x = LABEL_W + c * (side + PAD) + PAD
            grid.paste(tile.convert("RGB"), (x, y))
            draw.rectangle([x - 1, y - 1, x + side, y + side], outline=(128, 128, 128))  # an all-white mask shows
        if soft.max() > 0:  # the pointing pixel
            py, px = divmod(int(soft.argmax()), s)
            cx = LABEL_W + (side + PAD) + PAD + int((px + 0.5) * side / s)
            cy = y + int((py + 0.5) * side / s)
            draw.line([cx - 5, cy, cx + 5, cy], fill=(0, 255, 255), width=2)
            draw.line([cx, cy - 5, cx, cy + 5], fill=(0, 255, 255), width=2)
    buf = io.BytesIO()
    grid.save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())


def _write_outputs(result: dict, rows: list[dict], out: Path) -> dict:
    from freeatm_fast.data.shards import atomic_write_bytes

    out.mkdir(parents=True, exist_ok=True)
    png, js = out / PNG_NAME, out / JSON_NAME
    _write_png(rows, png)
    result["png"] = str(png)
    result["json"] = str(js)
    atomic_write_bytes(js, (json.dumps(result, indent=1) + "\n").encode("utf-8"))
    return result


def _row_lines(key: str, word: str, kind: str, iou: float, hit: bool, extra: str = "") -> list[str]:
    lines = [key, f"'{word}' ({kind})"]
    lines.append(
        "IoU -  (empty reference)" if math.isnan(iou) else f"IoU {iou:.2f}   pointing {'yes' if hit else 'no'}"
    )
    if extra:
        lines.append(extra)
    return lines


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def summary_line(result: dict) -> str:
    """One line: ``masks: colour mIoU 0.75 (pointing 0.93, n=812) | shape mIoU 0.31 (...) | all ...``; kinds without
    scored words are left out, and words with an empty reference are counted at the end."""
    if result.get("mode") == "renoise":
        kinds, overall = result["test"]["kinds"], result["test"]["overall"]
        r = result["chosen"]
        res = "+".join(str(x) for x in r["resolutions"])
        norm = r.get("normalize", "max")
        head = (
            f"masks (test, recipe: res {res}, window {r['window']}, {r['upsample']}, {norm}-normalised, "
            f"tau {r['tau']:g})"
        )
    else:
        kinds, overall = result["kinds"], result["overall"]
        head = "masks"
    parts = [
        f"{k} mIoU {_fmt(v['miou'])} (pointing {_fmt(v['pointing'])}, n={v['n']})" for k, v in kinds.items() if v["n"]
    ]
    parts.append(f"all mIoU {_fmt(overall['miou'])} (pointing {_fmt(overall['pointing'])}, n={overall['n']})")
    if overall["empty_reference"]:
        parts[-1] += f"; {overall['empty_reference']} words with an empty reference left out"
    fid = result.get("colour_fidelity")
    if fid and fid["fraction"] is not None:
        parts.append(
            f"colour fidelity {fid['fraction']:.2f} ({fid['present']}/{fid['requested']} requested colours present)"
        )
    return f"{head}: " + " | ".join(parts)


# ----------------------------------------------------------------------------------------------------------------------
# Shard mode
# ----------------------------------------------------------------------------------------------------------------------


def _check_shard_dir(path: str | os.PathLike, what: str) -> Path:
    from freeatm_fast.data.shards import INDEX_NAME, scan_shards

    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{what} {p}: no such directory")
    if not p.is_dir():
        raise NotADirectoryError(f"{what} {p}: not a directory (expected a shard directory from freeatm generate)")
    if not scan_shards(p):
        index_note = " (it has an index.json but no shard file)" if (p / INDEX_NAME).exists() else ""
        raise ValueError(
            f"{what} {p}: not a shard directory: no complete shard (NAME.tar){index_note}; expected the output of "
            "freeatm generate"
        )
    return p


def _generator_recipe(directory: Path) -> dict | None:
    """The capture / aggregate settings recorded in ``index.json`` by the generator, or None."""
    from freeatm_fast.data.shards import INDEX_NAME, read_index

    if not (directory / INDEX_NAME).exists():
        return None
    try:
        gen = read_index(directory).get("generator")
    except ValueError:
        return None
    if not isinstance(gen, dict):
        return None
    return {k: gen[k] for k in ("model", "capture", "aggregate", "steps", "guidance", "scheduler") if k in gen}


def _reference_masks(ref_dir: Path) -> dict[str, np.ndarray]:
    """{key: exact masks uint8 [K, S, S]} of a reference shard directory (JPEGs not decoded)."""
    from freeatm_fast.data.shards import ShardReader

    refs = {}
    with ShardReader.from_dir(ref_dir, decode=False) as reader:
        for s in reader:
            refs[s.key] = s.masks
    return refs


def _resize_binary(masks: np.ndarray, size: int) -> np.ndarray:
    """bool ``[K, size, size]`` from uint8/bool ``[K, H, W]``: area average, then ``>= 0.5``."""
    t = torch.from_numpy(np.asarray(masks, dtype=np.float32) / (255.0 if masks.dtype == np.uint8 else 1.0))
    if t.shape[-1] != size or t.shape[-2] != size:
        t = F.interpolate(t[None], size=(size, size), mode="area")[0] if t.shape[0] else t.new_zeros(0, size, size)
    return (t >= 0.5).numpy()


def evaluate_shards(
    directory: str | os.PathLike,
    *,
    reference: str | os.PathLike | None = None,
    out: str | os.PathLike | None = None,
    max_samples: int | None = None,
    tau: float | None = None,
    colour_distance: float = DEFAULT_COLOUR_DISTANCE,
    skip_unknown: bool = False,
    png_rows: int = 16,
) -> dict:
    """Score the stored soft masks of a shard directory (shard mode; see the module docstring).

    Args:
        directory: a shard directory written by ``freeatm generate``.
        reference: a shard directory with the exact masks of the same keys (same object order), or None for the
            colour segmentation of each generated image.
        out: where ``eval_masks.json`` and ``eval_masks.png`` go (default: ``directory``).
        max_samples: score only the first N samples (None: all).
        tau: background score of the binary rule (default: the generator's ``aggregate.tau`` from ``index.json``,
            else 0.4).
        colour_distance: RGB Euclidean radius of the colour segmentation.
        skip_unknown: skip (and count) words whose colour cannot be found instead of raising.
        png_rows: words drawn in the PNG.

    Returns:
        The result written to ``eval_masks.json``: ``overall``, ``kinds`` and ``words`` summaries (:func:`summarise`
        fields), ``num_samples``, ``num_words``, ``skipped_unknown``, ``shared_colour``, the settings, ``png``.

    Raises:
        FileNotFoundError / NotADirectoryError / ValueError naming the path for a bad ``directory`` or
        ``reference``; ValueError naming the key (and word) for a toy-world directory evaluated against itself,
        a key missing from the reference, or a word without a colour.
    """
    from freeatm_fast.data.shards import ShardReader

    src = _check_shard_dir(directory, "eval masks: DIR")
    ref_dir = _check_shard_dir(reference, "eval masks: --reference") if reference is not None else None
    if max_samples is not None and (
        not isinstance(max_samples, int) or isinstance(max_samples, bool) or max_samples < 0
    ):
        raise ValueError(f"eval masks: max_samples must be an int >= 0 (0 = all) or None, got {max_samples!r}")
    if not isinstance(png_rows, int) or png_rows < 0:
        raise ValueError(f"eval masks: png_rows must be an int >= 0, got {png_rows!r}")
    recipe = _generator_recipe(src)
    tau_source = "argument"
    if tau is None:
        agg = (recipe or {}).get("aggregate") or {}
        tau, tau_source = (
            (agg["tau"], "index.json") if isinstance(agg.get("tau"), (int, float)) else (DEFAULT_TAU, "default")
        )
    if not isinstance(tau, (int, float)) or not 0.0 <= float(tau) <= 1.0:
        raise ValueError(f"eval masks: tau must be a number in [0, 1], got {tau!r}")
    tau = float(tau)
    if not (isinstance(colour_distance, (int, float)) and colour_distance >= 0):
        raise ValueError(f"eval masks: colour_distance must be a number >= 0, got {colour_distance!r}")
    refs = _reference_masks(ref_dir) if ref_dir is not None else None

    t0 = time.perf_counter()
    overall, kinds, words = _Acc(), {k: _Acc() for k in WORD_KINDS}, {}
    word_kinds: dict[str, str] = {}
    n_samples = n_words = skipped = shared = 0
    skipped_examples: list[str] = []
    rows: list[dict] = []
    with ShardReader.from_dir(src) as reader:
        for sample in reader:
            if max_samples and n_samples >= max_samples:
                break
            key, meta = sample.key, sample.meta
            objects = meta["objects"]
            S = int(meta["mask_size"])
            if refs is None and meta.get("model") == "toyworld":
                raise ValueError(
                    f"eval masks: {src}: sample {key} is toy-world ground truth (model 'toyworld', exact masks), "
                    "there is nothing to compare its masks with; evaluate a generated directory, and pass this one as "
                    "--reference to compare that directory's masks with it"
                )
            n_samples += 1
            if not objects:
                continue
            soft = torch.from_numpy(sample.masks.astype(np.float32) / 255.0)  # [K, S, S]
            binary = binary_masks(soft, tau)
            ref_list: list[np.ndarray | None]
            notes = [""] * len(objects)
            if refs is not None:
                exact = refs.get(key)
                if exact is None:
                    raise ValueError(f"eval masks: sample {key} of {src} has no sample with that key in {ref_dir}")
                if exact.shape[0] != len(objects):
                    raise ValueError(
                        f"eval masks: sample {key}: {len(objects)} object words in {src} but {exact.shape[0]} masks in "
                        f"{ref_dir}; the reference must hold one mask per object, in the same order"
                    )
                ref_list = list(_resize_binary(exact, S))
            else:
                caption = meta["caption"]
                spans = object_char_spans(meta)
                colours = [
                    object_colour(o["word"], caption, span, o.get("colour"))
                    for o, span in zip(objects, spans, strict=True)
                ]
                image_small = _resize_rgb(sample.image, S)
                cache: dict[str, np.ndarray] = {}
                ref_list = []
                for o, colour in enumerate(colours):
                    if colour is None:
                        if not skip_unknown:
                            raise ValueError(
                                f"eval masks: sample {key} of {src}: cannot find the colour of object word "
                                f"{objects[o]['word']!r} in caption {caption!r} (colour segmentation needs a toy-world "
                                "caption naming a colour per object; pass --reference REF_DIR, or --skip-unknown)"
                            )
                        skipped += 1
                        if len(skipped_examples) < 10:
                            skipped_examples.append(f"{key}:{objects[o]['word']}")
                        ref_list.append(None)
                        continue
                    if colour not in cache:
                        cache[colour] = colour_reference(image_small, COLOURS[colour], S, colour_distance)
                    ref_list.append(cache[colour])
                    if colours.count(colour) > 1:
                        shared += 1
                        notes[o] = f"{colour}: union of {colours.count(colour)} objects"
            for o, ref in enumerate(ref_list):
                if ref is None:
                    continue
                word = str(objects[o]["word"])
                kind = word_kind(word)
                iou_t, hit_t = mask_scores(soft[o], binary[o], torch.from_numpy(np.asarray(ref, dtype=bool)))
                iou, hit = float(iou_t), bool(hit_t)
                overall.add(iou, hit)
                kinds[kind].add(iou, hit)
                words.setdefault(word, _Acc()).add(iou, hit)
                word_kinds[word] = kind
                n_words += 1
                if len(rows) < png_rows:
                    rows.append(
                        {
                            "image": np.asarray(sample.image.convert("RGB")),
                            "soft": soft[o].numpy(),
                            "binary": binary[o].numpy(),
                            "reference": np.asarray(ref, dtype=bool),
                            "lines": _row_lines(key, word, kind, iou, hit, notes[o]),
                        }
                    )
    if n_samples == 0:
        raise ValueError(f"eval masks: the shards in {src} hold no samples")
    result = {
        "mode": "shards",
        "dir": str(src),
        "reference": str(ref_dir) if ref_dir is not None else "colour",
        "tau": tau,
        "tau_source": tau_source,
        "colour_distance": float(colour_distance) if ref_dir is None else None,
        "num_samples": n_samples,
        "num_words": n_words,
        "skipped_unknown": skipped,
        "skipped_examples": skipped_examples,
        "shared_colour": shared,
        "overall": overall.result(),
        "kinds": {k: a.result() for k, a in kinds.items()},
        "words": {w: {**a.result(), "kind": word_kinds[w]} for w, a in sorted(words.items())},
        "generator_recipe": recipe,
        "seconds": round(time.perf_counter() - t0, 3),
    }
    if ref_dir is None:
        # prompt fidelity: the requested objects whose colour the generated image holds (a non-empty colour
        # segmentation); shared colours count once per object word
        o = result["overall"]
        requested = o["n"] + o["empty_reference"]
        result["colour_fidelity"] = {
            "present": o["n"],
            "requested": requested,
            "fraction": o["n"] / requested if requested else None,
        }
    return _write_outputs(result, rows, Path(out) if out is not None else src)


# ----------------------------------------------------------------------------------------------------------------------
# Re-noise mode
# ----------------------------------------------------------------------------------------------------------------------


def timestep_grid(num_timesteps: int, num_train_timesteps: int = 1000) -> list[int]:
    """``round((i + 0.5) · T / n)`` for ``i < n``: cell centres of ``n`` equal cells over ``[0, T)``."""
    if not isinstance(num_timesteps, int) or not 1 <= num_timesteps <= num_train_timesteps:
        raise ValueError(f"num_timesteps must be an int in [1, {num_train_timesteps}], got {num_timesteps!r}")
    T = int(num_train_timesteps)
    return [min(T - 1, int(round((i + 0.5) * T / num_timesteps))) for i in range(num_timesteps)]


def timestep_windows(timesteps: Sequence[int], num_windows: int = 3) -> dict[str, list[int]]:
    """``{"all": every position}`` plus up to ``num_windows`` contiguous chunks (low noise first), as positions into
    ``timesteps``, named by their timestep range (``"t50-250"``); empty or whole-grid chunks are left out."""
    n = len(timesteps)
    windows = {"all": list(range(n))}
    for chunk in np.array_split(np.arange(n), max(1, int(num_windows))):
        idx = [int(i) for i in chunk]
        if not idx or len(idx) == n:
            continue
        lo, hi = timesteps[idx[0]], timesteps[idx[-1]]
        windows[f"t{lo}" if lo == hi else f"t{lo}-{hi}"] = idx
    return windows


def _capture_window(positions: Sequence[int], n: int) -> list[float]:
    """The sampler's step-fraction window (``CaptureConfig.window``) that covers timestep cells ``positions`` of ``n``:
    a sampler walks t from high to low, so step fraction ``f`` sits near ``t = T·(1 - f)``."""
    lo, hi = min(positions), max(positions)
    return [round(1.0 - (hi + 1) / n, 6), round(1.0 - lo / n, 6)]


@dataclass
class _Recipe:
    window: str
    resolutions: tuple[int, ...]
    upsample: str
    normalize: str
    tau: float

    def as_dict(self) -> dict:
        return {
            "resolutions": list(self.resolutions),
            "window": self.window,
            "upsample": self.upsample,
            "normalize": self.normalize,
            "tau": self.tau,
        }


def _prompt_item(meta: dict):
    """The toy caption as a PromptItem whose object words are every object's colour and shape word, in text order
    (object ``o``: words ``2o`` and ``2o + 1``)."""
    from freeatm_fast.generate.prompts import ObjectWord, PromptItem

    caption = meta["caption"]
    starts, pos = [], 0
    words = caption.split(" ")  # the toy world's word spans count space-separated words (commas attached)
    for w in words:
        starts.append(pos)
        pos += len(w) + 1
    objs = []
    for o, obj in enumerate(meta["objects"]):
        i = obj["tokens"][0]
        colour, shape = obj["colour"], obj["shape"]
        if words[i] != colour or words[i + 1].rstrip(",") != shape:
            raise ValueError(
                f"toy-world caption {caption!r}: object {o} ({colour} {shape}) is not at words {i}, {i + 1}"
            )
        objs.append(ObjectWord(colour, (starts[i], starts[i] + len(colour))))
        objs.append(ObjectWord(shape, (starts[i + 1], starts[i + 1] + len(shape))))
    return PromptItem(caption, tuple(objs), origin="toy-world caption")


@dataclass
class _Batch:
    """One batch of toy-world images. Words are laid out kind-major: ``[B, 3, O]`` (colour, shape, phrase of each
    of up to ``O`` objects), so the per-kind binary rule is one argmax over the object axis."""

    keys: list[str]
    images: np.ndarray  # uint8 [B, H, W, 3]
    names: list[list[str]]  # per sample: "colour shape" of each object
    weights: torch.Tensor  # [B, 3 * O, K] averaging weights of each word's token columns
    valid: torch.Tensor  # bool [B, 3, O]
    refs: torch.Tensor  # bool [B, O, M, M] exact (visible-part) mask of each object
    maps: list[dict[int, torch.Tensor]]  # per timestep: {resolution: [B, K, h, w]} on the host

    def word(self, b: int, k: int, o: int) -> str:
        colour, shape = self.names[b][o].split(" ")
        return (colour, shape, self.names[b][o])[k]


def _render_batch(indices: Sequence[int], pipe, *, toy_seed: int, image_size: int, mask_size: int) -> tuple:
    from freeatm_fast.data.shards import sample_key
    from freeatm_fast.data.toyworld import render_sample
    from freeatm_fast.generate.prompts import object_token_columns, token_spans

    max_length = int(getattr(pipe.tokenizer, "model_max_length", 77) or 77)
    samples = [render_sample(toy_seed, "val", i, image_size=image_size) for i in indices]
    items = [_prompt_item(s.meta) for s in samples]
    spans = [token_spans(pipe.tokenizer, item, max_length) for item in items]
    tokens, groups = object_token_columns(spans, max_length, prompts=items)
    B, K = tokens.shape
    n_obj = max(len(s.meta["objects"]) for s in samples)
    weights = torch.zeros(B, 3, n_obj, K)
    valid = torch.zeros(B, 3, n_obj, dtype=torch.bool)
    refs = torch.zeros(B, n_obj, mask_size, mask_size, dtype=torch.bool)
    for b, s in enumerate(samples):
        n = len(s.meta["objects"])
        refs[b, :n] = torch.from_numpy(_resize_binary(s.masks, mask_size))
        for o in range(n):
            colour_cols, shape_cols = list(groups[b][2 * o]), list(groups[b][2 * o + 1])
            # phrase: both words' sub-word tokens averaged, as the recipe does for a multi-token object word
            for k, cols in enumerate((colour_cols, shape_cols, colour_cols + shape_cols)):
                weights[b, k, o, cols] = 1.0 / len(cols)
                valid[b, k, o] = True
    batch = _Batch(
        keys=[sample_key(i) for i in indices],
        images=np.stack([s.image for s in samples]),
        names=[[f"{o['colour']} {o['shape']}" for o in s.meta["objects"]] for s in samples],
        weights=weights.reshape(B, 3 * n_obj, K),
        valid=valid,
        refs=refs,
        maps=[],
    )
    return batch, tokens, [s.meta["caption"] for s in samples]


def _model_input(pipe, images: np.ndarray, device) -> torch.Tensor:
    """fp32 ``x0`` of the diffusion: VAE latent mean times the scaling factor, or the ``[-1, 1]`` image without VAE."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div(255.0).mul(2.0).sub(1.0).to(device)
    vae = getattr(pipe, "vae", None)
    if vae is None:
        return x
    latent = vae.encode(x.to(vae.dtype)).latent_dist.mean
    return latent.float() * float(vae.config.scaling_factor)


def _capture_batch(pipe, batch: _Batch, tokens, captions, timesteps, *, seed, indices, device, dtype, capture_config):
    """One UNet forward per timestep with the capture installed; fills ``batch.maps`` (on the host)."""
    from freeatm_fast.generate.capture import MapCapture

    B = len(indices)
    embeds = pipe.encode_prompt(captions, device, 1, False)[0].to(dtype)
    x0 = _model_input(pipe, batch.images, device)
    # One noise per image (its own CPU generator), the same at every t: the timesteps differ only in noise level.
    noise = torch.stack(
        [torch.randn(x0.shape[1:], generator=torch.Generator().manual_seed(seed * _SEED_STRIDE + i)) for i in indices]
    ).to(device)
    with MapCapture(
        pipe.unet,
        capture_config,
        batch_size=B,
        num_rows=B,
        tokens=tokens,
        latent_hw=tuple(x0.shape[-2:]),
        device=device,
        processor="fused",
    ) as cap:
        for t in timesteps:
            cap.reset()
            tt = torch.full((B,), int(t), dtype=torch.long, device=device)
            xt = pipe.scheduler.add_noise(x0, noise, tt)
            pipe.unet(xt.to(dtype), tt, encoder_hidden_states=embeds, return_dict=False)
            batch.maps.append({r: m.float().cpu() for r, m in cap.maps().items()})
    return batch


def _word_soft(
    batch: _Batch, positions, resolution: int, upsample: str, normalize: str, mask_size: int, device
) -> torch.Tensor:
    """``[B, 3, O, M, M]`` soft mask of every word at one resolution over a timestep window: the window's mean map,
    upsampled, clamped, normalised per token (``aggregate.token_maps``), sub-word tokens averaged."""
    from freeatm_fast.generate.aggregate import AggregateConfig, token_maps

    mean = torch.stack([batch.maps[i][resolution] for i in positions]).mean(0).to(device)
    cfg = AggregateConfig(resolutions=(resolution,), upsample=upsample, normalize=normalize, mask_size=mask_size)
    tok = token_maps({resolution: mean}, cfg)  # [B, K, M, M]
    soft = torch.einsum("bwk,bkst->bwst", batch.weights.to(device), tok).clamp_(0.0, 1.0)
    return soft.view(*batch.valid.shape, mask_size, mask_size)


def _winners(soft: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per kind, the best word's value and one-hot ``[B, 3, O, M, M]``: word ``o`` wins the pixels where
    ``win[o] & (value > tau)``, which is :func:`binary_masks` among the words of one kind for every ``tau`` at once
    (ties: background first, then the earlier object)."""
    cand = soft.masked_fill(~valid[..., None, None], -1.0)
    idx = cand.argmax(dim=2, keepdim=True)  # [B, 3, 1, M, M], first maximum on ties
    value = cand.gather(2, idx)
    win = idx == torch.arange(soft.shape[2], device=soft.device).view(1, 1, -1, 1, 1)
    return value, win


def _kind_binary(soft: torch.Tensor, tau: float, valid: torch.Tensor) -> torch.Tensor:
    """bool ``[B, 3, O, M, M]``: the binary rule run separately among the words of each kind."""
    value, win = _winners(soft, valid)
    return win & (value > tau)


def _score_batch(batch: _Batch, windows, subsets, upsamples, normalizes, taus, mask_size, device):
    """IoU float ``[n_words, R]`` and pointing bool ``[n_words, P]`` of the batch's valid words (order ``(b, kind,
    o)``) over the recipe grid: point recipe ``p`` = (window, subset, upsample, normalize), recipe
    ``p * len(taus) + tau``."""
    valid = batch.valid.to(device)
    ref = batch.refs.to(device)[:, None]  # [B, 1, O, M, M]: the three words of an object share its mask
    ref_flat = ref.flatten(-2)
    ref_n = ref_flat.sum(-1)  # [B, 1, O]
    nan = torch.tensor(float("nan"), device=device)
    resolutions = sorted({r for s in subsets for r in s}, reverse=True)
    iou_cols: dict[tuple, list[torch.Tensor]] = {}
    hit_cols: dict[tuple, torch.Tensor] = {}
    for w, positions in enumerate(windows.values()):
        for u, n, up, norm in [(u, n, up, nm) for u, up in enumerate(upsamples) for n, nm in enumerate(normalizes)]:
            per_res = {r: _word_soft(batch, positions, r, up, norm, mask_size, device) for r in resolutions}
            for s, subset in enumerate(subsets):
                soft = per_res[subset[0]] if len(subset) == 1 else torch.stack([per_res[r] for r in subset]).mean(0)
                flat = soft.flatten(-2)
                point = flat.argmax(-1, keepdim=True)
                hit = ref_flat.expand_as(flat).gather(-1, point).squeeze(-1) & (flat.amax(-1) > 0)
                hit_cols[(w, s, u, n)] = hit[valid]
                value, win = _winners(soft, valid)
                win_ref = win & ref
                cols = []
                for tau in taus:
                    above = value > tau
                    inter = (win_ref & above).flatten(-2).sum(-1)
                    pred = (win & above).flatten(-2).sum(-1)
                    union = (pred + ref_n - inter).clamp(min=1)
                    iou = torch.where(ref_n > 0, inter.float() / union.float(), nan)
                    cols.append(iou[valid])
                iou_cols[(w, s, u, n)] = cols
    order = sorted(hit_cols)  # (window, subset, upsample, normalize): the recipe order
    ious = torch.stack([c for k in order for c in iou_cols[k]], dim=1)
    hits = torch.stack([hit_cols[k] for k in order], dim=1)
    return ious.cpu().numpy(), hits.cpu().numpy()


def evaluate_renoise(
    model: Any,
    *,
    out: str | os.PathLike | None = None,
    num_images: int = 32,
    num_timesteps: int = 10,
    num_windows: int = 3,
    taus: Sequence[float] = DEFAULT_TAUS,
    upsamples: Sequence[str] = DEFAULT_UPSAMPLES,
    normalizes: Sequence[str] = DEFAULT_NORMALIZES,
    resolutions: Sequence[int] | None = None,
    image_size: int | None = None,
    mask_size: int | None = None,
    batch_size: int = 8,
    toy_seed: int = 0,
    seed: int = 0,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    backend: str = "auto",
    png_rows: int = 12,
    progress: bool = False,
) -> dict:
    """Exact-ground-truth evaluation on held-out toy-world images re-noised and denoised by the model (re-noise mode).

    Args:
        model: a name for ``models.load_pipeline`` ("tiny-random", "toy", a folder or hub id), or a loaded pipeline
            (``unet``, ``tokenizer``, ``scheduler``, ``vae`` or None, ``vae_scale_factor``, ``encode_prompt``).
        out: folder for ``eval_masks.json`` / ``eval_masks.png`` (None: no files written).
        num_images: ``N`` images in each of the validation and test splits.
        num_timesteps: points of the timestep grid (:func:`timestep_grid`); ``num_windows`` its contiguous windows.
        taus, upsamples, normalizes: the recipe grid's background scores, upsampling modes and per-token
            normalisations (the first of each is tried first).
        resolutions: levels to capture (``CaptureConfig.resolutions``; None: its default, the three finest);
            every non-empty subset enters the grid.
        image_size: side of the rendered images (default: the model's native size, ``sample_size`` times the VAE
            factor; another multiple of the VAE factor runs the UNet off its native size).
        mask_size: side of the compared masks (default: the image size).
        batch_size: images per UNet call.
        toy_seed: seed of the toy world rendered; ``seed``: of the noise (image ``i``: ``seed·1000003 + i``).
        device, dtype: default CUDA when available (fp16), else CPU (fp32).
        backend: ``cross_attention_with_maps`` backend.
        png_rows: words drawn in the PNG (from the first test images, with the chosen recipe).

    Returns:
        The JSON result: the grid, ``splits`` (indices), ``chosen`` recipe, its ``val`` and ``test`` summaries
        (``overall``, ``kinds``, ``words``), ``default_recipe`` (DESIGN §4) numbers, ``breakdown`` (test: kind x
        resolution x window), and ``recipes`` (every recipe's val / test summaries per kind).
    """
    from freeatm_fast.generate.aggregate import NORMALIZATIONS, UPSAMPLE_MODES
    from freeatm_fast.generate.capture import CaptureConfig
    from freeatm_fast.generate.models import default_dtype, load_pipeline
    from freeatm_fast.generate.sampler import DTYPES

    for name, value, lo in (
        ("num_images", num_images, 1),
        ("num_windows", num_windows, 1),
        ("batch_size", batch_size, 1),
        ("png_rows", png_rows, 0),
    ):
        if not isinstance(value, int) or isinstance(value, bool) or value < lo:
            raise ValueError(f"eval masks: {name} must be an int >= {lo}, got {value!r}")
    taus = tuple(float(t) for t in taus)
    if not taus or any(not 0.0 <= t <= 1.0 for t in taus):
        raise ValueError(f"eval masks: taus must be numbers in [0, 1], got {taus!r}")
    upsamples = tuple(upsamples)
    if not upsamples or any(u not in UPSAMPLE_MODES for u in upsamples):
        raise ValueError(f"eval masks: upsamples must be among {UPSAMPLE_MODES}, got {upsamples!r}")
    normalizes = tuple(normalizes)
    if not normalizes or any(n not in NORMALIZATIONS for n in normalizes):
        raise ValueError(f"eval masks: normalizes must be among {NORMALIZATIONS}, got {normalizes!r}")
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"eval masks: dtype must be one of {tuple(DTYPES)}, got {dtype!r}")
        dtype = DTYPES[dtype]
    t_start = time.perf_counter()
    if isinstance(model, str):
        model_name = model
        pipe = load_pipeline(model, device=device, dtype=dtype or default_dtype(device))
    else:
        model_name, pipe = type(model).__name__, model
    unet = pipe.unet
    device, dtype = unet.device, unet.dtype
    native = unet.config.sample_size
    native = int(native if isinstance(native, int) else native[0])
    vae_scale = int(getattr(pipe, "vae_scale_factor", 1) or 1) if getattr(pipe, "vae", None) is not None else 1
    if image_size is None:
        image_size = native * vae_scale
    if not isinstance(image_size, int) or image_size < 16 or image_size % vae_scale:
        raise ValueError(
            f"eval masks: image_size must be an int >= 16 and a multiple of {vae_scale}, got {image_size!r}"
        )
    mask_size = image_size if mask_size is None else mask_size
    if not isinstance(mask_size, int) or mask_size < 1:
        raise ValueError(f"eval masks: mask_size must be a positive int, got {mask_size!r}")
    T = int(pipe.scheduler.config.num_train_timesteps)
    timesteps = timestep_grid(num_timesteps, T)
    windows = timestep_windows(timesteps, num_windows)
    capture_config = CaptureConfig(resolutions=tuple(resolutions) if resolutions else None, backend=backend)

    val_idx = list(range(num_images))
    test_start = -(-num_images // IMAGES_PER_CAPTION) * IMAGES_PER_CAPTION  # no caption group in both splits
    test_idx = list(range(test_start, test_start + num_images))

    subsets: list[tuple[int, ...]] | None = None
    rows_iou, rows_hit = [], []
    word_rows: list[tuple[str, str, str, str]] = []  # (split, key, kind, word) per scored word
    first_test: _Batch | None = None
    with torch.inference_mode():
        for split, indices in (("val", val_idx), ("test", test_idx)):
            for start in range(0, len(indices), batch_size):
                chunk = indices[start : start + batch_size]
                batch, tokens, captions = _render_batch(
                    chunk, pipe, toy_seed=toy_seed, image_size=image_size, mask_size=mask_size
                )
                _capture_batch(
                    pipe, batch, tokens.to(device), captions, timesteps, seed=seed, indices=chunk, device=device,
                    dtype=dtype, capture_config=capture_config,
                )  # fmt: skip
                if subsets is None:
                    captured = sorted(batch.maps[0], reverse=True)  # finest first
                    subsets = [tuple(captured)] + [
                        s for n in range(1, len(captured)) for s in itertools.combinations(captured, n)
                    ]
                iou, hit = _score_batch(batch, windows, subsets, upsamples, normalizes, taus, mask_size, device)
                rows_iou.append(iou)
                rows_hit.append(hit)
                for b, k, o in batch.valid.nonzero().tolist():  # the (b, kind, o) order of _score_batch's rows
                    word_rows.append((split, batch.keys[b], RENOISE_KINDS[k], batch.word(b, k, o)))
                if split == "test" and first_test is None:
                    first_test = batch
                else:
                    batch.maps = []
                if progress:
                    print(
                        f"eval masks: {split} images {chunk[0]}..{chunk[-1]} done "
                        f"({time.perf_counter() - t_start:.1f} s)",
                        file=sys.stderr,
                        flush=True,
                    )
    iou_all = np.concatenate(rows_iou)  # [n_words, R]
    hit_all = np.concatenate(rows_hit)  # [n_words, P]
    splits = np.array([r[0] for r in word_rows])
    kinds = np.array([r[2] for r in word_rows])
    words = np.array([r[3] for r in word_rows])

    recipes = [
        _Recipe(w, s, u, n, t) for w in windows for s in subsets for u in upsamples for n in normalizes for t in taus
    ]  # index = point_index * len(taus) + tau index

    def point_of(r: int) -> int:
        return r // len(taus)

    def summary(split: str, r: int, sel: np.ndarray | None = None) -> dict:
        m = splits == split if sel is None else (splits == split) & sel
        return summarise(iou_all[m, r], hit_all[m, point_of(r)])

    def kinds_summary(split: str, r: int) -> dict:
        return {k: summary(split, r, kinds == k) for k in RENOISE_KINDS}

    default = _Recipe(
        "all",
        subsets[0],
        "bicubic" if "bicubic" in upsamples else upsamples[0],
        "max" if "max" in normalizes else normalizes[0],
        DEFAULT_TAU,
    )
    default_idx = next((i for i, rc in enumerate(recipes) if rc == default), None)
    scores = []
    for i in range(len(recipes)):
        v = summary("val", i, kinds == SELECT_KIND)["miou"]
        scores.append(-1.0 if v is None else v)
    best = max(range(len(recipes)), key=lambda i: (round(scores[i], 12), i == default_idx, -i))
    chosen = recipes[best]

    def full(split: str, r: int) -> dict:
        m = splits == split
        return {
            "overall": summary(split, r),
            "kinds": kinds_summary(split, r),
            "words": {
                w: {**summary(split, r, words == w), "kind": str(kinds[m & (words == w)][0])}
                for w in sorted(set(words[m].tolist()))
            },
        }

    def recipe_index(window: str, subset: tuple[int, ...], up: str, norm: str, tau: float) -> int:
        return recipes.index(_Recipe(window, subset, up, norm, tau))

    breakdown: dict = {}
    res_labels = {subsets[0]: "all", **{(r,): str(r) for r in subsets[0]}}
    for kind in RENOISE_KINDS:
        breakdown[kind] = {
            label: {
                w: summary(
                    "test", recipe_index(w, subset, chosen.upsample, chosen.normalize, chosen.tau), kinds == kind
                )
                for w in windows
            }
            for subset, label in res_labels.items()
        }

    result: dict = {
        "mode": "renoise",
        "model": model_name,
        "device": str(device),
        "dtype": str(dtype).replace("torch.", ""),
        "image_size": image_size,
        "mask_size": mask_size,
        "toyworld": {"split": "val", "seed": toy_seed},
        "noise_seed": seed,
        "splits": {
            "val": {"start": val_idx[0], "stop": val_idx[-1] + 1},
            "test": {"start": test_idx[0], "stop": test_idx[-1] + 1},
        },
        "timesteps": timesteps,
        "num_train_timesteps": T,
        "windows": {name: [timesteps[i] for i in pos] for name, pos in windows.items()},
        "resolutions": list(subsets[0]),
        "grid": {
            "resolutions": [list(s) for s in subsets],
            "windows": list(windows),
            "upsample": list(upsamples),
            "normalize": list(normalizes),
            "tau": list(taus),
        },
        "selection": {"split": "val", "kind": SELECT_KIND, "metric": "miou"},
        "chosen": {
            **chosen.as_dict(),
            "timesteps": [timesteps[i] for i in windows[chosen.window]],
            "capture_window": _capture_window(windows[chosen.window], len(timesteps)),
        },
        "val": full("val", best),
        "test": full("test", best),
        "default_recipe": {
            "recipe": default.as_dict(),
            "val": kinds_summary("val", default_idx) if default_idx is not None else None,
            "test": kinds_summary("test", default_idx) if default_idx is not None else None,
        },
        "breakdown": {
            "split": "test",
            "upsample": chosen.upsample,
            "normalize": chosen.normalize,
            "tau": chosen.tau,
            "kinds": breakdown,
        },
        "recipes": [
            {**rc.as_dict(), "val": kinds_summary("val", i), "test": kinds_summary("test", i)}
            for i, rc in enumerate(recipes)
        ],
        "seconds": round(time.perf_counter() - t_start, 3),
    }
    if out is None:
        return result
    rows = _renoise_rows(first_test, windows, chosen, mask_size, png_rows, device) if first_test is not None else []
    return _write_outputs(result, rows, Path(out))


def _renoise_rows(batch: _Batch, windows, chosen: _Recipe, mask_size: int, limit: int, device) -> list[dict]:
    """PNG rows of the first test images with the chosen recipe: the first object of each image (its colour, shape
    and phrase words) first, then the other objects."""
    positions = windows[chosen.window]
    soft = torch.stack(
        [
            _word_soft(batch, positions, r, chosen.upsample, chosen.normalize, mask_size, device)
            for r in chosen.resolutions
        ]
    ).mean(0)
    valid = batch.valid.to(device)
    refs = batch.refs.to(device)[:, None].expand_as(soft)
    binary = _kind_binary(soft, chosen.tau, valid)
    iou, hit = mask_scores(soft, binary, refs)
    order = sorted(batch.valid.nonzero().tolist(), key=lambda x: (x[2] > 0, x[2], x[0], x[1]))
    rows = []
    for b, k, o in order[:limit]:
        rows.append(
            {
                "image": batch.images[b],
                "soft": soft[b, k, o].cpu().numpy(),
                "binary": binary[b, k, o].cpu().numpy(),
                "reference": refs[b, k, o].cpu().numpy(),
                "lines": _row_lines(
                    batch.keys[b], batch.word(b, k, o), RENOISE_KINDS[k], float(iou[b, k, o]), bool(hit[b, k, o])
                ),
            }
        )
    return rows
