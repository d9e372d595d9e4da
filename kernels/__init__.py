"""freeatm_kernels: fused GPU ops for Free-ATM-style self-supervised learning.

Standalone: depends on torch and (optionally) triton only, never on ``freeatm_fast``, so other SSL
codebases can ``pip install`` it or copy the folder. Each op has a plain eager ``*_reference`` (the
definition of truth), a Triton kernel, for some a CUDA C++ kernel in ``freeatm_kernels._C``, and one
public function with ``backend="auto" | "torch" | "triton" | "cuda"`` registered as a
``torch.library`` custom op. ``python -m freeatm_kernels.info`` says which backends run here.

Importing this package never initialises CUDA and never loads the compiled extension.
"""

if __name__ != "freeatm_kernels":
    # This folder is also importable as "kernels" when the repository root is on sys.path (`python -m ...` or
    # `python -m pytest` run from the root), and transformers probes for the Hugging Face "kernels" package with
    # importlib.import_module("kernels"). Running the op modules a second time would re-register the freeatm:: custom
    # ops (torch then destroys the first registration, leaving freeatm_kernels' op handles dangling: random
    # "vector::reserve" errors or crashes). Hand out the one real package under the second name instead.
    import importlib as _importlib
    import sys as _sys

    _sys.modules[__name__] = _importlib.import_module("freeatm_kernels")
else:
    from ._backend import BACKENDS
    from .cross_attention_with_maps import cross_attention_with_maps, cross_attention_with_maps_reference
    from .mask_pool import mask_pool, mask_pool_reference
    from .select_patches import (
        gather_tokens,
        gather_tokens_reference,
        num_guided_patches,
        select_patches,
        select_patches_reference,
    )

    __version__ = "0.1.0"

    __all__ = [
        "BACKENDS",
        "cross_attention_with_maps",
        "cross_attention_with_maps_reference",
        "gather_tokens",
        "gather_tokens_reference",
        "mask_pool",
        "mask_pool_reference",
        "num_guided_patches",
        "select_patches",
        "select_patches_reference",
    ]
