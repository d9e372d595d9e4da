"""``freeatm eval masks``: constructed shard directories with hand-computed answers, the binary rule against
``aggregate``, clear errors, and the re-noise mode's structure on the tiny random model."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from freeatm_fast import cli
from freeatm_fast.data.shards import Sample, ShardWriter, sample_key
from freeatm_fast.eval import masks as em
from freeatm_fast.generate.aggregate import AggregateConfig, aggregate

SIZE = 32  # mask side
IMAGE = 64  # image side: the colour segmentation box-filters the image down to the masks, as for SD's latent masks
GREY = (128, 128, 128)


def _square(y0, y1, x0, x1, value=255):
    m = np.zeros((SIZE, SIZE), np.uint8)
    m[y0:y1, x0:x1] = value
    return m


def _meta(caption, words, model="tiny-random", prompt=None):
    box = [0, 0, 1, 1]
    objects = [
        {"word": w, "tokens": [1 + i, 2 + i], "box": box, "area": 0.0, "score": 0.0} for i, w in enumerate(words)
    ]
    meta = {
        "caption": caption,
        "seed": 0,
        "model": model,
        "size": [IMAGE, IMAGE],
        "mask_size": SIZE,
        "objects": objects,
    }
    if prompt is not None:
        meta["prompt"] = prompt
    return meta


def _image(patches):
    """The image: grey with each patch (given in mask pixels) painted at twice the scale."""
    img = np.zeros((IMAGE, IMAGE, 3), np.uint8)
    img[:] = GREY
    for (y0, y1, x0, x1), rgb in patches:
        img[2 * y0 : 2 * y1, 2 * x0 : 2 * x1] = rgb
    return img


# Squares in mask pixels. JPEG's chroma subsampling blurs colour edges by about a pixel (a red corner pixel ends up
# 63 away from red); the 2x2 box filter down to the masks averages that out.
RED, BLUE, GREEN = (8, 16, 0, 8), (16, 24, 16, 24), (0, 8, 24, 32)
YELLOW = (16, 32, 0, 16)
RED_A, RED_B = (0, 8, 0, 8), (24, 32, 24, 32)


def _samples():
    """Three samples; the hand values per word are in EXPECTED."""
    c = em.COLOURS
    # 0: "red" exact (IoU 1, hit); the blue "square" shifted 4 px right (8x8 vs 8x8 sharing 8x4: IoU 32/96 = 1/3)
    #    with its peak outside the blue square (miss); "green square" empty (IoU 0, miss). Words located through
    #    the bracketed prompt ("square" alone is ambiguous in the caption).
    blue_soft = _square(16, 24, 20, 28, value=200)
    blue_soft[17, 26] = 255
    s0 = Sample(
        sample_key(0),
        _image([(RED, c["red"]), (BLUE, c["blue"]), (GREEN, c["green"])]),
        np.stack([_square(*RED), blue_soft, np.zeros((SIZE, SIZE), np.uint8)]),
        _meta(
            "a red square, a blue square and a green square on a grey background",
            ["red", "square", "green square"],
            prompt="a [red] square, a blue [square] and a [green square] on a grey background",
        ),
    )
    # 1: no prompt field: "star" is found in the caption, its colour is the word before it ("small" comes first).
    s1 = Sample(
        sample_key(1),
        _image([(YELLOW, c["yellow"])]),
        _square(*YELLOW)[None],
        _meta("a small yellow star on a grey background", ["star"]),
    )
    # 2: two red objects: each word's reference is the union of both squares, so exact masks score 64/128 = 0.5.
    s2 = Sample(
        sample_key(2),
        _image([(RED_A, c["red"]), (RED_B, c["red"])]),
        np.stack([_square(*RED_A), _square(*RED_B)]),
        _meta("a red square and a red circle on a grey background", ["red square", "red circle"]),
    )
    return [s0, s1, s2]


EXPECTED = {  # word: (IoU, pointing hit)
    "red": (1.0, True),
    "square": (1 / 3, False),
    "green square": (0.0, False),
    "star": (1.0, True),
    "red square": (0.5, True),
    "red circle": (0.5, True),
}


def _write(directory, samples):
    with ShardWriter(directory, "shard-000000", jpeg_quality=100) as w:
        for s in samples:
            w.write(s)
    return directory


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    return _write(tmp_path_factory.mktemp("masks") / "gen", _samples())


def test_constructed_case_known_answer(shard_dir, tmp_path):
    out = tmp_path / "out"
    r = em.evaluate_shards(shard_dir, out=out, tau=0.4)
    assert r["num_samples"] == 3 and r["num_words"] == 6 and r["reference"] == "colour"
    for word, (iou, hit) in EXPECTED.items():
        got = r["words"][word]
        assert got["n"] == 1 and got["miou"] == pytest.approx(iou, abs=1e-6) and got["pointing"] == float(hit), word
    assert r["words"]["square"]["kind"] == "shape" and r["words"]["red"]["kind"] == "colour"
    kinds = r["kinds"]
    assert kinds["colour"] == {"miou": pytest.approx(1.0), "pointing": 1.0, "n": 1, "empty_reference": 0}
    assert kinds["shape"]["n"] == 2 and kinds["shape"]["miou"] == pytest.approx((1 / 3 + 1) / 2)
    assert kinds["shape"]["pointing"] == 0.5
    assert kinds["phrase"]["n"] == 3 and kinds["phrase"]["miou"] == pytest.approx(1 / 3)
    assert kinds["phrase"]["pointing"] == pytest.approx(2 / 3)
    assert kinds["other"]["n"] == 0 and kinds["other"]["miou"] is None
    overall = r["overall"]
    assert overall["n"] == 6 and overall["miou"] == pytest.approx(5 / 9) and overall["pointing"] == pytest.approx(4 / 6)
    assert r["shared_colour"] == 2 and r["skipped_unknown"] == 0

    saved = json.loads((out / em.JSON_NAME).read_text())
    assert saved["overall"]["miou"] == pytest.approx(5 / 9) and saved["png"] == str(out / em.PNG_NAME)
    png = Image.open(out / em.PNG_NAME)
    assert png.format == "PNG" and png.height >= 6 * em.TILE_MIN  # one row per word, tiles of at least 128 pixels
    assert np.asarray(png).std() > 20
    assert sorted(p.name for p in out.iterdir()) == [em.JSON_NAME, em.PNG_NAME]  # atomic writes: no temp files
    line = em.summary_line(r)
    assert line.startswith("masks: colour mIoU 1.00 (pointing 1.00, n=1) | shape mIoU 0.67") and "all mIoU 0.56" in line


def test_colour_fidelity_counts_requested_colours_missing_from_the_image(shard_dir, tmp_path):
    r = em.evaluate_shards(shard_dir, out=tmp_path / "all")
    assert r["colour_fidelity"] == {"present": 6, "requested": 6, "fraction": 1.0}
    # A fourth sample asks for a purple circle the image does not hold: empty reference, left out of the mIoU,
    # counted against fidelity.
    miss = Sample(
        sample_key(3),
        _image([(RED, em.COLOURS["red"])]),
        np.stack([_square(*RED), _square(*BLUE)]),
        _meta("a red square and a purple circle on a grey background", ["red", "purple"]),
    )
    d = _write(tmp_path / "miss", [*_samples(), miss])
    r = em.evaluate_shards(d, out=tmp_path / "o", tau=0.4)
    assert r["overall"]["n"] == 7 and r["overall"]["empty_reference"] == 1
    assert r["colour_fidelity"] == {"present": 7, "requested": 8, "fraction": 7 / 8}
    assert "colour fidelity 0.88 (7/8 requested colours present)" in em.summary_line(r)
    # Exact reference masks: no colour segmentation, no fidelity.
    s0 = _samples()[0]
    exact = np.stack([_square(*RED), _square(*BLUE), _square(*GREEN)])
    ref = _write(tmp_path / "ref", [Sample(s0.key, s0.image, exact, {**s0.meta, "model": "toyworld"})])
    assert "colour_fidelity" not in em.evaluate_shards(shard_dir, reference=ref, out=tmp_path / "o1", max_samples=1)


def test_reference_dir_and_toyworld_without_reference(shard_dir, tmp_path):
    # Exact reference masks for the first sample (same key, same object order): the same hand values as colour mode.
    s0 = _samples()[0]
    exact = np.stack([_square(*RED), _square(*BLUE), _square(*GREEN)])
    ref = _write(tmp_path / "ref", [Sample(s0.key, s0.image, exact, {**s0.meta, "model": "toyworld"})])
    r = em.evaluate_shards(shard_dir, reference=ref, out=tmp_path / "o1", max_samples=1)
    assert r["reference"] == str(ref) and r["num_samples"] == 1
    for word in ("red", "square", "green square"):
        assert r["words"][word]["miou"] == pytest.approx(EXPECTED[word][0], abs=1e-6)
    # Keys missing from the reference are named.
    with pytest.raises(ValueError, match="000000001.*has no sample with that key"):
        em.evaluate_shards(shard_dir, reference=ref, out=tmp_path / "o2")
    # A toy-world directory holds the ground truth itself: nothing to compare it with.
    with pytest.raises(ValueError, match="000000000 is toy-world ground truth.*--reference"):
        em.evaluate_shards(ref, out=tmp_path / "o3")


def test_unknown_word_error_names_key_and_word(tmp_path):
    s = Sample(sample_key(7), _image([]), _square(0, 8, 0, 8)[None], _meta("a photo of a dog", ["dog"]))
    d = _write(tmp_path / "dog", [s, _samples()[1]])
    with pytest.raises(ValueError, match=r"sample 000000007 .*object word 'dog'"):
        em.evaluate_shards(d)
    r = em.evaluate_shards(d, skip_unknown=True)
    assert r["skipped_unknown"] == 1 and r["skipped_examples"] == ["000000007:dog"] and r["overall"]["n"] == 1
    assert (d / em.JSON_NAME).is_file()  # default output folder: DIR


def test_bad_dir_errors_name_the_path(tmp_path, capsys):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        em.evaluate_shards(missing)
    afile = tmp_path / "file.txt"
    afile.write_text("x")
    with pytest.raises(NotADirectoryError, match=str(afile)):
        em.evaluate_shards(afile)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=f"{tmp_path / 'empty'}: not a shard directory"):
        em.evaluate_shards(tmp_path / "empty")
    assert cli.main(["eval", "masks", str(missing)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("freeatm eval masks: error:") and str(missing) in err
    assert cli.main(["eval", "masks"]) == 2
    assert "give a shard directory DIR" in capsys.readouterr().err


def test_cli_shard_mode(shard_dir, tmp_path, capsys):
    out = tmp_path / "cli"
    assert cli.main(["eval", "masks", str(shard_dir), "--out", str(out), "--tau", "0.4"]) == 0
    assert capsys.readouterr().out.startswith("masks: colour mIoU 1.00")
    assert (out / em.JSON_NAME).is_file() and (out / em.PNG_NAME).is_file()


def test_binary_rule_matches_aggregate():
    g = torch.Generator().manual_seed(0)
    maps = {8: torch.rand(3, 5, 8, 8, generator=g), 4: torch.rand(3, 5, 4, 4, generator=g)}
    spans = [[[1], [2, 3], [4]], [[0]], [[1, 2], [3]]]  # padding objects in samples 1 and 2
    for tau in (0.0, 0.4, 0.9):
        res = aggregate(maps, spans, AggregateConfig(tau=tau, mask_size=16), image_size=(64, 64))
        assert torch.equal(em.binary_masks(res.soft, tau, res.valid), res.binary)
    # Ties: the background first, then the earlier object.
    soft = torch.full((2, 1, 1), 0.4)
    assert not em.binary_masks(soft, 0.4).any()
    soft = torch.full((2, 1, 1), 0.5)
    assert em.binary_masks(soft, 0.4)[:, 0, 0].tolist() == [True, False]


def test_kind_binary_is_the_rule_per_kind():
    g = torch.Generator().manual_seed(1)
    soft = torch.rand(2, 3, 4, 6, 6, generator=g)
    valid = torch.rand(2, 3, 4, generator=g) > 0.3
    got = em._kind_binary(soft, 0.5, valid)
    for k in range(3):
        assert torch.equal(got[:, k], em.binary_masks(soft[:, k], 0.5, valid[:, k]) & valid[:, k, :, None, None])


def test_word_kinds_and_colours():
    assert [em.word_kind(w) for w in ("red", "circle", "red circle", "dog", "small blue star")] == [
        "colour", "shape", "phrase", "other", "phrase",
    ]  # fmt: skip
    cap = "an orange cross, a small blue star and a green ring on a striped background"
    meta = {"caption": cap, "objects": [{"word": "cross"}, {"word": "star"}, {"word": "green ring"}]}
    spans = em.object_char_spans(meta)
    assert [cap[s:e] for s, e in spans] == ["cross", "star", "green ring"]
    assert [em.object_colour(o["word"], cap, sp) for o, sp in zip(meta["objects"], spans, strict=True)] == [
        "orange",
        "blue",
        "green",
    ]
    assert em.object_colour("dog", "a red dog", (6, 9)) is None  # only shape words take the colour before them


def test_renoise_toy_seed_renders_another_toy_world(tmp_path, capsys):
    def run(*extra):
        argv = ["eval", "masks", "--toyworld", "--model", "tiny-random", "--images", "2", "--timesteps", "1"]
        argv += ["--image-size", "32", "--device", "cpu", "--json", "--out", str(tmp_path / "-".join(extra)), *extra]
        assert cli.main(argv) == 0
        return json.loads(capsys.readouterr().out)

    default, seeded = run(), run("--toy-seed", "3")
    assert default["toyworld"] == {"split": "val", "seed": 0} and seeded["toyworld"] == {"split": "val", "seed": 3}
    # Other images: other captions, so other words (or other counts) are scored.
    words = [{w: v["n"] for w, v in r["test"]["words"].items()} for r in (default, seeded)]
    assert words[0] != words[1]


def test_renoise_mode_structure(tmp_path, capsys):
    torch.manual_seed(0)
    out = tmp_path / "renoise"
    argv = ["eval", "masks", "--toyworld", "--model", "tiny-random", "--images", "2", "--timesteps", "2"]
    argv += ["--image-size", "32", "--device", "cpu", "--out", str(out), "--json"]
    assert cli.main(argv) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["mode"] == "renoise" and r["image_size"] == 32 and r["mask_size"] == 32
    assert r["timesteps"] == [250, 750] and set(r["windows"]) == {"all", "t250", "t750"}
    assert r["resolutions"] == [32, 16]  # tiny-random's two cross-attention levels, named at its native size
    val, test = r["splits"]["val"], r["splits"]["test"]
    assert (val["start"], val["stop"]) == (0, 2) and test["start"] >= val["stop"] and test["stop"] - test["start"] == 2
    grid = r["grid"]
    n_recipes = len(grid["resolutions"]) * 3 * len(grid["upsample"]) * len(grid["normalize"]) * len(grid["tau"])
    assert len(r["recipes"]) == n_recipes == 3 * 3 * 2 * 2 * len(em.DEFAULT_TAUS)

    def metrics(d):
        return [v for k in ("colour", "shape", "phrase") for v in (d[k]["miou"], d[k]["pointing"])]

    for rc in r["recipes"]:
        for split in ("val", "test"):
            assert all(0.0 <= v <= 1.0 for v in metrics(rc[split]))
            assert rc[split]["colour"]["n"] == rc[split]["shape"]["n"] == rc[split]["phrase"]["n"] > 0
    # The chosen recipe is the argmax of the validation colour-word mIoU.
    best = max(rc["val"]["colour"]["miou"] for rc in r["recipes"])
    chosen = {k: r["chosen"][k] for k in ("resolutions", "window", "upsample", "normalize", "tau")}
    match = [rc for rc in r["recipes"] if {k: rc[k] for k in chosen} == chosen]
    assert len(match) == 1 and match[0]["val"]["colour"]["miou"] == best
    assert r["val"]["kinds"]["colour"]["miou"] == best
    assert r["test"]["kinds"] == match[0]["test"]
    assert set(r["breakdown"]["kinds"]) == {"colour", "shape", "phrase"}
    assert set(r["breakdown"]["kinds"]["colour"]) == {"all", "32", "16"}
    assert set(r["breakdown"]["kinds"]["colour"]["32"]) == {"all", "t250", "t750"}
    assert r["default_recipe"]["recipe"] == {
        "resolutions": [32, 16],
        "window": "all",
        "upsample": "bicubic",
        "normalize": "max",
        "tau": 0.4,
    }
    assert all(w["kind"] in ("colour", "shape", "phrase") for w in r["test"]["words"].values())
    assert (out / em.JSON_NAME).is_file() and Image.open(out / em.PNG_NAME).format == "PNG"


def test_renoise_scoring_with_oracle_maps():
    """Maps that attend exactly to each word's object score near 1 (the word <-> object <-> reference bookkeeping
    is right); the same maps given to the wrong objects score low."""
    import types

    import torch.nn.functional as F

    from freeatm_fast.generate.models import build_tiny_tokenizer

    pipe = types.SimpleNamespace(tokenizer=build_tiny_tokenizer())
    batch, tokens, _ = em._render_batch([0, 1, 2, 5], pipe, toy_seed=0, image_size=64, mask_size=64)
    B, K = tokens.shape
    weights = batch.weights.view(B, 3, -1, K)
    owner = torch.full((B, K), -1)  # the object whose colour or shape word holds token column k
    for o in range(weights.shape[2]):
        for k in range(2):
            owner[weights[:, k, o] > 0] = o

    def oracle(shift):
        maps = torch.zeros(B, K, 32, 32)
        for b in range(B):
            n = int(batch.valid[b, 0].sum())
            for c in range(K):
                if owner[b, c] >= 0:
                    obj = (int(owner[b, c]) + shift) % n
                    maps[b, c] = F.interpolate(batch.refs[b, obj].float()[None, None], size=(32, 32), mode="area")[0, 0]
        return maps

    windows = em.timestep_windows([100, 600], 2)
    batch.maps = [{32: oracle(0)}, {32: oracle(0) * 0.5}]
    iou, hit = em._score_batch(
        batch, windows, [(32,)], ("bicubic", "bilinear"), ("max", "minmax"), (0.4, 0.5), 64, "cpu"
    )
    n_words = 3 * int(batch.valid[:, 0].sum())
    assert iou.shape == (n_words, 3 * 2 * 2 * 2) and hit.shape == (n_words, 3 * 2 * 2)
    assert iou.min() > 0.7 and iou.mean() > 0.9 and hit.all()
    batch.maps = [{32: oracle(1)}, {32: oracle(1)}]  # every word attends to the next object of its image
    iou, hit = em._score_batch(batch, windows, [(32,)], ("bicubic",), ("max",), (0.4,), 64, "cpu")
    multi = np.repeat(batch.valid[:, 0].sum(1).numpy() > 1, [3 * int(n) for n in batch.valid[:, 0].sum(1)])
    assert iou[multi].mean() < 0.2 and hit[multi].mean() < 0.2
