"""Overhead of curvjax's first-order quantities relative to the gradient (BackPACK, Fig. 6).

For DeepOBS 3c3d (895,210 parameters, CIFAR-10 shapes) and a wide MLP (1,841,162 parameters),
each first-order quantity -- ``per_example_grads``, ``batch_l2``, ``sum_grad_squared``,
``variance``, and ``extract`` with all four at once -- is timed as a ratio to the jitted gradient
measured in the same run (``curvjax.grad`` and a plain ``jax.grad`` of the same loss), next to
the ``jax.vmap(jax.grad)`` per-example baseline that computes the same numbers. XLA's flop count
(``cost_analysis``) and temporary memory (``memory_analysis().temp_size_in_bytes``) of each
compiled function are reported as well.

When torch and BackPACK are importable, the same network with the same weights and data is run
through BackPACK (``BatchGrad``, ``BatchL2Grad``, ``SumGradSquared``, ``Variance`` and all four
together), timed as ratios to a plain torch forward and backward pass of the same model, with
torch limited to as many threads as the process may use. Before timing, the torch loss and
gradient are checked against JAX's, and BackPACK's quantities against the ``vmap(grad)``
reference; curvjax's quantities are checked against that reference too.

Every time is the median of ``--repeats`` calls after warm-up; the functions of one framework are
called round-robin (one timed call of each per round; a fast one right after an untimed call of
itself) so that drifts of the machine's speed affect them alike. Every time includes the forward
pass.

Usage::

    python benchmarks/overhead.py                 # full size, writes benchmarks/overhead.json
    python benchmarks/overhead.py --smoke         # tiny models, about 20 s (for CI)
    python benchmarks/overhead.py --batch-size 128 --repeats 20 --json out.json

The script exits with status 1 when a computed quantity disagrees with its reference.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
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

import models  # noqa: E402  (sits beside this script)

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

#: Largest allowed ``max |value - reference| / max |reference|`` over the leaves of a quantity.
RELATIVE_TOLERANCE = 1e-4


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


def mean_cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """``L = (1/N) sum_n -log softmax(f_n)[y_n]``."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()


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


def xla_costs(compiled) -> dict[str, float | None]:
    """Flops and memory sizes that XLA reports for a compiled function."""
    costs: dict[str, float | None] = {"flops": None, "temp_bytes": None, "output_bytes": None}
    try:
        analysis = compiled.cost_analysis()
        if isinstance(analysis, list | tuple):  # older jax: one dict per computation
            analysis = analysis[0] if analysis else None
        if analysis and "flops" in analysis:
            costs["flops"] = float(analysis["flops"])
    except Exception:  # cost analysis is best effort on some backends
        pass
    try:
        memory = compiled.memory_analysis()
        if memory is not None:
            costs["temp_bytes"] = float(memory.temp_size_in_bytes)
            costs["output_bytes"] = float(memory.output_size_in_bytes)
    except Exception:
        pass
    return costs


#: Functions faster than this (seconds, in the last warm-up round) are called once untimed right
#: before each timed call.
REWARM_BELOW_SECONDS = 0.1


def time_round_robin(calls: dict[str, Callable[[], Any]], repeats: int, warmup: int):
    """Median wall time in seconds of each zero-argument call, measured round-robin.

    After ``warmup`` untimed rounds (at least one), each of ``repeats`` rounds times one call of
    every function. A fast function (below :data:`REWARM_BELOW_SECONDS`) is called once untimed
    right before its timed call, so that it finds the caches as a loop calling it would: a
    function that writes hundreds of MiB of per-example gradients otherwise slows down whichever
    cheap function comes next. Slow functions are not affected by that and skip the extra call.

    Returns:
        ``(medians, samples)``: name -> median seconds, name -> all timed samples.
    """
    last_warmup = {}
    for _ in range(max(warmup, 1)):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            last_warmup[name] = time.perf_counter() - start
    samples: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            if last_warmup[name] < REWARM_BELOW_SECONDS:
                call()
            start = time.perf_counter()
            call()
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in samples.items()}, samples


def _timed(calls, repeats: int, warmup: int):
    """:func:`time_round_robin`, and the seconds the whole timing took."""
    start = time.perf_counter()
    medians, samples = time_round_robin(calls, repeats, warmup)
    return medians, samples, time.perf_counter() - start


def relative_error(value, reference) -> float:
    """``max over leaves of max |value - reference| / max |reference|``."""
    errors = []
    for a, b in zip(
        jax.tree_util.tree_leaves(value), jax.tree_util.tree_leaves(reference), strict=True
    ):
        a = np.asarray(a, np.float64)
        b = np.asarray(b, np.float64)
        if a.shape != b.shape:
            return float("inf")
        scale = max(np.max(np.abs(b)), np.finfo(np.float32).tiny)
        errors.append(float(np.max(np.abs(a - b)) / scale))
    return max(errors)


def run_jax(problem: Problem, repeats: int, warmup: int, vmap_rows: bool) -> dict[str, Any]:
    """Compile, check and time every JAX function of ``problem``."""
    params = problem.variables
    batch = (problem.inputs, problem.targets)
    functions = jax_functions(problem, vmap_rows)
    compiled, costs, compile_seconds = {}, {}, {}
    for name, function in functions.items():
        start = time.perf_counter()
        compiled[name] = jax.jit(function).lower(params, batch).compile()
        compile_seconds[name] = time.perf_counter() - start
        costs[name] = xla_costs(compiled[name])

    # Correctness: curvjax against vmap(grad) and jax.grad, one call each.
    outputs = {name: jax.block_until_ready(fn(params, batch)) for name, fn in compiled.items()}
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
    medians, samples, timing_seconds = _timed(calls, repeats, warmup)
    return {
        "seconds": medians,
        "samples": samples,
        "compile_seconds": compile_seconds,
        "timing_seconds": timing_seconds,
        "xla": costs,
        "relative_errors": errors,
        "reference": reference,
    }


# --------------------------------------------------------------------------------------------
# torch / BackPACK side
# --------------------------------------------------------------------------------------------


def torch_available() -> bool:
    """Whether torch and BackPACK can be imported."""
    try:
        import backpack  # noqa: F401
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


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
    plain = models.torch_sequential_from_flax(problem.model, problem.variables, problem.input_shape)
    extended = backpack.extend(copy.deepcopy(plain))
    plain_loss = torch.nn.CrossEntropyLoss()
    extended_loss = backpack.extend(torch.nn.CrossEntropyLoss())
    inputs = np.asarray(problem.inputs)
    if problem.nchw:
        inputs = inputs.transpose(0, 3, 1, 2)
    inputs = torch.from_numpy(np.array(inputs, dtype=np.float32, order="C"))
    targets = torch.from_numpy(np.asarray(problem.targets, dtype=np.int64))

    # Same function, same weights: the losses and gradients must agree with JAX's.
    jax_loss = float(
        mean_cross_entropy(problem.apply_fn(problem.variables, problem.inputs), problem.targets)
    )
    plain.zero_grad(set_to_none=True)
    loss = plain_loss(plain(inputs), targets)
    loss.backward()
    loss_error = abs(loss.item() - jax_loss) / abs(jax_loss)
    jax_grad = jax.grad(
        lambda p: mean_cross_entropy(problem.apply_fn(p, problem.inputs), problem.targets)
    )(problem.variables)
    expected = models.to_torch_layout(problem.model, jax_grad["params"], problem.input_shape)
    grad_error = relative_error([p.grad.numpy() for p in plain.parameters()], expected)
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

    ext = {name: getattr(extensions, cls) for name, cls in BACKPACK_EXTENSIONS.items()}
    calls = {"backward": lambda: backward(plain, plain_loss)}
    for name in QUANTITIES:
        calls[name] = lambda cls=ext[name]: backward(extended, extended_loss, cls)
    calls[ALL] = lambda: backward(extended, extended_loss, *ext.values())

    # BackPACK's quantities against the vmap(grad) reference, after one pass with all four.
    calls[ALL]()
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
        values = [getattr(p, attribute).numpy() for p in extended.parameters()]
        errors[name] = relative_error(values, expected)
    extended.zero_grad(set_to_none=True)

    medians, samples, timing_seconds = _timed(calls, repeats, warmup)
    return {
        "seconds": medians,
        "samples": samples,
        "timing_seconds": timing_seconds,
        "relative_errors": errors,
        "threads": torch.get_num_threads(),
    }


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def usable_cores() -> int:
    """Cores this process may run on (what XLA's CPU thread pool uses)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def cpu_model() -> str | None:
    """The CPU's model name (from /proc/cpuinfo where there is one)."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def environment() -> dict[str, Any]:
    """Versions, CPU model, core count and platform."""
    import jaxlib

    info: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "usable_cores": usable_cores(),
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "jax_backend": jax.default_backend(),
        "jax_devices": [str(device) for device in jax.devices()],
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        # Other processes on the machine distort the timings; the 1-minute load average at the
        # start (and, in "settings", at the end) of the run tells whether there were any.
        "load_average_at_start": load_average(),
    }
    for package in ("flax", "optax", "numpy", "curvjax", "torch", "backpack"):
        try:
            module = __import__(package)
            info[package] = getattr(module, "__version__", "installed")
        except ImportError:
            info[package] = None
    if info["backpack"] == "installed":
        from importlib.metadata import PackageNotFoundError, version

        try:
            info["backpack"] = version("backpack-for-pytorch")
        except PackageNotFoundError:
            pass
    return info


def _ratio(numerator, denominator) -> float | None:
    if numerator is None or denominator in (None, 0):
        return None
    return numerator / denominator


def _fmt(value, digits: int = 2, suffix: str = "") -> str:
    return "—" if value is None else f"{value:.{digits}f}{suffix}"


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


def markdown_table(summary: dict[str, Any]) -> str:
    """One markdown table of ratios for one problem."""
    has_torch = summary["backpack"] is not None
    mib = 2.0**20
    lines = [
        f"### {summary['model']}: {summary['num_params']:,} parameters, "
        f"N = {summary['batch_size']}",
        "",
        f"jax.grad: {summary['jax_grad_seconds'] * 1e3:.2f} ms, "
        f"{_fmt(_ratio(summary['jax_grad_flops'], 1e9), 3)} GFLOP, "
        f"temp {_fmt(_ratio(summary['jax_grad_temp_bytes'], mib), 1)} MiB"
        + (
            f"; torch backward: {summary['backpack']['seconds']['backward'] * 1e3:.2f} ms "
            f"({summary['backpack']['threads']} threads)"
            if has_torch
            else ""
        ),
        "",
    ]
    header = [
        "quantity",
        "curvjax ms",
        "× curvjax.grad",
        "× jax.grad",
        "vmap(grad) × jax.grad",
        "flops × grad (curvjax / vmap)",
        "temp MiB (curvjax / vmap)",
    ]
    if has_torch:
        header.append("BackPACK × backward")
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|")
    labels = {"grad": "grad", ALL: "extract (all four)"}
    for name, row in summary["rows"].items():
        seconds = row["curvjax_seconds"]
        cells = [
            labels.get(name, name),
            _fmt(None if seconds is None else seconds * 1e3, 2),
            _fmt(row["curvjax_over_curvjax_grad"]),
            _fmt(row["curvjax_over_jax_grad"]),
            _fmt(row["vmap_over_jax_grad"]),
            f"{_fmt(row['curvjax_flops_over_jax_grad'])} / {_fmt(row['vmap_flops_over_jax_grad'])}",
            f"{_fmt(_ratio(row['curvjax_temp_bytes'], mib), 1)} / "
            f"{_fmt(_ratio(row['vmap_temp_bytes'], mib), 1)}",
        ]
        if has_torch:
            cells.append(_fmt(row.get("backpack_over_backward")))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


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
        help="where to write the results (default benchmarks/overhead.json; none with --smoke)",
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
    if args.json is None and not args.smoke:
        args.json = Path(__file__).resolve().parent / "overhead.json"
    if args.threads is None and args.smoke:
        args.threads = 1  # no thread contention on a busy CI machine; timings mean nothing
    if args.threads is None:
        args.threads = usable_cores()
    return args


def main(argv=None) -> int:
    """Run the benchmark; print the tables; write the JSON file; 1 if a check failed."""
    args = parse_args(argv)
    start = time.perf_counter()
    if args.smoke and "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
        # Compilation dominates a smoke run and its timings mean nothing: compile cheaply. The
        # flag is read when the backend starts, which has not happened yet.
        flags = os.environ.get("XLA_FLAGS", "")
        os.environ["XLA_FLAGS"] = f"{flags} --xla_backend_optimization_level=0".strip()
    env = environment()
    use_torch = not args.no_torch and torch_available()
    print(
        f"jax {env['jax']} ({env['jax_backend']}), curvjax {env['curvjax']}, "
        f"torch {env['torch']}, BackPACK {env['backpack']}; {env['cpu_model']}, "
        f"{env['usable_cores']} cores, torch threads {args.threads}; "
        f"repeats {args.repeats}, warm-up {args.warmup}"
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
        print(markdown_table(summary), flush=True)
        print(
            f"(compiling {sum(jax_result['compile_seconds'].values()):.1f} s, "
            f"timing JAX {jax_result['timing_seconds']:.1f} s"
            + (f", torch {torch_result['timing_seconds']:.1f} s)" if torch_result else ")"),
            flush=True,
        )
    second_order = None
    if args.part != "first":
        import curvature  # noqa: PLC0415  (sits beside this script; imports this module)

        print("\nsecond-order quantities (curvature.py)", flush=True)
        second_order = curvature.run_all(
            args.smoke, args.repeats, args.batch_size, usable_cores(), use_torch
        )
    missing = [
        name
        for name in ("grad", *QUANTITIES, "extract")
        if env["curvjax"] is None or not hasattr(sys.modules.get("curvjax"), name)
    ]
    if missing:
        print(f"\nnot measured (missing from curvjax): {', '.join(missing)}")
    failures = failed_checks(summaries)
    for failure in failures:
        print(f"CHECK FAILED: {failure}", file=sys.stderr)
    if args.json is not None:
        document = {
            "benchmark": "first-order overhead (BackPACK Fig. 6)",
            "environment": env,
            "settings": {
                "smoke": args.smoke,
                "repeats": args.repeats,
                "warmup": args.warmup,
                "batch_size": args.batch_size,
                "models": list(args.models),
                "torch_threads": args.threads if use_torch else None,
                "relative_tolerance": RELATIVE_TOLERANCE,
                "load_average_at_end": load_average(),
            },
            "results": summaries,
            "second_order": second_order,
            "failed_checks": failures,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(document, indent=2, default=float) + "\n")
        print(f"\nwrote {args.json}")
    print(
        f"total {time.perf_counter() - start:.1f} s; load average "
        f"{_fmt(env['load_average_at_start'])} at the start, {_fmt(load_average())} at the end "
        "(much above 0 means that other processes ran and distorted the times)"
    )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
