"""Cross-attention that also accumulates the head-mean attention probabilities into caller-owned maps.

``out = softmax(q kᵀ·scale) v`` exactly like ``F.scaled_dot_product_attention(q, k, v, scale=scale)``, and in the
same pass ``maps[i] += weight · mean_h softmax(q kᵀ·scale)[rows[i], h]`` (transposed to ``[T, N]``, optionally only the
token columns ``tokens[i]``). This is the cross-attention of a text-to-image UNet (T = 77 CLIP tokens) with the
Free-ATM mask capture folded in: the ``[B, H, N, T]`` probability tensor that an eager capture materialises is never
written to memory by the Triton (or CUDA) path.

Triton design (one launch, no atomics, deterministic):

* grid ``(cdiv(N, BLOCK_N), B)``: one program per batch row and block of ``BLOCK_N`` queries; the heads are a loop
  inside the program so that the head mean of the probabilities builds up in registers.
* per head, all keys of the head are in one ``T_PAD`` tile (``T <= 256``), so the softmax is exact in one step (no
  online rescaling): ``s = q kᵀ`` in fp32 accumulated over head-dim chunks of 32 (D=40/80/160 pad to 64/96/160, not
  to 64/128/256), ``p = exp2(s·scale·log2e - max)``, then ``out = (p @ v) / sum(p)`` one head-dim chunk at a time,
  cast once to the output dtype on store.
* the map accumulator ``[BLOCK_N, T_PAD]`` (or ``[BLOCK_N, K_PAD]`` with ``tokens``) stays in registers across the
  head loop and is added to ``maps`` with one read-modify-write per program. Each ``(map row, query)`` belongs to
  exactly one program, hence no atomics and bitwise reproducible results. Batch rows that do not accumulate
  (``row_of_batch[b] < 0``, e.g. the unconditional half under classifier-free guidance) skip it.
* with ``tokens``, the selected columns are recomputed rather than gathered from registers (Triton cannot index a
  register tile by a runtime vector): ``p_sel = exp2(q k_selᵀ·scale·log2e - max) / sum`` with the row max and sum of
  the full softmax, one extra ``[BLOCK_N, D] x [D, K_PAD]`` dot per head (only for accumulating rows), and the map
  write shrinks to K columns.

Block sizes come from one helper, :func:`_launch_config`, whose table was read off ptxas's register/spill report for
sm_90 (the kernel compiles for a GPU target on a machine without one); timings need a GPU (bench/).
"""

import math
from functools import cache

import torch

from . import _backend
from ._backend import HAS_TRITON, TRITON_INTERPRET, next_power_of_2

if HAS_TRITON:
    import triton
    import triton.language as tl

OP_NAME = "cross_attention_with_maps"
MAX_T = 256  # keys of one head fit a single register/shared-memory tile: exact softmax without rescaling
MAX_D = 256  # head dims up to 256 (SD uses 40/80/160, processed in chunks of 32: padded to 64/96/160)
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_LOG2E = 1.4426950408889634


# ----------------------------------------------------------------------------------------------------------------------
# Eager reference (the definition of truth, and the "eager capture" benchmark baseline)
# ----------------------------------------------------------------------------------------------------------------------


def _probs_and_out(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float):
    """Materialised attention like diffusers' ``AttnProcessor``: scores in the input dtype, softmax in fp32 (or fp64).

    Returns ``p [B, H, N, T]`` (fp32, fp64 for fp64 inputs) and ``out [B, H, N, D]`` in q's dtype.
    """
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    p = torch.softmax(s.to(torch.promote_types(s.dtype, torch.float32)), dim=-1)
    out = torch.matmul(p.to(q.dtype), v)
    return p, out


def cross_attention_with_maps_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    maps: torch.Tensor,
    *,
    scale: float | None = None,
    rows: torch.Tensor | None = None,
    tokens: torch.Tensor | None = None,
    weight: float = 1.0,
) -> torch.Tensor:
    """Plain eager version of :func:`cross_attention_with_maps`; materialises the probabilities ``[B, H, N, T]``.

    q ``[B, H, N, D]``, k/v ``[B, H, T, D]`` (fp16/bf16/fp32, or fp64 for a high-precision truth), maps ``[B', T, N]``
    or ``[B', K, N]`` (fp32, or fp64), rows int64 ``[B']`` (default ``arange(B)``), tokens int64 ``[B', K]``.
    Adds ``weight * mean_h p[rows]`` (token columns ``tokens`` when given) into ``maps`` in place and returns the
    attention output ``[B, H, N, D]`` in q's dtype.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    p, out = _probs_and_out(q, k, v, scale)
    pm = p.mean(dim=1)  # [B, N, T]
    if rows is not None:
        pm = pm[rows]
    if tokens is not None:
        pm = pm.gather(2, tokens[:, None, :].expand(-1, pm.shape[1], -1))  # [B', N, K]
    maps += weight * pm.transpose(1, 2).to(maps.dtype)
    return out


def _cross_attention_with_maps_torch(q, k, v, maps, row_of_batch, tokens, scale: float, weight: float):
    """The torch backend of the custom op: the reference's math, addressed through ``row_of_batch`` without syncing."""
    T, N = k.shape[2], q.shape[2]
    p, out = _probs_and_out(q, k, v, scale)
    if maps.shape[0] == 0:
        return out
    pm = p.mean(dim=1).transpose(1, 2)  # [B, T, N]
    idx = row_of_batch.clamp(min=0)
    if tokens is not None:
        tok = tokens.clamp(0, T - 1)[idx]  # [B, K]: the token ids of each batch row's map row
        pm = pm.gather(1, tok[:, :, None].expand(-1, -1, N))
    # where(), not a multiply by the mask: NaN/inf in a non-accumulating row must not leak into map row 0.
    contrib = torch.where((row_of_batch >= 0)[:, None, None], weight * pm, 0.0).to(maps.dtype)
    maps.index_add_(0, idx, contrib)
    return out


# ----------------------------------------------------------------------------------------------------------------------
# Validation (host side, shapes/dtypes/devices only: checking index values would synchronise with the device)
# ----------------------------------------------------------------------------------------------------------------------


def _check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[int, int, int, int, int]:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{OP_NAME}: {name} must be a tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{OP_NAME}: {name} must be 4-D [B, H, len, D], got shape {tuple(t.shape)}")
    if q.dtype not in _DTYPES:
        raise ValueError(f"{OP_NAME}: q must be float16, bfloat16 or float32, got {q.dtype}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"{OP_NAME}: q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"{OP_NAME}: q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    B, H, N, D = q.shape
    T = k.shape[2]
    if k.shape != (B, H, T, D) or v.shape != k.shape:
        raise ValueError(
            f"{OP_NAME}: expected k and v of shape [B, H, T, D] = [{B}, {H}, T, {D}] matching q {tuple(q.shape)}, "
            f"got k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if min(B, H, N, D) < 1:
        raise ValueError(f"{OP_NAME}: q must have no empty dimension, got shape {tuple(q.shape)}")
    if not 1 <= T <= MAX_T:
        raise ValueError(f"{OP_NAME}: the number of keys T must be in [1, {MAX_T}], got T={T} (k {tuple(k.shape)})")
    if D > MAX_D:
        raise ValueError(f"{OP_NAME}: head dim D must be <= {MAX_D}, got D={D} (q {tuple(q.shape)})")
    return B, H, N, T, D


def _check_index(name: str, t: torch.Tensor | None, dim: int, device: torch.device) -> None:
    if t is None:
        return
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{OP_NAME}: {name} must be an int64 tensor, got {type(t).__name__}")
    if t.dtype != torch.int64 or t.dim() != dim:
        raise ValueError(f"{OP_NAME}: {name} must be a {dim}-D int64 tensor, got {t.dtype} of shape {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{OP_NAME}: {name} must be on the device of q ({device}), got {t.device}")


def _check_maps_and_tokens(maps, tokens, n_map_rows: int | None, T: int, N: int, device: torch.device) -> None:
    """maps ``[B', T or K, N]`` fp32 contiguous, tokens int64 ``[B', K]``; ``n_map_rows=None`` takes B' from maps."""
    if not isinstance(maps, torch.Tensor) or maps.dim() != 3:
        what = tuple(maps.shape) if isinstance(maps, torch.Tensor) else type(maps).__name__
        raise ValueError(f"{OP_NAME}: maps must be a 3-D float32 tensor [B', T or K, N], got {what}")
    if maps.dtype != torch.float32 or maps.device != device or not maps.is_contiguous():
        raise ValueError(
            f"{OP_NAME}: maps must be a contiguous float32 tensor on {device} (accumulated in place), got "
            f"{maps.dtype} on {maps.device}, contiguous={maps.is_contiguous()}"
        )
    if n_map_rows is None:
        n_map_rows = maps.shape[0]
    _check_index("tokens", tokens, 2, device)
    if tokens is not None and (tokens.shape[0] != n_map_rows or not 1 <= tokens.shape[1] <= T):
        raise ValueError(
            f"{OP_NAME}: tokens must be [B', K] with B'={n_map_rows} map rows and 1 <= K <= T={T}, "
            f"got {tuple(tokens.shape)}"
        )
    cols = T if tokens is None else tokens.shape[1]
    if maps.shape != (n_map_rows, cols, N):
        what = "T" if tokens is None else "K"
        raise ValueError(
            f"{OP_NAME}: maps must be [B', {what}, N] = [{n_map_rows}, {cols}, {N}], got {tuple(maps.shape)}"
        )


# ----------------------------------------------------------------------------------------------------------------------
# Triton kernel
# ----------------------------------------------------------------------------------------------------------------------

if HAS_TRITON:

    @triton.jit
    def _dot(a, b, acc, DOT_FP32: tl.constexpr):
        # acc + a [M, C] @ b [C, P], fp32 [M, P]. DOT_FP32: fp32 operands with IEEE products (fp32 inputs must match
        # the reference to 1e-5, which TF32 would not; and under the interpreter, where tl.dot on bf16 returns
        # garbage). Otherwise a and b share a 16-bit dtype and the tensor cores accumulate in fp32.
        if DOT_FP32:
            c = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        else:
            c = tl.dot(a, b, acc)
        return c

    # each pointer on one line with its strides: formatter off for the signature
    # fmt: off
    @triton.jit
    def _cross_attention_with_maps_fwd_kernel(
        # q/k/v/o: the strides of the first three dims come divided by ALIGN (see below), the last one as is
        q_ptr, stride_qb, stride_qh, stride_qn, stride_qd,  # [B, H, N, D] any strides
        k_ptr, stride_kb, stride_kh, stride_kt, stride_kd,  # [B, H, T, D] any strides
        v_ptr, stride_vb, stride_vh, stride_vt, stride_vd,  # [B, H, T, D] any strides
        o_ptr, stride_ob, stride_oh, stride_on, stride_od,  # [B, H, N, D] output, q's dtype
        maps_ptr, stride_mb, stride_mc, stride_mn,  # [B', T or K, N] fp32, accumulated in place
        row_of_batch_ptr,  # [B] int64: map row of batch row b, -1 = b does not accumulate
        tokens_ptr, stride_tb, stride_tk,  # [B', K] int64 token ids (read only when HAS_TOKENS)
        H, N, T, K,
        qk_scale,  # scale * log2(e): the softmax runs on exp2
        map_scale,  # weight / H: head mean and weight in one multiply
        D: tl.constexpr,  # head dim, compile-time: `offs_d < D` is then known constant over runs of 8 lanes for
        # D=40, so q/k/v/out move in 16-byte vectors instead of one element per address
        D_CHUNK: tl.constexpr,  # the head dim is processed in chunks of D_CHUNK (see _launch_config)
        BLOCK_N: tl.constexpr,  # queries per program
        T_PAD: tl.constexpr,  # next power of two >= max(T, 16) (tl.dot needs >= 16)
        K_PAD: tl.constexpr,  # next power of two >= max(K, 16)
        HAS_TOKENS: tl.constexpr,
        DOT_FP32: tl.constexpr,
        ALIGN: tl.constexpr,  # power of two (<= 16) dividing every q/k/v/o stride except the last
    ):
        # fmt: on
        # Triton only learns that an int argument is divisible by 16, so the row stride 40 of a contiguous D=40 tensor,
        # or the head stride 40 of diffusers' [B, N, H*D] views, would make it assume unaligned rows and fall back to
        # one 2-byte load per element. Multiplying by the constexpr ALIGN here proves 8-element (16-byte) alignment.
        stride_qb, stride_qh, stride_qn = stride_qb * ALIGN, stride_qh * ALIGN, stride_qn * ALIGN
        stride_kb, stride_kh, stride_kt = stride_kb * ALIGN, stride_kh * ALIGN, stride_kt * ALIGN
        stride_vb, stride_vh, stride_vt = stride_vb * ALIGN, stride_vh * ALIGN, stride_vt * ALIGN
        stride_ob, stride_oh, stride_on = stride_ob * ALIGN, stride_oh * ALIGN, stride_on * ALIGN
        D_CHUNKS: tl.constexpr = (D + D_CHUNK - 1) // D_CHUNK

        pid_n = tl.program_id(0)
        b = tl.program_id(1).to(tl.int64)
        offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
        offs_t = tl.arange(0, T_PAD)
        n_mask = offs_n < N
        t_mask = offs_t < T

        map_row = tl.load(row_of_batch_ptr + b)
        accumulate = map_row >= 0
        map_row = tl.maximum(map_row, 0)  # keeps every address valid on the non-accumulating path

        if HAS_TOKENS:
            offs_k = tl.arange(0, K_PAD)
            k_mask = offs_k < K
            tok = tl.load(tokens_ptr + map_row * stride_tb + offs_k * stride_tk, mask=k_mask & accumulate, other=0)
            tok = tl.minimum(tl.maximum(tok, 0), T - 1)  # out-of-range ids are clamped, never read out of bounds
            map_acc = tl.zeros([BLOCK_N, K_PAD], dtype=tl.float32)
        else:
            map_acc = tl.zeros([BLOCK_N, T_PAD], dtype=tl.float32)

        # Per-head base pointers (scalars, advanced by the head stride: 64-bit pointer arithmetic, no int32 product).
        q_head = q_ptr + b * stride_qb
        k_head = k_ptr + b * stride_kb
        v_head = v_ptr + b * stride_vb
        o_head = o_ptr + b * stride_ob
        for _h in range(H):
            # s = q kᵀ, accumulated over the head-dim chunks: [BLOCK_N, T_PAD] fp32
            s = tl.zeros([BLOCK_N, T_PAD], dtype=tl.float32)
            for c in tl.static_range(D_CHUNKS):
                offs_d = c * D_CHUNK + tl.arange(0, D_CHUNK)
                d_mask = offs_d < D
                q = tl.load(
                    q_head + offs_n[:, None] * stride_qn + offs_d[None, :] * stride_qd,
                    mask=n_mask[:, None] & d_mask[None, :], other=0.0,
                )  # fmt: skip
                kt = tl.load(
                    k_head + offs_t[:, None] * stride_kt + offs_d[None, :] * stride_kd,
                    mask=t_mask[:, None] & d_mask[None, :], other=0.0,
                )  # fmt: skip
                s = _dot(q, tl.trans(kt), s, DOT_FP32)
            s = tl.where(t_mask[None, :], s * qk_scale, float("-inf"))  # log2 units
            m = tl.max(s, axis=1)
            p = tl.exp2(s - m[:, None])
            inv_l = 1.0 / tl.sum(p, axis=1)

            # out = p v / sum(p), one head-dim chunk at a time; p enters the tensor cores in the input dtype, as in
            # flash attention (fp32 when DOT_FP32).
            if DOT_FP32:
                p_op = p
            else:
                p_op = p.to(v_ptr.dtype.element_ty)
            for c in tl.static_range(D_CHUNKS):
                offs_d = c * D_CHUNK + tl.arange(0, D_CHUNK)
                d_mask = offs_d < D
                vt = tl.load(
                    v_head + offs_t[:, None] * stride_vt + offs_d[None, :] * stride_vd,
                    mask=t_mask[:, None] & d_mask[None, :], other=0.0,
                )  # fmt: skip
                o = _dot(p_op, vt, tl.zeros([BLOCK_N, D_CHUNK], dtype=tl.float32), DOT_FP32) * inv_l[:, None]
                tl.store(
                    o_head + offs_n[:, None] * stride_on + offs_d[None, :] * stride_od,
                    o.to(o_ptr.dtype.element_ty), mask=n_mask[:, None] & d_mask[None, :],
                )  # fmt: skip

            if HAS_TOKENS:
                if accumulate:
                    # recompute the kept columns: q k_selᵀ with k_sel = k[tokens] (q chunks come back from L1/L2)
                    s_sel = tl.zeros([BLOCK_N, K_PAD], dtype=tl.float32)
                    for c in tl.static_range(D_CHUNKS):
                        offs_d = c * D_CHUNK + tl.arange(0, D_CHUNK)
                        d_mask = offs_d < D
                        q = tl.load(
                            q_head + offs_n[:, None] * stride_qn + offs_d[None, :] * stride_qd,
                            mask=n_mask[:, None] & d_mask[None, :], other=0.0,
                        )  # fmt: skip
                        k_sel = tl.load(
                            k_head + tok[:, None] * stride_kt + offs_d[None, :] * stride_kd,
                            mask=k_mask[:, None] & d_mask[None, :], other=0.0,
                        )  # fmt: skip
                        s_sel = _dot(q, tl.trans(k_sel), s_sel, DOT_FP32)
                    map_acc += tl.exp2(s_sel * qk_scale - m[:, None]) * inv_l[:, None]
            else:
                map_acc += p * inv_l[:, None]

            q_head += stride_qh
            k_head += stride_kh
            v_head += stride_vh
            o_head += stride_oh

        if accumulate:
            if HAS_TOKENS:
                offs_c = offs_k
                c_mask = k_mask
            else:
                offs_c = offs_t
                c_mask = t_mask
            # maps is [B', C, N] with N contiguous: the [BLOCK_N, C] tile is stored coalesced along the queries.
            m_ptrs = maps_ptr + map_row * stride_mb + offs_c[None, :] * stride_mc + offs_n[:, None] * stride_mn
            nc_mask = n_mask[:, None] & c_mask[None, :]
            old = tl.load(m_ptrs, mask=nc_mask, other=0.0)
            tl.store(m_ptrs, old + map_acc * map_scale, mask=nc_mask)


@cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _launch_config(
    N: int, B: int, T_PAD: int, has_tokens: bool, fp32: bool, device: torch.device
) -> tuple[int, int, int]:
    """(BLOCK_N, num_warps, num_stages) for one launch: the one place that chooses block sizes.

    What limits a program is registers: the scores/probabilities ``[BLOCK_N, T_PAD]`` and, without tokens, the map
    accumulator of the same size stay live across the head loop (the head-dim chunks keep q/k/v/out small). The table
    comes from compiling the kernel for sm_90 (Triton 3.8, ptxas register/spill report, no GPU needed), fp16 and bf16
    alike:

    * T_PAD <= 64: BLOCK_N=128, 8 warps (T_PAD=16/32: 56-108 registers).
    * T_PAD = 128 (CLIP's 77): all tokens 64 rows / 8 warps (233-248 registers, no spill; 4 warps: 255), kept tokens
      64 / 4 (148-199 registers, no spill). 128 rows reach 255 registers; wgmma wants 64 rows per warp group.
    * T_PAD = 256: all tokens 16 / 4 (242-255 registers, <= 32 bytes of spill except 300 for D=16; every 64-row wgmma
      variant spills >= 536 bytes), kept tokens 64 / 8 (253-255 registers, <= 8 bytes of spill).
    * fp32 (IEEE dots on the FMA units: for accuracy, not speed): T_PAD <= 64 128 / 8 (181-255 registers, no spill),
      else 16 / 8 (360-700 bytes of spill at T_PAD=128, ~1.8 KB at 256); 32 or 64 rows fall into a 32-register
      mode with 5-16 KB of stack per thread.

    On a GPU, BLOCK_N is then halved (down to 16, with 4 warps below 64 rows) while the grid has fewer programs than
    SMs: SD's 8x8 latent level has N=64, so B=16 would otherwise leave 116 of an H100's 132 SMs idle. One pipeline
    stage: software pipelining of the head-dim chunks took shared memory from 12-16 KB to 87-255 KB per program
    (over the 227 KB limit for D=160), whereas small programs let several share an SM and hide the load latency.
    """
    if T_PAD <= 64:
        block_n, num_warps = 128, 8
    elif fp32:
        block_n, num_warps = 16, 8
    elif T_PAD <= 128:
        block_n, num_warps = (64, 4) if has_tokens else (64, 8)
    else:
        block_n, num_warps = (64, 8) if has_tokens else (16, 4)
    if device.type == "cuda":
        sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device())
        while block_n > 16 and triton.cdiv(N, block_n) * B < sms:
            block_n //= 2
            if block_n < 64:
                num_warps = 4  # fewer rows than a warp group's wgmma tile: mma.sync with 4 warps
    return block_n, num_warps, 1


def _stride_alignment(*tensors: torch.Tensor) -> int:
    """Largest power of two <= 16 dividing every stride but the last of each tensor (16 elements = 32 bytes in fp16)."""
    g = 0
    for t in tensors:
        for st in t.stride()[:-1]:
            g = math.gcd(g, st)
    align = 16
    while align > 1 and g % align:
        align //= 2
    return align


def _cross_attention_with_maps_triton(q, k, v, maps, row_of_batch, tokens, scale: float, weight: float):
    """Host launcher of the Triton kernel. Shapes as in :func:`cross_attention_with_maps`; returns out ``[B,H,N,D]``."""
    B, H, N, T, D = _check_qkv(q, k, v)
    ok, why = _backend.triton_usable_on(q.device)
    if not ok:
        raise ValueError(f"{OP_NAME}: the Triton backend cannot run on {q.device} tensors: {why}")
    _check_index("row_of_batch", row_of_batch, 1, q.device)
    if row_of_batch.shape[0] != B:
        raise ValueError(f"{OP_NAME}: row_of_batch must be [B] = [{B}], got {tuple(row_of_batch.shape)}")
    _check_maps_and_tokens(maps, tokens, None, T, N, q.device)

    out = torch.empty((B, H, N, D), dtype=q.dtype, device=q.device)
    has_tokens = tokens is not None
    K = tokens.shape[1] if has_tokens else 1
    T_PAD = max(16, next_power_of_2(T))
    K_PAD = max(16, next_power_of_2(K))
    # Head dim in chunks of 32: D=40/80/160 pad to 64/96/160 instead of the next powers of two 64/128/256, and only
    # a [BLOCK_N, 32] slice of q and out is live at a time.
    D_CHUNK = 16 if D <= 16 else 32
    BLOCK_N, num_warps, num_stages = _launch_config(N, B, T_PAD, has_tokens, q.dtype == torch.float32, q.device)
    tok = tokens if has_tokens else row_of_batch  # any int64 pointer; never read when HAS_TOKENS is False
    grid = (triton.cdiv(N, BLOCK_N), B)
    align = _stride_alignment(q, k, v, out)
    _cross_attention_with_maps_fwd_kernel[grid](
        q, *(st // align for st in q.stride()[:3]), q.stride(3),
        k, *(st // align for st in k.stride()[:3]), k.stride(3),
        v, *(st // align for st in v.stride()[:3]), v.stride(3),
        out, *(st // align for st in out.stride()[:3]), out.stride(3),
        maps, *maps.stride(),
        row_of_batch,
        tok, tok.stride(0), tok.stride(-1),
        H, N, T, K,
        scale * _LOG2E,
        weight / H,
        D=D, D_CHUNK=D_CHUNK, BLOCK_N=BLOCK_N, T_PAD=T_PAD, K_PAD=K_PAD,
        HAS_TOKENS=has_tokens,
        DOT_FP32=TRITON_INTERPRET or q.dtype == torch.float32,
        ALIGN=align,
        num_warps=num_warps, num_stages=num_stages,
    )  # fmt: skip
    return out


# ----------------------------------------------------------------------------------------------------------------------
# Custom op, dispatch, public function
# ----------------------------------------------------------------------------------------------------------------------


@torch.library.custom_op("freeatm::cross_attention_with_maps", mutates_args=("maps",))
def _cross_attention_with_maps_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    maps: torch.Tensor,
    row_of_batch: torch.Tensor,
    tokens: torch.Tensor | None,
    scale: float,
    weight: float,
    backend: str,
) -> torch.Tensor:
    """Registered op: ``backend`` is already resolved ("torch" | "triton" | "cuda"); returns out ``[B, H, N, D]``."""
    if backend == "auto":
        backend = _resolve_backend("auto", q.device)
    if backend == "torch":
        return _cross_attention_with_maps_torch(q, k, v, maps, row_of_batch, tokens, scale, weight)
    if backend == "triton":
        return _cross_attention_with_maps_triton(q, k, v, maps, row_of_batch, tokens, scale, weight)
    if backend == "cuda":
        if not _backend.extension_has(OP_NAME):  # also loads the extension, which registers torch.ops.freeatm_C
            raise ValueError(f"{OP_NAME}: backend='cuda' needs freeatm_kernels._C: {_backend.extension_error()}")
        return torch.ops.freeatm_C.cross_attention_with_maps(q, k, v, maps, row_of_batch, tokens, scale, weight)
    raise ValueError(f"{OP_NAME}: unknown backend {backend!r}")


@_cross_attention_with_maps_op.register_fake
def _(q, k, v, maps, row_of_batch, tokens, scale, weight, backend):
    return q.new_empty(q.shape)  # contiguous [B, H, N, D] in q's dtype, like every backend returns


@torch.compiler.assume_constant_result
def _resolve_backend(backend: str, device: torch.device) -> str:
    # Evaluated once at trace time under torch.compile (the extension probe imports a module, which dynamo would
    # otherwise break the graph on); the result depends only on the string and the device.
    return _backend.resolve_backend(OP_NAME, backend, device, has_cuda_impl=True)


def _row_of_batch(rows: torch.Tensor | None, B: int, device: torch.device) -> torch.Tensor:
    """int64 ``[B]``: the map row that batch row b accumulates into, -1 where none. Tensor ops only (no sync).

    Values of ``rows`` outside ``[0, B)`` match no batch row, so that map row is left untouched; when a batch row is
    listed twice, only its last map row accumulates (``rows`` is meant to hold distinct rows).
    """
    if rows is None:
        return torch.arange(B, device=device)
    n_rows = rows.shape[0]
    if n_rows == 0:
        return torch.full((B,), -1, dtype=torch.int64, device=device)
    match = rows[None, :] == torch.arange(B, device=device)[:, None]  # [B, B']
    return torch.where(match, torch.arange(n_rows, device=device)[None, :], -1).amax(dim=1)


def cross_attention_with_maps(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    maps: torch.Tensor,
    *,
    scale: float | None = None,
    rows: torch.Tensor | None = None,
    tokens: torch.Tensor | None = None,
    weight: float = 1.0,
    backend: str = "auto",
) -> torch.Tensor:
    """Attention output of ``q`` over ``k``/``v``, plus ``weight * mean_h softmax(q kᵀ·scale)`` added into ``maps``.

    Args:
        q: ``[B, H, N, D]`` queries (fp16, bf16 or fp32; any strides, e.g. diffusers' transposed head views).
        k, v: ``[B, H, T, D]`` keys/values, same dtype and device as q, ``1 <= T <= 256``, ``D <= 256``.
        maps: fp32 contiguous accumulator, ``[B', T, N]``, or ``[B', K, N]`` with ``tokens``; updated in place:
            ``maps[i, c, n] += weight * mean_h p[rows[i], h, n, tokens[i, c] (or c)]``.
        scale: softmax scale, default ``1/sqrt(D)`` (as ``F.scaled_dot_product_attention``).
        rows: int64 ``[B']`` on q's device, the batch rows that accumulate (default all B, ``B' = B``), e.g. the
            conditional half under classifier-free guidance. Should be distinct and in ``[0, B)``: values are not
            checked on the host (that would synchronise); a value outside the range leaves its map row untouched.
        tokens: int64 ``[B', K]`` on q's device, the token columns kept for each map row (repeats and any order
            allowed, ``K <= T``); ids outside ``[0, T)`` are clamped by the Triton/torch backends.
        weight: scalar multiplying the head mean (e.g. 1 / number of layers and steps averaged).
        backend: "auto" (CUDA extension, else Triton on GPU tensors, else torch), "torch", "triton" or "cuda".

    Returns:
        ``[B, H, N, D]`` contiguous, q's dtype: ``F.scaled_dot_product_attention(q, k, v, scale=scale)``.

    Inference only: no autograd (raises when q, k or v requires grad with grad mode on). No host synchronisation.
    """
    B, H, N, T, D = _check_qkv(q, k, v)
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        raise ValueError(f"{OP_NAME} is inference only (no backward); call it under torch.no_grad()")
    _check_index("rows", rows, 1, q.device)
    n_map_rows = B if rows is None else rows.shape[0]
    _check_maps_and_tokens(maps, tokens, n_map_rows, T, N, q.device)
    scale = D**-0.5 if scale is None else float(scale)
    if not math.isfinite(scale) or not math.isfinite(float(weight)):
        raise ValueError(f"{OP_NAME}: scale and weight must be finite, got scale={scale}, weight={weight}")
    resolved = _resolve_backend(backend, q.device)
    row_of_batch = _row_of_batch(rows, B, q.device)
    return _cross_attention_with_maps_op(q, k, v, maps, row_of_batch, tokens, scale, float(weight), resolved)
