"""Benchmark of ``cross_attention_with_maps``: ``python -m bench.bench_cross_attention_with_maps [--quick]``.

Backends, all measured in the same run on the same inputs:

* ``torch_eager``: the reference (diffusers-style eager capture: materialises the ``[B, H, N, T]`` probabilities and
  reduces them over heads), the baseline of ``speedup_vs_baseline``;
* ``torch_compile``: ``torch.compile`` of that reference;
* ``triton`` and ``cuda`` (the compiled extension, when built and on a GPU);
* ``sdpa_only``: ``F.scaled_dot_product_attention(q, k, v)`` without any maps, the target. Each row carries
  ``vs_sdpa_only = sdpa_only_ms / backend_ms``; the goal is >= 1/1.10 with K <= 16 kept tokens and >= 1/1.35 with all
  77 tokens.

Full shapes (for a GPU): SD1.5 at 512^2 with classifier-free guidance: B=16, the conditional second half (8 rows)
accumulates, H=8, T=77 CLIP tokens, fp16; the UNet's (N, D) pairs (4096, 40), (1024, 80), (256, 160), (64, 160) with
every backend, and the rest of the cross product N x D without the ``torch_compile`` row (one compilation per shape
would dominate the run). Each with all 77 tokens and with K=8 kept tokens. Quick shapes: tiny fp32 shapes for a CPU.
bytes_moved = q, k, v read + out written + the touched maps region read and written.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.nn.functional as F

# The Triton kernels run on a CPU only in the interpreter, whose flag must be set before freeatm_kernels is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from bench.harness import BenchRun  # noqa: E402
from freeatm_kernels import _backend, cross_attention_with_maps, cross_attention_with_maps_reference  # noqa: E402

OP = "cross_attention_with_maps"
SD15_PAIRS = ((4096, 40), (1024, 80), (256, 160), (64, 160))  # (N, D) of SD1.5's cross-attention at 512^2
K_SELECTED = 8
_DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def _configs(quick: bool) -> list[dict]:
    """One dict per measured shape: B, H, N, T, D, dtype, K (None = all tokens), with_compile."""
    if quick:
        return [
            dict(B=2, H=2, N=64, T=77, D=40, dtype=torch.float32, K=K, with_compile=True) for K in (None, K_SELECTED)
        ]
    out = []
    for N in (4096, 1024, 256, 64):
        for D in (40, 80, 160):
            for K in (None, K_SELECTED):
                out.append(dict(B=16, H=8, N=N, T=77, D=D, dtype=torch.float16, K=K, with_compile=(N, D) in SD15_PAIRS))
    return out


def _bench_one(bench: BenchRun, cfg: dict) -> None:
    dev = bench.device
    B, H, N, T, D, dtype, K = cfg["B"], cfg["H"], cfg["N"], cfg["T"], cfg["D"], cfg["dtype"], cfg["K"]
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, H, N, D, generator=g).to(dtype).to(dev)
    k = torch.randn(B, H, T, D, generator=g).to(dtype).to(dev)
    v = torch.randn(B, H, T, D, generator=g).to(dtype).to(dev)
    rows = torch.arange(B // 2, B, device=dev)  # CFG: the conditional second half accumulates
    n_rows = rows.numel()
    tokens = None
    if K is not None:
        tokens = torch.stack([torch.randperm(T, generator=g)[:K] for _ in range(n_rows)]).to(dev)
    cols = T if K is None else K
    maps = torch.zeros(n_rows, cols, N, device=dev)
    weight = 1.0 / 16  # e.g. 16 layers averaged; values keep accumulating over iterations, which changes no timing

    shape = dict(B=B, H=H, N=N, T=T, D=D, rows=n_rows, K=cols)
    dtype_name = _DTYPE_NAMES[dtype]
    elem = q.element_size()
    bytes_moved = (q.numel() + k.numel() + v.numel() + q.numel()) * elem + 2 * maps.numel() * 4
    kw = dict(rows=rows, tokens=tokens, weight=weight)

    def record(backend, stats, note="", extra=None):
        extra = dict(extra or {})
        if stats is not None:
            extra["vs_sdpa_only"] = sdpa.median_ms / stats.median_ms
        bench.record(op=OP, backend=backend, dtype=dtype_name, shape=shape, stats=stats, bytes_moved=bytes_moved,
                     baseline=eager, note=note, extra=extra)  # fmt: skip

    sdpa = bench.time(lambda: F.scaled_dot_product_attention(q, k, v))
    eager = bench.time(lambda: cross_attention_with_maps_reference(q, k, v, maps, **kw))
    record("torch_eager", eager, "reference: materialises the [B,H,N,T] probabilities")

    if cfg["with_compile"]:
        torch._dynamo.reset()  # a fresh static compilation per shape (no recompile limit, no dynamic-shape fallback)
        compiled = torch.compile(cross_attention_with_maps_reference, dynamic=False)
        t0 = time.perf_counter()
        compiled(q, k, v, maps, **kw)
        compile_s = time.perf_counter() - t0
        record("torch_compile", bench.time(lambda: compiled(q, k, v, maps, **kw)), "torch.compile of the reference",
               extra={"compile_s": compile_s})  # fmt: skip
    else:
        record("torch_compile", None, "measured on the SD1.5 (N, D) pairs only: one compilation per shape")

    ok, why = _backend.triton_usable_on(dev)
    if ok:
        note = "triton interpreter (CPU), not a speed measurement" if dev.type == "cpu" else ""
        record("triton", bench.time(lambda: cross_attention_with_maps(q, k, v, maps, **kw, backend="triton")), note)
    else:
        record("triton", None, f"triton unavailable: {why}")

    if dev.type != "cuda":
        record("cuda", None, "cuda extension runs on CUDA tensors only; no GPU here")
    elif not _backend.extension_has(OP):
        record("cuda", None, f"cuda extension not built: {_backend.extension_error() or 'op missing'}")
    else:
        record("cuda", bench.time(lambda: cross_attention_with_maps(q, k, v, maps, **kw, backend="cuda")))

    record("sdpa_only", sdpa, "F.scaled_dot_product_attention alone, no maps (the target)")


def run(bench: BenchRun, quick: bool) -> None:
    """Append this op's rows to ``bench``; ``quick``: tiny CPU shapes, else the SD1.5 GPU shapes."""
    with torch.no_grad():
        for cfg in _configs(quick):
            _bench_one(bench, cfg)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_cross_attention_with_maps", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="tiny shapes for a CPU (< 30 s)")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    args = parser.parse_args(argv)
    bench = BenchRun("kernels", device=args.device, quick=args.quick)
    t0 = time.perf_counter()
    run(bench, args.quick)
    md = bench.finish()
    print(f"{len(bench.rows)} rows in {time.perf_counter() - t0:.1f} s appended to {bench.path}; summary {md}")
    print(md.read_text())


if __name__ == "__main__":
    main()
