"""Benchmark of ``mask_pool`` (ops "mask_pool" and "mask_pool_fwd_bwd"): ``python -m bench.bench_mask_pool [--quick]``.

Backends, timed in the same run on the same inputs: the eager reference ``mask_pool_reference`` ("torch_eager",
the baseline), ``torch.compile`` of that reference ("torch_compile", inductor), the Triton kernels ("triton") and
the CUDA extension ("cuda"). Backends that cannot run here are recorded with ``stats=None`` and the reason.

Full shapes (GPU): ResNet-50 C5 (B=256, C=2048, 7x7, K=8 masks at 56x56, bf16 features) with uint8, float32 and
bf16 masks, contiguous and channels_last features; ResNet-50 C4 at stride 16 (B=256, C=1024, 14x14, masks 56x56).
Quick (CPU): B=4, C=64, 7x7, K=4 masks at 28x28, well under 30 s including inductor's compile.

bytes_moved is the minimum traffic: forward = features + masks read, pooled + mass written; forward+backward adds
grad_pooled read, the masks read again and grad_features written.
"""

from __future__ import annotations

import argparse
import functools
import time

import torch

from bench.harness import BenchRun
from freeatm_kernels import _backend, mask_pool, mask_pool_reference

OP = "mask_pool"
DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.uint8: "uint8"}


def _cases(quick: bool) -> list[dict]:
    if quick:
        return [dict(B=4, C=64, h=7, w=7, K=4, H=28, W=28, dtype=torch.bfloat16, masks=torch.uint8, layout="nchw")]
    c5 = dict(B=256, C=2048, h=7, w=7, K=8, H=56, W=56, dtype=torch.bfloat16)
    return [
        {**c5, "masks": torch.uint8, "layout": "nchw"},
        {**c5, "masks": torch.uint8, "layout": "channels_last"},
        {**c5, "masks": torch.float32, "layout": "nchw"},
        {**c5, "masks": torch.bfloat16, "layout": "channels_last"},
        dict(B=256, C=1024, h=14, w=14, K=8, H=56, W=56, dtype=torch.bfloat16, masks=torch.uint8, layout="nchw"),
    ]


def _inputs(case: dict, device: torch.device):
    gen = torch.Generator().manual_seed(0)
    B, C, h, w, K, H, W = (case[k] for k in ("B", "C", "h", "w", "K", "H", "W"))
    features = torch.randn(B, C, h, w, generator=gen).to(device=device, dtype=case["dtype"])
    if case["layout"] == "channels_last":
        features = features.contiguous(memory_format=torch.channels_last)
    u = torch.rand(B, K, H, W, generator=gen)
    masks = (u * 256).clamp(max=255).to(torch.uint8) if case["masks"] == torch.uint8 else u.to(case["masks"])
    grad = torch.randn(B, K, C, generator=gen).to(device=device, dtype=case["dtype"])
    return features, masks.to(device), grad


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _fwd_bwd(fn, features: torch.Tensor, grad: torch.Tensor):
    f = features.detach().clone().requires_grad_(True)

    def step():
        f.grad = None
        fn(f)[0].backward(grad)

    return step


def _triton_note(device: torch.device) -> tuple[bool, str]:
    ok, why = _backend.triton_usable_on(device)
    if not ok:
        return False, why
    if device.type == "cpu":
        return True, "triton interpreter (CPU), not a speed measurement"
    return True, ""


def _cuda_note(device: torch.device) -> tuple[bool, str]:
    if device.type != "cuda":
        return False, "cuda ext runs on CUDA tensors only (no GPU here)"
    if not (_backend.extension_has("mask_pool_forward") and _backend.extension_has("mask_pool_backward")):
        return False, f"cuda ext not built or lacks mask_pool ({_backend.extension_error() or 'op missing'})"
    return True, ""


def _backends(masks: torch.Tensor, compiled_ref, device: torch.device) -> dict:
    """backend name -> (f -> (pooled, mass), whether it runs here, note)."""
    triton_ok, triton_note = _triton_note(device)
    cuda_ok, cuda_note = _cuda_note(device)
    return {
        "torch_eager": (lambda f: mask_pool_reference(f, masks), True, ""),
        "torch_compile": (lambda f: compiled_ref(f, masks), True, "inductor, compile time excluded"),
        "triton": (lambda f: mask_pool(f, masks, backend="triton"), triton_ok, triton_note),
        "cuda": (lambda f: mask_pool(f, masks, backend="cuda"), cuda_ok, cuda_note),
    }


def run(bench: BenchRun, quick: bool) -> None:
    device = bench.device
    compiled_ref = torch.compile(mask_pool_reference)
    for case in _cases(quick):
        features, masks, grad = _inputs(case, device)
        shape = {k: case[k] for k in ("B", "C", "h", "w", "K", "H", "W")}
        shape.update(masks=DTYPE_NAMES[case["masks"]], layout=case["layout"])
        dtype = DTYPE_NAMES[case["dtype"]]
        pooled_bytes = _nbytes(features.new_empty(case["B"], case["K"], case["C"])) + case["B"] * case["K"] * 4
        fwd_bytes = _nbytes(features) + _nbytes(masks) + pooled_bytes
        # + grad_pooled read, masks read again, grad_features written
        fwd_bwd_bytes = fwd_bytes + _nbytes(grad) + _nbytes(masks) + _nbytes(features)
        fns = _backends(masks, compiled_ref, device)
        for op, nbytes in ((OP, fwd_bytes), (f"{OP}_fwd_bwd", fwd_bwd_bytes)):
            baseline = None
            for backend, (fn, ok, note) in fns.items():
                stats = None
                if ok:
                    if op == OP:
                        stats = bench.time(functools.partial(fn, features))
                    else:
                        stats = bench.time(_fwd_bwd(fn, features, grad))
                if backend == "torch_eager":
                    baseline = stats
                # no speed-up for the baseline itself nor for interpreter rows (not speed measurements)
                compare = backend != "torch_eager" and not (backend == "triton" and device.type == "cpu")
                bench.record(
                    op=op, backend=backend, dtype=dtype, shape=shape, stats=stats, bytes_moved=nbytes,
                    baseline=baseline if compare else None, note=note,
                )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_mask_pool", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small CPU-sized shapes")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    args = parser.parse_args(argv)
    bench = BenchRun("kernels", device=args.device, quick=args.quick)
    t0 = time.perf_counter()
    run(bench, quick=args.quick)
    md = bench.finish()
    print(f"{len(bench.rows)} rows in {time.perf_counter() - t0:.1f} s -> {bench.path}; summary {md}")
    print(md.read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
