"""Matrix-free linear operators over the flattened floating-point parameters.

An operator acts on flat vectors ``[D]`` in the order of ``jax.flatten_util.ravel_pytree`` on the
float leaves of ``params`` (``jax.tree.leaves`` order, each row-major) -- the order of
:func:`curvjax.hessian_matrix` -- and converts to and from params-shaped pytrees with ``to_tree`` /
``from_tree``. Curvature operators linearise the model once (``jax.linearize``), so each product
re-uses the forward pass. Structured approximations (diagonals, Kronecker blocks) also know their
exact eigenvalues and trace.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from curvjax._src import blocks as blocks_lib
from curvjax._src import products


class LinearOperator(NamedTuple):
    """A symmetric ``[D, D]`` operator given by its product with flat vectors.

    Attributes:
      matvec: ``[D] -> [D]`` (vmappable).
      size: ``D``.
      dtype: the dtype of the vectors.
      to_tree: ``[D] ->`` params-shaped pytree (``None`` at non-float leaves).
      from_tree: params-shaped pytree ``-> [D]``.
      eigenvalues: for structured approximations, a function returning all ``D`` exact eigenvalues
        in ascending order; ``None`` for matrix-free curvature.
      trace: for structured approximations, a function returning the exact trace; else ``None``.
    """

    matvec: Callable[[jax.Array], jax.Array]
    size: int
    dtype: Any
    to_tree: Callable[[jax.Array], Any]
    from_tree: Callable[[Any], jax.Array]
    eigenvalues: Callable[[], jax.Array] | None = None
    trace: Callable[[], jax.Array] | None = None

    def dense(self) -> jax.Array:
        """The ``[D, D]`` matrix, column by column (small operators only)."""
        return jax.vmap(self.matvec)(jnp.eye(self.size, dtype=self.dtype)).T


def _widened(op: LinearOperator) -> LinearOperator:
    """``op`` on vectors of at least float32: Krylov methods and ``eigh`` of a bfloat16 model's
    operator run in float32, its products in the model's own precision."""
    narrow = op.dtype
    wide = jnp.promote_types(narrow, jnp.float32)
    if wide == narrow:
        return op
    return op._replace(
        matvec=lambda v: op.matvec(v.astype(narrow)).astype(wide),
        dtype=wide,
        to_tree=lambda v: op.to_tree(v.astype(narrow)),
        from_tree=lambda t: op.from_tree(t).astype(wide),
    )


def _flat(floats, to_tree, from_tree):
    """``(flat, unravel, to_tree, from_tree)`` of float leaves, the maps on flat vectors."""
    flat, unravel = ravel_pytree(floats)
    return (
        flat,
        unravel,
        lambda v: to_tree(unravel(v)),
        lambda t: ravel_pytree(from_tree(t))[0],
    )


def _flattening(params):
    floats, _, to_tree, from_tree = products.float_split(params)
    return floats, *_flat(floats, to_tree, from_tree)


def _model(apply_fn, params, batch, loss, reduction):
    """:func:`products.whole_batch` on flat vectors:
    ``(objective, flat, outputs(v), reduced(v), to_tree, from_tree)``."""
    w = products.whole_batch(apply_fn, params, batch, loss, reduction)
    flat, unravel, to_flat_tree, from_flat_tree = _flat(w.floats, w.to_tree, w.from_tree)
    return (
        w.objective,
        flat,
        lambda v: w.outputs(unravel(v)),
        lambda v: w.reduced(unravel(v)),
        to_flat_tree,
        from_flat_tree,
    )


def hessian_operator(apply_fn, params, batch, *, loss="cross_entropy", reduction="mean"):
    """``v ↦ ∇²L v`` by forward-over-reverse differentiation, linearised once.

    Args:
      apply_fn, params, batch, loss, reduction: as for :func:`curvjax.hvp`.

    Returns:
      A :class:`LinearOperator`.
    """
    _, flat, _, reduced, to_tree, from_tree = _model(apply_fn, params, batch, loss, reduction)
    _, matvec = jax.linearize(jax.grad(reduced), flat)
    return _widened(LinearOperator(matvec, flat.size, flat.dtype, to_tree, from_tree))


def _gauss_newton(outputs, flat, hessian_times, to_tree, from_tree):
    """``v ↦ Jᵀ H J v`` with ``hessian_times(out, u) = H u`` (``κ`` included)."""
    out, jvp_fn = jax.linearize(outputs, flat)
    transpose = jax.linear_transpose(jvp_fn, flat)

    def matvec(v):
        return transpose(hessian_times(out, jvp_fn(v)))[0]

    return _widened(LinearOperator(matvec, flat.size, flat.dtype, to_tree, from_tree))


def ggn_operator(apply_fn, params, batch, *, loss="cross_entropy", reduction="mean"):
    """``v ↦ G v = κ Σ_n J_nᵀ S_n S_nᵀ J_n v`` (model linearised once).

    Args:
      apply_fn, params, batch, loss, reduction: as for :func:`curvjax.ggn_vp`.

    Returns:
      A :class:`LinearOperator`.
    """
    objective, flat, outputs, _, to_tree, from_tree = _model(
        apply_fn, params, batch, loss, reduction
    )
    return _gauss_newton(outputs, flat, objective.hessian_times, to_tree, from_tree)


def _times_columns(columns):
    """``u ↦ Σ_m c_m ⟨c_m, u⟩`` per example for columns ``[N, M, *P, C]``."""

    def times(out, u):
        n, m = columns.shape[:2]
        flat_cols = columns.reshape(n, m, -1)
        coef = jnp.einsum("nmc,nc->nm", flat_cols, u.reshape(n, -1))
        return jnp.einsum("nmc,nm->nc", flat_cols, coef).reshape(u.shape).astype(out.dtype)

    return times


def fisher_operator(
    apply_fn, params, batch, *, key, mc_samples=1, loss="cross_entropy", reduction="mean"
):
    """Monte-Carlo Fisher ``κ Σ_n J_nᵀ S̃_n S̃_nᵀ J_n`` with labels sampled from the model once.

    Args:
      apply_fn, params, batch, loss, reduction: as for :func:`curvjax.ggn_vp`.
      key: PRNG key for ``ŷ ~ p(y | f_n)`` (one draw per position and column).
      mc_samples: sampled labels per example (and position).

    Returns:
      A :class:`LinearOperator` (fixed samples: a symmetric PSD matrix).
    """
    objective, flat, outputs, _, to_tree, from_tree = _model(
        apply_fn, params, batch, loss, reduction
    )
    columns = objective.mc_columns(key, outputs(flat), mc_samples)
    return _gauss_newton(outputs, flat, _times_columns(columns), to_tree, from_tree)


def empirical_fisher_operator(apply_fn, params, batch, *, loss="cross_entropy", reduction="mean"):
    """Empirical Fisher ``κ Σ_n ∇ℓ_n ∇ℓ_nᵀ`` of the batch (per-example losses linearised once).

    Args:
      apply_fn, params, batch, loss, reduction: as for :func:`curvjax.ggn_vp`.

    Returns:
      A :class:`LinearOperator`.
    """
    objective, flat, outputs, _, to_tree, from_tree = _model(
        apply_fn, params, batch, loss, reduction
    )

    def per_example(v):
        return objective.per_example(outputs(v))

    _, jvp_fn = jax.linearize(per_example, flat)
    transpose = jax.linear_transpose(jvp_fn, flat)

    def matvec(v):
        return transpose(objective.scale * jvp_fn(v))[0]

    return _widened(LinearOperator(matvec, flat.size, flat.dtype, to_tree, from_tree))


def diagonal_operator(diagonal, params):
    """The diagonal matrix of a params-shaped ``diagonal`` (e.g. :func:`curvjax.ggn_diag`).

    Its eigenvalues are the entries, its trace their sum: :func:`blocks_operator` of one
    :class:`curvjax.DiagonalBlock` per floating-point leaf.
    """
    _, _, to_tree, from_tree = products.float_split(params)
    blocks = to_tree([blocks_lib.DiagonalBlock(d) for d in from_tree(diagonal)])
    return blocks_operator(blocks, params)


def blocks_operator(blocks, params):
    """The block-diagonal matrix of a params-shaped tree of blocks (:func:`curvjax.kfac`, …).

    Exact eigenvalues: per Kronecker block the products ``λ_i(A_g) λ_o(B_g)``, per
    eigenvalue-corrected block (:func:`curvjax.ekfac`) its scaling ``s``, per dense block its
    eigenvalues, per diagonal block its entries; the operator's spectrum is their union.
    """
    floats, flat, _, to_tree, from_tree = _flattening(params)
    block_list = products.float_split(params)[3](blocks)  # one block per float leaf
    sizes = [int(jnp.size(x)) for x in floats]
    offsets = [0]
    for s in sizes:
        offsets.append(offsets[-1] + s)

    def matvec(v):
        parts = [
            b.matvec(v[start:stop])
            for b, start, stop in zip(block_list, offsets[:-1], offsets[1:], strict=True)
        ]
        return jnp.concatenate(parts)

    return _widened(
        LinearOperator(
            matvec,
            flat.size,
            flat.dtype,
            to_tree,
            from_tree,
            eigenvalues=lambda: jnp.sort(jnp.concatenate([b.eigenvalues() for b in block_list])),
            trace=lambda: sum(b.trace() for b in block_list),
        )
    )
