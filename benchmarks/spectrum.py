"""Hessian spectra: curvjax against PyHessian on the same network, weights and data (seed 001).

The problem is the digits MLP of ``notebooks/hessian_spectrum.ipynb``: 64-32-10 with ReLU (2,410
parameters), trained with 200 full-batch Adam steps, mean cross-entropy on a batch of 512 training
images, everything in float64. The flax parameters are copied into a ``torch.nn.Sequential`` (dense
kernels ``[in, out]`` -> Linear weights ``[out, in]``); the two losses and gradients are checked to
agree before anything is timed. The dense Hessian (``curvjax.hessian_matrix``) and
``numpy.linalg.eigvalsh`` give the exact eigenvalues and trace that every estimate is scored
against.

Three comparisons, each over several seeds, in the same run:

1. **Top-10 eigenvalues.** PyHessian's ``hessian.eigenvalues(top_n=10)`` (power iteration with
   deflation, ``maxIter=100``, ``tol=1e-3``; its Hessian-vector products are counted by wrapping
   ``pyhessian.hessian.hessian_vector_product``) against curvjax's ``top_eigenpairs`` by power
   iteration (the same rule and tolerance) and by Lanczos with full reorthogonalisation (Ritz
   residuals below ``1e-3`` and ``1e-6`` relative). "Lanczos at PyHessian's accuracy" is the number
   of Lanczos steps after which the top 10 Ritz values are as accurate as PyHessian's answer in the
   same seed (read off one 60-step ``lanczos_tridiagonal``; it uses the exact eigenvalues, so it is
   a measurement, not a stopping rule).
2. **Trace.** PyHessian's ``trace()`` with its own stopping rule (running mean changes by less than
   ``tol=1e-3`` relative), and at fixed budgets (``tol=0``), against curvjax's Hutchinson
   (Rademacher) and Hutch++ at the same budgets: mean absolute relative error over seeds, products,
   time, and the smallest budget whose mean error is within 1 %.
3. **Spectral density** by stochastic Lanczos quadrature with the same number of probes and steps.
   PyHessian 0.1's ``density()`` calls ``torch.eig``, which torch 2.x removed (it raises); the
   benchmark runs PyHessian's own ``density()`` with a stand-in for ``torch.eig`` that calls
   ``torch.linalg.eigh`` on its symmetric tridiagonal matrix and returns the old layout (eigenvalues
   as ``[m, 2]`` real/imaginary columns, eigenvectors as columns). Both sets of nodes and weights are
   broadened with the same Gaussian on the same grid and scored by their total-variation distance
   to the exact eigenvalues broadened the same way.

Every time is a wall-clock time of one call per seed (median over seeds), after a warm-up call that
compiles the JAX function; compile times are reported separately. curvjax's functions are jitted,
PyHessian's run eagerly (its products are double-backward passes). torch runs with one thread by
default (``--torch-threads``): its products are small operations, and with two threads on a shared
two-core machine their time varied from 1 to 70 ms per product; XLA keeps its default thread pool.

Usage::

    python benchmarks/spectrum.py                   # full size, writes benchmarks/results/
    python benchmarks/spectrum.py --smoke           # tiny model, every code path, < 30 s (CI)
    python benchmarks/spectrum.py --seeds 5 --json /tmp/spectrum.json
    python benchmarks/spectrum.py --no-torch        # curvjax only

Installing the comparison (no runtime dependency of curvjax)::

    pip install torch==2.13.0                 # CPU build
    pip install --no-deps pyhessian            # PyHessian 0.1 declares an unpinned torch

The script exits with status 1 when a check fails (torch twin's loss and gradient against JAX's,
Lanczos's top 10 against the dense eigenvalues to 1e-6 relative in float64).
"""

from __future__ import annotations

import os

# jaxlib's LAPACK kernels (QR in Hutch++, eigh in Lanczos) run on scipy's OpenBLAS, whose own
# threads compete with XLA's on a small machine: on 2 shared cores a [2410, 33] QR took 71 ms with
# OpenBLAS's default threads and 6 ms with one. Set before numpy, scipy or jax load OpenBLAS.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse
import contextlib
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import jax

jax.config.update("jax_enable_x64", True)

import flax.linen as nn  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a source checkout

import harness  # noqa: E402  (sits beside this script)

import curvjax  # noqa: E402
from curvjax import spectral  # noqa: E402

#: XLA options for ``--smoke``: LLVM at -O0 compiles these small programs about twice as fast.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}

#: PyHessian's defaults for ``eigenvalues`` and ``trace``.
PYHESSIAN_MAX_ITER, PYHESSIAN_TOL = 100, 1e-3

FULL = {
    "hidden": 32,
    "num_examples": 512,
    "train_steps": 200,
    "seeds": 10,
    "trace_seeds": 10,
    "budgets": (10, 30, 100, 300, 1000),
    "density_probes": 10,
    "density_steps": 80,
    "oracle_steps": 60,
}
SMOKE = {
    "hidden": 8,
    "num_examples": 64,
    "train_steps": 20,
    "seeds": 2,
    "trace_seeds": 2,
    "budgets": (6, 30),
    "density_probes": 2,
    "density_steps": 20,
    "oracle_steps": 30,
}


# --------------------------------------------------------------------------------------------
# Problem: digits MLP in flax, its torch twin
# --------------------------------------------------------------------------------------------


def make_problem(hidden: int, num_examples: int, train_steps: int):
    """Trains the digits MLP; returns ``(apply_fn, params, batch)`` in float64.

    The split and initialisation are those of ``notebooks/hessian_spectrum.ipynb``: 1,297
    training images (a fixed permutation of the 1,797), ``jax.random.key(0, impl="rbg")``, full-batch
    Adam with step size 1e-2; the batch is the first ``num_examples`` training images.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    order = np.random.default_rng(0).permutation(len(digits.target))
    train = order[:1297]
    inputs = jnp.asarray(digits.data[train] / 16.0)
    labels = jnp.asarray(digits.target[train], jnp.int32)
    model = nn.Sequential([nn.Dense(hidden), nn.relu, nn.Dense(10)])
    params = model.init(jax.random.key(0, impl="rbg"), inputs[:1])
    params = jax.tree.map(lambda leaf: leaf.astype(jnp.float64), params)
    optimizer = optax.adam(1e-2)

    def mean_loss(p):
        logits = model.apply(p, inputs)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    @jax.jit
    def fit(p):
        def step(carry, _):
            p, state = carry
            updates, state = optimizer.update(jax.grad(mean_loss)(p), state)
            return (optax.apply_updates(p, updates), state), None

        return jax.lax.scan(step, (p, optimizer.init(p)), length=train_steps)[0][0]

    params = fit(params)
    return model.apply, params, (inputs[:num_examples], labels[:num_examples])


def torch_twin(params):
    """``torch.nn.Sequential(Linear, ReLU, Linear)`` in float64 with the flax weights."""
    import torch

    layers = params["params"]
    first, second = layers["layers_0"], layers["layers_2"]
    net = torch.nn.Sequential(
        torch.nn.Linear(*first["kernel"].shape),
        torch.nn.ReLU(),
        torch.nn.Linear(*second["kernel"].shape),
    ).double()
    with torch.no_grad():
        for linear, leaf in ((net[0], first), (net[2], second)):
            linear.weight.copy_(torch.from_numpy(np.asarray(leaf["kernel"]).T.copy()))  # [out, in]
            linear.bias.copy_(torch.from_numpy(np.array(leaf["bias"])))
    return net


def check_twin(net, apply_fn, params, batch) -> dict[str, float]:
    """Relative differences of the torch twin's loss and gradient from JAX's."""
    import torch

    inputs, labels = (torch.from_numpy(np.array(a)) for a in batch)
    net.zero_grad(set_to_none=True)
    loss = torch.nn.functional.cross_entropy(net(inputs), labels.long())
    loss.backward()
    torch_grad = np.concatenate(
        [p.grad.numpy().ravel() for p in (net[0].weight, net[0].bias, net[2].weight, net[2].bias)]
    )
    net.zero_grad(set_to_none=True)

    def jax_loss(p):
        logits = apply_fn(p, batch[0])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch[1]).mean()

    value, grads = jax.value_and_grad(jax_loss)(params)
    layers = grads["params"]
    jax_grad = np.concatenate(
        [
            np.asarray(layers["layers_0"]["kernel"]).T.ravel(),
            np.asarray(layers["layers_0"]["bias"]),
            np.asarray(layers["layers_2"]["kernel"]).T.ravel(),
            np.asarray(layers["layers_2"]["bias"]),
        ]
    )
    return {
        "loss": abs(loss.item() - float(value)) / abs(float(value)),
        "grad": float(np.max(np.abs(torch_grad - jax_grad)) / np.max(np.abs(jax_grad))),
    }


# --------------------------------------------------------------------------------------------
# PyHessian with counted products
# --------------------------------------------------------------------------------------------


class CountedPyHessian:
    """PyHessian's ``hessian`` on the torch twin, counting its Hessian-vector products.

    PyHessian's methods call the module-level ``hessian_vector_product`` of ``pyhessian.hessian``;
    it is replaced by a counting wrapper for the lifetime of this object.
    """

    def __init__(self, net, batch):
        import importlib

        import torch

        # ``pyhessian.hessian`` the attribute is the class; the module is in ``sys.modules``.
        pyhessian_module = importlib.import_module("pyhessian.hessian")

        self.torch = torch
        self.module = pyhessian_module
        self.net = net
        self.data = tuple(torch.from_numpy(np.array(a)) for a in batch)
        self.data = (self.data[0], self.data[1].long())
        self.products = 0
        original = pyhessian_module.hessian_vector_product

        def counted(*args, **kwargs):
            self.products += 1
            return original(*args, **kwargs)

        self._original = original
        pyhessian_module.hessian_vector_product = counted

    def close(self):
        self.module.hessian_vector_product = self._original

    def new(self):
        """A fresh ``pyhessian.hessian`` (one forward and backward with ``create_graph``)."""
        # PyHessian reads ``param.grad`` after ``loss.backward``: stale gradients would be added.
        self.net.zero_grad(set_to_none=True)
        return self.module.hessian(
            self.net, self.torch.nn.CrossEntropyLoss(), data=self.data, cuda=False
        )

    def run(self, seed: int, method: str, **kwargs):
        """``(result, products, seconds)`` of ``hessian(...).<method>(**kwargs)`` from ``seed``."""
        self.torch.manual_seed(seed)
        self.products = 0
        with warnings.catch_warnings():
            # PyHessian's ``loss.backward(create_graph=True)`` warns about a reference cycle.
            warnings.filterwarnings("ignore", message="Using backward\\(\\) with create_graph=True")
            start = time.perf_counter()
            result = getattr(self.new(), method)(**kwargs)
            seconds = time.perf_counter() - start
        return result, self.products, seconds


@contextlib.contextmanager
def torch_eig_stand_in():
    """Temporarily provides the removed ``torch.eig(T, eigenvectors=True)`` for PyHessian 0.1.

    PyHessian only calls it on its symmetric tridiagonal Lanczos matrix, for which
    ``torch.linalg.eigh`` is exact; the old return layout is rebuilt: eigenvalues ``[m, 2]`` (real
    and zero imaginary parts) and eigenvectors as columns.
    """
    import torch

    def eig(matrix, eigenvectors=False):
        values, vectors = torch.linalg.eigh(matrix)
        pairs = torch.stack([values, torch.zeros_like(values)], dim=1)
        return pairs, (vectors if eigenvectors else torch.empty(0, dtype=matrix.dtype))

    had = hasattr(torch, "eig")
    previous = getattr(torch, "eig", None)
    torch.eig = eig
    try:
        yield
    finally:
        if had:
            torch.eig = previous
        else:
            del torch.eig


# --------------------------------------------------------------------------------------------
# Timing helpers
# --------------------------------------------------------------------------------------------


def jit(fn, smoke: bool, static_argnames=()):
    """``jax.jit`` with the fast-compile options under ``--smoke``."""
    return jax.jit(
        fn, static_argnames=static_argnames, compiler_options=FAST_COMPILE if smoke else None
    )


def timed(fn, *args):
    """``(value, seconds)`` of one call, waiting for the result."""
    start = time.perf_counter()
    value = jax.block_until_ready(fn(*args))
    return value, time.perf_counter() - start


def compile_seconds(fn, *args) -> float:
    """Time of the first call (tracing, compilation and one run): the first-call time."""
    return timed(fn, *args)[1]


def max_rel_error(values, exact) -> float:
    """Largest relative error of the top ``len(exact)`` values, both sorted descending."""
    values = np.sort(np.asarray(values, np.float64))[::-1]
    return float(np.max(np.abs(values - exact) / np.abs(exact)))


def summary(samples) -> dict[str, float]:
    samples = [float(s) for s in samples]
    return {
        "median": statistics.median(samples),
        "min": min(samples),
        "max": max(samples),
        "mean": statistics.fmean(samples),
    }


# --------------------------------------------------------------------------------------------
# 1. Top-10 eigenvalues
# --------------------------------------------------------------------------------------------


def lanczos_steps_to_reach(diag, offdiag, exact, target, k=10) -> int | None:
    """Fewest Lanczos steps whose top ``k`` Ritz values are within ``target`` relative error."""
    diag, offdiag = np.asarray(diag), np.asarray(offdiag)
    for steps in range(k, diag.shape[0] + 1):
        t = (
            np.diag(diag[:steps])
            + np.diag(offdiag[: steps - 1], 1)
            + np.diag(offdiag[: steps - 1], -1)
        )
        ritz = np.linalg.eigvalsh(t)[::-1][:k]
        if max_rel_error(ritz, exact) <= target:
            return steps
    return None


def top_eigenvalues(apply_fn, params, batch, exact, settings, pyh, smoke):
    """Runs comparison 1; returns ``(rows, raw)``."""
    seeds = range(settings["seeds"])

    def method(name, tol, max_matvecs=None):
        extra = {} if max_matvecs is None else {"max_matvecs": max_matvecs}

        def fn(p, b, key):
            operator = spectral.hessian_operator(apply_fn, p, b)
            return spectral.top_eigenpairs(operator, 10, key=key, method=name, tol=tol, **extra)

        return jit(fn, smoke)

    variants = {
        "curvjax power iteration (tol 1e-3)": method("power", PYHESSIAN_TOL),
        "curvjax Lanczos (residual 1e-3)": method("lanczos", 1e-3),
        "curvjax Lanczos (residual 1e-6)": method("lanczos", 1e-6),
    }
    if smoke:  # same code paths as above with other static arguments: skipped to save compiles
        del variants["curvjax Lanczos (residual 1e-3)"]
    else:
        # The default bound (200) sizes the Ritz problem solved after every step; a tight bound
        # shows what that costs (same products, same answer).
        bound = settings["oracle_steps"]
        variants[f"curvjax Lanczos (residual 1e-6, max_matvecs={bound})"] = method(
            "lanczos", 1e-6, bound
        )

    def tridiagonal(p, b, key):
        operator = spectral.hessian_operator(apply_fn, p, b)
        start = jax.random.normal(key, (operator.size,), operator.dtype)
        return spectral.lanczos_tridiagonal(operator.matvec, start, settings["oracle_steps"])

    tridiagonal = jit(tridiagonal, smoke)

    raw: dict[str, Any] = {"compile_seconds": {}}
    for name, fn in variants.items():
        raw["compile_seconds"][name] = compile_seconds(fn, params, batch, jax.random.key(999))
    compile_seconds(tridiagonal, params, batch, jax.random.key(999))

    pyh_first = None
    if pyh is not None:  # warm-up: torch's first double-backward allocates and dispatches
        pyh_first = pyh.run(999, "eigenvalues", top_n=1, maxIter=5)[2]

    results: dict[str, dict[str, list]] = {}

    def record(name, products, seconds, error, ordered=None):
        entry = results.setdefault(name, {"products": [], "seconds": [], "error": [], "sorted": []})
        entry["products"].append(int(products))
        entry["seconds"].append(seconds)
        entry["error"].append(error)
        if ordered is not None:
            entry["sorted"].append(bool(ordered))

    for seed in seeds:
        key = jax.random.key(seed)
        pyh_error = None
        if pyh is not None:
            (values, _), products, seconds = pyh.run(
                seed, "eigenvalues", top_n=10, maxIter=PYHESSIAN_MAX_ITER, tol=PYHESSIAN_TOL
            )
            pyh_error = max_rel_error(values, exact)
            ordered = all(a >= b for a, b in zip(values, values[1:], strict=False))
            record("PyHessian eigenvalues(top_n=10)", products, seconds, pyh_error, ordered)
        for name, fn in variants.items():
            out, seconds = timed(fn, params, batch, key)
            values = np.asarray(out.eigenvalues)
            ordered = bool(np.all(np.diff(values) <= 0))
            record(name, out.num_matvecs, seconds, max_rel_error(values, exact), ordered)
        tri = tridiagonal(params, batch, key)
        for target, label in ((1e-3, "1e-3"), (pyh_error, "PyHessian's")):
            if target is None:
                continue
            steps = lanczos_steps_to_reach(tri.diag, tri.offdiag, exact, target)
            name = f"Lanczos steps to {label} accuracy (oracle)"
            # Not reached within the tridiagonal: recorded as one more step than it has.
            record(name, steps or settings["oracle_steps"] + 1, float("nan"), target)
    # First calls: curvjax's compile plus one run; PyHessian's very first call in the run (its
    # warm-up, top 1 with 5 iterations: a lower bound of a first top-10 call).
    for name in variants:
        results[name]["first_call"] = raw["compile_seconds"][name]
    if pyh_first is not None:
        results["PyHessian eigenvalues(top_n=10)"]["first_call"] = pyh_first
    raw["results"] = results
    return results, raw


# --------------------------------------------------------------------------------------------
# 2. Trace
# --------------------------------------------------------------------------------------------


def traces(apply_fn, params, batch, exact_trace, settings, pyh, smoke):
    """Runs comparison 2; returns the per-method, per-budget errors, products and times."""
    seeds = range(settings["trace_seeds"])
    results: dict[str, dict[str, list]] = {}
    compile_times: dict[str, float] = {}

    def record(name, budget, products, seconds, estimate):
        entry = results.setdefault(f"{name}|{budget}", {"products": [], "seconds": [], "error": []})
        entry["products"].append(int(products))
        entry["seconds"].append(seconds)
        entry["error"].append(abs(float(estimate) - exact_trace) / abs(exact_trace))

    if pyh is not None:
        for seed in seeds:
            samples, products, seconds = pyh.run(
                seed, "trace", maxIter=PYHESSIAN_MAX_ITER, tol=PYHESSIAN_TOL
            )
            record("PyHessian trace()", "own rule", products, seconds, np.mean(samples))
    for budget in settings["budgets"]:
        for method in ("hutchinson", "hutchpp"):

            def fn(p, b, key, method=method, budget=budget):
                operator = spectral.hessian_operator(apply_fn, p, b)
                return spectral.trace(operator, key=key, method=method, num_matvecs=budget)

            fn = jit(fn, smoke)
            name = {"hutchinson": "curvjax Hutchinson", "hutchpp": "curvjax Hutch++"}[method]
            compile_times[f"{name}|{budget}"] = compile_seconds(
                fn, params, batch, jax.random.key(999)
            )
            for seed in seeds:
                estimate, seconds = timed(fn, params, batch, jax.random.key(seed))
                record(name, budget, budget, seconds, estimate)
        if pyh is not None:
            for seed in seeds:
                samples, products, seconds = pyh.run(seed, "trace", maxIter=budget, tol=0.0)
                record("PyHessian trace(tol=0)", budget, products, seconds, np.mean(samples))
    return results, {"results": results, "compile_seconds": compile_times}


# --------------------------------------------------------------------------------------------
# 3. Spectral density
# --------------------------------------------------------------------------------------------


def broaden(nodes, weights, grid, sigma):
    """``(1/P) Σ_p Σ_j w_pj N(x; θ_pj, σ²)`` on ``grid`` (numpy)."""
    nodes, weights = np.asarray(nodes, np.float64), np.asarray(weights, np.float64)
    gauss = np.exp(-0.5 * ((grid[:, None, None] - nodes[None]) / sigma) ** 2)
    return np.sum(gauss * weights[None], axis=(1, 2)) / (
        nodes.shape[0] * sigma * np.sqrt(2 * np.pi)
    )


def densities(apply_fn, params, batch, exact_all, settings, pyh, smoke):
    """Runs comparison 3 (one seed); returns rows and raw numbers."""
    probes, steps = settings["density_probes"], settings["density_steps"]
    low, high = float(exact_all[0]), float(exact_all[-1])
    sigma = 0.01 * (high - low)
    grid = np.linspace(
        low - 0.05 * (high - low) - 5 * sigma, high + 0.05 * (high - low) + 5 * sigma, 2000
    )
    reference = broaden(
        exact_all[None], np.full((1, exact_all.size), 1.0 / exact_all.size), grid, sigma
    )

    def score(nodes, weights):
        dens = broaden(nodes, weights, grid, sigma)
        active = np.asarray(weights) > 1e-12
        top, bottom = np.max(np.asarray(nodes)[active]), np.min(np.asarray(nodes)[active])
        return {
            "tv_distance": float(0.5 * np.trapezoid(np.abs(dens - reference), grid)),
            "mass": float(np.trapezoid(dens, grid)),
            "largest_node_rel_error": abs(top - high) / abs(high),
            "smallest_node_abs_error_over_range": abs(bottom - low) / (high - low),
        }

    rows: dict[str, dict[str, Any]] = {}

    def slq(p, b, key):
        operator = spectral.hessian_operator(apply_fn, p, b)
        return spectral.slq_nodes(
            operator.matvec,
            operator.size,
            operator.dtype,
            key=key,
            num_probes=probes,
            num_steps=steps,
        )

    slq = jit(slq, smoke)
    compile_time = compile_seconds(slq, params, batch, jax.random.key(999))
    (nodes, weights), seconds = timed(slq, params, batch, jax.random.key(0))
    rows["curvjax slq_nodes"] = {
        "products": probes * steps,
        "seconds": seconds,
        "compile_seconds": compile_time,
        **score(nodes, weights),
    }
    if not smoke:  # the user-level call, compilation included (its code path is tested elsewhere)
        start = time.perf_counter()
        operator = spectral.hessian_operator(apply_fn, params, batch)
        spectral.density(operator, key=jax.random.key(0), num_probes=probes, num_steps=steps)
        rows["curvjax density() (host loop, incl. compile)"] = {
            "products": probes * steps,
            "seconds": time.perf_counter() - start,
        }
    if pyh is not None:
        with torch_eig_stand_in():
            (nodes, weights), products, seconds = pyh.run(0, "density", iter=steps, n_v=probes)
        rows["PyHessian density() + torch.eig stand-in"] = {
            "products": products,
            "seconds": seconds,
            **score(np.asarray(nodes), np.asarray(weights)),
        }
    return rows, {"rows": rows, "sigma": sigma}


# --------------------------------------------------------------------------------------------
# Tables, environment, entry point
# --------------------------------------------------------------------------------------------


def markdown_table(header, rows) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _range(values, fmt="{:.0f}") -> str:
    s = summary(values)
    if s["min"] == s["max"]:
        return fmt.format(s["median"])
    return f"{fmt.format(s['median'])} [{fmt.format(s['min'])}-{fmt.format(s['max'])}]"


def eigen_table(results) -> str:
    base = results.get("PyHessian eigenvalues(top_n=10)")
    base_products = statistics.median(base["products"]) if base else None
    base_seconds = statistics.median(base["seconds"]) if base else None
    rows = []
    for name, entry in results.items():
        oracle = "oracle" in name
        products = statistics.median(entry["products"])
        seconds = float("nan") if oracle else statistics.median(entry["seconds"])
        rows.append(
            [
                name,
                _range(entry["products"]),
                f"{products / base_products:.2f}" if base_products else "",
                "" if oracle else f"{1e3 * seconds:.1f}",
                f"{seconds / base_seconds:.2f}" if base_seconds and not oracle else "",
                _range(entry["error"], "{:.1e}"),
                "" if not entry["sorted"] else f"{sum(entry['sorted'])}/{len(entry['sorted'])}",
                "" if entry.get("first_call") is None else f"{entry['first_call']:.2f}",
            ]
        )
    header = [
        "method",
        "products median [min-max]",
        "products / PyHessian",
        "ms (median)",
        "time / PyHessian",
        "max rel. error of top 10 median [min-max]",
        "sorted",
        "first call s",
    ]
    return markdown_table(header, rows)


def trace_table(results, budgets) -> str:
    rows = []
    base = {}
    for key, entry in results.items():
        name, budget = key.split("|")
        if name.startswith("PyHessian"):
            base[budget] = statistics.median(entry["seconds"])
    for key, entry in results.items():
        name, budget = key.split("|")
        seconds = statistics.median(entry["seconds"])
        ratio = base.get(budget)
        rows.append(
            [
                name,
                budget,
                _range(entry["products"]),
                f"{100 * statistics.fmean(entry['error']):.2f}",
                f"{1e3 * seconds:.1f}",
                f"{seconds / ratio:.2f}" if ratio else "",
            ]
        )
    order = {str(b): i for i, b in enumerate(budgets)}
    names = ["PyHessian trace()", "PyHessian trace(tol=0)", "curvjax Hutchinson", "curvjax Hutch++"]
    rows.sort(key=lambda r: (order.get(r[1], -1), names.index(r[0])))
    header = [
        "method",
        "budget",
        "products",
        "mean abs. rel. error %",
        "ms (median)",
        "time / PyHessian",
    ]
    table = markdown_table(header, rows)
    reach = []
    for name in ("PyHessian trace(tol=0)", "curvjax Hutchinson", "curvjax Hutch++"):
        ok = [
            b
            for b in budgets
            if statistics.fmean(results.get(f"{name}|{b}", {"error": [1.0]})["error"]) <= 0.01
        ]
        if any(f"{name}|{b}" in results for b in budgets):
            reach.append(f"{name}: {min(ok) if ok else f'> {max(budgets)}'} products")
    return table + "\n\nSmallest budget with mean absolute error <= 1 %: " + "; ".join(reach) + "."


def density_table(rows) -> str:
    out = []
    for name, row in rows.items():
        out.append(
            [
                name,
                row["products"],
                f"{1e3 * row['seconds']:.0f}",
                f"{row['tv_distance']:.3f}" if "tv_distance" in row else "",
                f"{row['largest_node_rel_error']:.1e}" if "tv_distance" in row else "",
                f"{row['smallest_node_abs_error_over_range']:.1e}" if "tv_distance" in row else "",
            ]
        )
    header = [
        "method",
        "products",
        "ms",
        "TV distance to exact",
        "λ_max rel. error",
        "λ_min error / range",
    ]
    return markdown_table(header, out)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny model, every code path (CI)")
    parser.add_argument("--seeds", type=int, default=None, help="seeds per comparison")
    parser.add_argument(
        "--json",
        type=Path,
        default=None,
        help="output (default benchmarks/results/spectrum-<machine>.json; none with --smoke)",
    )
    parser.add_argument("--no-torch", action="store_true", help="skip PyHessian")
    parser.add_argument(
        "--torch-threads",
        type=int,
        default=1,
        help="torch intra-op threads (default 1: PyHessian's products are small ops, and with 2 "
        "threads on a shared 2-core machine their time varied from 1 to 70 ms per product)",
    )
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    settings = dict(SMOKE if args.smoke else FULL)
    if args.seeds is not None:
        settings["seeds"] = settings["trace_seeds"] = args.seeds
    env = harness.environment(("pyhessian",))
    env["openblas_num_threads"] = os.environ.get("OPENBLAS_NUM_THREADS")
    print(f"# Hessian spectrum benchmark ({'smoke' if args.smoke else 'full'})")
    print(
        f"CPU: {env['cpu_model']}, {env['usable_cores']} usable cores; load average "
        f"{env['load_average_at_start']}"
    )

    apply_fn, params, batch = make_problem(
        settings["hidden"], settings["num_examples"], settings["train_steps"]
    )
    size = sum(leaf.size for leaf in jax.tree.leaves(params))
    start = time.perf_counter()
    hessian = np.asarray(
        jit(curvjax.hessian_matrix, args.smoke, ("apply_fn",))(apply_fn, params, batch)
    )
    exact_all = np.linalg.eigvalsh(hessian)
    exact, exact_trace = exact_all[::-1][:10], float(np.trace(hessian))
    dense_seconds = time.perf_counter() - start
    print(
        f"digits MLP 64-{settings['hidden']}-10 ReLU, {size} parameters, {settings['num_examples']} "
        f"examples, float64; dense Hessian + eigvalsh {dense_seconds:.1f} s; trace {exact_trace:.4f}, "
        f"λ in [{exact_all[0]:.4g}, {exact_all[-1]:.4g}]"
    )

    failures = []
    pyh = None
    checks: dict[str, Any] = {}
    if not args.no_torch:
        try:
            import pyhessian  # noqa: F401
            import torch
        except ImportError as error:
            print(f"PyHessian comparison skipped: {error}")
        else:
            torch.set_num_threads(args.torch_threads)
            torch.set_default_dtype(torch.float64)  # PyHessian draws its vectors with torch.randn
            net = torch_twin(params)
            checks["torch_twin"] = check_twin(net, apply_fn, params, batch)
            if max(checks["torch_twin"].values()) > 1e-10:
                failures.append(f"torch twin disagrees with JAX: {checks['torch_twin']}")
            pyh = CountedPyHessian(net, batch)

    def phase(name, fn, *extra):
        start = time.perf_counter()
        out = fn(apply_fn, params, batch, *extra, settings, pyh, args.smoke)
        print(f"[{name}: {time.perf_counter() - start:.1f} s]", file=sys.stderr, flush=True)
        return out

    try:
        eig_results, eig_raw = phase("top-10 eigenvalues", top_eigenvalues, exact)
        trace_results, trace_raw = phase("trace", traces, exact_trace)
        density_rows, density_raw = phase("density", densities, exact_all)
    finally:
        if pyh is not None:
            pyh.close()

    lanczos_error = max(eig_results["curvjax Lanczos (residual 1e-6)"]["error"])
    checks["lanczos_top10_max_rel_error"] = lanczos_error
    if lanczos_error > 1e-6:
        failures.append(f"Lanczos top-10 relative error {lanczos_error:.1e} > 1e-6")

    tables = "\n\n".join(
        [
            "#### Top-10 eigenvalues",
            eigen_table(eig_results),
            "#### Trace",
            trace_table(trace_results, settings["budgets"]),
            "#### Spectral density",
            density_table(density_rows),
        ]
    )
    print("\n" + tables)
    harness.finish_environment(env)
    total = time.perf_counter() - started
    print(
        f"\nload average at start {env['load_average_at_start']}; at end "
        f"{env['load_average_at_end']}; total {total:.0f} s"
    )

    if args.json is not None or not args.smoke:
        payload = {
            "experiment": "spectrum",
            "title": "Hessian spectra against PyHessian",
            "command": "python benchmarks/spectrum.py "
            + " ".join(sys.argv[1:] if argv is None else argv),
            "settings": {k: list(v) if isinstance(v, tuple) else v for k, v in settings.items()},
            "environment": env,
            "problem": {
                "parameters": int(size),
                "exact_top10": exact.tolist(),
                "exact_trace": exact_trace,
                "exact_min": float(exact_all[0]),
                "dense_seconds": dense_seconds,
            },
            "checks": checks,
            "top_eigenvalues": eig_raw,
            "trace": trace_raw,
            "density": density_raw,
            "total_seconds": total,
            "failed_checks": failures,
            # The tables as printed, for report.py.
            "markdown": tables,
        }
        print(f"wrote {harness.write_results(payload, args.json)}")
    for failure in failures:
        print(f"CHECK FAILED: {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
