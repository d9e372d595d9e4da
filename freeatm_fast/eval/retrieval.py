"""Image-text retrieval evaluation of the vision-language methods (BLIP, ViLT; issue #7): recall@k both ways.

``evaluate_retrieval(method, cfg, device=...)`` loads held-out image-caption pairs (:func:`load_pairs`), asks the
method for its score matrices (``Method.retrieval_scores(images, captions) -> (i2t, t2i)``, both [Ni, Nt]) and
returns :func:`recall_at_k` of them: image->text R@1/5/10, text->image R@1/5/10 and their mean (the numbers the
BLIP / ViLT papers report for COCO and Flickr30k). The training engine calls it at the end of a BLIP / ViLT run
and writes ``eval_retrieval.json``; ``freeatm eval retrieval --run RUN_DIR`` does the same for a saved run.

Where the pairs come from (:func:`load_pairs`):

- a shard directory (DESIGN §5; the toy world's ``val`` split by default): one image per sample, its caption from
  ``meta["caption"]``; equal captions are one text, correct for every image that has it (the toy world draws
  4 images per caption, so there each text has 4 correct images);
- a folder of images with a captions JSON (``captions.json``, or the folder's only ``*.json``): the COCO
  Karpathy format ``{"images": [{"filename", "filepath"?, "split"?, "sentences": [{"raw"}, ...]}, ...]}`` (the
  ``test`` split when entries carry a split, the split the retrieval literature reports), or a list
  ``[{"image": "file.jpg", "caption": "..." | ["...", ...]}, ...]`` (entries naming the same image are merged).

Images are resized (shorter side to S, bilinear, antialiased), centre-cropped to S x S and ImageNet-normalised,
and all held in memory as one float32 [Ni, 3, S, S] tensor (1,000 images at 224² are 0.6 GB), the input
``retrieval_scores`` takes. Ties in the scores count against the method (see :func:`recall_at_k`), so a model
that scores everything alike gets chance-level recall, not a perfect one.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from PIL import Image

__all__ = ["evaluate_retrieval", "load_pairs", "recall_at_k", "retrieval_line", "retrieval_source"]

CAPTIONS_JSON = "captions.json"
DEFAULT_KS = (1, 5, 10)
# Karpathy-format entries are filtered to this split when they carry one and no split is asked for.
KARPATHY_DEFAULT_SPLIT = "test"
# recall_at_k compares score rows in chunks of at most this many elements (bounds the temporary masks: 5k COCO
# test images x 25k captions would otherwise take 125M-element boolean matrices at once).
_CHUNK_ELEMENTS = 1 << 24
_AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


# --------------------------------------------------------------------------------------------------------------
# recall@k


def _positives(image_texts: list[list[int]], ni: int, nt: int, device: torch.device) -> torch.Tensor:
    """bool [Ni, Nt]: True where text j is a correct caption of image i; ValueError on a malformed list."""
    if len(image_texts) != ni:
        raise ValueError(f"image_texts has {len(image_texts)} entries but the score matrices have {ni} images (rows)")
    rows, cols = [], []
    for i, texts in enumerate(image_texts):
        if len(texts) == 0:
            raise ValueError(f"image_texts[{i}] is empty: every image needs at least one correct text")
        for j in texts:
            if isinstance(j, bool) or not isinstance(j, int) or not 0 <= j < nt:
                raise ValueError(f"image_texts[{i}] holds {j!r}, not a text index in [0, {nt})")
            rows.append(i)
            cols.append(j)
    pos = torch.zeros(ni, nt, dtype=torch.bool)
    pos[torch.tensor(rows), torch.tensor(cols)] = True
    without = (~pos.any(dim=0)).nonzero().flatten().tolist()
    if without:
        raise ValueError(
            f"text(s) {without[:10]} are correct for no image; every text needs at least one correct image"
        )
    return pos.to(device)


def _hits(scores: torch.Tensor, pos: torch.Tensor, ks: tuple[int, ...]) -> torch.Tensor:
    """Queries are rows: int64 [len(ks)], how many rows have a correct candidate within their top-k.

    The position of a row's best correct candidate is counted pessimistically: every incorrect candidate scoring
    at least as high ranks before it. NaN scores rank last.
    """
    counts = torch.zeros(len(ks), dtype=torch.int64, device=scores.device)
    kt = torch.tensor(ks, device=scores.device)
    step = max(1, _CHUNK_ELEMENTS // max(1, scores.shape[1]))
    for start in range(0, scores.shape[0], step):
        s = scores[start : start + step].float()
        s = torch.where(torch.isnan(s), float("-inf"), s)
        p = pos[start : start + step]
        best = s.masked_fill(~p, float("-inf")).amax(dim=1, keepdim=True)  # [n, 1]
        ahead = ((s >= best) & ~p).sum(dim=1)  # [n]: incorrect candidates ranked before the best correct one
        counts += (ahead[:, None] < kt[None, :]).sum(dim=0)
    return counts


def recall_at_k(
    i2t: torch.Tensor, t2i: torch.Tensor, image_texts: list[list[int]], ks: tuple[int, ...] = DEFAULT_KS
) -> dict:
    """Recall@k of image->text and text->image retrieval.

    i2t, t2i: float [Ni, Nt] scores, higher = better (any device; the same tensor twice is fine): ``i2t[i]`` ranks
    the texts for image i, ``t2i[:, j]`` ranks the images for text j. image_texts: for each image the indices of its
    correct texts (an image may have several; a text may be correct for several images; every image and every
    text needs at least one). Image->text R@k = share of images with a correct text among their k best-scored
    texts; text->image R@k = share of texts with a correct image among their k best-scored images. A k larger than
    the number of candidates means all of them (recall 1). Ties count against the method: a correct candidate
    tied with incorrect ones ranks after them (the lowest recall any tie-breaking could give); NaN scores rank
    last.

    Returns plain floats in [0, 1]: ``i2t_r{k}`` and ``t2i_r{k}`` for each k, and ``r_mean`` (their mean).
    """
    if i2t.dim() != 2 or t2i.shape != i2t.shape:
        raise ValueError(
            f"i2t and t2i must both be [Ni, Nt] score matrices, got {list(i2t.shape)} and {list(t2i.shape)}"
        )
    ks = tuple(int(k) for k in ks)
    if not ks or any(k < 1 for k in ks):
        raise ValueError(f"ks must be positive integers, got {ks!r}")
    ni, nt = i2t.shape
    if ni == 0 or nt == 0:
        raise ValueError(f"no images or no texts to rank (scores of shape {list(i2t.shape)})")
    pos = _positives(image_texts, ni, nt, i2t.device)
    i2t_hits = _hits(i2t, pos, ks).tolist()
    t2i_hits = _hits(t2i.to(i2t.device).T, pos.T, ks).tolist()
    out = {f"i2t_r{k}": h / ni for k, h in zip(ks, i2t_hits, strict=True)}
    out.update({f"t2i_r{k}": h / nt for k, h in zip(ks, t2i_hits, strict=True)})
    out["r_mean"] = sum(out.values()) / len(out)
    return out


# --------------------------------------------------------------------------------------------------------------
# image-caption pairs


def _check_max_images(max_images: int) -> None:
    if isinstance(max_images, bool) or not isinstance(max_images, int) or max_images < 0:
        raise ValueError(f"max_images must be an int >= 0 (0 = all), got {max_images!r}")


def _decode(data: bytes | Path, what: str):
    """PIL RGB image from bytes or a file; FileNotFoundError / ValueError naming ``what``."""
    if isinstance(data, Path) and not data.is_file():
        raise FileNotFoundError(f"{what}: image file does not exist")
    try:
        with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as im:
            return im.convert("RGB")
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, ... for damaged files
        raise ValueError(f"{what}: cannot decode the image ({type(exc).__name__}: {exc})") from exc


def _images(sources: list[tuple[bytes | Path, str]], image_size: int) -> torch.Tensor:
    """Decode and transform (``(data, name for errors)``, ...) in a thread pool -> float32 [N, 3, S, S]."""
    from freeatm_fast.eval.datasets import eval_transform

    transform = eval_transform(image_size)

    def one(item: tuple[bytes | Path, str]) -> torch.Tensor:
        return transform(_decode(*item))

    # PIL decodes and resizes with the GIL released, so a few threads keep large held-out sets quick to load.
    with ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1))) as pool:
        tensors = list(pool.map(one, sources))
    if not tensors:
        return torch.zeros(0, 3, image_size, image_size)
    return torch.stack(tensors)


def _texts_by_image(captions_per_image: list[list[str]]) -> tuple[list[str], list[list[int]]]:
    """Distinct captions (first-appearance order) and each image's indices into them."""
    texts: dict[str, int] = {}
    image_texts = []
    for caps in captions_per_image:
        ids: list[int] = []
        for c in caps:
            j = texts.setdefault(c, len(texts))
            if j not in ids:
                ids.append(j)
        image_texts.append(ids)
    return list(texts), image_texts


def _shard_pairs(root: Path, image_size: int, max_images: int, skip_bad: bool):
    from freeatm_fast.data.dataset import ShardDataset

    ds = ShardDataset(root, skip_bad=skip_bad)
    n = len(ds) if max_images == 0 else min(max_images, len(ds))
    sources, captions = [], []
    for i in range(n):
        sample = ds.get(i, raw=True)  # validated (header only); decoded in the thread pool below
        shard, key = ds.where(sample.index)
        caption = sample.meta["caption"].strip()
        if not caption:
            raise ValueError(f"{shard}: sample {key!r}: empty caption")
        sources.append((sample.jpeg, f"{shard}: sample {key!r}"))
        captions.append([caption])
    ds.close()
    texts, image_texts = _texts_by_image(captions)
    return _images(sources, image_size), texts, image_texts


def _captions_json(root: Path) -> Path | None:
    """``root/captions.json``, else the only ``*.json`` in ``root``; None when there is none; ValueError naming
    the folder when there are several and none is captions.json."""
    named = root / CAPTIONS_JSON
    if named.is_file():
        return named
    found = sorted(p for p in root.glob("*.json") if p.is_file())
    if len(found) > 1:
        raise ValueError(
            f"{root}: several JSON files ({', '.join(p.name for p in found[:5])}) and no {CAPTIONS_JSON}; name the "
            f"captions file {CAPTIONS_JSON}"
        )
    return found[0] if found else None


def _strings(value: Any, where: str) -> list[str]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items or not all(isinstance(c, str) for c in items):
        raise ValueError(f"{where}: expected a caption string or a non-empty list of strings, got {value!r}")
    out = [c.strip() for c in items]
    if not all(out):
        raise ValueError(f"{where}: empty caption")
    return out


def _karpathy_entries(data: dict, path: Path, split: str | None) -> list[tuple[str, list[str]]]:
    images = data["images"]
    if not isinstance(images, list):
        raise ValueError(f"{path}: 'images' must be a list of image entries")
    for n, e in enumerate(images):
        if not isinstance(e, dict):
            raise ValueError(f"{path}: images[{n}] must be an object, got {e!r}")
    if any("split" in e for e in images):
        wanted = split or KARPATHY_DEFAULT_SPLIT
        present = sorted({str(e.get("split")) for e in images})
        picked = [(n, e) for n, e in enumerate(images) if e.get("split") == wanted]
        if not picked:
            raise ValueError(f"{path}: no image of split {wanted!r} (splits present: {present})")
    else:
        picked = list(enumerate(images))
    out = []
    for n, e in picked:
        where = f"{path}: images[{n}]"
        if not isinstance(e.get("filename"), str) or not e["filename"]:
            raise ValueError(f"{where}: needs a 'filename' string")
        folder = e.get("filepath", "")
        if not isinstance(folder, str):
            raise ValueError(f"{where}: 'filepath' must be a string, got {folder!r}")
        sentences = e.get("sentences")
        if not isinstance(sentences, list) or not sentences:
            raise ValueError(f"{where}: needs a non-empty 'sentences' list")
        raws = []
        for m, s in enumerate(sentences):
            if not isinstance(s, dict) or not isinstance(s.get("raw"), str):
                raise ValueError(f"{where}: sentences[{m}] needs a 'raw' caption string")
            raws.append(s["raw"])
        out.append((str(Path(folder) / e["filename"]) if folder else e["filename"], _strings(raws, where)))
    return out


def _list_entries(data: list, path: Path) -> list[tuple[str, list[str]]]:
    out = []
    for n, e in enumerate(data):
        where = f"{path}: entry {n}"
        if not isinstance(e, dict) or not isinstance(e.get("image"), str) or not e["image"]:
            raise ValueError(f"{where}: expected {{'image': 'file.jpg', 'caption': '...' or [...]}}, got {e!r}")
        if "caption" not in e:
            raise ValueError(f"{where}: no 'caption' field")
        out.append((e["image"], _strings(e["caption"], where)))
    return out


def _json_pairs(root: Path, path: Path, image_size: int, max_images: int, split: str | None):
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not valid UTF-8 JSON ({exc})") from exc
    if isinstance(data, dict) and "images" in data:
        entries = _karpathy_entries(data, path, split)
    elif isinstance(data, list):
        entries = _list_entries(data, path)
    else:
        raise ValueError(
            f"{path}: expected the COCO Karpathy format {{'images': [{{'filename', 'sentences': [{{'raw'}}]}}]}} or "
            f"a list [{{'image': 'file.jpg', 'caption': '...'}}]"
        )
    if not entries:
        raise ValueError(f"{path}: lists no image")
    merged: dict[str, list[str]] = {}  # image path -> its captions; entries naming one image are merged
    for image, caps in entries:
        merged.setdefault(image, []).extend(caps)
    names = list(merged)
    if max_images:
        names = names[:max_images]
    texts, image_texts = _texts_by_image([merged[n] for n in names])
    sources = [(root / n, f"{root / n} (listed in {path.name})") for n in names]
    return _images(sources, image_size), texts, image_texts


def load_pairs(
    root: str | os.PathLike, image_size: int, max_images: int = 0, split: str | None = None, cfg: Any = None
) -> tuple[torch.Tensor, list[str], list[list[int]]]:
    """Held-out image-caption pairs for retrieval.

    root: a shard directory; a folder of images with a captions JSON (module docstring); or a directory whose
        ``split`` sub-directory (default ``val``) is a shard directory (the toy world's root, a ``data.root``).
    image_size: S; shorter side resized to S, centre crop S x S, ImageNet mean / std.
    max_images: the first this many images in the source's order (shard order, JSON order); 0 = all.
    split: the shard sub-directory to use under a root that holds splits (default ``val``), and for a Karpathy
        JSON whose entries carry a split the split used (default ``test``); a Karpathy JSON without split fields
        and the list format use every entry.
    cfg: a :class:`~freeatm_fast.config.Config` whose ``data.skip_bad`` applies to shards (None: bad samples raise).

    Returns (images float32 [Ni, 3, S, S], captions list[str] of distinct strings, image_texts: for each image the
    indices of its captions). A missing or undecodable image raises FileNotFoundError / ValueError naming the
    file (and, for shards, the shard and key); a bad JSON raises ValueError naming the file.
    """
    from freeatm_fast.eval.datasets import is_shard_dir

    _check_max_images(max_images)
    root = Path(root).expanduser()
    if not root.exists():
        raise FileNotFoundError(f"{root}: retrieval data does not exist")
    if not root.is_dir():
        raise NotADirectoryError(f"{root}: retrieval data must be a directory (shards, or images + captions JSON)")
    skip_bad = bool(cfg.data.skip_bad) if cfg is not None else False
    if is_shard_dir(root):
        return _shard_pairs(root, image_size, max_images, skip_bad)
    path = _captions_json(root)
    if path is not None:
        return _json_pairs(root, path, image_size, max_images, split)
    sub = root / (split or "val")
    if sub.is_dir() and is_shard_dir(sub):
        return _shard_pairs(sub, image_size, max_images, skip_bad)
    raise ValueError(
        f"{root}: neither a shard directory (index.json or *.tar shards), nor a folder of images with a captions "
        f"JSON ({CAPTIONS_JSON} or one *.json), nor a directory with a {(split or 'val')!r} shard sub-directory"
    )


# --------------------------------------------------------------------------------------------------------------
# the evaluation


def retrieval_source(cfg: Any, root: str | os.PathLike = "") -> Path:
    """Where :func:`evaluate_retrieval` reads its pairs: ``root``, else ``cfg.eval.root``, else the held-out split
    of the training data (``data.root``'s ``val`` sub-directory, or the toy world's ``val`` split)."""
    if root:
        return Path(root)
    if cfg.eval.root:
        return Path(cfg.eval.root)
    from freeatm_fast.data.loader import resolve_root

    return resolve_root(cfg, "val")


def evaluate_retrieval(
    method: torch.nn.Module,
    cfg: Any,
    device: str | torch.device | None = None,
    root: str | os.PathLike = "",
    max_images: int | None = None,
) -> dict:
    """Retrieval recall of ``method`` on held-out pairs.

    root: the pairs (see :func:`load_pairs`); "" = ``cfg.eval.root``, else the held-out split of the training data
        (``freeatm_fast.data.loader.resolve_root(cfg, "val")``: the toy world's val split by default).
    max_images: images used (0 = all); None = ``cfg.vlp.retrieval_max_images``.
    device: where the images go (default: the device of the method's first parameter).

    Images are S = ``cfg.eval.image_size`` (or ``cfg.data.image_size``) pixels square. Calls
    ``method.retrieval_scores(images, captions)`` once, under ``torch.no_grad``, with every module in eval mode
    (each module's flag is restored afterwards) and, on CUDA, autocast to ``cfg.train.precision``. Returns
    :func:`recall_at_k`'s dict plus ``n_images``, ``n_texts``, ``source`` (the path read), ``image_size`` and
    ``seconds``; JSON-serialisable.
    """
    start = time.perf_counter()
    source = retrieval_source(cfg, root)
    n = cfg.vlp.retrieval_max_images if max_images is None else max_images
    image_size = cfg.eval.image_size or cfg.data.image_size
    images, captions, image_texts = load_pairs(source, image_size, n, cfg=cfg)
    if device is None:
        first = next(method.parameters(), None)
        device = first.device if first is not None else torch.device("cpu")
    device = torch.device(device)
    dtype = _AUTOCAST.get(cfg.train.precision) if device.type == "cuda" else None
    amp = torch.autocast(device_type="cuda", dtype=dtype) if dtype is not None else contextlib.nullcontext()
    modes = [(m, m.training) for m in method.modules()]
    method.eval()
    try:
        with torch.no_grad(), amp:
            i2t, t2i = method.retrieval_scores(images.to(device), captions)
    finally:
        for m, training in modes:
            m.training = training
    want = (len(image_texts), len(captions))
    if tuple(i2t.shape) != want or tuple(t2i.shape) != want:
        raise ValueError(
            f"{type(method).__name__}.retrieval_scores returned {list(i2t.shape)} and {list(t2i.shape)} score "
            f"matrices for {want[0]} images and {want[1]} captions; both must be [{want[0]}, {want[1]}]"
        )
    result = recall_at_k(i2t.float(), t2i.float(), image_texts)
    result.update(
        n_images=want[0],
        n_texts=want[1],
        source=str(source),
        image_size=image_size,
        seconds=round(time.perf_counter() - start, 3),
    )
    return result


def retrieval_line(result: dict) -> str:
    """One human line from an :func:`evaluate_retrieval` result, e.g. ``retrieval i2t R@1/5/10 12.0/40.0/60.0 |
    t2i R@1/5/10 10.5/35.0/55.5 | mean 35.5 | 200 images, 50 texts, 3.2 s`` (recalls in percent)."""
    parts = []
    for way in ("i2t", "t2i"):
        ks = sorted(int(key.split("_r", 1)[1]) for key in result if key.startswith(f"{way}_r"))
        values = "/".join(f"{100 * result[f'{way}_r{k}']:.1f}" for k in ks)
        parts.append(f"{way} R@{'/'.join(str(k) for k in ks)} {values}")
    parts.append(f"mean {100 * result['r_mean']:.1f}")
    parts.append(f"{result['n_images']} images, {result['n_texts']} texts, {result['seconds']:.1f} s")
    return "retrieval " + " | ".join(parts)
