"""The toy text-to-image model (issue #8): tokenizer, pipeline, generation through the ordinary capture path,
``freeatm toy-train`` (steps, checkpoint, resume, settings check), the shipped weights (offline, size, masks that
find the requested objects) and ``data.toy_source=model``."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from freeatm_fast.data.toyworld import CLASSES, COLOURS, render_sample
from freeatm_fast.generate.prompts import load_prompts, token_spans
from freeatm_fast.toy.model import (
    WEIGHTS_NAME,
    ToyModelConfig,
    build_toy_pipeline,
    build_toy_tokenizer,
    load_toy_pipeline,
    save_toy_model,
)
from freeatm_fast.toy.train import VAL_TAUS, parse_overrides, shape_only_caption, toy_train

ROOT = Path(__file__).resolve().parents[1]
# a toy model small enough for tests: 16x16 images, cross-attention at 8x8 and 4x4
TINY = ToyModelConfig(image_size=16, channels=(32, 32, 32), head_dim=16, text_width=32)
TINY_ARGS = [
    "model.image_size=16",
    "model.channels=[32, 32, 32]",
    "model.text_width=32",
    "batch_size=4",
    "pool_images=16",
    "log_every=1",
    "ckpt_every=2",
    "val_every=0",  # model selection has its own test
]


def test_tokenizer_one_token_per_word_on_every_toy_caption():
    tok = build_toy_tokenizer()
    ids = tok("a Red circle, a small blue star and a green square on a striped background")["input_ids"]
    words = tok.convert_ids_to_tokens(ids)
    assert words == ["[BOS]", "a", "red", "circle", ",", "a", "small", "blue", "star", "and", "a", "green",
                     "square", "on", "a", "striped", "background", "[EOS]"]  # fmt: skip
    assert tok.convert_ids_to_tokens(tok("a teapot")["input_ids"])[2] == "[UNK]"
    assert build_toy_tokenizer()("red star")["input_ids"] == tok("red star")["input_ids"]  # deterministic ids
    unk = tok.unk_token_id
    for i in range(0, 2000, 7):
        meta = render_sample(0, "train", i, image_size=16).meta
        for text in (meta["caption"], shape_only_caption(meta)):
            ids = tok(text)["input_ids"]
            assert unk not in ids and len(ids) <= tok.model_max_length, text


def test_shape_only_caption():
    meta = {
        "objects": [
            {"shape": "circle", "colour": "red", "small": False},
            {"shape": "star", "colour": "blue", "small": True},
            {"shape": "square", "colour": "green", "small": False},
        ],
        "background": "dotted",
    }
    assert shape_only_caption(meta) == "a circle, a small star and a square on a dotted background"
    assert shape_only_caption({**meta, "objects": meta["objects"][:1]}) == "a circle on a dotted background"


def test_toyworld_prompt_sources_mark_colour_or_shape_words():
    tok = build_toy_tokenizer()
    colour, shape, both = (load_prompts(f"builtin:{n}:20") for n in ("toyworld", "toyworld-shapes", "toyworld-words"))
    assert len(colour) == len(shape) == len(both) == 20
    for c, s, b in zip(colour.items, shape.items, both.items, strict=True):
        assert c.text == s.text == b.text
        assert all(w in COLOURS for w in c.words) and all(w in CLASSES for w in s.words)
        assert b.words == tuple(w for pair in zip(c.words, s.words, strict=True) for w in pair)
        assert c.label == CLASSES[c.class_id] and c.label in c.text.split(" ")[2].rstrip(",")
        # each word is one token, right where the caption has it
        ids = tok(c.text, padding="max_length", max_length=32)["input_ids"]
        for (start, end), w in zip(token_spans(tok, b, 32), b.words, strict=True):
            assert end == start + 1 and tok.convert_ids_to_tokens(ids[start]) == w
    with pytest.raises(ValueError, match="caption count"):
        load_prompts("builtin:toyworld:zero")


def test_pipeline_samples_and_calls_back():
    pipe = build_toy_pipeline(TINY)
    latents = torch.randn(2, 3, 16, 16)
    seen = []

    def callback(p, i, t, kwargs):
        seen.append((i, tuple(kwargs["latents"].shape)))
        return {}

    out = pipe(["a red circle", "a blue star"], num_inference_steps=3, latents=latents, callback_on_step_end=callback)
    again = pipe(["a red circle", "a blue star"], num_inference_steps=3, latents=latents)
    assert out.images.shape == (2, 16, 16, 3) and 0 <= out.images.min() and out.images.max() <= 1
    np.testing.assert_array_equal(out.images, again.images)  # no noise beyond the latents (DDIM)
    assert seen == [(0, (2, 3, 16, 16)), (1, (2, 3, 16, 16)), (2, (2, 3, 16, 16))]
    no_cfg = pipe(["a red circle", "a blue star"], num_inference_steps=3, latents=latents, guidance_scale=1.0)
    assert not np.array_equal(no_cfg.images, out.images)
    cond, uncond = pipe.encode_prompt(["a red circle"], "cpu", 2, True)
    assert cond.shape == uncond.shape == (2, 32, 32)
    with pytest.raises(ValueError, match="latents have shape"):
        pipe(["a red circle"], num_inference_steps=2, latents=torch.randn(1, 3, 8, 8))


def test_save_load_round_trip_and_errors(tmp_path):
    pipe = build_toy_pipeline(TINY, seed=3)
    save_toy_model(pipe.unet, pipe.text_encoder, TINY, tmp_path, info={"trained_steps": 0})
    loaded = load_toy_pipeline(tmp_path)
    for a, b in zip(pipe.unet.state_dict().values(), loaded.unet.state_dict().values(), strict=True):
        torch.testing.assert_close(a.half().float(), b)  # stored in fp16
    assert loaded.toy_config == TINY
    with pytest.raises(FileNotFoundError, match="toy-train"):
        load_toy_pipeline(tmp_path / "nowhere")
    (tmp_path / WEIGHTS_NAME).unlink()
    with pytest.raises(FileNotFoundError, match="weights are missing"):
        load_toy_pipeline(tmp_path)


def test_generate_through_the_ordinary_capture_path(tmp_path):
    """A toy model folder goes through freeatm generate like any SD pipeline: shards with one mask per colour word."""
    from freeatm_fast.data.dataset import ShardDataset
    from freeatm_fast.data.shards import verify_dir
    from freeatm_fast.generate.sampler import GenerateConfig, generate

    pipe = build_toy_pipeline(TINY, seed=1)
    model_dir = tmp_path / "model"
    save_toy_model(pipe.unet, pipe.text_encoder, TINY, model_dir)
    out = tmp_path / "gen"
    cfg = GenerateConfig(
        model=str(model_dir), prompts="builtin:toyworld:3", num_images=6, batch_size=4, steps=2, guidance=2.0,
        shard_size=4, out=str(out), device="cpu",
    )  # fmt: skip
    summary = generate(cfg, progress=False)
    assert summary["images"] == 6 and verify_dir(out)["ok"]
    ds = ShardDataset(out)
    prompts = load_prompts("builtin:toyworld:3")
    for i in range(6):
        meta = ds.meta(i)
        item = prompts.get(i)
        assert meta["caption"] == item.text and [o["word"] for o in meta["objects"]] == list(item.words)
        assert meta["size"] == [16, 16] and meta["mask_size"] == 16 and meta["class_id"] == item.class_id
        assert meta["label"] == item.class_id and ds[i].label == item.class_id  # readable by the data loader
        assert ds[i].masks.shape == (len(item.words), 16, 16)


def test_toy_train_steps_checkpoint_resume(tmp_path):
    out = tmp_path / "run"
    args = [*TINY_ARGS, f"out_dir={out}"]
    toy_train(parse_overrides([*args, "steps=3"]), log=lambda *_: None)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and all(np.isfinite(r["loss"]) for r in rows)
    assert (out / "checkpoint.pt").is_file() and (out / "model" / WEIGHTS_NAME).is_file()
    info = json.loads((out / "model" / "toy_t2i.json").read_text())
    assert info["trained_steps"] == 3
    # continue to 5 steps: resumes at 3 (more steps is allowed), weights move on
    before = load_toy_pipeline(out / "model").unet.state_dict()
    toy_train(parse_overrides([*args, "steps=5"]), log=lambda *_: None)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    after = load_toy_pipeline(out / "model").unet.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    # another setting in the same folder: an error naming it
    with pytest.raises(ValueError, match="lr"):
        toy_train(parse_overrides([*args, "steps=6", "lr=0.01"]), log=lambda *_: None)


def test_toy_train_stop_and_resume_matches_uninterrupted(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    toy_train(parse_overrides([*TINY_ARGS, f"out_dir={one}", "steps=4"]), log=lambda *_: None)
    toy_train(parse_overrides([*TINY_ARGS, f"out_dir={two}", "steps=4", "stop_at=2"]), log=lambda *_: None)
    assert [json.loads(x)["step"] for x in (two / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    toy_train(parse_overrides([*TINY_ARGS, f"out_dir={two}", "steps=4"]), log=lambda *_: None)
    rows_one = [json.loads(line) for line in (one / "metrics.jsonl").read_text().splitlines()]
    rows_two = [json.loads(line) for line in (two / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows_two] == [1, 2, 3, 4]
    for a, b in zip(rows_one, rows_two, strict=True):  # same batches, noise, timesteps, lr and weights
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6) and a["lr"] == b["lr"]
    w_one = load_toy_pipeline(one / "model").unet.state_dict()
    w_two = load_toy_pipeline(two / "model").unet.state_dict()
    assert all(torch.equal(w_one[k], w_two[k]) for k in w_one)


def test_toy_train_exports_the_best_validated_checkpoint(tmp_path):
    """Model selection: every val_every steps the EMA model's free masks are scored (re-noise mode, their own
    toy-world seed); model/ holds the best-scoring EMA from val_from on (the last step is always a candidate),
    last/ the final EMA."""
    args = [*TINY_ARGS, "steps=6", "val_every=2", "val_images=4", "val_from=4", "lr=0.01"]
    a, b = tmp_path / "a", tmp_path / "b"
    summary = toy_train(parse_overrides([*args, f"out_dir={a}"]), log=lambda *_: None)
    history = [json.loads(line) for line in (a / "val.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history] == [2, 4, 6]
    for h in history:
        assert 0.0 <= h["score"] <= 1.0 and h["score"] == h["colour"] and h["recipe"]["tau"] in VAL_TAUS
    expected = max(history[1:], key=lambda h: h["score"])  # step 2 is before val_from; ties: the earlier step
    info = json.loads((a / "model" / "toy_t2i.json").read_text())
    assert info["selected_step"] == expected["step"] == summary["selected_step"]
    assert info["selection"]["history"] == history and info["trained_steps"] == 6
    last = json.loads((a / "last" / "toy_t2i.json").read_text())
    assert last["trained_steps"] == 6 and "selected_step" not in last
    # model/ holds the EMA weights of the selected step: the same run stopped there exports them as its last/
    toy_train(parse_overrides([*args, f"out_dir={b}", f"stop_at={expected['step']}"]), log=lambda *_: None)
    w_sel = load_toy_pipeline(a / "model").unet.state_dict()
    w_ref = load_toy_pipeline(b / "last").unet.state_dict()
    assert all(torch.equal(w_sel[k], w_ref[k]) for k in w_sel)
    w_last = load_toy_pipeline(a / "last").unet.state_dict()
    assert any(not torch.equal(w_sel[k], w_last[k]) for k in w_sel) == (expected["step"] != 6)
    with pytest.raises(ValueError, match="val_images"):
        parse_overrides(["val_images=0"])


def test_parse_overrides_errors():
    with pytest.raises(ValueError, match="unknown key 'stpes'"):
        parse_overrides(["stpes=3"])
    with pytest.raises(ValueError, match="unknown key 'model.depth'"):
        parse_overrides(["model.depth=3"])
    with pytest.raises(ValueError, match="caption_dropout"):
        parse_overrides(["caption_dropout=2"])
    with pytest.raises(ValueError, match="key=value"):
        parse_overrides(["steps"])
    assert parse_overrides(["lr=1"]).lr == 1.0


def test_toy_train_command_line(tmp_path):
    cmd = [sys.executable, "-m", "freeatm_fast.cli", "toy-train", *TINY_ARGS, "steps=2", f"out_dir={tmp_path}/r"]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "step 2/2" in res.stdout + res.stderr and "images/s" in res.stdout + res.stderr
    assert (tmp_path / "r" / "model" / WEIGHTS_NAME).is_file()
    bad = subprocess.run([*cmd[:4], "stpes=2"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "unknown key 'stpes'" in bad.stderr


def test_generate_defaults_come_from_the_models_recipe(tmp_path):
    """freeatm generate without --steps/--guidance/--scheduler takes the toy model's measured recipe; explicit
    flags win; SD-style models keep GenerateConfig's defaults."""
    import argparse

    from freeatm_fast.cli import build_parser, generate_config_from_args
    from freeatm_fast.generate.models import model_defaults

    recipe = {"steps": 7, "guidance": 1.5, "scheduler": "dpm", "resolutions": [8], "window": [0.5, 1.0],
              "tau": 0.55, "upsample": "bilinear", "normalize": "minmax"}  # fmt: skip
    cfg = ToyModelConfig(**{**TINY.__dict__, "recipe": recipe})
    pipe = build_toy_pipeline(cfg)
    save_toy_model(pipe.unet, pipe.text_encoder, cfg, tmp_path / "m")
    assert model_defaults(str(tmp_path / "m")) == recipe and model_defaults("tiny-random") == {}

    def config(*flags):
        args = build_parser().parse_args(["generate", "--prompts", "builtin:toyworld:2", "--num-images", "2",
                                          "--out", str(tmp_path / "o"), *flags])  # fmt: skip
        assert isinstance(args, argparse.Namespace)
        return generate_config_from_args(args)

    c = config("--model", str(tmp_path / "m"))
    assert (c.steps, c.guidance, c.scheduler) == (7, 1.5, "dpm")
    assert c.capture.resolutions == (8,) and c.capture.window == (0.5, 1.0)
    assert c.aggregate.tau == 0.55 and c.aggregate.upsample == "bilinear" and c.aggregate.resolutions == (8,)
    assert c.aggregate.normalize == "minmax"
    c = config("--model", str(tmp_path / "m"), "--steps", "3", "--guidance", "4")
    assert (c.steps, c.guidance) == (3, 4.0)
    c = config("--model", "tiny-random")
    assert (c.steps, c.guidance, c.scheduler, c.aggregate.tau) == (50, 7.5, "ddim", 0.4)


def test_eval_masks_write_recipe_records_the_chosen_recipe(tmp_path, capsys):
    """`freeatm eval masks --toyworld --write-recipe` writes the recipe chosen on the validation split into the
    model's toy_t2i.json (sampling settings kept, weights untouched), where the generator picks it up; it refuses
    models without a toy JSON and shard mode before any work."""
    from freeatm_fast import cli
    from freeatm_fast.generate.models import model_defaults

    old = {"steps": 7, "guidance": 1.5, "scheduler": "dpm", "resolutions": [4], "window": [0.0, 1.0], "tau": 0.9,
           "upsample": "bilinear"}  # fmt: skip
    cfg = ToyModelConfig(**{**TINY.__dict__, "recipe": old})
    pipe = build_toy_pipeline(cfg, seed=1)
    model = tmp_path / "m"
    save_toy_model(pipe.unet, pipe.text_encoder, cfg, model, info={"trained_steps": 3})
    weights = (model / WEIGHTS_NAME).read_bytes()
    argv = ["eval", "masks", "--toyworld", "--model", str(model), "--images", "2", "--timesteps", "2",
            "--device", "cpu", "--out", str(tmp_path / "ev"), "--json"]  # fmt: skip
    assert cli.main([*argv, "--write-recipe"]) == 0
    r = json.loads(capsys.readouterr().out)
    chosen = r["chosen"]
    info = json.loads((model / "toy_t2i.json").read_text())
    recipe = info["model"]["recipe"]
    measured = {k: chosen[k] for k in ("resolutions", "tau", "upsample", "normalize")}
    assert recipe == {"steps": 7, "guidance": 1.5, "scheduler": "dpm", "window": chosen["capture_window"], **measured}
    assert recipe != old and model_defaults(str(model)) == recipe
    assert info["trained_steps"] == 3 and (model / WEIGHTS_NAME).read_bytes() == weights
    assert f"test images {r['splits']['test']['start']}-" in info["recipe_source"]
    assert f"toy-world (seed {r['toyworld']['seed']}) val images" in info["recipe_source"]
    assert f"colour {r['test']['kinds']['colour']['miou']:.3f}" in info["recipe_source"]
    assert ToyModelConfig.from_dict(info["model"]).recipe == recipe
    assert not list(model.glob(".*tmp*"))
    # refused before the evaluation runs: no toy JSON to write into, or shard mode
    assert cli.main(["eval", "masks", "--toyworld", "--model", "tiny-random", "--out", str(tmp_path / "x"),
                     "--write-recipe"]) != 0  # fmt: skip
    assert "not a toy model" in capsys.readouterr().err and not (tmp_path / "x").exists()
    assert cli.main(["eval", "masks", str(tmp_path / "ev"), "--write-recipe"]) != 0
    assert "belongs to re-noise mode" in capsys.readouterr().err


def test_guidance_batch_order_gives_the_capture_the_conditional_rows():
    """Under guidance the UNet batch is [uncond; cond] (diffusers' order), so the capture's "cond" rows are the
    prompt's: the maps of a one-step sample with guidance equal those without guidance (cond rows only)."""
    from freeatm_fast.generate.capture import CaptureConfig, MapCapture

    pipe = build_toy_pipeline(TINY, seed=4)
    prompts = ["a red circle and a blue star on a dotted background", "a green square on a plain background"]
    tokens = torch.tensor([[2, 3], [2, 3]])
    latents = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    maps = []
    for guidance in (1.0, 3.0):
        with MapCapture(pipe.unet, CaptureConfig(), batch_size=2, num_rows=2, tokens=tokens, latent_hw=(16, 16),
                        device="cpu") as cap:  # fmt: skip
            cap.set_step(0, 1)
            pipe(prompts, num_inference_steps=1, guidance_scale=guidance, latents=latents,
                 callback_on_step_end=cap.step_callback(1))  # fmt: skip
            maps.append(cap.maps())
    assert maps[0].keys() == maps[1].keys()
    for r in maps[0]:
        torch.testing.assert_close(maps[0][r], maps[1][r], rtol=1e-5, atol=1e-6)
