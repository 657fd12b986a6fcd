"""Second-order overhead (BackPACK Fig. 6, right half, and Fig. 9): curvature vs the gradient.

For DeepOBS 3C3D with 10 and with 100 classes (CIFAR shapes, N = 64) it times, in one run,
``ggn_diag``, ``ggn_diag_mc``, ``kfac``, ``kflr`` and ``hvp`` as ratios to the jitted ``jax.grad`` of
the same loss (and to ``curvjax.grad``), and BackPACK's DiagGGNExact, DiagGGNMC, KFAC and KFLR on the
same weights and data as ratios to its own backward pass. ``hessian_diag`` is timed on a small
network with one sigmoid (BackPACK's Fig. 9 setting) against BackPACK's DiagHessian. XLA flops and
temporary memory come from the compiled programs; the flops of quantities that form per-example
gradients a chunk of examples at a time (``lax.scan``) count the loop body once, so they are a
lower bound. Every row also has its compile time and its first-call time (compile plus first run
for curvjax; BackPACK's very first call in the run), and whether curvjax's first call took at most
as long as BackPACK's. The last column checks the speed targets (absolute, or half BackPACK's
ratio).

Usage::

    python benchmarks/curvature.py            # full size, writes benchmarks/results/curvature-*.json
    python benchmarks/curvature.py --smoke    # tiny models, every code path (CI)
    python benchmarks/curvature.py --problems 3c3d-10 --rows ggn_diag --repeats 1

``python benchmarks/overhead.py`` (``--part all``, its default) runs this experiment after the
first-order one, so that one run gives both ratios on 3c3d.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
# An installed curvjax comes first; otherwise the checkout this script lies in.
sys.path.append(str(pathlib.Path(__file__).resolve().parent.parent))
import harness  # noqa: E402  (sits beside this script)
import models  # noqa: E402
import report  # noqa: E402

import curvjax  # noqa: E402

JAX_ROWS = ("ggn_diag", "ggn_diag_mc", "kfac", "kflr", "hvp")
#: Largest relative error of BackPACK's GGN (or Hessian) diagonal against curvjax's: both sum
#: squares over classes and examples in float32 in different orders (measured: about 1e-3 on 3c3d).
BACKPACK_TOLERANCE = 1e-2

BACKPACK_ROWS = {
    "ggn_diag": "DiagGGNExact",
    "ggn_diag_mc": "DiagGGNMC",
    "kfac": "KFAC",
    "kflr": "KFLR",
    "hessian_diag": "DiagHessian",
}


class SigmoidNet(nn.Module):
    """Flatten -> Dense(64) -> sigmoid -> Dense(10): one non-piecewise-linear activation."""

    @nn.compact
    def __call__(self, x):
        hidden = nn.Dense(64)(x.reshape(x.shape[0], -1))
        return nn.Dense(10)(nn.sigmoid(hidden))


def _jax_functions(apply_fn, rows):
    """Name -> ``f(params, batch)``: the gradients and the curvature quantities ``rows``."""
    key = jax.random.key(0)

    def plain_grad(p, b):
        return jax.grad(lambda q: harness.mean_cross_entropy(apply_fn(q, b[0]), b[1]))(p)

    fns = {
        "grad": plain_grad,
        "curvjax.grad": lambda p, b: curvjax.grad(apply_fn, p, b),
        # the loss gradient through curvjax's per-example evaluator of the taps, which the
        # curvature quantities start from (with its faster max-pool derivative)
        "extract (loss, grad)": lambda p, b: curvjax.extract(apply_fn, p, b),
    }
    table = {
        "ggn_diag": lambda p, b: curvjax.ggn_diag(apply_fn, p, b),
        "ggn_diag_mc": lambda p, b: curvjax.ggn_diag_mc(apply_fn, p, b, key=key),
        "kfac": lambda p, b: curvjax.kfac(apply_fn, p, b, key=key),
        "kflr": lambda p, b: curvjax.kflr(apply_fn, p, b),
        "hvp": lambda p, b: curvjax.hvp(apply_fn, p, b, p),
        "hessian_diag": lambda p, b: curvjax.hessian_diag(apply_fn, p, b),
    }
    fns.update({r: table[r] for r in rows})
    return fns


def _sigmoid_twin(variables):
    import torch

    p = variables["params"]
    w0, b0 = np.asarray(p["Dense_0"]["kernel"]), np.asarray(p["Dense_0"]["bias"])
    w1, b1 = np.asarray(p["Dense_1"]["kernel"]), np.asarray(p["Dense_1"]["bias"])
    twin = torch.nn.Sequential(
        torch.nn.Flatten(),
        torch.nn.Linear(w0.shape[0], 64),
        torch.nn.Sigmoid(),
        torch.nn.Linear(64, 10),
    )
    with torch.no_grad():
        twin[1].weight.copy_(torch.from_numpy(w0.T.copy()))
        twin[1].bias.copy_(torch.from_numpy(b0.copy()))
        twin[3].weight.copy_(torch.from_numpy(w1.T.copy()))
        twin[3].bias.copy_(torch.from_numpy(b1.copy()))
    return twin


def _backpack_calls(twin, inputs, targets, rows, threads):
    import backpack
    import backpack.extensions as extensions
    import torch

    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    torch.set_num_threads(threads)
    model = backpack.extend(twin)
    loss_fn = backpack.extend(torch.nn.CrossEntropyLoss())
    y = torch.from_numpy(np.asarray(targets, dtype=np.int64)).to(inputs.device)

    def backward(extension=None):
        model.zero_grad(set_to_none=True)
        value = loss_fn(model(inputs), y)
        if extension is None:
            value.backward()
        else:
            with backpack.backpack(getattr(extensions, extension)()):
                value.backward()
        harness.torch_sync()

    calls = {"grad": backward}
    for r in rows:
        calls[r] = lambda e=BACKPACK_ROWS[r]: backward(e)
    return calls, model


def run_problem(
    name, model, input_shape, nchw, rows, batch_size, repeats, warmup, threads, use_torch
):
    """Compile, time and (against BackPACK) check the quantities ``rows`` on one network."""
    key = jax.random.key(0)
    variables = models.init_model(model, key, input_shape)
    inputs = jax.random.normal(jax.random.key(1), (batch_size, *input_shape), jnp.float32)
    num_classes = model.num_classes if hasattr(model, "num_classes") else 10
    targets = jax.random.randint(jax.random.key(2), (batch_size,), 0, num_classes)
    batch = (inputs, targets)
    compiled = {
        n: harness.compile_and_first_call(f, variables, batch)
        for n, f in _jax_functions(model.apply, rows).items()
    }
    outputs = {n: c.output for n, c in compiled.items()}
    calls = {
        n: (lambda c=c.fn: jax.block_until_ready(c(variables, batch))) for n, c in compiled.items()
    }
    timing = harness.time_round_robin(calls, repeats, warmup)
    medians = timing.medians
    result = {
        "model": name,
        "num_params": models.count_params(variables),
        "batch_size": batch_size,
        "jax": {
            n: {
                "seconds": medians[n],
                "ratio": medians[n] / medians["grad"],
                "fastest_ratio": min(timing.samples[n]) / min(timing.samples["grad"]),
                "compile_seconds": compiled[n].compile_seconds,
                "first_call_seconds": compiled[n].first_call_seconds,
                **compiled[n].costs,
            }
            for n in medians
        },
    }
    del compiled
    if use_torch:
        import torch

        device = harness.torch_device()
        twin = (
            _sigmoid_twin(variables)
            if isinstance(model, SigmoidNet)
            else models.torch_sequential_from_flax(model, variables, input_shape)
        ).to(device)
        x = np.asarray(inputs)
        if nchw:
            x = x.transpose(0, 3, 1, 2)
        x = torch.from_numpy(np.array(x, dtype=np.float32, order="C")).to(device)
        bp_rows = [r for r in rows if r in BACKPACK_ROWS]
        bp_calls, bp_model = _backpack_calls(twin, x, targets, bp_rows, threads)
        bp = harness.time_round_robin(bp_calls, repeats, warmup)
        result["backpack"] = {
            n: {
                "seconds": bp.medians[n],
                "ratio": bp.medians[n] / bp.medians["grad"],
                "fastest_ratio": min(bp.samples[n]) / min(bp.samples["grad"]),
                # the round-robin's first warm-up round holds BackPACK's very first calls
                "first_call_seconds": bp.first[n],
            }
            for n in bp.medians
        }
        result["device"] = device
        if "ggn_diag" in rows or "hessian_diag" in rows:  # same numbers, not only same speed
            which = "ggn_diag" if "ggn_diag" in rows else "hessian_diag"
            bp_calls[which]()
            attr = "diag_ggn_exact" if which == "ggn_diag" else "diag_h"
            ours = outputs[which]
            if isinstance(model, SigmoidNet):
                p = ours["params"]
                expected = [
                    np.asarray(p["Dense_0"]["kernel"]).T,
                    np.asarray(p["Dense_0"]["bias"]),
                    np.asarray(p["Dense_1"]["kernel"]).T,
                    np.asarray(p["Dense_1"]["bias"]),
                ]
            else:
                expected = models.to_torch_layout(model, ours["params"], input_shape)
            values = [getattr(p, attr).cpu().numpy() for p in bp_model.parameters()]
            result["backpack_relative_error"] = {which: harness.relative_error(values, expected)}
    return result


def problems(smoke: bool):
    """``(short name, title, model, input shape, NCHW twin, rows)`` of each network."""
    if smoke:
        small = {"conv_features": (4, 6, 8), "dense_features": (16, 8)}
        return [
            (
                "3c3d-10",
                "3c3d-tiny (10 classes)",
                models.ThreeC3D(num_classes=10, **small),
                models.CIFAR_SHAPE,
                True,
                JAX_ROWS,
            ),
            ("sigmoid", "sigmoid net", SigmoidNet(), (8, 8, 1), False, ("hessian_diag",)),
        ]
    return [
        (
            f"3c3d-{c}",
            f"3c3d ({c} classes)",
            models.ThreeC3D(num_classes=c),
            models.CIFAR_SHAPE,
            True,
            JAX_ROWS,
        )
        for c in (10, 100)
    ] + [
        (
            "sigmoid",
            "sigmoid net (Fig. 9)",
            SigmoidNet(),
            models.CIFAR_SHAPE,
            False,
            ("hessian_diag",),
        )
    ]


#: Names accepted by ``--problems``.
PROBLEM_NAMES = ("3c3d-10", "3c3d-100", "sigmoid")


def run(
    smoke: bool,
    repeats: int,
    warmup: int,
    batch_size: int,
    threads: int,
    use_torch: bool,
    selected: tuple[str, ...] = PROBLEM_NAMES,
    rows: tuple[str, ...] | None = None,
    env: dict | None = None,
) -> dict:
    """Time every selected problem, printing each table as it is done; the JSON document."""
    env = harness.environment() if env is None else env
    results = []
    for short, name, model, shape, nchw, problem_rows in problems(smoke):
        if short not in selected:
            continue
        if rows is not None:
            problem_rows = tuple(r for r in problem_rows if r in rows)
            if not problem_rows:
                continue
        batch = 8 if smoke else batch_size
        start = time.perf_counter()
        results.append(
            run_problem(
                name, model, shape, nchw, problem_rows, batch, repeats, warmup, threads, use_torch
            )
        )
        print(report.curvature_table(results[-1:]), flush=True)
        print(f"({name}: {time.perf_counter() - start:.1f} s)", flush=True)
    failures = [
        f"{r['model']}: BackPACK {q} relative error {e:.2e}"
        for r in results
        for q, e in r.get("backpack_relative_error", {}).items()
        if not e <= BACKPACK_TOLERANCE
    ]
    return {
        "experiment": "curvature",
        "title": "second-order overhead (BackPACK Fig. 6 right, Fig. 9)",
        "environment": harness.finish_environment(env),
        "settings": {
            "smoke": smoke,
            "repeats": repeats,
            "warmup": warmup,
            "batch_size": batch_size,
            "torch_threads": threads if use_torch else None,
            "problems": list(selected),
            "rows": None if rows is None else list(rows),
        },
        "results": results,
        "failed_checks": failures,
    }


def main(argv=None) -> int:
    """Run the experiment; print the tables; write the JSON file; 1 if a check failed."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny models, a few repeats (CI)")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls (default 10)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls (default 1)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--no-torch", action="store_true", help="skip the BackPACK comparison")
    parser.add_argument(
        "--problems",
        type=lambda text: tuple(text.split(",")),
        default=PROBLEM_NAMES,
        help=f"comma-separated subset of {','.join(PROBLEM_NAMES)} (default: all)",
    )
    parser.add_argument(
        "--rows",
        type=lambda text: tuple(text.split(",")),
        default=None,
        help="comma-separated subset of the quantities (default: all of each problem)",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: cores)")
    parser.add_argument(
        "--json",
        type=pathlib.Path,
        default=None,
        help="output (default benchmarks/results/curvature-<machine>.json; none with --smoke)",
    )
    args = parser.parse_args(argv)
    harness.fast_compile_for_smoke(args.smoke)
    repeats = args.repeats or (2 if args.smoke else 10)
    threads = args.threads or (1 if args.smoke else harness.usable_cores())
    use_torch = not args.no_torch and harness.torch_available()
    document = run(
        args.smoke,
        repeats,
        args.warmup,
        args.batch_size,
        threads,
        use_torch,
        args.problems,
        args.rows,
    )
    document["command"] = "python benchmarks/curvature.py " + " ".join(
        sys.argv[1:] if argv is None else argv
    )
    if args.json is not None or not args.smoke:
        print(f"wrote {harness.write_results(document, args.json)}")
    for failure in document["failed_checks"]:
        print(f"CHECK FAILED: {failure}", file=sys.stderr)
    return 1 if document["failed_checks"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
