"""Second-order overhead (BackPACK Fig. 6, right half, and Fig. 9): curvature vs the gradient.

For DeepOBS 3C3D with 10 and with 100 classes (CIFAR shapes, N = 64) it times, in one run,
``ggn_diag``, ``ggn_diag_mc``, ``kfac``, ``kflr`` and ``hvp`` as ratios to the jitted ``jax.grad`` of
the same loss, and BackPACK's DiagGGNExact, DiagGGNMC, KFAC and KFLR on the same weights and data
as ratios to its own backward pass. ``hessian_diag`` is timed on a small network with one sigmoid
(BackPACK's Fig. 9 setting) against BackPACK's DiagHessian. XLA flops and temporary memory come
from the compiled programs; curvjax backpropagates curvature vectors a chunk at a time inside a
``lax.scan``, whose body ``cost_analysis`` counts once, so flops are given for the gradient only.

Run ``python benchmarks/curvature.py`` (``--smoke`` for a tiny, fast configuration).
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

    fns = {"grad": plain_grad}
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


def markdown(results) -> str:
    lines = [
        "| model | params | quantity | curvjax / jax.grad | BackPACK / its backward | "
        "curvjax temp memory |",
        "|---|---:|---|---:|---:|---:|",
    ]
    for r in results:
        for q, v in r["jax"].items():
            bp = r.get("backpack", {}).get(q)
            bp_text = "" if bp is None else f"{bp['ratio']:.2f}"
            mem = v.get("temp_bytes")
            mem_text = "" if mem is None else f"{mem / 2**20:.0f} MiB"
            lines.append(
                f"| {r['model']} | {r['num_params']:,} | {q} | {v['ratio']:.2f} | {bp_text} | "
                f"{mem_text} |"
            )
        base_bp = r.get("backpack", {}).get("grad")
        bp_seconds = "" if base_bp is None else f"{base_bp['seconds']:.4f} s"
        lines.append(
            f"| {r['model']} | | baseline seconds | {r['jax']['grad']['seconds']:.4f} s | "
            f"{bp_seconds} | |"
        )
    return "\n".join(lines)


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
    if args.smoke:
        small = {"conv_features": (4, 6, 8), "dense_features": (16, 8)}
        problems = [
            (
                "3c3d-tiny (10 classes)",
                models.ThreeC3D(num_classes=10, **small),
                models.CIFAR_SHAPE,
                True,
                JAX_ROWS,
            ),
            ("sigmoid net", SigmoidNet(), (8, 8, 1), False, ("hessian_diag",)),
        ]
        batch = 8
    else:
        problems = [
            (
                "3c3d (10 classes)",
                models.ThreeC3D(num_classes=10),
                models.CIFAR_SHAPE,
                True,
                JAX_ROWS,
            ),
            (
                "3c3d (100 classes)",
                models.ThreeC3D(num_classes=100),
                models.CIFAR_SHAPE,
                True,
                JAX_ROWS,
            ),
            ("sigmoid net (Fig. 9)", SigmoidNet(), models.CIFAR_SHAPE, False, ("hessian_diag",)),
        ]
        batch = args.batch_size
    results = [
        run_problem(n, m, s, c, rows, batch, repeats, 1, threads, use_torch)
        for n, m, s, c, rows in problems
    ]
    print(markdown(results))
    if args.json:
        args.json.write_text(
            json.dumps(
                {"environment": overhead.environment(), "results": results}, indent=1, default=float
            )
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
