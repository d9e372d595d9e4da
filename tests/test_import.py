"""Importing the packages initialises no CUDA and needs no GPU-only package (DESIGN §2)."""

import json
import os
import subprocess
import sys
import textwrap

# Runs in a fresh interpreter: the test process already imported the packages (conftest.py).
# GPU-only packages are made unimportable, and torch.cuda's lazy initialiser is replaced by a
# recorder, so that any import-time CUDA initialisation or GPU-only import is caught even here.
PROBE = textwrap.dedent(
    """
    import importlib.abc, json, sys
    BLOCKED = ("nvidia.dali", "xformers", "freeatm_kernels._C")

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if any(name == b or name.startswith(b + ".") for b in BLOCKED):
                raise ImportError(f"blocked GPU-only module {name}")
            return None

    sys.meta_path.insert(0, Block())
    import torch
    calls = []
    torch.cuda._lazy_init = lambda *a, **k: calls.append("torch.cuda._lazy_init")
    import freeatm_kernels, freeatm_fast, freeatm_fast.cli, freeatm_kernels.info
    loaded = sorted(m for m in sys.modules if any(m == b or m.startswith(b + ".") for b in BLOCKED))
    print(json.dumps({"cuda_init_calls": calls, "gpu_only_loaded": loaded,
                      "cuda_initialized": torch.cuda.is_initialized()}))
    """
)


def _run(code: str, **env_extra) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(env_extra)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)


def test_import_initialises_no_cuda_and_loads_no_gpu_only_module():
    proc = _run(PROBE)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result == {"cuda_init_calls": [], "gpu_only_loaded": [], "cuda_initialized": False}


def test_info_reports_without_the_extension():
    code = PROBE + "\nfrom freeatm_kernels.info import report\nprint(json.dumps(report()))\n"
    proc = _run(code)
    assert proc.returncode == 0, proc.stderr
    rep = json.loads(proc.stdout.strip().splitlines()[-1])
    assert rep["cuda_extension"].startswith("not loaded: ImportError: blocked GPU-only module")
    assert set(rep["ops"]) == {"cross_attention_with_maps", "mask_pool", "select_patches", "gather_tokens"}
    for per_dev in rep["ops"].values():
        assert per_dev["cpu"]["auto"] == "torch"
        assert per_dev["cpu"]["backends"]["torch"].startswith("available")


def test_info_command_line():
    proc = subprocess.run([sys.executable, "-m", "freeatm_kernels.info"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    for op in ("cross_attention_with_maps", "mask_pool", "select_patches", "gather_tokens"):
        assert op in proc.stdout
    assert "CUDA extension freeatm_kernels._C:" in proc.stdout


def test_folder_imported_as_kernels_is_the_same_package():
    # From the repository root the folder kernels/ is also importable as "kernels" (transformers probes that name
    # for the Hugging Face kernels package). It must hand out freeatm_kernels itself: running the op modules twice
    # re-registers the freeatm:: custom ops and leaves dangling op handles (random "vector::reserve" errors).
    code = textwrap.dedent(
        """
        import importlib, sys, torch
        import freeatm_kernels
        alias = importlib.import_module("kernels")
        assert alias is freeatm_kernels, alias
        assert not [m for m in sys.modules if m.startswith("kernels.")], sorted(sys.modules)
        q = torch.randn(2, 2, 5, 8); k = v = torch.randn(2, 2, 3, 8); maps = torch.zeros(2, 3, 5)
        out = freeatm_kernels.cross_attention_with_maps(q, k, v, maps, backend="torch")
        torch.testing.assert_close(out, torch.nn.functional.scaled_dot_product_attention(q, k, v))
        print("ok")
        """
    )
    repo_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=repo_root, timeout=300
    )
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr
