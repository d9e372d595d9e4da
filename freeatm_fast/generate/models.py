"""Text-to-image pipelines for generation: SD 1.x / 2.x from a folder or hub id, and the offline ``tiny-random`` model.

``tiny-random`` is a Stable Diffusion architecture with small random weights (UNet with cross-attention at two
resolutions, a 2-level VAE, a 2-layer CLIP text encoder) and a byte-level BPE tokenizer built in memory: it needs no
file and no network, so tests and CPU smoke runs exercise the real diffusers code paths.

diffusers and transformers are imported inside the functions: importing this module stays cheap.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # pragma: no cover - typing only
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTokenizer

TINY_RANDOM = "tiny-random"
TOY = "toy"  # the shipped toy text-to-image model of the toy world (freeatm_fast/toy), offline
SCHEDULERS = ("ddim", "dpm")

# CLIP's special tokens; the pad token is the end-of-text token, as in the SD 1.x tokenizer.
_BOS, _EOS = "<|startoftext|>", "<|endoftext|>"
_MAX_LENGTH = 77

# Whole-word merges of the tiny tokenizer: prompts of the tests and templates ("a photo of a [dog] on a [sofa]")
# encode to one token per listed word; any other lowercase word still encodes, as several byte-level sub-words
# (which is what exercises the sub-word averaging of the mask recipe).
_TINY_WORDS = (
    "a an the of on in at with and by to is are next near under over behind front top photo picture image drawing "
    "painting close up view small large big red green blue yellow black white brown dog cat bird horse cow sheep car "
    "bus bike boat plane train sofa chair table bed tree house person man woman child ball cup bottle apple banana"
).split()

# SD 1.x scheduler settings (the "scaled_linear" betas every SD 1.x/2.x checkpoint ships).
_SD_SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
    prediction_type="epsilon",
)


class UnsupportedModelError(NotImplementedError):
    """The model exists but its architecture is not handled by the generator yet (e.g. SDXL's two text encoders)."""


# ----------------------------------------------------------------------------------------------------------------------
# tiny-random
# ----------------------------------------------------------------------------------------------------------------------


def _bpe(parts: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Apply BPE merges to a word's symbols: repeatedly join the adjacent pair of lowest rank (as tokenizers does)."""
    while len(parts) > 1:
        pairs = [(ranks.get((a, b), len(ranks)), i) for i, (a, b) in enumerate(zip(parts[:-1], parts[1:], strict=True))]
        rank, i = min(pairs)
        if rank == len(ranks):
            break
        parts = parts[:i] + [parts[i] + parts[i + 1]] + parts[i + 2 :]
    return parts


def _tiny_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Byte-level BPE vocab + merges in CLIP's layout: 256 byte symbols, the same with ``</w>``, word merges, specials.

    Each word's merges continue from the segmentation that the merges added before it already produce; merges added
    later rank lower and so cannot split it: every word of ``_TINY_WORDS`` encodes to exactly one token.
    """
    from tokenizers import pre_tokenizers

    # The 256 printable stand-ins of the byte-level pre-tokenizer, sorted for a reproducible id order.
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    symbols = alphabet + [c + "</w>" for c in alphabet]
    ranks: dict[tuple[str, str], int] = {}
    for word in _TINY_WORDS:
        parts = _bpe(list(word[:-1]) + [word[-1] + "</w>"], ranks)
        left = parts[0]
        for right in parts[1:]:
            ranks.setdefault((left, right), len(ranks))
            symbols.append(left + right)
            left = left + right
    vocab: dict[str, int] = {}
    for s in symbols:
        vocab.setdefault(s, len(vocab))
    vocab[_BOS] = len(vocab)
    vocab[_EOS] = len(vocab)
    return vocab, sorted(ranks, key=ranks.__getitem__)


def build_tiny_tokenizer() -> CLIPTokenizer:
    """A CLIPTokenizer (byte-level BPE, ``model_max_length=77``) built in memory from the embedded vocab; no files."""
    from transformers import CLIPTokenizer

    vocab, merges = _tiny_vocab_and_merges()
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=_MAX_LENGTH)


def build_tiny_random_pipeline(seed: int = 0, dtype: torch.dtype = torch.float32) -> StableDiffusionPipeline:
    """An SD-architecture pipeline with small random weights, built offline; the same ``seed`` gives the same weights.

    UNet: 32x32 latents (64x64 images), block channels (32, 64), one layer per block, cross-attention in both down
    blocks, the mid block and both up blocks, so at two resolutions (32x32 and 16x16 query grids); 2 heads, head dims
    16 and 32; text width 32. VAE: 2 levels (downscale 2), 4 latent channels. Text encoder: CLIP, width 32, 2 layers,
    77 positions. Scheduler: DDIM with SD's betas. No safety checker. The global torch RNG is left untouched.
    """
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = build_tiny_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=32,
            in_channels=4,
            out_channels=4,
            block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=2,  # SD 1.x naming: this is the number of heads (head dims 16 and 32)
            norm_num_groups=32,
        )
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
            up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
            block_out_channels=(32, 64),
            latent_channels=4,
            norm_num_groups=32,
            sample_size=64,
        )
        text_config = CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=_MAX_LENGTH,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            projection_dim=32,
        )
        text_encoder = CLIPTextModel(text_config)
    for module in (unet, vae, text_encoder):
        module.eval()  # inference, as after from_pretrained
    scheduler = DDIMScheduler(**_SD_SCHEDULER_CONFIG)
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    if dtype != torch.float32:  # built in fp32; casting is only needed (and only warns) for other dtypes
        pipe.to(dtype=dtype)
    return pipe


# ----------------------------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------------------------

# A hub id is "owner/name" (one slash, no path-like prefix); anything else is a local path.
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


def looks_like_hub_id(model: str) -> bool:
    """True for ``owner/name`` strings (e.g. ``stable-diffusion-v1-5/stable-diffusion-v1-5``)."""
    return bool(_HUB_ID.match(model)) and ".." not in model


def check_model_index(index: dict, where: str) -> None:
    """Raise unless ``model_index.json`` (parsed, read from ``where``) describes an SD 1.x/2.x-style UNet pipeline.

    SDXL (class name with "XL", or a ``text_encoder_2``) raises :class:`UnsupportedModelError`; pipelines without a
    ``unet`` + ``text_encoder`` + ``tokenizer`` (SD3, Flux, Kandinsky, ...) raise it too, naming what is missing.
    """
    name = str(index.get("_class_name", ""))
    if "XL" in name or "text_encoder_2" in index:
        raise UnsupportedModelError(
            f"SDXL (two text encoders) is not supported yet: {where} is a {name or 'pipeline with text_encoder_2'}; "
            "use an SD 1.x or 2.x pipeline"
        )
    missing = [c for c in ("unet", "text_encoder", "tokenizer", "vae", "scheduler") if c not in index]
    if missing:
        raise UnsupportedModelError(
            f"{where} ({name or 'unknown pipeline class'}) is not a Stable Diffusion 1.x/2.x pipeline: "
            f"model_index.json has no {', '.join(missing)}"
        )


def _read_model_index(path: Path) -> dict:
    index_file = path / "model_index.json"
    if not index_file.is_file():
        raise FileNotFoundError(
            f"{path} is not a diffusers pipeline folder: it has no model_index.json "
            "(single-file .ckpt/.safetensors checkpoints are not supported; save the pipeline with save_pretrained)"
        )
    try:
        index = json.loads(index_file.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{index_file}: cannot read model_index.json: {exc}") from exc
    if not isinstance(index, dict):
        raise ValueError(f"{index_file}: expected a JSON object, got {type(index).__name__}")
    return index


def _dtype_kwarg(dtype: torch.dtype) -> dict:
    """``from_pretrained``'s dtype keyword: ``dtype`` where diffusers deprecates ``torch_dtype``, else the latter."""
    from diffusers.utils import deprecation_utils

    key = "dtype" if hasattr(deprecation_utils, "_TORCH_DTYPE_DEPRECATION_MESSAGE") else "torch_dtype"
    return {key: dtype}


def default_dtype(device: torch.device | str) -> torch.dtype:
    """fp16 on GPU, fp32 elsewhere (CPU kernels for fp16 convolutions are slow or missing)."""
    return torch.float16 if torch.device(device).type == "cuda" else torch.float32


def load_pipeline(model: str, *, device: torch.device | str, dtype: torch.dtype | None = None):
    """Load a text-to-image pipeline onto ``device``.

    Args:
        model: ``"tiny-random"`` (offline random model, :func:`build_tiny_random_pipeline`), ``"toy"`` (the
            shipped toy text-to-image model, offline), a folder written by ``freeatm toy-train``
            (``toy_t2i.json``), a local diffusers pipeline folder, or a hub id ``owner/name`` (downloaded by
            diffusers: naming a hub id is the user's choice; set ``HF_HUB_OFFLINE=1`` to use the local cache only).
        device: where the pipeline runs.
        dtype: default fp16 on CUDA, fp32 on CPU.

    Raises:
        UnsupportedModelError: SDXL or another non-SD-1.x/2.x pipeline (checked before any weight is loaded).
        FileNotFoundError: a local path that does not exist (and is no hub id), or a folder without model_index.json.
    """
    device = torch.device(device)
    dtype = default_dtype(device) if dtype is None else dtype
    if not isinstance(model, str) or not model:
        raise ValueError(f"model must be 'tiny-random', a local folder or a hub id, got {model!r}")
    if model == TINY_RANDOM:
        return build_tiny_random_pipeline(dtype=dtype).to(device)
    from freeatm_fast.toy.model import load_toy_pipeline, toy_model_dir

    toy_folder = toy_model_dir(model)  # "toy" or a folder holding toy_t2i.json
    if toy_folder is not None:
        return load_toy_pipeline(toy_folder, device=device, dtype=dtype)

    from diffusers import StableDiffusionPipeline

    path = Path(os.path.expanduser(model))
    if path.exists():
        if not path.is_dir():
            raise FileNotFoundError(
                f"{path} is a file; expected a diffusers pipeline folder (single-file checkpoints are not supported)"
            )
        check_model_index(_read_model_index(path), str(path))
        pipe = StableDiffusionPipeline.from_pretrained(str(path), **_dtype_kwarg(dtype), safety_checker=None)
        return pipe.to(device)
    if not looks_like_hub_id(model):
        raise FileNotFoundError(
            f"model {model!r}: no such local folder, and it is not a hub id of the form 'owner/name' "
            f"(or use '{TINY_RANDOM}')"
        )
    from huggingface_hub import hf_hub_download

    try:
        index_file = hf_hub_download(model, "model_index.json")
    except Exception as exc:  # offline, unknown repo, gated repo: the hub client's message says which
        raise FileNotFoundError(
            f"model {model!r}: not a local folder, and fetching model_index.json from the hub failed: "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    check_model_index(json.loads(Path(index_file).read_text()), f"hub model {model!r}")
    pipe = StableDiffusionPipeline.from_pretrained(model, **_dtype_kwarg(dtype), safety_checker=None)
    return pipe.to(device)


def model_defaults(model: str) -> dict:
    """Sampling and mask-recipe defaults a model ships with (``{}`` for SD and tiny-random): the toy models'
    ``recipe`` (``steps``, ``guidance``, ``scheduler``, ``resolutions``, ``window``, ``tau``, ``upsample``,
    ``normalize``), chosen for that model by ``freeatm eval masks`` on a validation split. Explicit command-line
    values win."""
    if not isinstance(model, str) or not model:
        return {}
    from freeatm_fast.toy.model import read_toy_info, toy_model_dir

    folder = toy_model_dir(model)
    return {} if folder is None else dict(read_toy_info(folder).get("model", {}).get("recipe", {}))


def set_scheduler(pipe, name: str):
    """Replace ``pipe.scheduler`` by ``"ddim"`` (DDIM) or ``"dpm"`` (DPM-Solver++ multistep), from its own config.

    Returns the pipeline (changed in place).
    """
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    config = pipe.scheduler.config
    if name == "ddim":
        pipe.scheduler = DDIMScheduler.from_config(config)
    elif name == "dpm":
        pipe.scheduler = DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++")
    else:
        raise ValueError(f"unknown scheduler {name!r}; choices: {', '.join(SCHEDULERS)}")
    return pipe
