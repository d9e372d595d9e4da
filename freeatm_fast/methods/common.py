"""Pieces shared by the methods: the :class:`Method` base class, distributed gathers, EMA, projection heads,
contrastive losses and mask pooling of instance features (DESIGN §7).

Nothing here synchronises with the host: losses over a data-dependent set of rows (valid objects) use masked
logits and weighted means instead of boolean indexing, so a training step never waits for the GPU.
Distributed helpers work with any ``torch.distributed`` backend (gloo on CPU, NCCL on GPU) and are identities
when no process group is initialised.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from freeatm_kernels import mask_pool

from .backbone import feature_map as backbone_feature_map

# Masked logits get this value instead of -inf: a row whose every entry is masked then stays finite (its weight is
# 0 anyway) and exp() of it underflows to exactly 0 in fp32.
MASKED_LOGIT = -1e9


# --------------------------------------------------------------------------------------------------------------
# distributed helpers


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) when torch.distributed is not initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@torch.no_grad()
def concat_all_gather(x: torch.Tensor) -> torch.Tensor:
    """[N,...] on every rank -> [world*N,...] in rank order, without gradient; ``x`` itself when not distributed.

    Uses ``dist.all_gather`` into a list (supported by every backend, gloo included). Bool tensors travel as uint8
    (gloo has no bool all_gather).
    """
    _, world = rank_and_world()
    if world == 1:
        return x
    src = x.to(torch.uint8) if x.dtype == torch.bool else x
    src = src.contiguous()
    out = [torch.empty_like(src) for _ in range(world)]
    dist.all_gather(out, src)
    cat = torch.cat(out, dim=0)
    return cat.bool() if x.dtype == torch.bool else cat


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """[N,...] -> [world*N,...] with gradient: the backward sums every rank's gradient for the local slice.

    ``torch.distributed.nn.functional.all_gather`` (reduce-scatter on NCCL, all-to-all + sum on gloo); ``x`` itself
    when not distributed. With a loss computed per rank over its local anchors against the gathered batch and
    gradients averaged across ranks (DDP / DeepSpeed), this gives the gradient of the mean loss over all anchors.
    """
    _, world = rank_and_world()
    if world == 1:
        return x
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x.contiguous()), dim=0)


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum of ``x`` over ranks, out of place and without gradient; ``x`` itself when not distributed."""
    _, world = rank_and_world()
    if world == 1:
        return x
    y = x.detach().clone()
    dist.all_reduce(y)
    return y


# --------------------------------------------------------------------------------------------------------------
# parameters


def _param_shape(p: torch.Tensor) -> torch.Size:
    """The full shape of a parameter, also under DeepSpeed ZeRO-3 (whose partitioned params have shape [0])."""
    return getattr(p, "ds_shape", p.shape)


@torch.no_grad()
def ema_update(target: nn.Module, online: nn.Module, m: float) -> None:
    """target <- m * target + (1 - m) * online, over the parameters (not the buffers: a momentum encoder keeps its
    own BatchNorm statistics, as in MoCo and BYOL).

    Works for plain parameters and for DeepSpeed ZeRO-3 partitioned ones: a parameter with a ``ds_tensor`` attribute
    holds its local shard there (same partitioning for both modules, so the shards line up). Parameters are updated
    with multi-tensor ``torch._foreach`` ops (one launch per dtype/device group instead of one per tensor).
    """
    t_params = list(target.parameters())
    o_params = list(online.parameters())
    if len(t_params) != len(o_params):
        raise ValueError(
            f"ema_update: target has {len(t_params)} parameters but online has {len(o_params)}; "
            "the target must be a copy of the online module"
        )
    targets, onlines = [], []
    for i, (t, o) in enumerate(zip(t_params, o_params, strict=True)):
        t_ds, o_ds = hasattr(t, "ds_tensor"), hasattr(o, "ds_tensor")
        if t_ds != o_ds:
            raise ValueError(
                f"ema_update: parameter {i} is ZeRO-3 partitioned in {'target' if t_ds else 'online'} only; "
                "partition both modules (or neither)"
            )
        tt, ot = (t.ds_tensor, o.ds_tensor) if t_ds else (t.data, o.data)
        if tt.shape != ot.shape:
            raise ValueError(
                f"ema_update: parameter {i} has shape {tuple(tt.shape)} in target but {tuple(ot.shape)} in online"
            )
        targets.append(tt)
        onlines.append(ot if ot.dtype == tt.dtype else ot.to(tt.dtype))
    if not targets:
        return
    torch._foreach_mul_(targets, m)
    torch._foreach_add_(targets, onlines, alpha=1.0 - m)


def make_momentum_copy(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` with ``requires_grad=False`` everywhere (a momentum / target encoder)."""
    import copy

    target = copy.deepcopy(module)
    for p in target.parameters():
        p.requires_grad_(False)
    return target


def param_groups(module: nn.Module, weight_decay: float) -> list[dict]:
    """Optimizer groups over the trainable parameters of ``module``.

    Weights (ndim >= 2) get ``weight_decay`` and ``lars_exclude=False``; biases and norm weights (ndim <= 1) get
    weight decay 0 and ``lars_exclude=True`` (LARS skips its trust ratio for them). Frozen parameters (momentum /
    target encoders) are left out. Empty groups are dropped.
    """
    decay, no_decay = [], []
    for p in module.parameters():
        if not p.requires_grad:
            continue
        (no_decay if len(_param_shape(p)) <= 1 else decay).append(p)
    groups = [
        {"params": decay, "weight_decay": weight_decay, "lars_exclude": False},
        {"params": no_decay, "weight_decay": 0.0, "lars_exclude": True},
    ]
    return [g for g in groups if g["params"]]


# --------------------------------------------------------------------------------------------------------------
# modules


def projection_mlp(in_dim: int, hidden: int, out: int, layers: int = 2, bn: bool = True) -> nn.Sequential:
    """MLP head ``in_dim -> hidden -> ... -> out``: ``layers`` Linear layers, Linear-[BN]-ReLU between them.

    [N, in_dim] -> [N, out]. ``bn=True`` puts a BatchNorm1d after every hidden Linear (SimCLR, SwAV, BYOL-style
    heads); MoCo v2's head is ``bn=False``. Heads over padded instance slots use ``bn=False`` so that padding does
    not enter the batch statistics.
    """
    if layers < 1:
        raise ValueError(f"projection_mlp: layers must be >= 1, got {layers}")
    mods: list[nn.Module] = []
    dim = in_dim
    for _ in range(layers - 1):
        mods.append(nn.Linear(dim, hidden, bias=not bn))
        if bn:
            mods.append(nn.BatchNorm1d(hidden))
        mods.append(nn.ReLU(inplace=True))
        dim = hidden
    mods.append(nn.Linear(dim, out))
    return nn.Sequential(*mods)


# --------------------------------------------------------------------------------------------------------------
# losses


def weighted_mean(values: torch.Tensor, weights: torch.Tensor, *, global_denominator: bool = True) -> torch.Tensor:
    """sum(w * v) / sum(w) over all elements, 0 when every weight is 0 (no host sync, no NaN).

    With ``global_denominator`` and several ranks the denominator is the mean over ranks of the local weight sums
    (an all-reduce of one scalar, not a host sync): averaging the per-rank results (as DDP / DeepSpeed average
    gradients) then gives the mean over every weighted row of the global batch, even when ranks hold different
    numbers of valid rows.
    """
    weights = weights.to(values.dtype)
    den = weights.sum()
    _, world = rank_and_world()
    if global_denominator and world > 1:
        den = all_reduce_sum(den) / world
    return (values * weights).sum() / den.clamp_min(1e-12)


def info_nce(
    q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor | None = None, *, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """InfoNCE of L2-normalised queries against their keys.

    q, k: [N,D] (row i of k is the positive of row i of q). With ``queue`` [Q,D] (MoCo): logits
    ``[q·k_i, q·queue]`` and the negatives are the queue only. Without a queue: logits ``q @ k.T`` over the N keys
    (the other keys are the negatives). Computed in fp32. Returns (mean loss, top-1 accuracy of the positive), both
    scalars; the accuracy is detached.
    """
    q = q.float()
    k = k.float()
    if queue is not None:
        l_pos = (q * k).sum(dim=-1, keepdim=True)  # [N,1]
        # a copy: the queue is updated in place after the loss, and autograd keeps the matmul's operand
        l_neg = q @ queue.detach().to(q.dtype, copy=True).T  # [N,Q]
        logits = torch.cat([l_pos, l_neg], dim=1) / temperature
        labels = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
    else:
        logits = (q @ k.T) / temperature
        labels = torch.arange(q.shape[0], device=q.device)
    loss = F.cross_entropy(logits, labels)
    acc = (logits.detach().argmax(dim=1) == labels).float().mean()
    return loss, acc


def masked_info_nce(
    q: torch.Tensor,
    keys: torch.Tensor,
    pos_index: torch.Tensor,
    *,
    temperature: float,
    row_weight: torch.Tensor,
    key_valid: torch.Tensor,
    exclude_index: torch.Tensor | None = None,
    queue: torch.Tensor | None = None,
    queue_valid: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """InfoNCE over a padded set of instances, without host sync (masked logits, weighted mean).

    q: [N,D] normalised queries (anchors). keys: [M,D] normalised keys; ``pos_index`` int64 [N] is the column of
    each anchor's positive among them. Negatives: every other key with ``key_valid`` ([M] bool) and, when given,
    every ``queue`` row [Q,D] with ``queue_valid`` ([Q] bool). ``exclude_index`` int64 [N] names one more column
    per row to drop (the anchor itself when anchors are also keys, as in SimCLR / DetCon-S). The positive column is
    always kept. ``row_weight`` [N] (bool or float) weights each anchor's cross-entropy: invalid anchors weigh 0,
    and the result is :func:`weighted_mean` over anchors (0 when no anchor is valid).

    Returns (loss, accuracy): scalars; the accuracy (top-1 of the positive among the unmasked logits, weighted like
    the loss) is detached.
    """
    q = q.float()
    N = q.shape[0]
    M = keys.shape[0]
    cols = torch.arange(M, device=q.device)
    logits = q @ keys.float().T  # [N,M]
    keep = key_valid.bool()[None, :].expand(N, M)
    if exclude_index is not None:
        keep = keep & (cols[None, :] != exclude_index[:, None])
    keep = keep | (cols[None, :] == pos_index[:, None])
    logits = logits.masked_fill(~keep, MASKED_LOGIT * temperature)
    if queue is not None and queue.shape[0] > 0:
        l_queue = q @ queue.detach().to(q.dtype, copy=True).T  # [N,Q] (a copy: the queue changes in place later)
        if queue_valid is not None:
            l_queue = l_queue.masked_fill(~queue_valid.bool()[None, :], MASKED_LOGIT * temperature)
        logits = torch.cat([logits, l_queue], dim=1)
    logits = logits / temperature
    per_row = F.cross_entropy(logits, pos_index, reduction="none")  # [N]
    weight = row_weight.float()
    loss = weighted_mean(per_row, weight)
    hit = (logits.detach().argmax(dim=1) == pos_index).float()
    acc = weighted_mean(hit, weight, global_denominator=False)
    return loss, acc.detach()


def two_view_info_nce(
    q1: torch.Tensor,
    q2: torch.Tensor,
    t1: torch.Tensor,
    t2: torch.Tensor,
    *,
    temperature: float,
    valid: torch.Tensor | None = None,
    targets_have_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Contrast of two views over the global batch (SimCLR's NT-Xent; DetCon's mask contrast).

    q1, q2: [n,D] normalised local anchors of view 1 and 2; t1, t2: [n,D] normalised local targets (the same tensors
    as q1, q2 for SimCLR / DetCon-S, a target network's projections for DetCon-B). The targets of every rank are
    gathered (with gradient when ``targets_have_grad``) into keys ``[T1; T2]`` of 2*world*n rows. Anchor i of view 1
    has its positive at row i of view 2 and vice versa; every other valid key of either view is a negative, the
    anchor's own row in its own view is excluded. ``valid`` [n] bool (default all) marks rows that exist (objects
    present in both views): invalid rows are neither anchors nor negatives.

    Returns (loss, accuracy) like :func:`masked_info_nce`: the mean over the 2n valid local anchors.
    """
    n = q1.shape[0]
    gather = gather_with_grad if targets_have_grad else concat_all_gather
    T1, T2 = gather(t1), gather(t2)  # [world*n, D]
    total = T1.shape[0]
    v = torch.ones(n, dtype=torch.bool, device=q1.device) if valid is None else valid.reshape(n).bool()
    V = concat_all_gather(v)  # [world*n]
    rank, _ = rank_and_world()
    idx = rank * n + torch.arange(n, device=q1.device)
    return masked_info_nce(
        torch.cat([q1, q2]),
        torch.cat([T1, T2]),
        torch.cat([total + idx, idx]),
        temperature=temperature,
        row_weight=torch.cat([v, v]),
        key_valid=torch.cat([V, V]),
        exclude_index=torch.cat([idx, total + idx]),
    )


@torch.no_grad()
def enqueue(
    queue: torch.Tensor,
    ptr: torch.Tensor,
    keys: torch.Tensor,
    flags: torch.Tensor | None = None,
    flag_buffer: torch.Tensor | None = None,
) -> None:
    """Write ``keys`` [n,D] into the ring buffer ``queue`` [Q,D] at ``ptr`` (0-dim int64 buffer), in place.

    Positions wrap modulo Q, so n (= batch x world) need not divide Q; when n > Q only the last Q keys are kept.
    ``flags`` [n] (e.g. instance validity) go to ``flag_buffer`` [Q] at the same positions. The pointer stays a
    device tensor: no host sync.
    """
    Q = queue.shape[0]
    n = keys.shape[0]
    if Q == 0 or n == 0:
        return
    start = max(0, n - Q)
    idx = (ptr + start + torch.arange(n - start, device=queue.device)) % Q
    queue.index_copy_(0, idx, keys[start:].detach().to(queue.dtype))
    if flags is not None and flag_buffer is not None:
        flag_buffer.index_copy_(0, idx, flags[start:].to(flag_buffer.dtype))
    ptr.copy_((ptr + n) % Q)


# --------------------------------------------------------------------------------------------------------------
# instance features


def pool_instances(feat_map: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Mask-average a feature map: feat_map [B,C,h,w], masks uint8 [B,K,M,M] (value/255) -> [B,K,C].

    Uses the fused ``freeatm_kernels.mask_pool`` (CUDA / Triton / torch by availability). When M is an integer
    multiple of h and w the kernel area-downsamples the uint8 masks itself; otherwise the masks are first resized to
    h x w with area interpolation (``F.interpolate(mode="area")``: exact block means for any ratio) and pooled as
    fp32. Empty masks pool to 0 (their rows carry weight 0 in the losses).
    """
    if feat_map.dim() != 4 or masks.dim() != 4 or feat_map.shape[0] != masks.shape[0]:
        raise ValueError(
            f"pool_instances: need feat_map [B,C,h,w] and masks [B,K,M,M], got {tuple(feat_map.shape)} and "
            f"{tuple(masks.shape)}"
        )
    h, w = feat_map.shape[-2:]
    H, W = masks.shape[-2:]
    if H % h or W % w:
        m = masks.float()
        if masks.dtype == torch.uint8:
            m = m / 255.0
        masks = F.interpolate(m, size=(h, w), mode="area")
    pooled, _ = mask_pool(feat_map, masks)
    return pooled


def instance_indices(batch: int, num_objects: int, device: torch.device) -> torch.Tensor:
    """Global row index of every local instance (b, k) in a gathered [world*B*K] key set: int64 [B*K]."""
    rank, _ = rank_and_world()
    return rank * batch * num_objects + torch.arange(batch * num_objects, device=device)


def require(batch: dict, keys: tuple[str, ...], method: str, why: str) -> None:
    """Raise KeyError naming the batch keys a method needs but did not get (a loader / config mismatch)."""
    missing = [k for k in keys if k not in batch]
    if missing:
        raise KeyError(f"{method}: the batch lacks {missing} ({why}); it has {sorted(batch)}")


# --------------------------------------------------------------------------------------------------------------
# base class


class Method(nn.Module):
    """Base class of the training methods: a timm backbone plus heads and a loss.

    Subclasses set ``self.backbone`` (via :func:`freeatm_fast.methods.backbone.build_backbone`) and implement
    ``forward(batch) -> dict`` with a differentiable scalar ``"loss"`` and detached scalar logs. The engine calls
    ``after_step(step, max_steps)`` under ``torch.no_grad`` after every optimizer step, with ``step`` the 0-based
    index of the step just taken.
    """

    backbone: nn.Module
    #: True for methods that tokenise captions with :func:`freeatm_fast.methods.text.build_tokenizer` (BLIP,
    #: ViLT): the engine then trains the offline tokenizer once, on rank 0, into the run directory, and every rank
    #: (and a resumed run) loads that one (:func:`freeatm_fast.methods.text.run_tokenizer`).
    uses_tokenizer: bool = False

    def __init__(self, cfg) -> None:
        super().__init__()
        self.cfg = cfg

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """Backbone features before pooling: x [B,3,S,S] -> [B,C,h,w] (ViT: patch tokens on their grid)."""
        return backbone_feature_map(self.backbone, x)

    def begin(self, step: int, max_steps: int) -> None:
        """Called once before the first step of a run (``step``: the global step it starts at, > 0 when
        resumed), for host-side schedules; nothing by default."""

    def after_step(self, step: int, max_steps: int) -> None:
        """Per-step updates outside the optimizer (EMA, prototype normalisation); none by default."""

    def save_artifacts(self, run_dir) -> None:
        """Files the run directory needs besides checkpoints, written by rank 0 before the first step (BLIP /
        ViLT: the tokenizer); nothing by default."""

    def retrieval_scores(self, images: torch.Tensor, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Image-text retrieval scores for vision-language methods: images [Ni,3,S,S] on the module's device,
        captions [Nt] -> (scores used to rank texts for each image, scores used to rank images for each text),
        both float [Ni, Nt] (they may be the same tensor). The method batches internally."""
        raise NotImplementedError(f"{type(self).__name__} is not a vision-language method")

    def write_figures(self, run_dir, batch: dict) -> list:
        """Pictures written at the end of training from a validation ``batch`` (on the device); returns their
        paths. None by default (MAE: reconstructions)."""
        return []

    def param_groups(self, weight_decay: float) -> list[dict]:
        """Optimizer groups over the trainable parameters (see :func:`param_groups`)."""
        return param_groups(self, weight_decay)
