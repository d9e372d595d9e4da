"""Multi-crop swapped prediction (SwAV, Caron et al. 2020), the recipe SEER trains with.

A batch holds ``data.global_crops`` crops at ``data.image_size`` followed by ``data.local_crops`` crops at
``data.local_size``. Crops of one resolution share a backbone call. Each embedding (MLP head with BN, normalised)
is scored against ``multicrop.num_prototypes`` normalised prototypes. For every global crop, Sinkhorn-Knopp turns
its scores into codes with equal prototype marginals over the global batch (``multicrop.sinkhorn_iters``,
``multicrop.epsilon``; sums all-reduced across ranks); every other crop predicts those codes with a softmax at
``multicrop.temperature``. Prototypes are re-normalised after every step (and used normalised in the forward) and
frozen (zero gradient) for the first ``multicrop.freeze_prototypes_steps`` steps.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from freeatm_fast.config import ConfigError

from .backbone import build_backbone, pooled_dim
from .common import Method, all_reduce_sum, projection_mlp, rank_and_world, require


@torch.no_grad()
def sinkhorn(scores: torch.Tensor, *, iters: int, epsilon: float) -> torch.Tensor:
    """Sinkhorn-Knopp codes of scores [B,P] (B local samples, P prototypes) -> codes [B,P], fp32.

    Q = exp(scores / epsilon) is alternately normalised so that every prototype gets 1/P of the global batch's
    mass and every sample 1/B_global; the result is rescaled so that each sample's code sums to 1 (prototype
    marginals then approach B/P per rank). Global sums are all-reduced across ranks (world*B samples), as in SwAV.
    The global maximum is subtracted before exp (one scalar all-reduce): the same constant everywhere, so the
    codes equal SwAV's exactly while exp cannot overflow for unnormalised scores.
    """
    _, world = rank_and_world()
    s = scores.float() / epsilon
    s_max = s.max()
    if world > 1:
        s_max = s_max.clone()
        dist.all_reduce(s_max, op=dist.ReduceOp.MAX)
    Q = torch.exp(s - s_max).T  # [P,B]
    P, B = Q.shape
    B_global = B * world
    Q = Q / all_reduce_sum(Q.sum())
    for _ in range(iters):
        Q = Q / all_reduce_sum(Q.sum(dim=1, keepdim=True)) / P  # prototype marginals 1/P
        Q = Q / Q.sum(dim=0, keepdim=True) / B_global  # sample marginals 1/B_global
    return (Q * B_global).T


class Multicrop(Method):
    """SwAV-style multi-crop. Batch: "crops": list of global_crops [B,3,S,S] then local_crops [B,3,L,L] tensors."""

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        d = cfg.data
        self.n_global = d.global_crops
        self.n_crops = d.global_crops + d.local_crops
        if self.n_crops < 2:
            raise ConfigError(
                f"data.global_crops + data.local_crops: multicrop needs at least 2 crops, got {self.n_crops}"
            )
        m = cfg.model
        self.backbone = build_backbone(m)
        self.head = projection_mlp(pooled_dim(self.backbone), m.proj_hidden_dim, m.proj_dim, bn=True)
        self.prototypes = nn.Linear(m.proj_dim, cfg.multicrop.num_prototypes, bias=False)
        with torch.no_grad():
            self.prototypes.weight.copy_(F.normalize(self.prototypes.weight, dim=1))
        # a buffer (saved in checkpoints) rather than a Python flag: the forward reads it without a host sync
        self.register_buffer(
            "prototypes_frozen", torch.tensor(cfg.multicrop.freeze_prototypes_steps > 0, dtype=torch.bool)
        )

    def _embed(self, crops: list[torch.Tensor]) -> torch.Tensor:
        """crops -> normalised embeddings [n_crops*B, D]: one backbone call per run of equal-sized crops."""
        feats, start = [], 0
        while start < len(crops):
            end = start + 1
            while end < len(crops) and crops[end].shape[-2:] == crops[start].shape[-2:]:
                end += 1
            feats.append(self.backbone(torch.cat(crops[start:end])))
            start = end
        return F.normalize(self.head(torch.cat(feats)).float(), dim=-1)

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        """Returns "loss" (swapped prediction) and detached logs "agreement" (share of predictions whose argmax
        equals the argmax of the code) and "code_entropy" (mean entropy of the codes, nats)."""
        require(batch, ("crops",), "multicrop", "needs data.views=multicrop")
        crops = list(batch["crops"])
        if len(crops) != self.n_crops:
            raise ValueError(
                f"multicrop: got {len(crops)} crops, expected data.global_crops + data.local_crops = {self.n_crops}"
            )
        B = crops[0].shape[0]
        z = self._embed(crops)  # [n_crops*B, D]
        w = self.prototypes.weight
        # frozen: the prototypes enter as constants, so their gradient is exactly 0 (no host-side branch)
        w = torch.where(self.prototypes_frozen, w.detach(), w)
        # normalised here as well as in after_step: where the optimizer keeps master weights (DeepSpeed ZeRO 1/2,
        # bf16/fp16) after_step's write to the module copy is overwritten at the next step; with unit prototypes
        # (the plain case) this is the identity in value and changes the gradient only by its radial part, which
        # the renormalisation removes anyway
        scores = z @ F.normalize(w.float(), dim=1).T  # [n_crops*B, P]
        mc = self.cfg.multicrop
        log_p = F.log_softmax(scores / mc.temperature, dim=1).reshape(self.n_crops, B, -1)
        loss = scores.new_zeros(())
        agree = scores.new_zeros(())
        entropy = scores.new_zeros(())
        for i in range(self.n_global):
            codes = sinkhorn(scores[i * B : (i + 1) * B].detach(), iters=mc.sinkhorn_iters, epsilon=mc.epsilon)
            entropy = entropy - (codes * codes.clamp_min(1e-12).log()).sum(dim=1).mean()
            target = codes.argmax(dim=1)
            for v in range(self.n_crops):
                if v == i:
                    continue
                loss = loss - (codes * log_p[v]).sum(dim=1).mean() / (self.n_crops - 1)
                agree = agree + (log_p[v].detach().argmax(dim=1) == target).float().mean() / (self.n_crops - 1)
        n = self.n_global
        return {"loss": loss / n, "agreement": agree / n, "code_entropy": entropy.detach() / n}

    @torch.no_grad()
    def after_step(self, step: int, max_steps: int) -> None:
        """Re-normalise the prototypes; unfreeze them once ``step + 1 >= multicrop.freeze_prototypes_steps``."""
        self.prototypes_frozen.fill_(step + 1 < self.cfg.multicrop.freeze_prototypes_steps)
        w = self.prototypes.weight
        if hasattr(w, "ds_tensor"):  # ZeRO-3: the full weight exists only inside GatheredParameters
            import deepspeed

            with deepspeed.zero.GatheredParameters([w], modifier_rank=0):
                if rank_and_world()[0] == 0:
                    w.copy_(F.normalize(w.float(), dim=1).to(w.dtype))
        else:
            w.copy_(F.normalize(w.float(), dim=1).to(w.dtype))
