"""Image-text retrieval evaluation (issue #7): recall@k on cases with known answers (many-to-many pairs, ties,
NaN, k beyond the candidates) and against a brute-force ranking, the held-out pairs from toy-world shards and from
image folders with a captions JSON (COCO Karpathy and list formats) with their errors, ``evaluate_retrieval`` with
a small colour-histogram scorer, and ``freeatm eval retrieval`` on a saved run directory.

The scorer (:class:`ColourScorer`) is a test-only ``Method``: cosine similarity between an image's palette-colour
histogram and the colour words of a caption, through a learnable 8 x 8 ``text_proj`` (identity = colour words mean
their colours). On the toy world that retrieves far above chance, and only when images and captions are paired
correctly, which is what the data loading has to get right.
"""

import json
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file
from torch import nn

from freeatm_fast import cli
from freeatm_fast.config import config_from_dict, save_config
from freeatm_fast.data.dataset import ShardDataset
from freeatm_fast.data.toyworld import COLOURS, IMAGES_PER_CAPTION, build_toyworld
from freeatm_fast.eval import retrieval as retrieval_module
from freeatm_fast.eval.datasets import IMAGENET_MEAN, IMAGENET_STD, eval_transform
from freeatm_fast.eval.retrieval import evaluate_retrieval, load_pairs, recall_at_k, retrieval_line
from freeatm_fast.methods import METHOD_REGISTRY
from freeatm_fast.methods.backbone import build_backbone
from freeatm_fast.methods.common import Method

S = 32
TOY = {"toy_train_images": 16, "toy_val_images": 48, "toy_image_size": S, "num_workers": 0}
TINY_MODEL = {
    "backbone": "vit_tiny_patch16_224",
    "backbone_kwargs": {"img_size": S, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2},
    "channels_last": False,
}
# Chance levels on 48 toy-world images / 12 captions (4 correct images per caption): i2t R@1 = 1/12; r_mean
# (mean of the six recalls) ~ 0.40. The colour scorer reaches ~0.8 with the right pairing.


# --------------------------------------------------------------------------------------------------------------
# recall_at_k


def brute_force_recall(i2t, t2i, image_texts, ks):
    """Sort every query's candidates by (score desc, correct last) and look at the first k."""
    ni, nt = i2t.shape
    pos = np.zeros((ni, nt), bool)
    for i, texts in enumerate(image_texts):
        pos[i, texts] = True

    def rate(scores, p, k):
        hits = 0
        for row, prow in zip(scores, p, strict=True):
            order = sorted(range(len(row)), key=lambda j, row=row, prow=prow: (-row[j], prow[j]))
            hits += any(prow[j] for j in order[:k])
        return hits / len(scores)

    out = {f"i2t_r{k}": rate(i2t.tolist(), pos, k) for k in ks}
    out.update({f"t2i_r{k}": rate(t2i.T.tolist(), pos.T, k) for k in ks})
    return out


def test_perfect_scores_give_recall_one():
    eye = torch.eye(7)
    r = recall_at_k(eye, eye, [[i] for i in range(7)])
    assert set(r) == {"i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "r_mean"}
    assert all(v == 1.0 for v in r.values())
    # toy-world shape: 4 images per caption, blocks of high scores
    groups = torch.arange(12) // IMAGES_PER_CAPTION  # image -> caption
    scores = (groups[:, None] == torch.arange(3)[None, :]).float()
    r = recall_at_k(scores, scores, [[int(g)] for g in groups], ks=(1,))
    assert r == {"i2t_r1": 1.0, "t2i_r1": 1.0, "r_mean": 1.0}


def test_known_ranks_and_reversed_scores():
    n = 10
    rng = np.random.default_rng(0)
    # image i's correct text (a random permutation) sits at rank i among distinct scores
    match = rng.permutation(n)
    scores = torch.zeros(n, n)
    for i in range(n):
        order = [j for j in rng.permutation(n) if j != match[i]]
        order.insert(i, match[i])
        scores[i, order] = torch.linspace(1.0, 0.0, n)
    image_texts = [[int(match[i])] for i in range(n)]
    r = recall_at_k(scores, scores, image_texts)
    assert r["i2t_r1"] == pytest.approx(0.1) and r["i2t_r5"] == pytest.approx(0.5) and r["i2t_r10"] == 1.0
    # reversed: every correct text scored lowest -> found only when k covers all 10 candidates
    rev = 1.0 - torch.eye(n)
    r = recall_at_k(rev, rev, [[i] for i in range(n)])
    assert (r["i2t_r1"], r["i2t_r5"], r["i2t_r10"]) == (0.0, 0.0, 1.0)
    assert (r["t2i_r1"], r["t2i_r5"], r["t2i_r10"]) == (0.0, 0.0, 1.0)
    assert r["r_mean"] == pytest.approx(2 / 6)


def test_i2t_and_t2i_use_their_own_matrix():
    """t2i ranks images per text (columns of t2i); i2t ranks texts per image (rows of i2t)."""
    good = torch.eye(4)
    bad = 1.0 - torch.eye(4)
    r = recall_at_k(good, bad, [[i] for i in range(4)], ks=(1, 3))
    assert (r["i2t_r1"], r["i2t_r3"], r["t2i_r1"], r["t2i_r3"]) == (1.0, 1.0, 0.0, 0.0)
    r = recall_at_k(bad, good, [[i] for i in range(4)], ks=(1,))
    assert (r["i2t_r1"], r["t2i_r1"]) == (0.0, 1.0)


def test_several_texts_per_image_and_images_per_text():
    # 3 images, 4 texts. image 0 -> texts {0, 1}; image 1 -> {2}; image 2 -> {2, 3}
    image_texts = [[0, 1], [2], [2, 3]]
    i2t = torch.tensor(
        [
            [0.1, 0.5, 0.9, 0.8],  # image 0: best correct (text 1) at rank 3 -> hit at k=3 only
            [0.2, 0.1, 0.9, 0.3],  # image 1: text 2 first
            [0.9, 0.8, 0.1, 0.7],  # image 2: best correct (text 3) at rank 3
        ]
    )
    # columns rank the images for each text: text 0 -> image 0 first; text 1 -> image 0 third; text 2 -> best
    # correct image (2) second; text 3 -> image 2 first
    t2i = torch.tensor(
        [
            [0.9, 0.5, 0.9, 0.1],
            [0.1, 0.8, 0.2, 0.2],
            [0.5, 0.9, 0.3, 0.7],
        ]
    )
    r = recall_at_k(i2t, t2i, image_texts, ks=(1, 2, 3))
    assert (r["i2t_r1"], r["i2t_r2"], r["i2t_r3"]) == pytest.approx((1 / 3, 1 / 3, 1.0))
    assert (r["t2i_r1"], r["t2i_r2"], r["t2i_r3"]) == pytest.approx((2 / 4, 3 / 4, 1.0))
    assert r == pytest.approx({**brute_force_recall(i2t, t2i, image_texts, (1, 2, 3)), "r_mean": r["r_mean"]})


def test_ties_count_against_the_method():
    # constant scores: the correct candidate ranks after every incorrect one
    const = torch.zeros(4, 5)
    r = recall_at_k(const, const, [[0], [1], [2], [3, 4]], ks=(1, 3, 4, 5))
    assert (r["i2t_r1"], r["i2t_r3"], r["i2t_r4"], r["i2t_r5"]) == (0.0, 0.0, 0.25, 1.0)  # image 3 has 2 correct
    assert (r["t2i_r1"], r["t2i_r3"], r["t2i_r4"]) == (0.0, 0.0, 1.0)
    # each image's best correct text tied with one incorrect text at the top: rank 2
    s = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.5, 0.5]])
    r = recall_at_k(s, s, [[0, 2], [1]], ks=(1, 2))
    assert (r["i2t_r1"], r["i2t_r2"]) == (0.0, 1.0)
    # a tie among correct candidates only costs nothing
    s = torch.tensor([[1.0, 1.0, 0.0]])
    assert recall_at_k(s, s, [[0, 1, 2]], ks=(1,))["i2t_r1"] == 1.0


def test_nan_scores_rank_last_and_k_beyond_candidates_is_all():
    nan = float("nan")
    s = torch.tensor([[nan, 0.2, 0.1], [0.3, nan, 0.1]])
    r = recall_at_k(s, s, [[0], [1, 2]], ks=(1, 2, 3, 50))
    # image 0: its text is NaN -> last (3rd); image 1: best correct is text 2 (0.1), behind text 0 -> 2nd
    assert (r["i2t_r1"], r["i2t_r2"], r["i2t_r3"], r["i2t_r50"]) == (0.0, 0.5, 1.0, 1.0)
    # every text's correct image comes second of the two (NaN, or tied with the other image)
    assert (r["t2i_r1"], r["t2i_r2"], r["t2i_r50"]) == (0.0, 1.0, 1.0)


@pytest.mark.parametrize("seed", range(6))
def test_matches_brute_force_ranking_with_many_ties(seed, monkeypatch):
    rng = np.random.default_rng(seed)
    ni, nt = int(rng.integers(1, 14)), int(rng.integers(1, 20))
    image_texts = [sorted(set(rng.integers(0, nt, size=int(rng.integers(1, 4))).tolist())) for _ in range(ni)]
    for j in range(nt):  # every text needs a correct image
        if not any(j in t for t in image_texts):
            image_texts[int(rng.integers(ni))].append(j)
    i2t = torch.from_numpy(rng.integers(0, 4, size=(ni, nt)).astype(np.float32))  # few values: many ties
    t2i = torch.from_numpy(rng.integers(0, 4, size=(ni, nt)).astype(np.float32))
    ks = (1, 2, 5, 10)
    want = brute_force_recall(i2t, t2i, image_texts, ks)
    r = recall_at_k(i2t, t2i, image_texts, ks)
    assert {k: v for k, v in r.items() if k != "r_mean"} == pytest.approx(want)
    assert r["r_mean"] == pytest.approx(sum(want.values()) / len(want))
    monkeypatch.setattr(retrieval_module, "_CHUNK_ELEMENTS", 7)  # a few rows per chunk: same answer
    assert recall_at_k(i2t, t2i, image_texts, ks) == pytest.approx(r)


def test_recall_input_errors():
    s = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="image_texts has 1 entries"):
        recall_at_k(s, s, [[0]])
    with pytest.raises(ValueError, match=r"image_texts\[1\] is empty"):
        recall_at_k(s, s, [[0, 1, 2], []])
    with pytest.raises(ValueError, match=r"image_texts\[0\] holds 3"):
        recall_at_k(s, s, [[3], [0]])
    with pytest.raises(ValueError, match=r"text\(s\) \[2\] are correct for no image"):
        recall_at_k(s, s, [[0], [1]])
    with pytest.raises(ValueError, match="both be"):
        recall_at_k(s, torch.zeros(3, 2), [[0], [1, 2]])


@pytest.mark.cuda
def test_recall_on_cuda_matches_cpu():
    rng = np.random.default_rng(1)
    i2t = torch.from_numpy(rng.normal(size=(40, 60)).astype(np.float32))
    t2i = torch.from_numpy(rng.normal(size=(40, 60)).astype(np.float32))
    image_texts = [[i, i + 20] if i < 20 else [i + 20] for i in range(40)]
    assert recall_at_k(i2t.cuda(), t2i.cuda(), image_texts) == pytest.approx(recall_at_k(i2t, t2i, image_texts))


# --------------------------------------------------------------------------------------------------------------
# load_pairs


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy")
    build_toyworld(root, train_images=8, val_images=12, image_size=S, seed=0, shard_size=5)  # 3 val shards
    return root


def test_pairs_from_toy_world_shards(toy):
    images, captions, image_texts = load_pairs(toy / "val", S, 0)
    ds = ShardDataset(toy / "val")
    metas = [ds[i].meta for i in range(len(ds))]
    assert images.shape == (12, 3, S, S) and images.dtype == torch.float32
    want_caps = list(dict.fromkeys(m["caption"] for m in metas))
    assert captions == want_caps and len(captions) == 12 // IMAGES_PER_CAPTION  # 4 images per caption
    assert image_texts == [[captions.index(m["caption"])] for m in metas]
    transform = eval_transform(S)
    for i in (0, 5, 11):
        assert torch.equal(images[i], transform(ds[i].image))
    # the toy world's root: its val split; split="train" picks the other one; max_images keeps the first N
    images2, captions2, texts2 = load_pairs(toy, S, 5)
    assert torch.equal(images2, images[:5]) and captions2 == captions[:2] and texts2 == image_texts[:5]
    train_images, _, _ = load_pairs(toy, 16, 0, split="train")
    assert train_images.shape == (8, 3, 16, 16)


def _write_image(path, rgb, size=(48, 24)):
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.zeros((size[1], size[0], 3), np.uint8)
    arr[...] = rgb
    arr[:, : size[0] // 8] = 255 - np.asarray(rgb, np.uint8)  # a stripe on the left that the centre crop drops
    Image.fromarray(arr).save(path)


def test_pairs_from_karpathy_json(tmp_path):
    for name, rgb in (("a.jpg", (200, 30, 30)), ("b.png", (30, 200, 30)), ("c.jpg", (30, 30, 200))):
        _write_image(tmp_path / "imgs" / name, rgb)
    _write_image(tmp_path / "d.jpg", (90, 90, 90))

    def sentences(*raws):
        return [{"raw": r, "tokens": r.split()} for r in raws]

    data = {
        "images": [
            {"filename": "a.jpg", "filepath": "imgs", "split": "test", "sentences": sentences("red box ", "x")},
            {"filename": "b.png", "filepath": "imgs", "split": "train", "sentences": [{"raw": "green box"}]},
            {"filename": "c.jpg", "filepath": "imgs", "split": "test", "sentences": sentences("x", "blue")},
            {"filename": "d.jpg", "split": "val", "sentences": [{"raw": "grey"}]},
        ]
    }
    (tmp_path / "dataset_coco.json").write_text(json.dumps(data))  # the folder's only *.json
    images, captions, image_texts = load_pairs(tmp_path, 16, 0)
    assert captions == ["red box", "x", "blue"]  # test split only; stripped; "x" is one text for two images
    assert image_texts == [[0, 1], [1, 2]]
    assert images.shape == (2, 3, 16, 16)
    # shorter side -> 16 (48 x 24 -> 32 x 16), centre crop 16: the 4-px stripe on the left is cut away
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    pixels = (images * std + mean) * 255
    assert (pixels[0, 0] - 200).abs().max() < 12 and (pixels[1, 2] - 200).abs().max() < 12
    with Image.open(tmp_path / "imgs" / "c.jpg") as im:
        assert torch.equal(images[1], eval_transform(16)(im.convert("RGB")))
    images, captions, image_texts = load_pairs(tmp_path, 16, 0, split="val")
    assert captions == ["grey"] and image_texts == [[0]] and images.shape[0] == 1
    assert load_pairs(tmp_path, 16, 1)[1] == ["red box", "x"]
    with pytest.raises(ValueError, match=r"no image of split 'restval' \(splits present: \['test', 'train', 'val'\]\)"):
        load_pairs(tmp_path, 16, 0, split="restval")


def test_pairs_from_list_json(tmp_path):
    for name, rgb in (("one.jpg", (250, 250, 250)), ("sub/two.jpg", (10, 10, 10))):
        _write_image(tmp_path / name, rgb)
    entries = [
        {"image": "one.jpg", "caption": "a white picture"},
        {"image": "sub/two.jpg", "caption": ["a black picture", "dark"]},
        {"image": "one.jpg", "caption": "bright"},  # merged into the first image
    ]
    (tmp_path / "captions.json").write_text(json.dumps(entries))
    (tmp_path / "other.json").write_text("{}")  # ignored: captions.json wins
    images, captions, image_texts = load_pairs(tmp_path, 8, 0)
    assert captions == ["a white picture", "bright", "a black picture", "dark"]
    assert image_texts == [[0, 1], [2, 3]] and images.shape == (2, 3, 8, 8)
    assert images[0].mean() > images[1].mean()


def test_pair_loading_errors_name_the_file(tmp_path):
    _write_image(tmp_path / "ok.jpg", (1, 2, 3))
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    folder = tmp_path / "missing"
    folder.mkdir()
    (folder / "captions.json").write_text(json.dumps([{"image": "nowhere.jpg", "caption": "c"}]))
    with pytest.raises(FileNotFoundError, match=re.escape(str(folder / "nowhere.jpg")) + ".*does not exist"):
        load_pairs(folder, 8, 0)
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "broken.jpg").write_bytes((tmp_path / "broken.jpg").read_bytes())
    (corrupt / "captions.json").write_text(json.dumps([{"image": "broken.jpg", "caption": "c"}]))
    with pytest.raises(ValueError, match=re.escape(str(corrupt / "broken.jpg")) + ".*cannot decode"):
        load_pairs(corrupt, 8, 0)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "captions.json").write_text('[{"image": "ok.jpg", "caption": ')
    with pytest.raises(ValueError, match=re.escape(f"{bad / 'captions.json'}: not valid UTF-8 JSON")):
        load_pairs(bad, 8, 0)
    (bad / "captions.json").write_text(json.dumps([{"image": "ok.jpg"}]))
    with pytest.raises(ValueError, match=r"captions.json: entry 0: no 'caption' field"):
        load_pairs(bad, 8, 0)
    (bad / "captions.json").write_text(json.dumps({"images": [{"filename": "ok.jpg", "sentences": []}]}))
    with pytest.raises(ValueError, match=r"images\[0\]: needs a non-empty 'sentences' list"):
        load_pairs(bad, 8, 0)
    (bad / "captions.json").write_text(json.dumps({"annotations": []}))
    with pytest.raises(ValueError, match="expected the COCO Karpathy format"):
        load_pairs(bad, 8, 0)
    two = tmp_path / "two"
    two.mkdir()
    (two / "a.json").write_text("[]")
    (two / "b.json").write_text("[]")
    with pytest.raises(ValueError, match=re.escape(f"{two}: several JSON files (a.json, b.json) and no captions.json")):
        load_pairs(two, 8, 0)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match=re.escape(f"{empty}: neither a shard directory")):
        load_pairs(empty, 8, 0)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_pairs(tmp_path / "nothing", 8, 0)
    with pytest.raises(ValueError, match="max_images"):
        load_pairs(folder, 8, -1)


def test_damaged_shard_sample_is_named(toy, tmp_path):
    import shutil

    bad = tmp_path / "val"
    shutil.copytree(toy / "val", bad)
    shard = sorted(bad.glob("*.tar"))[1]
    data = bytearray(shard.read_bytes())
    # the first JPEG's first Huffman table: code counts summing past 256 (a valid header, undecodable data)
    dht = data.find(b"\xff\xc4", data.find(b"\xff\xd8\xff"))
    data[dht + 5 : dht + 21] = b"\xff" * 16
    shard.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=re.escape(f"{shard}: sample ") + r"'\d+': cannot decode the image"):
        load_pairs(bad, S, 0)


# --------------------------------------------------------------------------------------------------------------
# evaluate_retrieval with a test-only scorer


class ColourScorer(Method):
    """Test-only retrieval method: cosine similarity between the image's palette-colour histogram and the colour
    words of the caption mapped through ``text_proj`` (8 x 8, identity at construction)."""

    constructed: list = []  # (vlp.tokenizer, model.pretrained) of every instance, for the CLI test

    def __init__(self, cfg):
        super().__init__(cfg)
        self.backbone = build_backbone(cfg.model)
        self.text_proj = nn.Linear(len(COLOURS), len(COLOURS), bias=False)
        with torch.no_grad():
            self.text_proj.weight.copy_(torch.eye(len(COLOURS)))
        self.register_buffer("palette", torch.tensor(list(COLOURS.values()), dtype=torch.float32))
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))
        ColourScorer.constructed.append((cfg.vlp.tokenizer, cfg.model.pretrained))
        self.calls = 0

    def forward(self, batch):
        raise NotImplementedError("ColourScorer is for retrieval tests only")

    def retrieval_scores(self, images, captions):
        self.calls += 1
        self.seen_training = [m.training for m in self.modules()]
        self.seen_grad = torch.is_grad_enabled()
        pixels = (images.float() * self.std + self.mean) * 255  # [N,3,S,S]
        d2 = ((pixels[:, None] - self.palette[None, :, :, None, None]) ** 2).sum(2)  # [N,8,S,S]
        hist = torch.exp(-d2 / (2 * 20.0**2)).mean(dim=(2, 3))  # [N,8]: share of pixels near each colour
        names = list(COLOURS)
        words = [[w.strip(",") for w in c.split()] for c in captions]
        counts = torch.tensor([[ws.count(n) for n in names] for ws in words], dtype=torch.float32)
        text = self.text_proj(counts.to(images.device))
        s = F.normalize(hist, dim=1) @ F.normalize(text, dim=1).T
        return s, s


def scorer_cfg(**vlp):
    return config_from_dict(
        {"method": "blip", "model": TINY_MODEL, "data": {"image_size": S, "views": "vlp", **TOY}, "vlp": vlp}
    )


@pytest.fixture(scope="module")
def toy_cache(tmp_path_factory):
    import os

    cache = tmp_path_factory.mktemp("cache")
    old = os.environ.get("FREEATM_CACHE")
    os.environ["FREEATM_CACHE"] = str(cache)
    yield cache
    if old is None:
        os.environ.pop("FREEATM_CACHE", None)
    else:
        os.environ["FREEATM_CACHE"] = old


def test_evaluate_retrieval_with_colour_scorer(toy_cache):
    cfg = scorer_cfg(retrieval_max_images=0)
    method = ColourScorer(cfg)
    method.train()
    method.backbone.blocks[0].eval()  # a module that was in eval mode stays so
    result = evaluate_retrieval(method, cfg, device="cpu")
    assert method.calls == 1 and not any(method.seen_training) and not method.seen_grad
    assert method.training and not method.backbone.blocks[0].training and method.backbone.blocks[1].training
    assert result["n_images"] == 48 and result["n_texts"] == 12 and result["image_size"] == S
    assert result["source"].startswith(str(toy_cache)) and result["source"].endswith("/val")
    assert result["seconds"] > 0
    # far above chance (i2t R@1 1/12, r_mean ~0.40) only if every image is paired with its own caption
    assert result["i2t_r1"] >= 0.25 and result["t2i_r1"] >= 0.3 and result["r_mean"] >= 0.65, result
    json.dumps(result)
    line = retrieval_line(result)
    assert line.startswith(f"retrieval i2t R@1/5/10 {100 * result['i2t_r1']:.1f}/")
    assert "| t2i R@1/5/10 " in line and line.endswith(f"48 images, 12 texts, {result['seconds']:.1f} s")
    # colour words mapped to the wrong colours: the same images and captions, near chance
    with torch.no_grad():
        method.text_proj.weight.copy_(torch.roll(torch.eye(len(COLOURS)), 3, dims=0))
    scrambled = evaluate_retrieval(method, cfg, device="cpu")
    assert scrambled["r_mean"] < result["r_mean"] - 0.3, scrambled
    # max_images: the argument, else vlp.retrieval_max_images; an explicit root
    assert evaluate_retrieval(method, scorer_cfg(retrieval_max_images=20), device="cpu")["n_images"] == 20
    small = evaluate_retrieval(method, cfg, device="cpu", root=result["source"], max_images=8)
    assert (small["n_images"], small["n_texts"]) == (8, 2)


def test_evaluate_retrieval_checks_the_score_shapes(toy_cache):
    class Transposed(ColourScorer):
        def retrieval_scores(self, images, captions):
            s, _ = super().retrieval_scores(images, captions)
            return s, s.T

    cfg = scorer_cfg(retrieval_max_images=8)
    with pytest.raises(ValueError, match=r"Transposed.retrieval_scores returned \[8, 2\] and \[2, 8\]"):
        evaluate_retrieval(Transposed(cfg), cfg, device="cpu")


# --------------------------------------------------------------------------------------------------------------
# freeatm eval retrieval


def _run_dir(tmp_path, cfg, weights=None):
    from freeatm_fast.methods.text import build_tokenizer, save_tokenizer

    run = tmp_path / "run"
    save_config(cfg, run / "config.yaml")
    save_tokenizer(build_tokenizer(cfg), run)
    method = ColourScorer(cfg)
    if weights is not None:
        with torch.no_grad():
            method.text_proj.weight.copy_(weights)
    save_file({k: v.contiguous() for k, v in method.state_dict().items()}, str(run / "model.safetensors"))
    return run


def _write_folder_dataset(root, toy_val, n):
    """The first n images of a toy-world split as JPEG files + captions.json (list format)."""
    ds = ShardDataset(toy_val)
    root.mkdir(parents=True)
    entries = []
    for i in range(n):
        s = ds[i]
        s.image.save(root / f"{s.key}.jpg", quality=95)
        entries.append({"image": f"{s.key}.jpg", "caption": s.meta["caption"]})
    (root / "captions.json").write_text(json.dumps(entries))
    return root


@pytest.fixture
def scorer_registered(monkeypatch):
    """``method: blip`` builds the ColourScorer (the real BLIP is tested in its own file)."""
    monkeypatch.setitem(METHOD_REGISTRY, "blip", f"{__name__}:ColourScorer")
    ColourScorer.constructed.clear()


def test_cli_eval_retrieval_on_a_run_directory(toy_cache, tmp_path, scorer_registered, capsys):
    cfg = config_from_dict(
        {
            "method": "blip",
            "model": {**TINY_MODEL, "pretrained": str(tmp_path / "gone.safetensors")},  # cleared by the command
            "data": {"image_size": S, "views": "vlp", **TOY},
            "vlp": {"retrieval_max_images": 0},
        }
    )
    cfg_no_pretrained = config_from_dict({**cfg.to_dict(), "model": TINY_MODEL})
    run = _run_dir(tmp_path, cfg_no_pretrained)
    save_config(cfg, run / "config.yaml")
    assert cli.main(["eval", "retrieval", "--run", str(run), "--device", "cpu"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("retrieval i2t R@1/5/10 ") and "48 images, 12 texts" in line
    assert ColourScorer.constructed[-1] == (str(run / "tokenizer"), "")
    written = json.loads((run / "eval_retrieval.json").read_text())
    assert written["source"].endswith("/val") and written["model_file"] == str(run / "model.safetensors")
    assert written["method"] == "blip" and written["r_mean"] >= 0.65
    assert not list(run.glob(".*tmp*"))
    # the weights come from the model file: scrambled colour words in the file -> near chance
    run2 = _run_dir(tmp_path / "second", cfg_no_pretrained, torch.roll(torch.eye(len(COLOURS)), 3, dims=0))
    assert cli.main(["eval", "retrieval", "--run", str(run2), "--device", "cpu", "--json"]) == 0
    scrambled = json.loads(capsys.readouterr().out)
    assert scrambled["r_mean"] < written["r_mean"] - 0.3
    # --data: a folder of JPEGs with captions.json; --max-images
    folder = _write_folder_dataset(tmp_path / "pairs", written["source"], 12)
    argv = ["eval", "retrieval", "--run", str(run), "--data", str(folder), "--max-images", "8", "--json"]
    assert cli.main([*argv, "--device", "cpu"]) == 0
    on_folder = json.loads(capsys.readouterr().out)
    assert (on_folder["n_images"], on_folder["n_texts"], on_folder["source"]) == (8, 2, str(folder))
    assert json.loads((run / "eval_retrieval.json").read_text())["source"] == str(folder)


def test_cli_eval_retrieval_errors(toy_cache, tmp_path, scorer_registered, capsys):
    cfg = scorer_cfg()
    run = _run_dir(tmp_path, cfg)

    def fails(argv, *needles):
        assert cli.main(["eval", "retrieval", *argv, "--device", "cpu"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("freeatm eval: error: ") and "\n" not in err
        for needle in needles:
            assert needle in err, err

    fails(["--run", str(run), "--data", str(tmp_path / "none")], str(tmp_path / "none"), "does not exist")
    fails(["--run", str(run), "--max-images", "-1"], "max_images")
    (run / "model.safetensors").write_bytes(b"garbage")
    fails(["--run", str(run)], str(run / "model.safetensors"), "not a readable safetensors file")
    state = {k: v.contiguous() for k, v in ColourScorer(cfg).state_dict().items()}
    save_file({**state, "extra.weight": torch.zeros(1)}, str(run / "model.safetensors"))
    fails(["--run", str(run)], str(run / "model.safetensors"), "does not fit method 'blip'", "extra.weight")
    (run / "model.safetensors").unlink()
    fails(["--run", str(run)], str(run / "model.safetensors"), "no model file")
    (run / "tokenizer" / "tokenizer.json").rename(run / "tokenizer.json")
    for p in (run / "tokenizer").iterdir():
        p.unlink()
    (run / "tokenizer").rmdir()
    fails(["--run", str(run)], str(run / "tokenizer"), "no saved tokenizer")
    (run / "config.yaml").unlink()
    fails(["--run", str(run)], str(run / "config.yaml"))
    fails(["--run", str(tmp_path / "nope")], "not a directory")
    with pytest.raises(SystemExit):  # --run is required
        cli.main(["eval", "retrieval"])


def test_cli_eval_retrieval_of_a_trained_blip_run(toy_cache, tmp_path, capsys):
    """BLIP trained for 2 tiny steps through the engine; the command rebuilds it from the run directory and gets
    the engine's end-of-run recalls exactly, then evaluates it on a folder of JPEGs with captions.json."""
    from freeatm_fast.config import load_config
    from freeatm_fast.engine import train

    tiny = [
        *(f"data.{k}={v}" for k, v in TOY.items()),
        f"data.image_size={S}",
        'model.backbone_kwargs={"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}',
        "vlp.text_width=32",
        "vlp.text_layers=1",
        "vlp.text_heads=2",
        "vlp.embed_dim=16",
        "vlp.queue_size=8",
        "vlp.vocab_size=200",
        "vlp.max_len=24",
        "vlp.rerank_k=4",
        "vlp.retrieval_max_images=24",
        "train.max_steps=2",
        "train.batch_size=4",
        "train.warmup_steps=1",
        "train.log_every=1",
        "train.tensorboard=false",
        "train.checkpoint=false",
        f"train.out_dir={tmp_path / 'run'}",
    ]
    summary = train(load_config("blip", tiny))
    capsys.readouterr()  # the engine's log lines
    run = tmp_path / "run"
    engine = summary["eval"]["retrieval"]
    assert (engine["n_images"], engine["n_texts"]) == (24, 6)
    assert cli.main(["eval", "retrieval", "--run", str(run), "--device", "cpu", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    keys = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "r_mean", "n_images", "n_texts", "source")
    assert {k: result[k] for k in keys} == {k: engine[k] for k in keys}
    folder = _write_folder_dataset(tmp_path / "pairs", engine["source"], 8)
    assert cli.main(["eval", "retrieval", "--run", str(run), "--data", str(folder), "--device", "cpu"]) == 0
    assert "| 8 images, 2 texts, " in capsys.readouterr().out
    written = json.loads((run / "eval_retrieval.json").read_text())
    assert (written["n_images"], written["n_texts"], written["source"]) == (8, 2, str(folder))
    assert all(0.0 <= written[k] <= 1.0 for k in keys[:7])
