"""Guided MAE masking (``select_patches``) and token gathering (``gather_tokens``), DESIGN.md §3.3.

``select_patches`` picks, per image, which of the L patches an MAE encoder sees. Of ``num_masked`` masked patches,
``g = num_guided_patches(num_masked, guided_fraction)`` are the most important ones (importance from the free
cross-attention masks, ties broken at random) and the other ``num_masked - g`` are uniform at random among the rest.
``guided_fraction=0`` is exactly MAE's random masking; the outputs have MAE's layout::

    ids_keep    int64   [B, L - num_masked]   patch indices the encoder sees, in shuffled order
    ids_restore int64   [B, L]                position of each patch in the shuffled order (unshuffles the decoder)
    mask        float32 [B, L]                1 = masked, 0 = kept (float, for MAE's ``(loss*mask).sum()/mask.sum()``)

How the randomness enters: the public function draws ``noise = torch.rand(B, L)`` (fp32, the same draw as MAE's
``torch.rand(N, L)``, so a seeded generator reproduces MAE bit for bit) and hands it to the custom op
``freeatm::select_patches``, which is deterministic given the noise. The op orders the patches by

    guided set  = the g largest (importance, noise, -index) lexicographically  (ties in importance -> larger noise)
    ids_shuffle = patches in ascending (guided, noise, index) order             (guided last, so they are masked)

and keeps the first ``L - num_masked``. With g = 0 the order is ``argsort(noise)``: MAE's random masking. Since the
unguided patches come first in noise order, the non-guided masked patches are a uniformly random subset of the
non-guided ones. (The lexicographic key is what ``noise + 1.0 * guided`` means, without the fp32 rounding that adding
1.0 to a noise value in [0, 1) would cause.) NaN importance ranks as ``-inf`` (the lowest; raising would need a host
sync); ``-0.0`` equals ``0.0``. The noise must be free of NaN (``torch.rand`` is).

The Triton kernel runs one program per image row and ranks by counting pairwise comparisons in
``[BLOCK, BLOCK]`` tiles: O(L^2) comparisons per row, 38k for ViT-B/16 (L=196), ~2.5M for L=1568 — cheap next to the
encoder, and deterministic without a sort. Pass 1 (only when g > 0) finds the patch of importance rank g-1 (the
threshold), pass 2 counts for each patch how many patches precede it in the shuffle order: that count is its
``ids_restore`` entry, and ``ids_keep[pos] = i``, ``mask[i] = pos >= L - num_masked`` are written from it. One launch
writes all three outputs; nothing is synchronised with the host.

``gather_tokens(x [B,L,D], ids [B,M]) -> [B,M,D]`` is ``out[b,m] = x[b, ids[b,m]]`` (MAE's
``torch.gather(x, 1, ids[..., None].expand(-1, -1, D))``), differentiable in ``x``. Its backward is a deterministic
scatter: one program per block of destination rows finds, by comparing ids, which source row lands on each destination
row and copies it (zeros where none does); only where a row's ids repeat does it fall back to summing the duplicates in
ascending m order in fp32. No atomics, no zero-fill pass, each element of the gradient written once.
"""

from __future__ import annotations

import math

import torch

from . import _backend

if _backend.HAS_TRITON:
    import triton
    import triton.language as tl

_FLOAT_IMPORTANCE = (torch.float32, torch.float16, torch.bfloat16)
_FLOAT_TOKENS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


# ----------------------------------------------------------------------------------------------------------------
# References (the definition of truth)
# ----------------------------------------------------------------------------------------------------------------


def num_guided_patches(num_masked: int, guided_fraction: float) -> int:
    """How many of ``num_masked`` masked patches are the top-importance ones: ``floor(fraction * num_masked + 0.5)``.

    Round half up (not Python's banker's ``round``): 0.5 of 147 masked patches gives 74, 0.5 of 5 gives 3, so the
    guided share never rounds down on a tie. Computed on the host from Python numbers, so it needs no sync.
    """
    return int(math.floor(guided_fraction * num_masked + 0.5))


def select_patches_reference(
    importance: torch.Tensor, noise: torch.Tensor, num_masked: int, num_guided: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Eager definition of the guided masking, given the noise explicitly (the public op draws it).

    importance [B,L] float, noise [B,L] float32 (uniform [0,1) in use), 0 <= num_guided <= num_masked <= L.
    Returns ids_keep int64 [B, L-num_masked], ids_restore int64 [B,L], mask float32 [B,L] (1 = masked).
    With num_guided=0 this is MAE's ``random_masking`` (argsort of the noise) line for line.
    """
    B, L = importance.shape
    len_keep = L - num_masked
    imp = importance.float()
    imp = torch.where(torch.isnan(imp), torch.full_like(imp, -math.inf), imp)  # NaN ranks lowest
    imp = torch.where(imp == 0, torch.zeros_like(imp), imp)  # -0.0 == 0.0, also for sorts that compare bits

    # Guided set: the num_guided largest (importance, noise, -index). Two stable sorts make the lexicographic order:
    # noise descending (equal noise keeps the smaller index first), then importance descending.
    by_noise = torch.argsort(noise, dim=1, descending=True, stable=True)
    by_imp = torch.argsort(imp.gather(1, by_noise), dim=1, descending=True, stable=True)
    importance_order = by_noise.gather(1, by_imp)
    guided = torch.zeros(B, L, dtype=torch.int8, device=importance.device)
    guided.scatter_(1, importance_order[:, :num_guided], 1)

    # Shuffle order: ascending (guided, noise, index); guided patches come last, hence masked.
    by_noise_asc = torch.argsort(noise, dim=1, stable=True)
    ids_shuffle = by_noise_asc.gather(1, torch.argsort(guided.gather(1, by_noise_asc), dim=1, stable=True))

    # From here on MAE's random_masking verbatim.
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :len_keep].contiguous()
    mask = torch.ones(B, L, dtype=torch.float32, device=importance.device)
    mask[:, :len_keep] = 0
    mask = torch.gather(mask, dim=1, index=ids_restore)
    return ids_keep, ids_restore, mask


def gather_tokens_reference(x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """``out[b,m,:] = x[b, ids[b,m], :]``: x [B,L,D], ids int64 [B,M] -> [B,M,D] (MAE's token gather)."""
    return torch.gather(x, 1, ids.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def gather_tokens_backward_reference(grad_out: torch.Tensor, ids: torch.Tensor, L: int) -> torch.Tensor:
    """Gradient of :func:`gather_tokens_reference` w.r.t. x: grad_out [B,M,D], ids [B,M] -> [B,L,D] (scatter-add)."""
    B, M, D = grad_out.shape
    grad_x = torch.zeros(B, L, D, dtype=grad_out.dtype, device=grad_out.device)
    return grad_x.scatter_add_(1, ids.unsqueeze(-1).expand(-1, -1, D), grad_out)


# ----------------------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------------------

if _backend.HAS_TRITON:

    @triton.jit
    def _lex_less(a1, a2, a3, b1, b2, b3):
        """(a1, a2, a3) < (b1, b2, b3) lexicographically, elementwise (broadcasting)."""
        return (a1 < b1) | ((a1 == b1) & ((a2 < b2) | ((a2 == b2) & (a3 < b3))))

    @triton.jit
    def _load_keys(imp_row, stride_il, noise_row, stride_nl, offs, valid):
        """A tile of one row's sort keys: (-importance with NaN as -inf, noise), both fp32."""
        imp = tl.load(imp_row + offs * stride_il, mask=valid, other=0.0).to(tl.float32)
        neg_imp = -tl.where(imp != imp, float("-inf"), imp)  # NaN ranks lowest; -(-0.0) == -(0.0) compares equal
        noise = tl.load(noise_row + offs * stride_nl, mask=valid, other=0.0)
        return neg_imp, noise

    # fmt: off
    @triton.jit
    def _select_patches_fwd_kernel(
        imp_ptr, stride_ib, stride_il,  # [B, L] fp32/fp16/bf16 importance
        noise_ptr, stride_nb, stride_nl,  # [B, L] fp32 noise
        keep_ptr, stride_kb, stride_kl,  # [B, L - num_masked] int64 out: ids_keep
        restore_ptr, stride_rb, stride_rl,  # [B, L] int64 out: ids_restore
        mask_ptr, stride_mb, stride_ml,  # [B, L] fp32 out: mask (1 = masked)
        L, num_keep, num_guided,
        HAS_GUIDED: tl.constexpr,  # num_guided > 0 (else pass 1 is skipped)
        BLOCK: tl.constexpr,  # patches per tile side; tiles are [BLOCK, BLOCK] comparisons
    ):
        b = tl.program_id(0).to(tl.int64)
        imp_row = imp_ptr + b * stride_ib
        noise_row = noise_ptr + b * stride_nb
        ar = tl.arange(0, BLOCK)

        # Pass 1: the threshold patch t, the one of importance rank num_guided - 1, where the importance order is
        # ascending (-importance, -noise, index): rank[i] = #{j : (-imp_j, -n_j, j) < (-imp_i, -n_i, i)}.
        t = 0
        if HAS_GUIDED:
            t_acc = tl.zeros([BLOCK], dtype=tl.int32)
            for i0 in range(0, L, BLOCK):
                offs_i = i0 + ar
                valid_i = offs_i < L
                ki, ni = _load_keys(imp_row, stride_il, noise_row, stride_nl, offs_i, valid_i)
                rank = tl.zeros([BLOCK], dtype=tl.int32)
                for j0 in range(0, L, BLOCK):
                    offs_j = j0 + ar
                    valid_j = offs_j < L
                    kj, nj = _load_keys(imp_row, stride_il, noise_row, stride_nl, offs_j, valid_j)
                    before = _lex_less(kj[None, :], -nj[None, :], offs_j[None, :], ki[:, None], -ni[:, None],
                                       offs_i[:, None])
                    rank += tl.sum((before & valid_j[None, :]).to(tl.int32), axis=1)
                t_acc += tl.where(valid_i & (rank == num_guided - 1), offs_i, 0)
            t = tl.sum(t_acc, axis=0)  # exactly one patch has rank num_guided - 1
        kt, nt = _load_keys(imp_row, stride_il, noise_row, stride_nl, t, True)

        # Pass 2: pos[i] = #{j : (guided_j, n_j, j) < (guided_i, n_i, i)}, the place of patch i in the shuffle order.
        # guided <=> importance rank <= rank of t <=> not (t before i in the importance order).
        for i0 in range(0, L, BLOCK):
            offs_i = i0 + ar
            valid_i = offs_i < L
            ki, ni = _load_keys(imp_row, stride_il, noise_row, stride_nl, offs_i, valid_i)
            gi = tl.zeros([BLOCK], dtype=tl.int32)
            if HAS_GUIDED:
                gi = 1 - _lex_less(kt, -nt, t, ki, -ni, offs_i).to(tl.int32)
            pos = tl.zeros([BLOCK], dtype=tl.int32)
            for j0 in range(0, L, BLOCK):
                offs_j = j0 + ar
                valid_j = offs_j < L
                kj, nj = _load_keys(imp_row, stride_il, noise_row, stride_nl, offs_j, valid_j)
                gj = tl.zeros([BLOCK], dtype=tl.int32)
                if HAS_GUIDED:
                    gj = 1 - _lex_less(kt, -nt, t, kj, -nj, offs_j).to(tl.int32)
                before = _lex_less(gj[None, :], nj[None, :], offs_j[None, :], gi[:, None], ni[:, None], offs_i[:, None])
                pos += tl.sum((before & valid_j[None, :]).to(tl.int32), axis=1)
            tl.store(restore_ptr + b * stride_rb + offs_i * stride_rl, pos.to(tl.int64), mask=valid_i)
            tl.store(mask_ptr + b * stride_mb + offs_i * stride_ml, (pos >= num_keep).to(tl.float32), mask=valid_i)
            # pos is a permutation of 0..L-1, so every ids_keep slot has exactly one writer
            tl.store(keep_ptr + b * stride_kb + pos * stride_kl, offs_i.to(tl.int64), mask=valid_i & (pos < num_keep))

    @triton.jit
    def _gather_tokens_fwd_kernel(
        x_ptr, stride_xb, stride_xl, stride_xd,  # [B, L, D] any float dtype, any strides
        ids_ptr, stride_ib, stride_im,  # [B, M] int64
        out_ptr, stride_ob, stride_om, stride_od,  # [B, M, D] out, dtype of x
        L, M, D,
        BLOCK_M: tl.constexpr,  # output rows per program
        BLOCK_D: tl.constexpr,  # features per inner step
    ):
        pid_m = tl.program_id(0)
        b = tl.program_id(1).to(tl.int64)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        valid_m = offs_m < M
        idx = tl.load(ids_ptr + b * stride_ib + offs_m * stride_im, mask=valid_m, other=0)
        # ids are not range-checked on the host (that would sync); an out-of-range id reads nothing and yields zeros
        ok = valid_m & (idx >= 0) & (idx < L)
        src = x_ptr + b * stride_xb + idx[:, None] * stride_xl  # idx is int64: no overflow for big x
        dst = out_ptr + b * stride_ob + offs_m[:, None].to(tl.int64) * stride_om
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            valid_d = offs_d < D
            # a pure copy: no arithmetic, so the values pass through in their own dtype, bit-exact
            v = tl.load(src + offs_d[None, :] * stride_xd, mask=ok[:, None] & valid_d[None, :], other=0.0)
            tl.store(dst + offs_d[None, :] * stride_od, v, mask=valid_m[:, None] & valid_d[None, :])

    @triton.jit
    def _gather_tokens_bwd_kernel(
        go_ptr, stride_gb, stride_gm, stride_gd,  # [B, M, D] grad of the output, any strides
        ids_ptr, stride_ib, stride_im,  # [B, M] int64
        gx_ptr, stride_xb, stride_xl, stride_xd,  # [B, L, D] out: grad of x, dtype of grad_out
        L, M, D,
        ACC_DTYPE: tl.constexpr,  # fp32 (fp64 for fp64 grads) for summing duplicate ids
        BLOCK_L: tl.constexpr,  # destination rows per program
        BLOCK_M: tl.constexpr,  # ids compared per step
        BLOCK_D: tl.constexpr,  # features per inner step
    ):
        pid_l = tl.program_id(0)
        b = tl.program_id(1).to(tl.int64)
        offs_l = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
        valid_l = offs_l < L
        ids_row = ids_ptr + b * stride_ib
        go_row = go_ptr + b * stride_gb

        # Which source row m lands on each destination row l: count and first match, by comparing ids tile by tile.
        count = tl.zeros([BLOCK_L], dtype=tl.int32)
        first = tl.full([BLOCK_L], M, dtype=tl.int32)
        for m0 in range(0, M, BLOCK_M):
            offs_m = m0 + tl.arange(0, BLOCK_M)
            valid_m = offs_m < M
            idx = tl.load(ids_row + offs_m * stride_im, mask=valid_m, other=-1)
            hit = (idx[None, :] == offs_l[:, None]) & valid_m[None, :]
            count += tl.sum(hit.to(tl.int32), axis=1)
            first = tl.minimum(first, tl.min(tl.where(hit, offs_m[None, :], M), axis=1))
        has_src = count > 0
        has_dup = tl.max(count, axis=0) > 1  # some destination row here receives several source rows

        dst = gx_ptr + b * stride_xb + offs_l[:, None].to(tl.int64) * stride_xl
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            valid_d = offs_d < D
            store_mask = valid_l[:, None] & valid_d[None, :]
            if has_dup:
                # Rare path (MAE's ids are a permutation prefix, never repeated): sum the duplicates in ascending m,
                # one source row at a time, so the result is deterministic. Loads outside this tile are masked off.
                acc = tl.zeros([BLOCK_L, BLOCK_D], dtype=ACC_DTYPE)
                lo = pid_l * BLOCK_L
                for m in range(0, M):
                    i = tl.load(ids_row + m * stride_im)
                    in_tile = (i >= lo) & (i < lo + BLOCK_L)
                    g = tl.load(go_row + m * stride_gm + offs_d * stride_gd, mask=valid_d & in_tile, other=0.0)
                    acc += tl.where(offs_l[:, None] == i, g.to(ACC_DTYPE)[None, :], 0.0)
                tl.store(dst + offs_d[None, :] * stride_xd, acc.to(gx_ptr.dtype.element_ty), mask=store_mask)
            else:
                # One writer per element: copy the matching row (bit-exact), zeros where no id points here.
                src = go_row + first[:, None].to(tl.int64) * stride_gm + offs_d[None, :] * stride_gd
                g = tl.load(src, mask=has_src[:, None] & valid_d[None, :], other=0.0)
                tl.store(dst + offs_d[None, :] * stride_xd, g, mask=store_mask)

    # fmt: on


def _select_patches_config(L: int) -> dict:
    """Tile side and warps for the select kernel.

    Tiles are [BLOCK, BLOCK] comparisons: 64x64 = 4096 over 4 warps (128 threads) is 32 per thread, which stays in
    registers (ptxas for sm_90: 161 registers, no spills; a 256-wide tile would hold 512 per thread). Shorter rows use
    the next power of two, at least 16 (16x16 = 256 comparisons still gives each of the 128 threads work), so ViT-B/16
    (L=196) runs 4x4 tiles per pass and L=49 one 64x64 tile.
    """
    return {"BLOCK": min(64, max(16, _backend.next_power_of_2(L))), "num_warps": 4}


def _gather_tokens_config(D: int) -> dict:
    """Block sizes and warps for the gather kernels (forward: blocks of output rows; backward: of destination rows).

    Rows are copied in [16, BLOCK_D] tiles with BLOCK_D up to 256 features (512 B of bf16 per row, four full 128-byte
    lines), looping over D inside the program; 16 x 256 = 4096 elements over 4 warps is 32 per thread. ViT-B (M=49,
    D=768) gives 4 programs per image in the forward pass, 13 in the backward (L=196). The backward compares its 16
    destination rows with 64 ids per step ([16, 64] = 1024 comparisons, 8 per thread).
    """
    block_d = min(256, max(16, _backend.next_power_of_2(D)))
    return {"BLOCK_M": 16, "BLOCK_L": 16, "BLOCK_IDS": 64, "BLOCK_D": block_d, "num_warps": 4}


# The gather kernels put the batch on grid axis 1, which CUDA caps at 65535.
_MAX_GRID_Y = 65535


# ----------------------------------------------------------------------------------------------------------------
# Host launchers (validate, allocate, launch once)
# ----------------------------------------------------------------------------------------------------------------


def _check_select_inputs(importance: torch.Tensor, noise: torch.Tensor, num_masked: int, num_guided: int) -> None:
    if not isinstance(importance, torch.Tensor) or importance.dim() != 2:
        shape = tuple(importance.shape) if isinstance(importance, torch.Tensor) else type(importance).__name__
        raise ValueError(f"select_patches: importance must be a [B, L] tensor, got {shape}")
    if importance.dtype not in _FLOAT_IMPORTANCE:
        raise ValueError(f"select_patches: importance must be float32/float16/bfloat16, got {importance.dtype}")
    if not isinstance(noise, torch.Tensor) or noise.shape != importance.shape or noise.dtype != torch.float32:
        seen = (tuple(noise.shape), noise.dtype) if isinstance(noise, torch.Tensor) else type(noise).__name__
        raise ValueError(
            f"select_patches: noise must be float32 of the importance shape {tuple(importance.shape)}, got {seen}"
        )
    if noise.device != importance.device:
        raise ValueError(f"select_patches: importance on {importance.device} but noise on {noise.device}")
    L = importance.shape[1]
    if not 0 <= num_masked <= L:
        raise ValueError(f"select_patches: num_masked must be in [0, L={L}], got {num_masked}")
    if not 0 <= num_guided <= num_masked:
        raise ValueError(f"select_patches: num_guided must be in [0, num_masked={num_masked}], got {num_guided}")


def _select_patches_triton(
    importance: torch.Tensor, noise: torch.Tensor, num_masked: int, num_guided: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _check_select_inputs(importance, noise, num_masked, num_guided)
    B, L = importance.shape
    num_keep = L - num_masked
    dev = importance.device
    ids_keep = torch.empty(B, num_keep, dtype=torch.int64, device=dev)
    ids_restore = torch.empty(B, L, dtype=torch.int64, device=dev)
    mask = torch.empty(B, L, dtype=torch.float32, device=dev)
    if B == 0 or L == 0:
        return ids_keep, ids_restore, mask
    cfg = _select_patches_config(L)
    _select_patches_fwd_kernel[(B,)](
        importance, importance.stride(0), importance.stride(1),
        noise, noise.stride(0), noise.stride(1),
        ids_keep, ids_keep.stride(0), ids_keep.stride(1),
        ids_restore, ids_restore.stride(0), ids_restore.stride(1),
        mask, mask.stride(0), mask.stride(1),
        L, num_keep, num_guided,
        HAS_GUIDED=num_guided > 0, BLOCK=cfg["BLOCK"], num_warps=cfg["num_warps"],
    )  # fmt: skip
    return ids_keep, ids_restore, mask


def _check_gather_inputs(x: torch.Tensor, ids: torch.Tensor, what: str = "x") -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 3:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"gather_tokens: {what} must be a [B, L, D] tensor, got {shape}")
    if x.dtype not in _FLOAT_TOKENS:
        raise ValueError(f"gather_tokens: {what} must be float32/float16/bfloat16/float64, got {x.dtype}")
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.dtype != torch.int64:
        seen = (tuple(ids.shape), ids.dtype) if isinstance(ids, torch.Tensor) else type(ids).__name__
        raise ValueError(f"gather_tokens: ids must be an int64 [B, M] tensor, got {seen}")
    if ids.shape[0] != x.shape[0]:
        raise ValueError(f"gather_tokens: {what} {tuple(x.shape)} and ids {tuple(ids.shape)} differ in batch size")
    if ids.device != x.device:
        raise ValueError(f"gather_tokens: {what} on {x.device} but ids on {ids.device}")


def _check_gather_backward_inputs(grad_out: torch.Tensor, ids: torch.Tensor, L: int) -> None:
    _check_gather_inputs(grad_out, ids, what="grad_out")
    if grad_out.shape[1] != ids.shape[1]:
        raise ValueError(f"gather_tokens: grad_out {tuple(grad_out.shape)} does not match ids {tuple(ids.shape)}")
    if L < 0:
        raise ValueError(f"gather_tokens: L must be >= 0, got {L}")


def _check_gather_grid(t: torch.Tensor) -> None:
    if t.shape[0] > _MAX_GRID_Y:
        raise ValueError(f"gather_tokens: triton takes batches up to {_MAX_GRID_Y}, got {tuple(t.shape)}; split it")


def _gather_tokens_triton(x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    _check_gather_inputs(x, ids)
    _check_gather_grid(x)
    B, L, D = x.shape
    M = ids.shape[1]
    out = torch.empty(B, M, D, dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    cfg = _gather_tokens_config(D)
    grid = (triton.cdiv(M, cfg["BLOCK_M"]), B)
    _gather_tokens_fwd_kernel[grid](
        x, x.stride(0), x.stride(1), x.stride(2),
        ids, ids.stride(0), ids.stride(1),
        out, out.stride(0), out.stride(1), out.stride(2),
        L, M, D,
        BLOCK_M=cfg["BLOCK_M"], BLOCK_D=cfg["BLOCK_D"], num_warps=cfg["num_warps"],
    )  # fmt: skip
    return out


def _gather_tokens_backward_triton(grad_out: torch.Tensor, ids: torch.Tensor, L: int) -> torch.Tensor:
    _check_gather_backward_inputs(grad_out, ids, L)
    _check_gather_grid(grad_out)
    B, M, D = grad_out.shape
    grad_x = torch.empty(B, L, D, dtype=grad_out.dtype, device=grad_out.device)
    if grad_x.numel() == 0:
        return grad_x
    cfg = _gather_tokens_config(D)
    grid = (triton.cdiv(L, cfg["BLOCK_L"]), B)
    _gather_tokens_bwd_kernel[grid](
        grad_out, grad_out.stride(0), grad_out.stride(1), grad_out.stride(2),
        ids, ids.stride(0), ids.stride(1),
        grad_x, grad_x.stride(0), grad_x.stride(1), grad_x.stride(2),
        L, M, D,
        ACC_DTYPE=tl.float64 if grad_out.dtype == torch.float64 else tl.float32,
        BLOCK_L=cfg["BLOCK_L"], BLOCK_M=cfg["BLOCK_IDS"], BLOCK_D=cfg["BLOCK_D"], num_warps=cfg["num_warps"],
    )  # fmt: skip
    return grad_x


# ----------------------------------------------------------------------------------------------------------------
# Custom ops (torch.compile / CUDA graphs trace through them) and autograd
# ----------------------------------------------------------------------------------------------------------------


# The ops take the already resolved backend: "triton" runs the kernel, anything else the reference.


@torch.library.custom_op("freeatm::select_patches", mutates_args=())
def _select_patches_op(
    importance: torch.Tensor, noise: torch.Tensor, num_masked: int, num_guided: int, backend: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if backend == "triton":
        return _select_patches_triton(importance, noise, num_masked, num_guided)
    _check_select_inputs(importance, noise, num_masked, num_guided)
    return select_patches_reference(importance, noise, num_masked, num_guided)


@_select_patches_op.register_fake
def _(importance, noise, num_masked, num_guided, backend):
    B, L = importance.shape
    dev = importance.device
    return (
        torch.empty(B, L - num_masked, dtype=torch.int64, device=dev),
        torch.empty(B, L, dtype=torch.int64, device=dev),
        torch.empty(B, L, dtype=torch.float32, device=dev),
    )


@torch.library.custom_op("freeatm::gather_tokens", mutates_args=())
def _gather_tokens_op(x: torch.Tensor, ids: torch.Tensor, backend: str) -> torch.Tensor:
    if backend == "triton":
        return _gather_tokens_triton(x, ids)
    _check_gather_inputs(x, ids)
    return gather_tokens_reference(x, ids)


@_gather_tokens_op.register_fake
def _(x, ids, backend):
    return x.new_empty(x.shape[0], ids.shape[1], x.shape[2])


@torch.library.custom_op("freeatm::gather_tokens_backward", mutates_args=())
def _gather_tokens_backward_op(grad_out: torch.Tensor, ids: torch.Tensor, L: int, backend: str) -> torch.Tensor:
    if backend == "triton":
        return _gather_tokens_backward_triton(grad_out, ids, L)
    _check_gather_backward_inputs(grad_out, ids, L)
    return gather_tokens_backward_reference(grad_out, ids, L)


@_gather_tokens_backward_op.register_fake
def _(grad_out, ids, L, backend):
    return grad_out.new_empty(grad_out.shape[0], L, grad_out.shape[2])


def _gather_setup_context(ctx, inputs, output):
    x, ids, backend = inputs
    ctx.save_for_backward(ids)  # the minimum: ids and two Python values, never x
    ctx.L = x.shape[1]
    ctx.backend = backend


def _gather_backward(ctx, grad_out):
    (ids,) = ctx.saved_tensors
    grad_x = None
    if ctx.needs_input_grad[0]:
        grad_x = torch.ops.freeatm.gather_tokens_backward(grad_out, ids, ctx.L, ctx.backend)
    return grad_x, None, None


_gather_tokens_op.register_autograd(_gather_backward, setup_context=_gather_setup_context)


def _gather_backward_setup_context(ctx, inputs, output):
    grad_out, ids, L, backend = inputs
    ctx.save_for_backward(ids)
    ctx.backend = backend


def _gather_double_backward(ctx, grad_grad_x):
    # the backward is linear in grad_out; its own gradient is the forward gather
    (ids,) = ctx.saved_tensors
    grad = None
    if ctx.needs_input_grad[0]:
        grad = torch.ops.freeatm.gather_tokens(grad_grad_x, ids, ctx.backend)
    return grad, None, None, None


_gather_tokens_backward_op.register_autograd(_gather_double_backward, setup_context=_gather_backward_setup_context)


# ----------------------------------------------------------------------------------------------------------------
# Public functions
# ----------------------------------------------------------------------------------------------------------------


def select_patches(
    importance: torch.Tensor,
    num_masked: int,
    guided_fraction: float,
    *,
    generator: torch.Generator | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Choose MAE's masked patches, a share of them guided by importance.

    importance: [B, L] float32/float16/bfloat16 (e.g. mean soft object mask per patch; NaN ranks lowest).
    num_masked: int in [0, L]. guided_fraction: float in [0, 1]; ``num_guided_patches(num_masked, guided_fraction)``
    (round half up) of the masked patches are the most important ones, ties broken at random, the rest uniform at
    random among the others. ``guided_fraction=0`` is exactly MAE's random masking with the same generator state.
    generator: draws the [B, L] uniform noise (``torch.rand``), on importance's device.

    Returns ``(ids_keep int64 [B, L-num_masked], ids_restore int64 [B, L], mask float32 [B, L] with 1 = masked)``.
    Not differentiable (importance only orders the patches).
    """
    if not isinstance(importance, torch.Tensor) or importance.dim() != 2:
        shape = tuple(importance.shape) if isinstance(importance, torch.Tensor) else type(importance).__name__
        raise ValueError(f"select_patches: importance must be a [B, L] tensor, got {shape}")
    if importance.dtype not in _FLOAT_IMPORTANCE:
        raise ValueError(f"select_patches: importance must be float32/float16/bfloat16, got {importance.dtype}")
    B, L = importance.shape
    if isinstance(num_masked, bool) or not isinstance(num_masked, int) or not 0 <= num_masked <= L:
        raise ValueError(f"select_patches: num_masked must be an int in [0, L={L}], got {num_masked!r}")
    if isinstance(guided_fraction, bool) or not isinstance(guided_fraction, (int, float)):
        raise ValueError(f"select_patches: guided_fraction must be a float in [0, 1], got {guided_fraction!r}")
    if not 0.0 <= guided_fraction <= 1.0:  # also rejects NaN
        raise ValueError(f"select_patches: guided_fraction must be in [0, 1], got {guided_fraction!r}")
    if generator is not None and generator.device.type != importance.device.type:
        raise ValueError(f"select_patches: generator is on {generator.device} but importance on {importance.device}")
    resolved = _backend.resolve_backend("select_patches", backend, importance.device, has_cuda_impl=False)
    noise = torch.rand(B, L, generator=generator, device=importance.device, dtype=torch.float32)
    num_guided = num_guided_patches(num_masked, guided_fraction)
    return torch.ops.freeatm.select_patches(importance.detach(), noise, num_masked, num_guided, resolved)


def gather_tokens(x: torch.Tensor, ids: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """Gather tokens along the sequence: ``out[b, m, :] = x[b, ids[b, m], :]``.

    x: [B, L, D] float (fp32/fp16/bf16/fp64, any strides). ids: int64 [B, M] with values in [0, L) (not checked,
    which would need a host sync: out-of-range ids give zero rows on the Triton backend). Returns [B, M, D] in x's
    dtype. Differentiable in x; the backward is deterministic (duplicate ids in a row are summed in ascending m).
    MAE uses it twice: ``gather_tokens(x, ids_keep)`` (visible tokens) and ``gather_tokens(x_, ids_restore)``
    (unshuffle in the decoder).
    """
    _check_gather_inputs(x, ids)
    resolved = _backend.resolve_backend("gather_tokens", backend, x.device, has_cuda_impl=False)
    return torch.ops.freeatm.gather_tokens(x, ids, resolved)
