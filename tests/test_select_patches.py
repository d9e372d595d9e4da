"""Tests of ``select_patches`` and ``gather_tokens``: every backend against the eager references.

The masking op is deterministic given its noise, so the Triton kernel must equal the reference exactly (integers and a
0/1 mask). Statistical properties (uniformity of the random part) are checked on the torch backend with seeded
generators over thousands of rows, so they cannot flake; the kernel inherits them through exact equality.
"""

import math

import pytest
import torch

from freeatm_kernels import gather_tokens, gather_tokens_reference, select_patches, select_patches_reference
from freeatm_kernels.select_patches import gather_tokens_backward_reference, num_guided_patches

# ------------------------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------------------------


def _op(importance, noise, num_masked, num_guided, backend):
    return torch.ops.freeatm.select_patches(importance, noise, num_masked, num_guided, backend)


def _importance(kind: str, B: int, L: int, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    if kind == "random":
        imp = torch.rand(B, L, generator=gen)
    elif kind == "quantised":  # 4 levels: many ties, broken by noise
        imp = torch.randint(0, 4, (B, L), generator=gen).float() / 3
    elif kind == "equal":
        imp = torch.full((B, L), 0.5)
    else:
        raise AssertionError(kind)
    return imp.to(dtype)


def _mae_random_masking(noise: torch.Tensor, num_masked: int):
    """MAE's random_masking (models_mae.py) given its noise, with mask in float32."""
    N, L = noise.shape
    len_keep = L - num_masked
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :len_keep]
    mask = torch.ones([N, L], device=noise.device)
    mask[:, :len_keep] = 0
    mask = torch.gather(mask, dim=1, index=ids_restore)
    return ids_keep, ids_restore, mask


def _assert_same(got, want):
    for name, g, w in zip(("ids_keep", "ids_restore", "mask"), got, want, strict=True):
        assert g.dtype == w.dtype and g.shape == w.shape, (name, g.dtype, g.shape, w.dtype, w.shape)
        assert torch.equal(g.cpu(), w.cpu()), f"{name} differs:\n{g}\n{w}"


def _check_invariants(ids_keep, ids_restore, mask, num_masked):
    B, L = ids_restore.shape
    len_keep = L - num_masked
    ar = torch.arange(L, device=ids_restore.device).expand(B, L)
    assert torch.equal(ids_restore.sort(dim=1).values, ar), "ids_restore is not a permutation"
    assert torch.equal(mask.sum(dim=1), torch.full((B,), float(num_masked), device=mask.device))
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    # ids_keep[p] sits at shuffle position p; the kept patches are exactly the unmasked ones
    assert torch.equal(ids_restore.gather(1, ids_keep), ar[:, :len_keep])
    assert torch.equal(mask.gather(1, ids_keep), torch.zeros(B, len_keep, device=mask.device))
    assert torch.equal(mask, (ids_restore >= len_keep).float())
    # MAE's round trip: visible tokens + mask tokens, unshuffled with ids_restore, restore every visible position
    x = ar.unsqueeze(-1).double()  # token l carries the value l
    x_masked = gather_tokens_reference(x, ids_keep)
    x_ = torch.cat([x_masked, torch.full((B, num_masked, 1), -1.0, dtype=x.dtype, device=x.device)], dim=1)
    x_ = gather_tokens_reference(x_, ids_restore)[..., 0]
    assert torch.equal(x_, torch.where(mask.bool(), -1.0, ar.double()))


# ------------------------------------------------------------------------------------------------------------------
# select_patches: kernel == reference, exactly
# ------------------------------------------------------------------------------------------------------------------


def _kernel_cases():
    """(B, L, num_masked, guided_fraction, importance kind, dtype): every L with num_masked in {0, 1, L-1, L}
    (and 147 for L=196) and guided fractions {0, 0.3, 0.5, 1}; identical (L, num_masked, num_guided) dropped."""
    cases, seen = [], set()
    batch = {1: 8, 7: 8, 49: 8, 196: 3, 256: 2, 300: 2}
    kinds = ("random", "quantised")
    dtypes = (torch.float32, torch.float16, torch.bfloat16)
    for L in (196, 49, 1, 7, 256, 300):
        counts = sorted({0, 1, L - 1, L} | ({147} if L == 196 else set()))
        for nm in counts:
            for gf in (0.0, 0.3, 0.5, 1.0):
                key = (L, nm, num_guided_patches(nm, gf))
                if key in seen:
                    continue
                seen.add(key)
                k = len(cases)
                cases.append((batch[L], L, nm, gf, kinds[k % 2], dtypes[k % 3]))
    return cases


@pytest.mark.parametrize("B,L,num_masked,guided_fraction,kind,dtype", _kernel_cases())
def test_select_patches_triton_equals_reference(kernel_device, B, L, num_masked, guided_fraction, kind, dtype):
    gen = torch.Generator().manual_seed(L * 1000 + num_masked)
    imp = _importance(kind, B, L, dtype, gen)
    noise = torch.rand(B, L, generator=gen)
    g = num_guided_patches(num_masked, guided_fraction)
    want = select_patches_reference(imp, noise, num_masked, g)
    got = _op(imp.to(kernel_device), noise.to(kernel_device), num_masked, g, "triton")
    _assert_same(got, want)
    _check_invariants(*want, num_masked)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_strided_inputs(kernel_device, backend):
    device = kernel_device if backend == "triton" else torch.device("cpu")
    gen = torch.Generator().manual_seed(3)
    imp = torch.rand(50, 3, generator=gen).t()  # [3, 50], not contiguous
    noise = torch.rand(3, 100, generator=gen)[:, ::2]  # [3, 50], row stride 100
    want = select_patches_reference(imp.contiguous(), noise.contiguous(), 30, 12)
    _assert_same(_op(imp.to(device), noise.to(device), 30, 12, backend), want)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_guided_fraction_zero_is_mae_random_masking(kernel_device, backend):
    """Same generator state -> the same noise as MAE's torch.rand(N, L) -> identical outputs."""
    device = kernel_device if backend == "triton" else torch.device("cpu")
    B, L, nm = 5, 196, 147
    imp = torch.rand(B, L, device=device)
    gen = torch.Generator(device=device)
    got = select_patches(imp, nm, 0.0, generator=gen.manual_seed(7), backend=backend)
    noise = torch.rand(B, L, generator=gen.manual_seed(7), device=device)
    _assert_same(got, _mae_random_masking(noise, nm))


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("guided_fraction", [0.3, 1.0])
def test_equal_importance_is_random_masking(kernel_device, backend, guided_fraction):
    """All importances tie, so the guided patches are those with the largest noise: MAE's random masking again."""
    device = kernel_device if backend == "triton" else torch.device("cpu")
    B, L, nm = 4, 49, 36
    noise = torch.rand(B, L, generator=torch.Generator().manual_seed(11))
    imp = torch.full((B, L), 0.25)
    got = _op(imp.to(device), noise.to(device), nm, num_guided_patches(nm, guided_fraction), backend)
    _assert_same(got, _mae_random_masking(noise, nm))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_quantised_ties_broken_by_noise(kernel_device, backend):
    """The guided set = every patch above the threshold level + the largest-noise patches tied at it."""
    device = kernel_device if backend == "triton" else torch.device("cpu")
    gen = torch.Generator().manual_seed(5)
    B, L, nm, g = 6, 40, 30, 13
    imp = torch.randint(0, 5, (B, L), generator=gen).float()
    noise = torch.rand(B, L, generator=gen)
    _, ids_restore, mask = _op(imp.to(device), noise.to(device), nm, g, backend)
    ids_restore = ids_restore.cpu()
    for b in range(B):
        order = sorted(range(L), key=lambda i: (-imp[b, i].item(), -noise[b, i].item(), i))
        guided = set(order[:g])
        # guided patches hold the last g shuffle positions (all masked)
        assert {i for i in range(L) if ids_restore[b, i] >= L - g} == guided
        assert all(mask[b, i] == 1 for i in guided)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_full_guidance_masks_top_patches(kernel_device, backend):
    device = kernel_device if backend == "triton" else torch.device("cpu")
    B, L, nm = 3, 196, 147
    imp = torch.randperm(B * L, generator=torch.Generator().manual_seed(2)).view(B, L).float().to(device)  # no ties
    _, _, mask = select_patches(imp, nm, 1.0, backend=backend)
    top = torch.zeros(B, L, device=device).scatter_(1, imp.topk(nm, dim=1).indices, 1.0)
    assert torch.equal(mask, top)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_nan_importance_ranks_lowest(kernel_device, backend):
    device = kernel_device if backend == "triton" else torch.device("cpu")
    gen = torch.Generator().manual_seed(9)
    B, L, nm = 3, 20, 10
    imp = torch.rand(B, L, generator=gen)
    imp[:, ::2] = float("nan")  # 10 NaN patches, 10 finite ones
    noise = torch.rand(B, L, generator=gen)
    ids_keep, ids_restore, mask = _op(imp.to(device), noise.to(device), nm, nm, backend)
    assert torch.equal(mask.cpu(), torch.isfinite(imp).float())  # the 10 finite patches are the top 10
    _assert_same((ids_keep, ids_restore, mask), select_patches_reference(imp, noise, nm, nm))
    # more guided patches than finite ones: NaN patches fill up in noise order, like -inf
    imp_inf = torch.where(imp.isnan(), float("-inf"), imp)
    _assert_same(_op(imp.to(device), noise.to(device), 15, 15, backend), _op(imp_inf, noise, 15, 15, "torch"))


def test_num_guided_rounds_half_up():
    assert num_guided_patches(147, 0.5) == 74  # Python's round(73.5) would also give 74 ...
    assert num_guided_patches(5, 0.5) == 3  # ... but round(2.5) == 2: we round half up
    assert num_guided_patches(145, 0.5) == 73  # round(72.5) == 72
    assert num_guided_patches(10, 0.3) == 3  # 0.3 * 10 = 3.0000000000000004
    assert num_guided_patches(147, 0.0) == 0 and num_guided_patches(147, 1.0) == 147
    _, _, mask = select_patches(torch.arange(10.0).expand(2, 10), 5, 0.5, backend="torch")
    assert torch.equal(mask[:, 7:], torch.ones(2, 3))  # 3 guided: patches 7, 8, 9 always masked


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_generator_reproducible(kernel_device, backend):
    device = kernel_device if backend == "triton" else torch.device("cpu")
    imp = torch.rand(4, 49, device=device)
    gen = torch.Generator(device=device)
    a = select_patches(imp, 36, 0.5, generator=gen.manual_seed(1), backend=backend)
    b = select_patches(imp, 36, 0.5, generator=gen.manual_seed(1), backend=backend)
    c = select_patches(imp, 36, 0.5, generator=gen.manual_seed(2), backend=backend)
    _assert_same(a, b)
    assert not torch.equal(a[1], c[1])
    _check_invariants(*a, 36)


def test_auto_backend_and_all_backends_agree(kernel_device):
    imp = torch.rand(3, 30, device=kernel_device)
    gen = torch.Generator(device=kernel_device)
    outs = [
        select_patches(imp, 20, 0.5, generator=gen.manual_seed(4), backend=be) for be in ("auto", "torch", "triton")
    ]
    _assert_same(outs[0], outs[1])
    _assert_same(outs[2], outs[1])


# ------------------------------------------------------------------------------------------------------------------
# select_patches: statistics of the random part (torch backend; seeded, so deterministic)
# ------------------------------------------------------------------------------------------------------------------


def _within_binomial(count: torch.Tensor, n: int, p: float, sds: float = 5.0) -> bool:
    # 5 standard deviations: a false failure has probability ~6e-7 per position (the seeds are fixed anyway)
    return bool(((count.double() - n * p).abs() <= sds * math.sqrt(n * p * (1 - p))).all())


def test_random_masking_is_uniform_and_ignores_importance():
    n, L, nm = 4000, 16, 12
    imp = torch.linspace(0, 1, L).expand(n, L).contiguous()  # strongly ordered importance
    gen = torch.Generator().manual_seed(0)
    _, _, mask = select_patches(imp, nm, 0.0, generator=gen, backend="torch")
    freq = mask.sum(dim=0)
    assert _within_binomial(freq, n, nm / L), freq / n
    # chi-square of the 16 position counts against uniform (15 dof; the 99.99% quantile is ~44.3)
    chi2 = ((freq - n * nm / L) ** 2 / (n * nm / L)).sum().item()
    assert chi2 < 44.3, chi2
    # with no guidance the importance plays no part at all: same noise, any importance, same result
    noise = torch.rand(64, L, generator=gen)
    a = select_patches_reference(imp[:64], noise, nm, 0)
    b = select_patches_reference(torch.rand(64, L, generator=gen), noise, nm, 0)
    _assert_same(a, b)


def test_guided_remainder_is_uniform_among_the_rest():
    """gf=0.5 of 12 masked = 6 top patches always masked; the other 6 uniform among the 10 remaining."""
    n, L, nm = 4000, 16, 12
    imp = torch.randperm(L, generator=torch.Generator().manual_seed(1)).float().expand(n, L).contiguous()
    top = imp[0].topk(6).indices
    rest = torch.tensor([i for i in range(L) if i not in set(top.tolist())])
    _, _, mask = select_patches(imp, nm, 0.5, generator=torch.Generator().manual_seed(2), backend="torch")
    assert torch.equal(mask[:, top], torch.ones(n, 6))
    assert _within_binomial(mask[:, rest].sum(dim=0), n, 6 / 10)
    # pairs among the rest: P(both masked) = C(8,4)/C(10,6) = 1/3 (independent of which pair)
    both = (mask[:, rest[:, None]] * mask[:, rest[None, :]]).sum(dim=0)
    off_diag = both[~torch.eye(10, dtype=torch.bool)]
    assert _within_binomial(off_diag, n, 1 / 3)


# ------------------------------------------------------------------------------------------------------------------
# gather_tokens
# ------------------------------------------------------------------------------------------------------------------


def _rows(B, L, M, gen, unique=True):
    if unique:
        return torch.stack([torch.randperm(L, generator=gen)[:M] for _ in range(B)])
    return torch.randint(0, L, (B, M), generator=gen)


def _close_to_fp64(got, eager, exact, dtype):
    """fp32: <= 1e-5 relative to the fp64 result; fp16/bf16: <= 2x the eager op's error in the same dtype."""
    err = (got.double().cpu() - exact).abs().max().item()
    if dtype == torch.float32:
        return err <= 1e-5 * max(exact.abs().max().item(), 1e-30)
    ref_err = (eager.double().cpu() - exact).abs().max().item()
    return err <= 2 * ref_err + 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("B,L,M,D", [(3, 49, 1, 7), (2, 49, 49, 96), (4, 7, 5, 1), (1, 300, 49, 33), (2, 5, 0, 7)])
def test_gather_tokens_matches_reference(kernel_device, dtype, B, L, M, D):
    gen = torch.Generator().manual_seed(B * 100 + M)
    x = torch.randn(B, L, D, generator=gen).to(dtype)
    ids = _rows(B, L, M, gen)
    go = torch.randn(B, M, D, generator=gen).to(dtype)

    xk = x.to(kernel_device).clone().requires_grad_(True)
    out = gather_tokens(xk, ids.to(kernel_device), backend="triton")
    out.backward(go.to(kernel_device))

    xr = x.clone().requires_grad_(True)
    want = gather_tokens_reference(xr, ids)
    want.backward(go)
    # a copy forward and a one-writer scatter backward: bit-exact in every dtype
    assert out.dtype == dtype and torch.equal(out.detach().cpu(), want)
    assert xk.grad.dtype == dtype and torch.equal(xk.grad.cpu(), xr.grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_gather_tokens_duplicate_ids(kernel_device, dtype):
    """Repeated ids: forward copies, backward sums the repeats (deterministically, in fp32)."""
    gen = torch.Generator().manual_seed(8)
    B, L, M, D = 3, 11, 40, 20
    x = torch.randn(B, L, D, generator=gen).to(dtype)
    ids = _rows(B, L, M, gen, unique=False)
    go = torch.randn(B, M, D, generator=gen).to(dtype)
    out = gather_tokens(x.to(kernel_device), ids.to(kernel_device), backend="triton")
    assert torch.equal(out.cpu(), gather_tokens_reference(x, ids))
    got = torch.ops.freeatm.gather_tokens_backward(go.to(kernel_device), ids.to(kernel_device), L, "triton")
    exact = gather_tokens_backward_reference(go.double(), ids, L)
    eager = gather_tokens_backward_reference(go, ids, L)
    assert _close_to_fp64(got, eager, exact, dtype)
    again = torch.ops.freeatm.gather_tokens_backward(go.to(kernel_device), ids.to(kernel_device), L, "triton")
    assert torch.equal(got, again)  # deterministic


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_gather_tokens_strided(kernel_device, backend):
    device = kernel_device if backend == "triton" else torch.device("cpu")
    gen = torch.Generator().manual_seed(6)
    B, L, M, D = 2, 13, 9, 10
    ids = _rows(B, L, M, gen).to(device)
    views = {
        "feature-major": torch.randn(B, D, L, generator=gen).to(device).transpose(1, 2),  # stride_d = L
        "every-other-token": torch.randn(B, 2 * L, D, generator=gen).to(device)[:, ::2],
        "batch-last": torch.randn(L, D, B, generator=gen).to(device).permute(2, 0, 1),
    }
    for name, x in views.items():
        x = x.detach().requires_grad_(True)
        out = gather_tokens(x, ids, backend=backend)
        go = torch.randn(B, D, M, generator=gen).to(device).transpose(1, 2)  # strided gradient too
        out.backward(go)
        xr = x.detach().contiguous().requires_grad_(True)
        want = gather_tokens_reference(xr, ids)
        want.backward(go)
        assert torch.equal(out, want), name
        assert torch.equal(x.grad, xr.grad), name
    # non-contiguous ids (a slice of ids_shuffle, like MAE's ids_keep)
    x = torch.randn(B, L, D, generator=gen).to(device)
    ids_full = _rows(B, L, L, gen).to(device)
    assert torch.equal(gather_tokens(x, ids_full[:, :M], backend=backend), gather_tokens_reference(x, ids_full[:, :M]))


def test_gather_tokens_fp64_and_double_backward(kernel_device):
    gen = torch.Generator().manual_seed(12)
    B, L, M, D = 2, 5, 6, 3  # 6 ids among 5 rows: duplicates, so the summing path is differentiated too
    x = torch.randn(B, L, D, generator=gen, dtype=torch.float64).to(kernel_device).requires_grad_(True)
    ids = _rows(B, L, M, gen, unique=False).to(kernel_device)
    fn = lambda x_: gather_tokens(x_, ids, backend="triton")  # noqa: E731
    # fast mode (random projections of the Jacobians): 0.5 s instead of 9 s under the interpreter
    assert torch.autograd.gradcheck(fn, (x,), fast_mode=True)
    assert torch.autograd.gradgradcheck(fn, (x,), fast_mode=True)


def test_mae_masking_round_trip_through_kernels(kernel_device):
    """MAE's masking step end to end on the kernels: select, gather visible tokens, unshuffle with mask tokens."""
    B, L, nm, D = 3, 49, 36, 8
    x = torch.randn(B, L, D, device=kernel_device)
    imp = torch.rand(B, L, device=kernel_device)
    ids_keep, ids_restore, mask = select_patches(imp, nm, 0.5, backend="triton")
    _check_invariants(ids_keep.cpu(), ids_restore.cpu(), mask.cpu(), nm)
    x_masked = gather_tokens(x, ids_keep, backend="triton")
    x_ = torch.cat([x_masked, torch.zeros(B, nm, D, device=kernel_device)], dim=1)
    x_ = gather_tokens(x_, ids_restore, backend="triton")
    assert torch.equal(x_, x * (1 - mask).unsqueeze(-1))


# ------------------------------------------------------------------------------------------------------------------
# argument errors
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args,kwargs,match",
    [
        ((torch.rand(2, 10), 11, 0.5), {}, r"num_masked .*\[0, L=10\].*11"),
        ((torch.rand(2, 10), -1, 0.5), {}, r"num_masked.*-1"),
        ((torch.rand(2, 10), 3.0, 0.5), {}, r"num_masked.*3\.0"),
        ((torch.rand(2, 10), 5, 1.5), {}, r"guided_fraction.*1\.5"),
        ((torch.rand(2, 10), 5, -0.1), {}, r"guided_fraction.*-0\.1"),
        ((torch.rand(2, 10), 5, float("nan")), {}, r"guided_fraction.*nan"),
        ((torch.rand(2, 10), 5, "half"), {}, r"guided_fraction.*'half'"),
        ((torch.rand(10), 5, 0.5), {}, r"\[B, L\].*\(10,\)"),
        ((torch.rand(2, 3, 4), 1, 0.5), {}, r"\[B, L\].*\(2, 3, 4\)"),
        ((torch.rand(2, 10, dtype=torch.float64), 5, 0.5), {}, r"float32/float16/bfloat16.*float64"),
        ((torch.ones(2, 10, dtype=torch.int64), 5, 0.5), {}, r"torch.int64"),
        ((torch.rand(2, 10), 5, 0.5), {"backend": "cuda"}, r"no CUDA C\+\+ implementation"),
        ((torch.rand(2, 10), 5, 0.5), {"backend": "fast"}, r"backend must be one of"),
    ],
)
def test_select_patches_errors(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        select_patches(*args, **kwargs)


def test_select_patches_op_errors():
    imp = torch.rand(2, 10)
    with pytest.raises(ValueError, match=r"num_guided must be in \[0, num_masked=4\], got 5"):
        _op(imp, torch.rand(2, 10), 4, 5, "torch")
    with pytest.raises(ValueError, match=r"noise must be float32 of the importance shape \(2, 10\).*\(2, 9\)"):
        _op(imp, torch.rand(2, 9), 4, 2, "torch")
    with pytest.raises(ValueError, match=r"noise.*torch.float16"):
        _op(imp, torch.rand(2, 10).half(), 4, 2, "torch")


@pytest.mark.parametrize(
    "x,ids,match",
    [
        (torch.rand(2, 5, 3), torch.zeros(2, 4, dtype=torch.int32), r"int64 \[B, M\].*\(2, 4\), torch.int32"),
        (torch.rand(2, 5, 3), torch.zeros(2, 4, 1, dtype=torch.int64), r"int64 \[B, M\].*\(2, 4, 1\)"),
        (torch.rand(2, 5, 3), torch.zeros(3, 4, dtype=torch.int64), r"\(2, 5, 3\) and ids \(3, 4\) differ in batch"),
        (torch.rand(2, 5), torch.zeros(2, 4, dtype=torch.int64), r"\[B, L, D\].*\(2, 5\)"),
        (torch.ones(2, 5, 3, dtype=torch.int32), torch.zeros(2, 4, dtype=torch.int64), r"torch.int32"),
    ],
)
def test_gather_tokens_errors(x, ids, match):
    with pytest.raises(ValueError, match=match):
        gather_tokens(x, ids, backend="torch")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_gather_tokens_backward_op_errors(kernel_device, backend):
    device = kernel_device if backend == "triton" else torch.device("cpu")
    ids = torch.zeros(2, 4, dtype=torch.int64, device=device)
    with pytest.raises(ValueError, match=r"grad_out \(2, 3, 5\) does not match ids \(2, 4\)"):
        torch.ops.freeatm.gather_tokens_backward(torch.rand(2, 3, 5, device=device), ids, 7, backend)
    with pytest.raises(ValueError, match=r"L must be >= 0, got -1"):
        torch.ops.freeatm.gather_tokens_backward(torch.rand(2, 4, 5, device=device), ids, -1, backend)


def test_errors_on_device_mismatch_and_unusable_backend():
    if not torch.cuda.is_available():
        # without a GPU, "meta" stands in for a second device: the check must name both devices
        with pytest.raises(ValueError, match=r"x on cpu but ids on meta"):
            gather_tokens(torch.rand(2, 5, 3), torch.zeros(2, 4, dtype=torch.int64, device="meta"), backend="torch")
        return
    with pytest.raises(ValueError, match=r"x on cpu but ids on cuda"):
        gather_tokens(torch.rand(2, 5, 3), torch.zeros(2, 4, dtype=torch.int64, device="cuda"), backend="torch")
    with pytest.raises(ValueError, match=r"importance on cpu but noise on cuda"):
        _op(torch.rand(2, 10), torch.rand(2, 10, device="cuda"), 4, 2, "torch")
    # compiled Triton kernels cannot take CPU tensors
    with pytest.raises(ValueError, match=r"backend='triton' cannot run on cpu"):
        select_patches(torch.rand(2, 10), 5, 0.5, backend="triton")
    with pytest.raises(ValueError, match=r"generator is on cpu"):
        select_patches(torch.rand(2, 10, device="cuda"), 5, 0.5, generator=torch.Generator(), backend="torch")


# ------------------------------------------------------------------------------------------------------------------
# custom-op registration and torch.compile
# ------------------------------------------------------------------------------------------------------------------


def _opcheck_backends(kernel_device):
    # "torch" on CPU tensors always; "triton" on the kernel device (CPU under the interpreter, else CUDA)
    return [("torch", torch.device("cpu")), ("triton", kernel_device)]


def test_opcheck_select_patches(kernel_device):
    for backend, device in _opcheck_backends(kernel_device):
        imp = torch.rand(3, 23, device=device)
        noise = torch.rand(3, 23, device=device)
        for nm, g in ((17, 8), (0, 0), (23, 23)):
            torch.library.opcheck(torch.ops.freeatm.select_patches.default, (imp, noise, nm, g, backend))


def test_opcheck_gather_tokens(kernel_device):
    gen = torch.Generator().manual_seed(0)
    for backend, device in _opcheck_backends(kernel_device):
        x = torch.randn(2, 9, 5, generator=gen).to(device).requires_grad_(True)
        ids = _rows(2, 9, 4, gen).to(device)
        torch.library.opcheck(torch.ops.freeatm.gather_tokens.default, (x, ids, backend))
        go = torch.randn(2, 4, 5, generator=gen).to(device).requires_grad_(True)
        torch.library.opcheck(torch.ops.freeatm.gather_tokens_backward.default, (go, ids, 9, backend))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_torch_compile_fullgraph(kernel_device, backend):
    """The MAE masking step (select + gather + backward) traces without graph breaks."""
    device = kernel_device if backend == "triton" else torch.device("cpu")

    def masked_tokens(imp, x):
        ids_keep, ids_restore, mask = select_patches(imp, 36, 0.5, backend=backend)
        return gather_tokens(x, ids_keep, backend=backend), ids_restore, mask

    # aot_eager: traces dynamo + AOTAutograd with our ops opaque, and keeps torch.rand on the eager RNG stream
    compiled = torch.compile(masked_tokens, fullgraph=True, backend="aot_eager")
    imp = torch.rand(2, 49, device=device)
    x = torch.randn(2, 49, 8, device=device, requires_grad=True)
    torch.manual_seed(3)
    got = compiled(imp, x)
    torch.manual_seed(3)
    want = masked_tokens(imp, x)
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g, w)
    (grad,) = torch.autograd.grad(got[0].sum(), x)
    assert torch.equal(grad, (1 - want[2]).unsqueeze(-1).expand_as(x))


# ------------------------------------------------------------------------------------------------------------------
# GPU: compiled Triton at the ViT-B/16 MAE shape
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("guided_fraction", [0.0, 0.5, 1.0])
def test_cuda_select_patches_vit_b16(guided_fraction):
    B, L, nm = 256, 196, 147
    gen = torch.Generator(device="cuda").manual_seed(0)
    imp = torch.rand(B, L, device="cuda", generator=gen).to(torch.bfloat16)  # bf16 importance: many ties
    noise = torch.rand(B, L, device="cuda", generator=gen)
    g = num_guided_patches(nm, guided_fraction)
    got = _op(imp, noise, nm, g, "triton")
    want = select_patches_reference(imp, noise, nm, g)
    _assert_same(got, want)
    _check_invariants(*got, nm)
    if guided_fraction == 0.0:
        _assert_same(got, _mae_random_masking(noise, nm))


@pytest.mark.cuda
def test_cuda_select_patches_long_rows():
    gen = torch.Generator(device="cuda").manual_seed(1)
    for B, L, nm, g in ((16, 784, 588, 294), (4, 4096, 3072, 1000), (64, 257, 200, 77)):
        imp = torch.rand(B, L, device="cuda", generator=gen)
        noise = torch.rand(B, L, device="cuda", generator=gen)
        _assert_same(_op(imp, noise, nm, g, "triton"), select_patches_reference(imp, noise, nm, g))


@pytest.mark.cuda
def test_cuda_gather_tokens_vit_b16():
    B, L, nm, D = 256, 196, 147, 768
    gen = torch.Generator(device="cuda").manual_seed(2)
    x = torch.randn(B, L, D, device="cuda", generator=gen).to(torch.bfloat16)
    ids_keep, ids_restore, _ = select_patches(torch.rand(B, L, device="cuda"), nm, 0.5, generator=gen)
    for ids in (ids_keep, ids_restore):  # encoder gather (M=49) and decoder unshuffle (M=L)
        xk = x.clone().requires_grad_(True)
        out = gather_tokens(xk, ids, backend="triton")
        go = torch.randn_like(out)
        out.backward(go)
        xr = x.clone().requires_grad_(True)
        want = gather_tokens_reference(xr, ids)
        want.backward(go)
        assert torch.equal(out, want)
        assert torch.equal(xk.grad, xr.grad)
    # duplicates on the GPU: fp32 sums in ascending order vs the fp64 truth
    ids = torch.randint(0, L, (B, 64), device="cuda", generator=gen)
    go = torch.randn(B, 64, D, device="cuda", generator=gen).to(torch.bfloat16)
    got = torch.ops.freeatm.gather_tokens_backward(go, ids, L, "triton")
    exact = gather_tokens_backward_reference(go.double(), ids, L).cpu()
    eager = gather_tokens_backward_reference(go, ids, L)
    assert _close_to_fp64(got, eager, exact, torch.bfloat16)
