"""``freeatm show``: a PNG grid of generated samples with their masks, boxes, object words and captions.

Each cell: the image (upscaled with bilinear filtering to at least ``CELL_MIN_SIDE`` pixels wide, so 64-pixel
tiny-random images stay readable), the objects' soft masks as a translucent overlay: each pixel takes the colour of
the object whose mask is strongest there, with ``alpha = OVERLAY_ALPHA * mask`` (masks upsampled bilinearly to the
cell; blending every mask on top of each other would turn overlapping objects into one muddy colour), each object's
box in its colour with its word on a filled label, and the caption below, word-wrapped to ``CAPTION_LINES`` lines.
PIL only.

Layout (for callers that need the size): cells are ``cell_w = max(CELL_MIN_SIDE, W)`` wide and
``cell_h = round(H * cell_w / W)`` high for images of ``W x H``; the PNG is ``cols' * (cell_w + 2*PAD)`` by
``rows * (cell_h + 2*PAD + CAPTION_LINES*LINE_HEIGHT)`` pixels, with ``cols' = min(cols, n)`` and
``rows = ceil(n / cols')`` for the ``n`` samples drawn.
"""

from __future__ import annotations

import io
import math
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

__all__ = ["CAPTION_LINES", "CELL_MIN_SIDE", "LINE_HEIGHT", "PAD", "PALETTE", "draw_sample", "show"]

CELL_MIN_SIDE = 256
PAD = 6
CAPTION_LINES = 3
LINE_HEIGHT = 16
FONT_SIZE = 12
OVERLAY_ALPHA = 0.55
BACKGROUND = (255, 255, 255)
# Distinct, saturated colours (Tableau 10 without its grey), cycled when a sample has more objects.
PALETTE = (
    (214, 39, 40),
    (31, 119, 180),
    (44, 160, 44),
    (255, 127, 14),
    (148, 103, 189),
    (23, 190, 207),
    (227, 119, 194),
    (188, 189, 34),
    (140, 86, 75),
)


def _font(size: int = FONT_SIZE):
    # Pillow >= 10.1 ships a scalable default font when FreeType is available; older ones take no size.
    try:
        return ImageFont.load_default(size=size)
    except TypeError:
        return ImageFont.load_default()


def _text_color(rgb: tuple[int, int, int]) -> tuple[int, int, int]:
    """Black or white, whichever reads better on ``rgb`` (relative luminance)."""
    r, g, b = rgb
    return (0, 0, 0) if 0.299 * r + 0.587 * g + 0.114 * b > 150 else (255, 255, 255)


def _wrap(draw: ImageDraw.ImageDraw, text: str, width: int, font, max_lines: int) -> list[str]:
    """Greedy word wrap of ``text`` into lines at most ``width`` pixels wide; the last kept line ends in an ellipsis
    when text is left over. Words longer than a line are cut."""
    lines: list[str] = []
    line = ""
    words = text.split()
    k = 0
    while k < len(words) and len(lines) < max_lines:
        cand = f"{line} {words[k]}" if line else words[k]
        if draw.textlength(cand, font=font) <= width:
            line, k = cand, k + 1
            continue
        if not line:  # a single word wider than the line: cut it
            cut = words[k]
            while cut and draw.textlength(cut, font=font) > width:
                cut = cut[:-1]
            line, words[k] = cut, words[k][len(cut) :]
            if not words[k]:
                k += 1
        lines.append(line)
        line = ""
    if line and len(lines) < max_lines:
        lines.append(line)
    if k < len(words) and lines:
        last = lines[-1]
        while last and draw.textlength(last + "…", font=font) > width:
            last = last[:-1]
        lines[-1] = last + "…"
    return lines


def draw_sample(image: Image.Image, masks: np.ndarray, meta: dict, cell_w: int, cell_h: int, font=None) -> Image.Image:
    """One cell without caption: ``image`` resized to ``cell_w x cell_h`` with mask overlays, boxes and words.

    Args:
        image: PIL RGB image of size ``meta["size"]``.
        masks: uint8 ``[K, S, S]`` soft masks (0..255), in ``meta["objects"]`` order.
        meta: the sample's KEY.json (``objects[k].box`` in image pixels, ``objects[k].word``).
    """
    font = font or _font()
    w, h = image.size
    base = np.asarray(image.convert("RGB").resize((cell_w, cell_h), Image.BILINEAR), dtype=np.float32)
    if masks.shape[0]:
        up = np.stack([np.asarray(Image.fromarray(m).resize((cell_w, cell_h), Image.BILINEAR)) for m in masks])
        colours = np.array([PALETTE[k % len(PALETTE)] for k in range(len(masks))], dtype=np.float32)
        winner = up.argmax(axis=0)  # [H, W]: the object whose mask is strongest at each pixel
        alpha = OVERLAY_ALPHA * up.max(axis=0).astype(np.float32)[..., None] / 255.0
        base = base * (1.0 - alpha) + colours[winner] * alpha
    cell = Image.fromarray(base.round().clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(cell)
    sx, sy = cell_w / w, cell_h / h
    for k, obj in enumerate(meta.get("objects", [])):
        colour = PALETTE[k % len(PALETTE)]
        x0, y0, x1, y1 = obj["box"]
        if x1 > x0 and y1 > y0:
            box = [round(x0 * sx), round(y0 * sy), max(round(x0 * sx), round(x1 * sx) - 1), round(y1 * sy) - 1]
            draw.rectangle(box, outline=colour, width=2)
            anchor = (box[0], box[1])
        else:  # empty mask: no box; the word still appears (top-left), so the legend is complete
            anchor = (0, 0)
        label = str(obj.get("word", "?"))
        tw = draw.textlength(label, font=font)
        lx = min(anchor[0], max(0, cell_w - int(tw) - 4))
        ly = max(0, min(anchor[1], cell_h - LINE_HEIGHT))
        draw.rectangle([lx, ly, lx + int(tw) + 4, ly + LINE_HEIGHT - 2], fill=colour)
        draw.text((lx + 2, ly), label, fill=_text_color(colour), font=font)
    return cell


def show(dir: str | os.PathLike, out_png: str | os.PathLike, *, num: int = 16, cols: int = 4) -> dict:
    """Draw the first ``num`` samples of the shard directory ``dir`` into the PNG ``out_png`` (written atomically).

    Returns ``{"path", "num" (samples drawn), "size" [W, H] of the PNG, "keys"}``.

    Raises:
        FileNotFoundError: ``dir`` does not exist or is not a directory.
        ValueError: ``dir`` holds no complete shard, or ``num``/``cols`` are not positive ints.
        ShardError: a damaged shard or sample among those read (the message names the shard and key).
    """
    from freeatm_fast.data.shards import ShardReader, atomic_write_bytes, scan_shards

    for name, value in (("num", num), ("cols", cols)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"show: {name} must be a positive int, got {value!r}")
    src = Path(dir)
    if not src.is_dir():
        raise FileNotFoundError(f"show: {src} is not a directory")
    if not scan_shards(src):
        raise ValueError(f"show: {src} holds no shards (no complete NAME.tar file); generate some first")
    samples = []
    with ShardReader.from_dir(src) as reader:
        for sample in reader:
            samples.append(sample)
            if len(samples) == num:
                break
    if not samples:
        raise ValueError(f"show: the shards in {src} hold no samples")

    w, h = samples[0].image.size
    cell_w = max(CELL_MIN_SIDE, w)
    cell_h = round(h * cell_w / w)
    ncols = min(cols, len(samples))
    nrows = math.ceil(len(samples) / ncols)
    slot_w = cell_w + 2 * PAD
    slot_h = cell_h + 2 * PAD + CAPTION_LINES * LINE_HEIGHT
    grid = Image.new("RGB", (ncols * slot_w, nrows * slot_h), BACKGROUND)
    draw = ImageDraw.Draw(grid)
    font = _font()
    for n, sample in enumerate(samples):
        x, y = (n % ncols) * slot_w + PAD, (n // ncols) * slot_h + PAD
        grid.paste(draw_sample(sample.image, sample.masks, sample.meta, cell_w, cell_h, font), (x, y))
        caption = f"{sample.key}: {sample.caption}"
        for line_no, line in enumerate(_wrap(draw, caption, cell_w, font, CAPTION_LINES)):
            draw.text((x, y + cell_h + 2 + line_no * LINE_HEIGHT), line, fill=(0, 0, 0), font=font)

    out = Path(out_png)
    if out.parent and not out.parent.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    grid.save(buf, format="PNG")
    atomic_write_bytes(out, buf.getvalue())
    return {"path": str(out), "num": len(samples), "size": list(grid.size), "keys": [s.key for s in samples]}
