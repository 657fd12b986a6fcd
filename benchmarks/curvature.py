"""Second-order overhead (BackPACK Fig. 6, right half, and Fig. 9): curvature vs the gradient.

For DeepOBS 3C3D with 10 and with 100 classes (CIFAR shapes, N = 64) it times, in one run,
``ggn_diag``, ``ggn_diag_mc``, ``kfac``, ``kflr`` and ``hvp`` as ratios to the jitted ``jax.grad`` of
the same loss (and to ``curvjax.grad``), and BackPACK's DiagGGNExact, DiagGGNMC, KFAC and KFLR on the
same weights and data as ratios to its own backward pass. ``hessian_diag`` is timed on a small
network with one sigmoid (BackPACK's Fig. 9 setting) against BackPACK's DiagHessian. XLA flops and
temporary memory come from the compiled programs; the flops of quantities that form per-example
gradients a chunk of examples at a time (``lax.scan``) count the loop body once, so they are a
lower bound. The last column checks the targets of issue 4.

``python benchmarks/overhead.py`` runs these rows after the first-order ones (``--part second`` for
these only); ``python benchmarks/curvature.py`` runs them alone (``--smoke`` for a tiny, fast
configuration).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import models  # noqa: E402
import overhead  # noqa: E402

import curvjax  # noqa: E402

JAX_ROWS = ("ggn_diag", "ggn_diag_mc", "kfac", "kflr", "hvp")
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


def _jax_calls(apply_fn, variables, batch, rows):
    key = jax.random.key(0)

    def plain_grad(p, b):
        return jax.grad(lambda q: overhead.mean_cross_entropy(apply_fn(q, b[0]), b[1]))(p)

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
    compiled, costs = {}, {}
    for name, fn in fns.items():
        c = jax.jit(fn).lower(variables, batch).compile()
        compiled[name] = c
        costs[name] = overhead.xla_costs(c)
    return compiled, costs


def _torch_twin(model, variables, inputs, input_shape, nchw):
    import torch

    twin = models.torch_sequential_from_flax(model, variables, input_shape)
    x = np.asarray(inputs)
    if nchw:
        x = x.transpose(0, 3, 1, 2)
    return twin, torch.from_numpy(np.array(x, dtype=np.float32, order="C"))


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
    y = torch.from_numpy(np.asarray(targets, dtype=np.int64))

    def backward(extension=None):
        model.zero_grad(set_to_none=True)
        value = loss_fn(model(inputs), y)
        if extension is None:
            value.backward()
        else:
            with backpack.backpack(getattr(extensions, extension)()):
                value.backward()

    calls = {"grad": backward}
    for r in rows:
        calls[r] = lambda e=BACKPACK_ROWS[r]: backward(e)
    return calls, model


def run_problem(
    name, model, input_shape, nchw, rows, batch_size, repeats, warmup, threads, use_torch
):
    key = jax.random.key(0)
    variables = models.init_model(model, key, input_shape)
    inputs = jax.random.normal(jax.random.key(1), (batch_size, *input_shape), jnp.float32)
    num_classes = model.num_classes if hasattr(model, "num_classes") else 10
    targets = jax.random.randint(jax.random.key(2), (batch_size,), 0, num_classes)
    batch = (inputs, targets)
    compiled, costs = _jax_calls(model.apply, variables, batch, rows)
    calls = {
        n: (lambda c=c: jax.block_until_ready(c(variables, batch))) for n, c in compiled.items()
    }
    medians, _ = overhead.time_round_robin(calls, repeats, warmup)
    result = {
        "model": name,
        "num_params": models.count_params(variables),
        "batch_size": batch_size,
        "jax": {
            n: {"seconds": medians[n], "ratio": medians[n] / medians["grad"], **costs[n]}
            for n in medians
        },
    }
    if use_torch:
        twin = (
            _sigmoid_twin(variables)
            if isinstance(model, SigmoidNet)
            else _torch_twin(model, variables, inputs, input_shape, nchw)[0]
        )
        x = np.asarray(inputs)
        if nchw:
            x = x.transpose(0, 3, 1, 2)
        import torch

        x = torch.from_numpy(np.array(x, dtype=np.float32, order="C"))
        bp_rows = [r for r in rows if r in BACKPACK_ROWS]
        bp_calls, bp_model = _backpack_calls(twin, x, targets, bp_rows, threads)
        bp_medians, _ = overhead.time_round_robin(bp_calls, repeats, warmup)
        result["backpack"] = {
            n: {"seconds": bp_medians[n], "ratio": bp_medians[n] / bp_medians["grad"]}
            for n in bp_medians
        }
        if "ggn_diag" in rows or "hessian_diag" in rows:  # same numbers, not only same speed
            which = "ggn_diag" if "ggn_diag" in rows else "hessian_diag"
            bp_calls[which]()
            attr = "diag_ggn_exact" if which == "ggn_diag" else "diag_h"
            ours = compiled[which](variables, batch)
            expected = (
                models.to_torch_layout(model, ours["params"], input_shape)
                if not isinstance(model, SigmoidNet)
                else None
            )
            values = [getattr(p, attr).numpy() for p in bp_model.parameters()]
            if expected is not None:
                result["backpack_relative_error_" + which] = overhead.relative_error(
                    values, expected
                )
    return result


#: Targets of issue 4, as ratios to the gradient (absolute) or to BackPACK's ratio (relative).
TARGETS = {
    "ggn_diag_mc": ("abs", 1.5),
    "kfac": ("abs", 1.5),
    "hvp": ("abs", 3.0),
    "ggn_diag": ("backpack", 0.5),
    "kflr": ("backpack", 0.5),
}


def _target_text(q, ratio, bp_ratio):
    kind, value = TARGETS.get(q, (None, None))
    if kind == "abs":
        return f"≤ {value:g}× grad: {'met' if ratio <= value else 'MISSED'}"
    if kind == "backpack" and bp_ratio is not None:
        bound = value * bp_ratio
        return f"≤ {bound:.2f}× (half BackPACK's): {'met' if ratio <= bound else 'MISSED'}"
    return ""


def markdown(results) -> str:
    lines = [
        "| model | quantity | curvjax ms | × jax.grad | × curvjax.grad | GFLOP | temp MiB | "
        "BackPACK ms | BackPACK × its backward | target |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in results:
        grad_seconds = r["jax"]["grad"]["seconds"]
        own_seconds = r["jax"]["curvjax.grad"]["seconds"]
        for q, v in r["jax"].items():
            bp = r.get("backpack", {}).get(q)
            flops, mem = v.get("flops"), v.get("temp_bytes")
            ratio = v["seconds"] / grad_seconds
            cells = [
                r["model"],
                q,
                f"{1e3 * v['seconds']:.1f}",
                f"{ratio:.2f}",
                f"{v['seconds'] / own_seconds:.2f}",
                "" if flops is None else f"{flops / 1e9:.2f}",
                "" if mem is None else f"{mem / 2**20:.0f}",
                "" if bp is None else f"{1e3 * bp['seconds']:.1f}",
                "" if bp is None else f"{bp['ratio']:.2f}",
                _target_text(q, ratio, None if bp is None else bp["ratio"]),
            ]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def problems(smoke: bool):
    """``(name, model, input shape, NCHW twin, rows)`` of each network."""
    if smoke:
        small = {"conv_features": (4, 6, 8), "dense_features": (16, 8)}
        return [
            (
                "3c3d-tiny (10 classes)",
                models.ThreeC3D(num_classes=10, **small),
                models.CIFAR_SHAPE,
                True,
                JAX_ROWS,
            ),
            ("sigmoid net", SigmoidNet(), (8, 8, 1), False, ("hessian_diag",)),
        ]
    return [
        (
            f"3c3d ({c} classes)",
            models.ThreeC3D(num_classes=c),
            models.CIFAR_SHAPE,
            True,
            JAX_ROWS,
        )
        for c in (10, 100)
    ] + [("sigmoid net (Fig. 9)", SigmoidNet(), models.CIFAR_SHAPE, False, ("hessian_diag",))]


def run_all(smoke: bool, repeats: int, batch_size: int, threads: int, use_torch: bool) -> list:
    """Time every problem; print each table as it is done; return the results."""
    results = []
    for name, model, shape, nchw, rows in problems(smoke):
        batch = 8 if smoke else batch_size
        results.append(
            run_problem(name, model, shape, nchw, rows, batch, repeats, 1, threads, use_torch)
        )
        print(markdown(results[-1:]), flush=True)
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny models, a few repeats")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--no-torch", action="store_true")
    parser.add_argument("--json", type=pathlib.Path, default=None)
    args = parser.parse_args(argv)
    repeats = args.repeats or (2 if args.smoke else 10)
    use_torch = not args.no_torch and overhead.torch_available()
    threads = overhead.usable_cores()
    results = run_all(args.smoke, repeats, args.batch_size, threads, use_torch)
    if args.json:
        args.json.write_text(
            json.dumps(
                {"environment": overhead.environment(), "results": results}, indent=1, default=float
            )
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
