"""Command line of curvjax: ``python -m curvjax <command>``.

Commands:
  demo    train a small CNN on scikit-learn's digits and print a table of every quantity
          curvjax computes, with its wall time relative to the gradient.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def build_parser() -> argparse.ArgumentParser:
    """Returns the argument parser of ``python -m curvjax``."""
    parser = argparse.ArgumentParser(
        prog="python -m curvjax",
        description="curvjax: per-example gradients, curvature and spectra for JAX functions.",
    )
    commands = parser.add_subparsers(dest="command", metavar="command")
    demo = commands.add_parser(
        "demo",
        help="train a small CNN on sklearn digits and time every curvjax quantity",
        description=(
            "Train a small flax CNN on scikit-learn's 8x8 digits with Adam, print train/test "
            "accuracy, then print each curvjax quantity's summary and its wall time as a ratio "
            "to a jitted jax.grad."
        ),
    )
    demo.add_argument("--steps", type=int, default=300, help="Adam steps (default: 300)")
    demo.add_argument(
        "--batch-size",
        type=int,
        default=128,
        help="mini-batch size for training and for the table (default: 128)",
    )
    demo.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    demo.add_argument(
        "--plot",
        metavar="PATH",
        default=None,
        help="also write the Hessian's spectral density (stochastic Lanczos quadrature) to PATH, "
        "a PNG",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Runs ``python -m curvjax`` with ``argv`` (default: ``sys.argv[1:]``); returns the status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    if args.command == "demo":
        if args.steps < 0 or args.batch_size < 1:
            parser.error("--steps must be >= 0 and --batch-size >= 1")
        from curvjax._src.demo import run_demo  # imported here: it pulls in flax and sklearn

        run_demo(steps=args.steps, batch_size=args.batch_size, seed=args.seed, plot=args.plot)
        return 0
    parser.error(f"unknown command {args.command!r}")  # unreachable: argparse checks choices
    return 2


if __name__ == "__main__":
    sys.exit(main())
