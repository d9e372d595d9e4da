"""Vision-language pretraining throughput and memory: ``python -m bench.bench_vlp [--quick] [--data fixed|loader]``.

Each row is a short training run through the real engine (bench_train's ``run_method``: DeepSpeed, AdamW, the
method), images/s over log windows after a warm-up window, and the peak GPU memory of the run
(``torch.cuda.max_memory_allocated``, reset before each run; per GPU, this process's device). Rows:

* ``vlp:blip`` ``zero2`` and ``zero3``: BLIP pretraining (ITC with momentum encoders and queues, ITM on hard
  negatives, LM) under ``deepspeed.zero_stage=2`` and ``=3``; the ``zero3`` row carries ``speedup_vs_baseline``
  and ``mem_vs_zero2`` against ``zero2`` measured in the same run. On one GPU ZeRO partitions over a world of one,
  so the memory rows show ZeRO-3's overhead rather than its saving (which grows with the number of GPUs);
* ``vlp:vilt`` ``zero2``: ViLT pretraining (MLM + ITM, one transformer over text tokens and image patches).

Data: ``fixed`` (default) feeds one device batch every step, the step alone; ``loader`` uses the real torch loader
(``data.views=vlp``). The end-of-run retrieval evaluation is off (``eval.retrieval=false``): it is not training.

Full run (GPU): BLIP's ViT-B/16 at 224² (``vit_base_patch16_224``), BERT-base-sized text encoder and decoder
(width 768, 12 layers, 12 heads), ITC embedding 256, queue 57,600, 64 images per GPU per step, bf16 autocast, the
toy world rendered at 224²; ViLT with the same ViT-B/16 at 224². Quick run (``--quick``, CPU): the shipped toy
``blip`` and ``vilt`` configs (4-block ViT of width 128 on 64² images) with 8 images per step, a few steps.
Rows go to ``bench/results/vlp.jsonl``.
"""

from __future__ import annotations

import argparse
import gc
import os
import tempfile
from pathlib import Path

import torch

from bench.bench_train import run_method
from bench.harness import BenchRun

QUICK = [
    "train.batch_size=8",
    "data.num_workers=1",
    "data.toy_train_images=512",  # the same toy world as bench_train --quick (shared cache)
    "data.toy_val_images=64",
    "eval.retrieval=false",
]
FULL = [
    "model.backbone=vit_base_patch16_224",
    "model.backbone_kwargs={}",
    "data.image_size=224",
    "data.toy_image_size=224",
    "data.toy_train_images=2048",  # the same toy world as bench_mae (shared cache)
    "data.toy_val_images=100",
    "data.num_workers=12",
    "train.batch_size=64",
    "train.precision=bf16",
    "vlp.text_width=768",
    "vlp.text_layers=12",
    "vlp.text_heads=12",
    "vlp.embed_dim=256",
    "vlp.queue_size=57600",
    "eval.retrieval=false",
]
# (config, ZeRO stages measured); the first stage of a config is the baseline of its other stages
RUNS = (("blip", (2, 3)), ("vilt", (2,)))


def require_method(name: str) -> None:
    """Exit with "method NAME not available" unless the method is registered, importable and has a shipped
    config of that name."""
    from freeatm_fast.config import ConfigError, config_path
    from freeatm_fast.methods import method_class

    try:
        method_class(name)
        config_path(name)
    except (ConfigError, ImportError, AttributeError) as exc:
        raise SystemExit(f"bench_vlp: method {name} not available ({exc})") from exc


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small CPU-sized run (a smoke test of the script)")
    parser.add_argument("--data", choices=("fixed", "loader"), default="fixed")
    parser.add_argument("--steps", type=int, default=None, help="steps per run (default: 6 quick, 40 full)")
    parser.add_argument("--window", type=int, default=None, help="steps per measured window (default 2 / 10)")
    args = parser.parse_args(argv)

    for name, _ in RUNS:
        require_method(name)
    os.environ.setdefault("FREEATM_CACHE", str(Path(tempfile.gettempdir()) / "freeatm-bench-cache"))
    run = BenchRun("vlp", quick=args.quick)
    overrides = QUICK if args.quick else FULL
    steps = args.steps or (6 if args.quick else 40)
    window = args.window or (2 if args.quick else 10)
    cuda = run.device.type == "cuda"
    for name, stages in RUNS:
        base = None
        for stage in stages:
            gc.collect()  # the previous run's engine and optimizer state must not count in this run's peak
            if cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(run.device)
            r = run_method(run, name, [*overrides, f"deepspeed.zero_stage={stage}"], args.data, steps, window)
            cfg, peak = r["cfg"], r["stats"].peak_mem_mb
            mem_ratio = peak / base["stats"].peak_mem_mb if (base and peak and base["stats"].peak_mem_mb) else None
            world = r["images_per_step"] // cfg.train.batch_size
            note = "" if cuda else "CPU: no GPU memory measured"
            if cuda and world == 1:
                note = "one GPU: ZeRO partitions over a world of one (no memory saving)"
            row = run.record(
                op=f"vlp:{name}",
                backend=f"zero{stage}",
                dtype=cfg.train.precision,
                shape={
                    "backbone": cfg.model.backbone,
                    "image": cfg.data.image_size,
                    "images_per_step": r["images_per_step"],
                    "world_size": world,
                    # ViLT has no text tower (one transformer: the ViT's blocks) and no queue
                    "text_width": cfg.vlp.text_width if name == "blip" else None,
                    "text_layers": cfg.vlp.text_layers if name == "blip" else None,
                    "queue": cfg.vlp.queue_size if name == "blip" else None,
                    "max_len": cfg.vlp.max_len,
                    "data": args.data,
                },
                stats=r["stats"],
                baseline=base["stats"] if base else None,
                baseline_name=f"vlp:{name}:zero{stages[0]}",
                note=note,
                extra={
                    "images_per_s": r["images_per_s"],
                    "data_wait_share": r["data_wait"],
                    "zero_stage": stage,
                    "peak_mem_gb": None if peak is None else peak / 1024,
                    "mem_vs_zero2": mem_ratio,
                },
            )
            mem = f"  peak {peak / 1024:6.2f} GB" if peak is not None else ""
            print(
                f"vlp:{name:<5} zero{stage} {r['images_per_s']:9.1f} images/s{mem}"
                + (f"  ({row['speedup_vs_baseline']:.2f}x of zero{stages[0]})" if base else ""),
                flush=True,
            )
            if base is None:
                base = r
    print(f"summary: {run.finish()}")
    return 0


if __name__ == "__main__":
    from freeatm_fast.engine import shutdown

    shutdown(main())
