"""Build script: installs ``freeatm_fast`` and ``freeatm_kernels`` (from the folder ``kernels/``) and,
when it can, the CUDA extension ``freeatm_kernels._C`` from ``csrc/``.

Environment:
  FREEATM_CUDA_EXT=auto|0|1   auto (default): build the extension when torch is importable here, is a
                              CUDA build, and a CUDA toolkit (nvcc) is found; 0: never; 1: always, and
                              fail loudly when it cannot.
  FREEATM_CUDA_ARCHS          e.g. "9.0" or "8.0;9.0" (default: TORCH_CUDA_ARCH_LIST, else "8.0;9.0+PTX").
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

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
# freeatm_fast and every sub-package of it; kernels/ installs as freeatm_kernels.
PACKAGES = find_packages(include=["freeatm_fast", "freeatm_fast.*"]) + ["freeatm_kernels"]


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

    # torch.utils.cpp_extension fixes CUDA_HOME at import. A wrapper nvcc on PATH (e.g. /usr/local/bin/nvcc) makes
    # it guess /usr/local, which has no CUDA headers, so pick a root that really holds the toolkit first.
    if not os.environ.get("CUDA_HOME"):
        nvcc = shutil.which("nvcc")
        candidates = ["/usr/local/cuda"] + ([os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))] if nvcc else [])
        for root in candidates:
            if os.path.exists(os.path.join(root, "include", "cuda_runtime_api.h")):
                os.environ["CUDA_HOME"] = root
                break
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
    if cuda_home is None or not os.path.exists(os.path.join(cuda_home, "include", "cuda_runtime_api.h")):
        return skip(f"no CUDA toolkit found (CUDA_HOME={cuda_home!r} has no include/cuda_runtime_api.h; set CUDA_HOME)")

    archs = os.environ.get("FREEATM_CUDA_ARCHS") or os.environ.get("TORCH_CUDA_ARCH_LIST") or "8.0;9.0+PTX"
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
            # no -std flag: torch's extension builder adds the one its headers need (C++20 for torch 2.14)
            "cxx": ["-O3"],
            "nvcc": ["-O3", "--use_fast_math", "-lineinfo", "--expt-relaxed-constexpr"],
        },
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)}


ext_modules, cmdclass = _cuda_extension_plan()

setup(
    packages=PACKAGES,
    package_dir={"freeatm_fast": "freeatm_fast", "freeatm_kernels": "kernels"},
    package_data={
        "freeatm_fast": ["configs/*.yaml"],
        "freeatm_fast.generate": ["data/*.txt"],
        "freeatm_fast.toy": ["weights/*.json", "weights/*.safetensors"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
