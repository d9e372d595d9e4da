"""Data-loading throughput (issue #5): ``python -m bench.data [--quick] [--pipelines two,multicrop] [--skip-train]``.

Two kinds of rows, appended to ``bench/results/data.jsonl``:

* ``loader:<pipeline>``: the loader alone, iterated in this process with nothing else running: a warm-up, then
  N timed batches (wall clock; ``torch.cuda.synchronize()`` after each batch of a loader whose tensors are on
  the GPU), timed in windows of W batches; the row's median and p20/p80 are the per-batch times of the windows
  (bench_train's way: a torch loader with n workers delivers its batches in bursts of n, so single batches say
  little). Pipelines: ``two`` (config mocov2_freeatm: two instance-aware views + warped masks per sample) and
  ``multicrop`` (config multicrop: 2 global + 4 local crops). Backends, for a worker count n of 1, 2 and "all"
  (the usable cores, at least 2; ``multicrop``: "all" only):

  - ``torch``: the torch/PIL loader with ``data.num_workers=n``;
  - ``dali:cpu``: DALI decoding on CPU threads, ``data.dali_threads=n``, and ``data.num_workers=max(1, n // 4)``
    worker processes for the host-side planning (reading the JPEG bytes and masks, drawing the crops): planning
    is a small part of the per-sample work (0.3 of 1.3 ms at 64², 0.7 of 11 ms at 224² on the 2-core CPU
    machine), so the threads get the cores;
  - ``dali:gpu`` (CUDA only): nvJPEG decoding on the GPU, ``data.num_workers=n`` planning workers (the CPU has
    nothing else to do) and ``data.dali_threads=n``.

  Each DALI row has ``speedup_vs_baseline`` against the torch loader with the same n. ``samples_per_s`` counts
  data-set images (one per sample); ``view_images_per_s`` = samples/s x ``views_per_sample`` (2 for ``two``,
  6 for ``multicrop``), both in the row's extra fields; the median/p20/p80 are milliseconds per batch.

* ``train``: MoCo-v2 + Free-ATM through the real engine (bench_train's ``run_method``) fed by the torch loader
  (``<method>:torch``) and by the DALI loader (``<method>:dali``, the same ``data.num_workers``,
  ``data.dali_threads`` equal to it, ``data.dali_device=auto``: GPU decoding on a CUDA machine), and the
  fixed-batch ceiling (``<method>:fixed``: one device batch fed every step, the step alone); images/s, the
  data-wait share, the share of the ceiling, and the DALI row's speed-up against the torch one. The full run
  adds the plain MoCo-v2 pair.

Full run (GPU): bench_train's FULL sizes (ResNet-50, the toy world rendered at 224², masks 56², batch 256,
bf16). Targets (issue #5), recorded on CUDA in the full run's rows (``target``, ``meets_target``): DALI GPU
>= 3x the torch loader's images/s with all workers for the two-view pipeline, and MoCo-v2 (ResNet-50) fed by
DALI with a data-wait share < 5%. Quick run (``--quick``, CPU): the toy world's default 64² at
bench_train's QUICK sizes (512 images, batch 32), a few batches.
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
import time
from pathlib import Path

import torch

from bench.bench_train import FULL, QUICK, run_method
from bench.harness import BenchRun, Stats, _quantile
from freeatm_fast.config import load_config

PIPELINES = {"two": "mocov2_freeatm", "multicrop": "multicrop"}  # data.views -> the shipped config measured
TARGET_SPEEDUP = 3.0  # DALI GPU vs the torch loader, two-view pipeline at 224², all workers (issue #5)
TARGET_DATA_WAIT = 0.05  # MoCo-v2 ResNet-50 fed by DALI on one GPU (issue #5)
# (warm-up batches, timed batches, batches per window); warm-up and window grow with the worker count (_schedule)
QUICK_BATCHES = (4, 24, 4)
FULL_BATCHES = (4, 20, 5)


def all_workers() -> int:
    """The usable CPU cores of this process (at least 2): the "all" worker count."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(2, cores)


def loader_overrides(backend: str, n: int) -> list[str]:
    """Config overrides of a loader row: ``torch``, ``dali:cpu`` or ``dali:gpu`` with worker count n."""
    if backend == "torch":
        return ["data.loader=torch", f"data.num_workers={n}"]
    where = backend.split(":")[1]
    host = n if where == "gpu" else max(1, n // 4)
    return ["data.loader=dali", f"data.dali_device={where}", f"data.dali_threads={n}", f"data.num_workers={host}"]


def _schedule(cfg, warmup: int, batches: int, window: int) -> tuple[int, int, int]:
    """Warm-up past the loader's first burst (workers x prefetch 2 batches in flight), windows of at least one
    batch per worker, and at least 3 windows."""
    par = max(1, cfg.data.num_workers)
    warmup = max(warmup, 2 * par + 2)
    window = max(window, par)
    batches = window * max(3, math.ceil(batches / window))
    return warmup, batches, window


def time_loader(cfg, warmup: int, batches: int, window: int) -> tuple[Stats, float, str]:
    """Iterate ``build_loader(cfg)``: (per-batch Stats over windows, wall-clock samples/s, the batches' device)."""
    from freeatm_fast.data.loader import build_loader

    warmup, batches, window = _schedule(cfg, warmup, batches, window)
    loader = build_loader(cfg)
    try:
        it = iter(loader)
        batch = None
        for _ in range(warmup):
            batch = next(it)
        where = next(v.device for v in batch.values() if isinstance(v, torch.Tensor))
        sync = torch.cuda.synchronize if where.type == "cuda" else (lambda: None)
        sync()
        if where.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        del batch
        per_batch_ms: list[float] = []
        t_start = t0 = time.perf_counter()
        for i in range(1, batches + 1):
            next(it)
            sync()
            if i % window == 0:
                t = time.perf_counter()
                per_batch_ms.append(1e3 * (t - t0) / window)
                t0 = t
        wall = time.perf_counter() - t_start
    finally:
        loader.close()
    per_batch_ms.sort()
    stats = Stats(
        median_ms=_quantile(per_batch_ms, 0.5),
        p20_ms=_quantile(per_batch_ms, 0.2),
        p80_ms=_quantile(per_batch_ms, 0.8),
        iters=batches,
        peak_mem_mb=torch.cuda.max_memory_allocated() / 2**20 if where.type == "cuda" else None,
    )
    return stats, batches * cfg.train.batch_size / wall, str(where)


def _views_per_sample(cfg) -> int:
    return 2 if cfg.data.views == "two" else cfg.data.global_crops + cfg.data.local_crops


def _unavailable(backend: str, cuda: bool, dali: bool) -> str:
    if backend.startswith("dali") and not dali:
        return "not run: NVIDIA DALI is not installed (pip install nvidia-dali-cuda130)"
    if backend == "dali:gpu" and not cuda:
        return "not run: no CUDA device here"
    return ""


def loader_rows(run: BenchRun, pipelines: list[str], overrides: list[str], sizes: tuple[int, int, int]) -> None:
    from freeatm_fast.data.dali import dali_available

    cuda, dali, n_all = run.device.type == "cuda", dali_available(), all_workers()
    full_cuda = cuda and not run.quick
    results: dict[tuple[str, str, int], Stats] = {}
    for pipeline in pipelines:
        name = PIPELINES[pipeline]
        counts = sorted({1, 2, n_all}) if pipeline == "two" else [n_all]
        for n in counts:
            label = "all" if n == n_all else str(n)
            for backend in ("torch", "dali:cpu", "dali:gpu"):
                cfg = load_config(name, [*overrides, *loader_overrides(backend, n)])
                shape = {"config": name, "image": cfg.data.image_size, "batch": cfg.train.batch_size, "workers": n}
                shape["host_workers"] = cfg.data.num_workers
                if backend != "torch":
                    shape["dali_threads"] = cfg.data.dali_threads
                why = _unavailable(backend, cuda, dali)
                if why:
                    if n == n_all:  # one row per pipeline says why a backend did not run
                        run.record(
                            op=f"loader:{pipeline}", backend=backend, dtype="fp32", shape=shape, stats=None, note=why
                        )
                        print(f"{'loader:' + pipeline:<16} {backend:<9} {label:>3} workers  {why}", flush=True)
                    continue
                stats, wall_sps, where = time_loader(cfg, *sizes)
                results[(pipeline, backend, n)] = stats
                base = results.get((pipeline, "torch", n)) if backend != "torch" else None
                sps = 1e3 * cfg.train.batch_size / stats.median_ms
                views = _views_per_sample(cfg)
                target = None
                if full_cuda and pipeline == "two" and backend == "dali:gpu" and n == n_all:
                    target = f"dali:gpu >= {TARGET_SPEEDUP:g}x torch loader images/s ({n} workers, two views at 224²)"
                row = run.record(
                    op=f"loader:{pipeline}",
                    backend=backend,
                    dtype="fp32",
                    shape=shape,
                    stats=stats,
                    baseline=base,
                    baseline_name=f"torch ({n} worker{'s' if n > 1 else ''})",
                    note="" if target is None else f"target >= {TARGET_SPEEDUP:g}x torch",
                    extra={
                        "workers_label": label,
                        "samples_per_s": sps,
                        "view_images_per_s": sps * views,
                        "views_per_sample": views,
                        "wall_samples_per_s": wall_sps,
                        "images_counted": "samples_per_s: data-set images/s (one per sample); view_images_per_s: "
                        "samples_per_s x views_per_sample (the augmented views produced); median/p20/p80: ms per batch",
                        "batch_device": where,
                        "target": target,
                        "meets_target": None if target is None else base.median_ms / stats.median_ms >= TARGET_SPEEDUP,
                    },
                )
                print(
                    f"{row['op']:<16} {backend:<9} {label:>3} workers {sps:9.1f} samples/s {sps * views:9.1f} "
                    f"view-images/s" + (f"  ({row['speedup_vs_baseline']:.2f}x of {row['baseline']})" if base else ""),
                    flush=True,
                )


def train_rows(run: BenchRun, overrides: list[str], steps: int, window: int) -> None:
    from freeatm_fast.data.dali import dali_available

    cuda, dali = run.device.type == "cuda", dali_available()
    names = ["mocov2_freeatm"] if run.quick else ["mocov2_freeatm", "mocov2"]
    for name in names:
        modes = ("fixed", "torch", "dali") if name == "mocov2_freeatm" else ("torch", "dali")
        results: dict[str, dict] = {}
        for mode in modes:
            workers = load_config(name, overrides).data.num_workers
            settings = {"dali": ["data.loader=dali", f"data.dali_threads={workers}"]}.get(mode, ["data.loader=torch"])
            why = _unavailable("dali", cuda, dali) if mode == "dali" else ""
            if why:
                cfg = load_config(name, overrides)
                shape = {"backbone": cfg.model.backbone, "image": cfg.data.image_size, "workers": workers}
                run.record(
                    op="train", backend=f"{name}:{mode}", dtype=cfg.train.precision, shape=shape, stats=None, note=why
                )
                print(f"{name + ':' + mode:<24} {why}", flush=True)
                continue
            r = run_method(run, name, [*overrides, *settings], "fixed" if mode == "fixed" else "loader", steps, window)
            results[mode] = r
            cfg = r["cfg"]
            base = results.get("torch") if mode == "dali" else None
            fixed = results.get("fixed")
            target = None
            if name == "mocov2" and mode == "dali" and cuda and not run.quick and cfg.model.backbone == "resnet50":
                target = f"data-wait < {100 * TARGET_DATA_WAIT:g}% (MoCo-v2 ResNet-50 fed by DALI)"
            row = run.record(
                op="train",
                backend=f"{name}:{mode}",
                dtype=cfg.train.precision,
                shape={
                    "backbone": cfg.model.backbone,
                    "image": cfg.data.image_size,
                    "images_per_step": r["images_per_step"],
                    "workers": cfg.data.num_workers,
                    **({"dali_threads": cfg.data.dali_threads} if mode == "dali" else {}),
                },
                stats=r["stats"],
                baseline=base["stats"] if base else None,
                baseline_name=f"{name}:torch",
                note="" if target is None else f"target data-wait < {100 * TARGET_DATA_WAIT:g}%",
                extra={
                    "images_per_s": r["images_per_s"],
                    "data_wait_share": r["data_wait"],
                    "loader": "fixed batch" if mode == "fixed" else cfg.data.loader,
                    "frac_of_fixed": r["images_per_s"] / fixed["images_per_s"] if fixed and mode != "fixed" else None,
                    "target": target,
                    "meets_target": None if target is None else r["data_wait"] < TARGET_DATA_WAIT,
                },
            )
            print(
                f"{row['backend']:<24} {r['images_per_s']:9.1f} images/s  data-wait {100 * r['data_wait']:5.1f}%"
                + (f"  ({row['speedup_vs_baseline']:.2f}x of {row['baseline']})" if base else ""),
                flush=True,
            )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small CPU-sized run (a smoke test of the script)")
    parser.add_argument("--pipelines", default=",".join(PIPELINES), help="comma-separated subset of two,multicrop")
    parser.add_argument("--skip-train", action="store_true", help="loader rows only (no training runs)")
    parser.add_argument("--batches", type=int, default=None, help="timed batches per loader row (default 24 / 20)")
    parser.add_argument("--device", choices=("cuda", "cpu"), default=None, help="default: cuda when available")
    args = parser.parse_args(argv)
    pipelines = [p.strip() for p in args.pipelines.split(",") if p.strip()]
    unknown = sorted(set(pipelines) - set(PIPELINES))
    if unknown:
        parser.error(f"unknown pipeline(s) {unknown}; choose from {','.join(PIPELINES)}")
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before anything touches CUDA: the engine and DALI stay on the CPU
    elif args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device")

    os.environ.setdefault("FREEATM_CACHE", str(Path(tempfile.gettempdir()) / "freeatm-bench-cache"))
    run = BenchRun("data", device=args.device, quick=args.quick)
    overrides = QUICK if args.quick else FULL
    warmup, batches, window = QUICK_BATCHES if args.quick else FULL_BATCHES
    # the toy world is rendered once (every config here shares bench_train's toy_* sizes), before any timing
    from freeatm_fast.data.loader import resolve_root

    t0 = time.perf_counter()
    root = resolve_root(load_config(PIPELINES["two"], overrides))
    print(f"data: {root} ({time.perf_counter() - t0:.1f} s), {all_workers()} usable cores", flush=True)
    loader_rows(run, pipelines, overrides, (warmup, args.batches or batches, window))
    if not args.skip_train:
        train_rows(run, overrides, steps=12 if args.quick else 60, window=4 if args.quick else 10)
    print(f"summary: {run.finish()}")
    return 0


if __name__ == "__main__":
    from freeatm_fast.engine import shutdown

    shutdown(main())
