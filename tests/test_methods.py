"""Methods (DESIGN §7): every method trains, the Free-ATM instance loss goes through mask_pool, the losses match
slow references, queues wrap, EMA math, Sinkhorn marginals, ViT feature maps, pretrained files, optimizer groups,
no host sync in a training step, and the distributed paths (2 gloo ranks) match one process."""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from freeatm_fast.config import ConfigError, config_from_dict
from freeatm_fast.methods import METHOD_REGISTRY, build_method, method_class, register_method
from freeatm_fast.methods.backbone import build_backbone, encode, feature_map
from freeatm_fast.methods.common import (
    Method,
    ema_update,
    enqueue,
    masked_info_nce,
    pool_instances,
    two_view_info_nce,
)
from freeatm_fast.methods.multicrop import sinkhorn
from freeatm_kernels import mask_pool_reference

REPO = Path(__file__).resolve().parents[1]
B, K, S, M = 4, 3, 32, 32


def tiny_cfg(method: str, freeatm: bool = False, **sections):
    """resnet10t at 32x32 with output stride 8 (a 4x4 feature map, so that masks matter), tiny heads."""
    tree = {
        "method": method,
        "model": {
            "backbone": "resnet10t",
            "backbone_kwargs": {"output_stride": 8},
            "proj_hidden_dim": 32,
            "proj_dim": 16,
            "channels_last": False,
        },
        "data": {"image_size": S, "max_objects": K, "mask_size": M, "local_size": 16, "local_crops": 2},
        "freeatm": {"enabled": freeatm, "inst_queue_size": 7},
        "moco": {"queue_size": 10},
        "multicrop": {"num_prototypes": 10, "freeze_prototypes_steps": 1},
    }
    for name, values in sections.items():
        tree.setdefault(name, {}).update(values)
    return config_from_dict(tree)


def make_batch(seed: int = 0, valid: torch.Tensor | None = None) -> dict:
    """A synthetic batch with every key of the batch contract (two views, multicrop and caption groups)."""
    g = torch.Generator().manual_seed(seed)
    if valid is None:
        valid = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 0, 0], [1, 1, 1]], dtype=torch.bool)

    def masks():
        m = torch.randint(0, 256, (B, K, M, M), dtype=torch.uint8, generator=g)
        return m * valid[:, :, None, None].to(torch.uint8)  # absent objects have empty masks

    return {
        "index": torch.arange(B),
        "label": torch.full((B,), -1),
        "view1": torch.randn(B, 3, S, S, generator=g),
        "view2": torch.randn(B, 3, S, S, generator=g),
        "masks1": masks(),
        "masks2": masks(),
        "valid": valid,
        "crops": [torch.randn(B, 3, S, S, generator=g) for _ in range(2)]
        + [torch.randn(B, 3, 16, 16, generator=g) for _ in range(2)],
        "images": torch.randn(B, 2, 3, S, S, generator=g),
        "group": torch.tensor([0, 1, 0, 2]),
    }


class OpRecorder(TorchDispatchMode):
    """Counts the aten / custom ops that run (a host sync shows up as aten._local_scalar_dense)."""

    def __init__(self):
        super().__init__()
        self.ops: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        self.ops[name] = self.ops.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


METHOD_REGISTRY_CLASSES = {name: method_class(name) for name in METHOD_REGISTRY}

CASES = [
    ("mocov2", False, {}),
    ("mocov2", True, {}),
    ("mocov2", True, {"moco": {"symmetric": True, "queue_size": 0}}),
    ("simclr", False, {}),
    ("simclr", True, {}),
    ("stablerep", False, {}),
    ("detcon", False, {}),
    ("detcon", False, {"detcon": {"momentum": 0.0}}),
    ("multicrop", False, {}),
]


@pytest.mark.parametrize(
    ("method", "freeatm", "extra"),
    CASES,
    ids=[f"{m}{'+freeatm' if f else ''}{''.join(f'-{k}' for s in e.values() for k in s)}" for m, f, e in CASES],
)
def test_method_trains_three_steps_without_host_sync(method, freeatm, extra):
    torch.manual_seed(0)
    model = build_method(tiny_cfg(method, freeatm, **extra))
    assert isinstance(model, Method) and isinstance(model, METHOD_REGISTRY_CLASSES[method])
    opt = torch.optim.SGD(model.param_groups(1e-4), lr=0.5, momentum=0.9)
    batch = make_batch()
    before = [p.detach().clone() for p in model.backbone.parameters()]
    losses = []
    for step in range(3):
        with OpRecorder() as rec:
            out = model(batch)
            out["loss"].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            model.after_step(step, 3)
        assert rec.ops.get("aten._local_scalar_dense.default", 0) == 0, "host sync in forward/backward"
        uses_masks = freeatm or method == "detcon"
        assert ("freeatm.mask_pool.default" in rec.ops) == uses_masks
        assert out["loss"].dim() == 0 and out["loss"].requires_grad
        for key, value in out.items():
            assert value.dim() == 0 and torch.isfinite(value), key
            if key != "loss":
                assert not value.requires_grad, key
        losses.append(float(out["loss"].detach()))
    assert len(set(losses)) == 3, losses
    assert any(not torch.equal(a, p) for a, p in zip(before, model.backbone.parameters(), strict=True))
    if freeatm:
        assert {"loss_img", "loss_inst", "acc_img", "acc_inst", "n_inst"} <= set(out)
        assert float(out["n_inst"]) == 6.0


def test_registry_and_unknown_method():
    saved = METHOD_REGISTRY.pop("mae")
    try:
        with pytest.raises(ConfigError, match="method: 'mae' is not implemented"):
            build_method(config_from_dict({"method": "mae"}))
    finally:
        METHOD_REGISTRY["mae"] = saved
    register_method("simclr_alias", "freeatm_fast.methods.simclr:SimCLR")
    try:
        assert method_class("simclr_alias") is METHOD_REGISTRY_CLASSES["simclr"]
    finally:
        METHOD_REGISTRY.pop("simclr_alias")
    with pytest.raises(ValueError, match="module:Class"):
        register_method("x", "no_colon")


def test_importing_methods_stays_light():
    code = "import sys, freeatm_fast.methods; print(sorted(m for m in ('torch', 'timm', 'PIL') if m in sys.modules))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


@pytest.mark.parametrize("method", ["mocov2", "simclr"])
def test_instance_loss_uses_mask_pool_and_depends_on_masks(method):
    torch.manual_seed(0)
    model = build_method(tiny_cfg(method, True))
    twin = copy.deepcopy(model)  # MoCo's queues change during forward: compare from the same state
    batch = make_batch(0)
    other = dict(batch, masks1=torch.flip(batch["masks1"], dims=[-1]))
    with OpRecorder() as rec:
        a = model(batch)
    b = twin(other)
    assert rec.ops["freeatm.mask_pool.default"] >= 1
    assert torch.equal(a["loss_img"], b["loss_img"])
    assert not torch.allclose(a["loss_inst"], b["loss_inst"])


def test_no_valid_objects_gives_finite_loss():
    none = torch.zeros(B, K, dtype=torch.bool)
    for method, freeatm in (("mocov2", True), ("simclr", True), ("detcon", False)):
        torch.manual_seed(0)
        model = build_method(tiny_cfg(method, freeatm))
        out = model(make_batch(1, valid=none))
        out["loss"].backward()
        assert torch.isfinite(out["loss"])
        inst = out["loss_inst"]
        assert float(inst) == 0.0 and float(out["n_inst"]) == 0.0
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        assert grads and all(torch.isfinite(g).all() for g in grads)


def _slow_masked_info_nce(q, keys, pos, temperature, row_weight, key_valid, exclude, queue, queue_valid):
    """Per-row reference with explicit Python lists of negatives."""
    total, weight = 0.0, 0.0
    for i in range(q.shape[0]):
        if row_weight[i] == 0:
            continue
        logits = [float(q[i] @ keys[pos[i]])]
        for j in range(keys.shape[0]):
            if j != pos[i] and j != exclude[i] and key_valid[j]:
                logits.append(float(q[i] @ keys[j]))
        for j in range(queue.shape[0]):
            if queue_valid[j]:
                logits.append(float(q[i] @ queue[j]))
        t = torch.tensor(logits, dtype=torch.float64) / temperature
        total += float(row_weight[i]) * float(torch.logsumexp(t, 0) - t[0])
        weight += float(row_weight[i])
    return total / weight if weight else 0.0


def test_masked_info_nce_matches_slow_reference():
    g = torch.Generator().manual_seed(3)
    n, m, qn, d = 6, 9, 5, 8
    q = F.normalize(torch.randn(n, d, generator=g), dim=1)
    keys = F.normalize(torch.randn(m, d, generator=g), dim=1)
    queue = F.normalize(torch.randn(qn, d, generator=g), dim=1)
    pos = torch.tensor([0, 2, 4, 6, 8, 1])
    exclude = torch.tensor([1, 3, 5, 7, 0, 2])
    row_weight = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.5, 1.0])
    key_valid = torch.tensor([1, 0, 1, 1, 0, 1, 1, 1, 0], dtype=torch.bool)  # key 8 (row 4's positive) is invalid
    queue_valid = torch.tensor([1, 0, 1, 0, 1], dtype=torch.bool)
    loss, acc = masked_info_nce(
        q, keys, pos, temperature=0.2, row_weight=row_weight, key_valid=key_valid, exclude_index=exclude,
        queue=queue, queue_valid=queue_valid,
    )  # fmt: skip
    ref = _slow_masked_info_nce(q, keys, pos, 0.2, row_weight, key_valid, exclude, queue, queue_valid)
    assert math.isclose(float(loss), ref, rel_tol=1e-5)
    assert 0.0 <= float(acc) <= 1.0


def test_two_view_info_nce_is_nt_xent():
    g = torch.Generator().manual_seed(4)
    z1 = F.normalize(torch.randn(5, 8, generator=g), dim=1)
    z2 = F.normalize(torch.randn(5, 8, generator=g), dim=1)
    loss, _ = two_view_info_nce(z1, z2, z1, z2, temperature=0.5, targets_have_grad=True)
    # SimCLR's NT-Xent written the usual way: a 2n x 2n similarity matrix with the diagonal removed
    z = torch.cat([z1, z2])
    sim = (z @ z.T / 0.5).fill_diagonal_(float("-inf"))
    target = torch.cat([torch.arange(5, 10), torch.arange(5)])
    assert torch.allclose(loss, F.cross_entropy(sim, target), rtol=1e-5)


def test_queue_pointer_wraps():
    queue = torch.zeros(5, 2)
    flags = torch.zeros(5, dtype=torch.bool)
    ptr = torch.zeros((), dtype=torch.long)
    keys = torch.arange(1, 13, dtype=torch.float32)[:, None].repeat(1, 2)  # key i has value i
    enqueue(queue, ptr, keys[:3], torch.tensor([1, 0, 1], dtype=torch.bool), flags)
    assert ptr.item() == 3 and queue[:, 0].tolist() == [1, 2, 3, 0, 0] and flags.tolist() == [1, 0, 1, 0, 0]
    enqueue(queue, ptr, keys[3:6], torch.tensor([1, 1, 1], dtype=torch.bool), flags)  # 3 does not divide 5
    assert ptr.item() == 1 and queue[:, 0].tolist() == [6, 2, 3, 4, 5] and flags.tolist() == [1, 0, 1, 1, 1]
    enqueue(queue, ptr, keys[6:13], torch.zeros(6, dtype=torch.bool), flags)  # more keys than slots: last 5 kept
    assert ptr.item() == 2
    assert sorted(queue[:, 0].tolist()) == [8, 9, 10, 11, 12] and queue[1, 0] == 12 and not flags.any()


def test_moco_queue_fills_with_keys():
    torch.manual_seed(0)
    model = build_method(tiny_cfg("mocov2", True, moco={"queue_size": 6}))
    model(make_batch())
    model(make_batch(1))
    assert model.queue_ptr.item() == (2 * B) % 6
    assert model.inst_queue_ptr.item() == (2 * B * K) % 7
    assert torch.allclose(model.queue.norm(dim=1), torch.ones(6))
    # 7 slots hold the last 7 of the second batch's 12 instances, of which 3 are valid
    assert model.inst_queue_valid.tolist() == make_batch()["valid"].reshape(-1)[-7:].roll(2 * B * K % 7).tolist()


def test_ema_update_math_plain_and_zero3_shards():
    torch.manual_seed(0)
    online, target = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    pairs = list(zip(target.parameters(), online.parameters(), strict=True))
    expect = [0.9 * t.detach() + 0.1 * o.detach() for t, o in pairs]
    ema_update(target, online, 0.9)
    for e, t in zip(expect, target.parameters(), strict=True):
        assert torch.allclose(e, t)
    # ZeRO-3 style: the local shard lives in p.ds_tensor; p.data is an empty placeholder that must stay untouched
    for mod in (online, target):
        for p in mod.parameters():
            p.ds_tensor = torch.randn(4)
    expect = [0.5 * t.ds_tensor + 0.5 * o.ds_tensor for t, o in pairs]
    data_before = [t.detach().clone() for t in target.parameters()]
    ema_update(target, online, 0.5)
    for e, t, d in zip(expect, target.parameters(), data_before, strict=True):
        assert torch.allclose(e, t.ds_tensor) and torch.equal(d, t.detach())


def test_sinkhorn_marginals():
    g = torch.Generator().manual_seed(0)
    z = F.normalize(torch.randn(64, 16, generator=g), dim=1)
    protos = F.normalize(torch.randn(8, 16, generator=g), dim=1)
    codes = sinkhorn(z @ protos.T, iters=100, epsilon=0.05)
    assert torch.allclose(codes.sum(dim=1), torch.ones(64), atol=1e-5)  # each sample: a distribution
    assert torch.allclose(codes.sum(dim=0), torch.full((8,), 64 / 8), rtol=1e-3)  # equal prototype use
    few = sinkhorn(z @ protos.T, iters=3, epsilon=0.05)
    assert torch.allclose(few.sum(dim=1), torch.ones(64), atol=1e-5)
    assert (few.sum(dim=0) - 8).abs().max() < (torch.softmax(z @ protos.T / 0.05, 1).sum(0) - 8).abs().max()


def test_multicrop_prototypes_frozen_then_normalised():
    torch.manual_seed(0)
    model = build_method(tiny_cfg("multicrop", multicrop={"num_prototypes": 10, "freeze_prototypes_steps": 2}))
    opt = torch.optim.SGD(model.param_groups(0.0), lr=1.0)
    w0 = model.prototypes.weight.detach().clone()
    for step in range(3):
        model(make_batch(step))["loss"].backward()
        grad = model.prototypes.weight.grad
        assert (grad.abs().sum() == 0) == (step < 2), step
        opt.step()
        opt.zero_grad()
        model.after_step(step, 3)
        if step < 2:
            assert torch.allclose(model.prototypes.weight, w0)
    assert not torch.allclose(model.prototypes.weight, w0)
    assert torch.allclose(model.prototypes.weight.norm(dim=1), torch.ones(10), atol=1e-6)


def test_cnn_feature_map_and_encode():
    torch.manual_seed(0)
    cfg = tiny_cfg("mocov2")
    backbone = build_backbone(cfg.model).eval()
    x = torch.randn(2, 3, S, S)
    pooled, fmap = encode(backbone, x)
    assert fmap.shape == (2, 512, 4, 4) and torch.allclose(pooled, backbone(x))
    assert torch.allclose(feature_map(backbone, x), fmap)


def test_vit_feature_map_and_mocov2_freeatm():
    model_cfg = {"backbone": "vit_tiny_patch16_224", "backbone_kwargs": {"img_size": S, "patch_size": 8}}
    torch.manual_seed(0)
    model = build_method(tiny_cfg("mocov2", True, model=model_cfg))
    x = torch.randn(2, 3, S, S)
    fmap = model.feature_map(x)
    assert fmap.shape == (2, 192, 4, 4)
    tokens = model.backbone.forward_features(x)
    assert torch.allclose(fmap.permute(0, 2, 3, 1).reshape(2, 16, 192), tokens[:, 1:])  # class token dropped
    opt = torch.optim.SGD(model.param_groups(1e-4), lr=0.1)
    with OpRecorder() as rec:
        out = model(make_batch())
        out["loss"].backward()
    opt.step()
    model.after_step(0, 1)
    assert "freeatm.mask_pool.default" in rec.ops and torch.isfinite(out["loss"])
    assert rec.ops.get("aten._local_scalar_dense.default", 0) == 0


def test_pool_instances_matches_reference_and_resizes_odd_masks():
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(2, 5, 4, 4, generator=g)
    masks = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8, generator=g)
    assert torch.allclose(pool_instances(feats, masks), mask_pool_reference(feats, masks)[0], atol=1e-6)
    odd = torch.randint(0, 256, (2, 3, 30, 30), dtype=torch.uint8, generator=g)  # 30 is not a multiple of 4
    area = F.interpolate(odd.float() / 255, size=(4, 4), mode="area")
    assert torch.allclose(pool_instances(feats, odd), mask_pool_reference(feats, area)[0], atol=1e-6)


def test_pretrained_file_loading_and_errors(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    cfg = tiny_cfg("simclr")
    source = build_backbone(cfg.model)
    state = {k: v.contiguous() for k, v in source.state_dict().items()}
    st = tmp_path / "backbone.safetensors"
    save_file(state, str(st))
    pth = tmp_path / "ckpt.pth"  # a training checkpoint: wrapped, with DDP prefixes and an ImageNet classifier
    wrapped = {f"module.{k}": v for k, v in state.items()}
    wrapped.update({"module.fc.weight": torch.zeros(10, 512), "module.fc.bias": torch.zeros(10)})
    torch.save({"state_dict": wrapped, "epoch": 3}, pth)
    for path in (st, pth):
        loaded = build_backbone(tiny_cfg("simclr", model={"pretrained": str(path)}).model)
        for k, v in loaded.state_dict().items():
            assert torch.equal(v, state[k]), (path, k)

    bad_keys = tmp_path / "other.safetensors"
    save_file({"conv.weight": torch.zeros(1), **{k: v for k, v in list(state.items())[1:]}}, str(bad_keys))
    first = next(iter(state))
    with pytest.raises(ConfigError, match=rf"other\.safetensors.*missing: {first}.*unexpected: conv\.weight"):
        build_backbone(tiny_cfg("simclr", model={"pretrained": str(bad_keys)}).model)
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match=r"model\.pretrained: cannot read checkpoint .*corrupt\.pth"):
        build_backbone(tiny_cfg("simclr", model={"pretrained": str(corrupt)}).model)
    with pytest.raises(ConfigError, match="missing.pth' is not a file"):
        build_backbone(tiny_cfg("simclr", model={"pretrained": str(tmp_path / "missing.pth")}).model)
    with pytest.raises(ConfigError, match="model.backbone: 'resnet_nope'"):
        build_backbone(tiny_cfg("simclr", model={"backbone": "resnet_nope"}).model)


def test_param_groups_exclude_norms_biases_and_momentum_encoders():
    model = build_method(tiny_cfg("mocov2", True))
    groups = model.param_groups(0.05)
    decay, no_decay = groups
    assert decay["weight_decay"] == 0.05 and decay["lars_exclude"] is False
    assert no_decay["weight_decay"] == 0.0 and no_decay["lars_exclude"] is True
    assert all(p.ndim >= 2 for p in decay["params"]) and all(p.ndim <= 1 for p in no_decay["params"])
    in_groups = {id(p) for g in groups for p in g["params"]}
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert in_groups == trainable and len(in_groups) == len(decay["params"]) + len(no_decay["params"])
    frozen = {id(p) for mod in (model.key_backbone, model.key_head, model.key_inst_head) for p in mod.parameters()}
    assert frozen and not frozen & in_groups
    bn = model.backbone.bn1
    assert id(bn.weight) in {id(p) for p in no_decay["params"]}


DIST_SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    import torch, torch.distributed as dist, torch.nn.functional as F
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    sys.path.insert(0, os.environ["TEST_DIR"])
    from test_methods import make_batch, tiny_cfg
    from freeatm_fast.methods import build_method
    from freeatm_fast.methods.common import two_view_info_nce
    from freeatm_fast.methods.multicrop import sinkhorn

    out = {}
    g = torch.Generator().manual_seed(0)  # the same global tensors on every rank, each rank takes its slice
    n = 3
    z1_all = F.normalize(torch.randn(world * n, 8, generator=g), dim=1)
    z2_all = F.normalize(torch.randn(world * n, 8, generator=g), dim=1)
    valid_all = torch.tensor([1, 0, 1, 1, 1, 0], dtype=torch.bool)
    mine = slice(rank * n, rank * n + n)
    z1 = z1_all[mine].clone().requires_grad_()
    z2 = z2_all[mine].clone().requires_grad_()
    loss, _ = two_view_info_nce(z1, z2, z1, z2, temperature=0.5, valid=valid_all[mine], targets_have_grad=True)
    loss.backward()
    out["loss"] = loss.item()
    out["grad1"], out["grad2"] = z1.grad.tolist(), z2.grad.tolist()
    scores = torch.randn(world * 4, 5, generator=g)
    out["codes"] = sinkhorn(scores[rank * 4 : rank * 4 + 4], iters=3, epsilon=0.05).tolist()

    torch.manual_seed(0)  # identical models on both ranks
    model = build_method(tiny_cfg("mocov2", True, moco={"symmetric": True, "shuffle_bn": True}))
    batch = make_batch(rank)
    model.eval()  # BN on running statistics: keys must not depend on how the batch was shuffled across ranks
    k, ki = model._keys(batch["view2"], batch["masks2"])
    with torch.no_grad():
        from freeatm_fast.methods.backbone import encode
        from freeatm_fast.methods.common import pool_instances
        pooled, fmap = encode(model.key_backbone, batch["view2"])
        k_ref = F.normalize(model.key_head(pooled), dim=-1)
        ki_ref = F.normalize(model.key_inst_head(pool_instances(fmap, batch["masks2"])), dim=-1)
    out["shuffle_err"] = max((k - k_ref).abs().max().item(), (ki - ki_ref).abs().max().item())
    model.train()
    opt = torch.optim.SGD(model.param_groups(1e-4), lr=0.1)
    for step in range(2):
        res = model(batch)
        res["loss"].backward()
        for p in model.parameters():  # what DDP / DeepSpeed do: average the gradients
            if p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad /= world
        opt.step()
        opt.zero_grad()
        model.after_step(step, 2)
        out.setdefault("moco_losses", []).append(res["loss"].item())
    out["queue"] = model.queue.sum().item()
    out["inst_queue_valid"] = model.inst_queue_valid.tolist()
    out["param_sum"] = sum(p.double().sum().item() for p in model.parameters())
    with open(os.path.join(os.environ["OUT_DIR"], f"rank{rank}.json"), "w") as f:
        json.dump(out, f)
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)  # gloo workers may abort at interpreter exit (TOOLCHAIN.md)
    """
)


@pytest.mark.slow
def test_two_gloo_ranks_match_one_process(tmp_path):
    script = tmp_path / "dist_methods.py"
    script.write_text(DIST_SCRIPT)
    env = dict(os.environ, TEST_DIR=str(Path(__file__).parent), OUT_DIR=str(tmp_path), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2))

    # NT-Xent over the gathered batch: the mean of the rank losses is the one-process loss, and each rank's
    # gradient of its local rows (summed over ranks by the all-gather backward) / world is the one-process gradient
    g = torch.Generator().manual_seed(0)
    z1 = F.normalize(torch.randn(6, 8, generator=g), dim=1).requires_grad_()
    z2 = F.normalize(torch.randn(6, 8, generator=g), dim=1).requires_grad_()
    valid = torch.tensor([1, 0, 1, 1, 1, 0], dtype=torch.bool)
    loss, _ = two_view_info_nce(z1, z2, z1, z2, temperature=0.5, valid=valid, targets_have_grad=True)
    loss.backward()
    assert math.isclose((r0["loss"] + r1["loss"]) / 2, loss.item(), rel_tol=1e-5)
    for key, ref in (("grad1", z1.grad), ("grad2", z2.grad)):
        got = torch.tensor(r0[key] + r1[key]) / 2
        assert torch.allclose(got, ref, atol=1e-6), key
    scores = torch.randn(8, 5, generator=g)
    codes = torch.tensor(r0["codes"] + r1["codes"])
    assert torch.allclose(codes, sinkhorn(scores, iters=3, epsilon=0.05), atol=1e-5)

    # MoCo: Shuffle-BN un-shuffles correctly; the queues (global keys) and the parameters agree across ranks
    assert r0["shuffle_err"] < 1e-5 and r1["shuffle_err"] < 1e-5
    assert all(math.isfinite(v) for v in r0["moco_losses"] + r1["moco_losses"])
    assert math.isclose(r0["queue"], r1["queue"], rel_tol=1e-6)
    assert r0["inst_queue_valid"] == r1["inst_queue_valid"]
    assert math.isclose(r0["param_sum"], r1["param_sum"], rel_tol=1e-9)
