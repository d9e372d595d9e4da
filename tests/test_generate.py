"""``freeatm generate`` on CPU with the tiny-random model: valid shards, resume, determinism, ranks, errors.

One base run (module fixture, through ``cli.main``) is copied into each test that damages or resumes it. The
kill-and-resume and 2-rank tests run ``python -m freeatm_fast generate`` in subprocesses, which also proves the
command works end to end. 32x32 images (16x16 latents and masks), 2 denoising steps: seconds per run.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from freeatm_fast import cli
from freeatm_fast.data.shards import ShardReader, read_index, scan_shards, temp_files, verify_dir
from freeatm_fast.generate.aggregate import AggregateConfig
from freeatm_fast.generate.capture import CaptureConfig
from freeatm_fast.generate.models import build_tiny_tokenizer
from freeatm_fast.generate.prompts import load_prompts, token_spans
from freeatm_fast.generate.sampler import (
    SEED_STRIDE,
    GenerateConfig,
    dist_env,
    initial_latents,
    rank_shards,
    sample_seed,
    shard_indices,
    shard_name,
)

SIZE, LATENT = 32, 16
PROMPTS = ["a photo of a [dog] on a [sofa]", "a [red car] next to a [tree]", "a [cat] under a small [table]"]
WORDS = [["dog", "sofa"], ["red car", "tree"], ["cat", "table"]]
N, SHARD, BATCH = 6, 2, 2  # 3 shards; batches align with shards, so a regenerated shard sees the same batches


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # Two shared cores: intra-op threads of these tiny ops only add contention (and keep results thread-count free).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("# bracketed objects\n" + "\n".join(PROMPTS) + "\n\n")
    return path


def gen_args(prompt_file, out, *extra, n=N, batch=BATCH, shard=SHARD, steps=2):
    return [
        "generate", "--model", "tiny-random", "--prompts", str(prompt_file), "--num-images", str(n),
        "--batch-size", str(batch), "--shard-size", str(shard), "--steps", str(steps), "--size", str(SIZE),
        "--out", str(out), "--device", "cpu", "--quiet", *extra,
    ]  # fmt: skip


def run_cli(capsys, args):
    rc = cli.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture(scope="module")
def base_run(prompt_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("base") / "shards"
    assert cli.main(gen_args(prompt_file, out)) == 0
    return out


def copy_run(base_run, tmp_path):
    dst = tmp_path / "shards"
    shutil.copytree(base_run, dst)
    return dst


def read_all(out):
    return {s.key: s for s in ShardReader.from_dir(out)}


# Children run with cwd=tmp_path and no PYTHONPATH, i.e. without the repository root on sys.path: from there,
# transformers' probe for the Hugging Face "kernels" package imports our kernels/ folder a second time as "kernels",
# which re-registers the freeatm:: custom ops and leaves freeatm_kernels' op handles dangling (random
# "vector::reserve" errors or crashes). The editable install finds freeatm_fast from anywhere.
def subprocess_env(**extra):
    """Environment of a ``python -m freeatm_fast`` child: one thread, tracebacks on errors, no inherited ranks."""
    env = dict(os.environ, OMP_NUM_THREADS="1", FREEATM_DEBUG="1", **extra)
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "PYTHONPATH"):
        if name not in extra:
            env.pop(name, None)
    return env


# ---------------------------------------------------------------------------------------------- the shards


def test_generate_writes_valid_shards(base_run, prompt_file):
    report = verify_dir(base_run)
    assert report["ok"], report
    assert report["num_samples"] == N and report["num_unique_keys"] == N and report["temp_files"] == []
    assert scan_shards(base_run) == [shard_name(j) for j in range(3)]
    tokenizer = build_tiny_tokenizer()
    items = load_prompts(prompt_file).items
    samples = read_all(base_run)
    assert sorted(samples) == [f"{i:09d}" for i in range(N)]
    for i in range(N):
        s = samples[f"{i:09d}"]
        item = items[i % len(items)]
        meta = s.meta
        assert meta["caption"] == item.text and "[" not in meta["caption"]
        assert meta["prompt"] == PROMPTS[i % 3]
        assert meta["seed"] == sample_seed(0, i) == i and meta["index"] == i
        assert meta["model"] == "tiny-random" and meta["size"] == [SIZE, SIZE] and meta["mask_size"] == LATENT
        assert s.image.size == (SIZE, SIZE)
        assert [o["word"] for o in meta["objects"]] == WORDS[i % 3]
        assert [tuple(o["tokens"]) for o in meta["objects"]] == token_spans(tokenizer, item)
        assert s.masks.shape == (2, LATENT, LATENT) and s.masks.dtype == np.uint8
        assert s.masks.max(axis=(1, 2)).min() > 0
        for o in meta["objects"]:
            x0, y0, x1, y1 = o["box"]
            assert 0 <= x0 <= x1 <= SIZE and 0 <= y0 <= y1 <= SIZE, o
            assert (x1 > x0 and y1 > y0) == (o["area"] > 0), o  # an empty binary mask has the empty box
            assert 0 <= o["area"] <= 1 and 0 <= o["score"] <= 1
    gen = read_index(base_run)["generator"]
    assert gen["seed"] == 0 and gen["num_images"] == N and gen["shard_size"] == SHARD and gen["size"] == SIZE
    assert gen["mask_size"] == LATENT and gen["steps"] == 2 and gen["scheduler"] == "ddim"
    assert not {"rank", "world_size", "batch_size", "device", "dtype"} & set(gen)


def test_objects_vocabulary_and_mask_size(tmp_path, capsys):
    prompts = tmp_path / "plain.txt"
    prompts.write_text("a dog next to a horse\na Cat on a sofa\n")
    vocab = tmp_path / "objects.txt"
    vocab.write_text("# one per line\ncat\ndog\nhorse\nsofa\n")
    out = tmp_path / "out"
    rc, stdout, err = run_cli(
        capsys, gen_args(prompts, out, "--objects", vocab, "--mask-size", "8", "--scheduler", "dpm", n=3, shard=5)
    )
    assert rc == 0, err
    summary = json.loads(stdout)
    assert summary["images"] == 3 and summary["shards_written"] == 1 and summary["shards_skipped"] == 0
    assert verify_dir(out)["ok"]
    samples = read_all(out)
    got = [[(o["word"], o["class_id"]) for o in samples[f"{i:09d}"].meta["objects"]] for i in range(3)]
    assert got == [[("dog", 1), ("horse", 2)], [("Cat", 0), ("sofa", 3)], [("dog", 1), ("horse", 2)]]
    assert samples["000000001"].meta["prompt"] == "a [Cat] on a [sofa]"
    assert all(s.masks.shape == (2, 8, 8) and s.meta["mask_size"] == 8 for s in samples.values())
    assert read_index(out)["generator"]["scheduler"] == "dpm"


def test_builtin_imagenet_defaults_and_class_ids(tmp_path, capsys):
    out = tmp_path / "out"
    args = ["generate", "--prompts", "builtin:imagenet:10", "--num-images", "3", "--steps", "1", "--size", str(SIZE),
            "--out", out, "--device", "cpu", "--quiet"]  # fmt: skip
    rc, _, err = run_cli(capsys, args)
    assert rc == 0, err
    samples = read_all(out)
    assert [samples[f"{i:09d}"].meta["label_name"] for i in range(3)] == ["tench", "goldfish", "great white shark"]
    assert [samples[f"{i:09d}"].meta["label"] for i in range(3)] == [0, 1, 2]  # an int, as the data loader reads
    assert [samples[f"{i:09d}"].meta["class_id"] for i in range(3)] == [0, 1, 2]
    assert scan_shards(out) == ["shard-000000"]  # default shard size 1000


# ---------------------------------------------------------------------------------------------- resume


def test_deleted_shard_is_regenerated_alone_and_identically(base_run, prompt_file, tmp_path, capsys):
    out = copy_run(base_run, tmp_path)
    original = (out / "shard-000001.tar").read_bytes()
    (out / "shard-000001.tar").unlink()
    kept = {n: (out / f"{n}.tar").stat().st_mtime_ns for n in ("shard-000000", "shard-000002")}
    same_prompts = tmp_path / "elsewhere" / "renamed.txt"  # prompts are identified by content, not by path
    same_prompts.parent.mkdir()
    shutil.copy(prompt_file, same_prompts)
    rc, stdout, err = run_cli(capsys, gen_args(same_prompts, out, batch=4))
    assert rc == 0, err
    summary = json.loads(stdout)
    assert summary["shards_written"] == 1 and summary["shards_skipped"] == 2 and summary["images"] == SHARD
    assert {n: (out / f"{n}.tar").stat().st_mtime_ns for n in kept} == kept
    # Same batch as in the first run (a whole shard of 2 < batch size 4): bit-identical pixels, masks and metadata.
    assert (out / "shard-000001.tar").read_bytes() == original
    report = verify_dir(out)
    assert report["ok"] and report["num_samples"] == N, report
    # Rerunning a complete directory writes nothing.
    rc, stdout, _ = run_cli(capsys, gen_args(prompt_file, out))
    assert rc == 0 and json.loads(stdout)["images"] == 0


def test_samples_do_not_depend_on_the_batch_size(base_run, prompt_file, tmp_path):
    out = tmp_path / "b4"
    assert cli.main(gen_args(prompt_file, out, batch=4)) == 0
    a, b = read_all(base_run), read_all(out)
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key].meta["seed"] == b[key].meta["seed"]
        assert [o["word"] for o in a[key].meta["objects"]] == [o["word"] for o in b[key].meta["objects"]]
        img_a, img_b = (np.asarray(s.image, dtype=np.int16) for s in (a[key], b[key]))
        # fp32 results of batch shapes 2 and 4 differ in the last bits; JPEG can turn that into a level or two.
        assert np.abs(img_a - img_b).max() <= 3, key
        assert np.abs(a[key].masks.astype(np.int16) - b[key].masks).max() <= 2, key


def test_initial_latents_per_sample():
    whole = initial_latents([3, 4, 5], 7, (4, 2, 2), device="cpu", dtype=torch.float32)
    alone = initial_latents([4], 7, (4, 2, 2), device="cpu", dtype=torch.float32)
    torch.testing.assert_close(whole[1:2], alone, rtol=0, atol=0)
    assert not torch.equal(whole[0], whole[1])
    assert sample_seed(7, 4) == 7 * SEED_STRIDE + 4


def test_resume_into_a_directory_of_another_seed_fails_clearly(base_run, prompt_file, tmp_path, capsys):
    out = copy_run(base_run, tmp_path)
    (out / "shard-000002.tar").unlink()
    rc, _, err = run_cli(capsys, gen_args(prompt_file, out, "--seed", "1"))
    assert rc == 2
    assert str(out) in err and "seed: directory has 0, this run 1" in err
    assert scan_shards(out) == ["shard-000000", "shard-000001"] and temp_files(out) == []


def test_kill_and_resume_finishes_with_exactly_n_unique_samples(prompt_file, tmp_path):
    n, out = 12, tmp_path / "killed"
    cmd = [sys.executable, "-m", "freeatm_fast", *gen_args(prompt_file, out, n=n, steps=12)]
    env = subprocess_env()
    proc = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (out.is_dir() and scan_shards(out)):
        assert proc.poll() is None, f"generate exited early: {proc.communicate()}"
        assert time.monotonic() < deadline, "no shard completed within 120 s"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    done_at_kill = scan_shards(out)
    assert len(done_at_kill) < n // SHARD, "the run finished before it could be killed; nothing was resumed"

    resumed = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    summary = json.loads(resumed.stdout)
    assert summary["shards_skipped"] >= len(done_at_kill) >= 1
    assert summary["shards_written"] + summary["shards_skipped"] == n // SHARD
    report = verify_dir(out)
    assert report["ok"], report
    assert report["num_samples"] == report["num_unique_keys"] == n and report["temp_files"] == []
    assert sorted(read_all(out)) == [f"{i:09d}" for i in range(n)]


def test_two_ranks_share_one_directory(prompt_file, tmp_path):
    out = tmp_path / "ranks"
    cmd = [sys.executable, "-m", "freeatm_fast", *gen_args(prompt_file, out, n=7)]  # 4 shards, the last one short
    procs = [
        subprocess.Popen(
            cmd,
            env=subprocess_env(RANK=str(r), WORLD_SIZE="2", LOCAL_RANK="0"),
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in range(2)
    ]
    results = [p.communicate(timeout=300) for p in procs]
    for p, (_, stderr) in zip(procs, results, strict=True):
        assert p.returncode == 0, stderr
    summaries = [json.loads(stdout) for stdout, _ in results]
    assert [(s["rank"], s["world_size"], s["shards_written"], s["images"]) for s in summaries] == [
        (0, 2, 2, 4),
        (1, 2, 2, 3),
    ]
    report = verify_dir(out)
    assert report["ok"], report
    assert report["num_samples"] == report["num_unique_keys"] == 7 and not report["duplicate_keys"]
    assert read_index(out)["num_shards"] == 4


# ---------------------------------------------------------------------------------------------- damage and errors


def test_truncated_shard_is_reported_by_name(base_run, prompt_file, tmp_path, capsys):
    out = copy_run(base_run, tmp_path)
    path = out / "shard-000000.tar"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])

    rc, stdout, _ = run_cli(capsys, ["verify", out])
    assert rc == 1
    report = json.loads(stdout)
    assert not report["ok"] and [b["shard"] for b in report["bad_shards"]] == ["shard-000000"]

    rc, _, err = run_cli(capsys, ["show", out, "--out", tmp_path / "grid.png"])
    assert rc == 2 and "shard-000000.tar" in err and "truncated" in err
    assert not (tmp_path / "grid.png").exists()

    rc, _, err = run_cli(capsys, gen_args(prompt_file, out))  # resume refuses to skip a damaged shard
    assert rc == 2 and "shard-000000.tar" in err


def test_bad_prompt_file_fails_before_sampling(tmp_path, capsys):
    bad = tmp_path / "bad.txt"
    bad.write_text("a photo of a [dog]\na [cat on a sofa\n")
    rc, _, err = run_cli(capsys, gen_args(bad, tmp_path / "o1"))
    assert rc == 2 and f"{bad}:2" in err and "unbalanced" in err
    assert not (tmp_path / "o1").exists()

    unplaceable = tmp_path / "glued.txt"
    unplaceable.write_text("a photo of a [dog]\na [sofa]bed in a room\n")
    rc, _, err = run_cli(capsys, gen_args(unplaceable, tmp_path / "o2"))
    assert rc == 2 and f"{unplaceable}:2" in err and "sofa" in err
    assert scan_shards(tmp_path / "o2") == [] and temp_files(tmp_path / "o2") == []


def test_verify_command_on_a_good_directory(base_run, capsys):
    rc, stdout, _ = run_cli(capsys, ["verify", base_run])
    assert rc == 0 and json.loads(stdout)["num_samples"] == N


# ---------------------------------------------------------------------------------------------- config and ranks


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_images=0), "num_images"),
        (dict(batch_size=1.5), "batch_size"),
        (dict(steps=-1), "steps"),
        (dict(guidance=float("nan")), "guidance"),
        (dict(scheduler="euler"), "scheduler"),
        (dict(seed=-1), "seed"),
        (dict(seed=2**40), "seed"),
        (dict(size=30), "size"),
        (dict(mask_size=0), "mask_size"),
        (dict(shard_size=0), "shard_size"),
        (dict(jpeg_quality=101), "jpeg_quality"),
        (dict(out=""), "out"),
        (dict(device="gpu7"), "device"),
        (dict(dtype="fp8"), "dtype"),
        (dict(capture=CaptureConfig(rows="all")), "capture.rows"),
        (dict(aggregate={"tau": 0.5}), "aggregate"),
        (dict(num_images=SEED_STRIDE + 1), "num_images"),
    ],
)
def test_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GenerateConfig(**kwargs)


def test_config_defaults_are_valid():
    cfg = GenerateConfig(out=Path("x"), aggregate=AggregateConfig(tau=0.3))
    assert cfg.out == "x" and cfg.guidance == 7.5 and cfg.capture.rows == "cond"


def test_shards_are_split_over_ranks_by_index():
    assert [list(shard_indices(j, 7, 3)) for j in range(3)] == [[0, 1, 2], [3, 4, 5], [6]]
    assert rank_shards(5, 0, 2) == [0, 2, 4] and rank_shards(5, 1, 2) == [1, 3] and rank_shards(1, 1, 2) == []
    assert shard_name(42) == "shard-000042"
    assert dist_env({}) == (0, 1, 0)
    assert dist_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}) == (3, 4, 1)
    with pytest.raises(ValueError, match="RANK=4"):
        dist_env({"RANK": "4", "WORLD_SIZE": "4"})
    with pytest.raises(ValueError, match="WORLD_SIZE='two'"):
        dist_env({"WORLD_SIZE": "two"})
