"""Training throughput per method: ``python -m bench.bench_train [--quick] [--methods a,b] [--data loader|fixed|both]``.

Each row is one short training run through the real engine (``freeatm_fast.engine.train``: DeepSpeed, the
method, the optimizer), measured over log windows after a warm-up window: images/s (global batch × steps / wall
time) and the data-wait share (host time blocked on the loader / wall time), with the median and p20/p80 of the
per-step time over the windows. Two data modes:

* ``loader``: the real torch loader on the toy world (decode, instance-aware crops, mask warping, colour
  augmentation in ``data.num_workers`` worker processes), what a user's run sees;
* ``fixed``: one batch from that loader kept on the device and fed every step, the training step alone (the
  ceiling a faster loader, e.g. DALI of issue #5, can reach).

Free-ATM rows carry ``speedup_vs_baseline`` against the same method without Free-ATM in the same run (below 1 =
the instance branch's cost). Rows go to ``bench/results/train.jsonl``.

Full run (GPU): ResNet-50 at 224², bf16, channels_last, 256 images per step, the toy world rendered at 224²
(masks 56²), 12 loader workers. Target (issue #4), recorded in the rows: MoCo-v2 ResNet-50 ≥ 2,000 images/s on
one H100. Quick run (``--quick``, CPU): the embedded default model (ResNet-10t at 64², batch 32), a few steps.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
from pathlib import Path

import torch

from bench.harness import BenchRun, Stats, _quantile
from freeatm_fast.config import load_config

METHODS = ("mocov2", "mocov2_freeatm", "simclr", "simclr_freeatm", "stablerep", "detcon", "multicrop")
GPU_TARGET = {"mocov2": 2000.0}  # images/s on one H100 at ResNet-50 224² bf16 (issue #4)

QUICK = [
    "train.batch_size=32",
    "data.num_workers=1",
    "data.toy_train_images=512",
    "data.toy_val_images=64",
]
FULL = [
    "model.backbone=resnet50",
    "model.backbone_kwargs={}",
    "model.proj_hidden_dim=2048",
    "data.image_size=224",
    "data.mask_size=56",
    "data.local_size=96",
    "data.toy_image_size=224",
    "data.toy_train_images=4096",  # ~1 min to render at 224² (single process); 60 steps x 256 = 3.75 epochs
    "data.toy_val_images=100",
    "data.num_workers=12",
    "train.batch_size=256",
    "train.precision=bf16",
    "model.channels_last=true",
    "moco.queue_size=65536",
    "freeatm.inst_queue_size=65536",
]


class FixedBatchLoader:
    """Yields one device-resident batch forever (the training step without data loading)."""

    def __init__(self, batch: dict, dataset):
        self.batch = batch
        self.dataset = dataset

    def __iter__(self):
        while True:
            yield self.batch


def _first_batch(cfg, device: torch.device):
    from freeatm_fast.data.loader import build_loader
    from freeatm_fast.engine import to_device

    loader = build_loader(cfg)
    batch = next(iter(loader))
    return to_device(batch, device, cfg.model.channels_last), loader.dataset


def run_method(run: BenchRun, name: str, overrides: list[str], data_mode: str, steps: int, window: int) -> dict:
    from freeatm_fast.engine import train

    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        stablerep = ["train.batch_size=" + str(max(1, _batch(overrides) // 4)), "data.group_size=4"]
        cfg = load_config(
            name,
            [
                *overrides,
                *(stablerep if name == "stablerep" else []),
                f"train.max_steps={steps}",
                f"train.warmup_steps={min(5, steps)}",
                f"train.log_every={window}",
                "train.checkpoint=false",
                "train.export_backbone=false",
                "train.tensorboard=false",
                "eval.knn=false",
                f"train.out_dir={tmp}/run",
            ],
        )
        loader = None
        if data_mode == "fixed":
            loader = FixedBatchLoader(*_first_batch(cfg, run.device))
        summary = train(cfg, loader=loader)
        windows = [json.loads(x) for x in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()][1:]
    if not windows:
        raise RuntimeError(f"{name}: no measured window (steps={steps}, window={window})")
    images_per_step = cfg.train.batch_size * summary["world_size"] * (cfg.data.group_size if name == "stablerep" else 1)
    step_ms = sorted(1e3 * images_per_step / w["images_per_s"] for w in windows)
    stats = Stats(
        median_ms=statistics.median(step_ms),
        p20_ms=_quantile(step_ms, 0.2),
        p80_ms=_quantile(step_ms, 0.8),
        iters=len(windows) * window,
        peak_mem_mb=torch.cuda.max_memory_allocated() / 2**20 if run.device.type == "cuda" else None,
    )
    return {
        "cfg": cfg,
        "stats": stats,
        "images_per_s": 1e3 * images_per_step / stats.median_ms,
        "data_wait": statistics.median(w["data_wait"] for w in windows),
        "images_per_step": images_per_step,
    }


def _batch(overrides: list[str]) -> int:
    for o in reversed(overrides):
        if o.startswith("train.batch_size="):
            return int(o.split("=", 1)[1])
    return 64


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small CPU-sized run (a smoke test of the script)")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated shipped config names")
    parser.add_argument("--data", choices=("loader", "fixed", "both"), default="both")
    parser.add_argument("--steps", type=int, default=None, help="steps per run (default: 12 quick, 60 full)")
    parser.add_argument("--window", type=int, default=None, help="steps per measured window (default 4 / 10)")
    args = parser.parse_args(argv)

    os.environ.setdefault("FREEATM_CACHE", str(Path(tempfile.gettempdir()) / "freeatm-bench-cache"))
    run = BenchRun("train", quick=args.quick)
    overrides = QUICK if args.quick else FULL
    steps = args.steps or (12 if args.quick else 60)
    window = args.window or (4 if args.quick else 10)
    modes = ("loader", "fixed") if args.data == "both" else (args.data,)
    results: dict[tuple[str, str], dict] = {}
    for name in [m for m in args.methods.split(",") if m]:
        for mode in modes:
            r = run_method(run, name, overrides, mode, steps, window)
            results[(name, mode)] = r
            base = results.get((name.removesuffix("_freeatm"), mode)) if name.endswith("_freeatm") else None
            cfg = r["cfg"]
            target = GPU_TARGET.get(name) if (cfg.model.backbone == "resnet50" and run.device.type == "cuda") else None
            row = run.record(
                op="train",
                backend=f"{name}:{mode}",
                dtype=cfg.train.precision,
                shape={
                    "backbone": cfg.model.backbone,
                    "image": cfg.data.image_size,
                    "images_per_step": r["images_per_step"],
                    "workers": cfg.data.num_workers,
                },
                stats=r["stats"],
                baseline=base["stats"] if base else None,
                baseline_name=f"{name.removesuffix('_freeatm')}:{mode}",
                note="" if target is None else f"target >= {target:.0f} images/s",
                extra={
                    "images_per_s": r["images_per_s"],
                    "data_wait_share": r["data_wait"],
                    "target_images_per_s": target,
                    "meets_target": None if target is None else r["images_per_s"] >= target,
                },
            )
            print(
                f"{row['backend']:<24} {r['images_per_s']:9.1f} images/s  data-wait {100 * r['data_wait']:5.1f}%"
                + (f"  ({row['speedup_vs_baseline']:.2f}x of {row['baseline']})" if base else ""),
                flush=True,
            )
    print(f"summary: {run.finish()}")
    return 0


if __name__ == "__main__":
    from freeatm_fast.engine import shutdown

    shutdown(main())
