"""Map capture on the tiny-random SD pipeline: fused processor vs the eager reference, memory, window, rows, weights."""

import pytest
import torch

from freeatm_fast.generate.capture import (
    CaptureConfig,
    EagerCrossAttnProcessor,
    FusedCrossAttnProcessor,
    MapCapture,
    available_resolutions,
    cross_attention_layers,
)
from freeatm_fast.generate.models import build_tiny_random_pipeline

PROMPTS = ["a photo of a dog on a sofa", "a red car next to a zebra"]  # "zebra" is several sub-word tokens
# 32x32 images -> 16x16 latents: grids 16x16 and 8x8 (resolutions "32" and "16" at the native 32x32 latent size).
SIZE = 32
LATENT = (16, 16)


@pytest.fixture(scope="module")
def pipe():
    # One thread: the test machine is 2 shared cores, where intra-op threading of these tiny ops only adds contention.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    p = build_tiny_random_pipeline(seed=0)
    p.set_progress_bar_config(disable=True)
    yield p
    torch.set_num_threads(threads)


def _tokens(pipe, words_per_prompt):
    """Positions of the given words' tokens in each encoded prompt, as int64 [B, K] (K = most tokens of a prompt)."""
    rows = []
    for prompt, words in zip(PROMPTS, words_per_prompt, strict=True):
        ids = pipe.tokenizer(prompt).input_ids
        pos = []
        for w in words:
            wid = pipe.tokenizer(w, add_special_tokens=False).input_ids
            start = next(i for i in range(len(ids)) if ids[i : i + len(wid)] == wid)
            pos += list(range(start, start + len(wid)))
        rows.append(pos)
    K = max(len(r) for r in rows)
    return torch.tensor([r + [r[-1]] * (K - len(r)) for r in rows])


@pytest.fixture(scope="module")
def tokens(pipe):
    return _tokens(pipe, [["dog", "sofa"], ["car", "zebra"]])


def _generate(pipe, cap, steps, *, guidance=7.5, seed=0):
    cap.set_step(0, steps)
    return pipe(
        PROMPTS,
        height=SIZE,
        width=SIZE,
        num_inference_steps=steps,
        guidance_scale=guidance,
        generator=torch.Generator().manual_seed(seed),
        output_type="pt",
        callback_on_step_end=cap.step_callback(steps),
    ).images


@torch.no_grad()
def _unet(pipe, batch):
    """One bare UNet call on a batch of ``batch`` rows (zeros latents, random text states)."""
    text = torch.randn(batch, 77, 32, generator=torch.Generator().manual_seed(1))
    return pipe.unet(torch.zeros(batch, 4, *LATENT), 10, encoder_hidden_states=text)


def _capture(pipe, tokens, config=None, processor="fused", **kw):
    args = dict(batch_size=2, num_rows=tokens.shape[0], tokens=tokens, latent_hw=LATENT, device="cpu")
    args.update(kw)
    return MapCapture(pipe.unet, config or CaptureConfig(), processor=processor, **args)


def _assert_maps_close(a, b, rtol=1e-5):
    assert a.keys() == b.keys()
    for r in a:
        assert a[r].shape == b[r].shape, r
        err = (a[r] - b[r]).abs().max() / b[r].abs().max()
        assert err <= rtol, (r, err.item())


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_fused_maps_equal_eager_maps_in_a_real_pipeline_call(pipe, tokens, device):
    # On CPU "auto" runs the op's torch backend; on a GPU the CUDA extension or the Triton kernel (fp32: IEEE dots).
    if device != "cpu":
        pipe = build_tiny_random_pipeline(seed=0).to(device)
        pipe.set_progress_bar_config(disable=True)
    tokens = tokens.to(device)
    with _capture(pipe, tokens, device=device) as cap:
        img_fused = _generate(pipe, cap, 3)
        fused = cap.maps()
    with _capture(pipe, tokens, processor="eager", device=device) as cap:
        img_eager = _generate(pipe, cap, 3)
        eager = cap.maps()
    img_plain = pipe(
        PROMPTS, height=SIZE, width=SIZE, num_inference_steps=3, generator=torch.Generator().manual_seed(0),
        output_type="pt",
    ).images  # fmt: skip

    assert sorted(fused) == [16, 32]
    assert fused[32].shape == (2, tokens.shape[1], 16, 16) and fused[16].shape == (2, tokens.shape[1], 8, 8)
    assert fused[32].device.type == device
    _assert_maps_close(fused, eager)
    # each map is a mean of probabilities over the 77 tokens: positive, and a token's mass is below the query count
    for m in fused.values():
        assert (m > 0).all() and (m.sum(dim=(2, 3)) < m.shape[2] * m.shape[3]).all()
    # the two prompts attend differently (the rows are not mixed up)
    assert not torch.allclose(fused[32][0], fused[32][1])
    # capture does not change what the pipeline generates (same attention output as diffusers' SDPA processor)
    torch.testing.assert_close(img_fused, img_plain, atol=1e-4, rtol=0)
    torch.testing.assert_close(img_eager, img_plain, atol=1e-4, rtol=0)


def test_processors_installed_on_cross_attention_only_and_restored(pipe, tokens):
    before = dict(pipe.unet.attn_processors)
    cap = _capture(pipe, tokens)
    during = pipe.unet.attn_processors
    n_cross = 0
    for name, proc in during.items():
        if ".attn2." in name:
            n_cross += 1
            assert isinstance(proc, FusedCrossAttnProcessor), name
        else:
            assert proc is before[name], name  # self-attention keeps its processor (SDPA here)
    assert n_cross == len(cross_attention_layers(pipe.unet)) == 7
    cap.remove()
    cap.remove()  # idempotent
    after = pipe.unet.attn_processors
    assert all(after[n] is before[n] for n in before)
    with _capture(pipe, tokens, processor="eager"):
        assert any(isinstance(p, EagerCrossAttnProcessor) for p in pipe.unet.attn_processors.values())
    assert all(pipe.unet.attn_processors[n] is before[n] for n in before)


def test_accumulator_memory_does_not_grow_with_steps(pipe, tokens):
    sizes = {}
    for processor in ("fused", "eager"):
        for steps in (2, 6):
            with _capture(pipe, tokens, processor=processor) as cap:
                _generate(pipe, cap, steps)
                cap.maps()
                sizes[processor, steps] = cap.memory_bytes()
    K = tokens.shape[1]
    expected = 4 * 2 * K * (16 * 16 + 8 * 8) + 8 * 2 * K + 8 * 2  # accumulators + tokens + cond-row index
    assert sizes["fused", 2] == sizes["fused", 6] == expected
    # the eager reference stores one map per layer per step: the measure does see growth
    assert sizes["eager", 6] == 3 * sizes["eager", 2] - 2 * (8 * 2 * K + 8 * 2)


def test_timestep_window_skips_steps_outside_it(pipe, tokens):
    steps = 4
    with _capture(pipe, tokens, CaptureConfig(window=(0.5, 1.0))) as cap:
        _generate(pipe, cap, steps)
        windowed = cap.maps()
    # Eager over all steps keeps each call's map, in call order: pick the steps 2 and 3 by hand.
    with _capture(pipe, tokens, processor="eager") as cap:
        _generate(pipe, cap, steps)
        store = list(cap._store)
        full = cap.maps()
    for r in windowed:
        per_res = [m for res, _, m in store if res == r]
        n_layers = len(per_res) // steps
        assert n_layers * steps == len(per_res)
        late = torch.stack(per_res[2 * n_layers :]).mean(0).view_as(windowed[r])
        torch.testing.assert_close(windowed[r], late, rtol=1e-5, atol=0)
        assert not torch.allclose(windowed[r], full[r], rtol=1e-3, atol=0)
    # a UNet call at a step outside the window captures nothing, and maps() says so
    with _capture(pipe, tokens, CaptureConfig(window=(0.0, 0.5))) as cap:
        cap.set_step(1, 2)
        _unet(pipe, 4)
        with pytest.raises(RuntimeError, match="nothing was captured"):
            cap.maps()
        cap.set_step(0, 2)
        _unet(pipe, 4)
        assert all(torch.isfinite(m).all() for m in cap.maps().values())


def test_window_needs_set_step(pipe, tokens):
    with _capture(pipe, tokens, CaptureConfig(window=(0.0, 0.5))):
        with pytest.raises(RuntimeError, match="set_step"):
            _unet(pipe, 4)


def test_rows_cond_vs_all(pipe, tokens):
    with _capture(pipe, tokens) as cap:
        _generate(pipe, cap, 2)
        cond = cap.maps()
    both = torch.cat([tokens, tokens])  # [uncond rows, cond rows]
    with _capture(pipe, both, CaptureConfig(rows="all")) as cap:
        _generate(pipe, cap, 2)
        every = cap.maps()
    with _capture(pipe, both, CaptureConfig(rows="all"), processor="eager") as cap:
        _generate(pipe, cap, 2)
        every_eager = cap.maps()
    _assert_maps_close(every, every_eager)
    for r in cond:
        assert every[r].shape[0] == 4
        torch.testing.assert_close(every[r][2:], cond[r], rtol=1e-5, atol=0)
        # the unconditional half (empty prompt) attends differently
        assert not torch.allclose(every[r][:2], cond[r], rtol=1e-3, atol=0)
    # without guidance the UNet batch is B: "cond" takes every row
    with _capture(pipe, tokens) as cap:
        _generate(pipe, cap, 2, guidance=1.0)
        no_cfg = cap.maps()
    with _capture(pipe, tokens, processor="eager") as cap:
        _generate(pipe, cap, 2, guidance=1.0)
        _assert_maps_close(no_cfg, cap.maps())


def test_layer_weights_and_resolution_choice(pipe, tokens):
    cfg = CaptureConfig(resolutions=(32,), layer_weights={"down_blocks.*": 0.0, "mid_block.*": 5.0, "up_*": 2})
    with _capture(pipe, tokens, cfg) as cap:
        _generate(pipe, cap, 2)
        weighted = cap.maps()
        assert cap.layers["down_blocks.0.attentions.0.transformer_blocks.0.attn2"].weight == 0.0
        assert cap.layers["up_blocks.1.attentions.1.transformer_blocks.0.attn2"].weight == 2.0
    with _capture(pipe, tokens, cfg, processor="eager") as cap:
        _generate(pipe, cap, 2)
        assert all(w == 2.0 for _, w, _ in cap._store)  # down layers (weight 0) not captured, mid is at level 1
        _assert_maps_close(weighted, cap.maps())
    assert sorted(weighted) == [32]
    with _capture(pipe, tokens, CaptureConfig(resolutions=(32,))) as cap:
        _generate(pipe, cap, 2)
        plain = cap.maps()
    assert not torch.allclose(weighted[32], plain[32], rtol=1e-4, atol=0)


def test_reset_zeroes_and_takes_new_tokens(pipe, tokens):
    with _capture(pipe, tokens) as cap:
        _generate(pipe, cap, 2)
        first = cap.maps()
        bytes_before = cap.memory_bytes()
        cap.reset(tokens.flip(1))
        _generate(pipe, cap, 2)
        flipped = cap.maps()
        assert cap.memory_bytes() == bytes_before
        for r in first:
            torch.testing.assert_close(flipped[r], first[r].flip(1))  # zeroed, then the same maps in flipped order
        cap.reset(tokens[:, :1])  # a new K reallocates
        _generate(pipe, cap, 2)
        one = cap.maps()
        for r in first:
            torch.testing.assert_close(one[r], first[r][:, :1])


def test_non_square_latents(pipe, tokens):
    with _capture(pipe, tokens, latent_hw=(16, 24)) as cap:
        cap.set_step(0, 2)
        pipe(PROMPTS, height=32, width=48, num_inference_steps=2, output_type="pt",
             callback_on_step_end=cap.step_callback(2))  # fmt: skip
        maps = cap.maps()
    assert maps[32].shape[2:] == (16, 24) and maps[16].shape[2:] == (8, 12)


def test_wrong_latent_size_is_reported(pipe, tokens):
    with _capture(pipe, tokens, latent_hw=(32, 32)) as cap:
        with pytest.raises(ValueError, match="latent_hw"):
            _generate(pipe, cap, 2)


def test_triton_backend_matches_eager_in_one_unet_call(pipe, tokens, kernel_device):
    # The Triton kernel behind the same processor: interpreted on CPU tensors here (conftest sets TRITON_INTERPRET),
    # compiled on a GPU. One UNet call at 8x8 latents keeps the interpreter cheap.
    if kernel_device.type != "cpu":
        pipe = build_tiny_random_pipeline(seed=0).to(kernel_device)
    latents = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(0)).to(kernel_device)
    with torch.no_grad():
        text = pipe.encode_prompt(PROMPTS, kernel_device, 1, True)
    cond = torch.cat([text[1], text[0]])  # [uncond, cond], as the pipeline concatenates them
    out = {}
    for proc, backend in (("fused", "triton"), ("eager", "torch")):
        cfg = CaptureConfig(backend=backend)
        toks = tokens.to(kernel_device)
        with _capture(pipe, toks, cfg, processor=proc, latent_hw=(8, 8), device=kernel_device) as cap:
            with torch.no_grad():
                pipe.unet(latents, 500, encoder_hidden_states=cond)
            out[proc] = cap.maps()
    _assert_maps_close(out["fused"], out["eager"])


def test_available_resolutions(pipe):
    assert available_resolutions(pipe.unet) == (32, 16)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"window": (0.5, 0.5)}, "window"),
        ({"window": (0.0, 1.5)}, "window"),
        ({"rows": "uncond"}, "rows"),
        ({"backend": "gpu"}, "backend"),
        ({"layer_weights": {"up_*": -1.0}}, "layer_weights"),
        ({"layer_weights": {"up_*": "x"}}, "layer_weights"),
        ({"resolutions": (32, 32)}, "repeats"),
        ({"resolutions": (0,)}, "resolutions"),
    ],
)
def test_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CaptureConfig(**kwargs)


def test_bad_arguments_name_the_problem(pipe, tokens):
    with pytest.raises(ValueError, match=r"resolutions \[64\].*available: \[32, 16\]"):
        _capture(pipe, tokens, CaptureConfig(resolutions=(64, 32)))
    with pytest.raises(ValueError, match="num_rows == batch_size"):
        _capture(pipe, tokens, num_rows=4)
    with pytest.raises(ValueError, match="int64"):
        _capture(pipe, tokens.int())
    with pytest.raises(ValueError, match=">= 0"):
        _capture(pipe, -tokens)
    # a failed construction leaves no processor behind
    assert not any(isinstance(p, FusedCrossAttnProcessor) for p in pipe.unet.attn_processors.values())
    with _capture(pipe, tokens) as cap:
        with pytest.raises(ValueError, match="set_step"):
            cap.set_step(3, 3)
        with pytest.raises(ValueError, match="UNet batch of 3"):
            _unet(pipe, 3)
        cap.reset()
        with pytest.raises(RuntimeError, match="nothing was captured"):
            cap.maps()
