"""Backend resolution: explicit backends that cannot run raise and say why; 'auto' picks the best that can."""

import pytest
import torch

from freeatm_kernels import _backend

CPU = torch.device("cpu")


def test_unknown_backend_is_rejected_by_name():
    with pytest.raises(ValueError, match="'tritonn'"):
        _backend.resolve_backend("mask_pool", "tritonn", CPU, has_cuda_impl=True)


def test_auto_on_cpu_tensors_is_the_torch_reference():
    assert _backend.resolve_backend("mask_pool", "auto", CPU, has_cuda_impl=True) == "torch"


def test_cuda_backend_needs_cuda_tensors():
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        _backend.resolve_backend("mask_pool", "cuda", CPU, has_cuda_impl=True)


def test_cuda_backend_of_a_triton_only_op():
    with pytest.raises(ValueError, match="no CUDA C\\+\\+ implementation"):
        _backend.resolve_backend("select_patches", "cuda", CPU, has_cuda_impl=False)


def test_triton_on_cpu_follows_the_interpreter_flag():
    ok, why = _backend.triton_usable_on(CPU)
    assert ok == (_backend.HAS_TRITON and _backend.TRITON_INTERPRET)
    if ok:
        assert _backend.resolve_backend("mask_pool", "triton", CPU, has_cuda_impl=True) == "triton"
    else:
        with pytest.raises(ValueError, match="backend='triton' cannot run"):
            _backend.resolve_backend("mask_pool", "triton", CPU, has_cuda_impl=True)
        assert why


@pytest.mark.parametrize("n,expected", [(1, 1), (2, 2), (3, 4), (77, 128), (256, 256), (257, 512)])
def test_next_power_of_2(n, expected):
    assert _backend.next_power_of_2(n) == expected
