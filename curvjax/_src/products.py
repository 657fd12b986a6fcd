"""Curvature-matrix products and dense curvature matrices (for small models and tests).

``hvp`` is Pearlmutter's forward-over-reverse product; ``ggn_vp`` linearises the model once and
applies ``J_nᵀ (κ H_n) J_n v`` with the loss Hessian in factored form. Both work on the whole batch,
for any model (also ones that mix examples). Flat orders follow ``jax.flatten_util.ravel_pytree``
on the floating-point leaves of ``params`` (in ``jax.tree.leaves`` order, each row-major).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree
from jaxtyping import PyTree

from curvjax._src import positions
from curvjax._src.typing import ApplyFn, Batch, LossLike, ParamsLike


def float_split(params):
    """The floating-point leaves of ``params`` and the maps between them and pytrees.

    Returns ``(floats, merge, to_tree, from_tree)``: ``merge(fl)`` is ``params`` with its float
    leaves replaced by ``fl``; ``to_tree(values)`` a params-shaped tree with ``None`` at the other
    leaves; ``from_tree(tree)`` the float-leaf entries of a params-shaped tree, as a list.
    """
    leaves, tree = jax.tree.flatten(params)
    is_float = [jnp.issubdtype(jnp.result_type(x), jnp.inexact) for x in leaves]
    floats = [x for x, f in zip(leaves, is_float, strict=True) if f]

    def merge(fl):
        it = iter(fl)
        return jax.tree.unflatten(
            tree, [next(it) if f else x for x, f in zip(leaves, is_float, strict=True)]
        )

    def to_tree(values):
        it = iter(values)
        return jax.tree.unflatten(tree, [next(it) if f else None for f in is_float])

    def from_tree(vector):
        flat = tree.flatten_up_to(vector)
        return [v for v, f in zip(flat, is_float, strict=True) if f]

    return floats, merge, to_tree, from_tree


class WholeBatch(NamedTuple):
    """The reduced loss of a whole batch as a function of the float leaves, and helpers.

    Attributes:
      objective: the batch's :class:`~curvjax._src.positions.Objective` (loss, κ, weights).
      floats: the float leaves of ``params``.
      outputs: ``outputs(fl) -> [N, *P, C]``.
      reduced: ``reduced(fl) -> L``.
      to_tree, from_tree: as returned by :func:`float_split`.
    """

    objective: positions.Objective
    floats: list
    outputs: Callable
    reduced: Callable
    to_tree: Callable
    from_tree: Callable


def whole_batch(apply_fn: ApplyFn, params: PyTree, batch: Batch, loss, reduction) -> WholeBatch:
    """The :class:`WholeBatch` of ``batch`` (targets and weights checked against the outputs)."""
    inputs, targets, weights = positions.split_batch(batch)
    positions.batch_size(inputs)
    floats, merge, to_tree, from_tree = float_split(params)
    out_struct = jax.eval_shape(apply_fn, params, inputs)
    if not isinstance(out_struct, jax.ShapeDtypeStruct):
        raise ValueError(
            "apply_fn(params, inputs) must return one array of shape [N, C] or "
            f"[N, *positions, C], got {jax.tree.map(lambda s: s.shape, out_struct)}; return "
            "only the outputs the loss takes (wrap a model with auxiliary outputs: "
            "`lambda p, x: model(p, x)[0]`)."
        )
    objective = positions.objective(loss, reduction, out_struct, targets, weights)
    positions.check_finite("inputs", inputs)
    positions.check_finite("targets", targets)
    positions.check_finite("params", params)

    def outputs(fl):
        return apply_fn(merge(fl), inputs)

    def reduced(fl):
        return objective.value(outputs(fl))

    return WholeBatch(objective, floats, outputs, reduced, to_tree, from_tree)


def hvp(
    apply_fn: ApplyFn,
    params: PyTree,
    batch: Batch,
    vector: ParamsLike,
    *,
    loss: LossLike = "cross_entropy",
    reduction: str = "mean",
) -> PyTree:
    """Hessian-vector product of the reduced loss, forward-over-reverse (Pearlmutter 1994).

    .. math::
        ∇^2 L \\, v .

    Args:
      apply_fn: ``apply_fn(params, inputs) -> outputs [N, C]``.
      params: parameter pytree.
      batch: ``(inputs, targets)`` or ``(inputs, targets, weights)`` (weights ``[N]`` or ``[N, *P]``).
      vector: a pytree like ``params`` (entries at non-float leaves are ignored).
      loss: ``"cross_entropy"``, ``"mse"`` or a :class:`curvjax.losses.Loss`.
      reduction: ``"mean"``, ``"sum"`` or ``"token_mean"``.

    Returns:
      A pytree like ``params`` (``None`` at non-float leaves).

    Example:
      >>> import jax.numpy as jnp, curvjax
      >>> apply_fn = lambda p, x: x @ p["w"]
      >>> params = {"w": jnp.ones((4, 3))}
      >>> batch = (jnp.ones((5, 4)), jnp.array([0, 1, 2, 0, 1]))
      >>> curvjax.hvp(apply_fn, params, batch, params)["w"].shape
      (4, 3)
    """
    w = whole_batch(apply_fn, params, batch, loss, reduction)
    return w.to_tree(jax.jvp(jax.grad(w.reduced), (w.floats,), (w.from_tree(vector),))[1])


def ggn_vp(
    apply_fn: ApplyFn,
    params: PyTree,
    batch: Batch,
    vector: ParamsLike,
    *,
    loss: LossLike = "cross_entropy",
    reduction: str = "mean",
) -> PyTree:
    """Generalised Gauss-Newton-vector product: ``J`` by ``jax.linearize``, loss Hessian, ``Jᵀ``.

    .. math::
        G v = κ \\sum_n J_n^⊤ H_n J_n v, \\qquad H_n = S_n S_n^⊤ .

    Args:
      apply_fn: ``apply_fn(params, inputs) -> outputs [N, C]``.
      params: parameter pytree.
      batch: ``(inputs, targets)`` or ``(inputs, targets, weights)`` (weights ``[N]`` or ``[N, *P]``).
      vector: a pytree like ``params`` (entries at non-float leaves are ignored).
      loss: ``"cross_entropy"``, ``"mse"`` or a :class:`curvjax.losses.Loss`.
      reduction: ``"mean"``, ``"sum"`` or ``"token_mean"``.

    Returns:
      A pytree like ``params`` (``None`` at non-float leaves).

    Example:
      >>> import jax.numpy as jnp, curvjax
      >>> apply_fn = lambda p, x: x @ p["w"]
      >>> params = {"w": jnp.ones((4, 3))}
      >>> batch = (jnp.ones((5, 4)), jnp.array([0, 1, 2, 0, 1]))
      >>> curvjax.ggn_vp(apply_fn, params, batch, params)["w"].shape
      (4, 3)

    References:
      Schraudolph, "Fast curvature matrix-vector products for second-order gradient descent",
      Neural Computation 2002.
    """
    w = whole_batch(apply_fn, params, batch, loss, reduction)
    out, jvp_fn = jax.linearize(w.outputs, w.floats)
    h_j_v = w.objective.hessian_times(out, jvp_fn(w.from_tree(vector)))
    (result,) = jax.linear_transpose(jvp_fn, w.floats)(h_j_v)
    return w.to_tree(result)


def hessian_matrix(
    apply_fn: ApplyFn,
    params: PyTree,
    batch: Batch,
    *,
    loss: LossLike = "cross_entropy",
    reduction: str = "mean",
) -> PyTree:
    """Dense Hessian ``[D, D]`` of the reduced loss w.r.t. the flattened float parameters.

    For small models (tests, seed-001 comparisons). The flat order is that of
    ``jax.flatten_util.ravel_pytree`` on the float leaves: ``jax.tree.leaves`` order, each
    row-major. Built column by column with :func:`hvp` (``jax.jacfwd`` of the gradient).

    Args:
      apply_fn, params, batch, loss, reduction: as for :func:`curvjax.hvp`.

    Returns:
      ``[D, D]`` symmetric matrix.

    Example:
      >>> import jax.numpy as jnp, curvjax
      >>> batch = (jnp.ones((5, 4)), jnp.array([0, 1, 2, 0, 1]))
      >>> curvjax.hessian_matrix(lambda p, x: x @ p, jnp.ones((4, 3)), batch).shape
      (12, 12)
    """
    w = whole_batch(apply_fn, params, batch, loss, reduction)
    flat, unravel = ravel_pytree(w.floats)
    return jax.jacfwd(jax.grad(lambda v: w.reduced(unravel(v))))(flat)


def ggn_matrix(
    apply_fn: ApplyFn,
    params: PyTree,
    batch: Batch,
    *,
    loss: LossLike = "cross_entropy",
    reduction: str = "mean",
) -> PyTree:
    """Dense GGN ``κ Σ_n J_nᵀ H_n J_n`` ``[D, D]`` (flat order as :func:`hessian_matrix`).

    Args:
      apply_fn, params, batch, loss, reduction: as for :func:`curvjax.ggn_vp`.

    Returns:
      ``[D, D]`` symmetric positive semi-definite matrix.

    Example:
      >>> import jax.numpy as jnp, curvjax
      >>> batch = (jnp.ones((5, 4)), jnp.array([0, 1, 2, 0, 1]))
      >>> curvjax.ggn_matrix(lambda p, x: x @ p, jnp.ones((4, 3)), batch).shape
      (12, 12)
    """
    w = whole_batch(apply_fn, params, batch, loss, reduction)
    flat, unravel = ravel_pytree(w.floats)
    out = w.outputs(w.floats)
    jac = jax.jacfwd(lambda v: w.outputs(unravel(v)))(flat)  # [N, *P, C, D]
    cols = w.objective.factor_columns(out)  # [N, K, *P, C], √κ included
    n, k = cols.shape[:2]
    sj = jnp.einsum("nkc,ncd->nkd", cols.reshape(n, k, -1), jac.reshape(n, -1, flat.size))
    return jnp.einsum("nkd,nke->de", sj, sj)
