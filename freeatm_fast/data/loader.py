"""The torch/PIL training loader: the reference loader and the fallback of the DALI one (DESIGN §6).

``build_loader(cfg, rank=, world_size=, start_step=)`` returns an infinite :class:`TrainLoader` of batch dicts
of CPU tensors (the engine moves them to the device). The batch contract, by ``data.views``:

- every batch: ``index`` int64 [B] (sample position in the dataset), ``label`` int64 [B] (-1 when unknown);
- ``two``: ``view1``, ``view2`` float32 [B,3,S,S] (ImageNet-normalised), ``masks1``, ``masks2`` uint8
  [B,K,M,M] (each view's masks, warped with its crop and flip; K = data.max_objects, zero padded),
  ``valid`` bool [B,K] (object k exists and covers >= freeatm.min_mass of both views), ``obj`` int64 [B]
  (the object the instance-aware crops keep visible; -1 without data.instance_views);
- ``multicrop``: ``crops``: data.global_crops float32 [B,3,S,S] then data.local_crops [B,3,L,L];
- ``caption_group``: ``images`` float32 [B,G,3,S,S] (G = data.group_size images of one caption),
  ``group`` int64 [B] (caption id), ``indices`` int64 [B,G] (``index`` is the first of them).

Determinism: epoch e visits the items in a permutation drawn from (train.seed, e); each global batch is the
next B * world_size items, and rank r takes the r-th block of B (drop_last: every rank gets
``steps_per_epoch`` = items // (B * world_size) batches). The augmentation RNG of item i in epoch e is
seeded from (train.seed, e, i), never from worker state, so batch ``step`` of rank r depends only on
(seed, step, rank, world_size): not on num_workers, nor on whether the run was resumed. ``start_step``
skips batches by arithmetic (nothing is decoded).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from freeatm_fast.data.dataset import ShardDataset
from freeatm_fast.data.shards import INDEX_NAME, ShardError, scan_shards
from freeatm_fast.data.views import CaptionGroup, build_view_maker

__all__ = ["EpochBatchSampler", "TrainLoader", "build_loader", "caption_groups", "resolve_root"]

log = logging.getLogger(__name__)

# SeedSequence tags keeping the sample order and the augmentation streams apart.
_ORDER_STREAM = 0x0DE5
_AUG_STREAM = 0xA06


def resolve_root(cfg: Any, split: str = "train") -> Path:
    """The shard directory of ``split``: ``cfg.data.root`` (or its ``split`` sub-directory when it has one),
    or the toy world's split when ``cfg.data.root`` is "" (built and cached on first use); with
    ``data.toy_source=model`` the train split is the toy model's generated data set (it must exist: the engine
    generates it first)."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    if cfg.data.root == "":
        from freeatm_fast.data.toyworld import default_toyworld, generated_toyworld_dir

        if split == "train" and cfg.data.toy_source == "model":
            path = generated_toyworld_dir(cfg.data)
            if not (path / "complete.json").is_file():
                raise FileNotFoundError(
                    f"data.toy_source=model: {path} is not generated yet (the training engine generates it on first "
                    "use; or run freeatm_fast.toy.data.ensure_generated_toyworld)"
                )
            return path
        return default_toyworld(cfg.data) / split
    root = Path(cfg.data.root).expanduser()
    if not root.exists():
        raise FileNotFoundError(f"data.root={cfg.data.root!r}: no such directory")
    sub = root / split
    if sub.is_dir() and ((sub / INDEX_NAME).is_file() or scan_shards(sub)):
        return sub
    if split == "train":
        return root
    raise FileNotFoundError(f"data.root={cfg.data.root!r} has no {split!r} sub-directory of shards")


def caption_groups(dataset: ShardDataset) -> tuple[list[str], list[np.ndarray]]:
    """Group the samples of ``dataset`` by caption string (reads every KEY.json once, no image decoding).

    Returns (captions sorted, member sample indices int64 per caption). With ``dataset.skip_bad`` samples
    whose JSON is unreadable are left out; otherwise they raise ShardError naming shard and key."""
    by_caption: dict[str, list[int]] = {}
    for i in range(len(dataset)):
        try:
            caption = dataset.meta(i).get("caption")
        except ShardError:
            if not dataset.skip_bad:
                raise
            continue
        if not isinstance(caption, str):
            shard, key = dataset.where(i)
            raise ShardError(f"{shard}: sample {key!r}: field 'caption' must be a string, got {caption!r}")
        by_caption.setdefault(caption, []).append(i)
    captions = sorted(by_caption)
    return captions, [np.asarray(by_caption[c], dtype=np.int64) for c in captions]


class EpochBatchSampler:
    """Infinite batch sampler: yields, for this rank, lists of ``(epoch, item)`` pairs, B per batch.

    Items 0..num_items-1 (samples, or caption groups) are permuted per epoch from (seed, epoch); global batch
    s of an epoch is items [s*B*W, (s+1)*B*W) of the permutation, and rank r takes its r-th block of B. The
    first batch yielded is global step ``start_step`` (set it before each ``iter``)."""

    def __init__(self, num_items: int, batch_size: int, *, seed: int, rank: int = 0, world_size: int = 1):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        self.num_items = int(num_items)
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.steps_per_epoch = self.num_items // (self.batch_size * self.world_size)
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"{self.num_items} items cannot fill one global batch of train.batch_size={self.batch_size} x "
                f"world_size={self.world_size}; use a smaller batch or more data"
            )
        self.start_step = 0

    def epoch_batches(self, epoch: int) -> np.ndarray:
        """This rank's items of ``epoch``: int64 [steps_per_epoch, B]."""
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, _ORDER_STREAM, epoch]))
        perm = rng.permutation(self.num_items)
        b, w, s = self.batch_size, self.world_size, self.steps_per_epoch
        return perm[: s * w * b].reshape(s, w, b)[:, self.rank]

    def __iter__(self):
        step = self.start_step
        epoch, batches = -1, None
        while True:
            e, s = divmod(step, self.steps_per_epoch)
            if e != epoch:
                epoch, batches = e, self.epoch_batches(e)
            yield [(epoch, i) for i in batches[s].tolist()]
            step += 1


class _ViewDataset(torch.utils.data.Dataset):
    """``(epoch, item)`` -> the per-sample arrays of one item, with the item's own RNG (seed, epoch, item).

    ``raw=True`` (the DALI loader): the samples keep their JPEG bytes and the item is the view maker's
    ``plan`` (the same random decisions, no pixels) plus ``jpeg`` (bytes, or a list of them for a group)."""

    def __init__(
        self,
        shards: ShardDataset,
        maker: Any,
        seed: int,
        groups: list[np.ndarray] | None,
        group_size: int,
        raw: bool = False,
    ):
        self.shards = shards
        self.maker = maker
        self.seed = int(seed)
        self.groups = groups
        self.group_size = int(group_size)
        self.raw = bool(raw)

    def __len__(self) -> int:
        return len(self.groups) if self.groups is not None else len(self.shards)

    def __getitem__(self, key: tuple[int, int]) -> dict:
        epoch, item = key
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, _AUG_STREAM, epoch, item]))
        if self.groups is None:
            sample = self.shards.get(item, raw=self.raw)
            if not self.raw:
                return self.maker(sample, rng)
            return {**self.maker.plan(sample, rng), "jpeg": sample.jpeg}
        members = self.groups[item]
        picks = rng.choice(members, size=self.group_size, replace=len(members) < self.group_size)
        samples = [self.shards.get(int(i), raw=self.raw) for i in picks]
        if not self.raw:
            return self.maker(samples, rng, item)
        return {**self.maker.plan(samples, rng, item), "jpeg": [s.jpeg for s in samples]}


class TrainLoader:
    """Infinite iterable of batch dicts (module docstring). ``step``: global index of the next batch;
    ``epoch``: the epoch that batch belongs to; ``steps_per_epoch``; ``dataset``: the ShardDataset
    (``len(loader.dataset)`` samples); ``num_items``: samples, or captions in caption_group mode.
    Each ``iter()`` continues from ``step`` (the workers persist across iterators)."""

    def __init__(self, dataset: ShardDataset, sampler: EpochBatchSampler, loader: DataLoader, start_step: int):
        self.dataset = dataset
        self.sampler = sampler
        self.loader = loader
        self.step = int(start_step)
        self.steps_per_epoch = sampler.steps_per_epoch
        self.batch_size = sampler.batch_size
        self.num_items = sampler.num_items

    @property
    def epoch(self) -> int:
        return self.step // self.steps_per_epoch

    def __iter__(self):
        self.sampler.start_step = self.step
        for batch in self.loader:
            self.step += 1
            yield batch

    def close(self) -> None:
        """Stop the worker processes now (they persist across iterators; otherwise they stop when the
        loader is garbage collected, which for a loader caught in a reference cycle may be much later)."""
        # DataLoader has no public close(); its persistent iterator shuts its workers down on deletion.
        it, self.loader._iterator = getattr(self.loader, "_iterator", None), None
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()

    def __enter__(self) -> TrainLoader:
        return self

    def __exit__(self, *exc) -> bool:
        self.close()
        return False


def build_loader(cfg: Any, *, rank: int = 0, world_size: int = 1, start_step: int = 0, split: str = "train"):
    """The training loader of ``cfg`` (a Config) for this rank, starting at global batch ``start_step``:
    :class:`TrainLoader` (``data.loader=torch``) or ``dali.DaliLoader`` (``data.loader=dali``), which yield
    the same batch dicts (the DALI one with its tensors already on the training device when it decodes on
    the GPU)."""
    d = cfg.data
    if d.loader not in ("torch", "dali"):
        raise ValueError(f"data.loader must be 'torch' or 'dali', got {d.loader!r}")
    if d.views == "two" and d.masks == "kmeans" and d.kmeans_k > d.max_objects:
        raise ValueError(
            f"data.kmeans_k={d.kmeans_k} segments do not fit in data.max_objects={d.max_objects} mask slots; "
            f"set data.max_objects >= data.kmeans_k"
        )
    if start_step < 0:
        raise ValueError(f"start_step must be >= 0, got {start_step}")
    if d.loader == "dali":
        from freeatm_fast.data.dali import build_dali_loader

        return build_dali_loader(cfg, rank=rank, world_size=world_size, start_step=start_step, split=split)
    root = resolve_root(cfg, split)
    shards = ShardDataset(root, skip_bad=d.skip_bad)
    maker = build_view_maker(cfg)
    groups = None
    if isinstance(maker, CaptionGroup):
        _, groups = caption_groups(shards)
    views = _ViewDataset(shards, maker, cfg.train.seed, groups, d.group_size)
    sampler = EpochBatchSampler(len(views), cfg.train.batch_size, seed=cfg.train.seed, rank=rank, world_size=world_size)
    sampler.start_step = start_step
    loader = DataLoader(
        views,
        batch_sampler=sampler,
        collate_fn=maker.collate,
        num_workers=d.num_workers,
        persistent_workers=d.num_workers > 0,
        pin_memory=torch.cuda.is_available(),
        prefetch_factor=2 if d.num_workers > 0 else None,
        # DataLoader draws its workers' base seed at every iter(); from its own generator it leaves the global
        # torch RNG alone, so a resumed run's RNG stream (restored by the engine) matches an uninterrupted one.
        # Augmentation never uses worker RNG state (see _ViewDataset).
        generator=torch.Generator().manual_seed(cfg.train.seed),
    )
    what = f"{len(groups)} captions of" if groups is not None else ""
    log.info(
        f"data: {root} ({what} {len(shards)} samples), views={d.views}, {sampler.steps_per_epoch} steps/epoch "
        f"of {cfg.train.batch_size}/rank x {world_size} ranks, {d.num_workers} workers"
    )
    return TrainLoader(shards, sampler, loader, start_step)
