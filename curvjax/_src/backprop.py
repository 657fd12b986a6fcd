"""One forward and one backward pass through the taps of a model.

:func:`run` evaluates the model once for all examples (each example on its own, under ``vmap``),
reduces the loss, and backpropagates the loss gradient once, yielding at the same time the
parameter gradient and, for every tap, the activation inputs ``a_n`` and the output cotangents
``b_n`` of example ``n``'s contribution ``κ ℓ_n`` (``κ = 1/N`` for the mean, ``1`` for the sum).
Further sets of vectors (columns of the output-Hessian factors) are backpropagated with
:meth:`Pass.backpropagate`, reusing the same forward pass.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from curvjax._src import chunking, mixing, positions
from curvjax._src import taps as taps_lib


class Pass(NamedTuple):
    model: taps_lib.TracedModel
    params: Any
    objective: positions.Objective  # the per-position loss, weights, targets and κ
    outputs: jax.Array  # [N, *P, C]
    loss: jax.Array  # scalar L = κ Σ_n ℓ_n
    grad: list  # ∇L, one array per float leaf
    statics: dict  # tap id -> values of the tap's static inputs
    acts: dict  # tap id -> activation inputs, [N, *shape at batch size one]
    cots: dict  # tap id -> output cotangents of κ ℓ_n, [N, *shape] (None for non-float outputs)
    node_statics: dict  # node id -> static inputs of the Hessian nodes
    probes: dict  # node id -> activation inputs of the Hessian nodes, [N, *shape]
    node_cots: dict  # node id -> output cotangents δ of the Hessian nodes, [N, *shape]
    tap_outputs: dict  # tap id -> outputs of the requested taps, [N, *shape]
    vjp_fn: Callable  # (outputs, probes, tap outputs) cotangents -> (params, ε) cotangents

    def backpropagate(self, columns, probe_columns=None, output_columns=None) -> dict:
        """Tap cotangents for ``M`` vectors per example: tap id -> ``[N, M, *shape]``.

        Args:
          columns: ``[N, M, *P, C]`` cotangents of the model outputs.
          probe_columns: optional, node id -> cotangents ``[N, M, *shape]`` of the node inputs.
          output_columns: optional, tap id -> cotangents ``[N, M, *shape]`` of tap outputs.
        """
        zeros = functools.partial(
            jax.tree.map, lambda a: jnp.zeros((columns.shape[1], *a.shape), a.dtype)
        )
        probes = zeros(self.probes) if probe_columns is None else _columns_first(probe_columns)
        outs = zeros(self.tap_outputs) if output_columns is None else _columns_first(output_columns)
        (_, eps_cots) = jax.vmap(self.vjp_fn)((jnp.moveaxis(columns, 1, 0), probes, outs))
        return {tap.id: _columns_second(eps_cots[("tap", tap.id)]) for tap in self.model.taps}

    def columns_of_gradient(self) -> dict:
        """:attr:`cots` with a column axis of size one: tap id -> ``[N, 1, *shape]``."""
        return jax.tree.map(lambda c: c[:, None], self.cots)

    def reduce_columns(
        self,
        fn,
        columns,
        *,
        weights=None,
        probe_columns=None,
        output_columns=None,
        direct_columns=None,
    ):
        """``Σ_chunks fn(tap cotangents, weights)`` over chunks of the ``M`` vectors.

        Backpropagating all ``M`` vectors at once holds ``M`` copies of every intermediate
        cotangent; ``fn`` must be additive over vectors (sums of squares, outer products), so the
        vectors are backpropagated a chunk at a time (zero vectors pad the last chunk).

        Args:
          fn: ``(tap id -> [N, m, *shape], weights [N, m]) -> pytree``, additive over vectors.
          columns: ``[N, M, *P, C]`` output cotangents, or :class:`~curvjax._src.positions.Columns`
            made a chunk at a time.
          weights: ``[N, M]`` (default ones), passed through to ``fn``.
          probe_columns, output_columns: as for :meth:`backpropagate`.
          direct_columns: optional, tap id -> ``[N, M, *param input shape]``, chunked like the
            vectors and passed to ``fn`` as a third argument (cotangents added directly to a
            tap's parameter input, see :func:`curvjax._src.leafwise.sum_sq`).
        """
        lazy = isinstance(columns, positions.Columns)
        n = self.model.num_examples
        m = columns.count if lazy else columns.shape[1]
        dtype = self.outputs.dtype
        weights = jnp.ones((n, m), dtype) if weights is None else weights
        extra = (probe_columns, output_columns, direct_columns)
        per_vector = n * (_size(self.cots) + _size(self.probes) + _size(self.tap_outputs))
        per_vector += n * sum(int(np.prod(a.shape[2:])) for a in jax.tree.leaves(direct_columns))
        chunk = chunking.column_chunk_size(m, per_vector)

        def one(xs):
            cols, w, (probes, outputs, direct) = xs
            if lazy:
                cols = columns.make(cols)
            cots = self.backpropagate(cols, probes, outputs)
            return fn(cots, w) if direct_columns is None else fn(cots, w, direct)

        # vectors first; lazy columns travel as their 1-based indices (0 = a padding vector)
        first = jnp.arange(1, m + 1) if lazy else jnp.moveaxis(columns, 1, 0)
        moved = (first, *jax.tree.map(lambda a: jnp.moveaxis(a, 1, 0), (weights, extra)))

        def back(ys):
            head, rest = ys[0], jax.tree.map(lambda a: jnp.moveaxis(a, 0, 1), ys[1:])
            return (head if lazy else jnp.moveaxis(head, 0, 1), *rest)

        return chunking.chunked_sum(lambda ys: one(back(ys)), moved, chunk, unrolled=True)


def _size(tree) -> int:
    return sum(int(np.prod(a.shape[1:])) for a in jax.tree.leaves(tree))


def _columns_first(tree):
    return jax.tree.map(lambda c: jnp.moveaxis(c, 1, 0), tree)


def _columns_second(tree):
    return jax.tree.map(lambda c: jnp.moveaxis(c, 0, 1), tree)


def _is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def _check_finite(name: str, tree) -> None:
    positions.check_finite(name, tree)


def run(
    apply_fn,
    params,
    batch,
    *,
    loss="cross_entropy",
    reduction="mean",
    residuals: bool = False,
    output_taps=(),
) -> Pass:
    """Forward and backward pass; see the module docstring.

    ``residuals`` also records the Hessian nodes (see :class:`~curvjax._src.taps.Node`);
    ``output_taps`` (tap ids, or a function of the traced model returning them) makes the outputs
    of those taps injectable (for KFRA).
    """
    inputs, targets, weights = positions.split_batch(batch)
    positions.batch_size(inputs)
    model = taps_lib.TracedModel(apply_fn, params, inputs, residuals=residuals)
    mixing.check_no_batch_mixing(apply_fn, params, inputs)
    n = model.num_examples
    out_struct = jax.ShapeDtypeStruct((n, *model.out_aval.shape[1:]), model.out_aval.dtype)
    objective = positions.objective(loss, reduction, out_struct, targets, weights)
    _check_finite("inputs", inputs)
    _check_finite("targets", targets)
    _check_finite("params", params)

    float_leaves = model.float_leaves(params)
    if callable(output_taps):
        output_taps = output_taps(model)
    output_taps = frozenset(output_taps or ())

    def forward(float_leaves, eps):
        return model.forward(model.merge(params, float_leaves), inputs, eps, output_taps)

    eps = model.zero_perturbations()
    (outputs, probes, tap_outputs), vjp_fn, acts = jax.vjp(forward, float_leaves, eps, has_aux=True)
    total = objective.value(outputs)
    out_cot = objective.output_grads(outputs)
    zero = functools.partial(jax.tree.map, jnp.zeros_like)
    grad, eps_cots = vjp_fn((out_cot, zero(probes), zero(tap_outputs)))
    statics = model.static_values(model.merge(params, float_leaves))
    return Pass(
        model=model,
        params=params,
        objective=objective,
        outputs=outputs,
        loss=total,
        grad=grad,
        statics={t.id: statics[("tap", t.id)] for t in model.taps},
        acts=acts,
        cots={t.id: eps_cots[("tap", t.id)] for t in model.taps},
        node_statics={q.id: statics[("node", q.id)] for q in model.nodes},
        probes=probes,
        node_cots={q.id: eps_cots[("node", q.id)] for q in model.nodes},
        tap_outputs=tap_outputs,
        vjp_fn=vjp_fn,
    )
