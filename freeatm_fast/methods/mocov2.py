"""MoCo v2 (Chen et al. 2020) with the Free-ATM instance contrast (DESIGN §7).

Image level: query encoder = backbone + MLP head (``model.proj_hidden_dim`` -> ``model.proj_dim``, no BN, as in
MoCo v2), key encoder = its EMA copy (``moco.momentum``), negatives from a queue of ``moco.queue_size`` normalised
keys (0 = the other keys of the global batch), temperature ``moco.temperature``. ``view1`` gives the queries and
``view2`` the keys (``moco.symmetric``: both directions, averaged). With ``moco.shuffle_bn`` and several ranks the
key encoder sees a batch shuffled across ranks (MoCo's Shuffle-BN), so BatchNorm cannot leak which key belongs to
which query.

Free-ATM (``freeatm.enabled``): the feature map of each view is mask-pooled per object (``pool_instances``, i.e.
``freeatm_kernels.mask_pool``), fed to a separate instance MLP head and normalised. The positive of object (b, k)
in view 1 is the same object in view 2 (from the key encoder); the negatives are every other valid key instance of
the global batch plus an instance queue (``freeatm.inst_queue_size``; invalid entries masked). Rows are weighted by
``batch["valid"]``; ``L = L_img + freeatm.lambda_inst * L_inst`` and a batch without valid objects adds 0.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .backbone import build_backbone, encode, map_dim, pooled_dim
from .common import (
    Method,
    concat_all_gather,
    ema_update,
    enqueue,
    info_nce,
    instance_indices,
    make_momentum_copy,
    masked_info_nce,
    pool_instances,
    projection_mlp,
    rank_and_world,
    require,
)


class MoCoV2(Method):
    """MoCo v2 (+ Free-ATM instance InfoNCE). Batch: "view1", "view2" [B,3,S,S]; with Free-ATM also "masks1",
    "masks2" uint8 [B,K,M,M] and "valid" bool [B,K]."""

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        m = cfg.model
        self.backbone = build_backbone(m)
        self.head = self._head(pooled_dim(self.backbone))
        self.key_backbone = make_momentum_copy(self.backbone)
        self.key_head = make_momentum_copy(self.head)
        self.freeatm = cfg.freeatm.enabled
        dim = m.proj_dim
        self.register_buffer("queue", F.normalize(torch.randn(cfg.moco.queue_size, dim), dim=1))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
        if self.freeatm:
            self.inst_head = self._head(map_dim(self.backbone))
            self.key_inst_head = make_momentum_copy(self.inst_head)
            q = cfg.freeatm.inst_queue_size
            self.register_buffer("inst_queue", F.normalize(torch.randn(q, dim), dim=1))
            # entries written from invalid (padded / vanished) objects, and the initial random ones, are masked
            self.register_buffer("inst_queue_valid", torch.zeros(q, dtype=torch.bool))
            self.register_buffer("inst_queue_ptr", torch.zeros((), dtype=torch.long))

    def _head(self, in_dim: int) -> torch.nn.Module:
        return projection_mlp(in_dim, self.cfg.model.proj_hidden_dim, self.cfg.model.proj_dim, bn=False)

    # ---------------------------------------------------------------------------------------------------------
    # encoders

    def _queries(self, x: torch.Tensor, masks: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x [B,3,S,S] -> q [B,D] normalised, and with Free-ATM q_inst [B,K,D] normalised (else None)."""
        if not self.freeatm:
            return F.normalize(self.head(self.backbone(x)).float(), dim=-1), None
        pooled, fmap = encode(self.backbone, x)
        q = F.normalize(self.head(pooled).float(), dim=-1)
        q_inst = F.normalize(self.inst_head(pool_instances(fmap, masks)).float(), dim=-1)
        return q, q_inst

    @torch.no_grad()
    def _keys(self, x: torch.Tensor, masks: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Key encoder on x [B,3,S,S] (and masks [B,K,M,M]) -> k [B,D], k_inst [B,K,D] | None, normalised.

        Shuffle-BN with several ranks: the global batch is gathered, permuted by a permutation drawn on rank 0 and
        broadcast, each rank encodes its slice of the permuted batch, and the keys are gathered and un-permuted.
        """
        rank, world = rank_and_world()
        shuffle = self.cfg.moco.shuffle_bn and world > 1
        if shuffle:
            channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
            x_all = concat_all_gather(x)
            perm = torch.randperm(x_all.shape[0], device=x.device)
            dist.broadcast(perm, src=0)
            mine = perm.view(world, -1)[rank]
            x = x_all[mine]
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            if masks is not None:
                masks = concat_all_gather(masks)[mine]
        if self.freeatm:
            pooled, fmap = encode(self.key_backbone, x)
            k_inst = F.normalize(self.key_inst_head(pool_instances(fmap, masks)).float(), dim=-1)
        else:
            pooled, k_inst = self.key_backbone(x), None
        k = F.normalize(self.key_head(pooled).float(), dim=-1)
        if shuffle:
            back = torch.argsort(perm).view(world, -1)[rank]
            k = concat_all_gather(k)[back]
            if k_inst is not None:
                k_inst = concat_all_gather(k_inst)[back]
        return k, k_inst

    # ---------------------------------------------------------------------------------------------------------
    # losses

    def _image_loss(self, q: torch.Tensor, k: torch.Tensor, k_all: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q, k [B,D] local, k_all [world*B,D] gathered keys (used when there is no queue)."""
        if self.queue.shape[0] > 0:
            return info_nce(q, k, self.queue, temperature=self.cfg.moco.temperature)
        rank, _ = rank_and_world()
        B = q.shape[0]
        pos = rank * B + torch.arange(B, device=q.device)
        ones = torch.ones(B, device=q.device)
        key_valid = torch.ones(k_all.shape[0], dtype=torch.bool, device=q.device)
        return masked_info_nce(
            q, k_all, pos, temperature=self.cfg.moco.temperature, row_weight=ones, key_valid=key_valid
        )

    def _instance_loss(
        self, q_inst: torch.Tensor, k_inst_all: torch.Tensor, valid: torch.Tensor, valid_all: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """q_inst [B,K,D] local queries; k_inst_all [world*B*K,D] gathered keys; valid [B,K]; valid_all [world*B*K]."""
        B, K, D = q_inst.shape
        pos = instance_indices(B, K, q_inst.device)
        return masked_info_nce(
            q_inst.reshape(B * K, D),
            k_inst_all,
            pos,
            temperature=self.cfg.freeatm.inst_temperature,
            row_weight=valid.reshape(B * K),
            key_valid=valid_all,
            queue=self.inst_queue,
            queue_valid=self.inst_queue_valid,
        )

    def _direction(self, q, q_inst, k, k_inst, valid, valid_all) -> dict[str, torch.Tensor]:
        """Losses of one query view against the other view's keys; returns the gathered keys for the queues."""
        k_all = concat_all_gather(k)
        loss_img, acc_img = self._image_loss(q, k, k_all)
        out = {"loss_img": loss_img, "acc_img": acc_img, "k_all": k_all}
        if self.freeatm:
            B, K, D = k_inst.shape
            k_inst_all = concat_all_gather(k_inst.reshape(B * K, D))
            out["loss_inst"], out["acc_inst"] = self._instance_loss(q_inst, k_inst_all, valid, valid_all)
            out["k_inst_all"] = k_inst_all
        return out

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        """Returns "loss" (scalar, differentiable), "loss_img", "acc_img" and with Free-ATM "loss_inst",
        "acc_inst", "n_inst" (valid objects in this rank's batch, float); the logs are detached."""
        require(batch, ("view1", "view2"), "mocov2", "needs data.views=two")
        masks1 = masks2 = valid = valid_all = None
        if self.freeatm:
            require(batch, ("masks1", "masks2", "valid"), "mocov2", "freeatm.enabled needs masks")
            masks1, masks2, valid = batch["masks1"], batch["masks2"], batch["valid"].bool()
            valid_all = concat_all_gather(valid.reshape(-1))
        x1, x2 = batch["view1"], batch["view2"]

        q1, qi1 = self._queries(x1, masks1)
        k2, ki2 = self._keys(x2, masks2)
        dirs = [self._direction(q1, qi1, k2, ki2, valid, valid_all)]
        if self.cfg.moco.symmetric:
            q2, qi2 = self._queries(x2, masks2)
            k1, ki1 = self._keys(x1, masks1)
            dirs.append(self._direction(q2, qi2, k1, ki1, valid, valid_all))

        def mean(key: str) -> torch.Tensor:
            return sum(d[key] for d in dirs) / len(dirs)

        out = {"loss_img": mean("loss_img"), "acc_img": mean("acc_img")}
        loss = out["loss_img"]
        if self.freeatm:
            out["loss_inst"] = mean("loss_inst")
            out["acc_inst"] = mean("acc_inst")
            out["n_inst"] = valid.sum().float()
            loss = loss + self.cfg.freeatm.lambda_inst * out["loss_inst"]

        # queues after the loss: this step's keys become negatives from the next step on
        with torch.no_grad():
            for d in dirs:
                enqueue(self.queue, self.queue_ptr, d["k_all"])
                if self.freeatm:
                    enqueue(self.inst_queue, self.inst_queue_ptr, d["k_inst_all"], valid_all, self.inst_queue_valid)
        logs = {k: v.detach() for k, v in out.items()}
        return {"loss": loss, **logs}

    @torch.no_grad()
    def after_step(self, step: int, max_steps: int) -> None:
        """EMA of the key encoder (constant ``moco.momentum``)."""
        m = self.cfg.moco.momentum
        ema_update(self.key_backbone, self.backbone, m)
        ema_update(self.key_head, self.head, m)
        if self.freeatm:
            ema_update(self.key_inst_head, self.inst_head, m)
