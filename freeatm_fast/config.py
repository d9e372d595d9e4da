"""Run configuration: YAML files -> frozen dataclasses, with dotted ``key=value`` overrides (DESIGN §8).

A config is one :class:`Config` made of sections (``model``, ``data``, ``train``, ``freeatm``, one section per
method, ``deepspeed``, ``eval``). Every section is a frozen dataclass validated on construction; an unknown
section or key, in a YAML file or on the command line, is rejected with its dotted name. A YAML file may name a
``base:`` config (a shipped NAME or a path, relative to the file) whose values it overrides.

Use::

    cfg = load_config("mocov2_freeatm", ["train.max_steps=10", "data.loader=torch"])
    cfg.train.max_steps  # 10
    save_config(cfg, run_dir / "config.yaml")
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
DEFAULT_CONFIG = "mocov2_freeatm_generated"  # MoCo-v2 + Free-ATM on the toy model's generated images

METHODS = ("mocov2", "simclr", "stablerep", "detcon", "multicrop", "mae", "blip", "vilt")


class ConfigError(ValueError):
    """A config file, key or value is wrong; the message names it (dotted key, file)."""


def _check(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{key}: {msg}")


def _positive(value: float, key: str) -> None:
    _check(value > 0, key, f"must be > 0, got {value!r}")


def _non_negative(value: float, key: str) -> None:
    _check(value >= 0, key, f"must be >= 0, got {value!r}")


def _one_of(value: Any, choices: tuple, key: str) -> None:
    _check(value in choices, key, f"must be one of {list(choices)}, got {value!r}")


def _unit_interval(value: float, key: str) -> None:
    _check(0.0 <= value <= 1.0, key, f"must be in [0, 1], got {value!r}")


@dataclass(frozen=True)
class ModelConfig:
    """The backbone (a timm model by name) and the projection heads shared by the contrastive methods."""

    backbone: str = "resnet18"
    # extra keyword arguments for timm.create_model (e.g. {"output_stride": 16}); num_classes=0 is always set
    backbone_kwargs: dict = field(default_factory=dict)
    # a local file (.safetensors / .pth) or hub id with initial weights; "" = random initialisation
    pretrained: str = ""
    proj_hidden_dim: int = 2048
    proj_dim: int = 128
    channels_last: bool = True

    def __post_init__(self) -> None:
        _check(bool(self.backbone), "model.backbone", "must name a timm model")
        _positive(self.proj_hidden_dim, "model.proj_hidden_dim")
        _positive(self.proj_dim, "model.proj_dim")


@dataclass(frozen=True)
class DataConfig:
    """Where the shards are and how views are made from them (DESIGN §6)."""

    # a shard directory (with index.json); "" = the toy world, built on first use and cached
    root: str = ""
    loader: str = "torch"  # "torch" (reference) | "dali" (data/dali.py: DALI decodes and augments)
    # DALI: "auto" decodes on the training GPU (nvJPEG, device="mixed") when CUDA is present, else on the CPU;
    # "cpu" / "gpu" force one (gpu needs CUDA)
    dali_device: str = "auto"
    dali_threads: int = 0  # DALI worker threads per rank; 0 = the usable CPU cores / local ranks (at most 16)
    dali_prefetch: int = 2  # batches DALI prepares ahead of the one being trained on
    image_size: int = 64  # side of the (global) crops fed to the network
    # two: two views per image; multicrop: data.global_crops x image_size + data.local_crops x data.local_size;
    # caption_group: data.group_size images of one caption, one view each (stablerep)
    # single: one view + warped masks + patch importance (MAE); vlp: one view + caption + boxes (BLIP / ViLT)
    views: str = "two"
    patch_size: int = 16  # data.views=single: importance per patch of a ViT with this patch size
    instance_views: bool = False  # pick an object and keep >= min_visible of it in both crops (Free-ATM)
    min_visible: float = 0.5
    max_objects: int = 4  # K: masks per sample in a batch (padded, with a validity flag)
    mask_size: int = 64  # side of the warped masks in a batch
    masks: str = "data"  # "data": the shard's masks | "kmeans": k-means segments of the image (detcon)
    kmeans_k: int = 4
    crop_scale: tuple = (0.2, 1.0)
    color_jitter: float = 0.4  # strength s: brightness/contrast/saturation factors in [1 - s, 1 + s]
    hue: float = 0.1  # hue shift in [-hue, hue] turns (0.5 = any hue)
    color_jitter_prob: float = 0.8
    grayscale_prob: float = 0.2
    blur_prob: float = 0.5
    solarize_prob: float = 0.0
    hflip_prob: float = 0.5
    global_crops: int = 2
    local_crops: int = 4
    local_size: int = 32
    local_scale: tuple = (0.05, 0.2)
    group_size: int = 2
    num_workers: int = 2
    skip_bad: bool = False
    # toy world used when root is "" (see freeatm_fast.data.toyworld)
    toy_train_images: int = 4000
    toy_val_images: int = 1000
    toy_image_size: int = 64
    toy_seed: int = 0
    # where the train split comes from when root is "": "world" = the rendered toy world (exact masks);
    # "model" = toy_train_images images generated from the toy world's captions by the toy text-to-image model
    # toy_model ("toy": the shipped one) with its free cross-attention masks (freeatm_fast.toy.data; generated on
    # first use and cached). The val split (kNN, probes) stays the rendered toy world either way.
    toy_source: str = "world"
    toy_model: str = "toy"

    def __post_init__(self) -> None:
        _one_of(self.loader, ("torch", "dali"), "data.loader")
        _one_of(self.views, ("two", "multicrop", "caption_group", "single", "vlp"), "data.views")
        _one_of(self.masks, ("data", "kmeans"), "data.masks")
        _one_of(self.toy_source, ("world", "model"), "data.toy_source")
        _one_of(self.dali_device, ("auto", "cpu", "gpu"), "data.dali_device")
        _non_negative(self.dali_threads, "data.dali_threads")
        _positive(self.dali_prefetch, "data.dali_prefetch")
        _positive(self.patch_size, "data.patch_size")
        if self.views == "single":
            _check(
                self.image_size % self.patch_size == 0,
                "data.patch_size",
                f"must divide data.image_size={self.image_size}, got {self.patch_size}",
            )
        for name in ("image_size", "max_objects", "mask_size", "kmeans_k", "global_crops", "local_size", "group_size"):
            _positive(getattr(self, name), f"data.{name}")
        for name in ("local_crops", "num_workers", "toy_train_images", "toy_val_images", "toy_seed"):
            _non_negative(getattr(self, name), f"data.{name}")
        _positive(self.toy_image_size, "data.toy_image_size")
        for name in ("min_visible", "color_jitter_prob", "grayscale_prob", "blur_prob", "solarize_prob", "hflip_prob"):
            _unit_interval(getattr(self, name), f"data.{name}")
        _non_negative(self.color_jitter, "data.color_jitter")
        _check(0 <= self.hue <= 0.5, "data.hue", f"must be in [0, 0.5], got {self.hue!r}")
        for name in ("crop_scale", "local_scale"):
            value = getattr(self, name)
            _check(
                len(value) == 2 and 0 < value[0] <= value[1] <= 1,
                f"data.{name}",
                f"must be [lo, hi] with 0 < lo <= hi <= 1, got {value!r}",
            )


@dataclass(frozen=True)
class TrainConfig:
    max_steps: int = 300
    batch_size: int = 64  # per rank
    optimizer: str = "sgd"  # sgd | lars | adamw
    # learning rate for a total batch of 256; the run uses lr * batch_size * world_size / 256 (logged)
    lr: float = 0.03
    min_lr: float = 0.0
    momentum: float = 0.9
    weight_decay: float = 1e-4
    betas: tuple = (0.9, 0.999)
    warmup_steps: int = 10
    clip_grad: float = 0.0  # 0 = off
    precision: str = "fp32"  # fp32 | bf16 | fp16 (mixed precision by torch.autocast; weights stay fp32)
    seed: int = 0
    log_every: int = 10
    ckpt_every: int = 0  # 0 = only at the end
    # stop (with a checkpoint) after this step without changing the schedule; 0 = run to max_steps. For jobs
    # cut into pieces by a scheduler's time limit: rerun the same command to continue.
    stop_at: int = 0
    out_dir: str = "runs/train"  # the run directory: config.yaml, checkpoints/, backbone.safetensors, tensorboard/
    resume: str = "auto"  # auto: the run directory's latest checkpoint if any | none | a checkpoint directory
    checkpoint: bool = True  # save a checkpoint at the end (and every ckpt_every steps)
    export_backbone: bool = True
    tensorboard: bool = True

    def __post_init__(self) -> None:
        _positive(self.max_steps, "train.max_steps")
        _positive(self.batch_size, "train.batch_size")
        _one_of(self.optimizer, ("sgd", "lars", "adamw"), "train.optimizer")
        _one_of(self.precision, ("fp32", "bf16", "fp16"), "train.precision")
        _positive(self.lr, "train.lr")
        for name in ("min_lr", "weight_decay", "warmup_steps", "clip_grad", "ckpt_every", "stop_at", "seed"):
            _non_negative(getattr(self, name), f"train.{name}")
        _positive(self.log_every, "train.log_every")
        _check(len(self.betas) == 2, "train.betas", f"must be [beta1, beta2], got {self.betas!r}")


@dataclass(frozen=True)
class FreeATMConfig:
    """The Free-ATM adaptation: instance-level contrast over mask-pooled features (DESIGN §7)."""

    enabled: bool = False
    lambda_inst: float = 1.0  # L = L_img + lambda_inst * L_inst
    inst_temperature: float = 0.2
    inst_queue_size: int = 4096  # MoCo: queue of instance keys (0 = batch negatives only)
    min_mass: float = 0.01  # an object counts in a view when its warped mask covers at least this share

    def __post_init__(self) -> None:
        _non_negative(self.lambda_inst, "freeatm.lambda_inst")
        _positive(self.inst_temperature, "freeatm.inst_temperature")
        _non_negative(self.inst_queue_size, "freeatm.inst_queue_size")
        _unit_interval(self.min_mass, "freeatm.min_mass")


@dataclass(frozen=True)
class MocoConfig:
    queue_size: int = 4096
    momentum: float = 0.99
    temperature: float = 0.2
    shuffle_bn: bool = True  # MoCo's batch shuffle across ranks for the key encoder (world size > 1)
    symmetric: bool = False

    def __post_init__(self) -> None:
        _non_negative(self.queue_size, "moco.queue_size")
        _unit_interval(self.momentum, "moco.momentum")
        _positive(self.temperature, "moco.temperature")


@dataclass(frozen=True)
class SimclrConfig:
    temperature: float = 0.2

    def __post_init__(self) -> None:
        _positive(self.temperature, "simclr.temperature")


@dataclass(frozen=True)
class StablerepConfig:
    temperature: float = 0.1

    def __post_init__(self) -> None:
        _positive(self.temperature, "stablerep.temperature")


@dataclass(frozen=True)
class DetconConfig:
    temperature: float = 0.1
    momentum: float = 0.99  # target network EMA (DetCon-B); 0 = shared weights (DetCon-S, SimCLR-style)

    def __post_init__(self) -> None:
        _positive(self.temperature, "detcon.temperature")
        _unit_interval(self.momentum, "detcon.momentum")


@dataclass(frozen=True)
class MulticropConfig:
    """SwAV-style swapped prediction over prototypes with multi-crop (SEER's recipe)."""

    num_prototypes: int = 300
    temperature: float = 0.1
    sinkhorn_iters: int = 3
    epsilon: float = 0.05
    freeze_prototypes_steps: int = 0

    def __post_init__(self) -> None:
        _positive(self.num_prototypes, "multicrop.num_prototypes")
        _positive(self.temperature, "multicrop.temperature")
        _positive(self.sinkhorn_iters, "multicrop.sinkhorn_iters")
        _positive(self.epsilon, "multicrop.epsilon")
        _non_negative(self.freeze_prototypes_steps, "multicrop.freeze_prototypes_steps")


@dataclass(frozen=True)
class MaeConfig:
    """MAE (He et al. 2022) with Free-ATM masking (DESIGN §7, issue #6). Of the masked patches, a share
    ``guided_fraction`` are the most important ones (patch importance from the warped masks, data.views=single)
    and the rest are uniform at random: ``random`` = 0 (MAE), ``top`` = 1, ``balance`` = scheduled from
    ``guided_start`` at the first step to ``guided_max`` at the last (``schedule``: linear or cosine)."""

    masking: str = "random"  # random | top | balance
    mask_ratio: float = 0.75
    guided_start: float = 0.0
    guided_max: float = 0.5
    schedule: str = "linear"  # linear | cosine
    decoder_dim: int = 512
    decoder_depth: int = 8
    decoder_heads: int = 16
    norm_pix_loss: bool = True  # loss on per-patch normalised pixels (MAE's default)
    kernel_backend: str = "auto"  # select_patches / gather_tokens: auto | torch (eager reference) | triton | cuda

    def __post_init__(self) -> None:
        _one_of(self.masking, ("random", "top", "balance"), "mae.masking")
        _one_of(self.schedule, ("linear", "cosine"), "mae.schedule")
        _one_of(self.kernel_backend, ("auto", "torch", "triton", "cuda"), "mae.kernel_backend")
        _check(0 < self.mask_ratio < 1, "mae.mask_ratio", f"must be in (0, 1), got {self.mask_ratio!r}")
        _unit_interval(self.guided_start, "mae.guided_start")
        _unit_interval(self.guided_max, "mae.guided_max")
        for name in ("decoder_dim", "decoder_depth", "decoder_heads"):
            _positive(getattr(self, name), f"mae.{name}")
        _check(
            self.decoder_dim % self.decoder_heads == 0,
            "mae.decoder_heads",
            f"must divide mae.decoder_dim={self.decoder_dim}, got {self.decoder_heads}",
        )


@dataclass(frozen=True)
class VlpConfig:
    """Vision-language pretraining (BLIP, ViLT; DESIGN §7, issue #7): text model, tokenizer, losses, and the
    Free-ATM position prompts (with ``freeatm.enabled``: each caption gets, with probability ``prompt_prob``,
    up to ``prompt_objects`` prompts ". The block {b} has a {object} ." from object boxes on a
    ``prompt_grid`` x ``prompt_grid`` grid of the view)."""

    # a local folder or hub id of a Hugging Face tokenizer; "" = a WordPiece tokenizer trained on the data's
    # captions (and the prompt words) at start-up, saved in the run directory
    tokenizer: str = ""
    vocab_size: int = 1000  # of the trained WordPiece tokenizer
    max_len: int = 48  # text tokens, special tokens included
    # a local folder or hub id of a BERT checkpoint for the text encoder / decoder; "" = random initialisation
    text_pretrained: str = ""
    # BLIP's text encoder (ITC / ITM) and decoder; ViLT does not use them (its single-stream transformer is the
    # ViT of model.backbone: width, depth and heads from model.backbone_kwargs)
    text_width: int = 768
    text_layers: int = 12
    text_heads: int = 12
    embed_dim: int = 256  # BLIP: ITC projection
    queue_size: int = 57600  # BLIP: momentum feature queue (0 = in-batch only)
    momentum: float = 0.995  # BLIP: momentum encoders' EMA
    temperature: float = 0.07  # BLIP: ITC temperature (initial; learnable as in BLIP)
    itm_weight: float = 1.0
    lm_weight: float = 1.0  # BLIP: captioning (LM) loss weight; ViLT: MLM loss weight
    mlm_prob: float = 0.15  # ViLT: share of text tokens masked for MLM
    prompt_grid: int = 3
    prompt_objects: int = 1
    prompt_prob: float = 1.0
    retrieval_max_images: int = 1000  # eval: held-out images used for retrieval (0 = all)
    rerank_k: int = 16  # BLIP eval: ITM re-ranks the top-k ITC candidates (0 = ITC only)

    def __post_init__(self) -> None:
        for name in ("vocab_size", "max_len", "text_width", "text_layers", "text_heads", "embed_dim", "prompt_grid"):
            _positive(getattr(self, name), f"vlp.{name}")
        _check(
            self.text_width % self.text_heads == 0,
            "vlp.text_heads",
            f"must divide vlp.text_width={self.text_width}, got {self.text_heads}",
        )
        for name in ("queue_size", "prompt_objects", "retrieval_max_images", "rerank_k", "itm_weight", "lm_weight"):
            _non_negative(getattr(self, name), f"vlp.{name}")
        _unit_interval(self.momentum, "vlp.momentum")
        _unit_interval(self.mlm_prob, "vlp.mlm_prob")
        _unit_interval(self.prompt_prob, "vlp.prompt_prob")
        _positive(self.temperature, "vlp.temperature")


@dataclass(frozen=True)
class DeepSpeedConfig:
    zero_stage: int = 0
    # extra entries merged into the generated DeepSpeed JSON config (advanced; e.g. {"zero_optimization":
    # {"overlap_comm": true}})
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        _one_of(self.zero_stage, (0, 1, 2, 3), "deepspeed.zero_stage")


@dataclass(frozen=True)
class EvalConfig:
    """Evaluation run at the end of training (and by ``freeatm eval``)."""

    knn: bool = True
    linear: bool = False  # also fit a linear probe on frozen features (slower)
    # vision-language methods: image<->text retrieval R@1/5/10 on the held-out split (eval.root or the toy
    # world's val split), at most vlp.retrieval_max_images images
    retrieval: bool = True
    root: str = ""  # labelled shards or an ImageFolder; "" = the toy world's val split
    train_root: str = ""  # the kNN memory bank; "" = the toy world's train split
    knn_k: int = 20
    knn_temperature: float = 0.07
    batch_size: int = 256
    max_train_images: int = 0  # 0 = all
    image_size: int = 0  # 0 = data.image_size
    crop_ratio: float = 1.0  # resize the shorter side to image_size / crop_ratio, then centre-crop (ImageNet: 0.875)
    linear_epochs: int = 30
    linear_lr: float = 0.1

    def __post_init__(self) -> None:
        _positive(self.knn_k, "eval.knn_k")
        _non_negative(self.image_size, "eval.image_size")
        _check(0 < self.crop_ratio <= 1, "eval.crop_ratio", f"must be in (0, 1], got {self.crop_ratio!r}")
        _positive(self.linear_epochs, "eval.linear_epochs")
        _positive(self.linear_lr, "eval.linear_lr")
        _positive(self.knn_temperature, "eval.knn_temperature")
        _positive(self.batch_size, "eval.batch_size")
        _non_negative(self.max_train_images, "eval.max_train_images")


@dataclass(frozen=True)
class Config:
    method: str = "mocov2"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    freeatm: FreeATMConfig = field(default_factory=FreeATMConfig)
    moco: MocoConfig = field(default_factory=MocoConfig)
    simclr: SimclrConfig = field(default_factory=SimclrConfig)
    stablerep: StablerepConfig = field(default_factory=StablerepConfig)
    detcon: DetconConfig = field(default_factory=DetconConfig)
    multicrop: MulticropConfig = field(default_factory=MulticropConfig)
    mae: MaeConfig = field(default_factory=MaeConfig)
    vlp: VlpConfig = field(default_factory=VlpConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        _one_of(self.method, METHODS, "method")

    def to_dict(self) -> dict:
        return _to_plain(dataclasses.asdict(self))


# --------------------------------------------------------------------------------------------------
# building from nested dicts with checks by dotted name


def _to_plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_to_plain(v) for v in obj]
    return obj


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _unknown(key: str, name: str, known: list[str]) -> ConfigError:
    close = difflib.get_close_matches(name, known, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ConfigError(f"unknown config key {key!r}{hint}; known keys here: {', '.join(sorted(known))}")


def _coerce(value: Any, typ: Any, key: str) -> Any:
    origin = typing.get_origin(typ)
    if typ is bool:
        _check(isinstance(value, bool), key, f"must be true or false, got {value!r}")
        return value
    if typ is int:
        _check(isinstance(value, int) and not isinstance(value, bool), key, f"must be an integer, got {value!r}")
        return value
    if typ is float:
        _check(isinstance(value, (int, float)) and not isinstance(value, bool), key, f"must be a number, got {value!r}")
        return float(value)
    if typ is str:
        _check(isinstance(value, str), key, f"must be a string, got {value!r}")
        return value
    if typ is tuple or origin is tuple:
        _check(isinstance(value, (list, tuple)), key, f"must be a list, got {value!r}")
        return tuple(value)
    if typ is dict or origin is dict:
        _check(isinstance(value, dict), key, f"must be a mapping, got {value!r}")
        return dict(value)
    if isinstance(typ, type) and dataclasses.is_dataclass(typ):
        return _build(typ, value, key)
    if origin in (typing.Union, types.UnionType):  # pragma: no cover - no optional fields yet
        return value
    raise ConfigError(f"{key}: unsupported field type {typ!r}")  # pragma: no cover


def _build(cls: type, values: Any, prefix: str = "") -> Any:
    where = prefix or "config"
    _check(isinstance(values, dict), where, f"must be a mapping, got {values!r}")
    types_ = _field_types(cls)
    kwargs = {}
    for name, value in values.items():
        key = f"{prefix}.{name}" if prefix else str(name)
        if name not in types_:
            raise _unknown(key, str(name), list(types_))
        kwargs[name] = _coerce(value, types_[name], key)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:  # pragma: no cover - defensive
        raise ConfigError(f"{where}: {exc}") from exc


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and k not in ("backbone_kwargs", "extra"):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def config_path(name_or_path: str | os.PathLike) -> Path:
    """A shipped config NAME (``freeatm_fast/configs/NAME.yaml``) or a path to a YAML file."""
    text = str(name_or_path)
    candidate = Path(text)
    if candidate.suffix in (".yaml", ".yml") or os.sep in text:
        if not candidate.is_file():
            raise ConfigError(f"config file {text!r} does not exist")
        return candidate
    shipped = CONFIG_DIR / f"{text}.yaml"
    if not shipped.is_file():
        names = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
        raise ConfigError(f"no shipped config named {text!r}; shipped: {', '.join(names)} (or pass a .yaml path)")
    return shipped


def _read_yaml(path: Path, seen: tuple = ()) -> dict:
    import yaml

    if path.resolve() in seen:
        raise ConfigError(f"config {path}: 'base' chain loops back to itself")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config {path}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"config {path}: the top level must be a mapping")
    base = data.pop("base", None)
    if base is None:
        return data
    base_path = Path(base) if str(base).endswith((".yaml", ".yml")) else config_path(base)
    if not base_path.is_absolute() and str(base).endswith((".yaml", ".yml")):
        base_path = path.parent / base_path
    return _merge(_read_yaml(base_path, (*seen, path.resolve())), data)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"train.max_steps=10"`` -> (["train", "max_steps"], 10); the value is read as YAML."""
    import yaml

    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value")
    key, raw = text.split("=", 1)
    parts = [p for p in key.strip().split(".")]
    if not key.strip() or any(not p for p in parts):
        raise ConfigError(f"override {text!r}: bad key {key!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return parts, value


def _apply_override(tree: dict, parts: list[str], value: Any) -> None:
    node = tree
    for p in parts[:-1]:
        child = node.get(p)
        if not isinstance(child, dict):
            child = {}
            node[p] = child
        node = child
    node[parts[-1]] = value


def config_from_dict(values: dict) -> Config:
    """Build and validate a :class:`Config`; unknown keys raise :class:`ConfigError` naming the dotted key."""
    return _build(Config, values)


def load_config(name_or_path: str | os.PathLike | None = None, overrides: list[str] | tuple = ()) -> Config:
    """Load a shipped config NAME or a YAML path (default :data:`DEFAULT_CONFIG`) and apply dotted overrides."""
    tree = _read_yaml(config_path(name_or_path or DEFAULT_CONFIG))
    for text in overrides:
        parts, value = parse_override(text)
        _apply_override(tree, parts, value)
    return config_from_dict(tree)


def save_config(cfg: Config, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML (atomic: temporary name, then rename)."""
    import yaml

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    os.replace(tmp, path)


def shipped_configs() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
