"""Per-example clipping for DP-SGD: curvjax against vmap(grad), jax-privacy and Opacus.

One private step's gradient is the clipped sum ``Σ_n min(1, c / ‖ĝ_n‖) ĝ_n`` of the per-example
gradients ``ĝ_n = ∇ℓ_n`` (``ℓ_n`` the unscaled loss of example ``n``; for the language model the
sum over its positions). On DeepOBS 3c3d (``N = 64``, CIFAR-10 shapes) and the GPT-style language
model of ``transformer.py`` (same construction and sizes: 4 layers, width 128, ``T = 128``,
``N = 16``), each way of computing it is timed as a ratio to the non-private jitted ``jax.grad``
of the summed loss ``Σ_n ℓ_n`` of the same model in the same run, with XLA's temporary memory as a
ratio to the gradient's, flops, compile and first-call times:

- ``curvjax.clipped_grad`` (norms from the taps, the clipped sum as one more weighted contraction
  per tap: no per-example gradients);
- ``vmap(grad) + clip``: ``jax.vmap(jax.grad)`` per-example gradients, then
  ``optax.per_example_global_norm_clip`` (what ``optax.contrib.dpsgd`` does);
- ``jax_privacy.clipped_grad`` (jax-privacy's per-example clipping, ``vmap`` inside, its defaults);
- **Opacus** ghost clipping (``GradSampleModuleFastGradientClipping`` with
  ``DPOptimizerFastGradientClipping`` at noise multiplier 0 and ``DPLossFastGradientClipping``,
  ``loss_reduction="sum"``: ``loss.backward()`` runs its two backward passes and leaves the
  clipped sum in ``p.grad``) on a torch twin with the same weights and data, as a ratio to the
  twin's own non-private forward and backward pass. Opacus' ghost clipping refuses tied weights
  (the LM's embedding is its output projection), so on the LM it is timed on a twin with an untied
  copy of the output projection (a slightly different model: timed, not checked), and Opacus'
  fast gradient clipping (``use_ghost_clipping=False``, per-layer per-example gradients) is run on
  the tied twin and checked.

The clipping norm ``c`` is the median per-example gradient norm of the batch, so about half of the
examples are clipped; it is recorded. Checks (exit status 1 if one fails): the twin's loss and
gradient against JAX's, each clipped sum against the ``vmap(grad)`` one (``max |Δ| / max |ref|``
per leaf, float32 sums in different orders: 1e-4; Opacus against curvjax: 1e-3, see
``OPACUS_TOLERANCE``), curvjax's norms against the ``vmap(grad)`` norms.

Targets (of the benchmark, not tests): curvjax at most 1.25 gradients in time and 1.2 in XLA
temporaries on both models, and faster than every other row.

Usage::

    python benchmarks/private.py                 # full size, benchmarks/results/private-*.json
    python benchmarks/private.py --smoke         # tiny models, every code path (CI)
    python benchmarks/private.py --repeats 3 --no-torch --models lm
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time
import traceback
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
# The checkout this script lies in comes first (clipped_grad is recent); an installed curvjax is
# used when the script is copied elsewhere.
sys.path.insert(1, str(HERE.parent))
import harness  # noqa: E402  (sits beside this script)
import models  # noqa: E402
import overhead  # noqa: E402
import report  # noqa: E402
import transformer  # noqa: E402

import curvjax  # noqa: E402

#: JAX rows, in table order (``grad`` is the non-private reference).
JAX_ROWS = ("curvjax.clipped_grad", "vmap(grad) + clip", "jax_privacy.clipped_grad")
#: Targets of curvjax's row: time and XLA temporaries as ratios to the gradient's.
TARGETS = {"time": 1.25, "temp": 1.2}
#: Opacus against curvjax: float32 in two frameworks (different convolution and reduction
#: orders) through a clipping factor ``c / ‖ĝ_n‖``, whose relative error adds to the gradient's
#: (measured: a few 1e-6 on 3c3d); Opacus also adds 1e-6 to every norm before dividing.
OPACUS_TOLERANCE = 1e-3
MODEL_NAMES = ("3c3d", "lm")


# --------------------------------------------------------------------------------------------
# Problems
# --------------------------------------------------------------------------------------------


def sum_cross_entropy(logits, targets):
    """``Σ`` over examples (and positions) of ``-log softmax(f)[y]``."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets).sum()


def make_problems(smoke: bool, selected) -> list[dict]:
    """3c3d with ``N = 64`` (the weights and data of ``overhead.py``) and the LM of
    ``transformer.py``; tiny versions with ``smoke``."""
    found = []
    if "3c3d" in selected:
        batch_size = 8 if smoke else 64
        (p,) = overhead.make_problems(batch_size, smoke, ("3c3d",))
        found.append(
            {
                "name": p.name,
                "kind": "3c3d",
                "apply_fn": p.apply_fn,
                "params": p.variables,
                "batch": (p.inputs, p.targets),
                "problem": p,
                "sizes": {"batch_size": batch_size},
            }
        )
    if "lm" in selected:
        sizes = transformer.SMOKE if smoke else transformer.FULL
        config, apply_fn, params, batch = transformer.problem(sizes)
        found.append(
            {
                "name": "GPT-style LM" + (" (smoke)" if smoke else ""),
                "kind": "lm",
                "apply_fn": apply_fn,
                "params": params,
                "batch": batch,
                "config": config,
                "sizes": {**sizes, "batch_size": sizes["n"]},
            }
        )
    return found


# --------------------------------------------------------------------------------------------
# JAX side
# --------------------------------------------------------------------------------------------


def per_example_grads(apply_fn, params, batch):
    """``ĝ_n = ∇ℓ_n`` by ``jax.vmap(jax.grad)`` (leading axis ``N``)."""
    inputs, targets = batch

    def example_loss(p, x, y):
        return sum_cross_entropy(apply_fn(p, x[None]), y[None])

    return jax.vmap(jax.grad(example_loss), (None, 0, 0))(params, inputs, targets)


def example_norms(grads):
    """``‖ĝ_n‖`` over all leaves, ``[N]``."""
    leaves = jax.tree.leaves(grads)
    return jnp.sqrt(sum(jnp.sum(g.reshape(g.shape[0], -1) ** 2, axis=1) for g in leaves))


def jax_functions(apply_fn, clip_norm: float) -> tuple[dict, dict]:
    """Name -> ``f(params, batch)`` returning ``(clipped sum, norms or None)``; and the rows that
    cannot run here, name -> why."""
    unavailable = {}

    def plain_grad(p, b):
        return jax.grad(lambda q: sum_cross_entropy(apply_fn(q, b[0]), b[1]))(p), None

    def vmap_clip(p, b):
        grads = per_example_grads(apply_fn, p, b)
        leaves, tree = jax.tree.flatten(grads)
        clipped, _ = optax.per_example_global_norm_clip(leaves, clip_norm)
        return jax.tree.unflatten(tree, clipped), example_norms(grads)

    functions = {"grad": plain_grad, "vmap(grad) + clip": vmap_clip}
    if hasattr(curvjax, "clipped_grad"):

        def curvjax_clip(p, b):
            out = curvjax.clipped_grad(apply_fn, p, b, clip_norm=clip_norm, loss="cross_entropy")
            return out.grad, out.norms

        functions["curvjax.clipped_grad"] = curvjax_clip
    else:
        unavailable["curvjax.clipped_grad"] = "this curvjax has no clipped_grad"
    try:
        from jax_privacy import clipping

        def loss(p, x, y):
            return sum_cross_entropy(apply_fn(p, x), y)

        clipped = clipping.clipped_grad(
            loss, l2_clip_norm=clip_norm, batch_argnums=(1, 2), return_grad_norms=True
        )

        def privacy_clip(p, b):
            grad, aux = clipped(p, b[0], b[1])
            return grad, aux.grad_norms

        functions["jax_privacy.clipped_grad"] = privacy_clip
    except Exception as error:  # not installed, or does not import with this jax
        unavailable["jax_privacy.clipped_grad"] = f"{type(error).__name__}: {error}"
    return functions, unavailable


def run_jax(problem: dict, args, checks: dict) -> dict:
    apply_fn, params, batch = problem["apply_fn"], problem["params"], problem["batch"]

    def norms_and_sum(p, b):
        grads = per_example_grads(apply_fn, p, b)
        return example_norms(grads), jax.tree.map(lambda g: g.sum(0), grads)

    norms, summed = jax.jit(norms_and_sum)(params, batch)
    norms = np.asarray(norms)
    clip_norm = float(np.median(norms))
    functions, unavailable = jax_functions(apply_fn, clip_norm)
    compiled, outputs = {}, {}
    for name in ("grad", *JAX_ROWS):
        if name not in functions:
            continue
        try:
            compiled[name] = harness.compile_and_first_call(functions[name], params, batch)
        except Exception as error:
            unavailable[name] = f"{type(error).__name__}: {str(error)[:300]}"
            traceback.print_exc()
            continue
        outputs[name] = compiled[name].output
        print(f"{problem['name']}: compiled {name} in {compiled[name].compile_seconds:.1f} s")
    reference, reference_norms = outputs["vmap(grad) + clip"]
    label = problem["name"]
    checks[f"{label}: sum of vmap(grad) = grad"] = harness.relative_error(
        summed, outputs["grad"][0]
    )
    for name in ("curvjax.clipped_grad", "jax_privacy.clipped_grad"):
        if name in outputs:
            checks[f"{label}: {name}"] = harness.relative_error(outputs[name][0], reference)
            checks[f"{label}: {name} norms"] = harness.relative_error(
                outputs[name][1], reference_norms
            )
    calls = {
        name: (lambda c=c: jax.block_until_ready(c.fn(params, batch)))
        for name, c in compiled.items()
    }
    timing = harness.time_round_robin(calls, args.repeats, args.warmup)
    grad = compiled["grad"]
    rows = {}
    for name, c in compiled.items():
        rows[name] = {
            "seconds": timing.medians[name],
            "ratio": timing.medians[name] / timing.medians["grad"],
            "fastest_ratio": min(timing.samples[name]) / min(timing.samples["grad"]),
            "compile_seconds": c.compile_seconds,
            "first_call_seconds": c.first_call_seconds,
            "temp_ratio": report._ratio(c.costs.get("temp_bytes"), grad.costs.get("temp_bytes")),
            "flops_ratio": report._ratio(c.costs.get("flops"), grad.costs.get("flops")),
            **c.costs,
        }
    result = {
        "clip_norm": clip_norm,
        "clipped_fraction": float(np.mean(norms > clip_norm)),
        "norm_quantiles": [float(q) for q in np.quantile(norms, [0, 0.25, 0.5, 0.75, 1])],
        "jax": rows,
        "unavailable": unavailable,
        "samples": timing.samples,
    }
    reference_np = jax.tree.map(np.asarray, reference)
    curvjax_np = (
        jax.tree.map(np.asarray, outputs["curvjax.clipped_grad"][0])
        if "curvjax.clipped_grad" in outputs
        else None
    )
    return result, outputs["grad"][0], reference_np, curvjax_np


# --------------------------------------------------------------------------------------------
# torch and Opacus
# --------------------------------------------------------------------------------------------


def lm_twin(config, params, tie: bool):
    """The LM in torch in a form Opacus hooks: positions an ``nn.Embedding`` of the position ids,
    the output projection an ``nn.Linear`` whose weight is the token embedding's (``tie``) or a
    copy of it; logits ``[N, T, V]``. The blocks are ``transformer.torch_twin``'s."""
    import torch
    from torch import nn

    base = transformer.torch_twin(config, params)

    class OpacusLM(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = base.embed
            self.positions = nn.Embedding(config.seq_len, config.width)
            with torch.no_grad():
                self.positions.weight.copy_(base.positions)
            self.blocks = base.blocks
            self.norm_final = base.norm_final
            self.head = nn.Linear(config.width, config.vocab_size, bias=False)
            if tie:
                self.head.weight = self.embed.weight
            else:
                with torch.no_grad():
                    self.head.weight.copy_(self.embed.weight)

        def forward(self, tokens):
            n, length = tokens.shape
            ids = torch.arange(length, device=tokens.device).repeat(
                n, 1
            )  # contiguous: Opacus views it
            x = self.embed(tokens) + self.positions(ids)
            for block in self.blocks:
                x = block(x)
            return self.head(self.norm_final(x))

    return OpacusLM()


def lm_torch_layout(twin, tree) -> list[tuple]:
    """``(torch parameter, the params-shaped tree's leaf in torch's layout)`` pairs of the tied
    LM twin (every parameter once)."""
    pairs = [
        (twin.embed.weight, np.asarray(tree["embed"]["embedding"])),
        (twin.positions.weight, np.asarray(tree["positions"])),
        (twin.norm_final.weight, np.asarray(tree["norm_final"]["scale"])),
        (twin.norm_final.bias, np.asarray(tree["norm_final"]["bias"])),
    ]
    for i, block in enumerate(twin.blocks):
        p = tree[f"block_{i}"]
        for name in ("qkv", "attention_out", "mlp_in", "mlp_out"):
            layer = getattr(block, name)
            pairs.append((layer.weight, np.asarray(p[name]["kernel"]).T))
            pairs.append((layer.bias, np.asarray(p[name]["bias"])))
        for name in ("norm_attention", "norm_mlp"):
            layer = getattr(block, name)
            pairs.append((layer.weight, np.asarray(p[name]["scale"])))
            pairs.append((layer.bias, np.asarray(p[name]["bias"])))
    return pairs


def torch_grads_error(problem: dict, twin, tree) -> float:
    """``relative_error`` of the twin's ``.grad`` against a params-shaped JAX tree."""
    if problem["kind"] == "3c3d":
        p = problem["problem"]
        expected = models.to_torch_layout(p.model, tree["params"], p.input_shape)
        actual = [q.grad.detach().cpu().numpy() for q in twin.parameters()]
        return harness.relative_error(actual, expected)
    pairs = lm_torch_layout(twin, tree)
    if len(pairs) != len(list(twin.parameters())):
        raise AssertionError("the LM twin's parameters are not all compared")
    return harness.relative_error(
        [q.grad.detach().cpu().numpy() for q, _ in pairs], [b for _, b in pairs]
    )


def run_torch(problem: dict, clip_norm: float, jax_grad, curvjax_sum, args, checks: dict):
    """Opacus' clipping and the twin's plain backward pass, round-robin; checks."""
    import torch
    from opacus.grad_sample import GradSampleModuleFastGradientClipping
    from opacus.optimizers import DPOptimizerFastGradientClipping
    from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping

    # Opacus' module hooks fire on the first layer although the inputs need no gradient.
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    torch.set_num_threads(args.threads or harness.usable_cores())
    device = harness.torch_device()
    label = problem["name"]
    inputs, targets = (np.asarray(a) for a in problem["batch"])
    if problem["kind"] == "3c3d":
        p = problem["problem"]

        def make(tie=True):
            return models.torch_sequential_from_flax(p.model, p.variables, p.input_shape)

        inputs = np.array(inputs.transpose(0, 3, 1, 2), np.float32, order="C")
        x = torch.from_numpy(inputs).to(device)
    else:

        def make(tie=True):
            return lm_twin(problem["config"], problem["params"], tie)

        x = torch.from_numpy(np.asarray(inputs, np.int64)).to(device)
    y = torch.from_numpy(np.asarray(targets, np.int64)).to(device)
    vocab = problem["config"].vocab_size if problem["kind"] == "lm" else None

    def flat(logits):  # [N, T, V] -> [N T, V] for the LM
        return logits if vocab is None else logits.reshape(-1, vocab)

    plain = make().to(device).train()
    criterion = torch.nn.CrossEntropyLoss(reduction="sum")

    def backward():
        plain.zero_grad(set_to_none=True)
        criterion(flat(plain(x)), y.reshape(-1) if vocab else y).backward()
        harness.torch_sync()

    backward()
    jax_loss = float(
        sum_cross_entropy(
            problem["apply_fn"](problem["params"], problem["batch"][0]), problem["batch"][1]
        )
    )
    with torch.no_grad():
        torch_loss = float(criterion(flat(plain(x)), y.reshape(-1) if vocab else y))
    checks[f"{label}: torch twin loss"] = abs(torch_loss - jax_loss) / abs(jax_loss)
    checks[f"{label}: torch twin grad"] = torch_grads_error(problem, plain, jax_grad)

    def opacus_step(ghost: bool, tie: bool):
        twin = make(tie).to(device).train()
        module = GradSampleModuleFastGradientClipping(
            twin,
            batch_first=True,
            loss_reduction="sum",
            max_grad_norm=clip_norm,
            use_ghost_clipping=ghost,
        )
        optimizer = DPOptimizerFastGradientClipping(
            torch.optim.SGD(module.parameters(), lr=0.0),
            noise_multiplier=0.0,
            max_grad_norm=clip_norm,
            expected_batch_size=len(y),
            loss_reduction="sum",
        )
        dp_loss = DPLossFastGradientClipping(
            module, optimizer, torch.nn.CrossEntropyLoss(reduction="sum"), loss_reduction="sum"
        )

        def step():
            logits = module(x)
            if vocab is None:
                loss = dp_loss(logits, y)
            else:
                loss = dp_loss(flat(logits), y.reshape(-1), shape=logits.shape)
            loss.backward()  # two backward passes; the clipped sum ends in p.grad
            harness.torch_sync()

        return twin, step

    calls = {"backward": backward}
    names = {"backward": "torch forward + backward (summed loss)"}
    unavailable = {}
    variants = [("opacus ghost clipping", True, True)]
    if problem["kind"] == "lm":
        variants += [
            ("opacus ghost clipping (untied head)", True, False),
            ("opacus fast gradient clipping", False, True),
        ]
    checked = {}
    for name, ghost, tie in variants:
        try:
            twin, step = opacus_step(ghost, tie)
            step()
        except Exception as error:  # e.g. ghost clipping refuses tied weights
            unavailable[name] = f"{type(error).__name__}: {str(error)[:300]}"
            print(f"{label}: {name} does not run: {unavailable[name]}")
            continue
        calls[name] = step
        names[name] = (
            "GradSampleModuleFastGradientClipping("
            f"use_ghost_clipping={ghost}) + DPLossFastGradientClipping, loss.backward()"
        )
        if tie:
            checked[name] = twin
    # The clipped sums, from the calls above, against curvjax's (vmap(grad)'s if none).
    for name, twin in checked.items():
        checks[f"{label}: {name}"] = torch_grads_error(problem, twin, curvjax_sum)
    timing = harness.time_round_robin(calls, args.repeats, args.warmup)
    rows = {}
    for name in calls:
        rows[name] = {
            "call": names[name],
            "seconds": timing.medians[name],
            "ratio": timing.medians[name] / timing.medians["backward"],
            "fastest_ratio": min(timing.samples[name]) / min(timing.samples["backward"]),
            "first_call_seconds": timing.first[name],
            "checked": name in checked,
        }
    return {"torch": rows, "unavailable": unavailable, "samples": timing.samples, "device": device}


def _opacus_importable() -> bool:
    try:
        import opacus  # noqa: F401
        import torch  # noqa: F401
    except ImportError:
        print("torch or opacus not importable: the Opacus rows are left out")
        return False
    return True


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------


def run(args) -> dict:
    env = harness.environment(("opacus", "jax-privacy", "dp-accounting"))
    checks: dict[str, float] = {}
    tolerances: dict[str, float] = {}
    results = []
    for problem in make_problems(args.smoke, args.models):
        result, jax_grad, reference, curvjax_sum = run_jax(problem, args, checks)
        result.update(
            model=problem["name"],
            kind=problem["kind"],
            num_params=models.count_params(problem["params"]),
            **problem["sizes"],
        )
        if not args.no_torch and _opacus_importable():
            peer = run_torch(
                problem,
                result["clip_norm"],
                jax.tree.map(np.asarray, jax_grad),
                reference if curvjax_sum is None else curvjax_sum,
                args,
                checks,
            )
            result["torch"] = peer["torch"]
            result["torch_device"] = peer["device"]
            result["unavailable"].update(peer["unavailable"])
            result["samples"] = {"jax": result["samples"], "torch": peer["samples"]}
        results.append(result)
    for name in checks:
        opacus = "opacus" in name
        tolerances[name] = OPACUS_TOLERANCE if opacus else harness.RELATIVE_TOLERANCE
    failed = [name for name, error in checks.items() if not error <= tolerances[name]]
    return {
        "experiment": "private",
        "title": "Per-example clipping (DP-SGD): curvjax against vmap(grad), jax-privacy, Opacus",
        "command": " ".join(sys.argv),
        "environment": harness.finish_environment(env),
        "settings": {
            "repeats": args.repeats,
            "warmup": args.warmup,
            "smoke": args.smoke,
            "threads": args.threads or harness.usable_cores(),
            "loss": "cross-entropy summed over examples (and positions)",
            "clip_norm": "median per-example gradient norm of the batch",
            "opacus": "loss_reduction='sum', noise_multiplier=0; timed: forward + loss.backward()",
            "jax_privacy": "clipping.clipped_grad defaults (nan_safe=True, no microbatching)",
            "targets": TARGETS,
        },
        "results": results,
        "checks": checks,
        "tolerances": tolerances,
        "failed_checks": failed,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny models, few repeats (CI)")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls (default 10)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls (default 2)")
    parser.add_argument("--no-torch", action="store_true", help="skip the Opacus comparison")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: cores)")
    parser.add_argument("--models", default=",".join(MODEL_NAMES), help="3c3d, lm or both")
    parser.add_argument("--json", type=pathlib.Path, default=None, help="write the JSON here")
    args = parser.parse_args(argv)
    args.models = [m.strip() for m in args.models.split(",")]
    unknown = [m for m in args.models if m not in MODEL_NAMES]
    if unknown:
        parser.error(f"unknown models {unknown}; choose from {list(MODEL_NAMES)}")
    if args.repeats is None:
        args.repeats = 2 if args.smoke else 10
    if args.smoke:
        args.warmup = 1
    harness.fast_compile_for_smoke(args.smoke)
    begin = time.perf_counter()
    document = run(args)
    return harness.finish(document, report.private_table(document), args, begin)


if __name__ == "__main__":
    sys.exit(main())
