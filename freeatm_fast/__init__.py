"""freeatm_fast: fast Free-ATM training engine (generation with free masks, SSL training, benchmarks).

Importing this package initialises no CUDA and imports no GPU-only package.
"""

__version__ = "0.1.0"
