"""The long fuzzing run: many random models, every quantity against its float64 reference.

Draws models from the grammar of ``tests/fuzz_models.py`` with hypothesis (generation only: a
failure is recorded with its model and the run goes on; shrink it afterwards with
``tests/test_fuzz.py``), checks every quantity of each (``fuzz_models.check``: per-example
gradients, ``batch_l2``, ``variance``, ``ggn_diag``, ``clipped_grad`` against ``vmap(grad)``
and the dense GGN; ``kflr`` / ``kfac`` finite, symmetric and PSD; the exact ``hessian_diag``
equal to ``diag(jax.hessian)`` or refused with its ``ValueError``), and writes
``results/fuzz-<machine>.json``: the number of models, the failures with their reproducers, the
time, the outcome of the Hessian diagonal and a histogram of the grammar's productions.

Usage::

    nice -n 10 timeout 3600 python benchmarks/fuzz.py --models 1000 --seconds 3000
    python benchmarks/fuzz.py --smoke      # 3 models, written under results/ as a smoke run

The JSON is rewritten every ``--every`` models, so a run stopped by its time limit keeps what it
checked. XLA compiles at optimisation level 0 (``harness.fast_compile_for_smoke``): compilation
dominates for these tiny programs, and the level does not change float64 semantics.
"""

from __future__ import annotations

import argparse
import collections
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))

import harness  # noqa: E402

harness.fast_compile_for_smoke(True)

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_rank_promotion", "raise")

import fuzz_models  # noqa: E402
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis import seed as hypothesis_seed  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=int, default=1000, help="models to draw")
    parser.add_argument("--seconds", type=float, default=3000.0, help="stop drawing after this")
    parser.add_argument("--seed", type=int, default=0, help="hypothesis seed")
    parser.add_argument("--every", type=int, default=25, help="rewrite the JSON every ... models")
    parser.add_argument("--min-layers", type=int, default=0, help="layers per model, at least")
    parser.add_argument("--max-layers", type=int, default=4, help="layers per model, at most")
    parser.add_argument("--smoke", action="store_true", help="3 models")
    parser.add_argument("--output", type=Path, default=None, help="JSON path (default results/)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.models, args.every = 3, 1
    env = harness.environment(("hypothesis",))
    path = args.output or harness.results_path("fuzz", env)
    histogram: collections.Counter = collections.Counter()
    hessian = collections.Counter()
    worst: dict[str, float] = {}
    failures: list[dict] = []
    seconds: list[float] = []
    start = time.perf_counter()

    def write(final: bool) -> None:
        document = {
            "experiment": "fuzz",
            "command": "python benchmarks/fuzz.py "
            + " ".join(sys.argv[1:] if argv is None else argv),
            "settings": {
                "smoke": args.smoke,
                "models": args.models,
                "seconds": args.seconds,
                "seed": args.seed,
                "layers": [args.min_layers, args.max_layers],
                "batch_size": fuzz_models.N,
                "rtol": fuzz_models.RTOL,
                "quantities": list(fuzz_models.QUANTITIES),
            },
            "finished": final,
            "models_checked": len(seconds),
            "failures": failures,
            "failed_checks": [f"{f['error']}: {f['spec']}" for f in failures],
            "hessian_diag": dict(hessian),
            "worst_relative_error": worst,
            "seconds_total": time.perf_counter() - start,
            "seconds_per_model": {
                "median": sorted(seconds)[len(seconds) // 2] if seconds else None,
                "max": max(seconds, default=None),
            },
            "productions": dict(sorted(histogram.items())),
            "environment": harness.finish_environment(env),
        }
        harness.write_results(document, path=path)

    @hypothesis_seed(args.seed)
    @settings(
        max_examples=args.models,
        deadline=None,
        database=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(fuzz_models.specs(min_layers=args.min_layers, max_layers=args.max_layers))
    def fuzz(spec):
        if time.perf_counter() - start > args.seconds:
            return
        t0 = time.perf_counter()
        histogram.update(fuzz_models.productions(spec))
        try:
            result = fuzz_models.check(spec)
        except Exception as error:  # recorded, the run goes on
            failures.append(
                {
                    "spec": repr(spec),
                    "error": f"{type(error).__name__}: {str(error)[:500]}",
                    "traceback": traceback.format_exc()[-2000:],
                }
            )
            print(f"FAIL {type(error).__name__}: {str(error)[:200]} {spec!r}", flush=True)
        else:
            for name, value in result.items():
                if value == "refused":
                    hessian["refused"] += 1
                elif isinstance(value, float):
                    if name == "hessian_diag":
                        hessian["exact"] += 1
                    worst[name] = max(worst.get(name, 0.0), value)
        seconds.append(time.perf_counter() - t0)
        if len(seconds) % 20 == 0:  # every model compiles new programs: keep the caches small
            jax.clear_caches()
        if len(seconds) % args.every == 0:
            write(False)
            print(f"{len(seconds)} models, {len(failures)} failures", flush=True)

    fuzz()
    write(True)
    print(f"{len(seconds)} models, {len(failures)} failures, wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
