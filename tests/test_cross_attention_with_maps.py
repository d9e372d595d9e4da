"""cross_attention_with_maps: every backend against the eager reference (fp64 truth), odd shapes, all dtypes.

On a machine without a GPU the Triton kernel runs in the interpreter on CPU tensors (conftest sets TRITON_INTERPRET),
so shapes stay small; the ``cuda``-marked tests run the compiled kernel and the CUDA extension at SD shapes.
"""

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from freeatm_kernels import _backend, cross_attention_with_maps, cross_attention_with_maps_reference
from freeatm_kernels.cross_attention_with_maps import (
    _cross_attention_with_maps_op,
    _cross_attention_with_maps_torch,
    _cross_attention_with_maps_triton,
    _row_of_batch,
)

CPU = torch.device("cpu")
LOW_PRECISION = (torch.float16, torch.bfloat16)


def _triton_runs_on(device: torch.device) -> bool:
    return _backend.triton_usable_on(device)[0]


def _backend_device(backend: str, kernel_device: torch.device) -> torch.device:
    if backend == "triton" and not _triton_runs_on(kernel_device):
        pytest.fail(f"triton backend cannot run on {kernel_device}: {_backend.triton_usable_on(kernel_device)[1]}")
    return kernel_device


def _make_inputs(B, H, N, T, D, dtype, device, seed=0, qk_gain=1.5):
    """q, k, v in ``dtype`` on ``device``; qk_gain > 1 sharpens the softmax so that the maps are not near-uniform."""
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(B, H, N, D, generator=g) * qk_gain).to(dtype).to(device)
    k = (torch.randn(B, H, T, D, generator=g) * qk_gain).to(dtype).to(device)
    v = torch.randn(B, H, T, D, generator=g).to(dtype).to(device)
    return q, k, v


def _make_index(values, device):
    return None if values is None else torch.tensor(values, dtype=torch.int64, device=device)


def _initial_maps(n_rows, cols, N, device, seed=1):
    # maps that already hold values: the op must add, never overwrite
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n_rows, cols, N, generator=g) * 0.1).to(device)


def _truth(q, k, v, maps0, **kw):
    """fp64 reference on CPU: (out, maps after)."""
    rows, tokens = kw.pop("rows", None), kw.pop("tokens", None)
    m = maps0.double().cpu()
    out = cross_attention_with_maps_reference(
        q.double().cpu(),
        k.double().cpu(),
        v.double().cpu(),
        m,
        rows=None if rows is None else rows.cpu(),
        tokens=None if tokens is None else tokens.cpu(),
        **kw,
    )
    return out, m


def _assert_fp32_close(actual, expected, what):
    actual = actual.double().cpu()
    atol = 1e-5 * expected.abs().max().item()
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=atol, msg=lambda m: f"{what}: {m}")


def _assert_within_twice_eager(got, eager, truth, what, floor):
    """fp16/bf16 rule: max error vs the fp64 truth <= 2x the eager reference's in the same dtype, plus a tiny floor."""
    err = (got.double().cpu() - truth).abs().max().item()
    err_eager = (eager.double().cpu() - truth).abs().max().item()
    assert err <= 2 * err_eager + floor, f"{what}: error {err:.3g} > 2 x eager error {err_eager:.3g} + {floor:g}"


# (B, H, N, T, D, rows, tokens, weight): N in {1, 77, 130, 333, 1000}, T in {1, 20, 77, 200},
# D in {20, 40, 64, 80, 160}; rows: all / the CFG second half / permuted / a subset in any order; tokens: none / K=1 /
# K=3, 5 and 9 with repeats, unsorted ids and the last id T-1.
CASES = {
    "single_query_single_token": (1, 1, 1, 1, 40, None, None, 1.0),
    "cfg_second_half": (2, 3, 77, 77, 64, [1], None, 0.5),
    "n333_t200_k9_repeats": (3, 2, 333, 200, 80, None, [[3, 150, 3, 0, 199, 7, 7, 42, 1]] * 3, 2.5),
    "d160_h8_permuted_rows_k1": (2, 8, 77, 77, 160, [1, 0], [[76], [0]], 0.25),
    "subset_rows_unsorted_tokens": (3, 1, 130, 200, 40, [2, 0], [[7, 3, 3, 150, 0], [199, 0, 1, 1, 50]], -1.5),
    "n1000_all_tokens": (1, 3, 1000, 77, 64, None, None, 1.0),
    "d20_t20_n130": (2, 2, 130, 20, 20, [0], [[19, 0, 7]], 0.75),  # D not a multiple of 8; 128-query blocks
}


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("case", list(CASES))
def test_fp32_matches_fp64_reference(case, backend, kernel_device):
    B, H, N, T, D, rows, tokens, weight = CASES[case]
    device = _backend_device(backend, kernel_device)
    q, k, v = _make_inputs(B, H, N, T, D, torch.float32, device)
    rows_t, tokens_t = _make_index(rows, device), _make_index(tokens, device)
    n_rows = B if rows is None else len(rows)
    maps = _initial_maps(n_rows, T if tokens is None else len(tokens[0]), N, device)
    out_ref, maps_ref = _truth(q, k, v, maps, rows=rows_t, tokens=tokens_t, weight=weight)

    out = cross_attention_with_maps(q, k, v, maps, rows=rows_t, tokens=tokens_t, weight=weight, backend=backend)

    assert out.shape == (B, H, N, D) and out.dtype == torch.float32 and out.device == q.device
    _assert_fp32_close(out, out_ref, "out")
    _assert_fp32_close(maps, maps_ref, "maps")


def test_reference_output_is_sdpa():
    q, k, v = _make_inputs(2, 3, 77, 77, 40, torch.float64, CPU)
    maps = torch.zeros(2, 77, 77, dtype=torch.float64)
    out = cross_attention_with_maps_reference(q, k, v, maps, scale=0.3)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, scale=0.3), rtol=1e-12, atol=1e-12)
    # the maps are the head mean of a softmax over T: each query's column sums to 1
    torch.testing.assert_close(maps.sum(1), torch.ones(2, 77, dtype=torch.float64), rtol=1e-12, atol=1e-12)


# fp16/bf16: error against the fp64 truth <= 2x the eager reference's error in the same dtype (+ a tiny floor).
LOW_CASES = {
    "cfg_k9": (2, 2, 77, 77, 40, [1], [[5, 3, 3, 70, 0, 76, 11, 12, 13]], 1.0),
    "odd_all_tokens": (1, 3, 130, 200, 80, None, None, 0.5),
}


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=["fp16", "bf16"])
@pytest.mark.parametrize("case", list(LOW_CASES))
def test_low_precision_error_within_twice_eager(case, dtype, backend, kernel_device):
    B, H, N, T, D, rows, tokens, weight = LOW_CASES[case]
    device = _backend_device(backend, kernel_device)
    q, k, v = _make_inputs(B, H, N, T, D, dtype, device)
    rows_t, tokens_t = _make_index(rows, device), _make_index(tokens, device)
    maps0 = _initial_maps(B if rows is None else len(rows), T if tokens is None else len(tokens[0]), N, device)
    out_64, maps_64 = _truth(q, k, v, maps0, rows=rows_t, tokens=tokens_t, weight=weight)

    maps_eager = maps0.clone()
    out_eager = cross_attention_with_maps_reference(q, k, v, maps_eager, rows=rows_t, tokens=tokens_t, weight=weight)
    maps = maps0.clone()
    out = cross_attention_with_maps(q, k, v, maps, rows=rows_t, tokens=tokens_t, weight=weight, backend=backend)

    assert out.dtype == dtype and out.shape == q.shape
    _assert_within_twice_eager(out, out_eager, out_64, "out", floor=1e-6)
    _assert_within_twice_eager(maps, maps_eager, maps_64, "maps", floor=1e-7)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_strided_views_like_diffusers(backend, kernel_device):
    """diffusers hands over q = x.view(B, N, H, D).transpose(1, 2); also a last dim that is not contiguous."""
    device = _backend_device(backend, kernel_device)
    B, H, N, T, D = 2, 3, 77, 77, 40
    g = torch.Generator().manual_seed(3)
    q = torch.randn(B, N, H * D, generator=g).to(device).view(B, N, H, D).transpose(1, 2)
    k = torch.randn(B, T, H * D, generator=g).to(device).view(B, T, H, D).transpose(1, 2)
    v = torch.randn(B, H, T, 2 * D, generator=g).to(device)[..., ::2]  # stride 2 along D
    assert not q.is_contiguous() and not k.is_contiguous() and v.stride(-1) == 2
    rows, tokens = _make_index([1], device), _make_index([[4, 2, 9]], device)
    maps = _initial_maps(1, 3, N, device)
    out_ref, maps_ref = _truth(q, k, v, maps, rows=rows, tokens=tokens, weight=0.5)

    out = cross_attention_with_maps(q, k, v, maps, rows=rows, tokens=tokens, weight=0.5, backend=backend)

    assert out.is_contiguous()
    _assert_fp32_close(out, out_ref, "out")
    _assert_fp32_close(maps, maps_ref, "maps")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_two_calls_accumulate_twice(backend, kernel_device):
    device = _backend_device(backend, kernel_device)
    q, k, v = _make_inputs(2, 2, 77, 77, 64, torch.float32, device)
    maps = _initial_maps(2, 77, 77, device)
    maps0 = maps.double().cpu()
    out1 = cross_attention_with_maps(q, k, v, maps, weight=0.5, backend=backend)
    out2 = cross_attention_with_maps(q, k, v, maps, weight=0.5, backend=backend)
    out_ref, maps_ref = _truth(q, k, v, maps0, weight=1.0)  # two times 0.5 == once 1.0

    torch.testing.assert_close(out1, out2, rtol=0, atol=0)  # deterministic: no atomics
    _assert_fp32_close(out1, out_ref, "out")
    _assert_fp32_close(maps, maps_ref, "maps")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_rows_edge_cases(backend, kernel_device):
    """An out-of-range row leaves its map row untouched (documented); an empty ``rows`` accumulates nothing."""
    device = _backend_device(backend, kernel_device)
    q, k, v = _make_inputs(2, 2, 33, 20, 40, torch.float32, device)
    maps = _initial_maps(2, 20, 33, device)
    before = maps.clone()
    out_ref, maps_ref = _truth(q, k, v, maps[1:], rows=_make_index([0], device))
    out = cross_attention_with_maps(q, k, v, maps, rows=_make_index([5, 0], device), backend=backend)
    torch.testing.assert_close(maps[0], before[0], rtol=0, atol=0)
    _assert_fp32_close(maps[1:], maps_ref, "maps")
    _assert_fp32_close(out, out_ref, "out")

    empty = torch.zeros(0, 20, 33, device=device)
    out = cross_attention_with_maps(q, k, v, empty, rows=_make_index([], device), backend=backend)
    _assert_fp32_close(out, out_ref, "out")


class _AllocationRecorder(TorchDispatchMode):
    """Largest tensor (in bytes) produced by any aten op run under this mode (views included: conservative)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel() * t.element_size())
        return out


def test_triton_path_never_materialises_probabilities(kernel_device):
    """No tensor as big as the fp32 [B, H, N, T] probabilities is created on the Triton path (the interpreter's byte
    views of the inputs included); the same recorder does see the reference's."""
    device = _backend_device("triton", kernel_device)
    B, H, N, T, D = 2, 4, 64, 200, 16  # probabilities 4*B*H*N*T = 409600 bytes, inputs/out/maps <= 102400 bytes
    q, k, v = _make_inputs(B, H, N, T, D, torch.float32, device)
    maps = torch.zeros(B, T, N, device=device)
    probs = 4 * B * H * N * T

    with _AllocationRecorder() as rec:
        row_of_batch = _row_of_batch(None, B, device)
        out = _cross_attention_with_maps_triton(q, k, v, maps, row_of_batch, None, D**-0.5, 1.0)
    assert rec.largest < probs, f"triton path created a {rec.largest}-byte tensor (probabilities: {probs})"

    maps_ref = torch.zeros_like(maps)
    with _AllocationRecorder() as rec_ref:
        out_ref = _cross_attention_with_maps_torch(q, k, v, maps_ref, row_of_batch, None, D**-0.5, 1.0)
    assert rec_ref.largest >= probs  # the recorder does see a materialised [B, H, N, T]
    torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(maps, maps_ref, rtol=1e-5, atol=1e-6)


def _good_args(device=CPU):
    q, k, v = _make_inputs(2, 2, 9, 7, 16, torch.float32, device)
    return dict(q=q, k=k, v=v, maps=torch.zeros(1, 3, 9, device=device), rows=_make_index([1], device),
                tokens=_make_index([[0, 6, 2]], device))  # fmt: skip


BAD_INPUTS = {
    "q_3d": (lambda a: a.update(q=a["q"][0]), r"q must be 4-D .*\(2, 9, 16\)"),
    "dtype_mismatch": (lambda a: a.update(k=a["k"].half()), "share one dtype"),
    "float64": (lambda a: a.update(q=a["q"].double(), k=a["k"].double(), v=a["v"].double()), "float16, bfloat16"),
    "head_dim_mismatch": (
        lambda a: a.update(k=a["k"][..., :8], v=a["v"][..., :8]),
        r"k and v of shape .*\(2, 2, 7, 8\)",
    ),
    "k_v_len_mismatch": (lambda a: a.update(v=a["v"][:, :, :5]), r"got k \(2, 2, 7, 16\), v \(2, 2, 5, 16\)"),
    "t_too_long": (
        lambda a: a.update(k=torch.zeros(2, 2, 257, 16), v=torch.zeros(2, 2, 257, 16), maps=torch.zeros(1, 3, 9)),
        r"T must be in \[1, 256\], got T=257",
    ),
    "d_too_big": (
        lambda a: a.update(q=torch.zeros(2, 2, 9, 264), k=torch.zeros(2, 2, 7, 264), v=torch.zeros(2, 2, 7, 264)),
        "D must be <= 256, got D=264",
    ),
    "maps_fp16": (lambda a: a.update(maps=a["maps"].half()), "maps must be a contiguous float32"),
    "maps_not_contiguous": (lambda a: a.update(maps=torch.zeros(1, 9, 3).transpose(1, 2)), "contiguous=False"),
    "maps_wrong_cols": (lambda a: a.update(maps=torch.zeros(1, 4, 9)), r"\[B', K, N\] = \[1, 3, 9\], got \(1, 4, 9\)"),
    "maps_without_tokens_wrong_t": (lambda a: a.update(tokens=None), r"\[B', T, N\] = \[1, 7, 9\], got \(1, 3, 9\)"),
    "maps_2d": (lambda a: a.update(maps=torch.zeros(3, 9)), r"maps must be a 3-D .*\(3, 9\)"),
    "rows_int32": (lambda a: a.update(rows=a["rows"].int()), r"rows must be a 1-D int64 tensor, got torch.int32"),
    "rows_2d": (lambda a: a.update(rows=a["rows"][None]), r"rows must be a 1-D int64 tensor.*\(1, 1\)"),
    "tokens_rows_mismatch": (lambda a: a.update(tokens=_make_index([[0], [1]], CPU)), r"B'=1 map rows.*\(2, 1\)"),
    "tokens_too_many": (lambda a: a.update(tokens=torch.zeros(1, 8, dtype=torch.int64)), r"1 <= K <= T=7.*\(1, 8\)"),
    "tokens_1d": (lambda a: a.update(tokens=a["tokens"][0]), "tokens must be a 2-D int64"),
}


@pytest.mark.parametrize("bad", list(BAD_INPUTS))
def test_bad_inputs_raise_with_the_shapes_seen(bad):
    mutate, match = BAD_INPUTS[bad]
    args = _good_args()
    mutate(args)
    with pytest.raises(ValueError, match=match):
        cross_attention_with_maps(**args, backend="torch")


def test_bad_backend_and_grad_mode():
    args = _good_args()
    with pytest.raises(ValueError, match="'tritonn'"):
        cross_attention_with_maps(**args, backend="tritonn")
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        cross_attention_with_maps(**args, backend="cuda")
    args["q"].requires_grad_(True)
    with pytest.raises(ValueError, match="inference only"):
        cross_attention_with_maps(**args, backend="torch")
    with torch.no_grad():
        cross_attention_with_maps(**args, backend="torch")


def test_triton_launcher_validates_row_of_batch(kernel_device):
    device = _backend_device("triton", kernel_device)
    a = _good_args(device)
    with pytest.raises(ValueError, match=r"row_of_batch must be \[B\] = \[2\], got \(3,\)"):
        _cross_attention_with_maps_triton(
            a["q"], a["k"], a["v"], a["maps"], torch.zeros(3, dtype=torch.int64, device=device), a["tokens"], 0.25, 1.0
        )


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("with_tokens", [False, True], ids=["all_tokens", "tokens"])
def test_opcheck(backend, with_tokens, kernel_device):
    device = CPU if backend == "torch" else _backend_device(backend, kernel_device)
    q, k, v = _make_inputs(3, 2, 21, 13, 40, torch.float32, device)
    tokens = _make_index([[12, 0, 5], [5, 5, 1]], device) if with_tokens else None
    maps = torch.rand(2, 3 if with_tokens else 13, 21, device=device)
    row_of_batch = _row_of_batch(_make_index([2, 0], device), 3, device)
    torch.library.opcheck(_cross_attention_with_maps_op, (q, k, v, maps, row_of_batch, tokens, 0.3, 0.7, backend))


@pytest.mark.parametrize("backend", ["auto", "torch", "triton"])
def test_torch_compile_fullgraph(backend, kernel_device):
    device = CPU if backend == "torch" else _backend_device("triton", kernel_device)
    q, k, v = _make_inputs(2, 2, 33, 20, 40, torch.float32, device)
    rows, tokens = _make_index([1], device), _make_index([[3, 19]], device)

    def step(q, k, v, maps):
        return cross_attention_with_maps(q, k, v, maps, rows=rows, tokens=tokens, weight=0.5, backend=backend) * 2

    maps = torch.zeros(1, 2, 33, device=device)
    out = torch.compile(step, fullgraph=True, backend="aot_eager")(q, k, v, maps)
    out_ref, maps_ref = _truth(q, k, v, torch.zeros(1, 2, 33), rows=rows, tokens=tokens, weight=0.5)
    _assert_fp32_close(out, 2 * out_ref, "out")
    _assert_fp32_close(maps, maps_ref, "maps")


# ----------------------------------------------------------------------------------------------------------------------
# GPU only
# ----------------------------------------------------------------------------------------------------------------------

GPU_CASES = {
    "cfg_all_tokens": (4, 8, 1000, 77, 40, [2, 3], None),
    "k8_tokens": (2, 8, 257, 77, 160, [1], [[5, 3, 3, 70, 0, 76, 11, 12]]),
    "t200_d80": (3, 2, 130, 200, 80, None, [[199, 0, 1]] * 3),
}


def _check_gpu_backend(backend, case, dtype):
    B, H, N, T, D, rows, tokens = GPU_CASES[case]
    dev = torch.device("cuda")
    q, k, v = _make_inputs(B, H, N, T, D, dtype, dev)
    rows_t, tokens_t = _make_index(rows, dev), _make_index(tokens, dev)
    maps0 = _initial_maps(B if rows is None else len(rows), T if tokens is None else len(tokens[0]), N, dev)
    out_64, maps_64 = _truth(q, k, v, maps0, rows=rows_t, tokens=tokens_t, weight=0.5)
    maps = maps0.clone()
    out = cross_attention_with_maps(q, k, v, maps, rows=rows_t, tokens=tokens_t, weight=0.5, backend=backend)
    if dtype == torch.float32:
        _assert_fp32_close(out, out_64, "out")
        _assert_fp32_close(maps, maps_64, "maps")
        return
    maps_eager = maps0.clone()
    out_eager = cross_attention_with_maps_reference(q, k, v, maps_eager, rows=rows_t, tokens=tokens_t, weight=0.5)
    _assert_within_twice_eager(out, out_eager, out_64, "out", floor=1e-6)
    _assert_within_twice_eager(maps, maps_eager, maps_64, "maps", floor=1e-7)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, *LOW_PRECISION], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("case", list(GPU_CASES))
def test_cuda_extension_matches_reference(case, dtype):
    if not _backend.extension_has("cross_attention_with_maps"):
        pytest.skip(f"CUDA extension not built: {_backend.extension_error() or 'op missing'}")
    _check_gpu_backend("cuda", case, dtype)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, *LOW_PRECISION], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("case", list(GPU_CASES))
def test_compiled_triton_matches_reference(case, dtype):
    _check_gpu_backend("triton", case, dtype)


@pytest.mark.cuda
@pytest.mark.parametrize("D", [40, 160])
@pytest.mark.parametrize("tokens", [None, [[1, 2, 3, 4, 5, 6, 7, 8]] * 2], ids=["all_tokens", "k8"])
def test_compiled_triton_sd_shape_fp16(D, tokens):
    """SD1.5 at 512^2 with CFG: B=4 (rows 2, 3 conditional), H=8, N=4096 queries, T=77 CLIP tokens, fp16."""
    B, H, N, T = 4, 8, 4096, 77
    dev = torch.device("cuda")
    q, k, v = _make_inputs(B, H, N, T, D, torch.float16, dev)
    rows, tokens_t = _make_index([2, 3], dev), _make_index(tokens, dev)
    maps0 = _initial_maps(2, T if tokens is None else 8, N, dev)
    out_64, maps_64 = _truth(q, k, v, maps0, rows=rows, tokens=tokens_t, weight=1 / 16)
    maps_eager = maps0.clone()
    out_eager = cross_attention_with_maps_reference(q, k, v, maps_eager, rows=rows, tokens=tokens_t, weight=1 / 16)
    maps = maps0.clone()
    out = cross_attention_with_maps(q, k, v, maps, rows=rows, tokens=tokens_t, weight=1 / 16, backend="triton")
    out_sdpa = F.scaled_dot_product_attention(q, k, v)
    _assert_within_twice_eager(out, out_eager, out_64, "out", floor=1e-6)
    _assert_within_twice_eager(maps, maps_eager, maps_64, "maps", floor=1e-7)
    err_sdpa = (out_sdpa.double().cpu() - out_64).abs().max().item()
    assert (out.double().cpu() - out_64).abs().max().item() <= 2 * err_sdpa + 1e-6
