"""Build script: installs ``freeatm_fast`` and ``freeatm_kernels`` (from the folder ``kernels/``) and,
when it can, the CUDA extension ``freeatm_kernels._C`` from ``csrc/``.

Environment:
  FREEATM_CUDA_EXT=auto|0|1   auto (default): build the extension when torch is importable here, is a
                              CUDA build, and a CUDA toolkit (nvcc) is found; 0: never; 1: always, and
                              fail loudly when it cannot.
  FREEATM_CUDA_ARCHS          e.g. "9.0" or "8.0;9.0" (default: TORCH_CUDA_ARCH_LIST, else "8.0;9.0").
  MAX_JOBS                    parallel compile jobs (read by torch.utils.cpp_extension / ninja).

Under pip's build isolation torch is not importable in the build environment, so ``pip install -e .``
skips the extension and says so; build it with ``FREEATM_CUDA_EXT=1 python setup.py build_ext --inplace``
(or ``pip install --no-build-isolation -e .``).
"""

from __future__ import annotations

import glob
import os
import shutil
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
PACKAGES = ["freeatm_fast", "freeatm_kernels"]


def _say(msg: str) -> None:
    print(f"[freeatm setup] {msg}", file=sys.stderr, flush=True)


def _cuda_extension_plan():
    """Return (ext_modules, cmdclass) for the CUDA extension, or ([], {}) with the reason printed."""
    mode = os.environ.get("FREEATM_CUDA_EXT", "auto").strip().lower()
    if mode not in ("auto", "0", "1"):
        raise SystemExit(f"FREEATM_CUDA_EXT must be auto, 0 or 1, got {mode!r}")
    if mode == "0":
        _say("FREEATM_CUDA_EXT=0: not building the CUDA extension freeatm_kernels._C")
        return [], {}

    def skip(reason: str):
        if mode == "1":
            raise SystemExit(f"FREEATM_CUDA_EXT=1 but the CUDA extension cannot be built: {reason}")
        _say(f"skipping the CUDA extension freeatm_kernels._C: {reason}")
        return [], {}

    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except Exception as exc:
        return skip(
            f"torch is not importable in this build environment ({type(exc).__name__}: {exc}); "
            "with pip's build isolation this is expected: run "
            "`FREEATM_CUDA_EXT=1 python setup.py build_ext --inplace` in an environment with torch"
        )
    if torch.version.cuda is None:
        return skip(f"torch {torch.__version__} is not a CUDA build")
    cuda_home = CUDA_HOME or os.environ.get("CUDA_HOME")
    if cuda_home is None or not os.path.exists(os.path.join(cuda_home, "bin", "nvcc")):
        nvcc = shutil.which("nvcc")
        if nvcc is None:
            return skip("no CUDA toolkit found (set CUDA_HOME or put nvcc on PATH)")
        cuda_home = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
        os.environ["CUDA_HOME"] = cuda_home

    archs = os.environ.get("FREEATM_CUDA_ARCHS") or os.environ.get("TORCH_CUDA_ARCH_LIST") or "8.0;9.0"
    os.environ["TORCH_CUDA_ARCH_LIST"] = archs
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "*.cu")))
    if not sources:
        return skip("csrc/ holds no sources")

    # torch's CUDA headers include cusparse.h etc.; with pip-installed CUDA wheels they live under
    # site-packages/nvidia/*/include rather than in the toolkit (TOOLCHAIN.md: the cu13 headers).
    include_dirs = [os.path.join(ROOT, "csrc")]
    site = os.path.dirname(os.path.dirname(torch.__file__))
    include_dirs += sorted(p for p in glob.glob(os.path.join(site, "nvidia", "*", "include")) if os.path.isdir(p))

    _say(f"building freeatm_kernels._C with CUDA_HOME={cuda_home}, archs {archs}, torch {torch.__version__}")
    ext = CUDAExtension(
        name="freeatm_kernels._C",
        sources=sources,
        include_dirs=include_dirs,
        extra_compile_args={
            "cxx": ["-O3", "-std=c++17"],
            "nvcc": ["-O3", "-std=c++17", "--use_fast_math", "-lineinfo", "--expt-relaxed-constexpr"],
        },
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)}


ext_modules, cmdclass = _cuda_extension_plan()

setup(
    packages=PACKAGES,
    package_dir={"freeatm_fast": "freeatm_fast", "freeatm_kernels": "kernels"},
    package_data={"freeatm_fast": ["configs/*.yaml"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
