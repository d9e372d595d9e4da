"""Sampling with free attention masks, written as resumable shards (DESIGN.md §4-5): ``freeatm generate``.

Work split. Global sample indices ``0..N-1`` are cut into shards of ``shard_size``: shard ``j`` holds the indices
``[j*S, min(N, (j+1)*S))`` and is written as ``shard-{j:06d}.tar``. The name depends only on ``j``, never on the
rank, so a rerun with another world size still recognises (and skips) every complete shard. Rank ``r`` of ``W``
(``RANK`` / ``WORLD_SIZE`` as set by torchrun or the deepspeed launcher; ``LOCAL_RANK`` picks the CUDA device) takes
the shards with ``j % W == r``. The pending indices of a rank are sampled in order, ``batch_size`` at a time (a batch
may span two shards: there is no short batch at each shard end), and each shard is streamed through a
``ShardWriter`` (temporary name, fsync, rename), so a killed run leaves no partial shard and a rerun with the same
arguments regenerates exactly the missing shards.

Determinism. The initial latents of sample ``i`` are drawn from their own CPU generator seeded with
``sample_seed(seed, i) = seed * 1_000_003 + i``, in fp32, then moved and cast, so a sample does not depend on the
batch size, the rank or on resuming (up to floating-point differences between batch shapes). DDIM (eta 0) and
DPM-Solver++ draw no noise beyond the initial latents. The per-sample seed is recorded in ``KEY.json``.

Resume safety. ``index.json`` records the run-invariant generator config (``generator_config``: model, prompts and
their fingerprint, seed, steps, guidance, scheduler, size, mask size, the capture and mask-recipe knobs, number of
images, shard size, JPEG quality; not rank, world size, batch size, device or dtype). A run into a directory whose
index holds a different config stops before sampling, naming the directory and the differing keys.

Per batch: prompts (``PromptSource.get(i)``), token spans of the object words, token columns ``[B, K]``, one
pipeline call with ``latents=`` and the capture's step callback, then (after the batch) ``aggregate`` to soft masks
(stored as ``round(255 * soft)``), boxes, areas and scores. Nothing of ours in the denoising loop reads a device value.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from freeatm_fast.generate.aggregate import AggregateConfig, aggregate, box_in_pixels
from freeatm_fast.generate.capture import CaptureConfig, MapCapture
from freeatm_fast.generate.models import SCHEDULERS
from freeatm_fast.generate.prompts import PromptItem, PromptSource, object_token_columns, token_spans

__all__ = [
    "DTYPES",
    "PROCESSORS",
    "SEED_STRIDE",
    "GenerateConfig",
    "Sampler",
    "bracketed_prompt",
    "config_with_model_defaults",
    "dist_env",
    "generate",
    "generator_config",
    "initial_latents",
    "num_shards",
    "rank_shards",
    "resolve_device",
    "sample_seed",
    "shard_indices",
    "shard_name",
]

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
# A prime stride: sample i of seed s gets s * SEED_STRIDE + i, distinct for every (s, i) with i < SEED_STRIDE, and
# seeds s and s+1 share no sample seed for any data set of up to a million images.
SEED_STRIDE = 1_000_003
MAX_SEED = 2**32 - 1
# "fused": cross_attention_with_maps; "eager": the materialising baseline; None: no capture (plain SDPA, no masks).
PROCESSORS = ("fused", "eager", None)
SHARD_PREFIX = "shard-"
# The generator-config schema version written to index.json: bump when the sampling of a given index changes.
GENERATOR_VERSION = 2  # 2: meta "label" is the class index (int), "label_name" its name


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


@dataclass(frozen=True)
class GenerateConfig:
    """One generation run.

    Attributes:
        model: ``"tiny-random"``, a local diffusers SD 1.x/2.x folder, or a hub id (see ``models.load_pipeline``).
        prompts: a prompt file, ``builtin:imagenet`` or ``builtin:imagenet:N`` (see ``prompts.load_prompts``).
        objects: vocabulary file matched against unbracketed prompt lines, or None.
        num_images: ``N``, samples in the data set (global indices ``0..N-1``).
        batch_size: prompts per pipeline call on each rank (does not change any sample).
        steps: denoising steps.
        guidance: classifier-free guidance scale; ``> 1`` turns guidance on (maps from the conditional half).
        scheduler: ``"ddim"`` or ``"dpm"`` (DPM-Solver++ multistep).
        seed: base seed in ``[0, 2**32)``; sample ``i`` starts from ``seed * SEED_STRIDE + i``.
        size: square image side in pixels (multiple of 8), or None for the model's default (SD 1.5: 512).
        mask_size: side ``S`` of the stored masks, or None for the latent size (image side / VAE factor).
            It replaces ``aggregate.mask_size``.
        shard_size: samples per shard.
        jpeg_quality: JPEG quality of the stored images, 1..100.
        out: output directory (created).
        device: ``"cuda"``, ``"cuda:1"``, ``"cpu"``...; None = CUDA when available (device ``LOCAL_RANK``), else CPU.
        dtype: ``"fp16"``, ``"bf16"`` or ``"fp32"``; None = fp16 on CUDA, fp32 on CPU.
        capture: which maps to capture (:class:`CaptureConfig`; ``rows`` must be ``"cond"``).
        aggregate: the mask recipe (:class:`AggregateConfig`).
        max_object_tokens: most token columns (sub-word tokens of all object words) one prompt may use.
    """

    model: str = "tiny-random"
    prompts: str = "builtin:imagenet"
    objects: str | None = None
    num_images: int = 1000
    batch_size: int = 8
    steps: int = 50
    guidance: float = 7.5
    scheduler: str = "ddim"
    seed: int = 0
    size: int | None = None
    mask_size: int | None = None
    shard_size: int = 1000
    jpeg_quality: int = 95
    out: str = "generated"
    device: str | None = None
    dtype: str | None = None
    capture: CaptureConfig = field(default_factory=CaptureConfig)
    aggregate: AggregateConfig = field(default_factory=AggregateConfig)
    max_object_tokens: int = 16

    def __post_init__(self):
        def bad(name: str, what: str) -> ValueError:
            return ValueError(f"GenerateConfig.{name} {what}, got {getattr(self, name)!r}")

        for name in ("model", "prompts", "out"):
            value = getattr(self, name)
            if isinstance(value, os.PathLike):
                object.__setattr__(self, name, os.fspath(value))
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise bad(name, "must be a non-empty string")
        if isinstance(self.objects, os.PathLike):
            object.__setattr__(self, "objects", os.fspath(self.objects))
        if self.objects is not None and (not isinstance(self.objects, str) or not self.objects):
            raise bad("objects", "must be a vocabulary file path or None")
        for name in ("num_images", "batch_size", "steps", "shard_size", "max_object_tokens"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise bad(name, "must be a positive int")
        if isinstance(self.guidance, bool) or not isinstance(self.guidance, (int, float)):
            raise bad("guidance", "must be a number")
        if not math.isfinite(self.guidance) or self.guidance < 0:
            raise bad("guidance", "must be finite and >= 0 (> 1 turns classifier-free guidance on)")
        object.__setattr__(self, "guidance", float(self.guidance))
        if self.scheduler not in SCHEDULERS:
            raise bad("scheduler", f"must be one of {SCHEDULERS}")
        if not _is_int(self.seed) or not 0 <= self.seed <= MAX_SEED:
            raise bad("seed", f"must be an int in [0, {MAX_SEED}]")
        if self.num_images > SEED_STRIDE:
            # Beyond the stride, sample seeds of base seed s would collide with those of seed s + 1.
            raise bad("num_images", f"must be at most {SEED_STRIDE} (the per-sample seed stride)")
        if self.size is not None and (not _is_int(self.size) or self.size < 8 or self.size % 8):
            raise bad("size", "must be None or a positive multiple of 8 (pixels)")
        if self.mask_size is not None and (not _is_int(self.mask_size) or self.mask_size < 1):
            raise bad("mask_size", "must be None or a positive int")
        if not _is_int(self.jpeg_quality) or not 1 <= self.jpeg_quality <= 100:
            raise bad("jpeg_quality", "must be an int in [1, 100]")
        if self.device is not None:
            try:
                torch.device(self.device)
            except (RuntimeError, TypeError) as exc:
                raise bad("device", f"is not a torch device ({exc})") from exc
        if self.dtype is not None and self.dtype not in DTYPES:
            raise bad("dtype", f"must be None or one of {tuple(DTYPES)}")
        if not isinstance(self.capture, CaptureConfig):
            raise bad("capture", "must be a CaptureConfig")
        if self.capture.rows != "cond":
            raise ValueError(
                f"GenerateConfig.capture.rows must be 'cond' for generation (the unconditional half of a guided "
                f"batch has no object words), got {self.capture.rows!r}"
            )
        if not isinstance(self.aggregate, AggregateConfig):
            raise bad("aggregate", "must be an AggregateConfig")


# ----------------------------------------------------------------------------------------------------------------------
# Work split and seeds
# ----------------------------------------------------------------------------------------------------------------------


def config_with_model_defaults(model: str, *, backend: str = "auto", **values: Any) -> GenerateConfig:
    """A GenerateConfig for ``model`` where every ``values`` entry that is None (or absent) among ``steps``,
    ``guidance`` and ``scheduler`` comes from the model's own defaults (``models.model_defaults``: the toy models'
    measured recipe, which also sets the capture resolutions / window and the aggregation tau / upsampling /
    normalisation), else
    from GenerateConfig's (SD's). Used by ``freeatm generate`` and by the toy model's cached data set."""
    from freeatm_fast.generate.models import model_defaults

    base = GenerateConfig()
    shipped = model_defaults(model)
    for name in ("steps", "guidance", "scheduler"):
        if values.get(name) is None:
            values[name] = shipped.get(name, getattr(base, name))
    resolutions = tuple(shipped["resolutions"]) if shipped.get("resolutions") else None
    capture = CaptureConfig(backend=backend, resolutions=resolutions, window=tuple(shipped.get("window", (0.0, 1.0))))
    aggregate = AggregateConfig(
        tau=float(shipped.get("tau", base.aggregate.tau)),
        upsample=str(shipped.get("upsample", base.aggregate.upsample)),
        normalize=str(shipped.get("normalize", base.aggregate.normalize)),
        resolutions=resolutions,
    )
    return GenerateConfig(model=model, capture=capture, aggregate=aggregate, **values)


def sample_seed(seed: int, index: int) -> int:
    """The seed of global sample ``index``: ``seed * SEED_STRIDE + index``."""
    return seed * SEED_STRIDE + index


def initial_latents(
    indices: Sequence[int], seed: int, shape: tuple[int, int, int], *, device: torch.device | str, dtype: torch.dtype
) -> torch.Tensor:
    """Initial noise ``[B, C, h, w]`` for the samples ``indices``: row b from its own CPU generator, fp32, then cast.

    Drawing each row on its own CPU generator makes sample ``i`` the same whatever batch, rank or device it runs in.
    """
    rows = [
        torch.randn(shape, generator=torch.Generator(device="cpu").manual_seed(sample_seed(seed, i))) for i in indices
    ]
    return torch.stack(rows).to(device=device, dtype=dtype)


def num_shards(num_images: int, shard_size: int) -> int:
    return -(-num_images // shard_size)


def shard_name(j: int) -> str:
    """``shard-000042``: the name of shard ``j``, independent of ranks."""
    return f"{SHARD_PREFIX}{j:06d}"


def shard_indices(j: int, num_images: int, shard_size: int) -> range:
    """Global sample indices of shard ``j``: ``[j*S, min(N, (j+1)*S))``."""
    return range(j * shard_size, min(num_images, (j + 1) * shard_size))


def rank_shards(total: int, rank: int, world_size: int) -> list[int]:
    """Shards of rank ``rank`` of ``world_size``: ``j % world_size == rank``."""
    return list(range(rank, total, world_size))


def dist_env(environ: dict | None = None) -> tuple[int, int, int]:
    """``(rank, world_size, local_rank)`` from ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` (torchrun, deepspeed).

    Missing variables mean one process: ``(0, 1, 0)``. Malformed values raise naming the variable.
    """
    env = os.environ if environ is None else environ
    values = {}
    for name, default in (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0)):
        raw = env.get(name)
        if raw is None or raw == "":
            values[name] = default
            continue
        try:
            values[name] = int(raw)
        except ValueError:
            raise ValueError(f"environment variable {name}={raw!r} is not an integer") from None
    rank, world, local = values["RANK"], values["WORLD_SIZE"], values["LOCAL_RANK"]
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"environment: need 0 <= RANK < WORLD_SIZE, got RANK={rank}, WORLD_SIZE={world}")
    if local < 0:
        raise ValueError(f"environment variable LOCAL_RANK={local} must be >= 0")
    return rank, world, local


def resolve_device(device: str | None, local_rank: int = 0) -> torch.device:
    """``device`` as a torch.device; None = ``cuda:LOCAL_RANK`` when CUDA is available, else CPU.

    A bare ``"cuda"`` also becomes ``cuda:LOCAL_RANK`` so that one command line serves every rank of a node.
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} requested but CUDA is not available (torch.cuda.is_available() False)")
        if dev.index is None:
            dev = torch.device("cuda", local_rank)
        if dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {dev} does not exist: {torch.cuda.device_count()} CUDA device(s) visible")
    return dev


def bracketed_prompt(item: PromptItem) -> str:
    """The prompt text with its object words in square brackets (``a photo of a [dog] on a [sofa]``)."""
    parts, pos = [], 0
    for obj in item.objects:
        start, end = obj.char_span
        parts += [item.text[pos:start], "[", item.text[start:end], "]"]
        pos = end
    parts.append(item.text[pos:])
    return "".join(parts)


# ----------------------------------------------------------------------------------------------------------------------
# The sampler: one pipeline, one capture, batches of sample indices -> Samples
# ----------------------------------------------------------------------------------------------------------------------


class Sampler:
    """Turns batches of global sample indices into shard ``Sample`` objects (image, uint8 masks, meta).

    Args:
        pipe: a diffusers SD 1.x/2.x text-to-image pipeline, already on its device and dtype; its scheduler is
            replaced by ``config.scheduler``.
        prompts: the prompt of sample ``i`` is ``prompts.get(i)``.
        config: the run's :class:`GenerateConfig` (model name for the metadata, steps, guidance, seed, size,
            mask size, capture and recipe knobs; ``out``, ``device``, ``dtype`` and ``num_images`` are not used here).
        processor: ``"fused"`` (default), ``"eager"`` (the materialising baseline, for benchmarks) or None (no
            capture: plain SDPA sampling, samples without objects or masks).

    The capture's processors stay installed until :meth:`close` (or the ``with`` block ends).
    """

    def __init__(self, pipe, prompts: PromptSource, config: GenerateConfig, *, processor: str | None = "fused"):
        from freeatm_fast.generate.models import set_scheduler

        if processor not in PROCESSORS:
            raise ValueError(f"Sampler: processor must be one of {PROCESSORS}, got {processor!r}")
        if not isinstance(prompts, PromptSource):
            raise ValueError(f"Sampler: prompts must be a PromptSource, got {type(prompts).__name__}")
        self.pipe = set_scheduler(pipe, config.scheduler)
        pipe.set_progress_bar_config(disable=True)
        self.prompts = prompts
        self.config = config
        self.processor = processor
        self.device = pipe.unet.device
        self.dtype = pipe.unet.dtype
        vae_scale = int(pipe.vae_scale_factor)
        native = pipe.unet.config.sample_size
        native = native if isinstance(native, int) else int(native[0])
        self.size = config.size if config.size is not None else native * vae_scale
        if self.size % vae_scale:
            raise ValueError(f"size {self.size} is not a multiple of the VAE factor {vae_scale} of {config.model}")
        side = self.size // vae_scale
        self.latent_shape = (int(pipe.unet.config.in_channels), side, side)
        self.mask_size = config.mask_size if config.mask_size is not None else side
        self.aggregate_config = replace(config.aggregate, mask_size=self.mask_size)
        self.max_length = int(getattr(pipe.tokenizer, "model_max_length", 77) or 77)
        self._spans: dict[int, list[tuple[int, int]]] = {}  # prompt item index -> token spans of its object words
        self._capture: MapCapture | None = None

    # -- prompts -------------------------------------------------------------------------------------------------------

    def spans(self, index: int) -> list[tuple[int, int]]:
        """Token spans ``[(start, end)]`` of sample ``index``'s object words (cached per prompt item)."""
        item_idx = index % len(self.prompts)
        spans = self._spans.get(item_idx)
        if spans is None:
            item = self.prompts.items[item_idx]
            spans = token_spans(self.pipe.tokenizer, item, self.max_length)
            # Also checks the column budget, so a prompt with too many object tokens fails before sampling.
            object_token_columns([spans], self.config.max_object_tokens, prompts=[item])
            self._spans[item_idx] = spans
        return spans

    def check_prompts(self, indices: Sequence[int] | range) -> int:
        """Compute (and cache) the token spans of every prompt used by ``indices``; returns how many prompts.

        Raises ValueError naming the prompt file and line for a word that cannot be placed or too many tokens.
        """
        n_items = len(self.prompts)
        if isinstance(indices, range) and len(indices) >= n_items:
            used = range(n_items)  # round robin: a contiguous run of >= n_items indices uses every prompt
        else:
            used = sorted({i % n_items for i in indices})
        for item_idx in used:
            self.spans(item_idx)
        return len(used)

    # -- sampling ------------------------------------------------------------------------------------------------------

    def _capture_for(self, batch: int, tokens: torch.Tensor) -> MapCapture:
        """The capture for a batch of ``batch`` prompts; rebuilt only when the batch size changes (the last batch)."""
        cap = self._capture
        if cap is not None and cap.batch_size == batch:
            cap.reset(tokens)
            return cap
        if cap is not None:
            cap.remove()
        self._capture = MapCapture(
            self.pipe.unet,
            self.config.capture,
            batch_size=batch,
            num_rows=batch,
            tokens=tokens,
            latent_hw=self.latent_shape[1:],
            device=self.device,
            processor=self.processor,
        )
        return self._capture

    @torch.inference_mode()
    def generate(self, indices: Sequence[int]) -> list:
        """Sample the global indices ``indices`` in one pipeline call; returns one shard ``Sample`` per index."""
        from freeatm_fast.data.shards import Sample, sample_key

        indices = [int(i) for i in indices]
        if not indices:
            raise ValueError("Sampler.generate: no sample indices")
        cfg = self.config
        items = [self.prompts.get(i) for i in indices]
        spans = [self.spans(i) for i in indices]
        latents = initial_latents(indices, cfg.seed, self.latent_shape, device=self.device, dtype=self.dtype)
        kwargs: dict[str, Any] = {}
        capture = groups = None
        if self.processor is not None:
            tokens, groups = object_token_columns(spans, cfg.max_object_tokens, prompts=items)
            capture = self._capture_for(len(indices), tokens)
            capture.set_step(0, cfg.steps)
            kwargs["callback_on_step_end"] = capture.step_callback(cfg.steps)
        out = self.pipe(
            prompt=[it.text for it in items],
            height=self.size,
            width=self.size,
            num_inference_steps=cfg.steps,
            guidance_scale=cfg.guidance,
            latents=latents,
            output_type="np",
            **kwargs,
        )
        # Host work starts here, after the pipeline returned its images (the batch is done).
        images = np.nan_to_num(np.asarray(out.images, dtype=np.float32), nan=0.0)
        images = (np.clip(images, 0.0, 1.0) * 255.0).round().astype(np.uint8)  # [B, H, W, 3]
        result = None
        if capture is not None:
            result = aggregate(capture.maps(), groups, self.aggregate_config, image_size=(self.size, self.size))
            masks_u8 = (result.soft * 255.0).round_().clamp_(0, 255).to(torch.uint8).numpy()
            boxes, areas, scores = result.boxes.tolist(), result.areas.tolist(), result.scores.tolist()

        samples = []
        for b, (i, item) in enumerate(zip(indices, items, strict=True)):
            objects = []
            n_obj = len(item.objects) if result is not None else 0
            for o in range(n_obj):
                obj = item.objects[o]
                x0, y0, x1, y1 = box_in_pixels(boxes[b][o])
                entry = {
                    "word": obj.word,
                    "tokens": list(spans[b][o]),
                    "box": [max(0, x0), max(0, y0), min(self.size, x1), min(self.size, y1)],
                    "area": float(areas[b][o]),
                    "score": float(scores[b][o]),
                }
                if obj.class_id is not None:
                    entry["class_id"] = obj.class_id
                objects.append(entry)
            masks = masks_u8[b, :n_obj] if n_obj else np.zeros((0, self.mask_size, self.mask_size), np.uint8)
            meta = {
                "caption": item.text,
                "prompt": bracketed_prompt(item),
                "index": i,
                "seed": sample_seed(cfg.seed, i),
                "model": cfg.model,
                "size": [self.size, self.size],
                "mask_size": self.mask_size,
                "objects": objects,
            }
            # like the toy world's shards: "label" is the class index the data loader and the probes read (an
            # int), "label_name" its name
            if item.class_id is not None:
                meta["class_id"] = item.class_id
                meta["label"] = item.class_id
            if item.label is not None:
                meta["label_name"] = item.label
            samples.append(Sample(sample_key(i), images[b], np.ascontiguousarray(masks), meta))
        return samples

    def maps_bytes(self) -> int:
        """Bytes the capture holds for maps now (0 without capture); see ``MapCapture.memory_bytes``."""
        return self._capture.memory_bytes() if self._capture is not None else 0

    def close(self) -> None:
        """Put the UNet's original attention processors back (idempotent)."""
        if self._capture is not None:
            self._capture.remove()
            self._capture = None

    def __enter__(self) -> Sampler:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ----------------------------------------------------------------------------------------------------------------------
# generate(): the run
# ----------------------------------------------------------------------------------------------------------------------


def generator_config(config: GenerateConfig, prompts: PromptSource, *, size: int, mask_size: int) -> dict:
    """The run-invariant values recorded in ``index.json`` (``size``/``mask_size`` resolved against the model).

    Prompt files and vocabularies enter through ``prompts.fingerprint()``, not their paths. Rank, world size, batch
    size, device, dtype and backend are left out: they may change between a run and its resume without changing what
    sample ``i`` is meant to be.
    """
    cap, agg = config.capture, config.aggregate
    return {
        "generator": "freeatm_fast.generate.sampler",
        "generator_version": GENERATOR_VERSION,
        "model": config.model,
        # The prompts are identified by content (texts, object words and class ids, so the vocabulary too), not by
        # the path: resuming from another working directory must not look like another data set.
        "prompts": config.prompts if config.prompts.startswith("builtin:") else "file",
        "prompts_fingerprint": prompts.fingerprint(),
        "num_prompts": len(prompts),
        "num_images": config.num_images,
        "shard_size": config.shard_size,
        "seed": config.seed,
        "seed_formula": f"seed * {SEED_STRIDE} + index",
        "steps": config.steps,
        "guidance": config.guidance,
        "scheduler": config.scheduler,
        "size": size,
        "mask_size": mask_size,
        "jpeg_quality": config.jpeg_quality,
        "capture": {
            "resolutions": list(cap.resolutions) if cap.resolutions is not None else None,
            "window": list(cap.window),
            "layer_weights": dict(cap.layer_weights) if cap.layer_weights is not None else None,
            "rows": cap.rows,
        },
        "aggregate": {
            "resolutions": list(agg.resolutions) if agg.resolutions is not None else None,
            "upsample": agg.upsample,
            "normalize": agg.normalize,
            "tau": agg.tau,
            "patch_grid": agg.patch_grid,
            "importance": agg.importance,
        },
    }


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _check_resume(out_dir: Path, gen: dict) -> None:
    """Refuse a directory whose index.json was written for another generator config (names the differing keys)."""
    import json

    from freeatm_fast.data.shards import INDEX_NAME, read_index

    if not (out_dir / INDEX_NAME).exists():
        return
    try:
        old = read_index(out_dir)["generator"]
    except ValueError:
        return  # a damaged index is rebuilt from the shards by update_index; verify_dir reports it
    new = json.loads(json.dumps(gen))
    if old == new:
        return
    a, b = _flatten(old), _flatten(new)
    diffs = [
        f"{k}: directory has {a.get(k, '<absent>')!r}, this run {b.get(k, '<absent>')!r}"
        for k in sorted(set(a) | set(b))
        if a.get(k, "<absent>") != b.get(k, "<absent>")
    ]
    raise ValueError(
        f"{out_dir} holds shards generated with a different config ({'; '.join(diffs)}); a shard directory holds one "
        "data set: rerun with the same arguments to resume, or use a new --out directory"
    )


def _check_complete(out_dir: Path, index: dict, config: GenerateConfig) -> None:
    """Every complete shard named like ours must hold exactly its index range (else it is not ours, or damaged)."""
    from freeatm_fast.data.shards import sample_key

    total = num_shards(config.num_images, config.shard_size)
    for entry in index["shards"]:
        name = entry["name"]
        digits = name[len(SHARD_PREFIX) :]
        j = int(digits) if name.startswith(SHARD_PREFIX) and digits.isdigit() else -1
        if not 0 <= j < total:
            raise ValueError(
                f"{out_dir}: shard {name!r} is not a shard of this run ({total} shards named {shard_name(0)}.."
                f"{shard_name(total - 1)}); remove it or use a new directory"
            )
        rng = shard_indices(j, config.num_images, config.shard_size)
        want = (len(rng), sample_key(rng[0]), sample_key(rng[-1]))
        got = (entry["num_samples"], entry["keys_first"], entry["keys_last"])
        if got != want:
            raise ValueError(
                f"{out_dir / (name + '.tar')}: holds (samples, first key, last key) = {got}, expected {want}; "
                "the shard is damaged or from another run: delete it and rerun to regenerate it"
            )


class _Progress:
    """Console progress with images/s: tqdm when installed, else one line at most every 10 s (stderr)."""

    def __init__(self, total: int, prefix: str, enabled: bool):
        self.total, self.prefix, self.enabled = total, prefix, enabled
        self.done = 0
        self.t0 = time.perf_counter()
        self._last = self.t0
        self._bar = None
        if enabled:
            try:
                from tqdm.auto import tqdm
            except ImportError:
                tqdm = None
            if tqdm is not None:
                self._bar = tqdm(total=total, unit="img", desc=prefix.strip() or "generate", file=sys.stderr)

    def update(self, n: int) -> None:
        self.done += n
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(n)
            return
        now = time.perf_counter()
        if now - self._last >= 10.0 or self.done == self.total:
            self._last = now
            rate = self.done / max(now - self.t0, 1e-9)
            print(f"{self.prefix}{self.done}/{self.total} images, {rate:.2f} images/s", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def generate(config: GenerateConfig, *, progress: bool = True, dist: tuple[int, int, int] | None = None) -> dict:
    """Run (or resume) generation into ``config.out``; returns a summary of this process's work.

    ``dist``: ``(rank, world_size, local_rank)`` of this process's share; None = from the launcher's environment
    (:func:`dist_env`). ``(0, 1, 0)`` makes one process generate every shard (e.g. rank 0 of a training job).

    Summary keys: ``out``, ``rank``, ``world_size``, ``device``, ``dtype``, ``num_images`` (N), ``num_shards`` (all
    ranks), ``rank_shards`` (this rank's), ``shards_written``, ``shards_skipped`` (complete before this run),
    ``images`` (generated now), ``seconds`` (sampling and writing, without model loading), ``images_per_s``.

    Raises (before any sampling) ValueError for bad prompts, a directory generated with another config, or a
    complete shard that does not hold its index range; ShardError for a damaged complete shard.
    """
    from freeatm_fast.data.shards import ShardWriter, scan_shards, update_index
    from freeatm_fast.generate.models import default_dtype, load_pipeline
    from freeatm_fast.generate.prompts import load_prompts

    if not isinstance(config, GenerateConfig):
        raise ValueError(f"generate: config must be a GenerateConfig, got {type(config).__name__}")
    rank, world, local_rank = dist_env() if dist is None else dist
    prefix = f"[rank {rank}/{world}] " if world > 1 else ""
    prompts = load_prompts(config.prompts, objects_file=config.objects)  # file/line errors before the model loads
    device = resolve_device(config.device, local_rank)
    dtype = DTYPES[config.dtype] if config.dtype is not None else default_dtype(device)
    out_dir = Path(config.out)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"output {out_dir} exists and is not a directory")

    t_load = time.perf_counter()
    pipe = load_pipeline(config.model, device=device, dtype=dtype)
    sampler = Sampler(pipe, prompts, config, processor="fused")
    gen = generator_config(config, prompts, size=sampler.size, mask_size=sampler.mask_size)
    _check_resume(out_dir, gen)

    total = num_shards(config.num_images, config.shard_size)
    mine = rank_shards(total, rank, world)
    out_dir.mkdir(parents=True, exist_ok=True)
    # Claims the directory for this config (or checks it) and reads the headers of shards not yet indexed, so a
    # damaged complete shard is reported now rather than silently skipped.
    index = update_index(out_dir, gen)
    _check_complete(out_dir, index, config)
    complete = set(scan_shards(out_dir))
    pending = [j for j in mine if shard_name(j) not in complete]
    skipped = len(mine) - len(pending)
    indices = [i for j in pending for i in shard_indices(j, config.num_images, config.shard_size)]
    n_prompts = sampler.check_prompts(indices)
    load_s = time.perf_counter() - t_load
    if progress:
        print(
            f"{prefix}freeatm generate: {config.model} on {device} ({str(dtype).replace('torch.', '')}, "
            f"capture backend {config.capture.backend}), {sampler.size}x{sampler.size} images, "
            f"{sampler.mask_size}x{sampler.mask_size} masks, {config.steps} {config.scheduler} steps, guidance "
            f"{config.guidance}, seed {config.seed}; N={config.num_images} in {total} shards of {config.shard_size}; "
            f"this rank: {len(mine)} shards ({skipped} complete, {len(pending)} to write, {len(indices)} images, "
            f"{n_prompts} prompts), batch {config.batch_size}; model loaded in {load_s:.1f} s; out {out_dir}",
            file=sys.stderr,
            flush=True,
        )

    bar = _Progress(len(indices), prefix, progress)
    writers: dict[int, ShardWriter] = {}
    written = 0
    t0 = time.perf_counter()
    try:
        for start in range(0, len(indices), config.batch_size):
            batch = indices[start : start + config.batch_size]
            for i, sample in zip(batch, sampler.generate(batch), strict=True):
                j = i // config.shard_size
                writer = writers.get(j)
                if writer is None:
                    # overwrite=False: should another process have completed this shard meanwhile, stop loudly.
                    writer = writers[j] = ShardWriter(out_dir, shard_name(j), jpeg_quality=config.jpeg_quality)
                writer.write(sample)
                if i == shard_indices(j, config.num_images, config.shard_size)[-1]:
                    writers.pop(j).close()
                    update_index(out_dir, gen)
                    written += 1
            bar.update(len(batch))
    finally:
        for writer in writers.values():  # only on an error: an unfinished shard must not appear
            writer.abort()
        bar.close()
        sampler.close()
    seconds = time.perf_counter() - t0
    summary = {
        "out": str(out_dir),
        "rank": rank,
        "world_size": world,
        "device": str(device),
        "dtype": str(dtype).replace("torch.", ""),
        "num_images": config.num_images,
        "num_shards": total,
        "rank_shards": len(mine),
        "shards_written": written,
        "shards_skipped": skipped,
        "images": len(indices),
        "seconds": round(seconds, 3),
        "images_per_s": round(len(indices) / seconds, 3) if indices and seconds > 0 else 0.0,
    }
    if progress:
        print(
            f"{prefix}done: {summary['images']} images in {seconds:.1f} s ({summary['images_per_s']:.2f} images/s); "
            f"shards written {written}, skipped {skipped} (complete already); {out_dir}",
            file=sys.stderr,
            flush=True,
        )
    return summary
