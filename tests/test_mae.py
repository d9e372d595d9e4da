"""MAE with Free-ATM masking (issue #6): the guided-fraction schedule, what the masking selects (uniform at 0,
exactly the top patches at 1), forward/backward without host syncs, training through the engine for every
masking mode, checkpoint resume, the reconstruction picture, config errors, and the issue's command line."""

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils._python_dispatch import TorchDispatchMode

from freeatm_fast.config import ConfigError, MaeConfig, config_from_dict, load_config
from freeatm_fast.methods import build_method
from freeatm_fast.methods.mae import MAE, guided_fraction, patchify, sincos_pos_embed, unpatchify

ROOT = Path(__file__).resolve().parents[1]
S, P = 32, 8  # 16 patches
TINY_MODEL = {
    "backbone": "vit_tiny_patch16_224",
    "backbone_kwargs": {"img_size": S, "patch_size": P, "embed_dim": 32, "depth": 2, "num_heads": 2},
    "channels_last": False,
}
TINY_MAE = {"decoder_dim": 32, "decoder_depth": 1, "decoder_heads": 2}


def tiny_cfg(**mae):
    return config_from_dict(
        {
            "method": "mae",
            "model": TINY_MODEL,
            "data": {"views": "single", "image_size": S, "patch_size": P, "mask_size": S},
            "mae": {**TINY_MAE, **mae},
        }
    )


class OpRecorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func)] = self.ops.get(str(func), 0) + 1
        return func(*args, **(kwargs or {}))


# ---------------------------------------------------------------------------------------------------------------
# schedule and masking


def test_guided_fraction_schedule():
    lin = MaeConfig(masking="balance", guided_start=0.1, guided_max=0.5, schedule="linear")
    cos = MaeConfig(masking="balance", guided_start=0.1, guided_max=0.5, schedule="cosine")
    n = 101  # steps 0..100
    assert guided_fraction(lin, 0, n) == pytest.approx(0.1)
    assert guided_fraction(lin, 50, n) == pytest.approx(0.3)  # middle
    assert guided_fraction(lin, 100, n) == pytest.approx(0.5)  # last step
    assert guided_fraction(lin, 25, n) == pytest.approx(0.2)
    assert guided_fraction(cos, 0, n) == pytest.approx(0.1)
    assert guided_fraction(cos, 50, n) == pytest.approx(0.3)  # the half-cosine crosses the middle at the middle
    assert guided_fraction(cos, 25, n) == pytest.approx(0.1 + 0.4 * 0.5 * (1 - math.cos(math.pi / 4)))  # slower start
    assert guided_fraction(cos, 100, n) == pytest.approx(0.5)
    assert guided_fraction(lin, 500, n) == pytest.approx(0.5)  # past the end: stays at the end value
    values = [guided_fraction(lin, s, n) for s in range(n)]
    assert all(b >= a for a, b in zip(values, values[1:], strict=False))  # rises as training goes on
    for s in (0, 50, 100):
        assert guided_fraction(MaeConfig(masking="random"), s, n) == 0.0
        assert guided_fraction(MaeConfig(masking="top"), s, n) == 1.0


def test_random_masking_is_uniform_whatever_the_importance():
    """guided_fraction=0: each patch is masked with probability mask_ratio regardless of its importance
    (4,000 draws; every per-patch frequency within 5 sigma of 0.75), and the masked patches' importance
    averages the overall mean."""
    torch.manual_seed(0)
    model = build_method(tiny_cfg(masking="random"))
    n, L = 4000, model.num_patches
    importance = torch.linspace(0, 1, L).repeat(n, 1) ** 3  # strongly ordered importance
    ids_keep, ids_restore, mask = model.mask(importance, 0.0, generator=torch.Generator().manual_seed(1))
    assert mask.shape == (n, L) and (mask.sum(1) == model.num_masked).all()
    freq = mask.mean(0)
    p = model.num_masked / L
    sigma = math.sqrt(p * (1 - p) / n)
    assert (freq - p).abs().max() < 5 * sigma, freq
    masked_imp = (importance * mask).sum() / mask.sum()
    assert abs(float(masked_imp) - float(importance.mean())) < 0.01
    # MAE's layout: ids_keep are the unmasked patches, ids_restore inverts the shuffle
    assert torch.equal(mask.gather(1, ids_keep), torch.zeros_like(ids_keep, dtype=mask.dtype))
    assert torch.equal(torch.sort(ids_restore, 1).values, torch.arange(L).repeat(n, 1))


def test_top_masking_masks_exactly_the_most_important_patches():
    torch.manual_seed(0)
    model = build_method(tiny_cfg(masking="top"))
    n, L, M = 64, model.num_patches, model.num_masked
    importance = torch.rand(n, L)
    _, _, mask = model.mask(importance, 1.0)
    top = torch.zeros(n, L).scatter_(1, importance.topk(M, dim=1).indices, 1.0)
    assert torch.equal(mask, top)
    # balance at 0.5: the top round(0.5 M) patches are masked, plus random others, M in all
    _, _, half = model.mask(importance, 0.5)
    g = round(0.5 * M)
    top_g = torch.zeros(n, L).scatter_(1, importance.topk(g, dim=1).indices, 1.0)
    assert ((half - top_g) >= 0).all() and (half.sum(1) == M).all()
    assert not torch.equal(half, top)  # the other half is not the next most important ones


def test_patchify_and_pos_embed():
    x = torch.randn(2, 3, S, S)
    t = patchify(x, P)
    assert t.shape == (2, 16, P * P * 3)
    assert torch.equal(unpatchify(t, P, (4, 4)), x)
    assert torch.equal(t[0, 1].reshape(P, P, 3), x[0, :, :P, P : 2 * P].permute(1, 2, 0))  # raster order, HWC
    pe = sincos_pos_embed(32, (4, 4))
    assert pe.shape == (16, 32) and pe.abs().max() <= 1


# ---------------------------------------------------------------------------------------------------------------
# the model


def _batch(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"image": torch.randn(n, 3, S, S, generator=g), "importance": torch.rand(n, 16, generator=g)}


@pytest.mark.parametrize("masking", ["random", "top", "balance"])
def test_forward_backward_without_host_sync(masking):
    torch.manual_seed(0)
    model = build_method(tiny_cfg(masking=masking))
    assert isinstance(model, MAE)
    model.begin(0, 10)
    opt = torch.optim.AdamW(model.param_groups(0.05), lr=1e-3)
    with OpRecorder() as rec:
        out = model(_batch())
        out["loss"].backward()
    assert rec.ops.get("aten._local_scalar_dense.default", 0) == 0, "host sync in forward/backward"
    assert any("select_patches" in k for k in rec.ops) and any("gather_tokens" in k for k in rec.ops)
    assert torch.isfinite(out["loss"])
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    for name in ("backbone.patch_embed.proj.weight", "backbone.blocks.0.attn.qkv.weight", "decoder_pred.weight"):
        assert grads[name] is not None and grads[name].abs().sum() > 0, name
    assert grads["mask_token"].abs().sum() > 0
    opt.step()
    expected = {"random": 0.0, "top": 1.0, "balance": 0.0}[masking]
    assert float(out["guided"]) == expected
    model.after_step(9, 10)
    assert model.guided_fraction() == guided_fraction(model.cfg.mae, 10, 10)


def test_loss_counts_only_masked_patches():
    """The loss is the mean per-patch error over the masked patches only (top masking makes them known)."""
    torch.manual_seed(0)
    model = build_method(tiny_cfg(masking="top", norm_pix_loss=False)).eval()
    images = _batch(2)["image"]
    importance = torch.zeros(2, 16)
    importance[:, :12] = 1.0  # top masking: patches 0..11 masked, 12..15 visible
    assert model.num_masked == 12
    with torch.no_grad():
        torch.manual_seed(1)
        loss = float(model({"image": images, "importance": importance})["loss"])
        torch.manual_seed(1)
        ids_keep, ids_restore, mask = model.mask(importance, 1.0)
        assert mask[:, :12].eq(1).all() and mask[:, 12:].eq(0).all()
        per_patch = (model.decode(model.encode_visible(images, ids_keep), ids_restore) - patchify(images, P)).pow(2)
        per_patch = per_patch.mean(-1)
    assert loss == pytest.approx(float(per_patch[:, :12].mean()), rel=1e-5)
    assert loss != pytest.approx(float(per_patch.mean()), rel=1e-3)


def test_config_errors():
    with pytest.raises(ConfigError, match="data.views"):
        build_method(config_from_dict({"method": "mae", "model": TINY_MODEL, "data": {"image_size": S}}))
    with pytest.raises(ConfigError, match="model.backbone"):
        build_method(
            config_from_dict({"method": "mae", "model": {"backbone": "resnet10t"}, "data": {"views": "single"}})
        )
    with pytest.raises(ConfigError, match="data.patch_size"):
        cfg = {"method": "mae", "model": TINY_MODEL, "data": {"views": "single", "image_size": S, "patch_size": 16}}
        build_method(config_from_dict(cfg))
    with pytest.raises(ConfigError, match="img_size"):
        cfg = {"method": "mae", "model": TINY_MODEL, "data": {"views": "single", "image_size": 64, "patch_size": 8}}
        build_method(config_from_dict(cfg))
    with pytest.raises(ConfigError, match="mae.masking"):
        load_config("mae", ["mae.masking=half"])
    with pytest.raises(ConfigError, match="mae.decoder_heads"):
        load_config("mae", ["mae.decoder_dim=100", "mae.decoder_heads=16"])


# ---------------------------------------------------------------------------------------------------------------
# through the engine

TINY = [
    f"model.backbone_kwargs={json.dumps(TINY_MODEL['backbone_kwargs'])}",
    "mae.decoder_dim=32",
    "mae.decoder_depth=1",
    "mae.decoder_heads=2",
    f"data.image_size={S}",
    f"data.mask_size={S}",
    f"data.patch_size={P}",
    "data.num_workers=0",
    "data.toy_train_images=96",
    "data.toy_val_images=48",
    "data.toy_image_size=32",
    "train.batch_size=8",
    "train.max_steps=3",
    "train.log_every=1",
    "train.warmup_steps=1",
    "train.tensorboard=false",
    "eval.knn=false",
]


def _metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("masking", ["random", "top", "balance"])
def test_training_steps_for_each_masking_mode(masking, toy_cache, tmp_path):
    from freeatm_fast.engine import train

    cfg = load_config("mae_freeatm", [*TINY, f"mae.masking={masking}", f"train.out_dir={tmp_path / 'run'}"])
    summary = train(cfg)
    rows = _metrics(tmp_path / "run")
    assert summary["steps"] == 3 and [r["step"] for r in rows] == [1, 2, 3]
    assert all(math.isfinite(r["loss"]) for r in rows)
    want = {"random": [0.0] * 3, "top": [1.0] * 3, "balance": [0.0, 0.25, 0.5]}[masking]  # 0 -> guided_max=0.5
    assert [r["guided"] for r in rows] == pytest.approx(want)
    if masking == "top":
        assert all(r["imp_masked"] >= r["imp_all"] for r in rows)
    png = tmp_path / "run" / "reconstruction.png"
    assert summary["figures"] == [str(png)]
    with Image.open(png) as im:
        scale = 128 // S
        assert im.size == (3 * S * scale, 8 * S * scale)  # 8 val images: original | masked | reconstruction
    assert (tmp_path / "run" / "backbone.safetensors").is_file()


def test_zero3_bf16(toy_cache, tmp_path):
    """ZeRO-3 partitions the ViT's own parameters (position embedding, class token), which MAE reads outside
    the ViT's forward; DeepSpeed gathers them on access. Same masking decisions as ZeRO-0 fp32."""
    from freeatm_fast.engine import train

    z3 = train(
        load_config(
            "mae_freeatm", [*TINY, "deepspeed.zero_stage=3", "train.precision=bf16", f"train.out_dir={tmp_path / 'a'}"]
        )
    )
    z0 = train(load_config("mae_freeatm", [*TINY, f"train.out_dir={tmp_path / 'b'}"]))
    assert z3["steps"] == 3 and math.isfinite(z3["last"]["loss"])
    assert z3["last"]["imp_masked"] == z0["last"]["imp_masked"]  # masking does not depend on precision
    assert abs(z3["last"]["loss"] - z0["last"]["loss"]) < 0.05 * z0["last"]["loss"]
    assert (tmp_path / "a" / "reconstruction.png").is_file()


def test_stop_and_resume_matches_uninterrupted_run(toy_cache, tmp_path):
    """The balance schedule and the masking noise continue exactly after a resume."""
    from freeatm_fast.engine import train

    extra = [*TINY, "train.max_steps=5", "train.warmup_steps=2"]
    train(load_config("mae_freeatm", [*extra, f"train.out_dir={tmp_path / 'a'}"]))
    first = train(load_config("mae_freeatm", [*extra, "train.stop_at=2", f"train.out_dir={tmp_path / 'b'}"]))
    assert first["steps"] == 2
    second = train(load_config("mae_freeatm", [*extra, f"train.out_dir={tmp_path / 'b'}"]))
    assert second["steps"] == 5
    keys = ("loss", "guided", "imp_masked", "lr")
    a, b = _metrics(tmp_path / "a"), _metrics(tmp_path / "b")
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5]
    assert [[r[k] for k in keys] for r in a] == [[r[k] for k in keys] for r in b]


@pytest.mark.parametrize("masking", ["random", "top", "balance"])
def test_issue_command_line(masking, tmp_path, clean_env):
    """python freeatm_fast/train.py --config mae_freeatm train.max_steps=3 mae.masking=M (in a temporary run
    directory; kNN on the full toy world only for balance, to keep the suite short)."""
    cmd = [sys.executable, "freeatm_fast/train.py", "--config", "mae_freeatm", "train.max_steps=3"]
    cmd += [f"mae.masking={masking}", f"train.out_dir={tmp_path}/run"]
    if masking != "balance":
        cmd.append("eval.knn=false")
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900, env=clean_env)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-4000:]
    assert f"mae.masking={masking}" in out and "step 3/3" in out
    assert (tmp_path / "run" / "reconstruction.png").is_file()
    if masking == "balance":
        assert "knn accuracy" in out


def test_reconstruction_keeps_the_visible_patches():
    """The picture's reconstruction column keeps the visible patches of the input exactly."""
    torch.manual_seed(0)
    model = build_method(tiny_cfg(masking="random"))
    batch = _batch(3)
    masked, recon = model.reconstruct(
        batch["image"], batch["importance"], 0.0, generator=torch.Generator().manual_seed(0)
    )
    t_in, t_masked, t_rec = (patchify(v, P) for v in (batch["image"], masked, recon))
    visible = t_masked.abs().sum(-1) > 0
    assert visible.sum(1).tolist() == [16 - model.num_masked] * 3
    assert torch.allclose(t_rec[visible], t_in[visible])
    assert np.isfinite(recon.numpy()).all()
