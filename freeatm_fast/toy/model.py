"""The tiny text-to-image model of the toy world (issue #8): tokenizer, text encoder, UNet and pipeline.

A pixel-space diffusion model at 32x32 that draws the toy world's captions ("a red circle, a small blue star and a
green square on a striped background"), small enough to train on a CPU in about an hour and to ship inside the
package, so that every fresh machine has a real text-to-image model whose cross-attention hands out free masks.

- Tokenizer: word level (``tokenizers.models.WordLevel`` in a ``PreTrainedTokenizerFast``), the toy world's closed
  vocabulary (:data:`TOY_WORDS`), lower-cased, punctuation split off, ``[BOS] text [EOS]``, padded with ``[PAD]`` to
  ``model_max_length`` (32). One word = one token, so an object word's map is one token column.
- Text encoder (:class:`ToyTextEncoder`): token embedding + learned position embedding + LayerNorm, and
  ``text_layers`` transformer layers on top (0 by default). With 0 layers the tokens do not mix: the key of "circle"
  says "circle at position p" and nothing about its neighbours, so its cross-attention map can only mark where a
  circle is drawn (a mixing encoder lets "circle" carry its colour too, and the shape word then localises poorly:
  mIoU ~0.3 against ~0.75 for the colour word in the issue's probe). Binding a colour to its shape is left to the
  UNet (it sees the positions of both words).
- UNet: diffusers ``UNet2DConditionModel``, 3 input/output channels (pixels), channels 32/64/128, one layer per block,
  cross-attention at 16x16 only (``cross_attention`` per level; no mid block when the coarsest level has none), head
  dim 16, cross-attention dim = text width. The text reaches the pixels through the 16x16 maps alone: with
  cross-attention at 8x8 too (and in the mid block), the coarse layers carried the prompt, their maps did not
  localise (colour-word mIoU ~0.08) and the 16x16 ones localised worse (0.55 against 0.63 at step 1000, the same
  seed and settings, 48+48 selection images).
- Noise: v-prediction on a cosine schedule (``squaredcos_cap_v2``, 1000 steps); sampling with DDIM (or DPM-Solver++).
- :class:`ToyPipeline`: a ``diffusers.DiffusionPipeline`` with the call signature the generator uses for Stable
  Diffusion (``prompt``, ``height``, ``width``, ``num_inference_steps``, ``guidance_scale``, ``latents``,
  ``output_type``, ``callback_on_step_end``) and ``encode_prompt``; ``vae`` is None and ``vae_scale_factor`` 1
  (the "latents" are the pixels in [-1, 1]). The generator installs its capture on ``pipe.unet`` exactly as for SD.

Weights: :func:`save_toy_model` writes ``toy_t2i.json`` (architecture, training settings, recipe) and
``toy_t2i.safetensors`` (fp16); :func:`load_toy_pipeline` reads them, by default from the package's
``freeatm_fast/toy/weights/`` (no network). :func:`write_toy_recipe` records the mask recipe that ``freeatm eval masks
--toyworld --write-recipe`` chose for a model in its ``toy_t2i.json`` (the generator's defaults for that model).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

__all__ = [
    "SHIPPED_DIR",
    "TOY_WORDS",
    "ToyModelConfig",
    "ToyPipeline",
    "ToyTextEncoder",
    "build_toy_pipeline",
    "build_toy_tokenizer",
    "build_toy_unet",
    "load_toy_pipeline",
    "make_scheduler",
    "save_toy_model",
    "write_toy_recipe",
]

SHIPPED_DIR = Path(__file__).resolve().parent / "weights"
WEIGHTS_NAME = "toy_t2i.safetensors"
CONFIG_NAME = "toy_t2i.json"

_SPECIAL = ["[PAD]", "[BOS]", "[EOS]", "[UNK]"]


def _toy_words() -> list[str]:
    from freeatm_fast.data.toyworld import BACKGROUNDS, CLASSES, COLOURS

    glue = ["a", "an", "small", "and", "on", "background", ",", ".", "the", "of", "with", "photo"]
    return glue + list(COLOURS) + list(CLASSES) + list(BACKGROUNDS)


TOY_WORDS: tuple[str, ...] = tuple(_toy_words())


@dataclass(frozen=True)
class ToyModelConfig:
    """Architecture of the toy model (saved with the weights)."""

    image_size: int = 32
    channels: tuple[int, ...] = (32, 64, 128)
    cross_attention: tuple[bool, ...] = (False, True, False)  # per down level (the up path mirrors it)
    head_dim: int = 16
    text_width: int = 128
    text_layers: int = 0
    text_heads: int = 4
    max_length: int = 32
    prediction_type: str = "v_prediction"
    beta_schedule: str = "squaredcos_cap_v2"
    # the mask recipe and sampling settings this model was measured with (freeatm eval masks); the generator
    # uses them as defaults for this model
    recipe: dict = field(default_factory=dict)

    def __post_init__(self):
        object.__setattr__(self, "channels", tuple(int(c) for c in self.channels))
        object.__setattr__(self, "cross_attention", tuple(bool(c) for c in self.cross_attention))
        if len(self.channels) != len(self.cross_attention):
            raise ValueError(f"toy model: channels {self.channels} and cross_attention {self.cross_attention} differ")
        if any(c % self.head_dim for c in self.channels):
            raise ValueError(f"toy model: channels {self.channels} must be multiples of head_dim {self.head_dim}")
        if self.image_size % (2 ** (len(self.channels) - 1)):
            raise ValueError(f"toy model: image_size {self.image_size} is not divisible by the UNet's downsampling")

    @classmethod
    def from_dict(cls, values: dict) -> ToyModelConfig:
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"toy model config: unknown keys {unknown} (known: {sorted(known)})")
        return cls(**values)


# ----------------------------------------------------------------------------------------------------------------------
# tokenizer and text encoder
# ----------------------------------------------------------------------------------------------------------------------


def build_toy_tokenizer(max_length: int = 32):
    """The word-level tokenizer of the toy world, built in memory (deterministic ids: specials, then TOY_WORDS)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate([*_SPECIAL, *TOY_WORDS])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()  # whitespace, and punctuation as tokens of their own
    tok.post_processor = processors.TemplateProcessing(
        single="[BOS] $A [EOS]", special_tokens=[("[BOS]", vocab["[BOS]"]), ("[EOS]", vocab["[EOS]"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="[BOS]",
        eos_token="[EOS]",
        pad_token="[PAD]",
        unk_token="[UNK]",
        model_max_length=max_length,
    )


def _diffusers_bases():
    from diffusers.configuration_utils import ConfigMixin, register_to_config
    from diffusers.models.modeling_utils import ModelMixin

    return ModelMixin, ConfigMixin, register_to_config


_ModelMixin, _ConfigMixin, _register = _diffusers_bases()


class ToyTextEncoder(_ModelMixin, _ConfigMixin):
    """Token + position embedding, LayerNorm, ``num_layers`` pre-norm transformer layers (0: tokens do not mix).

    ``forward(input_ids [B,T], attention_mask=None) -> (hidden [B,T,width],)`` (a tuple, like transformers'
    text models with ``return_dict=False``).
    """

    @_register
    def __init__(
        self, vocab_size: int = 64, width: int = 128, max_length: int = 32, num_layers: int = 0, num_heads: int = 4
    ):
        super().__init__()
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.position_embedding = nn.Embedding(max_length, width)
        self.norm = nn.LayerNorm(width)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(width, num_heads, 4 * width, dropout=0.0, batch_first=True, norm_first=True)
            for _ in range(num_layers)
        )
        self.final_norm = nn.LayerNorm(width) if num_layers else nn.Identity()
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.position_embedding.weight, std=0.01)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        T = input_ids.shape[1]
        pos = torch.arange(T, device=input_ids.device)
        h = self.norm(self.token_embedding(input_ids) + self.position_embedding(pos)[None])
        pad = None if attention_mask is None else attention_mask == 0
        for layer in self.blocks:
            h = layer(h, src_key_padding_mask=pad)
        return (self.final_norm(h),)


def build_toy_unet(cfg: ToyModelConfig):
    """The pixel-space ``UNet2DConditionModel`` of the config (random initialisation)."""
    from diffusers import UNet2DConditionModel

    down = tuple("CrossAttnDownBlock2D" if x else "DownBlock2D" for x in cfg.cross_attention)
    up = tuple("CrossAttnUpBlock2D" if x else "UpBlock2D" for x in reversed(cfg.cross_attention))
    return UNet2DConditionModel(
        sample_size=cfg.image_size,
        in_channels=3,
        out_channels=3,
        block_out_channels=cfg.channels,
        layers_per_block=1,
        down_block_types=down,
        up_block_types=up,
        mid_block_type="UNetMidBlock2DCrossAttn" if cfg.cross_attention[-1] else None,
        cross_attention_dim=cfg.text_width,
        # SD's legacy naming: attention_head_dim is the number of heads per block
        attention_head_dim=tuple(c // cfg.head_dim for c in cfg.channels),
        norm_num_groups=min(32, cfg.channels[0]),
    )


def make_scheduler(cfg: ToyModelConfig, name: str = "ddim"):
    """The noise schedule of the model: DDPM for training, DDIM / DPM-Solver++ for sampling."""
    from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

    common = dict(num_train_timesteps=1000, beta_schedule=cfg.beta_schedule, prediction_type=cfg.prediction_type)
    if name == "ddpm":
        return DDPMScheduler(**common, clip_sample=False)
    if name == "ddim":
        return DDIMScheduler(**common, clip_sample=False, set_alpha_to_one=True, timestep_spacing="trailing")
    if name == "dpm":
        return DPMSolverMultistepScheduler(**common, algorithm_type="dpmsolver++", timestep_spacing="trailing")
    raise ValueError(f"toy model: unknown scheduler {name!r} (ddpm, ddim, dpm)")


# ----------------------------------------------------------------------------------------------------------------------
# pipeline
# ----------------------------------------------------------------------------------------------------------------------


def _pipeline_base():
    from diffusers import DiffusionPipeline

    return DiffusionPipeline


class ToyPipeline(_pipeline_base()):
    """Text-to-image sampling in pixel space with classifier-free guidance (module docstring)."""

    vae = None
    vae_scale_factor = 1
    model_cpu_offload_seq = "text_encoder->unet"
    _callback_tensor_inputs = ["latents"]

    def __init__(self, unet, text_encoder, tokenizer, scheduler):
        super().__init__()
        self.register_modules(unet=unet, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler)
        self.toy_config: ToyModelConfig | None = None

    def _ids(self, prompts: list[str], device) -> torch.Tensor:
        enc = self.tokenizer(
            prompts,
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        )
        return enc["input_ids"].to(device)

    @torch.no_grad()
    def encode_prompt(
        self, prompt, device, num_images_per_prompt: int = 1, do_classifier_free_guidance=True, negative_prompt=None
    ):
        """(prompt embeddings [B*n, T, W], negative embeddings or None), like StableDiffusionPipeline's. The
        unconditional text is the empty caption ("[BOS] [EOS]" and padding), as in training's caption dropout."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        dtype = self.unet.dtype
        emb = self.text_encoder(self._ids(prompts, device))[0].to(dtype)
        emb = emb.repeat_interleave(num_images_per_prompt, dim=0)
        neg = None
        if do_classifier_free_guidance:
            neg_prompts = (
                [""] * len(prompts)
                if negative_prompt is None
                else ([negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(negative_prompt))
            )
            neg = self.text_encoder(self._ids(neg_prompts, device))[0].to(dtype)
            neg = neg.repeat_interleave(num_images_per_prompt, dim=0)
        return emb, neg

    @torch.no_grad()
    def __call__(
        self,
        prompt,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 25,
        guidance_scale: float = 2.0,
        negative_prompt=None,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "np",
        return_dict: bool = True,
        callback_on_step_end=None,
        callback_on_step_end_tensor_inputs=("latents",),
    ):
        from diffusers.pipelines.pipeline_utils import ImagePipelineOutput

        size = int(self.unet.config.sample_size)
        height, width = height or size, width or size
        device = self.unet.device
        cfg_on = guidance_scale > 1.0
        cond, uncond = self.encode_prompt(prompt, device, num_images_per_prompt, cfg_on, negative_prompt)
        batch = cond.shape[0]
        # [uncond; cond], the order diffusers' SD pipelines use: the generator's capture reads the second half
        embeds = torch.cat([uncond, cond]) if cfg_on else cond
        shape = (batch, int(self.unet.config.in_channels), height, width)
        if latents is None:
            latents = torch.randn(shape, generator=generator, dtype=torch.float32).to(device, self.unet.dtype)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"ToyPipeline: latents have shape {tuple(latents.shape)}, expected {shape}")
        latents = latents.to(device, self.unet.dtype) * self.scheduler.init_noise_sigma
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps = self.scheduler.timesteps
        self._num_timesteps = len(timesteps)
        for i, t in enumerate(self.progress_bar(timesteps)):
            x = torch.cat([latents, latents]) if cfg_on else latents
            x = self.scheduler.scale_model_input(x, t)
            out = self.unet(x, t, encoder_hidden_states=embeds, return_dict=False)[0]
            if cfg_on:
                out_u, out_c = out.chunk(2)
                out = out_u + guidance_scale * (out_c - out_u)
            latents = self.scheduler.step(out, t, latents, return_dict=False)[0]
            if callback_on_step_end is not None:
                tensors = {"latents": latents}
                kwargs = {k: tensors[k] for k in callback_on_step_end_tensor_inputs}
                result = callback_on_step_end(self, i, t, kwargs) or {}
                latents = result.pop("latents", latents)
        images = (latents.float() / 2 + 0.5).clamp(0, 1)
        if output_type == "pt":
            out_images = images
        else:
            out_images = images.permute(0, 2, 3, 1).cpu().numpy()
            if output_type == "pil":
                from PIL import Image

                out_images = [Image.fromarray((im * 255).round().astype(np.uint8)) for im in out_images]
        self.maybe_free_model_hooks()
        if not return_dict:
            return (out_images,)
        return ImagePipelineOutput(images=out_images)


def build_toy_pipeline(cfg: ToyModelConfig | None = None, *, seed: int = 0) -> ToyPipeline:
    """A randomly initialised toy pipeline (training starts here); the global torch RNG is left untouched."""
    cfg = cfg or ToyModelConfig()
    tokenizer = build_toy_tokenizer(cfg.max_length)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = build_toy_unet(cfg)
        text = ToyTextEncoder(len(tokenizer), cfg.text_width, cfg.max_length, cfg.text_layers, cfg.text_heads)
    pipe = ToyPipeline(unet=unet, text_encoder=text, tokenizer=tokenizer, scheduler=make_scheduler(cfg, "ddim"))
    pipe.toy_config = cfg
    return pipe


# ----------------------------------------------------------------------------------------------------------------------
# weights on disk
# ----------------------------------------------------------------------------------------------------------------------


def save_toy_model(
    unet: nn.Module,
    text_encoder: nn.Module,
    cfg: ToyModelConfig,
    out_dir: str | os.PathLike,
    *,
    info: dict | None = None,
) -> Path:
    """Write ``toy_t2i.safetensors`` (fp16) and ``toy_t2i.json`` into ``out_dir`` (each via a temporary name)."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {f"unet.{k}": v.detach().to("cpu", torch.float16).contiguous() for k, v in unet.state_dict().items()}
    state.update(
        {
            f"text_encoder.{k}": v.detach().to("cpu", torch.float16).contiguous()
            for k, v in text_encoder.state_dict().items()
        }
    )
    tmp = out / f".{WEIGHTS_NAME}.tmp-{os.getpid()}"
    save_file(state, str(tmp))
    os.replace(tmp, out / WEIGHTS_NAME)
    meta = {"model": asdict(cfg), "vocab": [*_SPECIAL, *TOY_WORDS], **(info or {})}
    tmp = out / f".{CONFIG_NAME}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(meta, indent=1) + "\n")
    os.replace(tmp, out / CONFIG_NAME)
    return out / WEIGHTS_NAME


# sampling settings recorded with a measured recipe when the model has none yet: DPM-Solver++ in 10 steps with
# guidance 2 (the probe: guidance 1.5-2 localises best; 10 steps keep first-use generation fast on a CPU)
DEFAULT_SAMPLING = {"steps": 10, "guidance": 2.0, "scheduler": "dpm"}


def toy_model_dir(model: str | os.PathLike) -> Path | None:
    """The folder of a toy model named by ``model`` ("toy" = the shipped one, or a folder holding
    ``toy_t2i.json``), else None."""
    if str(model) == "toy":  # generate.models.TOY
        return SHIPPED_DIR
    folder = Path(os.path.expanduser(str(model)))
    return folder if (folder / CONFIG_NAME).is_file() else None


def write_toy_recipe(model_dir: str | os.PathLike, result: dict, *, command: str = "") -> dict:
    """Record the recipe chosen by a re-noise evaluation (``result`` of ``evaluate_renoise``) as the model's
    defaults: ``model.recipe`` = the sampling settings already recorded (else :data:`DEFAULT_SAMPLING`) + the chosen
    ``resolutions``, capture ``window`` (fractions of the sampling run), ``tau``, ``upsample`` and ``normalize``;
    ``recipe_source`` says how it was measured and what it scored. The JSON is replaced atomically; the weights are
    not touched.
    Returns the recipe written."""
    folder = Path(model_dir)
    info = read_toy_info(folder)
    if result.get("mode") != "renoise" or "chosen" not in result:
        raise ValueError(f"{folder}: a recipe is written from a re-noise evaluation (freeatm eval masks --toyworld)")
    chosen = result["chosen"]
    old = dict(info.get("model", {}).get("recipe", {}))
    recipe = {k: old.get(k, v) for k, v in DEFAULT_SAMPLING.items()}
    recipe.update(
        resolutions=[int(r) for r in chosen["resolutions"]],
        window=[float(w) for w in chosen["capture_window"]],
        tau=float(chosen["tau"]),
        upsample=str(chosen["upsample"]),
        normalize=str(chosen.get("normalize", "max")),
    )
    ToyModelConfig.from_dict({**info["model"], "recipe": recipe})  # the recipe must leave a loadable config

    def kind(split: str, name: str) -> str:
        k = result[split]["kinds"].get(name, {})
        miou, point = k.get("miou"), k.get("pointing")
        return "n/a" if miou is None else f"{miou:.3f}" + ("" if point is None else f" (pointing {point:.2f})")

    val, test = result["splits"]["val"], result["splits"]["test"]
    info["model"]["recipe"] = recipe
    info["recipe_source"] = (
        f"{command or 'freeatm eval masks --toyworld'}: best colour-word mIoU on toy-world (seed "
        f"{result.get('toyworld', {}).get('seed', '?')}) val images "
        f"{val['start']}-{val['stop'] - 1} (res {'+'.join(map(str, recipe['resolutions']))}, {chosen['window']}, "
        f"{recipe['upsample']}, {recipe['normalize']}-normalised, tau {recipe['tau']:g}): val colour "
        f"{kind('val', 'colour')}; test images "
        f"{test['start']}-{test['stop'] - 1}: colour {kind('test', 'colour')}, shape {kind('test', 'shape')}. "
        f"Sampling: {recipe['scheduler']} {recipe['steps']} steps, guidance {recipe['guidance']:g}."
    )
    from freeatm_fast.data.shards import atomic_write_bytes

    atomic_write_bytes(folder / CONFIG_NAME, (json.dumps(info, indent=1) + "\n").encode("utf-8"))
    return recipe


def read_toy_info(path: str | os.PathLike | None = None) -> dict:
    """The JSON saved with the weights in ``path`` (default: the shipped model)."""
    folder = Path(path) if path is not None else SHIPPED_DIR
    cfg_file = folder / CONFIG_NAME
    if not cfg_file.is_file():
        raise FileNotFoundError(
            f"{cfg_file}: no toy model here (expected {CONFIG_NAME} and {WEIGHTS_NAME}; train one with "
            "`freeatm toy-train`)"
        )
    try:
        return json.loads(cfg_file.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{cfg_file}: not valid JSON: {exc}") from exc


def load_toy_pipeline(
    path: str | os.PathLike | None = None, *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> ToyPipeline:
    """The toy pipeline with the weights in ``path`` (default: the shipped ones in the package), offline."""
    from safetensors.torch import load_file

    folder = Path(path) if path is not None else SHIPPED_DIR
    info = read_toy_info(folder)
    if list(info.get("vocab", [])) != [*_SPECIAL, *TOY_WORDS]:
        raise ValueError(f"{folder / CONFIG_NAME}: the vocabulary differs from this version's toy tokenizer")
    cfg = ToyModelConfig.from_dict(info["model"])
    pipe = build_toy_pipeline(cfg)
    weights = folder / WEIGHTS_NAME
    if not weights.is_file():
        raise FileNotFoundError(f"{weights}: the toy model's weights are missing")
    state = load_file(str(weights))
    for prefix, module in (("unet.", pipe.unet), ("text_encoder.", pipe.text_encoder)):
        sub = {k[len(prefix) :]: v.float() for k, v in state.items() if k.startswith(prefix)}
        missing, unexpected = module.load_state_dict(sub, strict=False)
        if missing or unexpected:
            raise ValueError(
                f"{weights}: {prefix[:-1]} weights do not fit: missing {missing[:5]}, unexpected {unexpected[:5]}"
            )
    pipe.unet.eval()
    pipe.text_encoder.eval()
    pipe.toy_info = info
    pipe = pipe.to(torch.device(device))
    if dtype != torch.float32:  # built in fp32; casting warns, so only when needed
        pipe = pipe.to(dtype=dtype)
    return pipe
