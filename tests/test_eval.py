"""Evaluation: weighted kNN, linear probe, backbone export/load, labelled data sets, feature extraction, CLI."""

import dataclasses
import json
import math

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from freeatm_fast import cli
from freeatm_fast.config import Config, EvalConfig, ModelConfig, load_config, save_config
from freeatm_fast.data.shards import Sample, ShardError, ShardWriter, sample_key, update_index
from freeatm_fast.eval.datasets import LabelledShards, open_labelled
from freeatm_fast.eval.export import FORMAT, BackboneFileError, export_backbone, load_backbone
from freeatm_fast.eval.features import extract_features
from freeatm_fast.eval.knn import knn_accuracy, knn_predict
from freeatm_fast.eval.linear import linear_probe
from freeatm_fast.eval.run import evaluate

# Three classes told apart by colour (what even a randomly initialised CNN separates).
COLOURS = ((220, 40, 40), (40, 200, 60), (50, 60, 230))
W, H, S = 24, 20, 8  # image W x H (not square: exercises resize + centre crop), mask side


def class_image(label: int, i: int) -> np.ndarray:
    """uint8 [H, W, 3]: the class colour with per-image noise and a brighter square at an image-dependent place."""
    rng = np.random.default_rng(1000 * label + i)
    img = np.clip(np.array(COLOURS[label]) + rng.normal(0, 12, size=(H, W, 3)), 0, 255)
    x, y = i % (W - 6), i % (H - 6)
    img[y : y + 6, x : x + 6] = np.clip(img[y : y + 6, x : x + 6] + 30, 0, 255)
    return img.astype(np.uint8)


def labelled_sample(index: int, label: int | None, i: int) -> Sample:
    """A DESIGN §5 sample with one object mask and (unless None) meta["label"]."""
    masks = np.zeros((1, S, S), np.uint8)
    masks[0, 2:6, 2:6] = 255
    obj = {"word": "square", "tokens": [5, 6], "box": [4, 4, 16, 14], "area": 0.25, "score": 1.0}
    meta = {"caption": "a photo of a [square]", "seed": index, "model": "test", "size": [W, H], "mask_size": S}
    meta["objects"] = [obj]
    if label is not None:
        meta["label"] = label
    return Sample(sample_key(index), class_image(label or 0, i), masks, meta)


def write_labelled_shards(root, per_class: int, shards: int = 2, offset: int = 0, drop_label_at: int = -1):
    """``shards`` shards holding per_class images of each class, interleaved; returns the directory."""
    samples = [labelled_sample(offset + 3 * i + c, c, offset + i) for i in range(per_class) for c in range(3)]
    if drop_label_at >= 0:
        s = samples[drop_label_at]
        samples[drop_label_at] = Sample(s.key, s.image, s.masks, {k: v for k, v in s.meta.items() if k != "label"})
    per_shard = math.ceil(len(samples) / shards)
    for j in range(shards):
        with ShardWriter(root, f"shard-{j:06d}") as w:
            for s in samples[j * per_shard : (j + 1) * per_shard]:
                w.write(s)
    update_index(root, {"generator": "test_eval"})
    return root


def write_image_folder(root, per_class: int, offset: int = 0):
    for c, name in enumerate(("blue_is_not_first", "green", "red")):  # sorted names -> labels 0, 1, 2
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(class_image(c, offset + i)).save(root / name / f"{i:03d}.png")
    return root


@pytest.fixture(scope="module")
def shard_sets(tmp_path_factory):
    base = tmp_path_factory.mktemp("shards")
    train = write_labelled_shards(base / "train", per_class=12, shards=3)
    val = write_labelled_shards(base / "val", per_class=5, shards=1, offset=1000)
    return train, val


@pytest.fixture(scope="module")
def backbone_file(tmp_path_factory):
    torch.manual_seed(0)
    model = timm.create_model("resnet10t", pretrained=False, num_classes=0)
    return export_backbone(model, "resnet10t", {}, tmp_path_factory.mktemp("bb") / "resnet10t.safetensors")


# --------------------------------------------------------------------------------------------------
# kNN


def knn_votes_slow(train, train_labels, queries, k, temperature, num_classes):
    """Per-query Python reference of the weighted vote: cosine top-k, weight exp(sim / T), summed per class."""
    train = train / train.norm(dim=1, keepdim=True)
    out = torch.zeros(len(queries), num_classes, dtype=torch.float64)
    for i, q in enumerate(queries):
        sims = (train.double() @ (q / q.norm()).double()).tolist()
        order = sorted(range(len(sims)), key=lambda j: -sims[j])[:k]
        for j in order:
            out[i, int(train_labels[j])] += math.exp(sims[j] / temperature)
    return out


def test_knn_clustered_features_are_perfect():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(7, 32, generator=g)
    y_train, y_val = torch.arange(700) % 7, torch.arange(140) % 7
    x_train = centres[y_train] + 0.1 * torch.randn(700, 32, generator=g)
    x_val = centres[y_val] + 0.1 * torch.randn(140, 32, generator=g)
    result = knn_accuracy(x_train, y_train, x_val, y_val, k=20, temperature=0.07)
    assert result == {"top1": 1.0, "top5": 1.0, "k": 20, "n_train": 700, "n_val": 140}


def test_knn_k_and_weights_decide_the_vote():
    # One class-0 neighbour very close to the query, two class-1 neighbours further away, one far class-2 point.
    angle = torch.tensor([0.1, 1.0, 1.05, 2.5])
    train = torch.stack([angle.cos(), angle.sin()], dim=1)
    labels = torch.tensor([0, 1, 1, 2])
    query, truth0, truth1 = torch.tensor([[1.0, 0.0]]), torch.tensor([0]), torch.tensor([1])
    # Sharp weights: the close neighbour outweighs two far ones; flat weights: two votes beat one; k=1: nearest.
    assert knn_accuracy(train, labels, query, truth0, k=3, temperature=0.07)["top1"] == 1.0
    assert knn_accuracy(train, labels, query, truth1, k=3, temperature=100.0)["top1"] == 1.0
    assert knn_accuracy(train, labels, query, truth0, k=1, temperature=100.0)["top1"] == 1.0
    # k larger than the memory bank is clamped.
    assert knn_accuracy(train, labels, query, truth1, k=50, temperature=100.0)["k"] == 4


@pytest.mark.parametrize("k,temperature", [(1, 0.07), (5, 0.07), (13, 0.5), (40, 0.01)])
def test_knn_matches_slow_reference(k, temperature):
    g = torch.Generator().manual_seed(k)
    train, queries = torch.randn(97, 16, generator=g), torch.randn(45, 16, generator=g)
    labels = torch.randint(0, 6, (97,), generator=g)
    votes = knn_predict(train, labels, queries, k=k, temperature=temperature, num_classes=6, chunk_size=16)
    ref = knn_votes_slow(train, labels, queries, k, temperature, 6)
    # knn_predict scales each query's votes by exp(-max_sim / T) (overflow guard): compare normalised votes.
    # fp32 similarities, errors amplified by 1/T in the exponent: rtol 1e-4.
    got, want = votes.double() / votes.sum(1, keepdim=True), ref / ref.sum(1, keepdim=True)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    val_labels = torch.randint(0, 6, (45,), generator=g)
    result = knn_accuracy(train, labels, queries, val_labels, k=k, temperature=temperature, num_classes=6)
    # Ranking rule: more votes first, ties to the lower class index (with k < 6 some classes get no vote at all).
    ranked = [sorted(range(6), key=lambda c: (-ref[i, c].item(), c)) for i in range(45)]
    ref_top1 = sum(r[0] == y for r, y in zip(ranked, val_labels.tolist(), strict=True)) / 45
    ref_top5 = sum(y in r[:5] for r, y in zip(ranked, val_labels.tolist(), strict=True)) / 45
    assert result["top1"] == pytest.approx(ref_top1) and result["top5"] == pytest.approx(ref_top5)


def test_knn_small_temperature_does_not_overflow_and_top5_needs_five_classes():
    train = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    result = knn_accuracy(train, torch.tensor([0, 1]), train, torch.tensor([0, 1]), k=2, temperature=1e-3)
    assert result["top1"] == 1.0 and "top5" not in result  # e^(1/1e-3) would be inf without the shift
    with pytest.raises(ValueError, match="num_classes=2"):
        knn_accuracy(train, torch.tensor([0, 1]), train, torch.tensor([0, 2]), k=1, temperature=0.1, num_classes=2)


# --------------------------------------------------------------------------------------------------
# linear probe


def separable(n_train=600, n_val=200, dim=24, classes=6, margin=2.0, seed=0):
    """Points labelled by the argmax of random linear scores, kept only when the best score leads the second by
    ``margin`` (so a linear classifier fitted on the training points generalises), offset and scaled so that the
    probe's standardisation matters."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(classes, dim, generator=g)
    x = torch.randn(20 * (n_train + n_val), dim, generator=g)
    top2 = (x @ w.T).topk(2, dim=1)
    keep = (top2.values[:, 0] - top2.values[:, 1]) >= margin
    x, y = x[keep][: n_train + n_val] * 3 + 5, top2.indices[keep][: n_train + n_val, 0]
    assert len(y) == n_train + n_val
    return x[:n_train], y[:n_train], x[n_train:], y[n_train:]


@pytest.mark.parametrize("solver", ["sgd", "lbfgs"])
def test_linear_probe_separates_separable_features_deterministically(solver):
    x_train, y_train, x_val, y_val = separable()
    first = linear_probe(x_train, y_train, x_val, y_val, epochs=30, lr=0.1, solver=solver, seed=3)
    assert first["top1"] >= 0.95 and first["top5"] >= 0.99 and first["train_top1"] >= 0.95
    assert first["n_train"] == 600 and first["n_val"] == 200
    again = linear_probe(x_train, y_train, x_val, y_val, epochs=30, lr=0.1, solver=solver, seed=3)
    assert again == first


def test_linear_probe_rejects_bad_arguments():
    x_train, y_train, x_val, y_val = separable()
    with pytest.raises(ValueError, match="solver"):
        linear_probe(x_train, y_train, x_val, y_val, solver="adam")
    with pytest.raises(ValueError, match="same C"):
        linear_probe(x_train, y_train, x_val[:, :3], y_val)


# --------------------------------------------------------------------------------------------------
# export / load


def test_export_loads_with_plain_timm_and_gives_identical_outputs(tmp_path):
    torch.manual_seed(1)
    model = timm.create_model("resnet10t", pretrained=False, num_classes=0, drop_rate=0.0)
    model.train()(torch.randn(4, 3, 32, 32))  # move BatchNorm running stats away from their init
    model.eval()
    path = export_backbone(model, "resnet10t", {"drop_rate": 0.0}, tmp_path / "bb.safetensors")
    assert path == tmp_path / "bb.safetensors" and not list(tmp_path.glob(".*tmp*"))
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    assert meta == {"format": FORMAT, "model": "resnet10t", "model_kwargs": '{"drop_rate": 0.0}'}

    plain = timm.create_model(
        "resnet10t", pretrained=False, num_classes=0, checkpoint_path=str(path), drop_rate=0.0
    ).eval()
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        want = model(x)
        assert torch.equal(plain(x), want)
        assert torch.equal(load_backbone(path)(x), want)


def test_export_unwraps_compiled_modules_and_stores_fp32(tmp_path):
    model = timm.create_model("resnet10t", pretrained=False, num_classes=0).to(torch.bfloat16)
    path = export_backbone(torch.compile(model), "resnet10t", None, tmp_path / "bb.safetensors")
    with safe_open(str(path), framework="pt") as f:
        keys = list(f.keys())
        dtypes = {f.get_tensor(k).dtype for k in keys}
    assert not any(k.startswith("_orig_mod.") for k in keys)
    assert dtypes == {torch.float32, torch.int64}  # int64: BatchNorm num_batches_tracked
    loaded = load_backbone(path)
    torch.testing.assert_close(loaded.conv1[0].weight, model.conv1[0].weight.float())


def test_export_refuses_weights_that_timm_would_not_load(tmp_path):
    wrapped = nn.Sequential(timm.create_model("resnet10t", pretrained=False, num_classes=0))
    with pytest.raises(BackboneFileError, match=r"bb\.safetensors.*not written.*missing keys"):
        export_backbone(wrapped, "resnet10t", {}, tmp_path / "bb.safetensors")
    assert not list(tmp_path.iterdir())
    model = timm.create_model("resnet10t", pretrained=False, num_classes=0)
    with pytest.raises(BackboneFileError, match="must end in '.safetensors'"):
        export_backbone(model, "resnet10t", {}, tmp_path / "bb.pt")
    with pytest.raises(BackboneFileError, match="num_classes"):
        export_backbone(model, "resnet10t", {"num_classes": 10}, tmp_path / "bb.safetensors")


def test_load_errors_name_the_file(tmp_path, backbone_file):
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(BackboneFileError, match=f"{missing}: backbone file does not exist"):
        load_backbone(missing)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"this is not a safetensors file at all")
    with pytest.raises(BackboneFileError, match=f"{junk}: not a safetensors file"):
        load_backbone(junk)
    with pytest.raises(BackboneFileError, match=rf"{backbone_file}: weights do not match timm model 'resnet18'"):
        load_backbone(backbone_file, "resnet18")
    bare = tmp_path / "bare.safetensors"
    save_file({"w": torch.zeros(2)}, str(bare))
    with pytest.raises(BackboneFileError, match=f"{bare}: no 'model' in the file's metadata"):
        load_backbone(bare)
    with pytest.raises(BackboneFileError, match=f"{bare}: cannot create timm model 'no_such_net'"):
        load_backbone(bare, "no_such_net")


# --------------------------------------------------------------------------------------------------
# data sets and features


def test_shard_dataset_yields_labels_and_shapes(shard_sets):
    train, _ = shard_sets
    ds = open_labelled(train, image_size=16, crop_ratio=0.8)
    assert isinstance(ds, LabelledShards) and len(ds) == 36 and len(ds.shards) == 3
    items = list(ds)
    assert [label for _, label in items] == [i % 3 for i in range(36)]
    image = items[0][0]
    assert image.shape == (3, 16, 16) and image.dtype == torch.float32
    # ImageNet normalisation: a red image has a high red and low blue channel after it.
    assert image[0].mean() > 1.0 and image[2].mean() < -1.0


def _image_bytes(image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image).copy())


@pytest.mark.parametrize("split", [0, 1])  # train: 3 shards dealt to 2 workers; val: 1 shard, samples dealt
def test_shard_dataset_with_workers_yields_every_sample_once(shard_sets, split):
    root = shard_sets[split]
    loader = torch.utils.data.DataLoader(LabelledShards(root, _image_bytes), batch_size=4, num_workers=2)
    got = sorted((im.numpy().tobytes(), y) for ims, ys in loader for im, y in zip(ims, ys.tolist(), strict=True))
    serial = sorted((np.asarray(im).tobytes(), y) for im, y in LabelledShards(root))
    assert len(serial) == len(LabelledShards(root)) == (36 if split == 0 else 15)
    assert got == serial


def test_image_folder_yields_labels_and_shapes(tmp_path):
    root = write_image_folder(tmp_path / "folder", per_class=4)
    ds = open_labelled(root, image_size=12, crop_ratio=1.0)
    assert ds.classes == ["blue_is_not_first", "green", "red"] and len(ds) == 12
    images, labels = zip(*ds, strict=True)
    assert list(labels) == [0] * 4 + [1] * 4 + [2] * 4
    assert all(im.shape == (3, 12, 12) and im.dtype == torch.float32 for im in images)


def test_open_labelled_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        open_labelled(tmp_path / "missing", 16)
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"empty: neither a shard directory .* nor an ImageFolder"):
        open_labelled(tmp_path / "empty", 16)


def test_missing_label_names_shard_and_key(tmp_path):
    root = write_labelled_shards(tmp_path / "nolabel", per_class=2, shards=2, drop_label_at=4)
    # 6 samples over 2 shards of 3: sample 4 (key 000000004) is in the second shard.
    with pytest.raises(ShardError, match=r"shard-000001\.tar: sample '000000004': KEY\.json has no 'label'"):
        list(open_labelled(root, 16))


def test_extract_features_normalised_labels_max_images_and_modes(shard_sets):
    train, _ = shard_sets
    torch.manual_seed(0)
    model = timm.create_model("resnet10t", pretrained=False, num_classes=0)
    model.train()
    model.bn1.eval()  # a frozen BatchNorm must stay frozen after evaluation
    ds = open_labelled(train, 16)
    feats, labels = extract_features(model, ds, batch_size=8, device="cpu", channels_last=True)
    assert feats.shape == (36, model.num_features) and feats.dtype == torch.float32
    torch.testing.assert_close(feats.norm(dim=1), torch.ones(36))
    assert labels.dtype == torch.int64 and labels.tolist() == [i % 3 for i in range(36)]
    assert model.training and not model.bn1.training and model.layer1.training
    assert not feats.is_inference() and feats.requires_grad is False
    few, few_labels = extract_features(model, ds, batch_size=8, device="cpu", max_images=11)
    assert few.shape[0] == 11 and few_labels.tolist() == labels[:11].tolist()
    torch.testing.assert_close(few, feats[:11], atol=1e-5, rtol=1e-5)  # same images, eval-mode BatchNorm


def test_evaluate_runs_knn_and_linear(shard_sets, backbone_file):
    train, val = shard_sets
    cfg = Config(eval=EvalConfig(knn=True, linear=True, knn_k=5, image_size=16, linear_epochs=20))
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, num_workers=0))
    result = evaluate(load_backbone(backbone_file), cfg, device="cpu", train_root=train, val_root=val)
    assert result["n_train"] == 36 and result["n_val"] == 15 and result["num_classes"] == 3
    assert result["knn"]["k"] == 5 and "top5" not in result["knn"]
    # Colour classes: random-init features already separate them far above chance (1/3).
    assert result["knn"]["top1"] >= 0.8 and result["linear"]["top1"] >= 0.8
    json.dumps(result)


# --------------------------------------------------------------------------------------------------
# CLI


def test_cli_eval_knn_end_to_end(shard_sets, backbone_file, capsys):
    train, val = shard_sets
    argv = ["eval", "knn", "--backbone", str(backbone_file), "--model", "resnet10t", "--train", str(train)]
    argv += ["--val", str(val), "--image-size", "16", "--k", "5", "--num-workers", "0", "--device", "cpu"]
    assert cli.main(argv) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("knn top1 ") and "15 val / 36 train images, 3 classes, 16px" in line
    assert cli.main([*argv, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["kind"] == "knn" and result["knn"]["k"] == 5 and "linear" not in result


def test_cli_eval_with_run_dir_writes_json(tmp_path, shard_sets, backbone_file, capsys):
    train, val = shard_sets
    run = tmp_path / "run"
    cfg = Config(
        model=ModelConfig(backbone="resnet10t", channels_last=False),
        eval=EvalConfig(train_root=str(train), root=str(val), image_size=16, knn_k=7, linear_epochs=10),
    )
    save_config(dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, num_workers=0)), run / "config.yaml")
    assert load_config(run / "config.yaml").eval.knn_k == 7
    (run / "backbone.safetensors").write_bytes(backbone_file.read_bytes())
    assert cli.main(["eval", "knn", "--run", str(run), "--device", "cpu"]) == 0
    written = json.loads((run / "eval_knn.json").read_text())
    assert written["knn"]["k"] == 7 and written["backbone"] == str(run / "backbone.safetensors")
    assert capsys.readouterr().out.startswith("knn top1")
    assert cli.main(["eval", "linear", "--run", str(run), "--device", "cpu", "--epochs", "5"]) == 0
    assert json.loads((run / "eval_linear.json").read_text())["linear"]["epochs"] == 5
    assert not list(run.glob(".*tmp*"))


def test_cli_eval_errors_are_one_line_with_status_2(tmp_path, shard_sets, capsys):
    train, val = shard_sets
    missing = tmp_path / "none.safetensors"
    argv = ["eval", "knn", "--backbone", str(missing), "--train", str(train), "--val", str(val)]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"freeatm eval: error: {missing}: backbone file does not exist"
    assert cli.main(["eval", "knn", "--run", str(tmp_path)]) == 2
    assert "config.yaml" in capsys.readouterr().err
    assert cli.main(["eval", "knn"]) == 2
    assert "--backbone FILE" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # --k is a kNN option
        cli.main(["eval", "linear", "--k", "3"])


def test_cli_eval_defaults_to_the_toy_world(tmp_path, backbone_file, monkeypatch, capsys):
    # Empty eval.train_root / eval.root: the toy world's train / val split for the run's data config (a tiny one
    # here, built under a private cache).
    monkeypatch.setenv("FREEATM_CACHE", str(tmp_path / "cache"))
    run = tmp_path / "run"
    cfg = Config(eval=EvalConfig(knn_k=5, image_size=32), model=ModelConfig(backbone="resnet10t"))
    data = dataclasses.replace(cfg.data, toy_train_images=24, toy_val_images=8, num_workers=0)
    save_config(dataclasses.replace(cfg, data=data), run / "config.yaml")
    argv = ["eval", "knn", "--run", str(run), "--backbone", str(backbone_file), "--device", "cpu", "--json"]
    assert cli.main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["n_train"] == 24 and result["n_val"] == 8
    assert result["train_root"].endswith("/train") and result["val_root"].endswith("/val")
    assert result["train_root"].startswith(str(tmp_path / "cache"))
