"""Launch script: ``deepspeed freeatm_fast/train.py [--config NAME|PATH] [key=value ...]``.

Also ``torchrun --nproc_per_node N freeatm_fast/train.py ...`` and plain ``python freeatm_fast/train.py ...``
(one process). NAME is a config shipped in ``freeatm_fast/configs/`` (default ``mocov2_freeatm``: MoCo-v2 with
the Free-ATM instance contrast on the toy world, built on first use); dotted overrides such as
``train.max_steps=100 data.root=/data/shards deepspeed.zero_stage=2`` win over the file.
"""

from __future__ import annotations

import os
import sys

# Run as a script, Python puts freeatm_fast/ itself first on sys.path, where data/, eval/ and config.py would
# shadow top-level modules of the same names: keep only the installed package's view.
_here = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _here]


def parse_args(argv: list[str] | None = None):
    import argparse

    from freeatm_fast.config import DEFAULT_CONFIG, shipped_configs

    parser = argparse.ArgumentParser(
        prog="train.py",
        description="Pretrain a representation with the Free-ATM methods (DESIGN §8).",
        epilog=f"shipped configs: {', '.join(shipped_configs())}",
    )
    parser.add_argument("--config", default=DEFAULT_CONFIG, help="a shipped config NAME or a YAML path")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help="set by the deepspeed launcher")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.max_steps=10")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from freeatm_fast.config import ConfigError, load_config

    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"train.py: config error: {exc}", file=sys.stderr)
        return 2
    from freeatm_fast.engine import train

    try:
        train(cfg, local_rank=args.local_rank)
    except ConfigError as exc:
        print(f"train.py: config error: {exc}", file=sys.stderr)
        return 2
    except (ValueError, OSError) as exc:  # bad data (ShardError names shard and key), missing files
        if os.environ.get("FREEATM_DEBUG") == "1":
            raise
        print(f"train.py: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    code = main()
    from freeatm_fast.engine import shutdown

    shutdown(code)
