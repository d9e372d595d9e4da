"""SimCLR (Chen et al. 2020) with the Free-ATM instance contrast (DESIGN §7).

Image level: backbone + MLP head with BatchNorm, NT-Xent over the 2N views of the global batch (embeddings
gathered with gradient), temperature ``simclr.temperature``. Free-ATM (``freeatm.enabled``): mask-pooled object
features of both views (``pool_instances`` -> ``freeatm_kernels.mask_pool``) through a separate instance head, and
an instance NT-Xent over the valid objects of both views of the global batch (invalid rows and columns masked),
temperature ``freeatm.inst_temperature``; ``L = L_img + freeatm.lambda_inst * L_inst``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .backbone import build_backbone, encode, map_dim, pooled_dim
from .common import Method, pool_instances, projection_mlp, require, two_view_info_nce


class SimCLR(Method):
    """SimCLR (+ Free-ATM instance NT-Xent). Batch: "view1", "view2" [B,3,S,S]; with Free-ATM also "masks1",
    "masks2" uint8 [B,K,M,M] and "valid" bool [B,K]."""

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        m = cfg.model
        self.backbone = build_backbone(m)
        self.head = projection_mlp(pooled_dim(self.backbone), m.proj_hidden_dim, m.proj_dim, bn=True)
        self.freeatm = cfg.freeatm.enabled
        if self.freeatm:
            # no BN: padded object slots (zero vectors) would enter the batch statistics
            self.inst_head = projection_mlp(map_dim(self.backbone), m.proj_hidden_dim, m.proj_dim, bn=False)

    def _embed(self, x: torch.Tensor, masks: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x [B,3,S,S] -> z [B,D] normalised and, with Free-ATM, z_inst [B,K,D] normalised (else None)."""
        if not self.freeatm:
            return F.normalize(self.head(self.backbone(x)).float(), dim=-1), None
        pooled, fmap = encode(self.backbone, x)
        z = F.normalize(self.head(pooled).float(), dim=-1)
        return z, F.normalize(self.inst_head(pool_instances(fmap, masks)).float(), dim=-1)

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        """Returns "loss", "loss_img", "acc_img" and with Free-ATM "loss_inst", "acc_inst", "n_inst" (detached
        logs). Both views go through the backbone in one call, so BatchNorm sees 2B images like SimCLR's."""
        require(batch, ("view1", "view2"), "simclr", "needs data.views=two")
        x1, x2 = batch["view1"], batch["view2"]
        B = x1.shape[0]
        masks = None
        if self.freeatm:
            require(batch, ("masks1", "masks2", "valid"), "simclr", "freeatm.enabled needs masks")
            masks = torch.cat([batch["masks1"], batch["masks2"]])
        z, z_inst = self._embed(torch.cat([x1, x2]), masks)
        z1, z2 = z[:B], z[B:]
        loss_img, acc_img = two_view_info_nce(
            z1, z2, z1, z2, temperature=self.cfg.simclr.temperature, targets_have_grad=True
        )
        out = {"loss_img": loss_img.detach(), "acc_img": acc_img}
        loss = loss_img
        if self.freeatm:
            valid = batch["valid"].bool()
            K, D = z_inst.shape[1:]
            p1 = z_inst[:B].reshape(B * K, D)
            p2 = z_inst[B:].reshape(B * K, D)
            loss_inst, acc_inst = two_view_info_nce(
                p1, p2, p1, p2, temperature=self.cfg.freeatm.inst_temperature, valid=valid, targets_have_grad=True
            )
            loss = loss + self.cfg.freeatm.lambda_inst * loss_inst
            out.update(loss_inst=loss_inst.detach(), acc_inst=acc_inst, n_inst=valid.sum().float())
        return {"loss": loss, **out}
