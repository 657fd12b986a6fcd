"""What every benchmark script shares: timing, the machine, XLA costs, checks and JSON files.

- :func:`compile_and_first_call`: ``jax.jit(f).lower(...).compile()`` timed, then the first call
  of the compiled function timed; a researcher who computes a quantity once pays both.
- :func:`time_round_robin`: medians of repeated calls, one timed call of each function per round,
  and the time of each function's first call in the round-robin.
- :func:`environment`: versions, CPU model, cores, load average, accelerator.
- :func:`xla_costs`: XLA's flop count and temporary memory of a compiled function.
- :func:`pin_lapack_threads`: the threads of the OpenBLAS that runs JAX's CPU LAPACK calls.
- :func:`write_results`: one JSON file per experiment and machine under ``benchmarks/results/``;
  the file it replaces moves to ``benchmarks/results/history/`` (``report.py`` lists it in the
  changelog of ``RESULTS.md``).

This module imports no other benchmark script.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import platform
import re
import shutil
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
#: Where :func:`write_results` puts result files (``$CURVJAX_BENCHMARK_RESULTS`` if set).
RESULTS = Path(os.environ.get("CURVJAX_BENCHMARK_RESULTS") or HERE / "results")

#: Largest allowed ``max |value - reference| / max |reference|`` over the leaves of a quantity.
RELATIVE_TOLERANCE = 1e-4

#: Functions faster than this (seconds, in the last warm-up round) are called once untimed right
#: before each timed call.
REWARM_BELOW_SECONDS = 0.1

#: XLA flag making compilation cheap under ``--smoke`` (timings mean nothing there).
SMOKE_XLA_FLAG = "--xla_backend_optimization_level=0"


def fast_compile_for_smoke(smoke: bool) -> None:
    """Under ``--smoke``, make XLA compile at optimisation level 0 (before the backend starts)."""
    flags = os.environ.get("XLA_FLAGS", "")
    if smoke and "xla_backend_optimization_level" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} {SMOKE_XLA_FLAG}".strip()


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------


@dataclass
class Timing:
    """Result of :func:`time_round_robin` (seconds)."""

    medians: dict[str, float]
    samples: dict[str, list[float]]
    first: dict[str, float]  # the first warm-up call of each function
    total: float  # the whole timing, warm-up included


def time_round_robin(calls: dict[str, Callable[[], Any]], repeats: int, warmup: int) -> Timing:
    """Median wall time of each zero-argument call, measured round-robin.

    After ``warmup`` untimed rounds (at least one), each of ``repeats`` rounds times one call of
    every function, so that a drift of the machine's speed affects all of them alike. A fast
    function (below :data:`REWARM_BELOW_SECONDS`) is called once untimed right before its timed
    call, so that it finds the caches as a loop calling it would: a function that writes
    hundreds of MiB of per-example gradients otherwise slows down whichever cheap function comes
    next. The first warm-up round's times are kept: for a framework without compilation (torch)
    it is the time of the very first call, when nothing was called before.
    """
    start = time.perf_counter()
    first: dict[str, float] = {}
    last_warmup: dict[str, float] = {}
    for _ in range(max(warmup, 1)):
        for name, call in calls.items():
            begin = time.perf_counter()
            call()
            last_warmup[name] = time.perf_counter() - begin
            first.setdefault(name, last_warmup[name])
    samples: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            if last_warmup[name] < REWARM_BELOW_SECONDS:
                call()
            begin = time.perf_counter()
            call()
            samples[name].append(time.perf_counter() - begin)
    medians = {name: statistics.median(values) for name, values in samples.items()}
    return Timing(medians, samples, first, time.perf_counter() - start)


def timed_call(call: Callable[[], Any]) -> tuple[Any, float]:
    """``(result, seconds)`` of one call."""
    begin = time.perf_counter()
    result = call()
    return result, time.perf_counter() - begin


@dataclass
class Compiled:
    """A jitted function compiled for given arguments, with what its first call cost."""

    fn: Any  # the compiled executable
    compile_seconds: float  # tracing, lowering and compiling
    first_call_seconds: float  # compiling plus the first run
    output: Any  # the first run's output
    costs: dict[str, float | None]


def compile_and_first_call(function: Callable, *args, jit_kwargs=None) -> Compiled:
    """Jit, lower and compile ``function`` for ``args``, then run it once; time both."""
    import jax

    begin = time.perf_counter()
    compiled = jax.jit(function, **(jit_kwargs or {})).lower(*args).compile()
    compile_seconds = time.perf_counter() - begin
    output = jax.block_until_ready(compiled(*args))
    first = time.perf_counter() - begin
    return Compiled(compiled, compile_seconds, first, output, xla_costs(compiled))


def xla_costs(compiled) -> dict[str, float | None]:
    """Flops and memory sizes that XLA reports for a compiled function (``None`` if unknown)."""
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


# --------------------------------------------------------------------------------------------
# Checks and losses
# --------------------------------------------------------------------------------------------


def relative_error(value, reference) -> float:
    """``max over leaves of max |value - reference| / max |reference|``."""
    import jax
    import numpy as np

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


def mean_cross_entropy(logits, targets):
    """``L = (1/N) sum_n -log softmax(f_n)[y_n]``."""
    import optax

    return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()


def torch_available() -> bool:
    """Whether torch and BackPACK can be imported."""
    try:
        import backpack  # noqa: F401
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def torch_device() -> str:
    """``"cuda"`` when torch sees a GPU, else ``"cpu"``.

    On a GPU, TF32 is switched off for torch's matmuls and convolutions, so that both frameworks
    compute in float32 (run JAX with ``JAX_DEFAULT_MATMUL_PRECISION=highest`` to match) and the
    checks against the JAX reference hold at :data:`RELATIVE_TOLERANCE`.
    """
    try:
        import torch
    except ImportError:
        return "cpu"
    if not torch.cuda.is_available():
        return "cpu"
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    return "cuda"


def torch_sync() -> None:
    """Wait for queued CUDA work (a no-op on the CPU)."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


# --------------------------------------------------------------------------------------------
# The machine
# --------------------------------------------------------------------------------------------


def usable_cores() -> int:
    """Cores this process may run on (what XLA's CPU thread pool uses)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def load_average() -> list[float] | None:
    """The 1, 5 and 15-minute load averages."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
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


def _version(distribution: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(distribution)
    except PackageNotFoundError:
        return None


@dataclass
class LapackThreads:
    """What :func:`pin_lapack_threads` did: ``info`` for the JSON, ``unpinned()`` a context in
    which the libraries have their original thread counts again."""

    info: dict[str, Any]
    unpinned: Callable[[], Any]


def pin_lapack_threads(threads: int) -> LapackThreads:
    """Limit SciPy's OpenBLAS, which runs JAX's CPU LAPACK calls (``jnp.linalg.eigh``, ...), to
    ``threads`` (``0``: leave it).

    Its threads compete with XLA's for the same cores: on this 2-core CPU, 3c3d's EK-FAC takes 2.3
    gradients with one LAPACK thread and 3.3 with two (the library's default, the core count).
    Needs ``threadpoolctl``; NumPy's own OpenBLAS and torch's libraries are left alone.
    """
    try:
        import scipy.linalg  # noqa: F401  (loads SciPy's OpenBLAS)
        from threadpoolctl import ThreadpoolController
    except ImportError as error:
        return LapackThreads({"pinned": None, "why": str(error)}, contextlib.nullcontext)
    libs = [
        lib
        for lib in ThreadpoolController().lib_controllers
        if lib.internal_api == "openblas" and "scipy" in Path(lib.filepath).parent.name
    ]
    original = [lib.num_threads for lib in libs]
    info = {
        "pinned": threads or None,
        "default_threads": original,
        "libraries": [Path(lib.filepath).name for lib in libs],
    }
    if not threads or not libs:
        return LapackThreads(info, contextlib.nullcontext)
    for lib in libs:
        lib.set_num_threads(threads)

    @contextlib.contextmanager
    def unpinned():
        for lib, count in zip(libs, original, strict=True):
            lib.set_num_threads(count)
        try:
            yield
        finally:
            for lib in libs:
                lib.set_num_threads(threads)

    return LapackThreads(info, unpinned)


def environment(packages: tuple[str, ...] = ()) -> dict[str, Any]:
    """Versions, CPU model, cores, load average at the start, the accelerator and the date.

    ``packages`` are extra distributions whose versions to record (e.g. ``pyhessian``).
    """
    import jax

    device = jax.devices()[0]
    info: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "usable_cores": usable_cores(),
        "jax_backend": jax.default_backend(),
        "device_kind": device.device_kind,
        "jax_devices": [str(d) for d in jax.devices()],
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "jax_default_matmul_precision": os.environ.get("JAX_DEFAULT_MATMUL_PRECISION"),
        # Other processes distort timings; the load average at the start and (see
        # ``finish_environment``) at the end of the run tells whether there were any.
        "load_average_at_start": load_average(),
    }
    names = ("jax", "jaxlib", "flax", "optax", "numpy", "curvjax", "torch")
    for name in (*names, "backpack-for-pytorch", *packages):
        info[name] = _version(name)
    try:
        import curvjax

        if info["curvjax"] is None:  # run from a checkout that is not installed
            info["curvjax"] = getattr(curvjax, "__version__", "checkout")
        # a stale non-editable install would be timed instead of this checkout: say which ran
        source = Path(curvjax.__file__).resolve().parent.parent
        info["curvjax_source"] = "this checkout" if source == HERE.parent else str(source)
    except ImportError:
        pass
    if info["jax"] is None:
        info["jax"] = jax.__version__
    try:
        import torch

        info["torch_cuda"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except ImportError:
        info["torch_cuda"] = None
    return info


def finish_environment(env: dict[str, Any]) -> dict[str, Any]:
    """Record the load average at the end of the run in ``env`` (and return it)."""
    env["load_average_at_end"] = load_average()
    return env


def _slug(text: str) -> str:
    text = re.sub(r"\((r|tm)\)|\b(cpu|processor)\b|@.*$", "", text.lower())
    return re.sub(r"[^a-z0-9]+", "-", text).strip("-")


def machine_id(env: dict[str, Any]) -> str:
    """A short file-name-safe name of the machine: the accelerator, or the CPU and its cores."""
    if env.get("jax_backend") not in (None, "cpu"):
        return _slug(env.get("device_kind") or env["jax_backend"])
    return f"{_slug(env.get('cpu_model') or 'cpu')}-{env.get('usable_cores')}cores"


# --------------------------------------------------------------------------------------------
# JSON
# --------------------------------------------------------------------------------------------


def results_path(experiment: str, env: dict[str, Any]) -> Path:
    """``benchmarks/results/<experiment>-<machine>.json``."""
    return RESULTS / f"{experiment}-{machine_id(env)}.json"


def write_results(
    document: dict[str, Any], path: Path | None = None, results: Path = RESULTS
) -> Path:
    """Write ``document`` (with ``experiment`` and ``environment``) as JSON; return the path.

    Without ``path`` it goes to ``<results>/<experiment>-<machine>.json``; an earlier file there
    moves to ``<results>/history/`` with its date in the name, for the changelog.
    """
    if path is None:
        path = results / results_path(document["experiment"], document["environment"]).name
        if path.exists():
            try:
                old_date = json.loads(path.read_text())["environment"]["date"]
            except (ValueError, KeyError):
                old_date = "undated"
            history = results / "history"
            history.mkdir(parents=True, exist_ok=True)
            stamp = re.sub(r"[^0-9]+", "", old_date)[:12] or "undated"
            shutil.move(path, history / f"{path.stem}-{stamp}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=1, default=_default) + "\n")
    return path


def finish(document: dict[str, Any], table: str, args, begin: float) -> int:
    """The end of an experiment script: print its table and failed checks, write its JSON (always,
    except a smoke run without ``--json``), return the exit status (1 when a check failed)."""
    print(table)
    if document["failed_checks"]:
        print("FAILED checks:", {k: document["checks"][k] for k in document["failed_checks"]})
    if args.json is not None or not args.smoke:
        path = write_results(document, args.json)
        print(f"wrote {path} ({time.perf_counter() - begin:.0f} s)")
    return 1 if document["failed_checks"] else 0


def _default(value):
    try:
        return float(value)
    except (TypeError, ValueError):
        return str(value)
