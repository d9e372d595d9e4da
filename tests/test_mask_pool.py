"""mask_pool: every backend against the eager reference, forward and backward, on odd shapes and dtypes.

Truth is :func:`mask_pool_reference` run in float64. fp32 results must be within 1e-5 (relative to the largest
reference value); fp16/bf16 results within 2x the error of the same reference run in that dtype, plus one ulp
of the largest value as a floor (a handful of outputs can round exactly in the reference by chance).
Triton runs on CUDA tensors where a GPU exists, else on CPU tensors under TRITON_INTERPRET=1 (conftest.py).
"""

from __future__ import annotations

import zlib

import pytest
import torch

from freeatm_kernels import _backend, mask_pool, mask_pool_reference
from freeatm_kernels.mask_pool import _launch_config, _mask_pool_bwd_triton, _mask_pool_fwd_triton

BACKENDS = ["torch", "triton"]

# (B, K, C, h, w, sh, sw, mask dtype, feature dtype, layout). Together they cover K in 1..9, C in {1, 3, 64, 130},
# h x w in {1x1, 7x7, 5x3, 14x14}, (sh, sw) in {1, 2, 8, (4, 2)}, B in {1, 2, 3}, every mask and feature dtype and
# the layouts: contiguous, channels_last, "strided" (h and w transposed in memory, features and masks alike:
# pixel offsets are not p * stride_w, and the masks are not contiguous).
F32, F16, BF16, U8, BOOL = torch.float32, torch.float16, torch.bfloat16, torch.uint8, torch.bool
CASES = [
    (1, 1, 1, 1, 1, 1, 1, F32, F32, "contiguous"),
    (2, 3, 3, 7, 7, 8, 8, U8, F32, "contiguous"),
    (3, 9, 64, 5, 3, 4, 2, BOOL, F32, "channels_last"),
    (2, 5, 130, 7, 7, 2, 2, F16, F32, "contiguous"),
    (2, 6, 1, 14, 14, 2, 2, F16, F32, "strided"),
    (1, 8, 64, 14, 14, 1, 1, F32, BF16, "contiguous"),
    (2, 4, 130, 7, 7, 8, 8, U8, BF16, "channels_last"),
    (2, 9, 3, 1, 1, 4, 2, BF16, BF16, "strided"),
    (3, 2, 3, 5, 3, 2, 2, F32, F16, "strided"),
    (1, 7, 64, 1, 1, 8, 8, BOOL, F16, "contiguous"),
    (3, 1, 130, 5, 3, 1, 1, U8, F16, "channels_last"),
]


def _case_id(case) -> str:
    B, K, C, h, w, sh, sw, mdt, fdt, layout = case
    short = {F32: "f32", F16: "f16", BF16: "bf16", U8: "u8", BOOL: "bool"}
    return f"B{B}K{K}C{C}-{h}x{w}-s{sh}x{sw}-m{short[mdt]}-f{short[fdt]}-{layout}"


def make_masks(B, K, H, W, dtype, device, *, generator, layout="contiguous"):
    """Random masks [B,K,H,W]: soft values for floats, the full 0..255 range for uint8, ~40% True for bool."""
    shape = (B, K, W, H) if layout == "strided" else (B, K, H, W)
    u = torch.rand(shape, generator=generator)
    if dtype == U8:
        m = (u * 256).clamp(max=255).to(U8)
    elif dtype == BOOL:
        m = u < 0.4
    else:
        m = u.to(dtype)
    m = m.to(device)
    return m.transpose(2, 3) if layout == "strided" else m


def make_features(B, C, h, w, dtype, device, *, generator, layout="contiguous"):
    shape = (B, C, w, h) if layout == "strided" else (B, C, h, w)
    f = torch.randn(shape, generator=generator).to(device=device, dtype=dtype)
    if layout == "strided":
        return f.transpose(2, 3)
    if layout == "channels_last":
        return f.contiguous(memory_format=torch.channels_last)
    return f


def assert_matches(out, ref_same_dtype, ref64, what):
    """fp32: <= 1e-5 of the largest reference value; fp16/bf16: <= 2x the same-dtype reference's error + 1 ulp."""
    assert out.shape == ref64.shape, (what, out.shape, ref64.shape)
    assert torch.isfinite(out).all(), f"{what}: non-finite values"
    out64, ref64 = out.detach().double().cpu(), ref64.detach().double().cpu()
    scale = ref64.abs().max().item()
    err = (out64 - ref64).abs().max().item()
    if out.dtype in (torch.float32, torch.float64):
        assert err <= 1e-5 * scale + 1e-12, f"{what}: max error {err:.3g} vs scale {scale:.3g}"
    else:
        ref_err = (ref_same_dtype.detach().double().cpu() - ref64).abs().max().item()
        floor = torch.finfo(out.dtype).eps * scale
        assert err <= 2 * ref_err + floor, f"{what}: max error {err:.3g}, eager {out.dtype} reference {ref_err:.3g}"


def _forward_backward(fn, features, grad):
    f = features.detach().clone().requires_grad_(True)  # clone keeps the memory format
    pooled, mass = fn(f)
    pooled.backward(grad)
    return pooled, mass, f.grad


@pytest.mark.parametrize("case", CASES, ids=_case_id)
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_reference(backend, case, kernel_device):
    B, K, C, h, w, sh, sw, mdt, fdt, layout = case
    gen = torch.Generator().manual_seed(zlib.crc32(_case_id(case).encode()))
    dev = kernel_device
    features = make_features(B, C, h, w, fdt, dev, generator=gen, layout=layout)
    masks = make_masks(B, K, h * sh, w * sw, mdt, dev, generator=gen, layout=layout)
    grad = torch.randn(B, K, C, generator=gen).to(device=dev, dtype=fdt)

    pooled, mass, gf = _forward_backward(lambda f: mask_pool(f, masks, backend=backend), features, grad)
    ref_p, ref_m, ref_g = _forward_backward(lambda f: mask_pool_reference(f, masks), features.double(), grad.double())
    if fdt == F32:
        low_p = low_g = None
    else:
        low_p, _, low_g = _forward_backward(lambda f: mask_pool_reference(f, masks), features, grad)

    assert pooled.dtype == fdt and mass.dtype == torch.float32 and gf.dtype == fdt
    assert pooled.shape == (B, K, C) and mass.shape == (B, K) and gf.shape == features.shape
    assert_matches(pooled, low_p, ref_p, "pooled")
    assert_matches(gf, low_g, ref_g, "grad_features")
    torch.testing.assert_close(mass.cpu().double(), ref_m.cpu().double(), rtol=0, atol=1e-6)
    # grad_features has the features' memory layout (channels_last in -> channels_last out, strided -> same strides)
    assert gf.stride() == features.stride(), (gf.stride(), features.stride())


# Launch configurations forced onto small shapes so the interpreter reaches every kernel path: several pixel
# tiles (the tiled forward and the two-pass backward), several programs per image over channel blocks / pixel
# tiles, and a real large map (64x64 = 4096 pixels, 16 tiles of 256).
TILED = [
    # (B, K, C, h, w, sh, sw, block_p, fwd groups, bwd groups, mask dtype, layout)
    (2, 3, 130, 7, 7, 2, 2, 16, 2, 3, U8, "contiguous"),
    (3, 5, 64, 7, 5, 4, 2, 16, 1, 1, BOOL, "channels_last"),
    (1, 9, 3, 14, 14, 1, 1, 32, 1, 7, F16, "strided"),
    (2, 2, 300, 7, 7, 1, 1, None, 3, 3, F32, "channels_last"),  # one tile, 3 groups over 3 channel blocks
    (1, 2, 5, 64, 64, 1, 1, None, 1, 2, F32, "contiguous"),
]


@pytest.mark.parametrize("case", TILED, ids=lambda c: f"B{c[0]}K{c[1]}C{c[2]}-{c[3]}x{c[4]}-bp{c[7]}-g{c[8]},{c[9]}")
def test_triton_launch_paths(case, kernel_device):
    B, K, C, h, w, sh, sw, block_p, g_fwd, g_bwd, mdt, layout = case
    gen = torch.Generator().manual_seed(7)
    dev = kernel_device
    features = make_features(B, C, h, w, F32, dev, generator=gen, layout=layout)
    masks = make_masks(B, K, h * sh, w * sw, mdt, dev, generator=gen, layout=layout)
    grad = torch.randn(B, K, C, generator=gen).to(dev)
    P = h * w
    fwd = _launch_config(B, K, C, P, features.device, backward=False, block_p=block_p, groups=g_fwd)
    bwd = _launch_config(B, K, C, P, features.device, backward=True, block_p=block_p, groups=g_bwd)
    if block_p is not None or P > 256:
        assert fwd.num_p_blocks > 1 and bwd.num_p_blocks > 1

    pooled, mass = _mask_pool_fwd_triton(features, masks, 1e-6, fwd)
    gf = _mask_pool_bwd_triton(grad, features, masks, 1e-6, bwd)
    ref_p, ref_m, ref_g = _forward_backward(lambda f: mask_pool_reference(f, masks), features.double(), grad.double())
    assert_matches(pooled, None, ref_p, "pooled")
    assert_matches(gf, None, ref_g, "grad_features")
    torch.testing.assert_close(mass.cpu().double(), ref_m.cpu().double(), rtol=0, atol=1e-6)
    assert gf.stride() == features.stride()


@pytest.mark.parametrize("eps", [0.0, 1e-6])
@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_masks_give_zeros(backend, eps, kernel_device):
    gen = torch.Generator().manual_seed(3)
    features = make_features(2, 3, 5, 3, F32, kernel_device, generator=gen)
    masks = make_masks(2, 4, 10, 6, F32, kernel_device, generator=gen)
    masks[0, 1] = 0  # one empty mask in an image with others
    masks[1] = 0  # an image with every mask empty
    f = features.clone().requires_grad_(True)
    pooled, mass = mask_pool(f, masks, eps=eps, backend=backend)
    pooled.backward(torch.ones_like(pooled))
    ref_p, ref_m = mask_pool_reference(features.double(), masks, eps=eps)
    for t in (pooled, mass, f.grad, ref_p):
        assert not torch.isnan(t).any()
    assert (pooled[0, 1] == 0).all() and (pooled[1] == 0).all() and (mass[1] == 0).all() and (mass[0, 1] == 0)
    assert (f.grad[1] == 0).all()  # nothing in image 1 is pooled, so nothing flows back
    assert_matches(pooled, None, ref_p, "pooled")


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_eps_enters_the_denominator(backend, kernel_device):
    """eps = 0.7 is comparable to the mask sums (about 15 * 0.5 here), so a dropped eps would show."""
    gen = torch.Generator().manual_seed(4)
    features = make_features(2, 64, 5, 3, F32, kernel_device, generator=gen)
    masks = make_masks(2, 3, 10, 6, U8, kernel_device, generator=gen)
    grad = torch.randn(2, 3, 64, generator=gen).to(kernel_device)
    pooled, _, gf = _forward_backward(lambda f: mask_pool(f, masks, eps=0.7, backend=backend), features, grad)
    ref_p, _, ref_g = _forward_backward(
        lambda f: mask_pool_reference(f, masks, eps=0.7), features.double(), grad.double()
    )
    assert_matches(pooled, None, ref_p, "pooled")
    assert_matches(gf, None, ref_g, "grad_features")


@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_is_deterministic(backend, kernel_device):
    gen = torch.Generator().manual_seed(11)
    features = make_features(2, 130, 7, 7, F32, kernel_device, generator=gen, layout="channels_last")
    masks = make_masks(2, 6, 14, 14, U8, kernel_device, generator=gen)
    grad = torch.randn(2, 6, 130, generator=gen).to(kernel_device)
    grads = [_forward_backward(lambda f: mask_pool(f, masks, backend=backend), features, grad)[2] for _ in range(2)]
    assert torch.equal(grads[0], grads[1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_masks_get_no_gradient_and_mass_is_not_differentiable(backend, kernel_device):
    gen = torch.Generator().manual_seed(5)
    features = make_features(2, 3, 5, 3, F32, kernel_device, generator=gen).requires_grad_(True)
    masks = make_masks(2, 4, 10, 6, F32, kernel_device, generator=gen).requires_grad_(True)
    pooled, mass = mask_pool(features, masks, backend=backend)
    assert not mass.requires_grad
    pooled.sum().backward()  # an expanded (stride-0) upstream gradient
    assert masks.grad is None
    ref = features.detach().double().requires_grad_(True)
    mask_pool_reference(ref, masks)[0].sum().backward()
    assert_matches(features.grad, None, ref.grad, "grad_features")


def test_gradcheck_torch_backend_fp64():
    gen = torch.Generator().manual_seed(0)
    features = torch.randn(2, 3, 5, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    masks = make_masks(2, 4, 10, 6, F32, "cpu", generator=gen)
    assert torch.autograd.gradcheck(lambda f: mask_pool(f, masks, backend="torch")[0], (features,))
    assert torch.autograd.gradcheck(lambda f: mask_pool_reference(f, masks)[0], (features,))


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend, kernel_device):
    dev = kernel_device if backend == "triton" else torch.device("cpu")
    gen = torch.Generator().manual_seed(1)
    features = make_features(2, 3, 5, 3, F32, dev, generator=gen).requires_grad_(True)
    masks = make_masks(2, 4, 10, 6, U8, dev, generator=gen)
    grad = torch.randn(2, 4, 3, generator=gen).to(dev)
    torch.library.opcheck(torch.ops.freeatm.mask_pool.default, (features, masks, 1e-6, backend))
    torch.library.opcheck(torch.ops.freeatm.mask_pool_backward.default, (grad, features.detach(), masks, 1e-6, backend))


@pytest.mark.parametrize("backend", [*BACKENDS, "auto"])
def test_torch_compile_fullgraph(backend, kernel_device):
    """Forward + backward through torch.compile (inductor, fullgraph) without a graph break.

    Inductor on a cold CPU cache takes ~14 s for the first of these (the same graph is reused by the others).
    "auto" resolves inside the op at run time, so tracing never touches the extension loader.
    """
    dev = torch.device("cpu") if backend == "torch" else kernel_device
    gen = torch.Generator().manual_seed(2)
    features = make_features(2, 3, 5, 3, F32, dev, generator=gen, layout="channels_last")
    masks = make_masks(2, 4, 10, 6, BOOL, dev, generator=gen)

    def fn(f, m):
        pooled, mass = mask_pool(f, m, backend=backend)
        return (pooled * pooled).sum() + mass.sum()

    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="inductor")
    f1 = features.clone().requires_grad_(True)
    f2 = features.clone().requires_grad_(True)
    out = compiled(f1, masks)
    out.backward()
    expected = fn(f2, masks)
    expected.backward()
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(f1.grad, f2.grad)


def test_invalid_inputs_raise_value_error():
    f = torch.randn(2, 3, 5, 3)
    m = torch.rand(2, 4, 10, 6)
    with pytest.raises(ValueError, match=r"masks \(2, 4, 11, 6\).*features \(2, 3, 5, 3\)"):
        mask_pool(f, torch.rand(2, 4, 11, 6))  # H=11 is not a multiple of h=5
    with pytest.raises(ValueError, match="integer multiple"):
        mask_pool(f, torch.rand(2, 4, 10, 4))  # W=4 is not a multiple of w=3
    with pytest.raises(ValueError, match=r"\[B,C,h,w\]"):
        mask_pool(f[0], m)
    with pytest.raises(ValueError, match=r"\[B,K,H,W\]"):
        mask_pool(f, m[:, 0])
    with pytest.raises(ValueError, match="batch sizes differ"):
        mask_pool(f, m[:1])
    with pytest.raises(ValueError, match="features must have a dtype"):
        mask_pool(f.to(torch.int32), m)
    with pytest.raises(ValueError, match="masks must have a dtype"):
        mask_pool(f, m.double())
    with pytest.raises(ValueError, match="masks must have a dtype"):
        mask_pool(f, (m * 255).to(torch.int32))
    with pytest.raises(ValueError, match="on cpu but masks on meta"):
        mask_pool(f, m.to("meta"))
    with pytest.raises(ValueError, match="eps"):
        mask_pool(f, m, eps=-1e-3)
    with pytest.raises(ValueError, match="empty"):
        mask_pool(f[:, :0], m)
    with pytest.raises(ValueError, match="backend must be one of"):
        mask_pool(f, m, backend="numpy")
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        mask_pool(f, m, backend="cuda")
    with pytest.raises(ValueError, match="grad_pooled must be"):
        torch.ops.freeatm.mask_pool_backward(torch.randn(2, 4, 5), f, m, 1e-6, "torch")


def test_triton_rejects_fp64_and_auto_routes_it_to_torch(kernel_device):
    f = torch.randn(2, 3, 5, 3, dtype=torch.float64, device=kernel_device)
    m = torch.rand(2, 4, 10, 6, device=kernel_device)
    with pytest.raises(ValueError, match="float64"):
        mask_pool(f, m, backend="triton")
    pooled, _ = mask_pool(f, m)  # auto: torch for fp64 (neither kernel takes it)
    torch.testing.assert_close(pooled, mask_pool_reference(f, m)[0])


# ---------------------------------------------------------------------------------------------------------------
# GPU only: ResNet-50 C5 (B=256, C=2048, 7x7; K=8 masks at 56x56), bf16 features
# ---------------------------------------------------------------------------------------------------------------


def _c5_inputs(mask_dtype):
    gen = torch.Generator().manual_seed(0)
    features = torch.randn(256, 2048, 7, 7, generator=gen).to("cuda", torch.bfloat16)
    features = features.contiguous(memory_format=torch.channels_last)
    masks = make_masks(256, 8, 56, 56, mask_dtype, "cuda", generator=gen)
    grad = torch.randn(256, 8, 2048, generator=gen).to("cuda", torch.bfloat16)
    return features, masks, grad


def _check_c5(backend, mask_dtype):
    features, masks, grad = _c5_inputs(mask_dtype)
    pooled, mass, gf = _forward_backward(lambda f: mask_pool(f, masks, backend=backend), features, grad)
    ref_p, ref_m, ref_g = _forward_backward(lambda f: mask_pool_reference(f, masks), features.double(), grad.double())
    low_p, _, low_g = _forward_backward(lambda f: mask_pool_reference(f, masks), features, grad)
    assert_matches(pooled, low_p, ref_p, "pooled")
    assert_matches(gf, low_g, ref_g, "grad_features")
    torch.testing.assert_close(mass.double(), ref_m.double(), rtol=0, atol=1e-6)
    assert gf.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.cuda
@pytest.mark.parametrize("mask_dtype", [U8, F32])
def test_cuda_triton_resnet50_c5(mask_dtype):
    _check_c5("triton", mask_dtype)


@pytest.mark.cuda
@pytest.mark.parametrize("mask_dtype", [U8, F32])
def test_cuda_extension_resnet50_c5(mask_dtype):
    if not (_backend.extension_has("mask_pool_forward") and _backend.extension_has("mask_pool_backward")):
        pytest.skip(f"CUDA extension with mask_pool not built: {_backend.extension_error() or 'op missing'}")
    _check_c5("cuda", mask_dtype)


@pytest.mark.cuda
def test_cuda_triton_stride4_large_map():
    """56x56 maps (P=3136 > one tile) from 224x224 masks: the tiled forward and two-pass backward, compiled."""
    gen = torch.Generator().manual_seed(1)
    features = torch.randn(8, 256, 56, 56, generator=gen).to("cuda", torch.float16)
    masks = make_masks(8, 5, 224, 224, U8, "cuda", generator=gen)
    grad = torch.randn(8, 5, 256, generator=gen).to("cuda", torch.float16)
    pooled, _, gf = _forward_backward(lambda f: mask_pool(f, masks, backend="triton"), features, grad)
    ref_p, _, ref_g = _forward_backward(lambda f: mask_pool_reference(f, masks), features.double(), grad.double())
    low_p, _, low_g = _forward_backward(lambda f: mask_pool_reference(f, masks), features, grad)
    assert_matches(pooled, low_p, ref_p, "pooled")
    assert_matches(gf, low_g, ref_g, "grad_features")
