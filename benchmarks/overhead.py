"""Overhead of curvjax's first-order quantities relative to the gradient (BackPACK, Fig. 6).

For DeepOBS 3c3d (895,210 parameters, CIFAR-10 shapes) and a wide MLP (1,841,162 parameters),
each first-order quantity -- ``per_example_grads``, ``batch_l2``, ``sum_grad_squared``,
``variance``, and ``extract`` with all four at once -- is timed as a ratio to the jitted gradient
measured in the same run (``curvjax.grad`` and a plain ``jax.grad`` of the same loss), next to
the ``jax.vmap(jax.grad)`` per-example baseline that computes the same numbers. XLA's flop count
(``cost_analysis``) and temporary memory (``memory_analysis().temp_size_in_bytes``) of each
compiled function are reported as well, and its compile time and first-call time (compile plus
the first run: what computing a quantity once costs).

When torch and BackPACK are importable, the same network with the same weights and data is run
through BackPACK (``BatchGrad``, ``BatchL2Grad``, ``SumGradSquared``, ``Variance`` and all four
together), timed as ratios to a plain torch forward and backward pass of the same model, with
torch limited to as many threads as the process may use. Before timing, the torch loss and
gradient are checked against JAX's, and BackPACK's quantities against the ``vmap(grad)``
reference; curvjax's quantities are checked against that reference too. BackPACK's first-call
time is the time of the very first call of each extension in the run.

Every time is the median of ``--repeats`` calls after warm-up; the functions of one framework are
called round-robin (one timed call of each per round; a fast one right after an untimed call of
itself) so that drifts of the machine's speed affect them alike. Every time includes the forward
pass.

With ``--part all`` (the default) the second-order experiment of ``curvature.py`` runs after
this one and writes its own file, so that one run gives both ratios on 3c3d.

Usage::

    python benchmarks/overhead.py                 # full size, writes benchmarks/results/*.json
    python benchmarks/overhead.py --smoke         # tiny models, every code path (for CI)
    python benchmarks/overhead.py --part first --batch-size 128 --repeats 20 --json out.json

The script exits with status 1 when a computed quantity disagrees with its reference.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, str(Path(__file__).resolve().parent))
# An installed curvjax comes first; otherwise the checkout this script lies in.
sys.path.append(str(Path(__file__).resolve().parent.parent))

import harness  # noqa: E402  (sits beside this script)
import models  # noqa: E402
import report  # noqa: E402
from harness import RELATIVE_TOLERANCE, mean_cross_entropy, relative_error  # noqa: E402

#: The first-order quantities, in table order; "all" is ``extract`` with all four at once.
QUANTITIES = ("per_example_grads", "batch_l2", "sum_grad_squared", "variance")
ALL = "all"

#: BackPACK extension class name for each quantity.
BACKPACK_EXTENSIONS = {
    "per_example_grads": "BatchGrad",
    "batch_l2": "BatchL2Grad",
    "sum_grad_squared": "SumGradSquared",
    "variance": "Variance",
}


# --------------------------------------------------------------------------------------------
# Problems
# --------------------------------------------------------------------------------------------


@dataclass
class Problem:
    """A model with its parameters and one batch of data."""

    name: str
    model: Any
    variables: Any
    inputs: jax.Array
    targets: jax.Array
    input_shape: tuple[int, ...]
    nchw: bool  # whether the torch twin takes NCHW inputs

    @property
    def num_params(self) -> int:
        """Number of scalar parameters."""
        return models.count_params(self.variables)

    def apply_fn(self, params, inputs):
        """``apply_fn(params, inputs) -> logits [N, C]`` in curvjax's convention."""
        return self.model.apply(params, inputs)


#: Names accepted by ``--models``.
MODEL_NAMES = ("3c3d", "mlp")


def make_problems(
    batch_size: int, smoke: bool, selected: tuple[str, ...] = MODEL_NAMES, seed: int = 0
) -> list[Problem]:
    """3c3d and the wide MLP on random CIFAR-10-shaped data (tiny widths with ``smoke``).

    ``selected`` picks among :data:`MODEL_NAMES`; a model's weights and data do not depend on
    which others are selected.
    """
    if smoke:
        specs = [
            (
                "3c3d (smoke)",
                models.ThreeC3D(conv_features=(4, 6, 8), dense_features=(16, 8)),
                True,
            ),
            ("wide MLP (smoke)", models.WideMLP(hidden_features=(32, 32)), False),
        ]
    else:
        specs = [
            ("3c3d", models.ThreeC3D(), True),
            ("wide MLP", models.WideMLP(), False),
        ]
    key = jax.random.PRNGKey(seed)
    problems = []
    for short_name, (name, model, nchw) in zip(MODEL_NAMES, specs, strict=True):
        key, init_key, x_key, y_key = jax.random.split(key, 4)
        if short_name not in selected:
            continue
        variables = models.init_model(model, init_key, models.CIFAR_SHAPE)
        inputs = jax.random.normal(x_key, (batch_size, *models.CIFAR_SHAPE), jnp.float32)
        targets = jax.random.randint(y_key, (batch_size,), 0, model.num_classes)
        if name == "3c3d" and models.count_params(variables) != models.THREE_C_THREE_D_PARAMS:
            raise AssertionError(
                f"3c3d has {models.count_params(variables):,} parameters, "
                f"DeepOBS's has {models.THREE_C_THREE_D_PARAMS:,}"
            )
        problems.append(Problem(name, model, variables, inputs, targets, models.CIFAR_SHAPE, nchw))
    return problems


# --------------------------------------------------------------------------------------------
# JAX side: the functions to time
# --------------------------------------------------------------------------------------------


def vmap_per_example_grads(apply_fn: Callable, params, batch):
    """``g_n = grad loss_n / N`` for every example, by ``jax.vmap(jax.grad)``."""
    inputs, targets = batch
    size = targets.shape[0]

    def contribution(p, x, y):
        logits = apply_fn(p, x[None])
        return optax.softmax_cross_entropy_with_integer_labels(logits, y[None])[0] / size

    return jax.vmap(jax.grad(contribution), in_axes=(None, 0, 0))(params, inputs, targets)


def quantities_from_per_example(per_example, names) -> dict[str, Any]:
    """The first-order quantities ``names`` computed from per-example gradients ``[N, ...]``."""
    tree_map = jax.tree_util.tree_map
    out = {}
    for name in names:
        if name == "per_example_grads":
            out[name] = per_example
        elif name == "batch_l2":
            out[name] = tree_map(lambda g: jnp.sum(g**2, axis=tuple(range(1, g.ndim))), per_example)
        elif name == "sum_grad_squared":
            out[name] = tree_map(lambda g: jnp.sum(g**2, axis=0), per_example)
        elif name == "variance":
            out[name] = tree_map(
                lambda g: jnp.mean(g**2, axis=0) - jnp.mean(g, axis=0) ** 2, per_example
            )
        else:
            raise ValueError(f"unknown quantity {name!r}")
    return out


def jax_functions(problem: Problem, vmap_rows: bool = True) -> dict[str, Callable]:
    """Name -> ``f(params, batch)`` for every JAX function of the benchmark.

    Names: ``jax.grad``, ``vmap:all`` (the ``vmap(grad)`` baseline for all four quantities, also
    the reference of the checks), with ``vmap_rows`` ``vmap:<quantity>`` for each quantity alone,
    and, where curvjax provides them, ``curvjax.grad`` and ``curvjax:<quantity>`` /
    ``curvjax:all`` (``extract``).
    """
    apply_fn = problem.apply_fn

    def plain_grad(params, batch):
        inputs, targets = batch
        return jax.grad(lambda p: mean_cross_entropy(apply_fn(p, inputs), targets))(params)

    functions: dict[str, Callable] = {"jax.grad": plain_grad}
    for name in (*QUANTITIES, ALL) if vmap_rows else (ALL,):
        names = QUANTITIES if name == ALL else (name,)

        def vmap_fn(params, batch, names=names):
            per_example = vmap_per_example_grads(apply_fn, params, batch)
            return quantities_from_per_example(per_example, names)

        functions[f"vmap:{name}"] = vmap_fn

    try:
        import curvjax
    except ImportError:
        return functions
    if hasattr(curvjax, "grad"):
        functions["curvjax.grad"] = lambda params, batch: curvjax.grad(apply_fn, params, batch)
    for name in QUANTITIES:
        if hasattr(curvjax, name):

            def curvjax_fn(params, batch, name=name):
                return {name: getattr(curvjax, name)(apply_fn, params, batch)}

            functions[f"curvjax:{name}"] = curvjax_fn
    if hasattr(curvjax, "extract"):

        def extract_fn(params, batch):
            return curvjax.extract(apply_fn, params, batch, quantities=QUANTITIES)

        functions[f"curvjax:{ALL}"] = extract_fn
    return functions


def run_jax(problem: Problem, repeats: int, warmup: int, vmap_rows: bool) -> dict[str, Any]:
    """Compile, check and time every JAX function of ``problem``."""
    params = problem.variables
    batch = (problem.inputs, problem.targets)
    functions = jax_functions(problem, vmap_rows)
    compiled, costs, compile_seconds, first_call_seconds, outputs = {}, {}, {}, {}, {}
    for name, function in functions.items():
        result = harness.compile_and_first_call(function, params, batch)
        compiled[name] = result.fn
        compile_seconds[name] = result.compile_seconds
        first_call_seconds[name] = result.first_call_seconds
        costs[name] = result.costs
        outputs[name] = result.output

    # Correctness: curvjax against vmap(grad) and jax.grad, from the first calls.
    errors = {}
    reference_grad = outputs["jax.grad"]
    reference = outputs[f"vmap:{ALL}"]
    errors["vmap sum_n g_n (grad)"] = relative_error(
        jax.tree_util.tree_map(lambda g: g.sum(axis=0), reference["per_example_grads"]),
        reference_grad,
    )
    if "curvjax.grad" in outputs:
        errors["curvjax.grad"] = relative_error(outputs["curvjax.grad"], reference_grad)
    for name in (*QUANTITIES, ALL):
        key = f"curvjax:{name}"
        if key not in outputs:
            continue
        names = QUANTITIES if name == ALL else (name,)
        errors[key] = relative_error(
            {k: outputs[key][k] for k in names}, {k: reference[k] for k in names}
        )
        if name == ALL:
            errors[f"{key} (grad)"] = relative_error(outputs[key]["grad"], reference_grad)
    del outputs

    calls = {
        name: (lambda fn=fn: jax.block_until_ready(fn(params, batch)))
        for name, fn in compiled.items()
    }
    timing = harness.time_round_robin(calls, repeats, warmup)
    return {
        "seconds": timing.medians,
        "samples": timing.samples,
        "compile_seconds": compile_seconds,
        "first_call_seconds": first_call_seconds,
        "timing_seconds": timing.total,
        "xla": costs,
        "relative_errors": errors,
        "reference": reference,
    }


def run_backpack(
    problem: Problem, reference: dict[str, Any], threads: int, repeats: int, warmup: int
) -> dict[str, Any]:
    """Check the torch twin against JAX, then time BackPACK's first-order extensions."""
    import backpack
    import backpack.extensions as extensions
    import torch

    # BackPACK's module hooks fire on the first layer although the inputs need no gradient.
    warnings.filterwarnings("ignore", message="Full backward hook is firing")

    torch.set_num_threads(threads)
    device = harness.torch_device()
    plain = models.torch_sequential_from_flax(problem.model, problem.variables, problem.input_shape)
    plain = plain.to(device)
    extended = backpack.extend(copy.deepcopy(plain))
    plain_loss = torch.nn.CrossEntropyLoss()
    extended_loss = backpack.extend(torch.nn.CrossEntropyLoss())
    inputs = np.asarray(problem.inputs)
    if problem.nchw:
        inputs = inputs.transpose(0, 3, 1, 2)
    inputs = torch.from_numpy(np.array(inputs, dtype=np.float32, order="C")).to(device)
    targets = torch.from_numpy(np.asarray(problem.targets, dtype=np.int64)).to(device)

    # Same function, same weights: the losses and gradients must agree with JAX's.
    jax_loss = float(
        mean_cross_entropy(problem.apply_fn(problem.variables, problem.inputs), problem.targets)
    )
    first_call = {}
    begin = time.perf_counter()
    plain.zero_grad(set_to_none=True)
    loss = plain_loss(plain(inputs), targets)
    loss.backward()
    harness.torch_sync()
    first_call["backward"] = time.perf_counter() - begin
    loss_error = abs(loss.item() - jax_loss) / abs(jax_loss)
    jax_grad = jax.grad(
        lambda p: mean_cross_entropy(problem.apply_fn(p, problem.inputs), problem.targets)
    )(problem.variables)
    expected = models.to_torch_layout(problem.model, jax_grad["params"], problem.input_shape)
    grad_error = relative_error([p.grad.cpu().numpy() for p in plain.parameters()], expected)
    if loss_error > RELATIVE_TOLERANCE or grad_error > RELATIVE_TOLERANCE:
        raise AssertionError(
            f"{problem.name}: the torch twin does not match the flax model "
            f"(relative loss error {loss_error:.2e}, gradient error {grad_error:.2e}); "
            "check the layout conversion in benchmarks/models.py"
        )

    def backward(model, loss_fn, *extension_classes):
        model.zero_grad(set_to_none=True)
        value = loss_fn(model(inputs), targets)
        if extension_classes:
            with backpack.backpack(*(cls() for cls in extension_classes)):
                value.backward()
        else:
            value.backward()
        harness.torch_sync()

    ext = {name: getattr(extensions, cls) for name, cls in BACKPACK_EXTENSIONS.items()}
    calls = {"backward": lambda: backward(plain, plain_loss)}
    for name in QUANTITIES:
        calls[name] = lambda cls=ext[name]: backward(extended, extended_loss, cls)
    calls[ALL] = lambda: backward(extended, extended_loss, *ext.values())

    # BackPACK's quantities against the vmap(grad) reference, after one pass with all four.
    _, first_call[ALL] = harness.timed_call(calls[ALL])
    attributes = {
        "per_example_grads": ("grad_batch", 1),
        "batch_l2": ("batch_l2", 1),
        "sum_grad_squared": ("sum_grad_squared", 0),
        "variance": ("variance", 0),
    }
    errors = {"loss": loss_error, "grad": grad_error}
    for name, (attribute, lead) in attributes.items():
        expected = models.to_torch_layout(
            problem.model, reference[name]["params"], problem.input_shape, lead=lead
        )
        values = [getattr(p, attribute).cpu().numpy() for p in extended.parameters()]
        errors[name] = relative_error(values, expected)
    extended.zero_grad(set_to_none=True)

    timing = harness.time_round_robin(calls, repeats, warmup)
    # The very first call of each function in this run: the checks above made the first calls of
    # the plain backward pass and of all four together, the round-robin's warm-up the others'.
    first_call = {**timing.first, **first_call}
    return {
        "seconds": timing.medians,
        "samples": timing.samples,
        "first_call_seconds": first_call,
        "timing_seconds": timing.total,
        "relative_errors": errors,
        "threads": torch.get_num_threads(),
        "device": device,
    }


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def _ratio(numerator, denominator) -> float | None:
    if numerator is None or denominator in (None, 0):
        return None
    return numerator / denominator


def _at_most(ours, theirs) -> bool | None:
    return None if ours is None or theirs is None else bool(ours <= theirs)


def summarise(problem: Problem, jax_result: dict, torch_result: dict | None) -> dict[str, Any]:
    """The ratios of one problem, as stored in the JSON file and printed in the table."""
    seconds = jax_result["seconds"]
    xla = jax_result["xla"]
    grad_time = seconds.get("curvjax.grad")
    plain_time = seconds["jax.grad"]
    plain_flops = xla["jax.grad"]["flops"]
    fastest = {name: min(values) for name, values in jax_result["samples"].items()}
    rows = {}
    for name in ("grad", *QUANTITIES, ALL):
        if name == "grad":
            curv_key, vmap_key, torch_key = "curvjax.grad", None, "backward"
        else:
            curv_key, vmap_key, torch_key = f"curvjax:{name}", f"vmap:{name}", name
        curv_time = seconds.get(curv_key)
        vmap_time = seconds.get(vmap_key) if vmap_key else None
        curv_xla = xla.get(curv_key, {})
        vmap_xla = xla.get(vmap_key, {}) if vmap_key else {}
        row = {
            "curvjax_seconds": curv_time,
            "curvjax_over_curvjax_grad": _ratio(curv_time, grad_time),
            "curvjax_over_jax_grad": _ratio(curv_time, plain_time),
            "vmap_seconds": vmap_time,
            "vmap_over_jax_grad": _ratio(vmap_time, plain_time),
            "curvjax_flops_over_jax_grad": _ratio(curv_xla.get("flops"), plain_flops),
            "vmap_flops_over_jax_grad": _ratio(vmap_xla.get("flops"), plain_flops),
            "curvjax_temp_bytes": curv_xla.get("temp_bytes"),
            "vmap_temp_bytes": vmap_xla.get("temp_bytes"),
            "curvjax_relative_error": jax_result["relative_errors"].get(curv_key),
            "curvjax_compile_seconds": jax_result["compile_seconds"].get(curv_key),
            "curvjax_first_call_seconds": jax_result["first_call_seconds"].get(curv_key),
            "vmap_compile_seconds": jax_result["compile_seconds"].get(vmap_key),
            "vmap_first_call_seconds": jax_result["first_call_seconds"].get(vmap_key),
            # The same ratios from the fastest call instead of the median: background load only
            # ever adds time, so these are the more robust numbers on a busy machine.
            "curvjax_over_jax_grad_min": _ratio(fastest.get(curv_key), fastest["jax.grad"]),
            "vmap_over_jax_grad_min": _ratio(
                fastest.get(vmap_key) if vmap_key else None, fastest["jax.grad"]
            ),
        }
        if torch_result is not None:
            torch_seconds = torch_result["seconds"]
            row["backpack_seconds"] = torch_seconds.get(torch_key)
            row["backpack_over_backward"] = _ratio(
                torch_seconds.get(torch_key), torch_seconds["backward"]
            )
            torch_fastest = {k: min(v) for k, v in torch_result["samples"].items()}
            row["backpack_over_backward_min"] = _ratio(
                torch_fastest.get(torch_key), torch_fastest["backward"]
            )
            row["backpack_relative_error"] = torch_result["relative_errors"].get(
                "grad" if name == "grad" else name
            )
            row["backpack_first_call_seconds"] = torch_result["first_call_seconds"].get(torch_key)
            row["first_call_at_most_backpack"] = _at_most(
                row["curvjax_first_call_seconds"], row["backpack_first_call_seconds"]
            )
        rows[name] = row
    return {
        "model": problem.name,
        "num_params": problem.num_params,
        "batch_size": int(problem.targets.shape[0]),
        "jax_grad_seconds": plain_time,
        "jax_grad_flops": plain_flops,
        "jax_grad_temp_bytes": xla["jax.grad"]["temp_bytes"],
        "rows": rows,
        "jax": {k: v for k, v in jax_result.items() if k != "reference"},
        "backpack": torch_result,
    }


def failed_checks(summaries: list[dict[str, Any]]) -> list[str]:
    """Descriptions of every relative error above :data:`RELATIVE_TOLERANCE`."""
    failures = []
    for summary in summaries:
        checks = dict(summary["jax"]["relative_errors"])
        if summary["backpack"] is not None:
            checks.update(
                {f"BackPACK {k}": v for k, v in summary["backpack"]["relative_errors"].items()}
            )
        for name, error in checks.items():
            if not error <= RELATIVE_TOLERANCE:
                failures.append(f"{summary['model']}: {name} relative error {error:.2e}")
    return failures


def parse_args(argv=None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="for CI: tiny models, N=4, 2 repeats, XLA optimisation level 0, 1 torch thread, "
        "no separate vmap(grad) row per quantity; checks everything, times nothing meaningful",
    )
    parser.add_argument("--repeats", type=int, default=None, help="timed calls (default 10)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed calls (default 2)")
    parser.add_argument("--batch-size", type=int, default=None, help="N (default 64)")
    parser.add_argument(
        "--json",
        type=Path,
        default=None,
        help="where to write the results (default benchmarks/results/overhead-<machine>.json, none with --smoke); the second-order part goes to the same name with the suffix .curvature.json",
    )
    parser.add_argument(
        "--models",
        type=lambda text: tuple(text.split(",")),
        default=MODEL_NAMES,
        help=f"comma-separated subset of {','.join(MODEL_NAMES)} (default: all)",
    )
    parser.add_argument("--no-torch", action="store_true", help="skip the BackPACK comparison")
    parser.add_argument(
        "--part",
        choices=("first", "second", "all"),
        default="all",
        help="first-order rows, second-order rows (curvature.py: ggn_diag, ggn_diag_mc, kfac, "
        "kflr, hvp on 3c3d with 10 and 100 classes, hessian_diag on a sigmoid net), or both",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads (default: the cores this process may use, as XLA does; 1 with --smoke)",
    )
    args = parser.parse_args(argv)
    unknown = set(args.models) - set(MODEL_NAMES)
    if unknown:
        parser.error(f"--models: unknown {sorted(unknown)}; choose from {MODEL_NAMES}")
    if args.repeats is None:
        args.repeats = 2 if args.smoke else 10
    if args.warmup is None:
        args.warmup = 1 if args.smoke else 2
    if args.batch_size is None:
        args.batch_size = 4 if args.smoke else 64
    if args.threads is None and args.smoke:
        args.threads = 1  # no thread contention on a busy CI machine; timings mean nothing
    if args.threads is None:
        args.threads = harness.usable_cores()
    return args


def main(argv=None) -> int:
    """Run the benchmark; print the tables; write the JSON file(s); 1 if a check failed."""
    args = parse_args(argv)
    start = time.perf_counter()
    harness.fast_compile_for_smoke(args.smoke)
    env = harness.environment()
    use_torch = not args.no_torch and harness.torch_available()
    print(
        f"jax {env['jax']} ({env['jax_backend']}, {env['device_kind']}), curvjax "
        f"{env['curvjax']}, torch {env['torch']}, BackPACK {env['backpack-for-pytorch']}; "
        f"{env['cpu_model']}, {env['usable_cores']} cores, torch threads {args.threads}; "
        f"repeats {args.repeats}, warm-up {args.warmup}; load average "
        f"{env['load_average_at_start']}"
    )
    if not use_torch:
        print(
            "BackPACK comparison skipped ("
            + ("--no-torch" if args.no_torch else "torch or backpack not importable")
            + ")"
        )
    summaries = []
    first = make_problems(args.batch_size, args.smoke, args.models) if args.part != "second" else []
    for problem in first:
        print(f"\n{problem.name}: {problem.num_params:,} parameters", flush=True)
        jax_result = run_jax(problem, args.repeats, args.warmup, vmap_rows=not args.smoke)
        reference = jax_result["reference"]
        torch_result = None
        if use_torch:
            torch_result = run_backpack(problem, reference, args.threads, args.repeats, args.warmup)
        summary = summarise(problem, jax_result, torch_result)
        summaries.append(summary)
        print(report.overhead_table(summary), flush=True)
        print(
            f"(compiling {sum(jax_result['compile_seconds'].values()):.1f} s, "
            f"timing JAX {jax_result['timing_seconds']:.1f} s"
            + (f", torch {torch_result['timing_seconds']:.1f} s)" if torch_result else ")"),
            flush=True,
        )
    failures = failed_checks(summaries)
    if args.part != "second":
        document = {
            "experiment": "overhead",
            "title": "first-order overhead (BackPACK Fig. 6)",
            "command": "python benchmarks/overhead.py "
            + " ".join(sys.argv[1:] if argv is None else argv),
            "environment": harness.finish_environment(env),
            "settings": {
                "smoke": args.smoke,
                "repeats": args.repeats,
                "warmup": args.warmup,
                "batch_size": args.batch_size,
                "models": list(args.models),
                "torch_threads": args.threads if use_torch else None,
                "relative_tolerance": RELATIVE_TOLERANCE,
            },
            "results": summaries,
            "failed_checks": failures,
        }
        if args.json is not None or not args.smoke:
            print(f"\nwrote {harness.write_results(document, args.json)}")
    if args.part != "first":
        # The second-order experiment, through the harness: curvature.py imports no script.
        import curvature  # noqa: PLC0415  (sits beside this script)

        print("\nsecond-order quantities (curvature.py)", flush=True)
        document = curvature.run(
            args.smoke, args.repeats, args.warmup, args.batch_size, args.threads, use_torch
        )
        document["command"] = "python benchmarks/overhead.py " + " ".join(
            sys.argv[1:] if argv is None else argv
        )
        failures += document["failed_checks"]
        if args.json is not None or not args.smoke:
            path = None if args.json is None else args.json.with_suffix(".curvature.json")
            print(f"\nwrote {harness.write_results(document, path)}")
    for failure in failures:
        print(f"CHECK FAILED: {failure}", file=sys.stderr)
    print(
        f"total {time.perf_counter() - start:.1f} s; load average "
        f"{env['load_average_at_start']} at the start, {harness.load_average()} at the end "
        "(much above 0 means that other processes ran and distorted the times)"
    )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
