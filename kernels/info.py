"""``python -m freeatm_kernels.info``: which backends of each op run on this machine, and why the others don't.

Exit status 0 always (it is a report, not a check); ``--json`` prints a machine-readable version.
"""

from __future__ import annotations

import argparse
import json
import platform

import torch

from . import _backend

# op name -> whether a CUDA C++ implementation exists in csrc/ (the rest are Triton-only).
OPS = {
    "cross_attention_with_maps": True,
    "mask_pool": True,
    "select_patches": False,
    "gather_tokens": False,
}
# the extension's op names for each public op (one public op may use several compiled ones)
EXT_OPS = {
    "cross_attention_with_maps": ("cross_attention_with_maps",),
    "mask_pool": ("mask_pool_forward", "mask_pool_backward"),
}


def report() -> dict:
    # torch.cuda.is_available() asks the driver for a device count without creating a CUDA context.
    has_gpu = torch.cuda.is_available()
    gpu = torch.cuda.get_device_name(0) if has_gpu else None
    ext = _backend.load_extension()
    ext_reason = "" if ext is not None else _backend.extension_error()
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if has_gpu else [])

    ops = {}
    for op, has_cuda_impl in OPS.items():
        rows = {}
        for dev in devices:
            backends = {"torch": "available (eager reference)"}
            ok, why = _backend.triton_usable_on(dev)
            mode = " (interpreter)" if (ok and dev.type == "cpu") else ""
            backends["triton"] = f"available{mode}" if ok else f"unavailable: {why}"
            if not has_cuda_impl:
                backends["cuda"] = "unavailable: no CUDA C++ implementation of this op (Triton covers it)"
            elif dev.type != "cuda":
                backends["cuda"] = "unavailable: the CUDA extension runs on CUDA tensors only"
            elif ext is None:
                backends["cuda"] = f"unavailable: extension not built or not loadable ({ext_reason})"
            elif not all(_backend.extension_has(name) for name in EXT_OPS[op]):
                backends["cuda"] = "unavailable: the built extension lacks this op (rebuild it)"
            else:
                backends["cuda"] = "available"
            auto = _backend.resolve_backend(op, "auto", dev, has_cuda_impl=has_cuda_impl)
            rows[dev.type] = {"auto": auto, "backends": backends}
        ops[op] = rows

    try:
        import triton

        triton_version = triton.__version__
    except Exception:
        triton_version = None
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": triton_version,
        "triton_interpret": _backend.TRITON_INTERPRET,
        "gpu": gpu,
        "cuda_extension": "loaded" if ext is not None else f"not loaded: {ext_reason}",
        "ops": ops,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m freeatm_kernels.info", description=__doc__)
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    args = parser.parse_args(argv)
    rep = report()
    if args.json:
        print(json.dumps(rep, indent=2))
        return 0
    print(
        f"freeatm_kernels on python {rep['python']}, torch {rep['torch']} (CUDA build: {rep['torch_cuda']}), "
        f"triton {rep['triton']}"
    )
    print(f"GPU: {rep['gpu'] or 'none visible to torch'}")
    print(f"TRITON_INTERPRET: {'on (Triton kernels run on CPU tensors)' if rep['triton_interpret'] else 'off'}")
    print(f"CUDA extension freeatm_kernels._C: {rep['cuda_extension']}")
    if rep["gpu"] is None:
        print("(no GPU here: only CPU tensors are listed; on a GPU, 'auto' picks the CUDA extension, else Triton)")
    for op, per_dev in rep["ops"].items():
        print(f"\n{op}")
        for dev, row in per_dev.items():
            print(f"  {dev} tensors: backend='auto' runs {row['auto']}")
            for name, state in row["backends"].items():
                print(f"    {name:<7} {state}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
