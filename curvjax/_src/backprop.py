"""One forward and one backward pass through the taps of a model.

:func:`run` evaluates the model once for all examples (each example on its own, under ``vmap``),
reduces the loss, and backpropagates the loss gradient once, yielding at the same time the
parameter gradient and, for every tap, the activation inputs ``a_n`` and the output cotangents
``b_n`` of example ``n``'s contribution ``κ ℓ_n`` (``κ = 1/N`` for the mean, ``1`` for the sum).
Further sets of vectors (columns of the output-Hessian factors) are backpropagated with
:meth:`Pass.backpropagate`, reusing the same forward pass.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from curvjax._src import losses as losses_lib
from curvjax._src import mixing
from curvjax._src import taps as taps_lib


class Pass(NamedTuple):
    model: taps_lib.TracedModel
    params: Any
    loss_fn: losses_lib.Loss
    scale: float  # κ
    outputs: jax.Array  # [N, C]
    targets: Any
    loss: jax.Array  # scalar L = κ Σ_n ℓ_n
    grad: list  # ∇L, one array per float leaf
    statics: dict  # tap id -> values of the tap's static inputs
    acts: dict  # tap id -> activation inputs, [N, *shape at batch size one]
    cots: dict  # tap id -> output cotangents of κ ℓ_n, [N, *shape] (None for non-float outputs)
    vjp_fn: Callable  # output cotangents [N, C] -> (param cotangents, tap cotangents)

    def backpropagate(self, columns: jax.Array) -> dict:
        """Tap cotangents for ``columns`` ``[N, M, C]``: tap id -> ``[N, M, *shape]``."""
        _, cots = jax.vmap(self.vjp_fn, in_axes=1)(columns.transpose(1, 0, 2))
        return jax.tree.map(lambda c: jnp.moveaxis(c, 0, 1), cots)

    def columns_of_gradient(self) -> dict:
        """:attr:`cots` with a column axis of size one: tap id -> ``[N, 1, *shape]``."""
        return jax.tree.map(lambda c: c[:, None], self.cots)


def _is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def _check_finite(name: str, tree) -> None:
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        if not _is_concrete(leaf) or not jnp.issubdtype(jnp.result_type(leaf), jnp.inexact):
            continue
        if not np.all(np.isfinite(np.asarray(leaf))):
            raise ValueError(
                f"{name}{jax.tree_util.keystr(path)} contains NaN or Inf; curvjax would return "
                "NaN quantities. Check the data and the parameters."
            )


def validate_batch(batch) -> tuple[Any, Any]:
    if not isinstance(batch, tuple | list) or len(batch) != 2:
        raise ValueError(
            f"`batch` must be a pair (inputs, targets), got {type(batch).__name__}"
            + (f" of length {len(batch)}" if isinstance(batch, tuple | list) else "")
            + "."
        )
    return batch[0], batch[1]


def run(apply_fn, params, batch, *, loss="cross_entropy", reduction="mean") -> Pass:
    """Forward and backward pass; see the module docstring."""
    inputs, targets = validate_batch(batch)
    loss_fn = losses_lib.resolve(loss)
    model = taps_lib.TracedModel(apply_fn, params, inputs)
    mixing.check_no_batch_mixing(apply_fn, params, inputs)
    n = model.num_examples
    scale = losses_lib.reduction_scale(reduction, n)
    target_leaves = jax.tree.leaves(targets)
    for leaf in target_leaves:
        if jnp.ndim(leaf) == 0 or jnp.shape(leaf)[0] != n:
            raise ValueError(
                f"the targets' leading axis must be the batch size N = {n} of the inputs, "
                f"got targets of shape {jnp.shape(leaf)}."
            )
    if loss_fn.check_targets is not None and all(_is_concrete(t) for t in target_leaves):
        out_struct = jax.ShapeDtypeStruct((n, model.out_aval.shape[1]), model.out_aval.dtype)
        loss_fn.check_targets(out_struct, targets)
    _check_finite("inputs", inputs)
    _check_finite("targets", targets)
    _check_finite("params", params)

    float_leaves = model.float_leaves(params)

    def forward(float_leaves, eps):
        return model.forward(model.merge(params, float_leaves), inputs, eps)

    eps = model.zero_perturbations()
    outputs, vjp_fn, acts = jax.vjp(forward, float_leaves, eps, has_aux=True)
    per_example = jax.vmap(loss_fn.value)(outputs, targets)
    total = scale * jnp.sum(per_example)
    out_cot = scale * jax.vmap(loss_fn.output_grad)(outputs, targets)
    grad, cots = vjp_fn(out_cot.astype(outputs.dtype))
    statics = model.static_values(model.merge(params, float_leaves))
    return Pass(
        model, params, loss_fn, scale, outputs, targets, total, grad, statics, acts, cots, vjp_fn
    )
