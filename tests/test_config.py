"""Config: shipped YAML files, dotted overrides, unknown keys rejected by name, resumability check."""

from __future__ import annotations

import pytest

from freeatm_fast.config import (
    Config,
    ConfigError,
    config_from_dict,
    load_config,
    parse_override,
    save_config,
    shipped_configs,
)
from freeatm_fast.engine import check_resumable, deepspeed_config
from freeatm_fast.optim import LARS, build_optimizer, warmup_cosine

REQUIRED = {"mocov2_freeatm", "mocov2", "simclr_freeatm", "simclr", "stablerep", "detcon", "multicrop"}


def test_shipped_configs_load_and_roundtrip(tmp_path):
    names = set(shipped_configs())
    assert REQUIRED <= names
    for name in sorted(names):
        cfg = load_config(name)
        assert isinstance(cfg, Config)
        save_config(cfg, tmp_path / f"{name}.yaml")
        assert load_config(tmp_path / f"{name}.yaml") == cfg  # the saved run config reloads to the same thing


def test_freeatm_configs_enable_instance_contrast():
    for name in ("mocov2_freeatm", "simclr_freeatm"):
        cfg = load_config(name)
        assert cfg.freeatm.enabled and cfg.data.instance_views
    assert not load_config("mocov2").freeatm.enabled


def test_overrides_win_and_are_typed():
    cfg = load_config(
        "mocov2_freeatm",
        ["train.max_steps=7", "data.root=/x/y", "data.loader=torch", "deepspeed.zero_stage=2", "train.lr=0.5"],
    )
    assert cfg.train.max_steps == 7 and cfg.data.root == "/x/y" and cfg.deepspeed.zero_stage == 2
    assert cfg.train.lr == 0.5 and isinstance(cfg.train.lr, float)
    assert parse_override("data.crop_scale=[0.3, 1.0]") == (["data", "crop_scale"], [0.3, 1.0])


@pytest.mark.parametrize(
    "override, named",
    [
        ("train.max_stepz=3", "train.max_stepz"),
        ("trian.max_steps=3", "trian"),
        ("data.views.x=1", "data.views"),
        ("model.backbone_kwargs=3", "model.backbone_kwargs"),
    ],
)
def test_bad_key_rejected_with_its_name(override, named):
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        load_config("mocov2", [override])


@pytest.mark.parametrize(
    "override, named",
    [
        ("train.max_steps=0", "train.max_steps"),
        ("train.max_steps=abc", "train.max_steps"),
        ("train.optimizer=rmsprop", "train.optimizer"),
        ("deepspeed.zero_stage=4", "deepspeed.zero_stage"),
        ("data.loader=tf", "data.loader"),
        ("method=byol", "method"),
        ("freeatm.enabled=maybe", "freeatm.enabled"),
    ],
)
def test_bad_value_rejected_with_its_name(override, named):
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        load_config("mocov2", [override])


def test_unknown_key_in_yaml_file_is_named(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("base: mocov2\ntrain:\n  max_steps: 5\n  warmup: 3\n")
    with pytest.raises(ConfigError, match=r"train\.warmup.*did you mean 'warmup_steps'"):
        load_config(path)
    with pytest.raises(ConfigError, match="no shipped config named 'nope'"):
        load_config("nope")


def test_configs_are_frozen():
    cfg = load_config("mocov2")
    with pytest.raises(AttributeError):
        cfg.train.max_steps = 3  # type: ignore[misc]


def test_resume_refuses_other_settings_but_allows_more_steps():
    a = config_from_dict({"train": {"max_steps": 10}})
    check_resumable(a, config_from_dict({"train": {"max_steps": 20, "log_every": 1}}))
    with pytest.raises(ConfigError, match=r"train\.lr"):
        check_resumable(a, config_from_dict({"train": {"max_steps": 10, "lr": 1.0}}))


def test_deepspeed_config_generated():
    cfg = load_config("simclr", ["deepspeed.zero_stage=2", "train.precision=bf16", "train.clip_grad=1.0"])
    ds = deepspeed_config(cfg, world_size=4)
    assert ds["train_batch_size"] == 4 * cfg.train.batch_size
    assert ds["zero_optimization"]["stage"] == 2
    assert ds["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"}  # fp32 weights, bf16 compute
    assert "torch_autocast" not in deepspeed_config(load_config("simclr"), 1)
    assert ds["gradient_clipping"] == 1.0
    extra = load_config("mocov2", ['deepspeed.extra={"zero_optimization": {"overlap_comm": true}}'])
    assert deepspeed_config(extra, 1)["zero_optimization"] == {"stage": 0, "overlap_comm": True}


def test_warmup_cosine_schedule():
    f = lambda s: warmup_cosine(s, max_steps=110, warmup_steps=10, min_ratio=0.1)  # noqa: E731
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0) and f(60) == pytest.approx(0.55) and f(110) == pytest.approx(0.1)


def test_lars_scales_by_trust_ratio_and_skips_excluded():
    import torch

    w = torch.nn.Parameter(torch.full((4,), 2.0))  # ||w|| = 4
    b = torch.nn.Parameter(torch.full((4,), 2.0))
    opt = LARS([{"params": [w], "lars_exclude": False}, {"params": [b], "lars_exclude": True}], lr=1.0, eta=0.25)
    w.grad = torch.full((4,), 1.0)  # ||g|| = 2 -> trust = 0.25 * 4 / 2 = 0.5
    b.grad = torch.full((4,), 1.0)
    opt.step()
    assert torch.allclose(w, torch.full((4,), 1.5))  # 2 - lr * trust * g
    assert torch.allclose(b, torch.full((4,), 1.0))  # excluded: plain SGD step of 1
    with pytest.raises(ValueError, match="sgd, lars or adamw"):
        build_optimizer("rmsprop", [{"params": [w]}], lr=1.0, momentum=0.9, betas=(0.9, 0.99))
