"""Capture of cross-attention maps during sampling: every ``attn2`` of the UNet through ``cross_attention_with_maps``.

:class:`MapCapture` installs one processor per cross-attention layer of a diffusers ``UNet2DConditionModel``
(self-attention keeps whatever processor it had: SDPA by default, or xformers when the user enabled it *before*
installing the capture). Per captured resolution it owns ONE fp32 accumulator ``[B', K, h*w]`` that the fused op adds
``weight * mean_h softmax(q kᵀ·scale)`` into, for the ``K`` token columns of the object words and the ``B'`` batch
rows that carry them (the conditional half under classifier-free guidance). A Python float per resolution counts the
weight added, so :meth:`MapCapture.maps` returns the weighted mean over layers and steps. Nothing here reads a device
value: no host synchronisation inside the sampling loop, and memory does not depend on the number of steps.

Resolutions are named by the side of a level's query grid at the UNet's native ``sample_size`` (SD 1.5: 64, 32, 16,
8 for its four levels at 512x512); at other image sizes the same level is captured with its actual ``(h, w)`` grid
(e.g. 96x64 for level "64" at 768x512).

:class:`EagerCrossAttnProcessor` is the baseline that existing attention-map tools implement (prompt-to-prompt's
``AttentionStore``): materialise the probabilities of every cross-attention call, keep the head mean of each layer and
step in a Python list, average at the end. Both processors give the same maps (the tests check 1e-5 in fp32).

Use (the sampler does this)::

    cap = MapCapture(pipe.unet, CaptureConfig(), batch_size=B, num_rows=B, tokens=tok, latent_hw=(64, 64), device=dev)
    cap.set_step(0, steps)
    pipe(prompts, num_inference_steps=steps, callback_on_step_end=cap.step_callback(steps))
    maps = cap.maps()  # {64: [B, K, 64, 64], 32: ..., 16: ...}
    cap.reset(next_tokens)  # next batch
    cap.remove()  # original processors back
"""

from __future__ import annotations

import abc
import fnmatch
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from freeatm_kernels import BACKENDS, cross_attention_with_maps

ROW_MODES = ("cond", "all")
PROCESSORS = ("fused", "eager")
# The three finest cross-attention levels: 64, 32 and 16 for SD 1.x/2.x at their native size (DESIGN §4); the 8x8
# level is too coarse to localise objects.
DEFAULT_NUM_LEVELS = 3


@dataclass(frozen=True)
class CaptureConfig:
    """What to capture.

    Attributes:
        resolutions: levels to capture, by their grid side at the UNet's native sample size (SD 1.5: a subset of
            64, 32, 16, 8); ``None`` = the ``DEFAULT_NUM_LEVELS`` finest levels that have cross-attention.
        window: fraction ``[start, end)`` of the denoising steps that accumulate; step ``i`` of ``n`` counts when
            ``start <= i / n < end``. Default: all steps.
        layer_weights: ``{glob pattern: weight}`` over layer names such as ``"up_blocks.1.attentions.0.
            transformer_blocks.0.attn2"``; the first matching pattern gives the layer's weight, unmatched layers weigh
            1. A weight of 0 leaves that layer uncaptured (plain SDPA). ``None``: every layer weighs 1.
        rows: ``"cond"``: only the conditional half of a classifier-free-guidance batch accumulates (``B' = B``);
            ``"all"``: every row of the UNet batch (``B' = 2B`` under guidance).
        backend: passed to ``cross_attention_with_maps``: "auto", "torch", "triton" or "cuda".
    """

    resolutions: tuple[int, ...] | None = None
    window: tuple[float, float] = (0.0, 1.0)
    layer_weights: Mapping[str, float] | None = None
    rows: str = "cond"
    backend: str = "auto"
    _weights: tuple[tuple[str, float], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        if self.resolutions is not None:
            res = tuple(self.resolutions)
            if not res or any(not isinstance(r, int) or isinstance(r, bool) or r < 1 for r in res):
                raise ValueError(f"CaptureConfig.resolutions must be positive ints (or None), got {self.resolutions!r}")
            if len(set(res)) != len(res):
                raise ValueError(f"CaptureConfig.resolutions has repeats: {self.resolutions!r}")
            object.__setattr__(self, "resolutions", res)
        try:
            start, end = (float(x) for x in self.window)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"CaptureConfig.window must be two numbers (start, end), got {self.window!r}") from exc
        if not 0.0 <= start < end <= 1.0:
            raise ValueError(f"CaptureConfig.window must satisfy 0 <= start < end <= 1, got {self.window!r}")
        object.__setattr__(self, "window", (start, end))
        weights: list[tuple[str, float]] = []
        if self.layer_weights is not None:
            if not isinstance(self.layer_weights, Mapping):
                raise ValueError(
                    f"CaptureConfig.layer_weights must be a mapping pattern -> weight, got {self.layer_weights!r}"
                )
            for pattern, w in self.layer_weights.items():
                if not isinstance(pattern, str) or not pattern:
                    raise ValueError(f"CaptureConfig.layer_weights: a pattern must be a non-empty str, got {pattern!r}")
                try:
                    w = float(w)
                except (TypeError, ValueError) as exc:
                    raise ValueError(f"CaptureConfig.layer_weights[{pattern!r}] must be a number, got {w!r}") from exc
                if not math.isfinite(w) or w < 0:
                    raise ValueError(f"CaptureConfig.layer_weights[{pattern!r}] must be finite and >= 0, got {w}")
                weights.append((pattern, w))
        object.__setattr__(self, "_weights", tuple(weights))
        if self.rows not in ROW_MODES:
            raise ValueError(f"CaptureConfig.rows must be one of {ROW_MODES}, got {self.rows!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"CaptureConfig.backend must be one of {BACKENDS}, got {self.backend!r}")

    def layer_weight(self, name: str) -> float:
        """Weight of the layer called ``name`` (first matching glob of ``layer_weights``, else 1)."""
        for pattern, w in self._weights:
            if fnmatch.fnmatchcase(name, pattern):
                return w
        return 1.0


# ----------------------------------------------------------------------------------------------------------------------
# UNet structure: which level (number of 2x downsamplings) each cross-attention layer runs at
# ----------------------------------------------------------------------------------------------------------------------

_LAYER_NAME = re.compile(r"^(down_blocks|up_blocks)\.(\d+)\.|^mid_block\.")


def _layer_level(unet: torch.nn.Module, name: str) -> int:
    """Level of the attention module ``name`` of a UNet2DConditionModel: 0 = latent grid, +1 per downsampler."""
    n_down = [getattr(b, "downsamplers", None) is not None for b in unet.down_blocks]
    total = sum(n_down)
    m = _LAYER_NAME.match(name)
    if m is None:
        raise ValueError(
            f"cannot place cross-attention layer {name!r} in the UNet (expected down_blocks.i, mid_block or "
            "up_blocks.i): not a UNet2DConditionModel layout"
        )
    if m.group(1) is None:
        return total
    i = int(m.group(2))
    if m.group(1) == "down_blocks":
        return sum(n_down[:i])
    n_up = [getattr(b, "upsamplers", None) is not None for b in unet.up_blocks]
    return total - sum(n_up[:i])


def _native_side(unet: torch.nn.Module, latent_hw: tuple[int, int]) -> int:
    size = getattr(unet.config, "sample_size", None)
    if isinstance(size, int):
        return size
    if isinstance(size, (tuple, list)) and size:
        return int(size[0])
    return latent_hw[0]


def grid_at_level(latent_hw: tuple[int, int], level: int) -> tuple[int, int]:
    """Query grid ``(h, w)`` after ``level`` stride-2 downsamplings (3x3 conv, padding 1: ``ceil(x / 2)`` each)."""
    h, w = latent_hw
    for _ in range(level):
        h, w = (h + 1) // 2, (w + 1) // 2
    return h, w


def cross_attention_layers(unet: torch.nn.Module) -> dict[str, tuple[torch.nn.Module, int]]:
    """``{layer name: (Attention module, level)}`` for every cross-attention layer of a UNet2DConditionModel."""
    layers = {}
    for name, module in unet.named_modules():
        if hasattr(module, "set_processor") and getattr(module, "is_cross_attention", False):
            layers[name] = (module, _layer_level(unet, name))
    if not layers:
        raise ValueError(f"{type(unet).__name__} has no cross-attention layer to capture")
    return layers


def available_resolutions(unet: torch.nn.Module, latent_hw: tuple[int, int] | None = None) -> tuple[int, ...]:
    """Resolutions (grid side at the native sample size) that have cross-attention, finest first."""
    hw = latent_hw or (64, 64)
    native = _native_side(unet, hw)
    levels = sorted({lvl for _, lvl in cross_attention_layers(unet).values()})
    return tuple(native >> lvl for lvl in levels)


# ----------------------------------------------------------------------------------------------------------------------
# Processors
# ----------------------------------------------------------------------------------------------------------------------


def _project(attn, hidden_states, encoder_hidden_states, attention_mask, temb):
    """The input half of diffusers' ``AttnProcessor2_0``: returns q ``[B,H,N,D]``, k/v ``[B,H,T,D]``, mask, context."""
    residual = hidden_states
    if attn.spatial_norm is not None:
        hidden_states = attn.spatial_norm(hidden_states, temb)
    input_ndim = hidden_states.ndim
    shape4 = None
    if input_ndim == 4:
        batch_size, channel, height, width = hidden_states.shape
        shape4 = (channel, height, width)
        hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
    batch_size, sequence_length, _ = (
        hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
    )
    if attention_mask is not None:
        attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
        attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
    if attn.group_norm is not None:
        hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
    query = attn.to_q(hidden_states)
    if encoder_hidden_states is None:
        encoder_hidden_states = hidden_states
    elif attn.norm_cross:
        encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
    key = attn.to_k(encoder_hidden_states)
    value = attn.to_v(encoder_hidden_states)
    head_dim = key.shape[-1] // attn.heads
    query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
    key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
    value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    return query, key, value, attention_mask, (residual, input_ndim, shape4)


def _finish(attn, out, query_dtype, ctx):
    """The output half of ``AttnProcessor2_0``: merge heads, ``to_out``, residual and rescale."""
    residual, input_ndim, shape4 = ctx
    batch_size, heads, _, head_dim = out.shape
    hidden_states = out.transpose(1, 2).reshape(batch_size, -1, heads * head_dim).to(query_dtype)
    hidden_states = attn.to_out[0](hidden_states)
    hidden_states = attn.to_out[1](hidden_states)
    if input_ndim == 4:
        hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, *shape4)
    if attn.residual_connection:
        hidden_states = hidden_states + residual
    return hidden_states / attn.rescale_output_factor


class _CaptureProcessor(abc.ABC):
    """Shared part of both processors: the layer's identity and the hand-off to its :class:`MapCapture`."""

    def __init__(self, capture: MapCapture, name: str, resolution: int | None, grid: tuple[int, int], weight: float):
        self.capture = capture
        self.name = name
        self.resolution = resolution  # None: this layer's level is not captured
        self.grid = grid
        self.weight = weight

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kw):
        q, k, v, mask, ctx = _project(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        target = self.capture._target(self, q.shape[0], q.shape[2])
        if target is None:
            # Not captured (level not selected, weight 0, or step outside the window): exactly AttnProcessor2_0.
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.0, is_causal=False)
        else:
            if mask is not None:
                raise ValueError(
                    f"{self.name}: map capture does not support a cross-attention mask (encoder_attention_mask); "
                    "SD pipelines pass none"
                )
            out = self._attend(q, k, v, *target)
        return _finish(attn, out, q.dtype, ctx)

    @abc.abstractmethod
    def _attend(self, q, k, v, maps, rows, tokens):
        """Attention output ``[B, H, N, D]`` of one captured call; records the call's maps (fused: into ``maps``)."""


class FusedCrossAttnProcessor(_CaptureProcessor):
    """Cross-attention through ``cross_attention_with_maps``: output like SDPA, maps added to the capture's buffer.

    The softmax scale is SDPA's default ``1/sqrt(D)``, as in diffusers' ``AttnProcessor2_0`` (equal to ``attn.scale``
    for every SD checkpoint).
    """

    def _attend(self, q, k, v, maps, rows, tokens):
        return cross_attention_with_maps(
            q, k, v, maps, rows=rows, tokens=tokens, weight=self.weight, backend=self.capture.config.backend
        )


class EagerCrossAttnProcessor(_CaptureProcessor):
    """The eager baseline: explicit ``softmax(q kᵀ·scale)`` ``[B, H, N, T]`` in every call, per-call maps in a list.

    Stores ``mean_h probs[rows][..., tokens]`` as ``[B', K, N]`` fp32 per layer per step (memory grows with the step
    count, as in prompt-to-prompt's ``AttentionStore``); :meth:`MapCapture.maps` averages them at the end.
    """

    def _attend(self, q, k, v, maps, rows, tokens):
        scale = q.shape[-1] ** -0.5
        scores = torch.matmul(q, k.transpose(-1, -2)) * scale  # [B, H, N, T]
        probs = torch.softmax(scores.float(), dim=-1)
        out = torch.matmul(probs.to(q.dtype), v)
        pm = probs.mean(dim=1)  # [B, N, T]
        if rows is not None:
            pm = pm[rows]
        pm = pm.gather(2, tokens[:, None, :].expand(-1, pm.shape[1], -1))  # [B', N, K]
        self.capture._store.append((self.resolution, self.weight, pm.transpose(1, 2).contiguous()))
        return out


# ----------------------------------------------------------------------------------------------------------------------
# The capture
# ----------------------------------------------------------------------------------------------------------------------


class MapCapture:
    """Installs capture processors on every cross-attention layer of ``unet`` and owns the per-resolution maps.

    Args:
        unet: a diffusers ``UNet2DConditionModel`` (SD 1.x/2.x layout).
        config: :class:`CaptureConfig`.
        batch_size: prompts per UNet call ``B`` (the UNet sees ``2B`` rows under classifier-free guidance).
        num_rows: ``B'``, map rows: ``B`` for ``rows="cond"``; the UNet batch (``2B`` with guidance) for ``"all"``.
        tokens: int64 ``[B', K]``: for each map row, the token positions (in the encoded prompt, 0..76) to keep.
        latent_hw: latent grid ``(h, w)`` of this run (image size / VAE scale factor).
        device: where the accumulators live (the UNet's device).
        processor: ``"fused"`` (:class:`FusedCrossAttnProcessor`) or ``"eager"`` (:class:`EagerCrossAttnProcessor`).

    Memory (fused): ``sum over captured levels of B'·K·h·w·4`` bytes, allocated here once, independent of the steps.
    """

    def __init__(
        self,
        unet: torch.nn.Module,
        config: CaptureConfig,
        *,
        batch_size: int,
        num_rows: int,
        tokens: torch.Tensor,
        latent_hw: tuple[int, int],
        device: torch.device | str,
        processor: str = "fused",
    ):
        if not isinstance(config, CaptureConfig):
            raise ValueError(f"config must be a CaptureConfig, got {type(config).__name__}")
        for arg, val in (("batch_size", batch_size), ("num_rows", num_rows)):
            if not isinstance(val, int) or isinstance(val, bool) or val < 1:
                raise ValueError(f"MapCapture: {arg} must be a positive int, got {val!r}")
        if config.rows == "cond" and num_rows != batch_size:
            raise ValueError(f"MapCapture: rows='cond' needs num_rows == batch_size, got {num_rows} and {batch_size}")
        if config.rows == "all" and num_rows not in (batch_size, 2 * batch_size):
            raise ValueError(
                f"MapCapture: rows='all' needs num_rows = batch_size ({batch_size}, no guidance) or 2*batch_size "
                f"({2 * batch_size}, guidance), got {num_rows}"
            )
        try:
            lh, lw = (int(x) for x in latent_hw)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"MapCapture: latent_hw must be (h, w), got {latent_hw!r}") from exc
        if lh < 1 or lw < 1:
            raise ValueError(f"MapCapture: latent_hw must be positive, got {latent_hw!r}")
        if processor not in PROCESSORS:
            raise ValueError(f"MapCapture: processor must be one of {PROCESSORS}, got {processor!r}")

        self.config = config
        self.batch_size = batch_size
        self.num_rows = num_rows
        self.latent_hw = (lh, lw)
        self.device = torch.device(device)
        self.processor = processor

        layers = cross_attention_layers(unet)
        native = _native_side(unet, self.latent_hw)
        res_of_level = {lvl: native >> lvl for lvl in sorted({lvl for _, lvl in layers.values()})}
        available = tuple(res_of_level.values())
        if config.resolutions is None:
            wanted = available[:DEFAULT_NUM_LEVELS]
        else:
            missing = [r for r in config.resolutions if r not in available]
            if missing:
                raise ValueError(
                    f"MapCapture: resolutions {missing} have no cross-attention layer in this UNet; available: "
                    f"{list(available)} (grid sides at its native sample size {native})"
                )
            wanted = config.resolutions
        # {resolution: (h, w)} of the captured levels, finest first.
        self.grids: dict[int, tuple[int, int]] = {
            res: grid_at_level(self.latent_hw, lvl) for lvl, res in res_of_level.items() if res in wanted
        }

        # Batch rows of the UNet call that accumulate, per UNet batch size (built once: no allocation per call).
        B = batch_size
        if config.rows == "cond":
            # [uncond, cond] under guidance (diffusers concatenates in this order): the second half; all rows without.
            self._rows = {2 * B: torch.arange(B, 2 * B, device=self.device), B: None}
        else:
            self._rows = {num_rows: None}

        self._tokens: torch.Tensor | None = None
        self._acc: dict[int, torch.Tensor] = {}
        self._weight_sum: dict[int, float] = {}
        self._store: list[tuple[int, float, torch.Tensor]] = []  # eager processor only
        self._step_active: bool | None = None
        self._set_tokens(tokens)

        cls = FusedCrossAttnProcessor if processor == "fused" else EagerCrossAttnProcessor
        self._originals: dict[str, tuple[torch.nn.Module, Any]] = {}
        self.layers: dict[str, _CaptureProcessor] = {}
        for name, (module, lvl) in layers.items():
            res = res_of_level[lvl]
            weight = config.layer_weight(name)
            proc = cls(self, name, res if res in self.grids else None, grid_at_level(self.latent_hw, lvl), weight)
            self._originals[name] = (module, module.processor)
            module.set_processor(proc)
            self.layers[name] = proc

    # -- batch / step control (host-side Python only) ------------------------------------------------------------------

    def _set_tokens(self, tokens: torch.Tensor) -> None:
        if not isinstance(tokens, torch.Tensor) or tokens.dtype != torch.int64 or tokens.dim() != 2:
            what = f"{tokens.dtype} {tuple(tokens.shape)}" if isinstance(tokens, torch.Tensor) else type(tokens)
            raise ValueError(f"MapCapture: tokens must be an int64 tensor [B', K], got {what}")
        if tokens.shape[0] != self.num_rows or tokens.shape[1] < 1:
            raise ValueError(
                f"MapCapture: tokens must be [B', K] with B' = num_rows = {self.num_rows} and K >= 1, "
                f"got {tuple(tokens.shape)}"
            )
        if tokens.device.type == "cpu" and bool((tokens < 0).any()):  # checked only where it costs no device sync
            raise ValueError(f"MapCapture: token positions must be >= 0, got {tokens.tolist()}")
        K = tokens.shape[1]
        if self._tokens is not None and self._tokens.shape == tokens.shape:
            self._tokens.copy_(tokens)  # same buffers: addresses stay fixed from batch to batch
            for acc in self._acc.values():
                acc.zero_()
        else:
            self._tokens = tokens.to(self.device).clone()
            # The eager processor keeps per-call maps instead (that is the memory cost it demonstrates).
            self._acc = {
                res: torch.zeros(self.num_rows, K, h * w, dtype=torch.float32, device=self.device)
                for res, (h, w) in self.grids.items()
                if self.processor == "fused"
            }
        self._weight_sum = dict.fromkeys(self.grids, 0.0)
        self._store.clear()

    def reset(self, tokens: torch.Tensor | None = None) -> None:
        """Start a new batch: zero the maps, and take new token positions ``[B', K]`` if given.

        A new ``K`` reallocates the accumulators; the same shape reuses them.
        """
        self._set_tokens(self._tokens if tokens is None else tokens)
        self._step_active = None

    def set_step(self, i: int, num_steps: int) -> None:
        """The sampler is about to run denoising step ``i`` of ``num_steps`` (0-based): decides the timestep window."""
        if not (isinstance(i, int) and isinstance(num_steps, int) and 0 <= i < num_steps):
            raise ValueError(f"MapCapture.set_step: need ints 0 <= i < num_steps, got i={i!r}, num_steps={num_steps!r}")
        start, end = self.config.window
        self._step_active = start <= i / num_steps < end

    def step_callback(self, num_steps: int):
        """A ``callback_on_step_end`` for diffusers pipelines: after step ``i`` it announces step ``i + 1``.

        Call ``set_step(0, num_steps)`` before the pipeline call (the callback runs after each step).
        """

        def callback(pipe, i, t, callback_kwargs):
            if i + 1 < num_steps:
                self.set_step(i + 1, num_steps)
            return callback_kwargs

        return callback

    def _target(self, proc: _CaptureProcessor, batch: int, n_queries: int):
        """Called by a processor for each cross-attention call: ``(maps, rows, tokens)`` to capture into, or None."""
        if proc.resolution is None or proc.weight == 0.0:
            return None
        if self._step_active is None:
            if self.config.window != (0.0, 1.0):
                raise RuntimeError(
                    "MapCapture: a timestep window is configured but set_step() was not called before the UNet ran"
                )
        elif not self._step_active:
            return None
        h, w = proc.grid
        if n_queries != h * w:
            raise ValueError(
                f"{proc.name}: {n_queries} queries, but latent_hw={self.latent_hw} puts a {h}x{w} grid at this level; "
                "pass the latent size of this run to MapCapture"
            )
        if batch not in self._rows:
            raise ValueError(
                f"{proc.name}: UNet batch of {batch} rows, but MapCapture expects {sorted(self._rows)} "
                f"(batch_size={self.batch_size}, rows={self.config.rows!r}, num_rows={self.num_rows})"
            )
        self._weight_sum[proc.resolution] += proc.weight
        return self._acc.get(proc.resolution), self._rows[batch], self._tokens

    # -- results ------------------------------------------------------------------------------------------------------

    def maps(self) -> dict[int, torch.Tensor]:
        """``{resolution: [B', K, h, w]}`` fp32: the weighted mean over the captured layers and steps.

        Raises when a resolution received no call (UNet not run since ``reset``, or no step inside the window).
        """
        out = {}
        for res, (h, w) in self.grids.items():
            total = self._weight_sum[res]
            if total == 0.0:
                raise RuntimeError(
                    f"MapCapture: nothing was captured at resolution {res} since the last reset (was the UNet run, "
                    f"with a step inside the window {self.config.window}?)"
                )
            if self.processor == "fused":
                mean = self._acc[res] / total
            else:
                parts = [wt * m for r, wt, m in self._store if r == res]
                mean = torch.stack(parts).sum(0) / total
            out[res] = mean.view(self.num_rows, -1, h, w)
        return out

    def memory_bytes(self) -> int:
        """Bytes held for the maps: accumulators, token/row index tensors and (eager) the stored per-call maps."""
        tensors = [*self._acc.values(), self._tokens, *(r for r in self._rows.values() if r is not None)]
        tensors += [m for _, _, m in self._store]
        return sum(t.numel() * t.element_size() for t in tensors)

    @property
    def tokens(self) -> torch.Tensor:
        """The current token positions ``[B', K]`` (on the capture's device)."""
        return self._tokens

    def remove(self) -> None:
        """Put back every cross-attention layer's original processor (idempotent)."""
        for module, original in self._originals.values():
            module.set_processor(original)
        self._originals = {}

    def __enter__(self) -> MapCapture:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()
