"""``python -m bench.data [--quick] [...]``: the data-loading benchmark, an alias of ``python -m bench.bench_data``."""

from bench.bench_data import main

if __name__ == "__main__":
    from freeatm_fast.engine import shutdown

    shutdown(main())
