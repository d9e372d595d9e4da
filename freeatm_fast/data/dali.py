"""The DALI training loader (DESIGN §6): JPEG decoding, crops, masks and colour augmentation in DALI.

``build_dali_loader(cfg, rank=, world_size=, start_step=)`` (or ``build_loader`` with ``data.loader=dali``)
returns a :class:`DaliLoader` that yields exactly the batch dicts of the torch loader (loader.py's contract,
views.py's makers), from the same random decisions:

- the host side (a torch DataLoader with ``data.num_workers`` workers) reads each sample's JPEG *bytes*
  and masks with one ``pread`` and runs the view maker's ``plan``: crop windows (instance-aware ones
  included: they need the masks), flips, colour parameters, all seeded from (train.seed, epoch, item) as
  in the torch loader. No pixel is decoded on the host (except for ``data.masks=kmeans``, which needs the
  pixels: documented as the slow path);
- the DALI pipeline decodes the JPEGs (``device="mixed"``: nvJPEG on the training GPU; ``device_id=None``:
  libjpeg-turbo on CPU threads), crops each view's window with sub-pixel precision and resizes it
  (``fn.resize`` with a float ROI, linear with antialiasing: PIL's ``resize(box=)`` filter), warps the masks
  with the same windows (scaled to the mask resolution) and flips, applies the colour augmentation to the
  images only (each jitter slot one per-sample 3x3 colour matrix (``fn.coord_transform``) plus the contrast
  offset and a clamp, grayscale as another matrix, per-sample Gaussian blur, solarize) and normalises
  into CHW float32;
- the outputs are copied into torch tensors on the training device (on the GPU with GPU decoding, else
  CPU tensors that the engine moves), joined with the host-side fields (index, label, obj, captions, ...).

Variants follow ``data.views``: ``two`` (two views + warped masks + valid + obj; one decode per image for
both views), ``multicrop`` (global + local crops), ``caption_group`` (G images per caption), ``single``
(MAE: one view + masks + patch importance), ``vlp`` (one view + caption + boxes).

Because every random number is drawn on the host from the same streams, batch ``step`` of rank ``r`` is the
torch loader's batch ``step`` up to JPEG decoding (libjpeg-turbo on both sides on CPU: identical; nvJPEG
differs by a few levels) and resampling (DALI's and PIL's linear filters differ by at most 1 level in
uint8): tests/test_dali.py states the tolerances. Sharding across ranks, resumption at the exact batch
(``start_step``: nothing before it is read) and independence from the worker count are inherited.

A JPEG that passes the header check but that DALI cannot decode is found by decoding the in-flight batches
with PIL; it raises ``ShardError`` naming shard and key, or, with ``data.skip_bad``, is recorded in
``ShardDataset.known_bad`` and the loader restarts at the failed batch with that sample replaced by the next
good one (the torch loader's substitution, so both loaders still agree).
"""

from __future__ import annotations

import collections
import io
import logging
import os
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from freeatm_fast.data.dataset import ShardDataset
from freeatm_fast.data.loader import EpochBatchSampler, _ViewDataset, caption_groups, resolve_root
from freeatm_fast.data.shards import ShardError
from freeatm_fast.data.views import (
    _GRAY,
    _LUMA_ROWS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    P_GRAY,
    P_SIGMA,
    P_SOLARIZE,
    CaptionGroup,
    MultiCrop,
    SingleView,
    TwoViews,
    VLPView,
    _slot_matrices,
    build_view_maker,
    mask_box,
    patch_importance,
    valid_objects,
)

__all__ = ["DaliLoader", "build_dali_loader", "dali_available", "dali_device", "render_plans"]

log = logging.getLogger(__name__)

# Sigma given to DALI's blur for views that are not blurred (their blurred copy is discarded): any valid value.
_NO_BLUR_SIGMA = 0.1


def dali_available() -> bool:
    """Whether NVIDIA DALI imports here (``pip install nvidia-dali-cuda130``, or the cuda120 build)."""
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


def dali_device(setting: str) -> str:
    """``data.dali_device`` -> "gpu" or "cpu" ("auto": gpu when CUDA is available)."""
    if setting == "auto":
        return "gpu" if torch.cuda.is_available() else "cpu"
    if setting == "gpu" and not torch.cuda.is_available():
        raise RuntimeError("data.dali_device=gpu needs CUDA, and torch sees no GPU here; use auto or cpu")
    if setting not in ("cpu", "gpu"):
        raise ValueError(f"data.dali_device must be auto, cpu or gpu, got {setting!r}")
    return setting


def _threads(setting: int, world_size: int) -> int:
    if setting > 0:
        return setting
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    local = int(os.environ.get("LOCAL_WORLD_SIZE", min(world_size, torch.cuda.device_count() or 1)))
    return max(1, min(16, cores // max(1, local)))


# --------------------------------------------------------------------------------------------------
# Host side: plans -> DALI inputs (per-sample numpy arrays) + the fields that bypass DALI


class _Colour:
    """Which colour ops a config can draw (decided once, so the pipeline leaves out ops that never fire)."""

    def __init__(self, data: Any):
        self.jitter = data.color_jitter_prob > 0 and data.color_jitter > 0
        self.gray = data.grayscale_prob > 0
        self.blur = data.blur_prob > 0
        self.solarize = data.solarize_prob > 0
        self.any = self.jitter or self.gray or self.blur or self.solarize

    def names(self, v: int) -> list[str]:
        out = []
        if self.jitter:
            out += [f"m{s}_{v}" for s in range(4)] + [f"c{s}_{v}" for s in range(4)]
        if self.gray:
            out.append(f"gray_{v}")
        if self.blur:
            out += [f"sigma_{v}", f"blur_{v}"]
        if self.solarize:
            out.append(f"sol_{v}")
        return out

    def inputs(self, params: np.ndarray, v: int) -> dict[str, np.ndarray]:
        """DALI inputs of view v from colour parameters float32 [N, P]: one array per input whose first
        dimension is the batch (DALI takes it as N uniform samples in one copy)."""
        out: dict[str, np.ndarray] = {}
        n = len(params)
        if self.jitter:
            mats, contrast = _slot_matrices(params)
            for s in range(4):
                out[f"m{s}_{v}"] = np.ascontiguousarray(mats[s])
                out[f"c{s}_{v}"] = np.ascontiguousarray(contrast[s], dtype=np.float32)
        if self.gray:
            eye = np.broadcast_to(np.eye(3, dtype=np.float32), (n, 3, 3))
            luma = np.broadcast_to(_LUMA_ROWS.astype(np.float32), (n, 3, 3))
            out[f"gray_{v}"] = np.ascontiguousarray(np.where((params[:, P_GRAY] > 0)[:, None, None], luma, eye))
        if self.blur:
            sigma = params[:, P_SIGMA]
            out[f"sigma_{v}"] = np.where(sigma > 0, sigma, _NO_BLUR_SIGMA).astype(np.float32)
            out[f"blur_{v}"] = (sigma > 0).astype(np.float32)
        if self.solarize:
            out[f"sol_{v}"] = (params[:, P_SOLARIZE] > 0).astype(np.float32)
        return out


class _Plan:
    """One variant's contract between the host-side plans and the DALI graph.

    ``views``: [(size, has_masks)] per output view; ``input_names``: the external sources, in order;
    ``inputs(items)``: (DALI inputs by name, host-side fields); ``finish(outputs, host, device)``: the batch."""

    def __init__(self, cfg: Any, maker: Any):
        self.cfg = cfg
        self.data = cfg.data
        self.maker = maker
        self.colour = _Colour(cfg.data)
        d = cfg.data
        if isinstance(maker, TwoViews):
            self.views = [(d.image_size, True), (d.image_size, True)]
        elif isinstance(maker, SingleView):
            self.views = [(d.image_size, True)]
        elif isinstance(maker, MultiCrop):
            self.views = [(s, False) for s in maker.crop_sizes()]
        elif isinstance(maker, (CaptionGroup, VLPView)):
            self.views = [(d.image_size, False)]
        else:
            raise TypeError(f"no DALI plan for view maker {type(maker).__name__}")
        self.masks = any(m for _, m in self.views)
        names = ["jpeg"]
        if self.masks:
            names.append("masks")
        for v, (_, has_masks) in enumerate(self.views):
            names += [f"rs_{v}", f"re_{v}", f"flip_{v}"]
            if has_masks:
                names += [f"mrs_{v}", f"mre_{v}"]
            names += self.colour.names(v)
        self.input_names = names

    # ---- host side (prep DataLoader workers)

    def inputs(self, items: list[dict]) -> tuple[dict[str, list[np.ndarray]], dict]:
        d = self.data
        if isinstance(self.maker, CaptionGroup):  # one DALI sample per image: B*G
            flat = [
                {"jpeg": jp, "boxes": it["boxes"][j : j + 1], "flips": it["flips"][j : j + 1]}
                | {"colour": it["colour"][j : j + 1]}
                for it in items
                for j, jp in enumerate(it["jpeg"])
            ]
        else:
            flat = items
        # one array per input with the batch as first dimension where samples are uniform (one copy into DALI);
        # lists where they are not (JPEG bytes; masks of different resolutions)
        ins: dict[str, Any] = {"jpeg": [np.frombuffer(it["jpeg"], dtype=np.uint8) for it in flat]}
        if self.masks:
            masks = [self._masks_hwk(it["masks"]) for it in flat]
            uniform = all(m.shape == masks[0].shape for m in masks)
            ins["masks"] = np.stack(masks) if uniform else masks
        for v, (_, has_masks) in enumerate(self.views):
            boxes = np.stack([it["boxes"][v] for it in flat])  # [N, 4] x0, y0, x1, y1
            ins[f"rs_{v}"] = np.ascontiguousarray(boxes[:, [1, 0]], dtype=np.float32)  # ROI in layout order (y, x)
            ins[f"re_{v}"] = np.ascontiguousarray(boxes[:, [3, 2]], dtype=np.float32)
            ins[f"flip_{v}"] = np.array([it["flips"][v] for it in flat], dtype=np.int32)
            if has_masks:
                mboxes = np.stack(
                    [
                        mask_box(it["boxes"][v], it["size"], it["masks"].shape[1:])
                        if len(it["masks"])
                        else np.array([0.0, 0.0, 1.0, 1.0])  # no masks: the zero padding, any window
                        for it in flat
                    ]
                )
                ins[f"mrs_{v}"] = np.ascontiguousarray(mboxes[:, [1, 0]], dtype=np.float32)
                ins[f"mre_{v}"] = np.ascontiguousarray(mboxes[:, [3, 2]], dtype=np.float32)
            ins |= self.colour.inputs(np.stack([it["colour"][v] for it in flat]), v)
        host: dict[str, Any] = {"label": torch.tensor([it["label"] for it in items], dtype=torch.int64)}
        if isinstance(self.maker, CaptionGroup):
            indices = torch.from_numpy(np.stack([it["indices"] for it in items]))
            host |= {"indices": indices, "group": torch.tensor([it["group"] for it in items], dtype=torch.int64)}
        else:
            host["index"] = torch.tensor([it["index"] for it in items], dtype=torch.int64)
        if self.masks:
            host["count"] = torch.tensor([min(len(it["masks"]), d.max_objects) for it in items], dtype=torch.int64)
        if isinstance(self.maker, TwoViews):
            host["obj"] = torch.tensor([it["obj"] for it in items], dtype=torch.int64)
        if isinstance(self.maker, VLPView):
            host["caption"] = [it["caption"] for it in items]
            host["boxes"] = torch.from_numpy(np.stack([it["boxes_view"] for it in items]))
            host["box_valid"] = torch.from_numpy(np.stack([it["box_valid"] for it in items]))
            host["words"] = [it["words"] for it in items]
        return ins, host

    def _masks_hwk(self, masks: np.ndarray) -> np.ndarray:
        """uint8 [k, Hm, Wm] -> [Hm, Wm, K] zero padded to K = data.max_objects (DALI's channel layout)."""
        k, hm, wm = masks.shape
        out = np.zeros((hm, wm, self.data.max_objects), dtype=np.uint8)
        out[:, :, :k] = masks.transpose(1, 2, 0)
        return out

    def collate(self, items: list[dict]) -> tuple[dict, dict]:
        return self.inputs(items)

    # ---- device side

    def finish(self, outs: dict[str, torch.Tensor], host: dict, device: torch.device) -> dict:
        """DALI outputs (torch tensors) + host fields -> the batch dict of loader.py's contract."""
        host = {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in host.items()}
        maker = self.maker
        if isinstance(maker, TwoViews):
            masks = torch.stack([outs["masks_0"], outs["masks_1"]], 1)
            return {
                "index": host["index"],
                "label": host["label"],
                "view1": outs["view_0"],
                "view2": outs["view_1"],
                "masks1": outs["masks_0"],
                "masks2": outs["masks_1"],
                "valid": valid_objects(masks, host["count"], maker.min_mass),
                "obj": host["obj"],
            }
        if isinstance(maker, SingleView):
            masks = outs["masks_0"]
            return {
                "index": host["index"],
                "label": host["label"],
                "image": outs["view_0"],
                "masks": masks,
                "valid": valid_objects(masks[:, None], host["count"], maker.min_mass),
                "importance": patch_importance(masks, maker.grid),
            }
        if isinstance(maker, MultiCrop):
            crops = [outs[f"view_{v}"] for v in range(len(self.views))]
            return {"index": host["index"], "label": host["label"], "crops": crops}
        if isinstance(maker, CaptionGroup):
            x = outs["view_0"]
            b, g = host["indices"].shape
            return {
                "index": host["indices"][:, 0].clone(),
                "indices": host["indices"],
                "label": host["label"],
                "group": host["group"],
                "images": x.reshape(b, g, *x.shape[1:]),
            }
        # VLP
        return {
            "index": host["index"],
            "label": host["label"],
            "image": outs["view_0"],
            "caption": host["caption"],
            "boxes": host["boxes"],
            "box_valid": host["box_valid"],
            "words": host["words"],
        }

    # ---- the DALI graph

    def define(self, device: str) -> dict:
        """Build the graph inside a pipeline definition: {output name: DataNode}."""
        import nvidia.dali.fn as fn
        import nvidia.dali.types as types

        gpu = device == "gpu"
        src = {n: fn.external_source(name=n, layout="HWC" if n == "masks" else None) for n in self.input_names}
        image = fn.decoders.image(src["jpeg"], device="mixed" if gpu else "cpu", output_type=types.RGB)
        masks = None
        if self.masks:
            masks = src["masks"].gpu() if gpu else src["masks"]
        outs = {}
        for v, (size, has_masks) in enumerate(self.views):
            x = fn.resize(
                image,
                size=[size, size],
                roi_start=src[f"rs_{v}"],
                roi_end=src[f"re_{v}"],
                roi_relative=False,
                interp_type=types.INTERP_LINEAR,
                antialias=True,
                dtype=types.UINT8,
            )
            outs[f"view_{v}"] = self._colour_and_normalise(x, src, v, gpu)
            if has_masks:
                m = fn.resize(
                    masks,
                    size=[self.data.mask_size] * 2,
                    roi_start=src[f"mrs_{v}"],
                    roi_end=src[f"mre_{v}"],
                    roi_relative=False,
                    interp_type=types.INTERP_LINEAR,
                    antialias=True,
                    dtype=types.UINT8,
                )
                m = fn.flip(m, horizontal=src[f"flip_{v}"], vertical=0)
                outs[f"masks_{v}"] = fn.transpose(m, perm=[2, 0, 1])
        return outs

    def _colour_and_normalise(self, x, src: dict, v: int, gpu: bool):
        """views.colour_augment in DALI ops (same order, same clamps) + ImageNet normalisation, CHW float32;
        the flip goes last (colour ops commute with it: per pixel, or symmetric filters)."""
        import nvidia.dali.fn as fn
        import nvidia.dali.math as dmath
        import nvidia.dali.types as types

        c = self.colour

        def dev(node):
            return node.gpu() if gpu else node

        if c.any:
            x = fn.cast(x, dtype=types.FLOAT) * (1 / 255)
        if c.jitter:
            for s in range(4):
                # contrast: f*x + (1-f)*mean luma of the view; other slots have f = 1 (no offset)
                mean_rgb = fn.reductions.mean(x, axes=[0, 1], keep_dims=True)  # [1, 1, 3]
                luma = fn.coord_transform(mean_rgb, M=list(_GRAY))  # [1, 1, 1], broadcast over the image
                y = fn.coord_transform(x, M=src[f"m{s}_{v}"])
                x = dmath.clamp(y + (1 - dev(src[f"c{s}_{v}"])) * luma, 0.0, 1.0)
        if c.gray:
            x = fn.coord_transform(x, M=src[f"gray_{v}"])
        if c.blur:
            blurred = fn.gaussian_blur(x, sigma=src[f"sigma_{v}"], dtype=types.FLOAT)
            on = dev(src[f"blur_{v}"])
            x = on * blurred + (1 - on) * x
        if c.solarize:
            x = x + dev(src[f"sol_{v}"]) * (x >= 0.5) * (1 - 2 * x)
        scale = 1.0 if c.any else 255.0
        return fn.crop_mirror_normalize(
            x,
            mean=[m * scale for m in IMAGENET_MEAN],
            std=[s * scale for s in IMAGENET_STD],
            mirror=src[f"flip_{v}"],
            output_layout="CHW",
            dtype=types.FLOAT,
        )


# --------------------------------------------------------------------------------------------------
# The loader


def _pipeline(plan: _Plan, where: str, *, batch_size: int, threads: int, device_id, prefetch: int, seed: int):
    """Build the DALI pipeline of ``plan`` -> (pipeline, output names in order)."""
    from nvidia.dali import pipeline_def

    names: list[str] = []

    @pipeline_def
    def graph():
        outs = plan.define(where)
        names.extend(outs)
        return tuple(outs.values())

    pipe = graph(
        batch_size=batch_size,
        num_threads=threads,
        device_id=device_id,
        prefetch_queue_depth=prefetch,
        seed=seed,  # no random operator in the graph (all randomness is planned on the host)
    )
    pipe.build()
    return pipe, names


def _to_torch(names: list[str], outputs) -> dict[str, torch.Tensor]:
    from nvidia.dali.plugin.pytorch.torch_utils import to_torch_tensor

    # copies: DALI reuses its output buffers on the next run
    return {name: to_torch_tensor(tl.as_tensor(), copy=True) for name, tl in zip(names, outputs, strict=True)}


def render_plans(cfg: Any, items: list[dict], *, where: str = "cpu") -> dict:
    """Run ``cfg``'s DALI graph once on planned items -> the batch dict.

    items: one per batch row, each the view maker's ``plan(...)`` dict plus ``"jpeg"`` (bytes, a list of bytes
    for caption groups): how tests feed hand-picked crop windows. ``where``: "cpu" or "gpu"."""
    plan = _Plan(cfg, build_view_maker(cfg))
    ins, host = plan.inputs(items)
    device_id = torch.cuda.current_device() if where == "gpu" else None
    pipe, names = _pipeline(
        plan, where, batch_size=len(ins["jpeg"]), threads=1, device_id=device_id, prefetch=1, seed=0
    )
    for name, data in ins.items():
        pipe.feed_input(name, data)
    device = torch.device("cuda", device_id) if where == "gpu" else torch.device("cpu")
    return plan.finish(_to_torch(names, pipe.run()), host, device)


class DaliLoader:
    """Infinite iterable of batch dicts (module docstring), interface of loader.TrainLoader: ``step`` (global
    index of the next batch), ``epoch``, ``steps_per_epoch``, ``batch_size``, ``num_items``, ``dataset``,
    ``close()``, context manager. ``device``: where the batches' tensors are ("cuda:N" with GPU decoding)."""

    def __init__(self, cfg: Any, *, rank: int = 0, world_size: int = 1, start_step: int = 0, split: str = "train"):
        if not dali_available():
            raise ImportError(
                "data.loader=dali needs NVIDIA DALI: pip install nvidia-dali-cuda130 (CUDA 13 wheels; "
                "nvidia-dali-cuda120 for CUDA 12), or use data.loader=torch"
            )
        d = cfg.data
        self.cfg = cfg
        self.rank, self.world_size = int(rank), int(world_size)
        self.where = dali_device(d.dali_device)
        if self.where == "gpu":
            self.device_id = torch.cuda.current_device()
            self.device = torch.device("cuda", self.device_id)
        else:
            self.device_id = None
            self.device = torch.device("cpu")
        self.threads = _threads(d.dali_threads, world_size)
        root = resolve_root(cfg, split)
        self.dataset = ShardDataset(root, skip_bad=d.skip_bad)
        self.maker = build_view_maker(cfg)
        self.groups = caption_groups(self.dataset)[1] if isinstance(self.maker, CaptionGroup) else None
        self.plan = _Plan(cfg, self.maker)
        n_items = len(self.groups) if self.groups is not None else len(self.dataset)
        per_pipe = cfg.train.batch_size * (d.group_size if self.groups is not None else 1)
        self.pipe_batch = per_pipe
        self.sampler = EpochBatchSampler(
            n_items, cfg.train.batch_size, seed=cfg.train.seed, rank=rank, world_size=world_size
        )
        self.steps_per_epoch = self.sampler.steps_per_epoch
        self.batch_size = self.sampler.batch_size
        self.num_items = self.sampler.num_items
        self.step = int(start_step)
        self._prep = None
        self._pipe = None
        self._pending: collections.deque = collections.deque()
        self._scheduled = False
        if d.masks == "kmeans" and d.views == "two":
            log.warning("data.masks=kmeans with DALI: k-means needs the pixels, so the host decodes every image too")
        log.info(
            f"data: {root} ({len(self.dataset)} samples), views={d.views}, DALI on {self.where} "
            f"({self.threads} threads, prefetch {d.dali_prefetch}), {self.steps_per_epoch} steps/epoch of "
            f"{cfg.train.batch_size}/rank x {world_size} ranks, {d.num_workers} host workers"
        )

    @property
    def epoch(self) -> int:
        return self.step // self.steps_per_epoch

    # ---- building

    def _build(self) -> None:
        d = self.cfg.data
        views = _ViewDataset(self.dataset, self.maker, self.cfg.train.seed, self.groups, d.group_size, raw=True)
        self.sampler.start_step = self.step
        loader = DataLoader(
            views,
            batch_sampler=self.sampler,
            collate_fn=self.plan.collate,
            num_workers=d.num_workers,
            persistent_workers=False,
            prefetch_factor=2 if d.num_workers > 0 else None,
            generator=torch.Generator().manual_seed(self.cfg.train.seed),
        )
        self._prep_loader = loader
        self._prep = iter(loader)
        self._fed_step = self.step
        self._pending.clear()
        self._pipe = self._make_pipeline()

    def _make_pipeline(self):
        pipe, self._out_names = _pipeline(
            self.plan,
            self.where,
            batch_size=self.pipe_batch,
            threads=self.threads,
            device_id=self.device_id,
            prefetch=self.cfg.data.dali_prefetch,
            seed=self.cfg.train.seed,
        )
        return pipe

    def _feed(self) -> None:
        """Feed the next planned batch into the pipeline and remember its host fields."""
        ins, host = next(self._prep)
        for name, data in ins.items():
            self._pipe.feed_input(name, data)
        self._pending.append((self._fed_step, host, ins["jpeg"]))
        self._fed_step += 1

    # ---- iterating

    def __iter__(self):
        while True:
            yield self._next()

    def _next(self) -> dict:
        # DALIGenericIterator's protocol: schedule (the first call schedules `dali_prefetch` batches), share the
        # oldest outputs, copy them into torch tensors on the current stream, release, schedule the next one.
        # Every schedule_run consumes one fed batch (the first: dali_prefetch of them).
        if self._pipe is None:
            self._build()
            self._scheduled = False
        try:
            if not self._scheduled:
                self._fill()
                self._pipe.schedule_run()
                self._scheduled = True
            outputs = self._pipe.share_outputs()
        except ShardError:
            raise
        except Exception as exc:  # noqa: BLE001 - DALI raises RuntimeError subclasses; find the bad sample
            self._decode_failed(exc)
            return self._next()
        step, host, _ = self._pending.popleft()
        assert step == self.step, (step, self.step)
        outs = _to_torch(self._out_names, outputs)
        self._pipe.release_outputs()
        self._fill()
        self._pipe.schedule_run()
        batch = self.plan.finish(outs, host, self.device)
        self.step += 1
        return batch

    def _fill(self) -> None:
        """Feed planned batches until `dali_prefetch` are in flight (fed and not yet returned)."""
        while len(self._pending) < self.cfg.data.dali_prefetch:
            self._feed()

    def _decode_failed(self, exc: Exception) -> None:
        """DALI failed on an in-flight batch: name the sample (PIL decodes each), then raise, or with
        data.skip_bad mark it bad and rebuild from the failed step."""
        from PIL import Image

        bad: dict[int, str] = {}
        for _step, host, jpegs in self._pending:
            idx = host["indices"].flatten().tolist() if "indices" in host else host["index"].tolist()
            for i, jpeg in zip(idx, jpegs, strict=True):
                if i in bad:
                    continue
                try:
                    Image.open(io.BytesIO(jpeg.tobytes())).load()
                except Exception as pil_exc:  # noqa: BLE001 - PIL raises many types for corrupt data
                    bad[i] = f"{type(pil_exc).__name__}: {pil_exc}"
        self.close()
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        hits = [ln for ln in lines if "decod" in ln.lower() or "jpeg" in ln.lower()]
        dali_msg = (hits or lines or [""])[0]
        if not bad:
            raise RuntimeError(
                f"DALI pipeline failed at batch {self.step} and no sample in flight fails to decode with PIL: "
                f"{dali_msg[:300]}"
            ) from exc
        first_i, why = next(iter(bad.items()))
        shard, key = self.dataset.where(first_i)
        msg = f"{key}.jpg does not decode as a JPEG (DALI: {dali_msg[:200]}; PIL: {why})"
        if not self.cfg.data.skip_bad:
            raise ShardError(f"{shard}: sample {key!r}: {msg}") from exc
        for i, why in bad.items():
            self.dataset.known_bad[i] = f"{self.dataset.keys[i]}.jpg does not decode as a JPEG ({why})"
        log.warning(
            f"data.skip_bad: {len(bad)} undecodable sample(s) skipped, first {shard}:{key}; "
            f"restarting at batch {self.step}"
        )

    def close(self) -> None:
        """Drop the pipeline and the host workers (rebuilt on the next iteration)."""
        self._pipe = None
        self._prep = None
        self._pending.clear()

    def __enter__(self) -> DaliLoader:
        return self

    def __exit__(self, *exc) -> bool:
        self.close()
        return False


def build_dali_loader(cfg: Any, *, rank: int = 0, world_size: int = 1, start_step: int = 0, split: str = "train"):
    """The DALI training loader of ``cfg`` for this rank, starting at global batch ``start_step``."""
    return DaliLoader(cfg, rank=rank, world_size=world_size, start_step=start_step, split=split)
