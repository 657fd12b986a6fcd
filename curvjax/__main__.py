"""Command line of curvjax: ``python -m curvjax <command>``.

Commands:
  demo      train a small CNN on scikit-learn's digits and print a table of every quantity
            curvjax computes, with its wall time relative to the gradient.
  demo lm   the same for a small transformer language model trained on the source code of a
            few standard-library modules (per-sequence quantities, padding mask, token mean).
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
        help="train a small model (digits CNN or transformer LM) and time every curvjax quantity",
        description=(
            "digits (default): train a small flax CNN on scikit-learn's 8x8 digits with Adam and "
            "print train/test accuracy. lm: train a small transformer language model on the "
            "source code of a few standard-library modules with AdamW and print its held-out "
            "loss. Then print each curvjax quantity's summary and its wall time as a ratio to a "
            "jitted jax.grad."
        ),
    )
    demo.add_argument(
        "model",
        nargs="?",
        choices=("digits", "lm"),
        default="digits",
        help="digits (a CNN, the default) or lm (a character-level transformer)",
    )
    demo.add_argument("--steps", type=int, default=300, help="optimizer steps (default: 300)")
    demo.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="mini-batch size for training and for the table (default: 128 for digits, 32 "
        "sequences for lm)",
    )
    demo.add_argument(
        "--exact",
        action="store_true",
        help="lm only: also time the exact GGN diagonal, KFLR and the exact Hessian diagonal "
        "(slow: T*V backpropagated columns per sequence)",
    )
    demo.add_argument(
        "--seq-len",
        type=int,
        default=32,
        help="characters per sequence, lm only (default: 32)",
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
        batch_size = args.batch_size
        if batch_size is None:
            batch_size = 32 if args.model == "lm" else 128
        if args.steps < 0 or batch_size < 1 or args.seq_len < 1:
            parser.error("--steps must be >= 0, --batch-size >= 1 and --seq-len >= 1")
        # imported here: the demos pull in flax and sklearn
        from curvjax._src.demo import run_demo, run_lm_demo

        if args.model == "lm":
            run_lm_demo(
                steps=args.steps,
                batch_size=batch_size,
                seq_len=args.seq_len,
                seed=args.seed,
                plot=args.plot,
                exact=args.exact,
            )
        else:
            run_demo(steps=args.steps, batch_size=batch_size, seed=args.seed, plot=args.plot)
        return 0
    parser.error(f"unknown command {args.command!r}")  # unreachable: argparse checks choices
    return 2


if __name__ == "__main__":
    sys.exit(main())
