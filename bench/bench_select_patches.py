"""Benchmark of MAE's masking step: ``select_patches``, ``gather_tokens`` and the two together.

``python -m bench.bench_select_patches [--quick]``. Backends, all measured in the same run: ``torch_eager`` (the
reference, i.e. MAE's argsort recipe extended with the guided set; the baseline), ``torch_compile`` (the same reference
under ``torch.compile``), ``triton`` (the public op), ``cuda`` (no CUDA C++ version exists: recorded as not run).
Rows are appended to ``bench/results/kernels.jsonl``.

Full shapes (GPU): ViT-B/16 MAE, B=256, L=196, 147 masked (75%), guided_fraction 0.5, D=768, bf16.
Quick shapes (CPU): B=8, L=49, 36 masked, D=64, fp32. On a machine without a GPU the Triton row runs in the
interpreter (``TRITON_INTERPRET=1``, set here before the kernels are imported): a correctness run, not a speed; the
quick CPU run also leaves out torch.compile of the select reference (its compile alone can take 26 s there).
"""

from __future__ import annotations

import argparse
import os
import time

import torch

if not torch.cuda.is_available():
    # Triton decides at decoration time whether it interprets: set the flag before freeatm_kernels is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

from bench.harness import BenchRun  # noqa: E402
from freeatm_kernels import (  # noqa: E402
    _backend,
    gather_tokens,
    gather_tokens_reference,
    select_patches,
    select_patches_reference,
)
from freeatm_kernels.select_patches import num_guided_patches  # noqa: E402

_DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
# On the 2-core CPU, torch.compile of the select reference (its sorts and gathers become C++ kernels) took 3-13 s with
# a warm inductor cache and 26 s with a cold one on a loaded machine: alone it can break the quick run's 30 s budget.
# So the quick CPU run records the select and select+gather torch_compile rows as not run; the gather graphs compile
# in 0.1-2 s and are measured.
_SKIP_SELECT_COMPILE_NOTE = (
    "torch.compile not run: compiling the select reference takes 3-26 s on a 2-core CPU, over the quick run's budget"
)


def _config(quick: bool) -> dict:
    if quick:
        return {"B": 8, "L": 49, "num_masked": 36, "guided_fraction": 0.5, "D": 64, "dtype": torch.float32}
    return {"B": 256, "L": 196, "num_masked": 147, "guided_fraction": 0.5, "D": 768, "dtype": torch.bfloat16}


def _triton_note(device: torch.device) -> tuple[bool, str]:
    ok, why = _backend.triton_usable_on(device)
    if not ok:
        return False, f"triton not run: {why}"
    if device.type == "cpu":
        return True, "triton interpreter (CPU), not a speed measurement"
    return True, ""


def _time_compiled(bench: BenchRun, fn):
    """Time a torch.compile'd callable; (stats, note). Compilation happens in the first (untimed) call."""
    t0 = time.perf_counter()
    try:
        fn()
    except Exception as exc:  # a compile failure is a result to record, not a crash of the whole benchmark
        return None, f"torch.compile failed: {type(exc).__name__}: {str(exc)[:200]}"
    return bench.time(fn), f"first call (compile) {time.perf_counter() - t0:.1f} s, excluded"


def _compare(
    bench: BenchRun, ctx: dict, op: str, shape: dict, nbytes: int, eager_fn, eager_note: str, compiled, triton_fn
) -> None:
    """Record the four backends of one op at one shape, all against the eager reference measured here.

    ``compiled``: a torch.compile'd callable (compiled on its first call), or a note saying why there is none.
    """
    common = {"op": op, "dtype": ctx["dtype"], "shape": shape, "bytes_moved": nbytes}
    eager = bench.time(eager_fn)
    bench.record(backend="torch_eager", stats=eager, baseline=eager, note=eager_note, **common)
    stats, note = (None, compiled) if isinstance(compiled, str) else _time_compiled(bench, compiled)
    bench.record(backend="torch_compile", stats=stats, baseline=eager, note=note, **common)
    stats = None
    if ctx["triton_ok"]:
        # the interpreter takes 10-500 ms a call here and measures nothing about speed: 1 warm-up, 3 timed calls
        few = {"warmup": 1, "iters": 3} if bench.device.type == "cpu" else {}
        stats = bench.time(triton_fn, **few)
    bench.record(backend="triton", stats=stats, baseline=eager, note=ctx["triton_note"], **common)
    bench.record(backend="cuda", stats=None, note=ctx["cuda_note"], **common)


def run(bench: BenchRun, quick: bool) -> None:
    device = bench.device
    cfg = _config(quick)
    B, L, nm, gf, D, dtype = cfg["B"], cfg["L"], cfg["num_masked"], cfg["guided_fraction"], cfg["D"], cfg["dtype"]
    g = num_guided_patches(nm, gf)
    keep = L - nm
    esize = torch.empty((), dtype=dtype).element_size()
    gen = torch.Generator(device=device).manual_seed(0)
    importance = torch.rand(B, L, device=device, generator=gen).to(dtype)
    x = torch.randn(B, L, D, device=device, generator=gen).to(dtype)
    triton_ok, triton_note = _triton_note(device)
    ctx = {
        "dtype": _DTYPE_NAMES[dtype],
        "triton_ok": triton_ok,
        "triton_note": triton_note,
        "cuda_note": "cuda not run: no CUDA C++ implementation of select_patches/gather_tokens (Triton covers them)",
    }

    # Sanity before timing: the kernels must agree with the references on this very shape.
    noise = torch.rand(B, L, device=device, generator=gen)
    ids_keep, _, _ = select_patches_reference(importance, noise, nm, g)
    if triton_ok:
        got = torch.ops.freeatm.select_patches(importance, noise, nm, g, "triton")
        if not all(
            torch.equal(a, b) for a, b in zip(got, select_patches_reference(importance, noise, nm, g), strict=True)
        ):
            raise RuntimeError("select_patches: triton differs from the reference; not benchmarking a wrong kernel")
        if not torch.equal(gather_tokens(x, ids_keep, backend="triton"), gather_tokens_reference(x, ids_keep)):
            raise RuntimeError("gather_tokens: triton differs from the reference; not benchmarking a wrong kernel")

    # ---- select_patches: importance + noise read; ids_keep, ids_restore, mask written
    select_bytes = B * L * (esize + 4) + B * keep * 8 + B * L * 8 + B * L * 4

    def select_eager():
        return select_patches_reference(importance, torch.rand(B, L, device=device), nm, g)

    skip_select_compile = quick and device.type == "cpu"
    compiled_select = _SKIP_SELECT_COMPILE_NOTE if skip_select_compile else torch.compile(select_eager)
    _compare(
        bench,
        ctx,
        "select_patches",
        {"B": B, "L": L, "num_masked": nm, "guided_fraction": gf},
        select_bytes,
        eager_fn=select_eager,
        eager_note="reference: MAE argsort recipe + guided set",
        compiled=compiled_select,
        triton_fn=lambda: select_patches(importance, nm, gf, backend="triton"),
    )

    # ---- gather_tokens of the visible tokens (M = L - num_masked): ids + M rows of x read, [B, M, D] written;
    # the backward reads grad_out [B, M, D] and ids and writes grad_x [B, L, D]
    fwd_bytes = B * keep * 8 + 2 * B * keep * D * esize
    bwd_bytes = B * keep * 8 + B * keep * D * esize + B * L * D * esize
    x_grad = x.detach().clone().requires_grad_(True)
    grad_out = torch.randn(B, keep, D, device=device, generator=gen).to(dtype)

    def fwd(fn):
        return lambda: fn(x, ids_keep)

    def fwd_bwd(fn):
        def step():
            x_grad.grad = None
            fn(x_grad, ids_keep).backward(grad_out)

        return step

    triton_gather = lambda x_, i_: gather_tokens(x_, i_, backend="triton")  # noqa: E731
    compiled_gather = torch.compile(gather_tokens_reference)
    for pass_name, wrap, nbytes in (("fwd", fwd, fwd_bytes), ("fwd+bwd", fwd_bwd, fwd_bytes + bwd_bytes)):
        _compare(
            bench,
            ctx,
            "gather_tokens",
            {"B": B, "L": L, "M": keep, "D": D, "pass": pass_name},
            nbytes,
            eager_fn=wrap(gather_tokens_reference),
            eager_note="reference: torch.gather",
            compiled=wrap(compiled_gather),
            triton_fn=wrap(triton_gather),
        )

    # ---- the MAE masking step: choose the patches, gather the visible tokens (forward)
    def step_eager():
        ids_keep, ids_restore, mask = select_eager()
        return gather_tokens_reference(x, ids_keep), ids_restore, mask

    def step_triton():
        ids_keep, ids_restore, mask = select_patches(importance, nm, gf, backend="triton")
        return gather_tokens(x, ids_keep, backend="triton"), ids_restore, mask

    compiled_step = _SKIP_SELECT_COMPILE_NOTE if skip_select_compile else torch.compile(step_eager)
    shape = {"B": B, "L": L, "num_masked": nm, "guided_fraction": gf, "D": D}
    _compare(
        bench,
        ctx,
        "select_patches+gather_tokens",
        shape,
        select_bytes + fwd_bytes,
        eager_fn=step_eager,
        eager_note="reference: MAE random_masking recipe + guided set",
        compiled=compiled_step,
        triton_fn=step_triton,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_select_patches", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small CPU-sized shapes (B=8, L=49, D=64, fp32)")
    parser.add_argument("--results-dir", default=None, help="where the rows go (default bench/results/)")
    args = parser.parse_args(argv)
    kw = {"results_dir": args.results_dir} if args.results_dir else {}
    bench = BenchRun("kernels", quick=args.quick, **kw)
    run(bench, args.quick)
    summary = bench.finish()
    print(summary.read_text())


if __name__ == "__main__":
    main()
