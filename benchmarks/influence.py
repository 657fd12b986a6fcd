"""Influence functions with EK-FAC: curvjax against kronfluence on a torch twin.

On DeepOBS 3c3d (CIFAR-10 shapes, random data, mean cross-entropy) and a GPT-style language model
(``transformer.py``'s construction at a smaller size, token-mean cross-entropy), in one run:

1. **EK-FAC factors** as a ratio to the model's own gradient of the same loss on the same batch:
   ``curvjax.ekfac`` (Monte-Carlo factors, their eigenbases and the corrected eigenvalues, one
   jitted call) over the jitted ``jax.grad``; kronfluence's EK-FAC fitting
   (``fit_covariance_matrices_with_loader``, ``perform_eigendecomposition``,
   ``fit_lambda_matrices_with_loader``: the covariance pass, the eigendecomposition and the
   eigenvalue-correction pass that its ``Analyzer.fit_all_factors`` runs, without writing them
   to disk) over the twin's own forward and backward pass.
2. **Training examples scored per second** for ``Q = 16`` queries over ``K`` training batches,
   from the factors of (1): ``curvjax.influence.scores`` against kronfluence's
   ``compute_pairwise_scores_with_loaders`` (what ``Analyzer.compute_pairwise_scores`` runs,
   without the disk), same queries, same training data, the same damping (below).
3. **Agreement**: the Spearman rank correlation between the two libraries' scores, per query over
   the training examples (mean and minimum over queries) and over all pairs, and the relative
   error after the one scale the conventions predict, on the same factor definition (below).

XLA flop counts and temporary memory are recorded for curvjax's calls.

**Aligning the two definitions** (measured, not assumed: the script records them).

- *Layers.* kronfluence tracks ``nn.Linear`` and ``nn.Conv2d`` modules and puts a bias into its
  layer's Kronecker block (a homogeneous coordinate); curvjax gives a bias its own block and the
  LM's tied embedding a diagonal one. The twin's layers are therefore built bias-free, each
  followed by a separate bias addition (the same function and weights; kronfluence then tracks
  exactly the kernels), and the agreement is computed on the kernels' scores only
  (``per_layer=True`` in curvjax, summed over the Kronecker-factored kernels). The timed calls
  score every layer each library covers (curvjax: every leaf; kronfluence: the kernels).
- *Labels.* Both sample ``ŷ ~ p(y | f)`` for the Fisher in the timed runs, each with its own
  random numbers. For the agreement both use the most probable label at every output
  (curvjax through a :class:`curvjax.losses.Loss` whose sampler returns it, kronfluence through
  the task's ``compute_train_loss(sample=True)``), so both compute the same matrix.
- *Sums and means.* kronfluence's task returns the loss summed over the batch (and positions), it
  divides its covariances by their counts and its eigenvalue corrections by the number of
  examples: ``Λ = (1/N) Σ_n ((Q_A ⊗ Q_B)ᵀ g_n)²`` with ``g_n`` the gradient of example ``n``'s
  summed loss. curvjax's ``s`` carries the reduction's ``κ``: equal to ``Λ`` for 3c3d's mean
  (``κ = 1/N``), ``Λ / T`` for the LM's token mean (``κ = 1/(N T)``). So kronfluence gets the
  damping ``β λ`` (``β = 1``, resp. ``T``) when curvjax gets ``λ``, and ``β Σ s = Σ Λ`` is
  checked on every kernel. ``λ`` is 0.1 times the mean of curvjax's corrected eigenvalues over
  the kernels (kronfluence's own heuristic, ``damping_factor=None``, is 0.1 times the mean per
  module; it is recorded, not used).
- *Scores.* Both score with the gradients of the per-example summed losses (``∇ℓ_qᵀ (C + λ I)⁻¹
  ∇ℓ_m``; kronfluence's measurement is the query's summed loss), so curvjax's scores are ``β``
  times kronfluence's; the relative error after that scale and the least-squares scale are
  recorded.

Checks (exit status 1 if one fails): the twins' losses against JAX's; ``β Σ s`` against
kronfluence's ``Σ Λ`` per kernel (same labels, float32 sums: 1e-3); the aligned scores' Spearman
correlation at least 0.99 (float32 factors computed in two frameworks, eigendecompositions in
float64 by kronfluence); curvjax's kernel scores against a reference from ``vmap(grad)``
gradients and the EK-FAC blocks' ``damped_solve`` (1e-3); the compiled stream against one
``influence.scores`` call (1e-3).

Scoring is timed two ways for curvjax: ``influence.precondition`` and ``influence.batch_scores``
compiled once, the training batches streamed through the second (the steady state, used for the
target), and one whole ``influence.scores`` call (it compiles its batch step on every call).

**LAPACK threads.** JAX runs ``jnp.linalg.eigh`` and the other CPU LAPACK calls in SciPy's
OpenBLAS, whose threads compete with XLA's for the same cores. The script pins them to one
(``--lapack-threads``, through ``threadpoolctl``; NumPy's and torch's libraries are left alone), as
curvjax's documentation recommends on CPU, and times ``curvjax.ekfac`` again with OpenBLAS at its
own thread count, round-robin with the others (the row "LAPACK threads unpinned").

Targets (of the benchmark, not tests): EK-FAC factors at most 3 gradients on 3c3d; curvjax's
scoring throughput at least kronfluence's, in the same run.

Usage::

    python benchmarks/influence.py             # benchmarks/results/influence-<machine>.json
    python benchmarks/influence.py --smoke     # tiny models, every code path (CI)
    python benchmarks/influence.py --no-torch --models 3c3d
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
# The checkout this script lies in comes first (ekfac and influence are recent); an installed
# curvjax is used when the script is copied elsewhere.
sys.path.insert(1, str(HERE.parent))
import harness  # noqa: E402  (sits beside this script)
import models  # noqa: E402
import overhead  # noqa: E402
import report  # noqa: E402
import transformer  # noqa: E402

import curvjax  # noqa: E402

MODEL_NAMES = ("3c3d", "lm")
#: Queries scored against every training example.
NUM_QUERIES = 16
#: The timing of ``curvjax.ekfac`` with SciPy's OpenBLAS (JAX's CPU LAPACK) at its own threads.
UNPINNED = "curvjax.ekfac, LAPACK threads unpinned"

#: Targets: EK-FAC factors over the gradient on 3c3d; throughput over kronfluence's.
TARGETS = {"ekfac_3c3d": 3.0, "throughput_over_kronfluence": 1.0}
#: Damping: this fraction of the mean corrected eigenvalue over the kernels (curvjax's ``s``).
DAMPING_FRACTION = 0.1
#: Smallest Spearman correlation of the aligned scores (mean over queries).
SPEARMAN_MIN = 0.99
#: ``β Σ s`` against ``Σ Λ``, and curvjax's scores against the ``vmap(grad)`` reference:
#: float32 sums over examples and positions in different orders.
TOLERANCE = 1e-3

SIZES = {
    "3c3d": {"batch_size": 64, "train_batches": 2},
    "lm": {
        "num_layers": 2,
        "width": 64,
        "num_heads": 4,
        "seq_len": 64,
        "vocab": 256,
        "batch_size": 16,
        "train_batches": 2,
    },
}
SMOKE_SIZES = {
    "3c3d": {"batch_size": 8, "train_batches": 2},
    "lm": {
        "num_layers": 1,
        "width": 16,
        "num_heads": 2,
        "seq_len": 8,
        "vocab": 32,
        "batch_size": 4,
        "train_batches": 2,
    },
}


# --------------------------------------------------------------------------------------------
# Problems
# --------------------------------------------------------------------------------------------


def make_problems(smoke: bool, selected, num_queries: int) -> list[dict]:
    """Per model: weights, ``num_queries`` query examples, ``K`` training batches of ``N``."""
    found = []
    table = SMOKE_SIZES if smoke else SIZES
    if "3c3d" in selected:
        sizes = table["3c3d"]
        n, k = sizes["batch_size"], sizes["train_batches"]
        (p,) = overhead.make_problems(num_queries + n * k, smoke, ("3c3d",))
        found.append(
            {
                "name": p.name,
                "kind": "3c3d",
                "apply_fn": p.apply_fn,
                "params": p.variables,
                "inputs": p.inputs,
                "targets": p.targets,
                "reduction": "mean",
                "beta": 1.0,
                "problem": p,
                "sizes": {**sizes, "queries": num_queries},
            }
        )
    if "lm" in selected:
        sizes = table["lm"]
        n, k = sizes["batch_size"], sizes["train_batches"]
        config, apply_fn, params, (tokens, targets) = transformer.problem(
            {**sizes, "n": num_queries + n * k}
        )
        found.append(
            {
                "name": "GPT-style LM" + (" (smoke)" if smoke else ""),
                "kind": "lm",
                "apply_fn": apply_fn,
                "params": params,
                "inputs": tokens,
                "targets": targets,
                "reduction": "token_mean",
                "beta": float(sizes["seq_len"]),
                "config": config,
                "sizes": {**sizes, "queries": num_queries},
            }
        )
    for problem in found:
        q, n = num_queries, problem["sizes"]["batch_size"]
        x, y = problem["inputs"], problem["targets"]
        problem["queries"] = (x[:q], y[:q])
        problem["train"] = [
            (x[q + i * n : q + (i + 1) * n], y[q + i * n : q + (i + 1) * n])
            for i in range(problem["sizes"]["train_batches"])
        ]
        problem["num_params"] = models.count_params(problem["params"])
    return found


def reduced_loss(apply_fn, params, batch, reduction: str):
    """The mean (3c3d) or token-mean (LM) cross-entropy: the loss whose gradient is timed."""
    losses = optax.softmax_cross_entropy_with_integer_labels(apply_fn(params, batch[0]), batch[1])
    return losses.mean()  # over examples, or over examples and positions: the same for T = 1


def argmax_loss() -> curvjax.losses.Loss:
    """Cross-entropy whose "sampled" label is the most probable one (both libraries use it)."""
    return transformer.argmax_cross_entropy()


# --------------------------------------------------------------------------------------------
# curvjax
# --------------------------------------------------------------------------------------------


#: The public block types (a leaf of a blocks pytree is one of them).
BLOCK_TYPES = (
    curvjax.EigenKroneckerBlock,
    curvjax.KroneckerBlock,
    curvjax.DenseBlock,
    curvjax.DiagonalBlock,
)


def is_block(x) -> bool:
    return isinstance(x, BLOCK_TYPES)


def kernel_paths(blocks) -> list[str]:
    """``keystr`` paths of the leaves with an ``EigenKroneckerBlock``."""
    leaves = jax.tree_util.tree_leaves_with_path(blocks, is_leaf=is_block)
    return [
        jax.tree_util.keystr(path)
        for path, leaf in leaves
        if isinstance(leaf, curvjax.EigenKroneckerBlock)
    ]


def mean_kernel_scaling(blocks) -> float:
    """Mean of ``s`` over the entries of every kernel's ``EigenKroneckerBlock``."""
    leaves = jax.tree_util.tree_leaves(blocks, is_leaf=is_block)
    values = [np.asarray(b.scaling) for b in leaves if isinstance(b, curvjax.EigenKroneckerBlock)]
    return float(np.concatenate([v.ravel() for v in values]).mean())


def has_influence() -> bool:
    return hasattr(curvjax, "influence") and hasattr(curvjax.influence, "scores")


def curvjax_scores(problem, blocks, damping, *, loss="cross_entropy", per_layer=False):
    """``curvjax.influence.scores`` of the queries against every training batch."""
    return curvjax.influence.scores(
        problem["apply_fn"],
        problem["params"],
        problem["queries"],
        problem["train"],
        curvature=blocks,
        damping=damping,
        loss=loss,
        reduction=problem["reduction"],
        per_layer=per_layer,
    )


def kernel_scores(per_layer: dict, kernels: list[str]) -> np.ndarray:
    """The per-layer scores summed over the kernels."""
    missing = [k for k in kernels if k not in per_layer]
    if missing:
        raise KeyError(f"per-layer scores lack {missing}; have {sorted(per_layer)}")
    return np.sum([np.asarray(per_layer[k], np.float64) for k in kernels], axis=0)


def reference_scores(problem, blocks, damping, kernels: list[str]) -> np.ndarray:
    """``g_qᵀ (C + λ I)⁻¹ g_m`` over the kernels, from ``vmap(grad)`` gradients of the summed
    per-example losses and each kernel block's ``damped_solve``: ``[Q, M]``."""
    apply_fn, params = problem["apply_fn"], problem["params"]

    def example_grad(x, y):
        def loss(p):
            logits = apply_fn(p, x[None])
            return optax.softmax_cross_entropy_with_integer_labels(logits, y[None]).sum()

        return jax.grad(loss)(params)

    def kernel_vector(tree, fn):
        flat = dict(
            (jax.tree_util.keystr(path), leaf)
            for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
        )
        return [fn(k, flat[k]) for k in kernels]

    block_of = {
        jax.tree_util.keystr(path): leaf
        for path, leaf in jax.tree_util.tree_leaves_with_path(blocks, is_leaf=is_block)
    }

    @jax.jit
    def preconditioned(x, y):
        g = jax.vmap(example_grad)(x, y)
        return kernel_vector(
            g, lambda k, v: jax.vmap(lambda u: block_of[k].damped_solve(u, damping))(v)
        )

    @jax.jit
    def dots(pre, x, y):
        g = kernel_vector(jax.vmap(example_grad)(x, y), lambda k, v: v)
        return sum(
            jnp.einsum("qd,md->qm", p.reshape(p.shape[0], -1), v.reshape(v.shape[0], -1))
            for p, v in zip(pre, g, strict=True)
        )

    pre = preconditioned(*problem["queries"])
    return np.concatenate([np.asarray(dots(pre, x, y), np.float64) for x, y in problem["train"]], 1)


def run_jax(problem: dict, args, checks: dict) -> dict:
    """Time the gradient, ``curvjax.ekfac`` and ``curvjax.influence.scores``."""
    apply_fn, params, batch = problem["apply_fn"], problem["params"], problem["train"][0]
    reduction = problem["reduction"]
    key = jax.random.key(1)
    label = problem["name"]

    def grad(p, b):
        return jax.grad(lambda q: reduced_loss(apply_fn, q, b, reduction))(p)

    def ekfac(p, b):
        return curvjax.ekfac(apply_fn, p, b, key=key, reduction=reduction)

    compiled = {
        "grad": harness.compile_and_first_call(grad, params, batch),
        "curvjax.ekfac": harness.compile_and_first_call(ekfac, params, batch),
    }
    for name, c in compiled.items():
        print(f"{label}: compiled {name} in {c.compile_seconds:.1f} s", flush=True)
    blocks = compiled["curvjax.ekfac"].output
    kernels = kernel_paths(blocks)
    damping = DAMPING_FRACTION * mean_kernel_scaling(blocks)
    calls = {
        name: (lambda c=c: jax.block_until_ready(c.fn(params, batch)))
        for name, c in compiled.items()
    }
    if getattr(args, "unpinned", None) is not None:  # the same call with LAPACK's own threads

        def unpinned(c=compiled["curvjax.ekfac"]):
            with args.unpinned():
                return jax.block_until_ready(c.fn(params, batch))

        calls[UNPINNED] = unpinned
    timing = harness.time_round_robin(calls, args.repeats, args.warmup)
    rows = {}
    grad_costs = compiled["grad"].costs
    for name, c in compiled.items():
        rows[name] = {
            "seconds": timing.medians[name],
            "ratio": timing.medians[name] / timing.medians["grad"],
            "fastest_ratio": min(timing.samples[name]) / min(timing.samples["grad"]),
            "compile_seconds": c.compile_seconds,
            "first_call_seconds": c.first_call_seconds,
            "temp_ratio": report._ratio(c.costs.get("temp_bytes"), grad_costs.get("temp_bytes")),
            "flops_ratio": report._ratio(c.costs.get("flops"), grad_costs.get("flops")),
            **c.costs,
        }
    if UNPINNED in calls:
        rows[UNPINNED] = {
            "seconds": timing.medians[UNPINNED],
            "ratio": timing.medians[UNPINNED] / timing.medians["grad"],
            "fastest_ratio": min(timing.samples[UNPINNED]) / min(timing.samples["grad"]),
        }
    result = {
        "jax": rows,
        "kernels": kernels,
        "damping": damping,
        "samples": {"factors": timing.samples},
        "unavailable": {},
    }
    num_train = sum(int(b[1].shape[0]) for b in problem["train"])
    if not has_influence():
        result["unavailable"]["curvjax.influence.scores"] = "this curvjax has no influence.scores"
        return result, blocks, None

    # Steady state: influence.precondition and influence.batch_scores, each compiled once, the
    # training batches streamed through the second (what one scores call does per batch).
    pre = harness.compile_and_first_call(
        lambda p, q, c, d: curvjax.influence.precondition(apply_fn, p, q, damping=d, curvature=c),
        params,
        problem["queries"],
        blocks,
        damping,
    )
    step = harness.compile_and_first_call(
        lambda p, pq, b: curvjax.influence.batch_scores(apply_fn, p, pq, b),
        params,
        pre.output,
        batch,
    )

    def streamed():
        pq = pre.fn(params, problem["queries"], blocks, damping)
        parts = [step.fn(params, pq, b) for b in problem["train"]]
        return jax.block_until_ready(jnp.concatenate(parts, axis=-1))

    def one_call(per_layer=False):  # what a user calls; it compiles its batch step every time
        return jax.block_until_ready(curvjax_scores(problem, blocks, damping, per_layer=per_layer))

    if args.smoke:  # one compilation less: the per-layer scores sum to the scores
        per_layer, first_seconds = harness.timed_call(lambda: one_call(True))
        first, call_seconds = sum(per_layer.values()), first_seconds
    else:
        first, first_seconds = harness.timed_call(one_call)
        # Every call compiles again, so one more call is what each later call costs.
        call_seconds = harness.timed_call(one_call)[1]
        per_layer = one_call(True)
    score_timing = harness.time_round_robin({"streamed": streamed}, args.score_repeats, 1)
    checks[f"{label}: compiled stream = influence.scores"] = relative(streamed(), first)
    seconds = score_timing.medians["streamed"]
    result["scores"] = {
        "seconds": seconds,
        "examples_per_second": num_train / seconds,
        "fastest_examples_per_second": num_train / min(score_timing.samples["streamed"]),
        "compile_seconds": pre.compile_seconds + step.compile_seconds,
        "call_seconds": call_seconds,
        "call_examples_per_second": num_train / call_seconds,
        "first_call_seconds": first_seconds,
        "num_train": num_train,
        "num_queries": int(problem["queries"][1].shape[0]),
        "precondition_flops": pre.costs.get("flops"),
        "precondition_temp_bytes": pre.costs.get("temp_bytes"),
        "batch_flops": step.costs.get("flops"),
        "batch_temp_bytes": step.costs.get("temp_bytes"),
        "batch_flops_over_grad": report._ratio(step.costs.get("flops"), grad_costs.get("flops")),
    }
    result["samples"]["scores"] = score_timing.samples
    ours = kernel_scores(per_layer, kernels)
    reference = reference_scores(problem, blocks, damping, kernels)
    checks[f"{label}: curvjax.influence.scores (kernels) against vmap(grad)"] = relative(
        ours, reference
    )
    result["kernel_scores_mc"] = ours
    return result, blocks, damping


# --------------------------------------------------------------------------------------------
# Agreement helpers
# --------------------------------------------------------------------------------------------


def ranks(x: np.ndarray) -> np.ndarray:
    """Ranks along the last axis (ties broken by order; scores are continuous)."""
    return np.argsort(np.argsort(x, axis=-1), axis=-1).astype(np.float64)


def spearman(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman's rank correlation of ``a`` and ``b`` along the last axis."""
    ra, rb = ranks(a), ranks(b)
    ra -= ra.mean(-1, keepdims=True)
    rb -= rb.mean(-1, keepdims=True)
    return (ra * rb).sum(-1) / np.sqrt((ra**2).sum(-1) * (rb**2).sum(-1))


def fitted_scale(target: np.ndarray, value: np.ndarray) -> float:
    """The ``c`` minimising ``‖c value - target‖``."""
    return float(np.vdot(value, target) / np.vdot(value, value))


def relative(value, reference) -> float:
    """``max |value - reference| / max |reference|``."""
    return harness.relative_error(value, reference)


def agreement(ours: np.ndarray, theirs: np.ndarray, predicted_scale: float | None) -> dict:
    """Spearman per query (mean, min), over all pairs, and the relative error after a scale."""
    per_query = spearman(ours, theirs)
    scale = fitted_scale(ours, theirs)
    out = {
        "spearman_mean": float(per_query.mean()),
        "spearman_min": float(per_query.min()),
        "spearman_all_pairs": float(spearman(ours.ravel(), theirs.ravel())),
        "fitted_scale": scale,
        "relative_error_after_fitted_scale": relative(theirs * scale, ours),
    }
    if predicted_scale is not None:
        out["predicted_scale"] = predicted_scale
        out["relative_error_after_predicted_scale"] = relative(theirs * predicted_scale, ours)
    return out


# --------------------------------------------------------------------------------------------
# torch twin and kronfluence
# --------------------------------------------------------------------------------------------


def split_biases(module):
    """Replace every ``nn.Linear`` / ``nn.Conv2d`` with a bias by the same layer without its bias
    followed by a bias addition (same function and weights): kronfluence then tracks the kernels
    alone, as curvjax's Kronecker blocks do."""
    import torch
    from torch import nn

    class AddBias(nn.Module):
        def __init__(self, bias, axis):
            super().__init__()
            self.bias = nn.Parameter(bias.detach().clone())
            self.axis = axis

        def forward(self, x):
            shape = [1] * x.ndim
            shape[self.axis] = -1
            return x + self.bias.view(shape)

    for name, child in list(module.named_children()):
        if isinstance(child, nn.Linear | nn.Conv2d) and child.bias is not None:
            bias = child.bias
            child.bias = None
            axis = 1 if isinstance(child, nn.Conv2d) else -1
            with torch.no_grad():
                setattr(module, name, nn.Sequential(child, AddBias(bias, axis)))
        else:
            split_biases(child)
    return module


def torch_problem(problem: dict):
    """``(make_twin, to_torch)``: a fresh twin (logits ``[N, C]`` or ``[N, V, T]``) and a
    converter of a JAX batch to torch tensors."""
    import torch

    if problem["kind"] == "3c3d":
        p = problem["problem"]

        def make():
            return models.torch_sequential_from_flax(p.model, p.variables, p.input_shape)

        def to_torch(batch):
            x = np.array(np.asarray(batch[0]).transpose(0, 3, 1, 2), np.float32, order="C")
            return torch.from_numpy(x), torch.from_numpy(np.asarray(batch[1], np.int64))

    else:

        def make():
            return transformer.torch_twin(problem["config"], problem["params"])

        def to_torch(batch):
            return (
                torch.from_numpy(np.asarray(batch[0], np.int64)),
                torch.from_numpy(np.asarray(batch[1], np.int64)),
            )

    return make, to_torch


def make_task(labels: str):
    """A kronfluence task: cross-entropy summed over the batch (and positions); for the Fisher
    ``sample=True`` draws ``ŷ ~ softmax(f)`` (``labels="sample"``) or takes ``argmax f``."""
    import torch
    from kronfluence.task import Task

    class CrossEntropyTask(Task):
        def compute_train_loss(self, batch, model, sample=False):
            x, y = batch
            logits = model(x)  # class axis 1: [N, C] or [N, V, T]
            if sample:
                with torch.no_grad():
                    if labels == "argmax":
                        y = logits.argmax(dim=1)
                    else:
                        probs = torch.softmax(logits.movedim(1, -1), dim=-1)
                        flat = probs.reshape(-1, probs.shape[-1])
                        y = torch.multinomial(flat, 1).reshape(y.shape)
            return torch.nn.functional.cross_entropy(logits, y, reduction="sum")

        def compute_measurement(self, batch, model):
            return self.compute_train_loss(batch, model, sample=False)

    return CrossEntropyTask()


class Kronfluence:
    """kronfluence's EK-FAC fitting and pairwise scores on a bias-split twin (no disk)."""

    def __init__(self, problem, labels: str, damping: float):
        import torch
        from kronfluence.analyzer import prepare_model
        from kronfluence.arguments import FactorArguments, ScoreArguments
        from kronfluence.utils.state import State

        make, to_torch = torch_problem(problem)
        self.task = make_task(labels)
        self.model = prepare_model(split_biases(make()), self.task)
        self.state = State(cpu=True)
        self.factor_args = FactorArguments(strategy="ekfac")
        self.score_args = ScoreArguments(damping_factor=damping)
        data = torch.utils.data

        def loader(batches, size):
            x = torch.cat([to_torch(b)[0] for b in batches])
            y = torch.cat([to_torch(b)[1] for b in batches])
            return data.DataLoader(data.TensorDataset(x, y), batch_size=size, shuffle=False)

        n = problem["sizes"]["batch_size"]
        self.factor_loader = loader(problem["train"][:1], n)
        self.train_loader = loader(problem["train"], n)
        self.query_size = int(problem["queries"][1].shape[0])
        self.query_loader = loader([problem["queries"]], self.query_size)
        self.factors = None

    def fit(self):
        """Covariances, their eigendecomposition and the eigenvalue correction."""
        from kronfluence.factor.covariance import fit_covariance_matrices_with_loader
        from kronfluence.factor.eigen import (
            fit_lambda_matrices_with_loader,
            perform_eigendecomposition,
        )

        common = {"model": self.model, "state": self.state, "task": self.task}
        _, covariances = fit_covariance_matrices_with_loader(
            **common, loader=self.factor_loader, factor_args=self.factor_args, disable_tqdm=True
        )
        eigen = perform_eigendecomposition(
            covariance_factors=covariances,
            model=self.model,
            state=self.state,
            factor_args=self.factor_args,
            disable_tqdm=True,
        )
        _, lambdas = fit_lambda_matrices_with_loader(
            **common,
            loader=self.factor_loader,
            factor_args=self.factor_args,
            eigen_factors=eigen,
            disable_tqdm=True,
        )
        self.factors = {**eigen, **lambdas}
        return self.factors

    def scores(self, per_module: bool = False) -> np.ndarray:
        """Pairwise scores ``[Q, M]`` over the tracked modules."""
        from kronfluence.score.pairwise import compute_pairwise_scores_with_loaders

        self.score_args.compute_per_module_scores = per_module
        out = compute_pairwise_scores_with_loaders(
            loaded_factors=self.factors,
            model=self.model,
            state=self.state,
            task=self.task,
            query_loader=self.query_loader,
            per_device_query_batch_size=self.query_size,
            train_loader=self.train_loader,
            score_args=self.score_args,
            factor_args=self.factor_args,
            tracked_module_names=None,
            disable_tqdm=True,
        )
        if per_module:
            return {k: v.double().numpy() for k, v in out.items()}
        return sum(v.double().numpy() for v in out.values())

    def lambda_sums(self) -> dict[str, float]:
        """``Σ Λ`` per tracked module (``Λ`` divided by its example count, as it is used)."""
        lam = self.factors["lambda_matrix"]
        count = self.factors["num_lambda_processed"]
        return {k: float(lam[k].double().sum() / count[k].double()) for k in lam}

    def heuristic_damping(self) -> dict[str, float]:
        """kronfluence's ``damping_factor=None``: 0.1 times the mean of ``Λ`` per module."""
        lam = self.factors["lambda_matrix"]
        count = self.factors["num_lambda_processed"]
        return {k: float(0.1 * lam[k].double().mean() / count[k].double()) for k in lam}


def kronfluence_importable() -> bool:
    try:
        import kronfluence  # noqa: F401
        import torch  # noqa: F401
    except ImportError:
        print("torch or kronfluence not importable: the kronfluence columns are left out")
        return False
    return True


def run_torch(problem: dict, damping: float, args, checks: dict) -> dict:
    """kronfluence's fitting and scores beside the twin's own gradient, round-robin."""
    import torch

    # kronfluence builds a disabled torch.cuda.amp.GradScaler in every call (deprecated alias).
    warnings.filterwarnings("ignore", message=".*GradScaler.*")
    torch.set_num_threads(args.threads or harness.usable_cores())
    make, to_torch = torch_problem(problem)
    label = problem["name"]
    beta = problem["beta"]
    x, y = to_torch(problem["train"][0])
    plain = make().train()

    def backward():
        plain.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(plain(x), y, reduction="sum").backward()

    with torch.no_grad():
        torch_loss = float(torch.nn.functional.cross_entropy(plain(x), y, reduction="mean"))
    apply_fn, params = problem["apply_fn"], problem["params"]
    jax_loss = float(reduced_loss(apply_fn, params, problem["train"][0], problem["reduction"]))
    checks[f"{label}: torch twin loss"] = abs(torch_loss - jax_loss) / abs(jax_loss)
    split = split_biases(make())
    with torch.no_grad():
        split_loss = float(torch.nn.functional.cross_entropy(split(x), y, reduction="mean"))
    checks[f"{label}: bias-split twin loss"] = abs(split_loss - jax_loss) / abs(jax_loss)

    peer = Kronfluence(problem, "sample", beta * damping)
    peer.fit()
    peer.scores()
    calls = {"backward": backward, "kronfluence ekfac": peer.fit}
    timing = harness.time_round_robin(calls, args.repeats, args.warmup)
    first_fit = timing.first["kronfluence ekfac"]
    score_timing = harness.time_round_robin({"scores": peer.scores}, args.score_repeats, 1)
    num_train = sum(int(b[1].shape[0]) for b in problem["train"])
    seconds = timing.medians["kronfluence ekfac"]
    backward_seconds = timing.medians["backward"]
    return {
        "torch": {
            "backward": {
                "seconds": backward_seconds,
                "first_call_seconds": timing.first["backward"],
            },
            "kronfluence ekfac": {
                "seconds": seconds,
                "ratio": seconds / backward_seconds,
                "fastest_ratio": min(timing.samples["kronfluence ekfac"])
                / min(timing.samples["backward"]),
                "first_call_seconds": first_fit,
            },
        },
        "kronfluence_scores": {
            "seconds": score_timing.medians["scores"],
            "examples_per_second": num_train / score_timing.medians["scores"],
            "fastest_examples_per_second": num_train / min(score_timing.samples["scores"]),
            "first_call_seconds": score_timing.first["scores"],
            "num_train": num_train,
        },
        "kronfluence_damping": beta * damping,
        "kronfluence_heuristic_damping": peer.heuristic_damping(),
        "kernel_scores_mc": peer.scores(),
        "samples": {"factors": timing.samples, "scores": score_timing.samples["scores"]},
    }


def aligned_agreement(problem: dict, damping: float, checks: dict) -> dict:
    """Both libraries with the most probable label: ``β Σ s`` against ``Σ Λ`` per kernel, and
    the kernels' scores (curvjax's ``damping`` and kronfluence's ``β · damping``)."""
    label = problem["name"]
    beta = problem["beta"]
    blocks = curvjax.ekfac(
        problem["apply_fn"],
        problem["params"],
        problem["train"][0],
        key=jax.random.key(0),
        loss=argmax_loss(),
        reduction=problem["reduction"],
    )
    kernels = kernel_paths(blocks)
    peer = Kronfluence(problem, "argmax", beta * damping)
    peer.fit()
    flat = {
        jax.tree_util.keystr(p): b
        for p, b in jax.tree_util.tree_leaves_with_path(blocks, is_leaf=is_block)
    }
    ours_sums = sorted(beta * float(np.asarray(flat[k].scaling, np.float64).sum()) for k in kernels)
    theirs_sums = sorted(peer.lambda_sums().values())
    if len(ours_sums) != len(theirs_sums):
        raise AssertionError(
            f"{len(kernels)} curvjax kernels, {len(theirs_sums)} kronfluence modules"
        )
    # Matched by value (the layers' names differ); each sum is a different layer's trace.
    trace_error = max(abs(a - b) / abs(b) for a, b in zip(ours_sums, theirs_sums, strict=True))
    checks[f"{label}: beta * sum(s) = sum(Lambda) per kernel"] = trace_error
    theirs = peer.scores()
    out = {"trace_relative_error": trace_error, "kernels": kernels}
    if has_influence():
        per_layer = curvjax_scores(problem, blocks, damping, loss=argmax_loss(), per_layer=True)
        out.update(agreement(kernel_scores(per_layer, kernels), theirs, beta))
        checks[f"{label}: aligned scores, 1 - Spearman (mean over queries)"] = (
            1 - out["spearman_mean"]
        )
    return out


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------


def run(args) -> dict:
    env = harness.environment(("kronfluence",))
    lapack = harness.pin_lapack_threads(args.lapack_threads)
    env["lapack_threads"] = lapack.info
    args.unpinned = lapack.unpinned if lapack.info.get("pinned") else None
    checks: dict[str, float] = {}
    results = []
    peer_ok = not args.no_torch and kronfluence_importable()
    for problem in make_problems(args.smoke, args.models, args.queries):
        result, blocks, damping = run_jax(problem, args, checks)
        damping = result["damping"]
        result.update(
            model=problem["name"],
            kind=problem["kind"],
            num_params=problem["num_params"],
            reduction=problem["reduction"],
            beta=problem["beta"],
            **problem["sizes"],
        )
        ours_mc = result.pop("kernel_scores_mc", None)
        if peer_ok:
            peer = run_torch(problem, damping, args, checks)
            theirs_mc = peer.pop("kernel_scores_mc")
            result.update(peer)
            if ours_mc is not None:
                # Each library's own Monte-Carlo labels: informative, not checked.
                result["agreement_mc"] = agreement(ours_mc, theirs_mc, problem["beta"])
            result["agreement"] = aligned_agreement(problem, damping, checks)
        results.append(result)
    tolerances = {}
    for name in checks:
        if "Spearman" in name:
            tolerances[name] = 1 - SPEARMAN_MIN
        elif "twin loss" in name:
            tolerances[name] = harness.RELATIVE_TOLERANCE
        else:
            tolerances[name] = TOLERANCE
    failed = [name for name, error in checks.items() if not error <= tolerances[name]]
    return {
        "experiment": "influence",
        "title": "Influence functions with EK-FAC: curvjax against kronfluence",
        "command": " ".join(sys.argv),
        "environment": harness.finish_environment(env),
        "settings": {
            "repeats": args.repeats,
            "score_repeats": args.score_repeats,
            "warmup": args.warmup,
            "smoke": args.smoke,
            "threads": args.threads or harness.usable_cores(),
            "lapack_threads": args.lapack_threads,
            "queries": args.queries,
            "damping": f"{DAMPING_FRACTION} x mean corrected eigenvalue over the kernels (curvjax)",
            "kronfluence": "FactorArguments(strategy='ekfac') defaults; ScoreArguments("
            "damping_factor=beta * damping); core functions, no disk",
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
    parser.add_argument("--repeats", type=int, default=None, help="timed factor calls (default 5)")
    parser.add_argument(
        "--score-repeats", type=int, default=None, help="timed score calls (default 3)"
    )
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls (default 1)")
    parser.add_argument("--queries", type=int, default=NUM_QUERIES, help="query examples")
    parser.add_argument("--no-torch", action="store_true", help="skip the kronfluence comparison")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: cores)")
    parser.add_argument(
        "--lapack-threads",
        type=int,
        default=1,
        help="threads of SciPy's OpenBLAS, JAX's CPU LAPACK (default 1; 0: its own default)",
    )
    parser.add_argument("--models", default=",".join(MODEL_NAMES), help="3c3d, lm or both")
    parser.add_argument("--json", type=pathlib.Path, default=None, help="write the JSON here")
    args = parser.parse_args(argv)
    args.models = [m.strip() for m in args.models.split(",")]
    unknown = [m for m in args.models if m not in MODEL_NAMES]
    if unknown:
        parser.error(f"unknown models {unknown}; choose from {list(MODEL_NAMES)}")
    if args.repeats is None:
        args.repeats = 2 if args.smoke else 5
    if args.score_repeats is None:
        args.score_repeats = 1 if args.smoke else 3
    if args.smoke:
        args.queries = min(args.queries, 4)
    harness.fast_compile_for_smoke(args.smoke)
    begin = time.perf_counter()
    document = run(args)
    return harness.finish(document, report.influence_table(document), args, begin)


if __name__ == "__main__":
    sys.exit(main())
