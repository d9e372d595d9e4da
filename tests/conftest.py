"""Test set-up: run the Triton kernels in the interpreter on machines without a GPU.

Triton decides at decoration time whether a kernel is interpreted, so TRITON_INTERPRET must be set
before freeatm_kernels is imported, and only where no GPU exists (on a GPU the same tests run the
compiled kernels on CUDA tensors).
"""

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import freeatm_kernels  # noqa: E402,F401  (imported after the flag on purpose)

# The device the Triton tests run on: CUDA when present, else CPU tensors under the interpreter.
KERNEL_DEVICE = torch.device("cuda") if HAS_CUDA else torch.device("cpu")


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (marker 'cuda'); none on this machine")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def kernel_device():
    return KERNEL_DEVICE


# Variables an in-process engine run leaves in os.environ (engine.setup_distributed sets them for a single
# process); a subprocess launched afterwards must not inherit them, or it joins / re-binds the parent's
# rendezvous port (EADDRINUSE).
_LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


_USER_CACHE = os.environ.get("FREEATM_CACHE")  # before any toy_cache fixture points it at a temporary folder


@pytest.fixture
def clean_env():
    """os.environ for a subprocess, without the launcher variables of an earlier in-process run, and with the
    user's FREEATM_CACHE (the default toy world is built once there, not in a module's temporary cache)."""
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCH_VARS and k != "FREEATM_CACHE"}
    if _USER_CACHE is not None:
        env["FREEATM_CACHE"] = _USER_CACHE
    return env


@pytest.fixture(scope="module")
def toy_cache(tmp_path_factory):
    """FREEATM_CACHE pointed at a fresh folder for one test module (tiny toy worlds are built there)."""
    cache = tmp_path_factory.mktemp("cache")
    old = os.environ.get("FREEATM_CACHE")
    os.environ["FREEATM_CACHE"] = str(cache)
    yield cache
    if old is None:
        os.environ.pop("FREEATM_CACHE", None)
    else:
        os.environ["FREEATM_CACHE"] = old
