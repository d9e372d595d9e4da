"""Labelled image sets for evaluation: labelled shard directories and ImageFolders.

``open_labelled(root, image_size, crop_ratio)`` returns a torch Dataset that yields ``(image, label)`` with
``image`` a float32 ``[3, image_size, image_size]`` tensor (ImageNet-normalised) and ``label`` an int:

- a shard directory (DESIGN §5: ``*.tar`` shards, usually with ``index.json``), read through the validating
  ``freeatm_fast.data.shards`` reader, the label being each sample's ``meta["label"]`` (the toy world writes it);
- otherwise a torchvision ``ImageFolder`` (one sub-folder per class).

The eval transform resizes the shorter side to ``round(image_size / crop_ratio)`` and centre-crops
``image_size`` (ImageNet's linear-probe protocol is 224 / 0.875 = 256 -> 224).
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from freeatm_fast.data.shards import (
    INDEX_NAME,
    SHARD_SUFFIX,
    ShardError,
    read_index,
    read_shard,
    scan_shards,
    shard_keys,
)

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "LabelledShards", "eval_transform", "is_shard_dir", "open_labelled"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def eval_transform(image_size: int, crop_ratio: float = 1.0) -> Callable[[Image.Image], torch.Tensor]:
    """PIL RGB image -> float32 [3, image_size, image_size]: resize the shorter side to
    ``round(image_size / crop_ratio)`` (bilinear, antialiased), centre crop, ImageNet mean/std."""
    from torchvision import transforms

    if not (isinstance(image_size, int) and image_size > 0):
        raise ValueError(f"image_size must be a positive int, got {image_size!r}")
    if not 0 < crop_ratio <= 1:
        raise ValueError(f"crop_ratio must be in (0, 1], got {crop_ratio!r}")
    resize = max(image_size, round(image_size / crop_ratio))
    return transforms.Compose(
        [
            transforms.Resize(resize, interpolation=transforms.InterpolationMode.BILINEAR, antialias=True),
            transforms.CenterCrop(image_size),
            transforms.ToTensor(),
            transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


def _shard_counts(root: Path, names: list[str]) -> list[int]:
    """Samples per shard: from ``index.json`` where its (bytes, mtime_ns) still match the file, else from the tar
    headers (``shard_keys``, no image decoding). Only used for ``len()``; the reader validates every sample."""
    cached: dict[str, dict] = {}
    if (root / INDEX_NAME).exists():
        cached = {s["name"]: s for s in read_index(root)["shards"]}
    counts = []
    for name in names:
        path = root / f"{name}{SHARD_SUFFIX}"
        entry = cached.get(name)
        st = path.stat()
        if entry is not None and entry.get("bytes") == st.st_size and entry.get("mtime_ns") == st.st_mtime_ns:
            counts.append(entry["num_samples"])
        else:
            counts.append(len(shard_keys(path)))
    return counts


def _label_of(meta: dict, shard: Path, key: str) -> int:
    if "label" not in meta:
        raise ShardError(
            f"{shard}: sample {key!r}: KEY.json has no 'label' field; labelled evaluation needs an int class label "
            f"in every sample's meta (fields present: {sorted(meta)})"
        )
    label = meta["label"]
    if isinstance(label, bool) or not isinstance(label, int) or label < 0:
        raise ShardError(f"{shard}: sample {key!r}: field 'label' must be an int >= 0, got {label!r}")
    return label


class LabelledShards(IterableDataset):
    """A labelled shard directory as a stream of ``(image [3,S,S] float32, label int)``, in shard order.

    Every sample is validated by ``ShardReader`` (a bad one raises ``ShardError`` naming the shard and key); a
    sample without ``meta["label"]`` raises naming the shard and key. With DataLoader workers, whole shards are
    dealt to workers when there are at least as many shards as workers, otherwise every worker reads all shards
    and decodes every W-th sample. ``len()`` is the number of samples (from ``index.json`` or the tar headers).
    """

    def __init__(self, root: str | os.PathLike, transform: Callable[[Image.Image], Any] | None = None):
        self.root = Path(root)
        self.shard_names = scan_shards(self.root)
        if not self.shard_names:
            raise ValueError(f"{self.root}: no complete *{SHARD_SUFFIX} shard in this directory")
        self.shards = [self.root / f"{n}{SHARD_SUFFIX}" for n in self.shard_names]
        self.counts = _shard_counts(self.root, self.shard_names)
        self.transform = transform

    def __len__(self) -> int:
        return sum(self.counts)

    def __iter__(self) -> Iterator[tuple[Any, int]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if len(self.shards) >= workers:
            shards, stride = self.shards[worker::workers], 1
        else:
            shards, stride = self.shards, workers
        # decode=False: the reader validates the sample and the JPEG header; only this worker's samples are decoded.
        i = -1
        for shard in shards:
            with read_shard(shard, decode=False) as reader:
                for sample in reader:
                    i += 1
                    if stride > 1 and i % stride != worker:
                        continue
                    label = _label_of(sample.meta, shard, sample.key)
                    yield self._image(sample.jpeg, shard, sample.key), label

    def _image(self, jpeg: bytes, shard: Path, key: str) -> Any:
        try:
            with Image.open(io.BytesIO(jpeg)) as im:
                image = im.convert("RGB")
        except Exception as exc:  # PIL raises OSError, SyntaxError, ... for corrupt data
            what = f"{key}.jpg does not decode ({type(exc).__name__}: {exc})"
            raise ShardError(f"{shard}: sample {key!r}: {what}") from exc
        return self.transform(image) if self.transform else image


def is_shard_dir(root: str | os.PathLike) -> bool:
    """True when ``root`` holds ``index.json`` or at least one ``*.tar`` shard."""
    root = Path(root)
    return (root / INDEX_NAME).is_file() or bool(scan_shards(root))


def _has_image_folders(root: Path) -> bool:
    from torchvision.datasets.folder import IMG_EXTENSIONS

    for sub in root.iterdir():
        if sub.is_dir():
            for _dirpath, _dirs, files in os.walk(sub):
                if any(f.lower().endswith(IMG_EXTENSIONS) for f in files):
                    return True
    return False


def open_labelled(root: str | os.PathLike, image_size: int, crop_ratio: float = 1.0) -> Dataset:
    """The labelled image set at ``root`` with the eval transform: a :class:`LabelledShards` when the directory
    holds ``index.json`` or ``*.tar`` shards, else a torchvision ``ImageFolder``. Raises FileNotFoundError /
    ValueError naming ``root`` when it is missing or is neither."""
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"{root}: labelled image set does not exist")
    if not root.is_dir():
        raise NotADirectoryError(f"{root}: a labelled image set must be a directory (shards or an ImageFolder)")
    transform = eval_transform(image_size, crop_ratio)
    if is_shard_dir(root):
        return LabelledShards(root, transform)
    if _has_image_folders(root):
        from torchvision.datasets import ImageFolder

        return ImageFolder(str(root), transform=transform)
    raise ValueError(
        f"{root}: neither a shard directory (index.json or *.tar shards) nor an ImageFolder (one sub-folder of "
        f"images per class)"
    )
