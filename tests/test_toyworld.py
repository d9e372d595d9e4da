"""The toy world (DESIGN §6): deterministic rendering, exact masks, boxes, captions, shards, cache."""

import hashlib
import multiprocessing as mp
import time

import numpy as np
import pytest

from freeatm_fast.config import DataConfig
from freeatm_fast.data import toyworld
from freeatm_fast.data.shards import read_index, read_shard, verify_dir
from freeatm_fast.data.toyworld import (
    CLASSES,
    COLOURS,
    IMAGES_PER_CAPTION,
    build_toyworld,
    cached_toyworld,
    default_toyworld,
    render_sample,
)

N_CHECK = 60  # samples checked per property test (covers 1-4 objects, every background)


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_classes_palette():
    assert len(CLASSES) == 8 and len(set(CLASSES)) == 8
    assert len(COLOURS) >= 8


def test_deterministic_in_seed_split_index():
    a, b = render_sample(0, "train", 5), render_sample(0, "train", 5)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.masks, b.masks) and a.meta == b.meta
    for other in (render_sample(1, "train", 5), render_sample(0, "val", 5), render_sample(0, "train", 6)):
        assert not np.array_equal(a.image, other.image)
    with pytest.raises(ValueError, match="split"):
        render_sample(0, "test", 0)


def test_masks_exact_against_rendering():
    counts = set()
    for i in range(N_CHECK):
        s = render_sample(3, "train", i)
        size = s.meta["size"][0]
        k = len(s.meta["objects"])
        counts.add(k)
        assert s.image.shape == (size, size, 3) and s.image.dtype == np.uint8
        assert s.masks.shape == (k, size, size) and s.masks.dtype == np.uint8
        assert set(np.unique(s.masks)) <= {0, 255}
        assert (s.masks.astype(np.int64).sum(0) <= 255).all(), "visible masks must not overlap"
        for j, obj in enumerate(s.meta["objects"]):
            on = s.masks[j] > 0
            assert on.any(), f"sample {i} object {j} is fully occluded"
            # the mask is nonzero only where the object's exact colour was painted
            assert (s.image[on] == np.asarray(obj["rgb"], dtype=np.uint8)).all()
        # the main object is the biggest at full size; it stays largely visible
        assert s.meta["objects"][0]["area"] > 0.02
    assert counts == {1, 2, 3, 4}


def test_boxes_and_areas_match_masks():
    for i in range(N_CHECK):
        s = render_sample(0, "val", i)
        size = s.meta["size"][0]
        for j, obj in enumerate(s.meta["objects"]):
            ys, xs = np.nonzero(s.masks[j])
            assert obj["box"] == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
            assert obj["area"] == pytest.approx(len(xs) / size**2)
            assert obj["score"] == 1.0


def test_captions_labels_and_token_spans():
    for i in range(N_CHECK):
        meta = render_sample(0, "train", i).meta
        words = meta["caption"].split(" ")
        assert meta["caption"].endswith(f"on a {meta['background']} background")
        assert 0 <= meta["label"] < len(CLASSES)
        assert meta["label_name"] == CLASSES[meta["label"]] == meta["objects"][0]["shape"]
        assert meta["model"] == "toyworld" and meta["split"] == "train"
        for obj in meta["objects"]:
            start, end = obj["tokens"]
            assert " ".join(words[start:end]).rstrip(",") == obj["word"] == f"{obj['colour']} {obj['shape']}"
            assert obj["shape"] in CLASSES and obj["colour"] in COLOURS
            assert (words[start - 1] == "small") == obj["small"]
        main, rest = meta["objects"][0], meta["objects"][1:]
        assert all(o["colour"] != main["colour"] for o in rest)


def test_images_of_one_caption_group():
    g = IMAGES_PER_CAPTION
    a, b = render_sample(0, "train", 2 * g), render_sample(0, "train", 2 * g + 1)
    assert a.meta["caption"] == b.meta["caption"] and a.meta["caption_group"] == b.meta["caption_group"] == 2
    assert not np.array_equal(a.image, b.image)
    assert render_sample(0, "train", 3 * g).meta["caption_group"] == 3


def test_build_verify_resume(tmp_path):
    paths = build_toyworld(tmp_path, train_images=60, val_images=20, image_size=32, seed=1, shard_size=25)
    assert paths == {"train": tmp_path / "train", "val": tmp_path / "val"}
    for split, n in (("train", 60), ("val", 20)):
        report = verify_dir(paths[split])
        assert report["ok"], report
        assert report["num_samples"] == n
        index = read_index(paths[split])
        assert index["generator"]["classes"] == list(CLASSES)
        assert index["generator"]["split"] == split
    sample = next(iter(read_shard(paths["train"] / "shard-000000.tar")))
    assert sample.key == "000000000" and sample.meta["label"] == render_sample(1, "train", 0, 32).meta["label"]
    assert sample.masks.shape == (len(sample.meta["objects"]), 32, 32)

    shard = paths["train"] / "shard-000001.tar"
    digest, mtime = _sha(shard), shard.stat().st_mtime_ns
    build_toyworld(tmp_path, train_images=60, val_images=20, image_size=32, seed=1, shard_size=25)
    assert shard.stat().st_mtime_ns == mtime, "a complete shard must be kept"
    shard.unlink()
    build_toyworld(tmp_path, train_images=60, val_images=20, image_size=32, seed=1, shard_size=25)
    assert _sha(shard) == digest, "a rebuilt shard must be byte-identical"
    assert verify_dir(paths["train"])["ok"]
    with pytest.raises(ValueError, match="different generator config"):
        build_toyworld(tmp_path, train_images=60, val_images=20, image_size=32, seed=2, shard_size=25)


def _cached(cache_dir):
    return str(cached_toyworld(train_images=24, val_images=8, image_size=32, seed=0, cache_dir=cache_dir))


def test_cache_built_once_and_reused(tmp_path, monkeypatch):
    monkeypatch.setenv("FREEATM_CACHE", str(tmp_path / "cache"))
    cfg = DataConfig(toy_train_images=24, toy_val_images=8, toy_image_size=32, toy_seed=0)
    root = default_toyworld(cfg)
    assert root == tmp_path / "cache" / f"toyworld-v{toyworld.TOYWORLD_VERSION}-32px-24-8-s0"
    assert (root / "complete.json").is_file()
    assert read_index(root / "train")["num_samples"] == 24 and read_index(root / "val")["num_samples"] == 8
    stamps = {p: p.stat().st_mtime_ns for p in root.rglob("*.tar")}

    def no_build(*args, **kwargs):
        raise AssertionError("the cached toy world was rebuilt")

    monkeypatch.setattr(toyworld, "build_toyworld", no_build)
    assert default_toyworld(cfg) == root
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*.tar")} == stamps


def test_cache_two_processes_build_it_together(tmp_path):
    # Two "ranks" started together: the fcntl lock makes one build and the other wait and reuse.
    ctx = mp.get_context("fork")
    with ctx.Pool(2) as pool:
        roots = pool.map(_cached, [tmp_path, tmp_path])
    assert roots[0] == roots[1]
    assert verify_dir(f"{roots[0]}/train")["ok"] and verify_dir(f"{roots[0]}/val")["ok"]


def test_build_speed_1000_images(tmp_path):
    start = time.perf_counter()
    build_toyworld(tmp_path, train_images=1000, val_images=0, image_size=64, seed=0)
    elapsed = time.perf_counter() - start
    print(f"\ntoy world: 1000 images of 64x64 rendered and written in {elapsed:.2f} s ({1000 / elapsed:.0f} images/s)")
    assert read_index(tmp_path / "train")["num_samples"] == 1000


def test_main_object_wears_its_class_colour_most_of_the_time():
    colours = list(toyworld.COLOURS)
    plans = [toyworld.caption_plan(0, "train", g) for g in range(400)]
    typical = [p["objects"][0]["colour"] == colours[p["label"] % len(colours)] for p in plans]
    share = sum(typical) / len(typical)
    # binomial(400, 0.75): sd 0.022, so +-0.08 is > 3.5 sd
    assert abs(share - toyworld.TYPICAL_COLOUR_PROB) < 0.08
    assert all(o["colour"] != p["objects"][0]["colour"] for p in plans for o in p["objects"][1:])
