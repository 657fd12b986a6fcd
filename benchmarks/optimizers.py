"""Second-order optimizers: step time against kfac-jax and optax SGD, steps to an accuracy target.

Two measurements:

1. **Step time** on DeepOBS 3c3d (CIFAR-10 shapes, random data, ``N = 64``, float32): one
   training step of

   - an optax SGD step with momentum (``jax.value_and_grad`` + ``optax.sgd``), the baseline;
   - curvjax K-FAC with fixed learning rate, momentum and damping
     (``optax.chain(scale_by_kfac(...), optax.trace(0.9), optax.scale(-α))``), the gradient and
     the K-FAC factors from one ``curvjax.extract(..., ["kfac"])`` pass;
   - curvjax ``kfac`` with Levenberg-Marquardt damping and the quadratic-model learning rate and
     momentum (Martens & Grosse §6-7);
   - kfac-jax's ``Optimizer.step`` with the same settings (``estimation_mode="fisher_gradients"``:
     one sampled label per example, as ``curvjax.kfac``; factor EMA 0.95; the same damping,
     learning rate and momentum, or the adaptive versions), on the same weights and batch, and an
     optax SGD step in kfac-jax's environment;

   each with the inverses (eigendecompositions / inverses of the damped factors) refreshed every
   step (``T = 1``) and every 10 steps (``T = 10``). Time per step is the mean over a block of
   10 steps (one refresh per block at ``T = 10``, two damping adaptations) — the median over
   ``--repeats`` blocks after one warm-up block (kfac-jax compiles a variant of its step for
   the refresh steps), measured round-robin over the methods of one process.

2. **Steps and wall time to a target test accuracy** on scikit-learn's digits (a small CNN,
   1297 training / 500 test images, batch 64, test accuracy every 10 steps): curvjax ``kfac``
   (adaptive damping, ``T = 5``) over a small grid of initial damping values against Adam tuned
   over a learning-rate grid. Wall time counts the training steps only (no compilation, no
   evaluation).

kfac-jax runs in its **own virtual environment**, in a subprocess that executes this file with
``--kfac-jax-worker``: kfac-jax 0.0.8 fails with the jax 0.10 that curvjax needs ("too many values
to unpack" from a changed jax internal), and works with jax 0.9.0. Weights and data go to the
worker through an ``.npz`` file, results come back as JSON. Create the environment with::

    python -m venv /tmp/kfacenv
    /tmp/kfacenv/bin/pip install "jax[cpu]==0.9.0" "jaxlib==0.9.0" kfac-jax==0.0.8 \\
        "flax==0.12.2" "optax==0.2.8" numpy

Usage::

    python benchmarks/optimizers.py                      # full run, writes benchmarks/results/
    python benchmarks/optimizers.py --smoke              # tiny sizes, no kfac-jax (CI; < 30 s)
    python benchmarks/optimizers.py --kfac-python /tmp/kfacenv/bin/python --repeats 3
    python benchmarks/optimizers.py --skip-kfac-jax --skip-digits

The kfac-jax interpreter is ``--kfac-python``, else ``$KFAC_JAX_PYTHON``, else
``/tmp/kfacenv/bin/python``; without one the kfac-jax rows are left out (``--smoke`` leaves them
out unless ``--kfac-python`` is given). Differences in what is computed: kfac-jax folds each bias
into its layer's Kronecker block (a homogeneous coordinate), curvjax keeps biases as their own
(full) blocks; both use factored Tikhonov damping with the trace-norm ``π``.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import harness  # noqa: E402  (sits beside this script; imports only the standard library)

DEFAULT_KFAC_PYTHON = "/tmp/kfacenv/bin/python"
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}

#: Step-time settings shared by both libraries.
LEARNING_RATE, MOMENTUM, DAMPING, EMA_DECAY = 1e-3, 0.9, 1e-3, 0.95
#: (name, inverse refresh period T, adaptive damping / learning rate / momentum)
KFAC_CONFIGS = (
    ("K-FAC fixed, T=1", 1, False),
    ("K-FAC fixed, T=10", 10, False),
    ("K-FAC adaptive, T=10", 10, True),
)
#: Steps per timed block: one refresh per block at T = 10, two damping adaptations (every 5).
BLOCK = 10


# --------------------------------------------------------------------------------------------
# Shared helpers (used in both environments: numpy, jax, flax only)
# --------------------------------------------------------------------------------------------


def step_problem(smoke: bool):
    """``(model, input_shape, batch_size, description)`` of the step-time problem."""
    sys.path.insert(0, str(HERE))
    from models import CIFAR_SHAPE, ThreeC3D, WideMLP

    if smoke:
        return WideMLP(hidden_features=(16, 16)), (8, 8, 3), 8, "MLP 192-16-16-10, N = 8"
    return ThreeC3D(), CIFAR_SHAPE, 64, "3c3d (895,210 parameters), N = 64, CIFAR-10 shapes"


def flatten(params) -> dict[str, np.ndarray]:
    import jax

    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in leaves}


def unflatten(template, flat: dict[str, np.ndarray]):
    import jax
    import jax.numpy as jnp

    return jax.tree_util.tree_map_with_path(
        lambda path, leaf: jnp.asarray(flat[jax.tree_util.keystr(path)], leaf.dtype), template
    )


def time_blocks(runners: dict, repeats: int) -> dict[str, dict[str, Any]]:
    """Round-robin timing: each runner's ``run()`` does one block of steps and blocks on it.

    Returns ``name -> {"step_s": median seconds per step, "samples": [...], "compile_s"}``.
    """
    for runner in runners.values():
        runner.run()  # warm-up block (after compilation)
    samples: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(repeats):
        for name, runner in runners.items():
            start = time.perf_counter()
            runner.run()
            samples[name].append((time.perf_counter() - start) / runner.block)
    return {
        name: {
            "step_s": statistics.median(values),
            "samples": values,
            "compile_s": runners[name].compile_s,
            "block": runners[name].block,
        }
        for name, values in samples.items()
    }


class SgdRunner:
    """optax SGD with momentum; ``block`` steps per ``run()``."""

    def __init__(self, model, params, batch, block, compiler_options=None):
        import jax
        import optax

        self.block = block
        opt = optax.sgd(LEARNING_RATE, MOMENTUM)

        def loss_fn(p, batch):
            logits = model.apply(p, batch[0])
            return optax.softmax_cross_entropy_with_integer_labels(logits, batch[1]).mean()

        def step(p, s, batch):
            grads = jax.grad(loss_fn)(p, batch)
            updates, s = opt.update(grads, s, p)
            return optax.apply_updates(p, updates), s

        self.params, self.state, self.batch = params, opt.init(params), batch
        start = time.perf_counter()
        jitted = jax.jit(step, compiler_options=compiler_options)
        self.step = jitted.lower(self.params, self.state, batch).compile()
        self.compile_s = time.perf_counter() - start

    def run(self):
        import jax

        for _ in range(self.block):
            self.params, self.state = self.step(self.params, self.state, self.batch)
        jax.block_until_ready(self.params)


# --------------------------------------------------------------------------------------------
# kfac-jax worker (runs in kfac-jax's environment; imports no curvjax)
# --------------------------------------------------------------------------------------------


class KfacJaxRunner:
    def __init__(self, model, params, batch, period, adaptive):
        import jax
        import kfac_jax
        import optax

        def loss_fn(p, batch):
            logits = model.apply(p, batch[0])
            kfac_jax.register_softmax_cross_entropy_loss(logits, batch[1])
            return optax.softmax_cross_entropy_with_integer_labels(logits, batch[1]).mean()

        fixed = (
            {}
            if adaptive
            else {
                "learning_rate_schedule": lambda step: LEARNING_RATE,
                "momentum_schedule": lambda step: MOMENTUM,
                "damping_schedule": lambda step: DAMPING,
            }
        )
        self.opt = kfac_jax.Optimizer(
            value_and_grad_func=jax.value_and_grad(loss_fn),
            l2_reg=0.0,
            use_adaptive_learning_rate=adaptive,
            use_adaptive_momentum=adaptive,
            use_adaptive_damping=adaptive,
            initial_damping=DAMPING if adaptive else None,
            damping_adaptation_interval=5,
            estimation_mode="fisher_gradients",
            curvature_ema=EMA_DECAY,
            inverse_update_period=period,
            num_burnin_steps=0,
            multi_device=False,
            **fixed,
        )
        # kfac-jax donates its inputs: every runner gets its own copy of the weights
        self.params = jax.tree.map(lambda leaf: leaf.copy(), params)
        self.block, self.batch = BLOCK, batch
        self.key = jax.random.key(0)
        start = time.perf_counter()
        self.state = self.opt.init(self.params, self.key, batch)
        self.step_count = 0
        self._one()  # compiles
        jax.block_until_ready(self.params)
        self.compile_s = time.perf_counter() - start

    def _one(self):
        self.params, self.state, _ = self.opt.step(
            self.params, self.state, self.key, batch=self.batch, global_step_int=self.step_count
        )
        self.step_count += 1

    def run(self):
        import jax

        for _ in range(self.block):
            self._one()
        jax.block_until_ready(self.params)


def kfac_jax_worker(npz_path: str, json_path: str, smoke: bool, repeats: int) -> None:
    import jax
    import jax.numpy as jnp

    model, _, _, _ = step_problem(smoke)
    data = dict(np.load(npz_path))
    batch = (jnp.asarray(data.pop("__x__")), jnp.asarray(data.pop("__y__")))
    template = jax.eval_shape(model.init, jax.random.key(0), batch[0][:1])
    params = unflatten(template, data)
    runners: dict[str, Any] = {"optax SGD": SgdRunner(model, params, batch, BLOCK)}
    for name, period, adaptive in KFAC_CONFIGS:
        print(f"kfac-jax worker: compiling {name}", file=sys.stderr, flush=True)
        runners[name] = KfacJaxRunner(model, params, batch, period, adaptive)
    print("kfac-jax worker: timing", file=sys.stderr, flush=True)
    results = time_blocks(runners, repeats)
    out = {"results": results, "environment": harness.environment(("kfac-jax",))}
    pathlib.Path(json_path).write_text(json.dumps(out, indent=1))


# --------------------------------------------------------------------------------------------
# curvjax (main environment)
# --------------------------------------------------------------------------------------------


class CurvjaxKfacRunner:
    def __init__(self, model, params, batch, period, adaptive, compiler_options=None):
        import jax
        import optax

        import curvjax
        from curvjax.optim import kfac, scale_by_kfac

        apply_fn, x = model.apply, batch[0]
        if adaptive:
            opt = kfac(
                apply_fn,
                x,
                damping=DAMPING,
                ema_decay=EMA_DECAY,
                inverse_interval=period,
                adaptation_interval=5,
            )
        else:
            opt = optax.chain(
                scale_by_kfac(
                    apply_fn, x, damping=DAMPING, ema_decay=EMA_DECAY, inverse_interval=period
                ),
                optax.trace(decay=MOMENTUM),
                optax.scale(-LEARNING_RATE),
            )

        def step(p, s, batch, key):
            out = curvjax.extract(apply_fn, p, batch, ["kfac"], key=key)
            updates, s = opt.update(out["grad"], s, p, curvature=out["kfac"], batch=batch)
            return optax.apply_updates(p, updates), s

        self.block, self.batch, self.params = BLOCK, batch, params
        self.key = jax.random.key(0)
        start = time.perf_counter()
        self.state = jax.jit(opt.init)(params)
        jitted = jax.jit(step, compiler_options=compiler_options)
        self.step = jitted.lower(self.params, self.state, batch, self.key).compile()
        self.compile_s = time.perf_counter() - start

    def run(self):
        import jax

        for _ in range(self.block):
            self.key, k = jax.random.split(self.key)
            self.params, self.state = self.step(self.params, self.state, self.batch, k)
        jax.block_until_ready(self.params)


def step_times(args) -> dict[str, Any]:
    import jax
    import jax.numpy as jnp

    model, shape, n, description = step_problem(args.smoke)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, *shape)).astype(np.float32)
    y = (np.arange(n) % 10).astype(np.int32)
    params = jax.jit(model.init)(jax.random.key(0), jnp.asarray(x[:1]))
    batch = (jnp.asarray(x), jnp.asarray(y))
    options = FAST_COMPILE if args.smoke else None

    result: dict[str, Any] = {"problem": description, "kfac_jax": None}
    runners: dict[str, Any] = {"optax SGD": SgdRunner(model, params, batch, BLOCK, options)}
    for name, period, adaptive in KFAC_CONFIGS:
        if args.smoke and period != 10:
            continue
        runners[name] = CurvjaxKfacRunner(model, params, batch, period, adaptive, options)
    result["curvjax"] = time_blocks(runners, args.repeats)

    python = args.kfac_python
    if python and not args.skip_kfac_jax and pathlib.Path(python).exists():
        with tempfile.TemporaryDirectory() as tmp:
            npz, out = os.path.join(tmp, "problem.npz"), os.path.join(tmp, "kfac_jax.json")
            np.savez(npz, __x__=x, __y__=y, **flatten(params))
            command = [python, __file__, "--kfac-jax-worker", npz, out]
            command += ["--repeats", str(args.kfac_jax_repeats)] + (
                ["--smoke"] if args.smoke else []
            )
            start = time.perf_counter()
            proc = subprocess.run(command, stdout=subprocess.DEVNULL)  # progress on stderr
            if proc.returncode != 0:
                raise RuntimeError("the kfac-jax worker failed (its stderr is above)")
            result["kfac_jax"] = json.loads(pathlib.Path(out).read_text())
            result["kfac_jax"]["wall_s"] = time.perf_counter() - start
    return result


def digits_data():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    images, labels = load_digits(return_X_y=True)
    images = (images / 16.0).astype(np.float32).reshape(-1, 8, 8, 1)
    return train_test_split(images, labels.astype(np.int32), test_size=500, random_state=0)


def time_to_accuracy(args) -> dict[str, Any]:
    """Steps and seconds until the test accuracy first reaches ``args.target``."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import optax

    import curvjax
    from curvjax.optim import kfac

    class SmallCNN(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.relu(nn.Conv(16, (3, 3))(x))
            x = nn.max_pool(x, (2, 2), strides=(2, 2))
            x = x.reshape((x.shape[0], -1))
            return nn.Dense(10)(nn.relu(nn.Dense(64)(x)))

    x_train, x_test, y_train, y_test = map(jnp.asarray, digits_data())
    model, batch_size, every = SmallCNN(), 64, 10
    params0 = jax.jit(model.init)(jax.random.key(0, impl="rbg"), x_train[:1])
    options = FAST_COMPILE if args.smoke else None

    def loss_fn(p, batch):
        logits = model.apply(p, batch[0])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch[1]).mean()

    def make_block(opt, second_order):
        def step(carry, idx):
            p, s, key = carry
            key, k = jax.random.split(key)
            batch = (x_train[idx], y_train[idx])
            if second_order:
                out = curvjax.extract(model.apply, p, batch, ["kfac"], key=k)
                u, s = opt.update(out["grad"], s, p, curvature=out["kfac"], batch=batch)
            else:
                u, s = opt.update(jax.grad(loss_fn)(p, batch), s, p)
            return (optax.apply_updates(p, u), s, key), None

        def block(p, s, key, indices):  # `every` steps
            (p, s, key), _ = jax.lax.scan(step, (p, s, key), indices)
            return p, s, key

        return jax.jit(block, compiler_options=options)

    accuracy = jax.jit(lambda p: jnp.mean(jnp.argmax(model.apply(p, x_test), -1) == y_test))

    def run(opt, second_order):
        block = make_block(opt, second_order)
        state = jax.jit(opt.init)(params0)
        key = jax.random.key(1, impl="rbg")
        order = np.random.default_rng(0)

        def indices():
            rows = [order.choice(x_train.shape[0], batch_size, replace=False) for _ in range(every)]
            return jnp.asarray(np.stack(rows))

        start = time.perf_counter()
        compiled = block.lower(params0, state, key, indices()).compile()
        compile_s = time.perf_counter() - start
        p, seconds, steps, reached, acc = params0, 0.0, 0, None, 0.0
        while steps < args.max_steps:
            idx = indices()
            start = time.perf_counter()
            p, state, key = compiled(p, state, key, idx)
            jax.block_until_ready(p)
            seconds += time.perf_counter() - start
            steps += every
            acc = float(accuracy(p))
            if not np.isfinite(acc):
                break
            if reached is None and acc >= args.target:
                reached = {"steps": steps, "seconds": seconds}
                break
        return {"reached": reached, "final_acc": acc, "steps_run": steps, "compile_s": compile_s}

    grids = {
        "Adam": [(f"lr={lr:g}", optax.adam(lr), False) for lr in args.adam_lrs],
        "curvjax K-FAC (adaptive, T=5)": [
            (f"damping={d:g}", kfac(model.apply, x_train[:1], damping=d, inverse_interval=5), True)
            for d in args.kfac_dampings
        ],
    }
    out: dict[str, Any] = {"target": args.target, "max_steps": args.max_steps, "runs": {}}
    for method, grid in grids.items():
        for label, opt, second_order in grid:
            out["runs"][f"{method} {label}"] = {"method": method, **run(opt, second_order)}
    return out


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def _ms(seconds):
    return f"{1000 * seconds:.1f}" if seconds is not None else "-"


def _x(a, b):
    return f"{a / b:.2f}" if a is not None and b else "-"


def step_table(result) -> str:
    ours = result["curvjax"]
    theirs = (result["kfac_jax"] or {}).get("results", {})
    sgd = ours["optax SGD"]["step_s"]
    sgd_theirs = theirs.get("optax SGD", {}).get("step_s")
    lines = [
        f"Step time, {result['problem']} (median over blocks of 10 steps)",
        "",
        "| method | curvjax ms | × SGD | kfac-jax ms | × SGD (its env) | curvjax / kfac-jax |",
        "|---|---|---|---|---|---|",
        f"| optax SGD (momentum) | {_ms(sgd)} | 1.00 | {_ms(sgd_theirs)} | "
        f"{'1.00' if sgd_theirs else '-'} | {_x(sgd, sgd_theirs)} |",
    ]
    for name, _, _ in KFAC_CONFIGS:
        mine = ours.get(name, {}).get("step_s")
        other = theirs.get(name, {}).get("step_s")
        lines.append(
            f"| {name} | {_ms(mine)} | {_x(mine, sgd)} | {_ms(other)} | {_x(other, sgd_theirs)} "
            f"| {_x(mine, other)} |"
        )
    compile_mine = {k: round(v["compile_s"], 1) for k, v in ours.items()}
    lines += ["", f"compile s (curvjax): {compile_mine}"]
    if theirs:
        lines.append(
            f"compile s (kfac-jax, incl. init): { ({k: round(v['compile_s'], 1) for k, v in theirs.items()}) }"
        )
    return "\n".join(lines)


def digits_table(result) -> str:
    lines = [
        f"Digits (small CNN, batch 64): steps / seconds to {100 * result['target']:.0f}% test accuracy"
        f" (at most {result['max_steps']} steps, checked every 10)",
        "",
        "| optimizer | steps | seconds | final test acc | compile s |",
        "|---|---|---|---|---|",
    ]
    for name, run in result["runs"].items():
        reached = run["reached"]
        steps = reached["steps"] if reached else f"> {run['steps_run']}"
        seconds = f"{reached['seconds']:.2f}" if reached else "-"
        lines.append(
            f"| {name} | {steps} | {seconds} | {100 * run['final_acc']:.1f}% | "
            f"{run['compile_s']:.1f} |"
        )
    best = {}
    for run in result["runs"].values():
        if run["reached"]:
            m = run["method"]
            if m not in best or run["reached"]["steps"] < best[m]["steps"]:
                best[m] = run["reached"]
    if best:
        lines += [
            "",
            "best per optimizer: "
            + ", ".join(f"{m}: {b['steps']} steps / {b['seconds']:.2f} s" for m, b in best.items()),
        ]
    return "\n".join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (CI), no kfac-jax")
    parser.add_argument("--repeats", type=int, default=None, help="timed blocks (default 5; 2)")
    parser.add_argument("--kfac-jax-repeats", type=int, default=1)
    parser.add_argument("--kfac-python", default=None, help="python of the kfac-jax env")
    parser.add_argument("--skip-kfac-jax", action="store_true")
    parser.add_argument("--skip-steps", action="store_true", help="skip the step-time part")
    parser.add_argument("--skip-digits", action="store_true", help="skip the digits part")
    parser.add_argument("--target", type=float, default=0.97)
    parser.add_argument("--max-steps", type=int, default=None, help="default 600; 10 (smoke)")
    parser.add_argument("--adam-lrs", type=float, nargs="+", default=None)
    parser.add_argument("--kfac-dampings", type=float, nargs="+", default=None)
    parser.add_argument(
        "--json",
        default=None,
        help="output (default benchmarks/results/optimizers-<machine>.json; none with --smoke)",
    )
    parser.add_argument("--no-torch", action="store_true", help="no effect (no torch here)")
    parser.add_argument("--kfac-jax-worker", nargs=2, metavar=("NPZ", "JSON"), default=None)
    args = parser.parse_args(argv)
    if args.repeats is None:
        args.repeats = 2 if args.smoke else 5
    if args.max_steps is None:
        args.max_steps = 10 if args.smoke else 600
    if args.adam_lrs is None:
        args.adam_lrs = [3e-3] if args.smoke else [1e-3, 3e-3, 1e-2, 3e-2]
    if args.kfac_dampings is None:
        args.kfac_dampings = [1e-2] if args.smoke else [1e-3, 1e-2, 1e-1]
    if args.kfac_python is None and not args.smoke:
        args.kfac_python = os.environ.get("KFAC_JAX_PYTHON", DEFAULT_KFAC_PYTHON)
    return args


def main(argv=None) -> int:
    """Run the experiment; print the tables; write the JSON file."""
    args = parse_args(argv)
    if args.kfac_jax_worker:
        kfac_jax_worker(*args.kfac_jax_worker, smoke=args.smoke, repeats=args.repeats)
        return 0
    harness.fast_compile_for_smoke(args.smoke)
    env = harness.environment(("scikit-learn", "kfac-jax"))
    report: dict[str, Any] = {
        "experiment": "optimizers",
        "title": "second-order optimizers against kfac-jax and Adam",
        "command": "python benchmarks/optimizers.py "
        + " ".join(sys.argv[1:] if argv is None else argv),
        "environment": env,
        "settings": {k: v for k, v in vars(args).items() if k != "kfac_jax_worker"},
        "failed_checks": [],
    }
    tables = []
    if not args.skip_steps:
        report["steps"] = step_times(args)
        tables.append(step_table(report["steps"]))
        print(tables[-1], flush=True)
        print()
    if not args.skip_digits:
        report["digits"] = time_to_accuracy(args)
        tables.append(digits_table(report["digits"]))
        print(tables[-1])
    # The tables as printed, for report.py (their layout depends on what was run).
    report["markdown"] = "\n\n".join(tables)
    harness.finish_environment(env)
    print(
        f"\nload average at start {env['load_average_at_start']}, "
        f"at end {env['load_average_at_end']}"
    )
    if args.json is not None or not args.smoke:
        path = None if args.json is None else pathlib.Path(args.json)
        print(f"wrote {harness.write_results(report, path)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
