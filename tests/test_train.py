"""The training engine end to end on the toy world (CPU, gloo): every shipped config trains a few steps, a
stopped-and-resumed run matches an uninterrupted one exactly, ZeRO-2 on two ranks keeps replicas identical,
bad config keys and corrupt shards are reported by name."""

from __future__ import annotations

import io
import json
import math
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

from freeatm_fast.config import ConfigError, load_config, shipped_configs

ROOT = Path(__file__).resolve().parents[1]
TRAIN_PY = ROOT / "freeatm_fast" / "train.py"

TINY = [
    "model.proj_hidden_dim=64",
    "model.proj_dim=32",
    "data.image_size=32",
    "data.mask_size=32",
    "data.local_size=16",
    "data.num_workers=0",
    "data.toy_train_images=96",
    "data.toy_val_images=48",
    "data.toy_image_size=32",
    "train.batch_size=8",
    "train.max_steps=3",
    "train.log_every=1",
    "train.warmup_steps=1",
    "train.tensorboard=false",
    "moco.queue_size=64",
    "freeatm.inst_queue_size=64",
    "multicrop.num_prototypes=16",
    "eval.knn=false",
]


MAE_TINY = [
    'model.backbone_kwargs={"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}',
    "data.patch_size=8",
    "mae.decoder_dim=32",
    "mae.decoder_depth=1",
    "mae.decoder_heads=2",
]


VLP_TINY = [
    'model.backbone_kwargs={"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}',
    "vlp.text_width=32",
    "vlp.text_layers=1",
    "vlp.text_heads=2",
    "vlp.embed_dim=16",
    "vlp.queue_size=32",
    "vlp.max_len=32",
    "vlp.retrieval_max_images=16",
]


def _cfg(name, out_dir, *extra):
    more = ["train.batch_size=4", "data.group_size=2"] if name == "stablerep" else []
    more += MAE_TINY if name.startswith("mae") else []
    more += VLP_TINY if name.startswith(("blip", "vilt")) else []
    return load_config(name, [*TINY, *more, f"train.out_dir={out_dir}", *extra])


def _metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("loader", ["torch", "dali"])
@pytest.mark.parametrize("name", sorted(shipped_configs()))
def test_every_shipped_config_trains(name, loader, toy_cache, tmp_path):
    """Every shipped config, with either loader (data.loader: the engine takes both unchanged)."""
    from freeatm_fast.engine import train

    if loader == "dali":
        pytest.importorskip("nvidia.dali", reason="DALI wheels exist for Linux only")
    summary = train(_cfg(name, tmp_path / "run", f"data.loader={loader}"))
    assert summary["steps"] == 3
    rows = _metrics(tmp_path / "run")
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(math.isfinite(r["loss"]) for r in rows)
    assert all(r["images_per_s"] > 0 and 0 <= r["data_wait"] <= 1 for r in rows)
    shipped = load_config(name)
    if shipped.freeatm.enabled and shipped.data.views == "two":  # the instance contrast (VLP: position prompts)
        assert all("loss_inst" in r for r in rows)
    assert (tmp_path / "run" / "config.yaml").is_file() and (tmp_path / "run" / "backbone.safetensors").is_file()
    assert load_config(tmp_path / "run" / "config.yaml") == _cfg(name, tmp_path / "run", f"data.loader={loader}")


def test_backbone_export_loads_in_timm_and_knn_runs(toy_cache, tmp_path):
    import timm
    import torch

    from freeatm_fast.engine import train

    run = tmp_path / "run"
    summary = train(_cfg("mocov2_freeatm", run, "eval.knn=true", "eval.knn_k=5", "train.tensorboard=true"))
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    knn = summary["eval"]["knn"]
    assert 0.0 <= knn["top1"] <= 1.0 and knn["n_val"] == 48
    assert json.loads((run / "eval_knn.json").read_text())["knn"]["top1"] == knn["top1"]
    cfg = load_config(run / "config.yaml")
    model = timm.create_model(
        cfg.model.backbone,
        pretrained=False,
        num_classes=0,
        checkpoint_path=str(run / "backbone.safetensors"),
        **cfg.model.backbone_kwargs,
    )
    assert model(torch.randn(2, 3, 32, 32)).shape[0] == 2


@pytest.mark.parametrize("zero_stage, precision", [(1, "bf16"), (3, "bf16"), (3, "fp32")])
def test_zero_stages_and_mixed_precision(zero_stage, precision, toy_cache, tmp_path):
    from safetensors.torch import load_file

    from freeatm_fast.engine import train

    cfg = _cfg("mocov2_freeatm", tmp_path / "run", f"deepspeed.zero_stage={zero_stage}", f"train.precision={precision}")
    summary = train(cfg)
    assert summary["steps"] == 3 and all(math.isfinite(r["loss"]) for r in _metrics(tmp_path / "run"))
    # the export gathers ZeRO-3 partitions: full fp32 tensors, not empty shards
    tensors = load_file(tmp_path / "run" / "backbone.safetensors")
    floats = [t for t in tensors.values() if t.is_floating_point()]
    assert floats and all(t.dtype == torch.float32 and t.numel() > 0 for t in floats)


@pytest.mark.parametrize("loader", ["torch", "dali"])
def test_stop_and_resume_matches_uninterrupted_run(loader, toy_cache, tmp_path):
    from freeatm_fast.engine import train

    if loader == "dali":
        pytest.importorskip("nvidia.dali", reason="DALI wheels exist for Linux only")
    extra = ["train.max_steps=6", "train.warmup_steps=2", "train.precision=fp32", f"data.loader={loader}"]
    train(_cfg("mocov2_freeatm", tmp_path / "a", *extra))
    first = train(_cfg("mocov2_freeatm", tmp_path / "b", *extra, "train.stop_at=3"))
    assert first["steps"] == 3 and not (tmp_path / "b" / "backbone.safetensors").exists()
    second = train(_cfg("mocov2_freeatm", tmp_path / "b", *extra))
    assert second["steps"] == 6
    a, b = _metrics(tmp_path / "a"), _metrics(tmp_path / "b")
    keys = ("loss", "loss_img", "loss_inst", "lr")
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5, 6]
    assert [[r[k] for k in keys] for r in a] == [[r[k] for k in keys] for r in b]  # exactly, step by step


def test_resume_refuses_changed_settings(toy_cache, tmp_path):
    from freeatm_fast.engine import train

    train(_cfg("mocov2", tmp_path / "run", "train.stop_at=1"))
    with pytest.raises(ConfigError, match=r"train\.lr"):
        train(_cfg("mocov2", tmp_path / "run", "train.lr=0.5"))


def test_resume_none_starts_over(toy_cache, tmp_path):
    from freeatm_fast.engine import train

    train(_cfg("mocov2", tmp_path / "run", "train.stop_at=2"))
    summary = train(_cfg("mocov2", tmp_path / "run", "train.resume=none"))
    assert summary["steps"] == 3
    assert [r["step"] for r in _metrics(tmp_path / "run")] == [1, 2, 3]  # not 1, 2, 1, 2, 3


def _corrupt_one_image(src_dir: Path, dst_dir: Path) -> tuple[str, str]:
    """Copy a shard directory, garbling the JPEG of the third sample of the first shard; return (shard, key)."""
    import shutil

    shutil.copytree(src_dir, dst_dir)
    shard = sorted(dst_dir.glob("*.tar"))[0]
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    jpgs = [m.name for m, _ in members if m.name.endswith(".jpg")]
    bad = jpgs[2]
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for m, data in members:
            if m.name == bad:
                data = data[:20] + b"\x00garbage" * 40  # a JPEG header followed by junk
                m.size = len(data)
            tar.addfile(m, io.BytesIO(data))
    shard.write_bytes(out.getvalue())
    return shard.name, bad[: -len(".jpg")]


def test_corrupt_image_is_reported_by_shard_and_key(toy_cache, tmp_path):
    from freeatm_fast.data.toyworld import default_toyworld
    from freeatm_fast.engine import train

    cfg = _cfg("mocov2", tmp_path / "run")
    root = default_toyworld(cfg.data)
    shard, key = _corrupt_one_image(root / "train", tmp_path / "bad")
    with pytest.raises(ValueError) as err:
        train(_cfg("mocov2", tmp_path / "run", f"data.root={tmp_path / 'bad'}", "train.max_steps=20"))
    assert shard in str(err.value) and key in str(err.value)
    summary = train(
        _cfg("mocov2", tmp_path / "run2", f"data.root={tmp_path / 'bad'}", "train.max_steps=20", "data.skip_bad=true")
    )
    assert summary["steps"] == 20


def test_train_py_rejects_bad_key_by_name():
    proc = subprocess.run(
        [sys.executable, str(TRAIN_PY), "--config", "mocov2_freeatm", "train.max_stepz=3"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "train.max_stepz" in proc.stderr and "max_steps" in proc.stderr


@pytest.mark.slow
def test_zero2_on_two_ranks_keeps_replicas_identical(toy_cache, tmp_path, clean_env):
    env = {**clean_env, "FREEATM_CACHE": str(toy_cache), "OMP_NUM_THREADS": "1"}
    run = tmp_path / "run"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(TRAIN_PY),
        "--config", "mocov2_freeatm", *TINY, "deepspeed.zero_stage=2", "train.export_backbone=false",
        f"train.out_dir={run}",
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 3
    assert summary["replicas_identical"] is True
    assert "parameters identical on all 2 ranks: yes" in proc.stdout
