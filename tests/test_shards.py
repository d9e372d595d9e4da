"""Shard format (DESIGN §5): round trip, atomic writes, validation of every kind of damage, index, verify_dir."""

import errno
import io
import json
import os
import tarfile

import numpy as np
import pytest
from PIL import Image

from freeatm_fast.data import shards
from freeatm_fast.data.shards import (
    RawSample,
    Sample,
    ShardError,
    ShardReader,
    ShardWriter,
    read_index,
    read_shard,
    sample_key,
    scan_shards,
    shard_keys,
    temp_files,
    update_index,
    verify_dir,
    write_index,
)


def make_sample(i: int, k: int = 3, s: int = 8, w: int = 40, h: int = 24, numpy_image: bool = False) -> Sample:
    """Sample i with K masks of S×S on a W×H image (smooth, so JPEG error stays small)."""
    rng = np.random.default_rng(i)
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([xx * 255 // (w - 1), yy * 255 // (h - 1), np.full_like(xx, (40 * i) % 256)], -1).astype(np.uint8)
    masks = rng.integers(0, 256, size=(k, s, s), dtype=np.uint8)
    objects = [
        {"word": f"obj{j}", "tokens": [2 + j, 4 + j], "box": [1.5 * j, 0, 10 + j, 12.25], "area": j / 8, "score": 0.5}
        for j in range(k)
    ]
    meta = {
        "caption": f"a photo of a dog number {i} — ünïcode",
        "seed": 1000 + i,
        "model": "tiny-random",
        "size": [w, h],
        "mask_size": s,
        "objects": objects,
        "prompt": "a photo of a [dog]",
        "class_id": 7,
    }
    return Sample(sample_key(i), img if numpy_image else Image.fromarray(img), masks, meta)


def write_shard(out_dir, name, samples, **kw):
    with ShardWriter(out_dir, name, **kw) as w:
        for s in samples:
            w.write(s)
    return out_dir / f"{name}.tar"


def members_of(sample: Sample) -> list[tuple[str, bytes]]:
    """The three members exactly as ShardWriter writes them (for building damaged shards by hand)."""
    buf = io.BytesIO()
    sample.image.save(buf, format="JPEG", quality=95)
    return [
        (f"{sample.key}.jpg", buf.getvalue()),
        (f"{sample.key}.masks.u8", sample.masks.tobytes()),
        (f"{sample.key}.json", json.dumps(sample.meta).encode()),
    ]


def write_tar(path, members):
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def as_array(image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


# ---------------------------------------------------------------------------------------------- round trip


@pytest.mark.parametrize("k", [0, 3])
def test_round_trip(tmp_path, k):
    samples = [make_sample(i, k=k, numpy_image=(i == 1)) for i in range(3)]
    path = write_shard(tmp_path, "shard-r00-000000", samples)
    assert scan_shards(tmp_path) == ["shard-r00-000000"] and temp_files(tmp_path) == []

    with tarfile.open(path) as tf:
        names = tf.getnames()
    assert names == [f"{s.key}.{ext}" for s in samples for ext in ("jpg", "masks.u8", "json")]

    reader = read_shard(path)
    got = list(reader)
    assert [g.key for g in got] == [s.key for s in samples]
    assert reader.num_samples == 3 and reader.skipped == 0
    for want, g in zip(samples, got, strict=True):
        assert isinstance(g, Sample) and g.image.mode == "RGB" and g.image.size == (40, 24)
        err = np.abs(as_array(g.image) - as_array(want.image))
        assert err.mean() < 2.0 and err.max() <= 32, (err.mean(), err.max())
        assert g.masks.dtype == np.uint8 and g.masks.shape == (k, 8, 8)
        np.testing.assert_array_equal(g.masks, want.masks)
        assert g.meta == want.meta
        g.masks[...] = 0  # the reader hands out writable masks (augmentations work in place)

    raw = list(read_shard(path, decode=False))
    assert all(isinstance(r, RawSample) for r in raw)
    for r, g in zip(raw, got, strict=True):
        np.testing.assert_array_equal(as_array(Image.open(io.BytesIO(r.jpeg)).convert("RGB")), as_array(g.image))
        assert r.meta == g.meta


def test_raw_samples_copy_into_a_new_shard_byte_for_byte(tmp_path):
    src = write_shard(tmp_path / "a", "s0", [make_sample(i) for i in range(2)])
    dst = write_shard(tmp_path / "b", "s0", list(read_shard(src, decode=False)))
    assert src.read_bytes() == dst.read_bytes()  # also shows the writer is deterministic (mtime 0)


def test_jpeg_quality_is_used(tmp_path):
    low = write_shard(tmp_path, "low", [make_sample(0)], jpeg_quality=10)
    high = write_shard(tmp_path, "high", [make_sample(0)], jpeg_quality=100)
    size = {p: next(read_shard(p, decode=False)).jpeg.__len__() for p in (low, high)}
    assert size[low] < size[high]
    with pytest.raises(ValueError, match="jpeg_quality"):
        ShardWriter(tmp_path, "q", jpeg_quality=0)


# ---------------------------------------------------------------------------------------------- writer


def test_exception_inside_with_leaves_no_shard_and_no_temp(tmp_path):
    with pytest.raises(RuntimeError, match="boom"):
        with ShardWriter(tmp_path, "s0") as w:
            w.write(make_sample(0))
            assert w.temp_path.exists() and not w.path.exists()
            assert scan_shards(tmp_path) == []  # a half shard never looks complete
            raise RuntimeError("boom")
    assert os.listdir(tmp_path) == []


def test_disk_full_during_write(tmp_path):
    def full(data):
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError) as info:
        with ShardWriter(tmp_path, "s0") as w:
            w.write(make_sample(0))
            w._file.write = full
            w.write(make_sample(1))
    assert info.value.errno == errno.ENOSPC
    msg = str(info.value)
    assert str(tmp_path / "s0.tar") in msg and "nothing was written for this shard" in msg
    assert os.listdir(tmp_path) == []


def test_disk_full_at_close(tmp_path, monkeypatch):
    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    w = ShardWriter(tmp_path, "s0")
    w.write(make_sample(0))
    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError, match="s0.tar.*nothing was written for this shard"):
        w.close()
    assert os.listdir(tmp_path) == []
    with pytest.raises(RuntimeError, match="nothing was written"):
        w.close()


@pytest.mark.parametrize(
    "change, field",
    [
        (lambda s: s.meta.update(seed=np.int64(3)), "meta.seed"),
        (lambda s: s.meta.update(size=[41, 24]), "size"),
        (lambda s: s.meta.update(mask_size=9), "mask_size"),
        (lambda s: s.meta["objects"].pop(), "objects"),
        (lambda s: s.meta.pop("caption"), "caption"),
        (lambda s: s.meta["objects"][1].update(tokens=[3, 3]), "objects[1].tokens"),
        (lambda s: s.meta["objects"][0].update(box=[0, 0, 41, 5]), "objects[0].box"),
        (lambda s: s.meta["objects"][0].update(score=float("nan")), "objects[0].score"),
    ],
)
def test_writer_rejects_bad_meta_naming_key_and_field(tmp_path, change, field):
    bad = make_sample(5)
    change(bad)
    with ShardWriter(tmp_path, "s0") as w:
        with pytest.raises(ValueError) as info:
            w.write(bad)
        w.write(make_sample(6))  # the shard stays usable after a rejected sample
    assert "000000005" in str(info.value) and field in str(info.value), str(info.value)
    assert [s.key for s in read_shard(tmp_path / "s0.tar")] == ["000000006"]


def test_writer_rejects_bad_arrays_and_keys(tmp_path):
    good = make_sample(0)
    cases = [
        (Sample("000000001", good.image, good.masks.astype(np.float32), good.meta), "masks"),
        (Sample("000000001", good.image, good.masks[:, :, :4], good.meta), "masks"),
        (Sample("000000001", good.image.convert("L"), good.masks, good.meta), "image"),
        (Sample("000000001", np.zeros((24, 40, 3), np.float32), good.masks, good.meta), "image"),
        (Sample("bad.key", good.image, good.masks, good.meta), "key"),
        (RawSample("000000001", b"not a jpeg", good.masks, good.meta), "jpeg"),
    ]
    with ShardWriter(tmp_path, "s0") as w:
        w.write(good)
        for sample, field in cases:
            with pytest.raises(ValueError, match=field):
                w.write(sample)
        with pytest.raises(ValueError, match="000000000.*already written"):
            w.write(good)
    assert shard_keys(tmp_path / "s0.tar") == ["000000000"]


def test_complete_shard_is_not_overwritten_and_stale_temps_are_removed(tmp_path):
    write_shard(tmp_path, "s0", [make_sample(0)])
    with pytest.raises(FileExistsError, match="s0.tar"):
        ShardWriter(tmp_path, "s0")
    stale = tmp_path / ".s1.tar.tmp-99999999"  # left by a killed run
    stale.write_bytes(b"half a shard")
    assert temp_files(tmp_path) == [stale.name] and scan_shards(tmp_path) == ["s0"]
    write_shard(tmp_path, "s1", [make_sample(1)])
    assert temp_files(tmp_path) == [] and scan_shards(tmp_path) == ["s0", "s1"]
    write_shard(tmp_path, "s0", [make_sample(2)], overwrite=True)
    assert shard_keys(tmp_path / "s0.tar") == ["000000002"]
    with pytest.raises(ValueError, match="shard_name"):
        ShardWriter(tmp_path, ".hidden")


# ---------------------------------------------------------------------------------------------- reader validation


def _damaged(tmp_path, edit):
    """A shard of samples 0, 1, 2 where ``edit`` rewrites sample 1's members (list of (name, bytes))."""
    samples = [make_sample(i) for i in range(3)]
    members = members_of(samples[0]) + edit(members_of(samples[1])) + members_of(samples[2])
    return write_tar(tmp_path / "bad.tar", members)


def _json_without(field):
    def edit(members):
        meta = json.loads(members[2][1])
        del meta[field]
        return [members[0], members[1], (members[2][0], json.dumps(meta).encode())]

    return edit


@pytest.mark.parametrize(
    "edit, problem",
    [
        (lambda m: [(m[0][0], m[0][1][: len(m[0][1]) // 3]), m[1], m[2]], "does not decode as a JPEG"),
        (lambda m: [(m[0][0], b"\x89PNG garbage"), m[1], m[2]], "does not decode as a JPEG"),
        (lambda m: [m[0], m[2]], r"missing member.*000000001\.masks\.u8"),
        (lambda m: [m[1], m[2]], r"missing member.*000000001\.jpg"),
        (lambda m: [m[0], (m[1][0], m[1][1][:-1]), m[2]], r"191 bytes, expected K\*S\*S = 3\*8\*8 = 192"),
        (_json_without("mask_size"), r"missing field.*mask_size"),
        (lambda m: [m[0], m[1], (m[2][0], b"{not json")], "not valid UTF-8 JSON"),
        (lambda m: [m[0], m[1], (m[2][0], m[2][1].replace(b'"size": [40, 24]', b'"size": [24, 40]'))], "image size"),
        (lambda m: [m[0], m[1], m[2], ("000000001.txt", b"x")], "unexpected member"),
        (lambda m: [m[0], m[1], m[2], m[2]], "appears twice"),
    ],
)
def test_bad_sample_raises_naming_shard_and_key(tmp_path, edit, problem):
    path = _damaged(tmp_path, edit)
    reader = read_shard(path)
    assert next(reader).key == "000000000"
    with pytest.raises(ShardError, match=problem) as info:
        next(reader)
    assert str(path) in str(info.value) and "'000000001'" in str(info.value)
    assert isinstance(info.value, ValueError)


def test_skip_bad_counts_and_names_skipped_samples(tmp_path):
    path = _damaged(tmp_path, lambda m: [m[0], (m[1][0], m[1][1][:-1]), m[2]])
    good = write_shard(tmp_path, "good", [make_sample(7)])
    reader = ShardReader([path, good], skip_bad=True, decode=False)
    assert [s.key for s in reader] == ["000000000", "000000002", "000000007"]
    assert reader.skipped == 1 and reader.skipped_keys == ["000000001"]
    assert reader.bad_samples[0].shard == str(path) and "K*S*S" in reader.bad_samples[0].error
    assert reader.bad_shards == [] and reader.num_samples == 3


def test_non_contiguous_duplicate_key_is_a_bad_sample(tmp_path):
    a, b = members_of(make_sample(0)), members_of(make_sample(1))
    path = write_tar(tmp_path / "dup.tar", a + b + a)
    with pytest.raises(ShardError, match=r"'000000000'.*appears again"):
        list(read_shard(path))
    with pytest.raises(ShardError, match="appears again"):
        shard_keys(path)


@pytest.mark.parametrize("cut", ["half", "member_boundary", "header"])
def test_truncated_tar_raises_naming_the_shard(tmp_path, cut):
    path = write_shard(tmp_path, "s0", [make_sample(i) for i in range(4)])
    data = path.read_bytes()
    if cut == "half":
        data = data[: len(data) // 2]
    else:
        # Offsets of each member's header; cutting exactly there makes tarfile stop silently.
        with tarfile.open(path) as tf:
            offsets = [m.offset for m in tf.getmembers()]
        data = data[: offsets[6]] if cut == "member_boundary" else data[: offsets[6] + 100]
    path.write_bytes(data)
    with pytest.raises(ShardError, match="s0.tar: tar is") as info:
        list(read_shard(path))
    assert str(path) in str(info.value)
    with pytest.raises(ShardError, match="s0.tar"):
        shard_keys(path)
    reader = read_shard(path, skip_bad=True)
    keys = [s.key for s in reader]
    assert len(keys) < 4 and len(reader.bad_shards) == 1 and reader.bad_shards[0].shard == str(path)


def test_corrupt_header_and_non_tar_file(tmp_path):
    path = write_shard(tmp_path, "s0", [make_sample(i) for i in range(2)])
    data = bytearray(path.read_bytes())
    with tarfile.open(path) as tf:
        third = tf.getmembers()[3].offset
    data[third : third + 20] = b"\xff" * 20  # breaks the header checksum of sample 1's first member
    path.write_bytes(bytes(data))
    with pytest.raises(ShardError, match="corrupt tar header"):
        list(read_shard(path))
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"this is not a tar file at all" * 40)
    with pytest.raises(ShardError, match="junk.tar: not a readable tar file"):
        list(read_shard(junk))


def test_empty_shard(tmp_path):
    path = write_shard(tmp_path, "empty", [])
    assert list(read_shard(path)) == [] and shard_keys(path) == []


# ---------------------------------------------------------------------------------------------- index and directory


GEN = {"model": "tiny-random", "steps": 2, "guidance": 7.5, "size": [40, 24], "num_images": 6}


def test_index_round_trip_and_validation(tmp_path):
    index = {
        "version": 1,
        "created": "2025-01-01T00:00:00+00:00",
        "num_samples": 5,
        "generator": GEN,
        "shards": [
            {"name": "a", "num_samples": 5, "keys_first": "000000000", "keys_last": "000000004"},
            {"name": "b", "num_samples": 0, "keys_first": None, "keys_last": None},
        ],
    }
    write_index(tmp_path, index)
    assert read_index(tmp_path) == index
    assert [p.name for p in tmp_path.iterdir()] == ["index.json"]  # no temporary file left
    with pytest.raises(ValueError, match="num_samples"):
        write_index(tmp_path, {**index, "num_samples": 4})
    (tmp_path / "index.json").write_text(json.dumps({**index, "version": 2}))
    with pytest.raises(ValueError, match=r"index\.json: key 'version' is 2"):
        read_index(tmp_path)
    bad = {**index, "shards": [{"name": "a", "num_samples": 5, "keys_first": "000000000"}]}
    (tmp_path / "index.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match=r"shards\[0\]\.keys_last"):
        read_index(tmp_path)


def test_update_index_rebuilds_from_the_directory(tmp_path):
    write_shard(tmp_path, "shard-r00-000000", [make_sample(i) for i in range(3)])
    (tmp_path / ".shard-r00-000001.tar.tmp-4242").write_bytes(b"in progress")
    first = update_index(tmp_path, GEN)
    assert first["num_samples"] == 3 and [s["name"] for s in first["shards"]] == ["shard-r00-000000"]
    assert first["shards"][0]["keys_first"] == "000000000" and first["shards"][0]["keys_last"] == "000000002"
    # Another rank completes a shard; this rank's update must include it (rebuilt from the listing).
    write_shard(tmp_path, "shard-r01-000000", [make_sample(i) for i in range(3, 5)])
    second = update_index(tmp_path, GEN)
    assert read_index(tmp_path) == second and second["num_samples"] == 5 and second["num_shards"] == 2
    assert second["created"] == first["created"] and second["generator"] == GEN
    with pytest.raises(ValueError, match=r"different generator config.*\['steps'\]"):
        update_index(tmp_path, {**GEN, "steps": 3})


def test_update_index_includes_a_shard_completed_while_it_was_writing(tmp_path, monkeypatch):
    write_shard(tmp_path, "r0", [make_sample(0)])
    real_write_index = shards.write_index
    calls = []

    def write_index_while_another_rank_finishes(out_dir, index):
        real_write_index(out_dir, index)
        if not calls:  # the other rank renames its shard right after our listing was taken
            write_shard(tmp_path, "r1", [make_sample(1)])
        calls.append([s["name"] for s in index["shards"]])

    monkeypatch.setattr(shards, "write_index", write_index_while_another_rank_finishes)
    index = update_index(tmp_path, GEN)
    assert calls == [["r0"], ["r0", "r1"]]
    assert [s["name"] for s in index["shards"]] == ["r0", "r1"] and read_index(tmp_path)["num_samples"] == 2


def test_update_index_reports_a_damaged_shard(tmp_path):
    path = write_shard(tmp_path, "s0", [make_sample(i) for i in range(2)])
    path.write_bytes(path.read_bytes()[:3000])
    with pytest.raises(ShardError, match="s0.tar"):
        update_index(tmp_path, GEN)


def test_verify_dir(tmp_path, capsys):
    write_shard(tmp_path, "r0", [make_sample(i) for i in range(3)])
    write_shard(tmp_path, "r1", [make_sample(i) for i in range(3, 6)])
    update_index(tmp_path, GEN)
    report = verify_dir(tmp_path)
    assert report["ok"] and report["num_samples"] == 6 and report["num_unique_keys"] == 6
    assert report["duplicate_keys"] == {} and report["bad_samples"] == [] and report["index_problems"] == []
    assert shards.main([str(tmp_path)]) == 0
    assert json.loads(capsys.readouterr().out)["num_samples"] == 6

    # A shard repeating two samples of r0 (what a resume bug would produce) and a damaged sample.
    write_shard(tmp_path, "r2", [make_sample(2), make_sample(1), make_sample(6)])
    write_tar(tmp_path / "r3.tar", members_of(make_sample(7))[:2])
    report = verify_dir(tmp_path)
    assert not report["ok"]
    assert report["duplicate_keys"] == {"000000001": ["r0", "r2"], "000000002": ["r0", "r2"]}
    assert report["num_samples"] == 9 and report["num_unique_keys"] == 7
    assert [(b["shard"], b["key"]) for b in report["bad_samples"]] == [("r3", "000000007")]
    assert report["index_problems"] == ["shard 'r2' is not in the index", "shard 'r3' is not in the index"]
    assert shards.main([str(tmp_path)]) == 1
