# ruff: noqa: F722, F821  (jaxtyping shape strings are not forward references)
"""Inverse-curvature products ``(C + λ I)⁻¹ v``: from curvature blocks, or by conjugate gradients.

:func:`inverse_curvature_product` applies the damped inverse of a params-shaped tree of curvature
blocks (what :func:`curvjax.kfac`, :func:`curvjax.kflr`, :func:`curvjax.kfra`,
:func:`curvjax.ekfac` return, or a diagonal such as :func:`curvjax.ggn_diag`) leaf by leaf, through
each block's own damped solve. :func:`cg_solve` solves with the exact GGN or Hessian of a batch
by conjugate gradients on its matrix-vector products, linearising the model once.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int, PyTree

from curvjax._src import blocks, products
from curvjax._src.typing import ApplyFn, Batch, LossLike, ParamsLike

CURVATURES = ("ggn", "hessian")


def _is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def check_damping(damping, name: str = "damping") -> None:
    """Raise if a concrete ``damping`` is negative or not finite (no-op when traced)."""
    if damping is None:
        raise ValueError(f"`{name}` is required: the damping λ ≥ 0 added to the curvature.")
    if _is_concrete(damping):
        value = np.asarray(damping)
        if value.shape != () or not np.isfinite(value) or value < 0:
            raise ValueError(
                f"`{name}` must be a finite scalar λ ≥ 0, got {damping!r}; the damped curvature "
                "C + λ I needs λ ≥ 0 (and λ > 0 where C is singular)."
            )


def check_vector(name: str, tree) -> None:
    """Raise if a concrete floating-point leaf of ``tree`` holds NaN or Inf (no-op when traced)."""
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        if not _is_concrete(leaf) or not jnp.issubdtype(jnp.result_type(leaf), jnp.inexact):
            continue
        if not np.all(np.isfinite(np.asarray(leaf))):
            raise ValueError(
                f"{name}{jax.tree_util.keystr(path)} contains NaN or Inf: (C + λ I)⁻¹ v would be "
                "NaN. Pass a finite vector."
            )


def _is_entry(x) -> bool:
    return x is None or blocks.is_block(x)


def inverse_curvature_product(
    curvature: PyTree,
    v: ParamsLike,
    *,
    damping: float | Float[Array, ""],
    factored: bool = False,
) -> PyTree:
    """``(C + λ I)⁻¹ v`` for a block-diagonal curvature ``C`` (a params-shaped tree of blocks).

    .. math::
        u_k = (C_k + λ I)^{-1} v_k \\quad \\text{for every parameter leaf } k ,

    with ``C_k`` the block of leaf ``k`` over its entries in row-major order. Each block applies
    its own damped inverse: a diagonal divides, a full block solves by Cholesky, an
    eigen-corrected Kronecker block (EKFAC) is exact, ``U (diag(s) + λ)⁻¹ Uᵀ``. For Kronecker
    blocks ``A ⊗ B``:

    * ``factored=False`` (default): the exact damped inverse ``(A ⊗ B + λ I)⁻¹``, through the
      eigendecompositions ``A = Q_A diag(a) Q_Aᵀ``, ``B = Q_B diag(b) Q_Bᵀ``:
      ``(Q_A ⊗ Q_B) diag(1 / (a_i b_j + λ)) (Q_A ⊗ Q_B)ᵀ``. It costs one eigendecomposition per
      factor (as cheap as a Cholesky factorisation, and done once when this function is mapped
      over many vectors with ``jax.vmap``);
    * ``factored=True``: the factored Tikhonov damping of K-FAC,
      ``(A + π√λ I)⁻¹ ⊗ (B + √λ/π I)⁻¹`` (Martens & Grosse 2015, §6.3), which is not the inverse
      of ``A ⊗ B + λ I``.

    An array (for :func:`curvjax.ggn_diag` or :func:`curvjax.hessian_diag`) is taken as a
    diagonal. ``C`` is meant to be positive semi-definite; with an indefinite diagonal (the
    Hessian's) the result is the inverse of the indefinite ``C + λ I`` as long as no entry
    ``c_i + λ`` is zero (a zero raises, when the values are concrete). Use :func:`cg_solve` for the
    exact (non-block-diagonal) GGN or Hessian.

    Args:
      curvature: a pytree like ``params`` of :class:`curvjax.KroneckerBlock` /
        :class:`curvjax.DenseBlock` / :class:`curvjax.DiagonalBlock` / EKFAC blocks or arrays
        shaped like the leaves (diagonals); ``None`` at non-floating-point leaves.
      v: a pytree like ``params`` (entries at leaves where ``curvature`` is ``None`` are ignored);
        map over many vectors with ``jax.vmap(..., in_axes=(None, 0))``.
      damping: ``λ ≥ 0`` (a scalar).
      factored: the factored Tikhonov damping for Kronecker blocks (see above).

    Returns:
      A pytree like ``params``: ``(C + λ I)⁻¹ v`` leaf by leaf, ``None`` where ``curvature`` is
      ``None``.

    Raises:
      ValueError: for a negative or non-finite ``damping``, a non-finite ``v``, a block that does
        not fit its leaf, or a singular ``C + λ I`` (all checked when the values are concrete).

    Example:
      >>> import jax.numpy as jnp, curvjax
      >>> curvature = {"w": jnp.array([1.0, 3.0])}  # a diagonal
      >>> u = curvjax.inverse_curvature_product(curvature, {"w": jnp.ones(2)}, damping=1.0)
      >>> u["w"].tolist()
      [0.5, 0.25]

    References:
      Martens & Grosse, "Optimizing neural networks with Kronecker-factored approximate
      curvature", ICML 2015 (§6.3, factored Tikhonov damping).
      George et al., "Fast approximate natural gradient descent in a Kronecker-factored
      eigenbasis", NeurIPS 2018.
    """
    check_damping(damping)
    check_vector("v", v)
    entries, treedef = jax.tree_util.tree_flatten_with_path(curvature, is_leaf=_is_entry)
    try:
        vectors = treedef.flatten_up_to(v)
    except (ValueError, TypeError) as error:
        raise ValueError(
            f"`v` must have the pytree structure of `curvature` (both like `params`): {error}"
        ) from None

    def one(path, block, x):
        if block is None:
            return None
        block = blocks.as_block(block)
        name = f"leaf {jax.tree_util.keystr(path)}"
        if x is None:
            raise ValueError(f"`v` has no entry at {name}, where `curvature` has a block.")
        block.check_leaf(name, x)
        return block.damped_solve(jnp.asarray(x), damping, factored=factored)

    solved = [one(path, block, x) for (path, block), x in zip(entries, vectors, strict=True)]
    result = treedef.unflatten(solved)
    for path, leaf in jax.tree_util.tree_leaves_with_path(result):
        if _is_concrete(leaf) and not np.all(np.isfinite(np.asarray(leaf))):
            raise ValueError(
                f"(C + λ I)⁻¹ v is not finite at leaf {jax.tree_util.keystr(path)}: the damped "
                f"curvature is singular there (damping={damping!r}); use a larger damping."
            )
    return result


class CGInfo(NamedTuple):
    """Convergence information of :func:`cg_solve`.

    Attributes:
      iterations: ``[]`` int, the number of curvature-vector products used.
      residual_norm: ``[]`` the norm of the residual ``v - (C + λ I) u`` by the CG recurrence
        (equal to the true residual in exact arithmetic).
      converged: ``[]`` bool, ``residual_norm ≤ tol · ‖v‖`` and no direction of non-positive
        curvature met.
      negative_curvature: ``[]`` bool, a direction ``p`` with ``pᵀ (C + λ I) p ≤ 0`` stopped the
        iteration (``C + λ I`` is not positive definite: the Hessian with too small a damping).
    """

    iterations: Int[Array, ""]
    residual_norm: Float[Array, ""]
    converged: Bool[Array, ""]
    negative_curvature: Bool[Array, ""]


def _dot(xs, ys):
    return sum(jnp.vdot(x, y).real for x, y in zip(xs, ys, strict=True))


def _axpy(alpha, xs, ys):
    return [y + (alpha * x).astype(y.dtype) for x, y in zip(xs, ys, strict=True)]


def conjugate_gradients(matvec, b: list, *, maxiter: int, tol) -> tuple[list, CGInfo]:
    """``A x = b`` for a symmetric ``A`` by conjugate gradients (Hestenes & Stiefel 1952).

    ``b`` is a list of arrays, ``matvec`` maps such a list to one. Starts at ``x = 0``; stops when
    ``‖r‖ ≤ tol ‖b‖``, after ``maxiter`` products, or at a direction with ``pᵀ A p ≤ 0`` (where
    ``A`` is not positive definite; that step is not taken).
    """
    b_norm = jnp.sqrt(_dot(b, b))
    threshold = tol * b_norm
    zeros = [jnp.zeros_like(x) for x in b]

    def cond(state):
        _, _, _, rs, k, negative = state
        return (k < maxiter) & (jnp.sqrt(rs) > threshold) & ~negative

    def body(state):
        x, r, p, rs, k, _ = state
        ap = matvec(p)
        curvature = _dot(p, ap)
        negative = curvature <= 0
        alpha = jnp.where(negative, 0.0, rs / jnp.where(negative, 1.0, curvature))
        x = _axpy(alpha, p, x)
        r = _axpy(-alpha, ap, r)
        rs_new = jnp.where(negative, rs, _dot(r, r))
        beta = rs_new / jnp.where(rs > 0, rs, 1.0)
        p = [ri + (beta * pi).astype(ri.dtype) for ri, pi in zip(r, p, strict=True)]
        return x, r, p, rs_new, k + 1, negative

    rs0 = _dot(b, b)
    state = (zeros, list(b), list(b), rs0, jnp.asarray(0, jnp.int32), jnp.asarray(False))
    x, _, _, rs, k, negative = jax.lax.while_loop(cond, body, state)
    residual = jnp.sqrt(rs)
    converged = (residual <= threshold) & ~negative
    return x, CGInfo(k, residual, converged, negative)


def curvature_matvec(apply_fn, params, batch, *, curvature: str, loss, reduction):
    """``(matvec, from_tree, to_tree)``: the GGN or Hessian product on the list of float leaves,
    with the model linearised once (the forward pass is not repeated per product)."""
    if curvature not in CURVATURES:
        raise ValueError(
            f"curvature={curvature!r}; use 'ggn' (the generalised Gauss-Newton, positive "
            "semi-definite) or 'hessian' (may be indefinite: needs a damping above its most "
            "negative eigenvalue)."
        )
    w = products.whole_batch(apply_fn, params, batch, loss, reduction)
    if curvature == "ggn":
        out, jvp_fn = jax.linearize(w.outputs, w.floats)
        transpose = jax.linear_transpose(jvp_fn, w.floats)

        def matvec(x):
            (result,) = transpose(w.objective.hessian_times(out, jvp_fn(x)))
            return list(result)

    else:
        _, hvp_fn = jax.linearize(jax.grad(w.reduced), w.floats)

        def matvec(x):
            return list(hvp_fn(x))

    return matvec, w.from_tree, w.to_tree


def cg_solve(
    apply_fn: ApplyFn,
    params: PyTree,
    batch: Batch,
    v: ParamsLike,
    *,
    damping: float | Float[Array, ""],
    curvature: str = "ggn",
    loss: LossLike = "cross_entropy",
    reduction: str = "mean",
    maxiter: int = 100,
    tol: float = 1e-6,
) -> tuple[PyTree, CGInfo]:
    """``(C + λ I)⁻¹ v`` for the exact GGN or Hessian of a batch, by conjugate gradients.

    .. math::
        u ≈ (C + λ I)^{-1} v, \\qquad C = G = κ \\sum_n J_n^⊤ H_n J_n \\;\\text{ or }\\;
        C = ∇^2 L ,

    the curvature of the reduced loss ``L = κ Σ_n ℓ_n`` (as :func:`curvjax.ggn_vp` and
    :func:`curvjax.hvp`). Conjugate gradients from ``u = 0`` use one product ``(C + λ I) p`` per
    iteration and at most ``maxiter`` of them (the product budget); they stop when the residual
    satisfies ``‖v - (C + λ I) u‖ ≤ tol ‖v‖``. The model is linearised once, so a product costs a
    forward-mode and a reverse-mode pass through the linearised model, not a new forward pass.
    The loop is a ``jax.lax.while_loop``: the function runs under ``jax.jit`` and ``jax.vmap``
    (over several ``v``).

    The Hessian may be indefinite: with ``λ`` below its most negative eigenvalue,
    ``C + λ I`` is not positive definite, conjugate gradients do not apply, and the iteration
    stops at the first direction ``p`` with ``pᵀ (C + λ I) p ≤ 0``: the returned ``u`` is then
    not the solution and ``info.converged`` is false (``info.negative_curvature`` true). Always
    check ``info.converged``; the GGN is positive semi-definite and converges for any ``λ > 0``
    within ``D`` iterations in exact arithmetic (fewer when its spectrum clusters).

    Written as a small ``while_loop`` rather than ``jax.scipy.sparse.linalg.cg`` because that
    returns no convergence information (neither the number of iterations nor the residual) and
    does not detect non-positive curvature.

    Args:
      apply_fn: ``apply_fn(params, inputs) -> outputs [N, *P, C]``.
      params: parameter pytree.
      batch: ``(inputs, targets)`` or ``(inputs, targets, weights)``.
      v: a pytree like ``params`` (entries at non-float leaves are ignored).
      damping: ``λ ≥ 0``.
      curvature: ``"ggn"`` or ``"hessian"``.
      loss: ``"cross_entropy"``, ``"mse"`` or a :class:`curvjax.losses.Loss`.
      reduction: ``"mean"``, ``"sum"`` or ``"token_mean"``.
      maxiter: the most curvature-vector products (iterations).
      tol: the relative residual at which to stop.

    Returns:
      ``(u, info)``: ``u`` a pytree like ``params`` (``None`` at non-float leaves) and a
      :class:`CGInfo` (iterations, residual norm, converged, negative curvature).

    Raises:
      ValueError: for a negative or non-finite ``damping`` or a non-finite ``v`` (when
        concrete), an unknown ``curvature``, ``maxiter < 1`` or ``tol ≤ 0``.

    Example:
      >>> import jax.numpy as jnp, curvjax
      >>> apply_fn = lambda p, x: x @ p["w"]
      >>> params = {"w": jnp.ones((4, 3)) / 4}
      >>> batch = (jnp.eye(5, 4), jnp.array([0, 1, 2, 0, 1]))
      >>> u, info = curvjax.cg_solve(apply_fn, params, batch, params, damping=0.1)
      >>> u["w"].shape, bool(info.converged)
      ((4, 3), True)

    References:
      Hestenes & Stiefel, "Methods of conjugate gradients for solving linear systems", 1952.
      Martens, "Deep learning via Hessian-free optimization", ICML 2010.
      Koh & Liang, "Understanding black-box predictions via influence functions", ICML 2017.
    """
    check_damping(damping)
    check_vector("v", v)
    if not isinstance(maxiter, int | np.integer) or maxiter < 1:
        raise ValueError(f"maxiter={maxiter!r}; give the most products, an integer ≥ 1.")
    if _is_concrete(tol) and not float(tol) > 0:
        raise ValueError(f"tol={tol!r}; give the relative residual to reach, a number > 0.")
    matvec, from_tree, to_tree = curvature_matvec(
        apply_fn, params, batch, curvature=curvature, loss=loss, reduction=reduction
    )
    b = [jnp.asarray(x) for x in from_tree(v)]

    def damped(x):
        return [y + damping * xi for y, xi in zip(matvec(x), x, strict=True)]

    x, info = conjugate_gradients(damped, b, maxiter=int(maxiter), tol=tol)
    return to_tree(x), info


__all__: list[Any] = ["CGInfo", "cg_solve", "inverse_curvature_product"]
