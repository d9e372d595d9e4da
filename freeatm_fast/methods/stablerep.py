"""StableRep (Tian et al. 2023): multi-positive contrastive learning over images generated from one caption.

A batch holds B captions with G images each (``data.views=caption_group``). Every image is embedded (backbone +
MLP head with BN, normalised); for anchor i the target distribution is uniform over the other images of the global
batch with the same caption id, the prediction is the softmax over all other images (itself excluded) at
temperature ``stablerep.temperature``, and the loss is their cross-entropy, averaged over anchors.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .backbone import build_backbone, pooled_dim
from .common import MASKED_LOGIT, Method, concat_all_gather, gather_with_grad, projection_mlp, rank_and_world, require


def multi_positive_loss(
    z: torch.Tensor, z_all: torch.Tensor, group: torch.Tensor, group_all: torch.Tensor, *, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """StableRep's multi-positive cross-entropy.

    z: [n,D] normalised local anchors; z_all: [N,D] normalised embeddings of the global batch, whose rows
    ``rank*n .. rank*n+n-1`` are the anchors themselves; group [n] / group_all [N] int64 caption ids. Anchors
    without another image of their caption contribute 0 (and are left out of the mean).
    Returns (loss, accuracy = share of anchors whose most similar other image shares their caption; detached).
    """
    rank, _ = rank_and_world()
    n, N = z.shape[0], z_all.shape[0]
    self_col = rank * n + torch.arange(n, device=z.device)
    not_self = torch.arange(N, device=z.device)[None, :] != self_col[:, None]  # [n,N]
    logits = (z.float() @ z_all.float().T) / temperature
    logits = logits.masked_fill(~not_self, MASKED_LOGIT)
    positive = (group[:, None] == group_all[None, :]) & not_self
    count = positive.sum(dim=1)  # [n]
    target = positive.float() / count.clamp_min(1)[:, None]
    per_row = -(target * F.log_softmax(logits, dim=1)).sum(dim=1)
    has_pos = (count > 0).float()
    loss = (per_row * has_pos).sum() / has_pos.sum().clamp_min(1.0)
    best = logits.detach().argmax(dim=1, keepdim=True)
    acc = positive.gather(1, best).float().squeeze(1).mean()
    return loss, acc


class StableRep(Method):
    """StableRep. Batch: "images" [B,G,3,S,S] (G images of one caption), "group" int64 [B] (caption id)."""

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        m = cfg.model
        self.backbone = build_backbone(m)
        # StableRep's head: 3-layer MLP with BN
        self.head = projection_mlp(pooled_dim(self.backbone), m.proj_hidden_dim, m.proj_dim, layers=3, bn=True)

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        """Returns "loss" and the detached logs "acc" (top-1 neighbour shares the caption)."""
        require(batch, ("images", "group"), "stablerep", "needs data.views=caption_group")
        images = batch["images"]
        B, G = images.shape[:2]
        x = images.reshape(B * G, *images.shape[2:])
        if self.cfg.model.channels_last:  # the engine converts 4-D image tensors only
            x = x.contiguous(memory_format=torch.channels_last)
        z = F.normalize(self.head(self.backbone(x)).float(), dim=-1)  # [B*G,D], image-major: row = b*G + g
        group = batch["group"].to(z.device).repeat_interleave(G)
        loss, acc = multi_positive_loss(
            z, gather_with_grad(z), group, concat_all_gather(group), temperature=self.cfg.stablerep.temperature
        )
        return {"loss": loss, "acc": acc}
