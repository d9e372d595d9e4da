"""Run every kernel benchmark: ``python -m bench.kernels [--quick] [--ops a,b]``.

``--quick``: small shapes and the backends that run on this machine (under 2 minutes on a 2-core
CPU). Without it: the real shapes of DESIGN §9 / issue #2 (SD1.5 cross-attention, ResNet-50 C5
mask pooling, ViT-B/16 patch selection), meant for a GPU. Rows are appended to
``bench/results/kernels.jsonl`` and this run's table is written next to it as markdown.
"""

from __future__ import annotations

import argparse
import importlib
import time

from bench.harness import BenchRun

BENCHES = ("cross_attention_with_maps", "mask_pool", "select_patches")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.kernels", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="small shapes, the backends that run here")
    parser.add_argument("--ops", default=",".join(BENCHES), help=f"comma-separated subset of {','.join(BENCHES)}")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    args = parser.parse_args(argv)
    ops = [o.strip() for o in args.ops.split(",") if o.strip()]
    unknown = sorted(set(ops) - set(BENCHES))
    if unknown:
        parser.error(f"unknown op(s) {unknown}; choose from {list(BENCHES)}")

    run = BenchRun("kernels", device=args.device, quick=args.quick)
    print(
        f"kernel benchmarks on {run.meta['device']} (git {run.meta['git']}, torch {run.meta['torch']}, "
        f"triton {run.meta['triton']}){' [quick]' if args.quick else ''}",
        flush=True,
    )
    for op in ops:
        t0 = time.perf_counter()
        module = importlib.import_module(f"bench.bench_{op}")
        n_before = len(run.rows)
        module.run(run, quick=args.quick)
        print(f"  {op}: {len(run.rows) - n_before} rows in {time.perf_counter() - t0:.1f} s", flush=True)
    md = run.finish()
    print(f"appended {len(run.rows)} rows to {run.path}; summary in {md}")
    print(md.read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
