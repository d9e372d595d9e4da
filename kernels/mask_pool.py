"""``mask_pool``: average feature vectors under soft object masks (DESIGN.md §3.2).

For every image ``b`` and mask ``k`` the masks are area-downsampled to the feature resolution and
the features are averaged under them::

    m[b,k,p]      = mean of masks[b,k] over the sh x sw block of pixel p   (sh = H // h, sw = W // w)
    pooled[b,k,:] = sum_p m[b,k,p] * f[b,:,p] / (sum_p m[b,k,p] + eps)    -> [B,K,C], features dtype
    mass[b,k]     = mean_p m[b,k,p]                                       -> [B,K], float32

Where ``sum_p m + eps == 0`` (an empty mask with ``eps=0``) the pooled vector is defined as 0, never NaN.
The op is differentiable in ``features``; the masks are treated as constants (no gradient flows to
them even when they require grad). The backward is ``grad_f[b,:,p] = sum_k w[b,k,p] * g[b,k,:]`` with
``w = m / (sum_p m + eps)`` (0 for empty masks): each element of ``grad_features`` is written by exactly
one program, no atomics, so it is bitwise deterministic.

Backends: ``torch`` (the eager reference :func:`mask_pool_reference`), ``triton`` (the kernels below),
``cuda`` (``torch.ops.freeatm_C.mask_pool_forward`` / ``mask_pool_backward`` from ``csrc/``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch

from . import _backend
from ._backend import HAS_TRITON, TRITON_INTERPRET, next_power_of_2

if HAS_TRITON:
    import triton
    import triton.language as tl

FEATURE_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
KERNEL_FEATURE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # Triton and CUDA; fp64 runs on "torch" only
MASK_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.uint8, torch.bool)
# K masks live in one register tile of the Triton kernels (K_PAD rows, K_PAD * BLOCK_P <= 4096 with
# BLOCK_P >= 16); 256 objects per image is far beyond what the generator produces (K <= 16).
TRITON_MAX_K = 256


# ----------------------------------------------------------------------------------------------------------------
# Reference (the definition of truth)
# ----------------------------------------------------------------------------------------------------------------


def _mask_values(masks: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Masks as values in [0, 1] in ``dtype``: uint8 is read as value/255, bool as 0/1, floats as they are."""
    m = masks.detach().to(dtype)
    if masks.dtype == torch.uint8:
        m = m / 255
    return m


def _downsampled_masks(masks: torch.Tensor, h: int, w: int, dtype: torch.dtype) -> torch.Tensor:
    """[B,K,H,W] masks -> [B,K,h*w] area-downsampled (mean over each sh x sw block) in ``dtype``."""
    B, K, H, W = masks.shape
    sh, sw = H // h, W // w
    m = _mask_values(masks, dtype).reshape(B, K, h, sh, w, sw).mean(dim=(3, 5))
    return m.reshape(B, K, h * w)


def _accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def mask_pool_reference(
    features: torch.Tensor, masks: torch.Tensor, *, eps: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager reference of :func:`mask_pool`; differentiable in ``features`` through plain autograd.

    features: [B,C,h,w] float; masks: [B,K,H,W] float in [0,1], uint8 (value/255) or bool, H % h == W % w == 0.
    Returns pooled [B,K,C] (features dtype) and mass [B,K] (float32).

    The mask weights and denominators are computed in fp32 (fp64 for fp64 features); the weighted sum
    over pixels is a ``bmm`` in the features dtype, as an eager user would write it.
    """
    B, C, h, w = features.shape
    acc = _accumulate_dtype(features.dtype)
    m = _downsampled_masks(masks, h, w, acc)  # [B,K,P]
    msum = m.sum(dim=-1)  # [B,K]
    den = msum + eps
    mass = m.mean(dim=-1).float()
    num = torch.bmm(m.to(features.dtype), features.reshape(B, C, h * w).transpose(1, 2))  # [B,K,C]
    # An empty mask pools to 0 (num is 0 there, so this changes no value). Excluding it from the division also
    # keeps its gradient at 0: with eps=1e-6 the gradient of num would be 1e6 * g, which overflows fp16 and turns
    # into inf * 0 = NaN in the bmm backward. Dividing by a safe denominator keeps the unused branch finite.
    nonzero = (den > 0) & (msum > 0)
    pooled = torch.where(nonzero[..., None], num.to(acc) / torch.where(nonzero, den, 1.0)[..., None], 0.0)
    return pooled.to(features.dtype), mass


def _mask_pool_backward_torch(
    grad_pooled: torch.Tensor, features: torch.Tensor, masks: torch.Tensor, eps: float
) -> torch.Tensor:
    """grad_features [B,C,h,w] = sum_k w[b,k,p] g[b,k,c], in fp32 (fp64), same memory layout as ``features``."""
    B, C, h, w = features.shape
    acc = _accumulate_dtype(features.dtype)
    m = _downsampled_masks(masks, h, w, acc)  # [B,K,P]
    den = m.sum(dim=-1) + eps
    nonzero = den > 0
    inv = torch.where(nonzero, 1.0 / torch.where(nonzero, den, 1.0), 0.0)
    weights = m * inv[..., None]  # [B,K,P]
    grad = torch.bmm(weights.transpose(1, 2), grad_pooled.to(acc))  # [B,P,C]
    out = torch.empty_like(features)  # keeps channels_last when the features are channels_last
    out.copy_(grad.transpose(1, 2).reshape(B, C, h, w))
    return out


# ----------------------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------------------

if HAS_TRITON:

    @triton.jit
    def _mask_tile(
        m_ptr,  # masks of one image, [K, H, W], already offset to the batch row
        stride_mk,
        stride_mh,
        stride_mw,
        p_start,
        K,
        P,
        w,
        SH,
        SW,
        value_scale,  # 1/255 for uint8 (or 1 for bool, floats) divided by SH*SW: turns the block sum into a mean
        K_PAD: tl.constexpr,
        BLOCK_P: tl.constexpr,
    ):
        """Area-downsampled masks of pixels p_start .. p_start+BLOCK_P: [K_PAD, BLOCK_P] fp32, 0 where k>=K or p>=P."""
        k = tl.arange(0, K_PAD)
        p = p_start + tl.arange(0, BLOCK_P)
        valid = (k[:, None] < K) & (p[None, :] < P)
        ph = p // w
        pw = p % w
        base = k[:, None] * stride_mk + (ph * SH * stride_mh + pw * SW * stride_mw)[None, :]
        acc = tl.zeros([K_PAD, BLOCK_P], dtype=tl.float32)
        # one gather of the whole tile per sub-pixel of the SH x SW block (64 for 56x56 -> 7x7): the image's
        # masks (K*H*W, 25 KB as uint8 for K=8 at 56x56) stay in L1/L2, so the strided reads cost little
        for i in range(SH):
            for j in range(SW):
                v = tl.load(m_ptr + base + (i * stride_mh + j * stride_mw), mask=valid, other=0)
                acc += v.to(tl.float32)
        return acc * value_scale

    @triton.jit
    def _dot_acc(a, b, acc, INTERPRET: tl.constexpr):
        """acc + a @ b, accumulated in fp32; a and b share the features dtype.

        fp32: exact fp32 products ("ieee", not tf32, for the 1e-5 tolerance). fp16/bf16: 16-bit tensor cores,
        the mask weights rounded to the features dtype exactly like the eager ``bmm`` of the reference.
        The interpreter's tl.dot mis-computes bf16 (numpy has no bf16), so there the operands go up to fp32,
        which keeps the numerics: products of two 16-bit values are exact in fp32.
        """
        if INTERPRET:
            return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        else:
            return tl.dot(a, b, acc, input_precision="ieee")

    @triton.jit
    def _pixel_offsets(p, w, stride_h, stride_w, FLAT_P: tl.constexpr):
        """Offsets of pixels p (flattened h*w index) in a [.., h, w] tensor; FLAT_P when stride_h == w * stride_w."""
        if FLAT_P:
            # contiguous NCHW (stride_w == 1, specialised by Triton) keeps the pixel axis provably contiguous
            return p * stride_w
        else:
            return (p // w) * stride_h + (p % w) * stride_w

    @triton.jit
    def _mask_pool_fwd_kernel(
        f_ptr,  # features [B, C, h, w], any strides
        stride_fb,
        stride_fc,
        stride_fh,
        stride_fw,
        m_ptr,  # masks [B, K, H, W]: fp32/fp16/bf16/uint8 (bool viewed as uint8)
        stride_mb,
        stride_mk,
        stride_mh,
        stride_mw,
        out_ptr,  # pooled [B, K, C], features dtype
        stride_ob,
        stride_ok,
        stride_oc,
        mass_ptr,  # mass [B, K], fp32
        stride_sb,
        stride_sk,
        C,
        K,
        P,  # h * w
        w,
        SH,
        SW,
        value_scale,
        eps,
        NUM_GROUPS,  # programs per image, each owning a contiguous range of channel blocks
        K_PAD: tl.constexpr,
        BLOCK_P: tl.constexpr,
        BLOCK_C: tl.constexpr,
        NUM_P_BLOCKS: tl.constexpr,
        FLAT_P: tl.constexpr,
        INTERPRET: tl.constexpr,
    ):
        # 1-D grid of B * NUM_GROUPS programs; the groups of one image are adjacent so that they run together
        # and their re-reads of the image's masks hit L2
        pid = tl.program_id(0)
        b = pid // NUM_GROUPS
        group = pid % NUM_GROUPS
        num_cb = tl.cdiv(C, BLOCK_C)
        cb_start = group * num_cb // NUM_GROUPS
        cb_end = (group + 1) * num_cb // NUM_GROUPS

        b64 = b.to(tl.int64)  # B * C * h * w may exceed 2**31; offsets inside one image stay int32
        f_ptr += b64 * stride_fb
        m_ptr += b64 * stride_mb
        out_ptr += b64 * stride_ob

        k = tl.arange(0, K_PAD)
        c_loc = tl.arange(0, BLOCK_C)
        p_loc = tl.arange(0, BLOCK_P)

        if NUM_P_BLOCKS == 1:
            # all pixels in one tile (P <= BLOCK_P, e.g. 7x7 -> 64): downsample the masks once, reuse for every C block
            m = _mask_tile(m_ptr, stride_mk, stride_mh, stride_mw, 0, K, P, w, SH, SW, value_scale, K_PAD, BLOCK_P)
            den = tl.sum(m, axis=1)  # [K_PAD]
            m_op = m.to(f_ptr.dtype.element_ty)
            f_pix = _pixel_offsets(p_loc, w, stride_fh, stride_fw, FLAT_P)
            for cb in range(cb_start, cb_end):
                c = cb * BLOCK_C + c_loc
                f = tl.load(
                    f_ptr + f_pix[:, None] + c[None, :] * stride_fc,
                    mask=(p_loc[:, None] < P) & (c[None, :] < C),
                    other=0.0,
                )  # [BLOCK_P, BLOCK_C]
                acc = _dot_acc(m_op, f, tl.zeros([K_PAD, BLOCK_C], dtype=tl.float32), INTERPRET)  # [K_PAD, BLOCK_C]
                d = den + eps
                pooled = tl.where(d[:, None] > 0, acc / tl.where(d > 0, d, 1.0)[:, None], 0.0)
                tl.store(
                    out_ptr + k[:, None] * stride_ok + c[None, :] * stride_oc,
                    pooled.to(out_ptr.dtype.element_ty),
                    mask=(k[:, None] < K) & (c[None, :] < C),
                )
        else:
            # large maps (e.g. 56x56 = 3136 pixels): accumulate over pixel tiles; the mask tiles are recomputed for
            # every channel block (C / BLOCK_C times, from L2) rather than held for all P
            den = tl.zeros([K_PAD], dtype=tl.float32)
            for cb in range(cb_start, cb_end):
                c = cb * BLOCK_C + c_loc
                acc = tl.zeros([K_PAD, BLOCK_C], dtype=tl.float32)
                den = tl.zeros([K_PAD], dtype=tl.float32)
                for pb in range(NUM_P_BLOCKS):
                    p = pb * BLOCK_P + p_loc
                    m = _mask_tile(
                        m_ptr, stride_mk, stride_mh, stride_mw, pb * BLOCK_P, K, P, w, SH, SW, value_scale, K_PAD,
                        BLOCK_P,
                    )  # fmt: skip
                    den += tl.sum(m, axis=1)
                    f_pix = _pixel_offsets(p, w, stride_fh, stride_fw, FLAT_P)
                    f = tl.load(
                        f_ptr + f_pix[:, None] + c[None, :] * stride_fc,
                        mask=(p[:, None] < P) & (c[None, :] < C),
                        other=0.0,
                    )
                    acc = _dot_acc(m.to(f_ptr.dtype.element_ty), f, acc, INTERPRET)
                d = den + eps
                pooled = tl.where(d[:, None] > 0, acc / tl.where(d > 0, d, 1.0)[:, None], 0.0)
                tl.store(
                    out_ptr + k[:, None] * stride_ok + c[None, :] * stride_oc,
                    pooled.to(out_ptr.dtype.element_ty),
                    mask=(k[:, None] < K) & (c[None, :] < C),
                )

        if group == 0:
            tl.store(mass_ptr + b64 * stride_sb + k * stride_sk, den / P, mask=k < K)

    @triton.jit
    def _store_grad_block(
        wt,  # [BLOCK_P, K_PAD] weights m / (den + eps), transposed, in the features dtype
        p,  # [BLOCK_P] pixel indices
        c,  # [BLOCK_C] channel indices
        g_ptr,
        stride_gk,
        stride_gc,
        df_ptr,
        stride_dc,
        stride_dh,
        stride_dw,
        C,
        K,
        P,
        w,
        K_PAD: tl.constexpr,
        BLOCK_P: tl.constexpr,
        BLOCK_C: tl.constexpr,
        FLAT_P: tl.constexpr,
        INTERPRET: tl.constexpr,
    ):
        k = tl.arange(0, K_PAD)
        g = tl.load(
            g_ptr + k[:, None] * stride_gk + c[None, :] * stride_gc,
            mask=(k[:, None] < K) & (c[None, :] < C),
            other=0.0,
        ).to(df_ptr.dtype.element_ty)  # [K_PAD, BLOCK_C]
        grad = _dot_acc(wt, g, tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32), INTERPRET)  # [BLOCK_P, BLOCK_C]
        d_pix = _pixel_offsets(p, w, stride_dh, stride_dw, FLAT_P)
        tl.store(
            df_ptr + d_pix[:, None] + c[None, :] * stride_dc,
            grad.to(df_ptr.dtype.element_ty),
            mask=(p[:, None] < P) & (c[None, :] < C),
        )

    @triton.jit
    def _mask_pool_bwd_kernel(
        g_ptr,  # grad_pooled [B, K, C], any strides (an expanded grad has stride 0)
        stride_gb,
        stride_gk,
        stride_gc,
        m_ptr,  # masks [B, K, H, W]
        stride_mb,
        stride_mk,
        stride_mh,
        stride_mw,
        df_ptr,  # grad_features [B, C, h, w], the features' layout
        stride_db,
        stride_dc,
        stride_dh,
        stride_dw,
        C,
        K,
        P,
        w,
        SH,
        SW,
        value_scale,
        eps,
        NUM_GROUPS,  # programs per image: over channel blocks (one pixel tile) or over pixel tiles (several)
        K_PAD: tl.constexpr,
        BLOCK_P: tl.constexpr,
        BLOCK_C: tl.constexpr,
        NUM_P_BLOCKS: tl.constexpr,
        FLAT_P: tl.constexpr,
        INTERPRET: tl.constexpr,
    ):
        pid = tl.program_id(0)
        b = pid // NUM_GROUPS
        group = pid % NUM_GROUPS
        num_cb = tl.cdiv(C, BLOCK_C)

        b64 = b.to(tl.int64)
        g_ptr += b64 * stride_gb
        m_ptr += b64 * stride_mb
        df_ptr += b64 * stride_db

        c_loc = tl.arange(0, BLOCK_C)
        p_loc = tl.arange(0, BLOCK_P)

        if NUM_P_BLOCKS == 1:
            m = _mask_tile(m_ptr, stride_mk, stride_mh, stride_mw, 0, K, P, w, SH, SW, value_scale, K_PAD, BLOCK_P)
            d = tl.sum(m, axis=1) + eps
            inv = tl.where(d > 0, 1.0 / tl.where(d > 0, d, 1.0), 0.0)
            wt = tl.trans(m * inv[:, None]).to(df_ptr.dtype.element_ty)  # [BLOCK_P, K_PAD]
            cb_start = group * num_cb // NUM_GROUPS
            cb_end = (group + 1) * num_cb // NUM_GROUPS
            for cb in range(cb_start, cb_end):
                _store_grad_block(
                    wt, p_loc, cb * BLOCK_C + c_loc, g_ptr, stride_gk, stride_gc, df_ptr, stride_dc, stride_dh,
                    stride_dw, C, K, P, w, K_PAD, BLOCK_P, BLOCK_C, FLAT_P, INTERPRET,
                )  # fmt: skip
        else:
            # the denominators need every pixel: one pass over the image's masks, then the program's pixel tiles
            den = tl.zeros([K_PAD], dtype=tl.float32)
            for pb in range(NUM_P_BLOCKS):
                m = _mask_tile(
                    m_ptr, stride_mk, stride_mh, stride_mw, pb * BLOCK_P, K, P, w, SH, SW, value_scale, K_PAD, BLOCK_P
                )
                den += tl.sum(m, axis=1)
            d = den + eps
            inv = tl.where(d > 0, 1.0 / tl.where(d > 0, d, 1.0), 0.0)
            pb_start = group * NUM_P_BLOCKS // NUM_GROUPS
            pb_end = (group + 1) * NUM_P_BLOCKS // NUM_GROUPS
            for pb in range(pb_start, pb_end):
                m = _mask_tile(
                    m_ptr, stride_mk, stride_mh, stride_mw, pb * BLOCK_P, K, P, w, SH, SW, value_scale, K_PAD, BLOCK_P
                )
                wt = tl.trans(m * inv[:, None]).to(df_ptr.dtype.element_ty)
                for cb in range(0, num_cb):
                    _store_grad_block(
                        wt, pb * BLOCK_P + p_loc, cb * BLOCK_C + c_loc, g_ptr, stride_gk, stride_gc, df_ptr,
                        stride_dc, stride_dh, stride_dw, C, K, P, w, K_PAD, BLOCK_P, BLOCK_C, FLAT_P, INTERPRET,
                    )  # fmt: skip


# ----------------------------------------------------------------------------------------------------------------
# Host launchers
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MaskPoolLaunch:
    """Block sizes and grid of one Triton launch (chosen by :func:`_launch_config`)."""

    k_pad: int  # masks per tile, >= 16 because tl.dot needs every dimension >= 16
    block_p: int  # pixels per tile
    block_c: int  # channels per tile
    num_p_blocks: int  # ceil(P / block_p); 1 selects the single-tile kernel path
    groups: int  # programs per image (grid = B * groups)
    num_warps: int


@lru_cache(maxsize=8)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _launch_config(
    B: int,
    K: int,
    C: int,
    P: int,
    device: torch.device,
    *,
    backward: bool,
    block_p: int | None = None,
    groups: int | None = None,
) -> MaskPoolLaunch:
    """Choose tile sizes, programs per image and warps for one launch.

    - ``k_pad = max(16, next_pow2(K))``: all K masks in one tile; tl.dot needs every dimension >= 16.
    - ``block_p``: the downsampled-mask tile [k_pad, block_p] holds at most 4096 fp32 values (32 registers per
      thread at 4 warps), so that ResNet C5 (7x7 -> 64) and C4 (14x14 -> 256) maps with K <= 16 fit one tile and
      their masks are downsampled once per program; larger maps (56x56, 64x64) loop over pixel tiles.
    - ``block_c``: the feature tile [block_p, block_c] holds at most 8192 values (64 KB fp32 across the CTA):
      128 channels for P <= 64, 32 channels for P <= 256; never wider than C needs.
    - ``num_warps``: 4, or 8 when the feature tile exceeds 4096 values, keeping ~32 fp32 values per thread.
    - ``groups``: one program per image streams its features sequentially; with B=256 on a 132-SM H100 that is
      < 2 CTAs per SM, too few loads in flight for a memory-bound op. Split each image over channel blocks (or,
      in the tiled backward, over pixel tiles) until there are ~4 programs per SM; every split re-reads the
      image's masks (from L2: adjacent programs). Under the interpreter programs run serially: 1 group.
    ``block_p`` / ``groups`` override the choice (tests use them to reach every code path on small shapes).
    """
    k_pad = max(16, next_power_of_2(K))
    if block_p is None:
        block_p = min(max(16, next_power_of_2(P)), max(16, 4096 // k_pad))
    if block_p < 16 or block_p & (block_p - 1):
        raise ValueError(f"mask_pool: block_p must be a power of two >= 16, got {block_p}")
    block_c = min(max(16, min(128, 8192 // block_p)), max(16, next_power_of_2(C)))
    num_p_blocks = math.ceil(P / block_p)
    num_c_blocks = math.ceil(C / block_c)
    # the tiled backward splits pixel tiles across programs; every other launch splits channel blocks
    max_groups = num_p_blocks if (backward and num_p_blocks > 1) else num_c_blocks
    if groups is None:
        if device.type == "cuda":
            target_programs = 4 * _sm_count(device.index if device.index is not None else torch.cuda.current_device())
            groups = min(max_groups, max(1, math.ceil(target_programs / B)))
        else:
            groups = 1
    if not 1 <= groups <= max_groups:
        raise ValueError(f"mask_pool: groups must be in [1, {max_groups}] for this shape, got {groups}")
    num_warps = 4 if block_p * block_c <= 4096 else 8
    return MaskPoolLaunch(k_pad, block_p, block_c, num_p_blocks, groups, num_warps)


def _kernel_masks(masks: torch.Tensor) -> tuple[torch.Tensor, float]:
    """The masks as the kernel reads them and the factor that maps a stored value to [0, 1].

    bool is viewed as uint8 without a copy (True = 1 -> 1.0), uint8 is scaled by 1/255, floats by 1.
    """
    if masks.dtype == torch.bool:
        return masks.view(torch.uint8), 1.0
    if masks.dtype == torch.uint8:
        return masks, 1.0 / 255.0
    return masks, 1.0


def _check_triton_inputs(features: torch.Tensor, masks: torch.Tensor) -> None:
    if not HAS_TRITON:
        raise ValueError(f"mask_pool: backend='triton' needs triton ({_backend.TRITON_IMPORT_ERROR})")
    if features.dtype not in KERNEL_FEATURE_DTYPES:
        raise ValueError(
            f"mask_pool: the Triton kernels take features in {KERNEL_FEATURE_DTYPES}, got {features.dtype} "
            "(use backend='torch' for float64)"
        )
    if masks.shape[1] > TRITON_MAX_K:
        raise ValueError(
            f"mask_pool: the Triton kernels take at most {TRITON_MAX_K} masks, got masks {tuple(masks.shape)}"
        )
    for name, t in (("features", features), ("masks", masks)):
        # offsets inside one image are int32 (the batch offset is int64)
        span = sum((s - 1) * abs(st) for s, st in zip(t.shape[1:], t.stride()[1:], strict=True))
        if span >= 2**31:
            raise ValueError(f"mask_pool: one image of {name} {tuple(t.shape)} spans {span} elements (>= 2**31)")


def _flat_pixels(t: torch.Tensor) -> bool:
    """Whether pixel p of t [B,C,h,w] sits at p * stride_w (contiguous NCHW and channels_last both do)."""
    h, w = t.shape[2], t.shape[3]
    return h == 1 or t.stride(2) == w * t.stride(3)


def _mask_pool_fwd_triton(
    features: torch.Tensor, masks: torch.Tensor, eps: float, launch: MaskPoolLaunch | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton forward: pooled [B,K,C] (features dtype) and mass [B,K] fp32; any feature / mask strides."""
    _check_triton_inputs(features, masks)
    B, C, h, w = features.shape
    K, H, W = masks.shape[1:]
    P = h * w
    if launch is None:
        launch = _launch_config(B, K, C, P, features.device, backward=False)
    m, value_scale = _kernel_masks(masks)
    sh, sw = H // h, W // w
    pooled = torch.empty((B, K, C), dtype=features.dtype, device=features.device)
    mass = torch.empty((B, K), dtype=torch.float32, device=features.device)
    _mask_pool_fwd_kernel[(B * launch.groups,)](
        features, *features.stride(),
        m, *m.stride(),
        pooled, *pooled.stride(),
        mass, *mass.stride(),
        C, K, P, w, sh, sw, value_scale / (sh * sw), float(eps), launch.groups,
        K_PAD=launch.k_pad,
        BLOCK_P=launch.block_p,
        BLOCK_C=launch.block_c,
        NUM_P_BLOCKS=launch.num_p_blocks,
        FLAT_P=_flat_pixels(features),
        INTERPRET=TRITON_INTERPRET,
        num_warps=launch.num_warps,
    )  # fmt: skip
    return pooled, mass


def _mask_pool_bwd_triton(
    grad_pooled: torch.Tensor,
    features: torch.Tensor,
    masks: torch.Tensor,
    eps: float,
    launch: MaskPoolLaunch | None = None,
) -> torch.Tensor:
    """Triton backward: grad_features [B,C,h,w] in the features' dtype and memory layout."""
    _check_triton_inputs(features, masks)
    B, C, h, w = features.shape
    K, H, W = masks.shape[1:]
    P = h * w
    if launch is None:
        launch = _launch_config(B, K, C, P, features.device, backward=True)
    m, value_scale = _kernel_masks(masks)
    sh, sw = H // h, W // w
    grad_features = torch.empty_like(features)  # preserves channels_last (and any dense layout)
    _mask_pool_bwd_kernel[(B * launch.groups,)](
        grad_pooled, *grad_pooled.stride(),
        m, *m.stride(),
        grad_features, *grad_features.stride(),
        C, K, P, w, sh, sw, value_scale / (sh * sw), float(eps), launch.groups,
        K_PAD=launch.k_pad,
        BLOCK_P=launch.block_p,
        BLOCK_C=launch.block_c,
        NUM_P_BLOCKS=launch.num_p_blocks,
        FLAT_P=_flat_pixels(grad_features),
        INTERPRET=TRITON_INTERPRET,
        num_warps=launch.num_warps,
    )  # fmt: skip
    return grad_features


# ----------------------------------------------------------------------------------------------------------------
# Validation, dispatch, custom ops, autograd
# ----------------------------------------------------------------------------------------------------------------


def _validate(features: torch.Tensor, masks: torch.Tensor, eps: float) -> None:
    if not isinstance(features, torch.Tensor) or not isinstance(masks, torch.Tensor):
        raise ValueError(f"mask_pool: features and masks must be tensors, got {type(features)} and {type(masks)}")
    if features.dim() != 4 or masks.dim() != 4:
        raise ValueError(
            f"mask_pool: features must be [B,C,h,w] and masks [B,K,H,W], got features {tuple(features.shape)} "
            f"and masks {tuple(masks.shape)}"
        )
    if features.dtype not in FEATURE_DTYPES:
        raise ValueError(f"mask_pool: features must have a dtype in {FEATURE_DTYPES}, got {features.dtype}")
    if masks.dtype not in MASK_DTYPES:
        raise ValueError(f"mask_pool: masks must have a dtype in {MASK_DTYPES}, got {masks.dtype}")
    if features.device != masks.device:
        raise ValueError(f"mask_pool: features are on {features.device} but masks on {masks.device}")
    B, C, h, w = features.shape
    Bm, K, H, W = masks.shape
    if Bm != B:
        raise ValueError(f"mask_pool: batch sizes differ: features {tuple(features.shape)}, masks {tuple(masks.shape)}")
    if min(B, C, h, w, K) == 0:
        raise ValueError(f"mask_pool: empty inputs: features {tuple(features.shape)}, masks {tuple(masks.shape)}")
    if H % h or W % w:
        raise ValueError(
            f"mask_pool: mask size must be an integer multiple of the feature size, got masks {tuple(masks.shape)} "
            f"(H={H}, W={W}) for features {tuple(features.shape)} (h={h}, w={w})"
        )
    if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps >= 0):
        raise ValueError(f"mask_pool: eps must be a finite float >= 0, got {eps!r}")


# The compiled ops the CUDA path of mask_pool needs (csrc/freeatm_ops.cpp).
EXT_OPS = ("mask_pool_forward", "mask_pool_backward")


def _resolve(backend: str, features: torch.Tensor) -> str:
    """The concrete backend for these features; called inside the custom ops, so at run time, never while
    torch.compile traces (the extension check imports a module, which dynamo refuses to trace).

    Neither kernel takes fp64 features: ``auto`` runs them on "torch", an explicit "triton" / "cuda" raises
    ValueError.
    """
    device = features.device
    kernel_dtype = features.dtype in KERNEL_FEATURE_DTYPES
    if backend == "auto" and not kernel_dtype:
        return "torch"
    resolved = _backend.resolve_backend("mask_pool", backend, device, has_cuda_impl=True, ext_ops=EXT_OPS)
    if resolved != "torch" and not kernel_dtype:
        raise ValueError(
            f"mask_pool: backend={resolved!r} takes features in {KERNEL_FEATURE_DTYPES}, got {features.dtype}"
        )
    return resolved


@torch.library.custom_op("freeatm::mask_pool", mutates_args=())
def _mask_pool_op(
    features: torch.Tensor, masks: torch.Tensor, eps: float, backend: str
) -> tuple[torch.Tensor, torch.Tensor]:
    which = _resolve(backend, features)
    if which == "torch":
        pooled, mass = mask_pool_reference(features, masks, eps=eps)
        return pooled.contiguous(), mass.contiguous()
    if which == "triton":
        return _mask_pool_fwd_triton(features, masks, eps)
    # the extension reads contiguous masks: copy only when they are not
    return torch.ops.freeatm_C.mask_pool_forward(features, masks.contiguous(), eps)


@_mask_pool_op.register_fake
def _mask_pool_fake(features, masks, eps, backend):
    B, C = features.shape[:2]
    K = masks.shape[1]
    return features.new_empty((B, K, C)), features.new_empty((B, K), dtype=torch.float32)


@torch.library.custom_op("freeatm::mask_pool_backward", mutates_args=())
def _mask_pool_backward_op(
    grad_pooled: torch.Tensor, features: torch.Tensor, masks: torch.Tensor, eps: float, backend: str
) -> torch.Tensor:
    B, C = features.shape[:2]
    K = masks.shape[1]
    if tuple(grad_pooled.shape) != (B, K, C) or grad_pooled.dtype != features.dtype:
        raise ValueError(
            f"mask_pool_backward: grad_pooled must be [B,K,C]={(B, K, C)} in {features.dtype}, got "
            f"{tuple(grad_pooled.shape)} in {grad_pooled.dtype}"
        )
    which = _resolve(backend, features)
    if which == "torch":
        return _mask_pool_backward_torch(grad_pooled, features, masks, eps)
    if which == "triton":
        return _mask_pool_bwd_triton(grad_pooled, features, masks, eps)
    return torch.ops.freeatm_C.mask_pool_backward(grad_pooled, features, masks.contiguous(), eps)


@_mask_pool_backward_op.register_fake
def _mask_pool_backward_fake(grad_pooled, features, masks, eps, backend):
    return torch.empty_like(features)


def _setup_context(ctx, inputs, output):
    features, masks, eps, backend = inputs
    # features only for their shape / layout (autograd keeps them alive anyway); masks to recompute the weights
    ctx.save_for_backward(features, masks)
    ctx.eps = eps
    ctx.backend = backend
    ctx.mark_non_differentiable(output[1])  # mass depends on the masks only


def _backward(ctx, grad_pooled, grad_mass):
    features, masks = ctx.saved_tensors
    grad_features = None
    if ctx.needs_input_grad[0] and grad_pooled is not None:
        grad_features = torch.ops.freeatm.mask_pool_backward(grad_pooled, features, masks, ctx.eps, ctx.backend)
    return grad_features, None, None, None


_mask_pool_op.register_autograd(_backward, setup_context=_setup_context)


def mask_pool(
    features: torch.Tensor, masks: torch.Tensor, *, eps: float = 1e-6, backend: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Average ``features`` under each of K soft masks, the masks area-downsampled to the feature map inside.

    Args:
        features: [B, C, h, w] float32 / float16 / bfloat16 (float64: torch backend only; auto picks it), any
            strides (contiguous or channels_last). Differentiable.
        masks: [B, K, H, W] float32 / float16 / bfloat16 in [0, 1], uint8 (read as value/255) or bool, with H and
            W integer multiples of h and w. Treated as constants: no gradient flows to them.
        eps: >= 0, added to the denominator. Where ``sum_p m + eps == 0`` the pooled vector is 0.
        backend: "auto" | "torch" | "triton" | "cuda" (see ``freeatm_kernels._backend.resolve_backend``).

    Returns:
        pooled: [B, K, C] in the features dtype, ``sum_p m[b,k,p] f[b,:,p] / (sum_p m[b,k,p] + eps)``.
        mass: [B, K] float32, ``mean_p m[b,k,p]`` (the share of the image each mask covers); not differentiable.
    """
    _validate(features, masks, eps)
    if backend not in _backend.BACKENDS:
        raise ValueError(f"mask_pool: backend must be one of {_backend.BACKENDS}, got {backend!r}")
    # the backend is resolved inside the op (see _resolve): an impossible one raises ValueError when it runs
    return torch.ops.freeatm.mask_pool(features, masks, float(eps), backend)


__all__ = ["mask_pool", "mask_pool_reference", "MaskPoolLaunch"]
