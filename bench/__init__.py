"""Benchmarks of freeatm_fast; results are JSON lines under bench/results/ (DESIGN.md §9).

On a machine without a GPU the Triton kernels can only run in the interpreter, and Triton decides
that when the kernels are decorated, so the flag is set here, before any ``bench.*`` module imports
``freeatm_kernels``. Interpreter timings are recorded as such and are not speed measurements.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
