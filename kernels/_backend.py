"""Backend discovery and dispatch shared by every op of ``freeatm_kernels``.

This is the one place that knows whether Triton imports, whether its kernels were decorated in
interpreter mode (``TRITON_INTERPRET=1``) and whether the CUDA extension ``freeatm_kernels._C`` is
built. Nothing here initialises CUDA: the extension is loaded lazily on first use, and
``torch.cuda`` is only queried through tensors the caller already placed on a device.
"""

from __future__ import annotations

import importlib
import os
from functools import lru_cache

import torch

BACKENDS = ("auto", "torch", "triton", "cuda")

# Triton decides at decoration time whether a ``@triton.jit`` function runs in the interpreter, so
# the flag must be read before any kernel module is imported. Every kernel module imports this one
# first.
TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

try:
    import triton  # noqa: F401
    import triton.language as tl  # noqa: F401

    HAS_TRITON = True
    TRITON_IMPORT_ERROR = ""
except Exception as exc:  # ImportError, or a broken install raising something else
    HAS_TRITON = False
    TRITON_IMPORT_ERROR = f"{type(exc).__name__}: {exc}"


@lru_cache(maxsize=1)
def load_extension():
    """Return the compiled module ``freeatm_kernels._C`` or ``None``; the reason is in :func:`extension_error`."""
    try:
        return importlib.import_module("freeatm_kernels._C")
    except Exception as exc:  # not built (ImportError) or built against another torch (OSError, RuntimeError)
        _EXT_ERROR[0] = f"{type(exc).__name__}: {exc}"
        return None


_EXT_ERROR = [""]


def extension_error() -> str:
    """Why :func:`load_extension` returned ``None`` (empty when it loaded)."""
    load_extension()
    return _EXT_ERROR[0]


def extension_has(op: str) -> bool:
    """True when the CUDA extension is built and registers ``torch.ops.freeatm_C.<op>``."""
    if load_extension() is None:
        return False
    return hasattr(torch.ops.freeatm_C, op)


def triton_usable_on(device: torch.device) -> tuple[bool, str]:
    """Whether the Triton kernels can run on tensors on ``device``, and why not."""
    if not HAS_TRITON:
        return False, f"triton does not import ({TRITON_IMPORT_ERROR})"
    if device.type == "cuda":
        if TRITON_INTERPRET:
            return False, "kernels were decorated with TRITON_INTERPRET=1, which runs on CPU tensors only"
        return True, ""
    if device.type == "cpu":
        if TRITON_INTERPRET:
            return True, ""
        return False, (
            "Triton runs on CPU tensors only in interpreter mode: set TRITON_INTERPRET=1 before "
            "importing freeatm_kernels"
        )
    return False, f"no Triton backend for device type {device.type!r}"


def resolve_backend(
    op: str, backend: str, device: torch.device, *, has_cuda_impl: bool, ext_ops: tuple[str, ...] | None = None
) -> str:
    """Turn ``backend`` into the concrete backend that will run ``op`` on ``device``.

    ``ext_ops`` names the ``torch.ops.freeatm_C`` ops the CUDA path needs (default: ``(op,)``; e.g.
    ``mask_pool`` needs ``mask_pool_forward`` and ``mask_pool_backward``). Call it at run time (inside the
    custom op), not while ``torch.compile`` traces: the first call may import the extension.

    ``auto``: the CUDA extension when it is built and has ``op`` and the tensors are on a GPU, else
    Triton on GPU tensors, else the torch reference. An explicit backend that cannot run raises
    ``ValueError`` saying why, never falls back silently.
    """
    if backend not in BACKENDS:
        raise ValueError(f"{op}: backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return "torch"
    ext_ops = ext_ops or (op,)
    if backend == "auto":
        if device.type == "cuda":
            if has_cuda_impl and all(extension_has(name) for name in ext_ops):
                return "cuda"
            if triton_usable_on(device)[0]:
                return "triton"
        return "torch"
    if backend == "triton":
        ok, why = triton_usable_on(device)
        if not ok:
            raise ValueError(f"{op}: backend='triton' cannot run on {device} tensors: {why}")
        return "triton"
    # backend == "cuda"
    if not has_cuda_impl:
        raise ValueError(f"{op}: there is no CUDA C++ implementation of this op; use 'triton' or 'torch'")
    if device.type != "cuda":
        raise ValueError(f"{op}: backend='cuda' needs CUDA tensors, got tensors on {device}")
    if not all(extension_has(name) for name in ext_ops):
        raise ValueError(
            f"{op}: backend='cuda' needs the extension freeatm_kernels._C: {extension_error() or 'op missing'}"
        )
    return "cuda"


def next_power_of_2(n: int) -> int:
    """Smallest power of two >= n (>= 1); Triton block shapes must be powers of two."""
    return 1 << max(0, (int(n) - 1).bit_length())
