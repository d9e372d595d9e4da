"""The ``freeatm`` command.

Sub-commands are added as the parts they drive land (generate, show, train, eval, toy-train: see
DESIGN.md); each one listed here works.
"""

from __future__ import annotations

import argparse


def _cmd_info(args: argparse.Namespace) -> int:
    from freeatm_kernels.info import main as info_main

    return info_main(["--json"] if args.json else [])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="freeatm", description="Free-ATM: fast SSL on diffusion-generated images")
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="which kernel backends (torch, Triton, CUDA extension) run on this machine")
    info.add_argument("--json", action="store_true")
    info.set_defaults(func=_cmd_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
