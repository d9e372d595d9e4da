"""Benchmark of generation with mask capture: ``python -m bench.bench_generate [--quick]``.

Three ways to sample the same batch (same prompts, latents, scheduler and steps), measured in the same run and
interleaved round by round so that clock drift hits them alike:

* ``sdpa``: plain sampling, the UNet's own attention processors (SDPA), no maps: the baseline;
* ``fused_capture``: our capture (``MapCapture`` with every cross-attention layer through
  ``cross_attention_with_maps``, maps accumulated in one fp32 buffer per resolution), the default recipe, including
  the aggregation to masks, boxes and scores after each batch;
* ``eager_capture``: ``EagerCrossAttnProcessor``, what existing attention-map tools do: explicit
  ``softmax(q kᵀ)`` probabilities ``[B, H, N, T]`` in every cross-attention layer, the head mean of each layer and
  step kept in a list (memory grows with the steps) and averaged after the batch, then the same aggregation.

Each timed call is ``Sampler.generate`` on one batch: text encoding, the denoising loop, VAE decoding, the images to
uint8 on the host, and (capture modes) the aggregation; JPEG encoding and shard writing are not included. Rows go to
``bench/results/generate.jsonl`` (``op="generate"``, ``backend`` = the mode) with images/s, peak CUDA memory, and
``speedup_vs_baseline`` against ``sdpa``; ``extra`` holds ``overhead_time_pct`` and ``overhead_mem_pct`` (vs
``sdpa``), ``maps_bytes`` (what the capture holds after the batch) and ``capture_backend`` (the backend that ran
``cross_attention_with_maps``).

Full run (GPU): the Stable Diffusion 1.5 architecture with random weights (the configs below: UNet 320/640/1280/1280
with cross-attention dim 768 and 8 heads, SD 1.5's VAE, a one-layer 768-wide CLIP text encoder with the tiny
tokenizer; random weights change no timing), fp16, 512x512 images, 50 DDIM steps, guidance 7.5, batches of 1 and 16.
Targets (issue #3), at batch 16: ``fused_capture`` costs <= 3% of the sampling time (speedup_vs_baseline >= 0.97)
and <= 5% of the peak memory of ``sdpa``; the eager capture's cost is reported beside it.

Quick run (``--quick``, CPU): the tiny-random model at 64x64, batch 2, 4 steps: a smoke test of this script, not a
speed measurement of the kernels (on CPU ``cross_attention_with_maps`` runs its torch reference).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from bench.harness import BenchRun, Stats, _quantile
from freeatm_fast.generate.prompts import PromptSource, parse_bracketed
from freeatm_fast.generate.sampler import GenerateConfig, Sampler

MODES = (("sdpa", None), ("fused_capture", "fused"), ("eager_capture", "eager"))
_DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}

# Stable Diffusion 1.5's UNet (runwayml/stable-diffusion-v1-5 unet/config.json, the architecture fields).
SD15_UNET = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    cross_attention_dim=768,
    attention_head_dim=8,  # SD 1.x naming: 8 heads
    norm_num_groups=32,
    norm_eps=1e-5,
    act_fn="silu",
    downsample_padding=1,
    flip_sin_to_cos=True,
    freq_shift=0,
)
# Stable Diffusion 1.5's VAE (vae/config.json).
SD15_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    latent_channels=4,
    norm_num_groups=32,
    sample_size=512,
    act_fn="silu",
)
# A 768-wide CLIP text encoder with one layer: the UNet sees SD 1.5's [B, 77, 768] states; the 12-layer encoder runs
# once per batch (not per step), so its depth hardly matters for images/s.
SD15_TEXT = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=1, num_attention_heads=12)

# Words of the tiny tokenizer (one token each), like SD prompts with 2-3 object words: K = 2..3 token columns.
BENCH_PROMPTS = (
    "a photo of a [dog] on a [sofa]",
    "a [red car] next to a [tree]",
    "a [cat] under a [table]",
    "a [horse] near a [house]",
    "a [bird] on a [chair] next to a [cup]",
    "a [boat] behind a [train]",
    "a photo of a [man] with a [ball]",
    "a [cow] and a [sheep] in front of a [bus]",
)


def build_sd15_random_pipeline(device: torch.device, dtype: torch.dtype, seed: int = 0):
    """SD 1.5-architecture pipeline with random weights (DDIM with SD's betas), built on ``device`` in ``dtype``."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from freeatm_fast.generate.models import _SD_SCHEDULER_CONFIG, build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    with torch.random.fork_rng(devices=[]), torch.device(device):  # parameters created on the device: no 3 GB copy
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**SD15_UNET)
        vae = AutoencoderKL(**SD15_VAE)
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(tokenizer),
                max_position_embeddings=77,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
                **SD15_TEXT,
            )
        )
    for module in (unet, vae, text_encoder):
        module.eval().to(dtype=dtype)
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=DDIMScheduler(**_SD_SCHEDULER_CONFIG),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    return pipe


def _configs(quick: bool, device: torch.device) -> list[dict]:
    if quick:
        return [dict(model="tiny-random", batch=2, steps=4, size=64, dtype=torch.float32, warmup=1, iters=5)]
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    return [
        dict(model="sd15-random", batch=b, steps=50, size=512, dtype=dtype, warmup=1, iters=5 if b > 1 else 10)
        for b in (1, 16)
    ]


def _time_call(fn, device: torch.device) -> tuple[float, float | None, object]:
    """(milliseconds, peak CUDA MiB or None, fn's result) of one call, synchronised on CUDA."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    result = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    ms = (time.perf_counter() - t0) * 1e3
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return ms, peak, result


def _bench_config(bench: BenchRun, pipe, cfg: dict) -> None:
    from freeatm_kernels import _backend

    device = bench.device
    batch = cfg["batch"]
    prompts = PromptSource(
        "bench", tuple(parse_bracketed(p, origin=f"bench prompt {i}") for i, p in enumerate(BENCH_PROMPTS))
    )
    gen = GenerateConfig(
        model=cfg["model"],
        prompts="bench",
        num_images=batch,
        batch_size=batch,
        steps=cfg["steps"],
        guidance=7.5,
        scheduler="ddim",
        size=cfg["size"],
        out="unused",  # Sampler writes nothing
    )
    indices = list(range(batch))

    def call(processor):
        with Sampler(pipe, prompts, gen, processor=processor) as sampler:
            sampler.generate(indices)
            return sampler.maps_bytes()

    times: dict[str, list[float]] = {name: [] for name, _ in MODES}
    peaks: dict[str, float | None] = dict.fromkeys(times)
    maps_bytes: dict[str, int] = {}
    for _name, proc in MODES:  # warm-up: allocator, cuDNN/cuBLAS heuristics, Triton compilation
        for _ in range(cfg["warmup"]):
            call(proc)
    for r in range(cfg["iters"]):
        order = MODES[r % len(MODES) :] + MODES[: r % len(MODES)]  # rotate, so no mode always runs first
        for name, proc in order:
            ms, peak, maps_bytes[name] = _time_call(lambda proc=proc: call(proc), device)
            times[name].append(ms)
            if peak is not None:
                peaks[name] = max(peaks[name] or 0.0, peak)

    stats = {}
    for name, vals in times.items():
        vals = sorted(vals)
        stats[name] = Stats(statistics.median(vals), _quantile(vals, 0.2), _quantile(vals, 0.8), len(vals), peaks[name])
    base = stats["sdpa"]
    latent = cfg["size"] // int(pipe.vae_scale_factor)
    shape = dict(model=cfg["model"], batch=batch, steps=cfg["steps"], size=cfg["size"], latent=latent, guidance=7.5)
    capture_backend = _backend.resolve_backend("cross_attention_with_maps", "auto", device, has_cuda_impl=True)
    for name, _ in MODES:
        s = stats[name]
        extra = {
            "images_per_s": batch / (s.median_ms * 1e-3),
            "overhead_time_pct": 100.0 * (s.median_ms / base.median_ms - 1.0),
            "maps_bytes": maps_bytes[name],
        }
        if s.peak_mem_mb is not None and base.peak_mem_mb:
            extra["overhead_mem_pct"] = 100.0 * (s.peak_mem_mb / base.peak_mem_mb - 1.0)
        note = ""
        if name == "fused_capture":
            extra["capture_backend"] = capture_backend
            if batch == 16 and device.type == "cuda":
                extra["target"] = "overhead_time_pct <= 3 and overhead_mem_pct <= 5"
                extra["meets_target"] = extra["overhead_time_pct"] <= 3.0 and extra.get("overhead_mem_pct", 0) <= 5.0
            if capture_backend == "torch":
                note = "cross_attention_with_maps ran its torch reference (no GPU): not the fused kernel"
        if device.type != "cuda":
            note = (note + "; " if note else "") + "peak memory is measured on CUDA only"
        bench.record(op="generate", backend=name, dtype=_DTYPE_NAMES[cfg["dtype"]], shape=shape, stats=s,
                     baseline=base, baseline_name="sdpa", note=note, extra=extra)  # fmt: skip


def run(bench: BenchRun, quick: bool, *, configs: list[dict] | None = None) -> None:
    """Append the generation rows to ``bench``; ``quick``: tiny-random on CPU, else SD 1.5 at 512² (GPU)."""
    from freeatm_fast.generate.models import build_tiny_random_pipeline

    configs = configs if configs is not None else _configs(quick, bench.device)
    pipes: dict[tuple, object] = {}
    for cfg in configs:
        key = (cfg["model"], cfg["dtype"])
        if key not in pipes:
            pipes.clear()  # one model in memory at a time
            if cfg["model"] == "tiny-random":
                pipes[key] = build_tiny_random_pipeline(dtype=cfg["dtype"]).to(bench.device)
            else:
                pipes[key] = build_sd15_random_pipeline(bench.device, cfg["dtype"])
        _bench_config(bench, pipes[key], cfg)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_generate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="tiny-random on CPU, batch 2, 4 steps (< 1 minute)")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--batches", default=None, help="comma-separated batch sizes (full run default: 1,16)")
    parser.add_argument("--steps", type=int, default=None, help="override the number of steps")
    parser.add_argument("--size", type=int, default=None, help="override the image side (full run default 512)")
    parser.add_argument("--iters", type=int, default=None, help="override the timed rounds per config")
    args = parser.parse_args(argv)
    if not args.quick and args.device is None and not torch.cuda.is_available():
        parser.error("the full benchmark (SD 1.5 at 512²) needs a GPU; use --quick, or --device cpu to force it")
    bench = BenchRun("generate", device=args.device, quick=args.quick)
    configs = _configs(args.quick, bench.device)
    if args.batches:
        base = configs[-1]
        configs = [dict(base, batch=int(b)) for b in args.batches.split(",")]
    for key in ("steps", "size", "iters"):
        if getattr(args, key) is not None:
            configs = [dict(c, **{key: getattr(args, key)}) for c in configs]
    t0 = time.perf_counter()
    run(bench, args.quick, configs=configs)
    md = bench.finish()
    print(f"{len(bench.rows)} rows in {time.perf_counter() - t0:.1f} s appended to {bench.path}; summary {md}")
    print(md.read_text())


if __name__ == "__main__":
    main()
