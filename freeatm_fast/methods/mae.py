"""MAE (He et al. 2022) with Free-ATM guided masking (DESIGN §7, issue #6).

Encoder: any timm ViT (``model.backbone`` = a ``vit_*`` name, sizes in ``model.backbone_kwargs``): patch
embedding + position embedding, then only the visible patches (and the class / register tokens) go through the
blocks. Decoder: a linear map to ``mae.decoder_dim``, mask tokens, fixed 2-D sin-cos position embeddings,
``mae.decoder_depth`` transformer blocks (timm's ``Block``), a linear prediction of each patch's p*p*3 pixels.
Loss: mean squared error on the masked patches, of per-patch normalised pixels with ``mae.norm_pix_loss``.

Masking (``freeatm_kernels.select_patches``, one launch per batch, no host sync): ``mask_ratio`` of the L
patches are masked; of those, ``round(guided_fraction * num_masked)`` are the patches of highest importance
(the batch's ``importance``: mean of the union of the object masks per patch, warped with the crop, data.views
=single) and the rest are uniform at random among the others. ``mae.masking``: ``random`` (0, MAE), ``top``
(1), ``balance`` (the paper's schedule: from ``mae.guided_start`` to ``mae.guided_max`` over training, linear or
cosine). Visible tokens are gathered and the decoder's sequence restored with ``freeatm_kernels.gather_tokens``
(``mae.kernel_backend``; ``torch`` = the eager reference, for benchmarks).

Differences from the reference implementation, on purpose: the decoder sees only patch tokens (MAE also
carries the class token through it; it predicts nothing); the schedule's step counter is kept in Python (set
by the engine's ``begin``, advanced by ``after_step``), so reading it never synchronises with the device.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from freeatm_fast.config import ConfigError

from .backbone import build_backbone
from .common import Method, require


def guided_fraction(mae_cfg, step: int, max_steps: int) -> float:
    """The share of masked patches chosen by importance at ``step`` (0-based) of ``max_steps``.

    random: 0; top: 1; balance: guided_start at step 0 to guided_max at step max_steps - 1, linearly or along
    half a cosine (slow start and end)."""
    if mae_cfg.masking == "random":
        return 0.0
    if mae_cfg.masking == "top":
        return 1.0
    t = min(max(step, 0) / max(1, max_steps - 1), 1.0)
    if mae_cfg.schedule == "cosine":
        t = 0.5 * (1.0 - math.cos(math.pi * t))
    return mae_cfg.guided_start + (mae_cfg.guided_max - mae_cfg.guided_start) * t


def sincos_pos_embed(dim: int, grid: tuple[int, int]) -> torch.Tensor:
    """Fixed 2-D sin-cos position embeddings (MAE's decoder): float32 [h*w, dim], rows in raster order."""
    if dim % 4:
        raise ValueError(f"sin-cos position embedding needs a dimension divisible by 4, got {dim}")
    h, w = grid
    omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4))

    def embed(pos: np.ndarray) -> np.ndarray:
        out = pos.reshape(-1)[:, None] * omega[None]
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    gy, gx = np.meshgrid(np.arange(h, dtype=np.float64), np.arange(w, dtype=np.float64), indexing="ij")
    return torch.from_numpy(np.concatenate([embed(gy), embed(gx)], axis=1)).float()


def patchify(images: torch.Tensor, p: int) -> torch.Tensor:
    """[B,3,H,W] -> [B, (H/p)*(W/p), p*p*3], each patch's pixels in (row, column, channel) order (MAE's)."""
    b, c, h, w = images.shape
    x = images.reshape(b, c, h // p, p, w // p, p)
    return torch.einsum("nchpwq->nhwpqc", x).reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(patches: torch.Tensor, p: int, grid: tuple[int, int]) -> torch.Tensor:
    """Inverse of :func:`patchify`: [B, L, p*p*3] -> [B,3,h*p,w*p]."""
    b = patches.shape[0]
    h, w = grid
    x = patches.reshape(b, h, w, p, p, 3)
    return torch.einsum("nhwpqc->nchpwq", x).reshape(b, 3, h * p, w * p)


class MAE(Method):
    """Masked autoencoder on a timm ViT. Batch (data.views=single): "image" [B,3,S,S], "importance" [B,L]."""

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        from timm.models.vision_transformer import Block

        self.backbone = vit = build_backbone(cfg.model)
        needed = ("patch_embed", "blocks", "pos_embed", "num_prefix_tokens", "norm")
        if not all(hasattr(vit, a) for a in needed) or not hasattr(vit.patch_embed, "grid_size"):
            raise ConfigError(
                f"model.backbone: mae needs a timm VisionTransformer (a vit_* model), got {cfg.model.backbone!r}"
            )
        if cfg.data.views != "single":
            raise ConfigError(
                f"data.views: mae needs data.views=single (one view + patch importance), got {cfg.data.views!r}"
            )
        p = vit.patch_embed.patch_size
        self.patch = int(p[0] if isinstance(p, (tuple, list)) else p)
        self.grid = tuple(int(g) for g in vit.patch_embed.grid_size)
        img = vit.patch_embed.img_size
        img = tuple(img) if isinstance(img, (tuple, list)) else (img, img)
        if img != (cfg.data.image_size, cfg.data.image_size):
            raise ConfigError(
                f"model.backbone_kwargs: the ViT takes {img[0]}x{img[1]} images but data.image_size="
                f"{cfg.data.image_size}; set img_size: {cfg.data.image_size} in model.backbone_kwargs"
            )
        if cfg.data.patch_size != self.patch:
            raise ConfigError(
                f"data.patch_size: must equal the ViT's patch size {self.patch} (the importance grid), got "
                f"{cfg.data.patch_size}"
            )
        mc = cfg.mae
        self.num_patches = self.grid[0] * self.grid[1]
        self.num_masked = self.num_patches - int(self.num_patches * (1 - mc.mask_ratio))  # MAE's len_keep rounding
        if not 0 < self.num_masked < self.num_patches:
            raise ConfigError(f"mae.mask_ratio: {mc.mask_ratio} masks {self.num_masked} of {self.num_patches} patches")
        d = int(vit.embed_dim)
        dd = mc.decoder_dim
        self.decoder_embed = nn.Linear(d, dd)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dd))
        self.register_buffer("decoder_pos", sincos_pos_embed(dd, self.grid)[None], persistent=False)
        self.decoder_blocks = nn.Sequential(
            *[Block(dd, mc.decoder_heads, mlp_ratio=4.0, qkv_bias=True) for _ in range(mc.decoder_depth)]
        )
        self.decoder_norm = nn.LayerNorm(dd, eps=1e-6)
        self.decoder_pred = nn.Linear(dd, self.patch * self.patch * 3)
        nn.init.normal_(self.mask_token, std=0.02)
        for m in [self.decoder_embed, self.decoder_pred, *self.decoder_blocks.modules()]:
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        self._step = 0
        self._max_steps = cfg.train.max_steps

    # ---- schedule (host-side counter: no device sync)

    def begin(self, step: int, max_steps: int) -> None:
        self._step, self._max_steps = int(step), int(max_steps)

    def after_step(self, step: int, max_steps: int) -> None:
        self._step, self._max_steps = int(step) + 1, int(max_steps)

    def guided_fraction(self) -> float:
        return guided_fraction(self.cfg.mae, self._step, self._max_steps)

    # ---- pieces

    def mask(self, importance: torch.Tensor, fraction: float, generator: torch.Generator | None = None):
        """select_patches for this model: (ids_keep [B,L-M], ids_restore [B,L], mask float32 [B,L], 1 = masked)."""
        from freeatm_kernels import select_patches

        return select_patches(
            importance.float(), self.num_masked, fraction, generator=generator, backend=self.cfg.mae.kernel_backend
        )

    def encode_visible(self, x: torch.Tensor, ids_keep: torch.Tensor) -> torch.Tensor:
        """The encoder on the kept patches: [B, prefix + L-M, D] after the final norm."""
        from freeatm_kernels import gather_tokens

        vit = self.backbone
        t = vit.patch_embed(x)
        if t.dim() == 4:  # patch embeddings left in NHWC by some timm options
            t = t.flatten(1, 2)
        npfx = int(vit.num_prefix_tokens)
        pos = vit.pos_embed
        prefix_pos = None
        if pos is not None:
            if getattr(vit, "no_embed_class", False) or pos.shape[1] == self.num_patches:
                t = t + pos
            else:
                t = t + pos[:, npfx:]
                prefix_pos = pos[:, :npfx]
        t = gather_tokens(t, ids_keep, backend=self.cfg.mae.kernel_backend)
        tokens = (getattr(vit, "cls_token", None), getattr(vit, "reg_token", None))
        prefix = [tok.expand(t.shape[0], -1, -1) for tok in tokens if tok is not None]
        if prefix:
            pre = torch.cat(prefix, 1)
            if prefix_pos is not None:
                pre = pre + prefix_pos
            t = torch.cat([pre.to(t.dtype), t], 1)
        t = vit.pos_drop(t)
        t = vit.norm_pre(t)
        t = vit.blocks(t)
        return vit.norm(t)

    def decode(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """Visible latents (with prefix) + mask tokens, unshuffled -> predicted patches [B, L, p*p*3]."""
        from freeatm_kernels import gather_tokens

        npfx = int(self.backbone.num_prefix_tokens)
        vis = self.decoder_embed(latent[:, npfx:])
        b, keep, dd = vis.shape
        full = torch.cat([vis, self.mask_token.to(vis.dtype).expand(b, self.num_patches - keep, dd)], 1)
        full = gather_tokens(full, ids_restore, backend=self.cfg.mae.kernel_backend)  # back to raster order
        full = full + self.decoder_pos.to(full.dtype)
        return self.decoder_pred(self.decoder_norm(self.decoder_blocks(full)))

    def target(self, images: torch.Tensor) -> torch.Tensor:
        """The regression target per patch [B, L, p*p*3] (normalised per patch with mae.norm_pix_loss)."""
        t = patchify(images.float(), self.patch)
        if self.cfg.mae.norm_pix_loss:
            mean = t.mean(-1, keepdim=True)
            var = t.var(-1, keepdim=True)
            t = (t - mean) / (var + 1e-6).sqrt()
        return t

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        """Returns "loss" and logs: "guided" (this step's guided_fraction), "imp_masked" / "imp_all" (mean
        importance of the masked patches / of all patches: guidance raises the first)."""
        require(batch, ("image", "importance"), "mae", "needs data.views=single")
        x, importance = batch["image"], batch["importance"]
        if importance.shape[1] != self.num_patches:
            raise ValueError(
                f"mae: batch importance has {importance.shape[1]} patches, the ViT {self.num_patches} "
                f"(data.patch_size / data.image_size vs the model)"
            )
        frac = self.guided_fraction()
        ids_keep, ids_restore, mask = self.mask(importance, frac)
        pred = self.decode(self.encode_visible(x, ids_keep), ids_restore)
        per_patch = (pred.float() - self.target(x)).pow(2).mean(-1)
        loss = (per_patch * mask).sum() / mask.sum()
        imp = importance.float()
        return {
            "loss": loss,
            "guided": torch.tensor(frac),
            "imp_masked": ((imp * mask).sum() / mask.sum()).detach(),
            "imp_all": imp.mean().detach(),
        }

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor, importance: torch.Tensor, fraction=None, generator=None):
        """(masked input, reconstruction) as images [B,3,S,S] in the input's normalisation: masked patches zero
        in the first; in the second the visible patches are the input's and the masked ones the prediction
        (de-normalised with each patch's own mean / std under norm_pix_loss, as MAE's figures do)."""
        frac = self.guided_fraction() if fraction is None else fraction
        ids_keep, ids_restore, mask = self.mask(importance, frac, generator=generator)
        pred = self.decode(self.encode_visible(images, ids_keep), ids_restore).float()
        patches = patchify(images.float(), self.patch)
        if self.cfg.mae.norm_pix_loss:
            mean = patches.mean(-1, keepdim=True)
            std = (patches.var(-1, keepdim=True) + 1e-6).sqrt()
            pred = pred * std + mean
        m = mask[..., None]
        masked = unpatchify(patches * (1 - m), self.patch, self.grid)
        recon = unpatchify(patches * (1 - m) + pred * m, self.patch, self.grid)
        return masked, recon

    def write_figures(self, run_dir, batch: dict, *, max_images: int = 8) -> list:
        """reconstruction.png in ``run_dir``: rows of (original | masked | reconstruction) for up to
        ``max_images`` images of ``batch`` (a data.views=single batch, on this module's device)."""
        from pathlib import Path

        from PIL import Image

        from freeatm_fast.data.views import IMAGENET_MEAN, IMAGENET_STD

        images = batch["image"][:max_images]
        importance = batch["importance"][:max_images]
        gen = torch.Generator(device=images.device).manual_seed(0)
        was_training = self.training
        self.eval()
        try:
            masked, recon = self.reconstruct(images, importance, generator=gen)
        finally:
            self.train(was_training)
        mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=images.device).view(1, 3, 1, 1)
        cols = [(t.float() * std + mean).clamp(0, 1) for t in (images, masked, recon)]
        grid = torch.cat([torch.cat(cols, dim=3)[i] for i in range(len(images))], dim=1)  # [3, n*S, 3*S]
        pixels = (grid.permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)
        picture = Image.fromarray(pixels)
        scale = max(1, 128 // images.shape[-1])  # small images are enlarged (nearest) to be readable
        if scale > 1:
            picture = picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST)
        path = Path(run_dir) / "reconstruction.png"
        tmp = path.with_name(f".{path.name}.tmp")
        picture.save(tmp, format="PNG")
        tmp.replace(path)
        return [path]
