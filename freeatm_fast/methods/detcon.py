"""DetCon (Hénaff et al. 2021): contrastive detection over mask-pooled features.

The loader gives two views with warped masks (``masks1``, ``masks2``, ``valid``): the shard's object masks
(``data.masks=data``) or k-means segments (``data.masks=kmeans``). Each view's feature map is mask-pooled
(``pool_instances`` -> ``freeatm_kernels.mask_pool``) and projected by an MLP. The positive of mask k of image b
in one view is the same mask in the other view; negatives are all other valid masks of the global batch, in both
views. Temperature ``detcon.temperature``.

- ``detcon.momentum > 0`` (DetCon-B): targets from an EMA target network (backbone + projector); the online side
  adds a predictor. Targets carry no gradient.
- ``detcon.momentum == 0`` (DetCon-S): one network; anchors and targets are the same projections (SimCLR-style,
  gradient through both).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .backbone import build_backbone, feature_map, map_dim
from .common import Method, ema_update, make_momentum_copy, pool_instances, projection_mlp, require, two_view_info_nce


class DetCon(Method):
    """DetCon-B / DetCon-S. Batch: "view1", "view2" [B,3,S,S], "masks1", "masks2" uint8 [B,K,M,M], "valid" [B,K]."""

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        m = cfg.model
        self.backbone = build_backbone(m)
        # no BN in the mask heads: padded mask slots (zero vectors) would enter the batch statistics
        self.projector = projection_mlp(map_dim(self.backbone), m.proj_hidden_dim, m.proj_dim, bn=False)
        self.momentum = cfg.detcon.momentum
        if self.momentum > 0:
            self.predictor = projection_mlp(m.proj_dim, m.proj_hidden_dim, m.proj_dim, bn=False)
            self.target_backbone = make_momentum_copy(self.backbone)
            self.target_projector = make_momentum_copy(self.projector)

    def _project(self, backbone, projector, x: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """x [B,3,S,S], masks [B,K,M,M] -> projections [B*K, D] (not normalised)."""
        z = projector(pool_instances(feature_map(backbone, x), masks))  # [B,K,D]
        return z.reshape(-1, z.shape[-1])

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        """Returns "loss" (= the mask contrast) and detached logs "acc_inst", "n_inst"."""
        require(batch, ("view1", "view2", "masks1", "masks2", "valid"), "detcon", "needs data.views=two with masks")
        x1, x2 = batch["view1"], batch["view2"]
        m1, m2 = batch["masks1"], batch["masks2"]
        valid = batch["valid"].bool()
        B = x1.shape[0]
        # both views in one backbone call (BatchNorm over 2B images, one launch per layer)
        z = self._project(self.backbone, self.projector, torch.cat([x1, x2]), torch.cat([m1, m2]))
        n = z.shape[0] // 2
        if self.momentum > 0:
            q = F.normalize(self.predictor(z).float(), dim=-1)
            with torch.no_grad():
                t = self._project(self.target_backbone, self.target_projector, torch.cat([x1, x2]), torch.cat([m1, m2]))
                t = F.normalize(t.float(), dim=-1)
            t1, t2 = t[:n], t[n:]
        else:
            q = F.normalize(z.float(), dim=-1)
            t1, t2 = q[:n], q[n:]
        loss, acc = two_view_info_nce(
            q[:n],
            q[n:],
            t1,
            t2,
            temperature=self.cfg.detcon.temperature,
            valid=valid.reshape(B * valid.shape[1]),
            targets_have_grad=self.momentum == 0,
        )
        return {"loss": loss, "loss_inst": loss.detach(), "acc_inst": acc, "n_inst": valid.sum().float()}

    @torch.no_grad()
    def after_step(self, step: int, max_steps: int) -> None:
        """EMA of the target network (DetCon-B; constant ``detcon.momentum``)."""
        if self.momentum > 0:
            ema_update(self.target_backbone, self.backbone, self.momentum)
            ema_update(self.target_projector, self.projector, self.momentum)
