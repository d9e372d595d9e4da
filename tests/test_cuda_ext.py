"""Tests of the CUDA extension ``freeatm_kernels._C`` (csrc/): torch.ops.freeatm_C.{cross_attention_with_maps,
mask_pool_forward, mask_pool_backward}.

Unmarked tests run wherever the extension is built (it imports on a machine without a GPU): the op schemas agreed
with the Python side, the Meta kernels (shapes, dtypes, layouts, argument checks: what FakeTensor and torch.compile
trace with), and the clear error for CPU tensors. Tests marked ``cuda`` run the kernels on a GPU and compare them
with the eager references ``cross_attention_with_maps_reference`` / ``mask_pool_reference`` (fp64 truth, per-dtype
tolerance rule of DESIGN.md §3), forward and backward, plus ``torch.library.opcheck`` and bitwise determinism.
"""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from freeatm_kernels import _backend, cross_attention_with_maps_reference, mask_pool_reference

SCHEMAS = {
    "cross_attention_with_maps": (
        "freeatm_C::cross_attention_with_maps(Tensor q, Tensor k, Tensor v, Tensor(a!) maps, Tensor row_of_batch, "
        "Tensor? tokens, float scale, float weight) -> Tensor"
    ),
    "mask_pool_forward": (
        "freeatm_C::mask_pool_forward(Tensor features, Tensor masks, float eps) -> (Tensor pooled, Tensor mass)"
    ),
    "mask_pool_backward": (
        "freeatm_C::mask_pool_backward(Tensor grad_pooled, Tensor features, Tensor masks, float eps) "
        "-> Tensor grad_features"
    ),
}
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MASK_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.uint8, torch.bool)


@pytest.fixture(scope="module")
def ext():
    module = _backend.load_extension()
    if module is None:
        pytest.skip(
            f"freeatm_kernels._C is not built here ({_backend.extension_error()}); build it with "
            "`FREEATM_CUDA_EXT=1 python setup.py build_ext --inplace`"
        )
    return module


def _ops():
    return torch.ops.freeatm_C


# ----------------------------------------------------------------------------------------------------------------
# Registration, Meta kernels, CPU errors (no GPU needed)
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_op_registered_with_agreed_schema(ext, name):
    assert str(getattr(_ops(), name).default._schema) == SCHEMAS[name]


def test_info_names_the_ops(ext):
    text = ext.info()
    for name in SCHEMAS:
        assert name in text


def _attention_args(B, H, N, T, D, dtype, device, *, tokens_k=None, map_rows=None):
    """Tensors for cross_attention_with_maps; map_rows (default B) map rows, the last batch rows not accumulating."""
    q = torch.empty(B, H, N, D, dtype=dtype, device=device)
    k = torch.empty(B, H, T, D, dtype=dtype, device=device)
    v = torch.empty(B, H, T, D, dtype=dtype, device=device)
    map_rows = B if map_rows is None else map_rows
    tokens = None if tokens_k is None else torch.zeros(map_rows, tokens_k, dtype=torch.int64, device=device)
    maps = torch.empty(map_rows, T if tokens_k is None else tokens_k, N, dtype=torch.float32, device=device)
    row_of_batch = torch.empty(B, dtype=torch.int64, device=device)
    return q, k, v, maps, row_of_batch, tokens


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("tokens_k", [None, 3])
def test_cross_attention_meta_shapes(ext, dtype, tokens_k):
    q, k, v, maps, rows, tokens = _attention_args(2, 3, 77, 5, 40, dtype, "meta", tokens_k=tokens_k, map_rows=1)
    out = _ops().cross_attention_with_maps(q, k, v, maps, rows, tokens, 0.125, 1.0)
    assert out.device.type == "meta"
    assert out.shape == (2, 3, 77, 40) and out.dtype == dtype and out.is_contiguous()


def test_cross_attention_meta_accepts_strided_views(ext):
    # q as a permuted [B, N, H, D] buffer (the layout a UNet's attention produces): only stride(-1) == 1 is required
    q = torch.empty(2, 77, 3, 40, dtype=torch.float16, device="meta").permute(0, 2, 1, 3)
    _, k, v, maps, rows, _ = _attention_args(2, 3, 77, 5, 40, torch.float16, "meta")
    out = _ops().cross_attention_with_maps(q, k, v, maps, rows, None, 0.125, 1.0)
    assert out.shape == (2, 3, 77, 40) and out.is_contiguous()


def _bad_attention_cases():
    """(id, mutate(args) -> args, message fragment) for arguments the binding must reject."""

    def replace(i, t):
        return lambda a: a[:i] + (t,) + a[i + 1 :]

    m = "meta"
    return [
        ("q_3d", replace(0, torch.empty(2, 77, 40, device=m)), "4-D"),
        ("dtype_mismatch", replace(1, torch.empty(2, 3, 5, 40, dtype=torch.float32, device=m)), "one dtype"),
        ("q_float64", lambda a: tuple(x.double() if i < 3 else x for i, x in enumerate(a)), "float32, float16"),
        ("k_v_shapes", replace(2, torch.empty(2, 3, 6, 40, dtype=torch.float16, device=m)), "k and v"),
        ("t_too_big", lambda a: _attention_args(2, 3, 7, 257, 40, torch.float16, m), "T <= 256"),
        ("d_too_big", lambda a: _attention_args(2, 3, 7, 5, 264, torch.float16, m), "D <= 256"),
        (
            "last_dim_strided",
            replace(0, torch.empty(2, 3, 77, 80, dtype=torch.float16, device=m)[..., ::2]),
            "stride 1",
        ),
        ("maps_float16", replace(3, torch.empty(2, 5, 77, dtype=torch.float16, device=m)), "maps must be float32"),
        ("maps_wrong_n", replace(3, torch.empty(2, 5, 76, device=m)), "N = 77"),
        ("maps_not_contiguous", replace(3, torch.empty(2, 77, 5, device=m).transpose(1, 2)), "contiguous"),
        ("maps_wrong_t", replace(3, torch.empty(2, 4, 77, device=m)), "without tokens"),
        ("rows_wrong_size", replace(4, torch.empty(3, dtype=torch.int64, device=m)), "row_of_batch"),
        ("rows_int32", replace(4, torch.empty(2, dtype=torch.int32, device=m)), "row_of_batch"),
        ("tokens_wrong_k", replace(5, torch.empty(2, 4, dtype=torch.int64, device=m)), "tokens"),
    ]


@pytest.mark.parametrize("case", _bad_attention_cases(), ids=lambda c: c[0])
def test_cross_attention_rejects_bad_arguments(ext, case):
    _, mutate, fragment = case
    args = _attention_args(2, 3, 77, 5, 40, torch.float16, "meta")
    if case[0] == "tokens_wrong_k":  # maps [B', K=3, N] with tokens [B', 4]
        args = _attention_args(2, 3, 77, 5, 40, torch.float16, "meta", tokens_k=3)
    with pytest.raises(RuntimeError, match=fragment):
        _ops().cross_attention_with_maps(*mutate(args), 0.125, 1.0)


@pytest.mark.parametrize("mask_dtype", MASK_DTYPES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_mask_pool_meta_shapes(ext, mask_dtype, layout):
    features = torch.empty(2, 6, 4, 3, dtype=torch.bfloat16, device="meta")
    if layout == "channels_last":
        features = features.contiguous(memory_format=torch.channels_last)
    masks = torch.empty(2, 5, 8, 12, dtype=mask_dtype, device="meta")
    pooled, mass = _ops().mask_pool_forward(features, masks, 1e-6)
    assert pooled.shape == (2, 5, 6) and pooled.dtype == torch.bfloat16 and pooled.is_contiguous()
    assert mass.shape == (2, 5) and mass.dtype == torch.float32
    grad = _ops().mask_pool_backward(torch.empty(2, 5, 6, device="meta"), features, masks, 1e-6)
    assert grad.shape == features.shape and grad.dtype == features.dtype and grad.stride() == features.stride()


@pytest.mark.parametrize(
    "features_shape, masks_shape, features_dtype, masks_dtype, fragment",
    [
        ((2, 6, 4, 4), (2, 3, 10, 8), torch.float32, torch.float32, "integer multiple"),
        ((2, 6, 4, 4), (2, 3, 2, 8), torch.float32, torch.float32, "integer multiple"),
        ((2, 6, 4, 4), (3, 3, 8, 8), torch.float32, torch.float32, "same batch size"),
        ((2, 6, 4), (2, 3, 8, 8), torch.float32, torch.float32, "4-D"),
        ((2, 6, 4, 4), (2, 3, 8, 8), torch.float64, torch.float32, "features must be float32"),
        ((2, 6, 4, 4), (2, 3, 8, 8), torch.float32, torch.int32, "masks must be float32"),
    ],
)
def test_mask_pool_rejects_bad_arguments(ext, features_shape, masks_shape, features_dtype, masks_dtype, fragment):
    features = torch.empty(features_shape, dtype=features_dtype, device="meta")
    masks = torch.empty(masks_shape, dtype=masks_dtype, device="meta")
    with pytest.raises(RuntimeError, match=fragment):
        _ops().mask_pool_forward(features, masks, 1e-6)


def test_mask_pool_rejects_strided_masks_and_bad_grad(ext):
    features = torch.empty(2, 6, 4, 4, device="meta")
    masks = torch.empty(2, 3, 8, 8, device="meta")
    with pytest.raises(RuntimeError, match="masks must be contiguous"):
        _ops().mask_pool_forward(features, masks.transpose(2, 3), 1e-6)
    with pytest.raises(RuntimeError, match=r"grad_pooled must be \[B, K, C\]"):
        _ops().mask_pool_backward(torch.empty(2, 3, 5, device="meta"), features, masks, 1e-6)


def test_fake_tensors_trace_through_the_meta_kernels(ext):
    """torch.compile traces with FakeTensors, which use the Meta kernels; fake CUDA tensors need no GPU."""
    with FakeTensorMode():
        q, k, v, maps, rows, tokens = _attention_args(2, 8, 64, 77, 40, torch.float16, "cuda", tokens_k=4)
        out = _ops().cross_attention_with_maps(q, k, v, maps, rows, tokens, 40**-0.5, 1.0)
        assert out.shape == q.shape and out.device.type == "cuda"
        features = torch.empty(2, 6, 4, 4, device="cuda").contiguous(memory_format=torch.channels_last)
        masks = torch.empty(2, 3, 8, 8, dtype=torch.uint8, device="cuda")
        pooled, mass = _ops().mask_pool_forward(features, masks, 1e-6)
        grad = _ops().mask_pool_backward(pooled, features, masks, 1e-6)
        assert pooled.shape == (2, 3, 6) and mass.shape == (2, 3) and grad.stride() == features.stride()


def test_cpu_tensors_raise_a_clear_error(ext):
    q, k, v, maps, rows, tokens = _attention_args(1, 2, 5, 3, 8, torch.float32, "cpu")
    with pytest.raises(RuntimeError, match="runs on CUDA tensors only"):
        _ops().cross_attention_with_maps(q, k, v, maps, rows, tokens, 0.5, 1.0)
    features, masks = torch.zeros(1, 4, 2, 2), torch.zeros(1, 3, 4, 4)
    with pytest.raises(RuntimeError, match="runs on CUDA tensors only"):
        _ops().mask_pool_forward(features, masks, 1e-6)
    with pytest.raises(RuntimeError, match="runs on CUDA tensors only"):
        _ops().mask_pool_backward(torch.zeros(1, 3, 4), features, masks, 1e-6)


# ----------------------------------------------------------------------------------------------------------------
# GPU: kernels vs the eager references
# ----------------------------------------------------------------------------------------------------------------


def _assert_close_to_truth(name, got, truth, ref_same_dtype=None):
    """DESIGN.md §3 tolerances against the fp64 truth. Without ``ref_same_dtype`` (fp32 inputs): max error <=
    1e-5 x max |truth|. With it (the eager reference run on the same fp16/bf16 inputs): max error <= 2 x the
    reference's max error, plus a tiny absolute floor against 0-vs-0."""
    assert got.shape == truth.shape, (name, got.shape, truth.shape)
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    if got.numel() == 0:
        return
    err = (got.double() - truth).abs().max().item()
    scale = truth.abs().max().item()
    if ref_same_dtype is None:
        tol = 1e-5 * scale + 1e-12
    else:
        ref_err = (ref_same_dtype.double() - truth).abs().max().item()
        tol = 2 * ref_err + 1e-6 * scale + 1e-12
    assert err <= tol, f"{name}: max error {err:.3g} > tolerance {tol:.3g} (max |truth| {scale:.3g})"


def _attention_inputs(B, H, N, T, D, dtype, *, tokens_k, rows, strided, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    dev = "cuda"
    if strided:  # q permuted from [B, N, H, D], k a slice of a wider buffer, v transposed from [B, T, H, D]
        q = torch.randn(B, N, H, D, generator=g, device=dev).to(dtype).permute(0, 2, 1, 3)
        k = torch.randn(B, H, T, D + 8, generator=g, device=dev).to(dtype)[..., 3 : 3 + D]
        v = torch.randn(B, T, H, D, generator=g, device=dev).to(dtype).transpose(1, 2)
    else:
        q, k, v = (torch.randn(B, H, n, D, generator=g, device=dev).to(dtype) for n in (N, T, T))
    q = q * 2  # peakier softmax than unit-variance scores
    rows_t = torch.arange(B, device=dev) if rows is None else torch.tensor(rows, dtype=torch.int64, device=dev)
    tokens = None if tokens_k is None else torch.randint(0, T, (rows_t.numel(), tokens_k), generator=g, device=dev)
    maps0 = torch.rand(rows_t.numel(), T if tokens_k is None else tokens_k, N, generator=g, device=dev)
    row_of_batch = torch.full((B,), -1, dtype=torch.int64, device=dev)
    row_of_batch[rows_t] = torch.arange(rows_t.numel(), device=dev)
    return q, k, v, maps0, rows_t, tokens, row_of_batch


ATTENTION_CASES = [
    # B, H, N, T, D, tokens_k, rows (None = all), strided inputs
    (2, 3, 1, 1, 40, None, None, False),
    (2, 2, 77, 77, 64, 5, [1], False),
    (1, 2, 1000, 200, 160, None, None, True),
    (3, 1, 77, 200, 80, 16, [2, 0], True),
    (2, 8, 1000, 77, 40, 4, [1], False),  # SD 1.5 cross-attention under CFG (conditional half accumulates)
    (1, 2, 33, 256, 256, None, None, False),  # the limits: 81 KiB of shared memory per block
    (2, 1, 1000, 1, 64, 1, None, True),
    (1, 3, 77, 77, 80, None, [], False),  # no batch row accumulates
]


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("case", ATTENTION_CASES, ids=lambda c: "B{}H{}N{}T{}D{}-tok{}-rows{}-strided{}".format(*c))
def test_cross_attention_matches_reference(ext, dtype, case):
    B, H, N, T, D, tokens_k, rows, strided = case
    q, k, v, maps0, rows_t, tokens, row_of_batch = _attention_inputs(
        B, H, N, T, D, dtype, tokens_k=tokens_k, rows=rows, strided=strided, seed=N + T + D
    )
    scale, weight = 0.9 * D**-0.5, 0.7
    maps = maps0.clone()
    out = _ops().cross_attention_with_maps(q, k, v, maps, row_of_batch, tokens, scale, weight)

    maps_truth = maps0.double()
    truth = cross_attention_with_maps_reference(
        q.double(), k.double(), v.double(), maps_truth, scale=scale, rows=rows_t, tokens=tokens, weight=weight
    )
    maps_ref = maps0.clone()
    ref = cross_attention_with_maps_reference(q, k, v, maps_ref, scale=scale, rows=rows_t, tokens=tokens, weight=weight)
    assert out.dtype == dtype and out.is_contiguous()
    low_precision = dtype != torch.float32
    _assert_close_to_truth("out", out, truth, ref if low_precision else None)
    # maps are fp32 whatever the input dtype: compare the increments, with the rule of the input dtype
    _assert_close_to_truth(
        "maps increment", maps - maps0, maps_truth - maps0.double(), maps_ref - maps0 if low_precision else None
    )


@pytest.mark.cuda
def test_cross_attention_is_deterministic_and_only_touches_its_rows(ext):
    q, k, v, maps0, _, tokens, row_of_batch = _attention_inputs(
        4, 8, 1000, 77, 40, torch.float16, tokens_k=6, rows=[3, 1], strided=False, seed=0
    )
    maps_a, maps_b = maps0.clone(), maps0.clone()
    out_a = _ops().cross_attention_with_maps(q, k, v, maps_a, row_of_batch, tokens, 0.15, 1.0)
    out_b = _ops().cross_attention_with_maps(q, k, v, maps_b, row_of_batch, tokens, 0.15, 1.0)
    assert torch.equal(out_a, out_b) and torch.equal(maps_a, maps_b)
    zero_weight = maps0.clone()
    _ops().cross_attention_with_maps(q, k, v, zero_weight, row_of_batch, tokens, 0.15, 0.0)
    assert torch.equal(zero_weight, maps0)


@pytest.mark.cuda
@pytest.mark.parametrize("tokens_k", [None, 3])
def test_cross_attention_opcheck(ext, tokens_k):
    q, k, v, maps0, _, tokens, row_of_batch = _attention_inputs(
        2, 2, 37, 9, 40, torch.float16, tokens_k=tokens_k, rows=[1], strided=False, seed=1
    )
    torch.library.opcheck(_ops().cross_attention_with_maps, (q, k, v, maps0, row_of_batch, tokens, 0.2, 1.0))


@pytest.mark.cuda
def test_cross_attention_rejects_mixed_devices(ext):
    q, k, v, maps, _, _, row_of_batch = _attention_inputs(
        1, 2, 5, 3, 8, torch.float32, tokens_k=None, rows=None, strided=False, seed=2
    )
    with pytest.raises(RuntimeError, match="row_of_batch must be a CUDA tensor"):
        _ops().cross_attention_with_maps(q, k, v, maps, row_of_batch.cpu(), None, 0.5, 1.0)


def _mask_pool_inputs(B, C, h, w, K, Hm, Wm, features_dtype, masks_dtype, layout, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    dev = "cuda"
    if layout == "strided":  # every other channel of a wider buffer, a column window: no dense layout at all
        features = torch.randn(B, 2 * C, h, w + 3, generator=g, device=dev).to(features_dtype)[:, ::2, :, 1 : 1 + w]
    else:
        features = torch.randn(B, C, h, w, generator=g, device=dev).to(features_dtype)
        if layout == "channels_last":
            features = features.contiguous(memory_format=torch.channels_last)
    if masks_dtype == torch.bool:
        masks = torch.rand(B, K, Hm, Wm, generator=g, device=dev) > 0.6
    elif masks_dtype == torch.uint8:
        masks = torch.randint(0, 256, (B, K, Hm, Wm), generator=g, device=dev, dtype=torch.uint8)
    else:
        masks = torch.rand(B, K, Hm, Wm, generator=g, device=dev).to(masks_dtype)
    return features, masks


MASK_POOL_CASES = [
    # B, C, h, w, K, Hm, Wm: one thread per pixel below 32 mask values per pixel, one warp per pixel from 32 up
    (2, 5, 3, 4, 3, 6, 8),  # 2 x 2 blocks
    (2, 70, 7, 7, 9, 56, 56),  # 8 x 8 blocks, channels across 3 tiles, K across 2 tiles
    (1, 40, 12, 11, 2, 12, 11),  # masks already at feature size, 132 pixels (3 chunks)
    (1, 33, 2, 3, 40, 64, 96),  # 32 x 32 blocks, K = 40 (two chunks of the backward)
    (3, 256, 7, 7, 1, 224, 224),  # ResNet-50-like last stage, one mask per image
    (2, 1, 1, 1, 1, 7, 5),  # global pooling
]


@pytest.mark.cuda
@pytest.mark.parametrize("features_dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("masks_dtype", MASK_DTYPES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize("case", MASK_POOL_CASES, ids=lambda c: "B{}C{}-{}x{}-K{}-{}x{}".format(*c))
def test_mask_pool_matches_reference(ext, features_dtype, masks_dtype, layout, case):
    features, masks = _mask_pool_inputs(*case, features_dtype, masks_dtype, layout, seed=sum(case))
    eps = 1e-6
    pooled, mass = _ops().mask_pool_forward(features, masks, eps)

    f_truth = features.double().requires_grad_(True)
    truth_pooled, truth_mass = mask_pool_reference(f_truth, masks, eps=eps)
    f_ref = features.detach().clone().requires_grad_(True)
    ref_pooled, ref_mass = mask_pool_reference(f_ref, masks, eps=eps)
    low_precision = features_dtype != torch.float32
    assert pooled.dtype == features_dtype and pooled.is_contiguous() and mass.dtype == torch.float32
    _assert_close_to_truth("pooled", pooled, truth_pooled, ref_pooled if low_precision else None)
    _assert_close_to_truth("mass", mass, truth_mass.double())  # fp32 from the masks alone, whatever the features

    grad_pooled = torch.randn(pooled.shape, device="cuda")
    grad = _ops().mask_pool_backward(grad_pooled, features, masks, eps)
    (truth_grad,) = torch.autograd.grad(truth_pooled, f_truth, grad_pooled.double())
    (ref_grad,) = torch.autograd.grad(ref_pooled, f_ref, grad_pooled.to(features_dtype))
    assert grad.dtype == features_dtype and grad.shape == features.shape
    if layout != "strided":
        assert grad.stride() == features.stride()  # channels_last stays channels_last
    _assert_close_to_truth("grad_features", grad, truth_grad, ref_grad if low_precision else None)


@pytest.mark.cuda
@pytest.mark.parametrize("features_dtype", FLOAT_DTYPES)
def test_mask_pool_empty_mask_pools_to_zero(ext, features_dtype):
    features, masks = _mask_pool_inputs(2, 9, 4, 4, 3, 8, 8, features_dtype, torch.float32, "contiguous", seed=3)
    masks[:, 1] = 0
    pooled, mass = _ops().mask_pool_forward(features, masks, 0.0)  # den + eps == 0 for mask 1: 0, never NaN
    grad = _ops().mask_pool_backward(torch.ones(pooled.shape, device="cuda"), features, masks, 0.0)
    assert torch.isfinite(pooled).all() and torch.isfinite(grad).all()
    assert (pooled[:, 1] == 0).all() and (mass[:, 1] == 0).all()


@pytest.mark.cuda
def test_mask_pool_is_deterministic(ext):
    features, masks = _mask_pool_inputs(4, 512, 14, 14, 9, 224, 224, torch.bfloat16, torch.uint8, "channels_last", 4)
    grad_pooled = torch.randn(4, 9, 512, device="cuda")
    a = _ops().mask_pool_forward(features, masks, 1e-6)
    b = _ops().mask_pool_forward(features, masks, 1e-6)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    ga = _ops().mask_pool_backward(grad_pooled, features, masks, 1e-6)
    gb = _ops().mask_pool_backward(grad_pooled, features, masks, 1e-6)
    assert torch.equal(ga, gb)


@pytest.mark.cuda
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_mask_pool_opcheck(ext, layout):
    features, masks = _mask_pool_inputs(2, 6, 4, 4, 3, 8, 8, torch.float16, torch.uint8, layout, seed=5)
    torch.library.opcheck(_ops().mask_pool_forward, (features, masks, 1e-6))
    grad_pooled = torch.randn(2, 3, 6, device="cuda", dtype=torch.float16)
    torch.library.opcheck(_ops().mask_pool_backward, (grad_pooled, features, masks, 1e-6))
