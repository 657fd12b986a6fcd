# ruff: noqa: F722, F821  (jaxtyping shape strings are not forward references)
"""Influence functions: which training examples make a prediction, without per-example gradients.

For query examples ``q`` and training examples ``m``, the influence score is

.. math::
    I(q, m) = ∇ℓ_q^⊤ (C + λ I)^{-1} ∇ℓ_m ,

with ``ℓ_n = Σ_p w_{n,p} ℓ(f(θ, x_n)_p, y_{n,p})`` the loss of example ``n`` (summed over its
positions, weights and padding masks of the batch included, **not** divided by the batch size),
``C`` the curvature of the reduced training loss ``L = κ Σ_n ℓ_n`` (``reduction="mean"``:
``κ = 1/N``, the average GGN / Fisher over the curvature batch, as the Hessian of Koh & Liang
2017 is the average over the training set) and ``λ ≥ 0`` the damping.

Sign: to first order, up-weighting training example ``m`` by ``ε`` moves the parameters by
``-ε (C + λ I)⁻¹ ∇ℓ_m`` and changes the query loss by ``-ε I(q, m)``. A **positive** score marks
a *helpful* example (training on it lowers the query loss), a negative one a *harmful* example;
this is ``-I_{up,loss}`` of Koh & Liang (2017) and the convention of Grosse et al. (2023). An
example with weight 0 scores 0.

``C`` is ``"ekfac"`` (eigenvalue-corrected K-FAC, the default, as in Grosse et al. 2023),
``"kfac"``, ``"kflr"`` (block-diagonal over parameter leaves, damped inverse exact in the blocks'
eigenbases), ``"ggn"`` or ``"hessian"`` (the exact curvature of the curvature batch, solved by
conjugate gradients), or any params-shaped tree of curvature blocks you computed.

The query gradients are preconditioned once (:func:`precondition`; a dense kernel's block solved
in a Kronecker eigenbasis ``Q_A ⊗ Q_B`` rotates the query's taps, ``Σ_t (Q_Aᵀ a_t)(Q_Bᵀ b_t)ᵀ``,
instead of its ``I × O`` gradient, which halves the cost of preconditioning). Each training batch then
costs one forward and one backward pass and, per parameter tap, one forward-mode product: for a
tap with input ``a_m`` and output cotangent ``b_m``, ``⟨p_q, ∇ℓ_m⟩`` is the tap's output tangent
in the direction ``p_q`` contracted with ``b_m`` (for a dense layer ``Σ_t a_{m,t}ᵀ P_q b_{m,t}``),
so no ``[N, D]`` per-example gradients are formed. A kernel shared over ``T > 1`` positions
(convolutions, sequence models) with several queries instead forms its own per-example gradient
``Σ_t a_{m,t} b_{m,t}ᵀ`` a chunk of examples at a time, where that costs fewer operations
(``T I O + Q I O`` against ``Q T I O`` per example).

References:
  Koh & Liang, "Understanding black-box predictions via influence functions", ICML 2017.
  Grosse et al., "Studying large language model generalization with influence functions", 2023.
  George et al., "Fast approximate natural gradient descent in a Kronecker-factored eigenbasis",
  NeurIPS 2018.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int, PRNGKeyArray, PyTree

from curvjax._src import (
    backprop,
    blocks,
    chunking,
    ekfac,
    kronecker,
    leafwise,
    quantities,
    rules,
    second_order,
    solve,
)
from curvjax._src.typing import ApplyFn, Batch, LossLike

#: the curvatures :func:`precondition` fits by name
CURVATURES = ("ekfac", "kfac", "kflr", "ggn", "hessian")
#: leaves up to this size without a Kronecker eigenbasis get their self-influence from the
#: columns of the damped inverse square root; larger ones from per-example gradients
DIRECTIONS_LIMIT = 1024


class PreconditionedQueries(NamedTuple):
    """The query side of the influence scores, computed once by :func:`precondition`.

    Attributes:
      gradients: ``∇ℓ_q``, a pytree like ``params`` with leaves ``[Q, *leaf.shape]`` (``None`` at
        non-floating-point leaves).
      preconditioned: ``p_q = (C + λ I)⁻¹ ∇ℓ_q``, the same layout.
      info: for ``curvature="ggn"`` / ``"hessian"`` the :class:`curvjax.CGInfo` of each query
        (fields ``[Q]``); ``None`` for block curvatures.
    """

    gradients: PyTree
    preconditioned: PyTree
    info: solve.CGInfo | None


class TopK(NamedTuple):
    """The result of :func:`top_k`: ``k`` training indices per query.

    Attributes:
      most: ``[Q, k]`` indices of the highest scores (the most helpful examples), highest first.
      most_scores: ``[Q, k]`` their scores.
      least: ``[Q, k]`` indices of the lowest scores (the most harmful examples), lowest first.
      least_scores: ``[Q, k]`` their scores.
    """

    most: Int[Array, "Q k"]
    most_scores: Float[Array, "Q k"]
    least: Int[Array, "Q k"]
    least_scores: Float[Array, "Q k"]


# ------------------------------------------------------------------------------- query side


def query_gradients(
    apply_fn: ApplyFn, params: PyTree, queries: Batch, *, loss: LossLike = "cross_entropy"
) -> PyTree:
    """The gradients ``∇ℓ_q`` of the query examples' losses (not divided by the batch size).

    .. math::
        ∇ℓ_q = ∇_θ \\sum_p w_{q,p} ℓ(f(θ, x_q)_p, y_{q,p}) .

    Args:
      apply_fn: ``apply_fn(params, inputs) -> outputs [N, *P, C]``.
      params: parameter pytree.
      queries: ``(inputs, targets)`` or ``(inputs, targets, weights)`` of ``Q`` query examples.
      loss: ``"cross_entropy"``, ``"mse"`` or a :class:`curvjax.losses.Loss`.

    Returns:
      A pytree like ``params`` with leaves ``[Q, *leaf.shape]``.

    Example:
      >>> import jax.numpy as jnp
      >>> from curvjax import influence
      >>> apply_fn = lambda p, x: x @ p["w"]
      >>> queries = (jnp.ones((2, 4)), jnp.array([0, 1]))
      >>> influence.query_gradients(apply_fn, {"w": jnp.ones((4, 3))}, queries)["w"].shape
      (2, 4, 3)

    References:
      Koh & Liang, "Understanding black-box predictions via influence functions", ICML 2017.
    """
    return _query_pass(apply_fn, params, queries, loss)[1]


def _query_pass(apply_fn, params, queries, loss):
    """``(pass, ∇ℓ_q)``: the queries' pass (summed loss) and their gradients from it."""
    p, values = quantities.compute(
        apply_fn, params, queries, ("per_example_grads",), loss=loss, reduction="sum"
    )
    return p, quantities.result(p, "per_example_grads", values["per_example_grads"])


def _fit(apply_fn, params, curvature, curvature_batch, *, loss, reduction, key):
    """The curvature blocks (a tree), or the name ``"ggn"`` / ``"hessian"`` for CG."""
    if not isinstance(curvature, str):
        return curvature
    if curvature not in CURVATURES:
        raise ValueError(
            f"curvature={curvature!r}; use one of {CURVATURES} or a params-shaped tree of "
            "curvature blocks (e.g. from curvjax.ekfac)."
        )
    if curvature_batch is None:
        raise ValueError(
            f"curvature={curvature!r} is estimated on data: pass `curvature_batch=(inputs, "
            "targets)` (training examples), or a precomputed tree of blocks as `curvature`."
        )
    if curvature in solve.CURVATURES:
        return curvature
    step = _jitted(_fit_blocks, apply_fn, name=curvature, loss=loss, reduction=reduction)
    return step(params, curvature_batch, key)


def _fit_blocks(apply_fn, params, curvature_batch, key, *, name, loss, reduction):
    kwargs = dict(loss=loss, reduction=reduction)
    if name == "kfac":
        return second_order.kfac(apply_fn, params, curvature_batch, key=key, **kwargs)
    if name == "kflr":
        return second_order.kflr(apply_fn, params, curvature_batch, **kwargs)
    basis = "kflr" if key is None else "kfac"
    return second_order.ekfac(apply_fn, params, curvature_batch, key=key, basis=basis, **kwargs)


def _cg_queries(
    apply_fn, params, queries, curvature_batch, damping, tol, *, name, loss, reduction, maxiter
):
    """``(∇ℓ_q, (C + λ I)⁻¹ ∇ℓ_q, info)`` by conjugate gradients, all queries at once."""
    grads = query_gradients(apply_fn, params, queries, loss=loss)
    pre, info = _cg_each(
        apply_fn, params, curvature_batch, grads, damping, tol, name, loss, reduction, maxiter
    )
    return grads, pre, info


def _cg_each(
    apply_fn, params, curvature_batch, grads, damping, tol, name, loss, reduction, maxiter
):
    """``(C + λ I)⁻¹ g`` by conjugate gradients for every ``g`` of ``grads`` (leaves ``[K, ...]``)."""

    def one(g):
        return solve.cg_solve(
            apply_fn,
            params,
            curvature_batch,
            g,
            damping=damping,
            curvature=name,
            loss=loss,
            reduction=reduction,
            maxiter=maxiter,
            tol=tol,
        )

    return jax.vmap(one)(grads)


def _block_queries(apply_fn, params, queries, curvature, damping, *, loss, factored):
    """``(∇ℓ_q, (C + λ I)⁻¹ ∇ℓ_q)`` for every query (the blocks' factorisations shared).

    Kernels whose block is solved in a Kronecker eigenbasis take the rotated query gradients from
    the taps (:func:`_eigenbasis_solves`); the dense solves of those leaves are then unused (and
    left out by XLA).
    """
    p, grads = _query_pass(apply_fn, params, queries, loss)

    def one(g):
        return solve.inverse_curvature_product(curvature, g, damping=damping, factored=factored)

    pre = jax.vmap(one)(grads)
    solved = _eigenbasis_solves(p, _float_entries(p, curvature), damping, factored)
    if solved:
        flat = p.model.param_tree.flatten_up_to(pre)
        for k, value in solved.items():
            flat[p.model.float_index[k]] = value
        pre = p.model.param_tree.unflatten(flat)
    return grads, pre


def _eigenbasis_solves(p: backprop.Pass, curvature: list, damping, factored: bool) -> dict:
    """``(C + λ I)⁻¹ ∇ℓ_q`` at the kernels whose block is solved in an eigenbasis ``Q_A ⊗ Q_B``.

    For the exact damping (and EKFAC blocks) ``(C + λ I)⁻¹ g = Q_A ((Q_Aᵀ G Q_B) ⊘ (Λ + λ)) Q_Bᵀ``
    with ``Λ`` the block's eigenvalues. The rotation ``Q_Aᵀ G_q Q_B`` of a query gradient costs
    ``I O (I + O)``; from the query's taps, ``Σ_t (Q_Aᵀ a_{q,t}) (Q_Bᵀ b_{q,t})ᵀ``, it costs
    ``T (I² + O² + I O)``, taken where that is less (``T`` small against ``O`` and ``I``: dense
    layers). Only the rotation back is then paid in full.

    Returns:
      ``{float leaf index: [Q, *leaf.shape]}`` for the kernels done this way (the others are left
      to :func:`curvjax.inverse_curvature_product`).
    """
    cols = p.columns_of_gradient()
    solved = {}
    for k, uses in kronecker.kernel_uses(p).items():
        entry = curvature[k]
        eigen = isinstance(entry, blocks.EigenKroneckerBlock)
        if not (eigen or isinstance(entry, blocks.KroneckerBlock | blocks.KroneckerEigh)):
            continue
        if factored and not eigen:
            continue  # factored Tikhonov damping of a Kronecker block: Cholesky solves
        forms = kronecker.forms_of(p, uses, cols)
        joined = ekfac.join_forms(forms)
        _, g, t, i = joined.a.shape
        o = joined.b.shape[-1]
        if (g, i, o) != tuple(entry.canonical_shape):
            continue
        if not np.array_equal(uses[0].index(p), entry.index):
            continue
        if not ekfac.taps_first(t, i, o):
            continue
        basis = entry.eigh()
        scale = basis.damped_scaling(damping, factored=factored)
        rot = ekfac.rotate_forms(basis.a_vectors, basis.b_vectors, forms)
        per_query = jnp.einsum("qgti,qgto->qgio", rot.a, rot.b[:, 0]) / scale[None]
        leaf_shape = p.model.float_leaves(p.params)[k].shape
        solved[k] = jax.vmap(functools.partial(basis._from_basis, shape=leaf_shape))(per_query)
    return solved


def precondition(
    apply_fn: ApplyFn,
    params: PyTree,
    queries: Batch,
    *,
    damping: float | Float[Array, ""],
    curvature: str | PyTree = "ekfac",
    curvature_batch: Batch | None = None,
    loss: LossLike = "cross_entropy",
    reduction: str = "mean",
    key: PRNGKeyArray | None = None,
    factored: bool = False,
    maxiter: int = 100,
    tol: float = 1e-6,
) -> PreconditionedQueries:
    """The preconditioned query gradients ``p_q = (C + λ I)⁻¹ ∇ℓ_q``, computed once.

    .. math::
        p_q = (C + λ I)^{-1} ∇ℓ_q, \\qquad C = \\text{the curvature of } L = κ \\sum_n ℓ_n
        \\text{ on the curvature batch.}

    Args:
      apply_fn: ``apply_fn(params, inputs) -> outputs [N, *P, C]``.
      params: parameter pytree.
      queries: the ``Q`` query examples, ``(inputs, targets)`` or ``(inputs, targets, weights)``.
      damping: ``λ ≥ 0``.
      curvature: ``"ekfac"`` (exact output factors without ``key``, Monte-Carlo ones with it),
        ``"kfac"`` (needs ``key``), ``"kflr"``, ``"ggn"`` / ``"hessian"`` (exact, conjugate
        gradients on :func:`curvjax.ggn_vp` / :func:`curvjax.hvp`), or a params-shaped tree of
        curvature blocks (or diagonals) you computed, for any curvjax curvature. The exact
        output factors backpropagate one vector per class (for a language model, per vocabulary
        entry and position): with many classes pass ``key`` (one sampled vector; on the
        notebook's 97-token LM, 4 s against 211 s).
      curvature_batch: the training examples ``C`` is estimated on (needed for a named
        curvature).
      loss: ``"cross_entropy"``, ``"mse"`` or a :class:`curvjax.losses.Loss`.
      reduction: the reduction of the loss whose curvature ``C`` is: ``"mean"`` (default),
        ``"sum"`` or ``"token_mean"``.
      key: PRNG key for the Monte-Carlo curvatures.
      factored: the factored Tikhonov damping for :class:`curvjax.KroneckerBlock` blocks (see
        :func:`curvjax.inverse_curvature_product`); the default is the exact ``(C + λ I)⁻¹``.
      maxiter, tol: conjugate-gradient budget and relative residual (``"ggn"``, ``"hessian"``).

    Returns:
      A :class:`PreconditionedQueries` ``(gradients, preconditioned, info)``.

    Raises:
      ValueError: a negative damping, an unknown curvature, a named curvature without
        ``curvature_batch``, or conjugate gradients that did not converge (with concrete values;
        under ``jit`` the queries that did not converge get NaN).

    Example:
      >>> import jax.numpy as jnp
      >>> from curvjax import influence
      >>> apply_fn = lambda p, x: x @ p["w"]
      >>> params = {"w": jnp.ones((4, 3)) / 4}
      >>> train = (jnp.eye(6, 4), jnp.array([0, 1, 2, 0, 1, 2]))
      >>> queries = (jnp.ones((2, 4)), jnp.array([0, 1]))
      >>> pq = influence.precondition(apply_fn, params, queries, damping=0.1,
      ...                             curvature_batch=train)
      >>> pq.preconditioned["w"].shape
      (2, 4, 3)

    References:
      Koh & Liang, "Understanding black-box predictions via influence functions", ICML 2017.
      Grosse et al., "Studying large language model generalization with influence functions",
      2023 (EK-FAC preconditioning).
    """
    solve.check_damping(damping)
    fitted = _fit(
        apply_fn, params, curvature, curvature_batch, loss=loss, reduction=reduction, key=key
    )
    if isinstance(fitted, str):
        if not isinstance(maxiter, int | np.integer) or maxiter < 1:
            raise ValueError(f"maxiter={maxiter!r}; give the most products, an integer ≥ 1.")
        if not isinstance(tol, jax.core.Tracer) and not float(tol) > 0:
            raise ValueError(f"tol={tol!r}; give the relative residual to reach, a number > 0.")
        step = _jitted(
            _cg_queries, apply_fn, name=fitted, loss=loss, reduction=reduction, maxiter=maxiter
        )
        grads, pre, info = step(params, queries, curvature_batch, damping, tol)
        converged = info.converged
        if not isinstance(converged, jax.core.Tracer):
            if not np.all(np.asarray(converged)):
                bad = np.flatnonzero(~np.asarray(converged)).tolist()
                raise ValueError(
                    f"conjugate gradients did not converge for queries {bad} (residual norms "
                    f"{(np.asarray(info.residual_norm)[bad]).tolist()} after "
                    f"{np.asarray(info.iterations)[bad].tolist()} products"
                    + (
                        ", non-positive curvature met: C + λ I is not positive definite"
                        if np.any(np.asarray(info.negative_curvature))
                        else ""
                    )
                    + f"); raise maxiter (now {maxiter}) or the damping (now {damping!r})."
                )
        else:
            pre = jax.tree.map(
                lambda x: jnp.where(
                    converged.reshape(converged.shape + (1,) * (x.ndim - 1)), x, jnp.nan
                ),
                pre,
            )
        return PreconditionedQueries(grads, pre, info)

    step = _jitted(_block_queries, apply_fn, loss=loss, factored=factored)
    grads, pre = step(params, queries, fitted, damping)
    return PreconditionedQueries(grads, pre, None)


# ------------------------------------------------------------------------------- training side


def _float_entries(p: backprop.Pass, tree) -> list:
    """The entries of a params-shaped ``tree`` (``None`` allowed) at the float leaves."""
    flat = p.model.param_tree.flatten_up_to(tree)
    return [flat[i] for i in p.model.float_index]


def _float_paths(p: backprop.Pass) -> list[str]:
    paths = [jax.tree_util.keystr(path) for path, _ in _leaves_with_path(p.params)]
    return [paths[i] for i in p.model.float_index]


def _leaves_with_path(params):
    return jax.tree_util.tree_flatten_with_path(params)[0]


def _check_batch(batch, where: str):
    if not isinstance(batch, tuple | list) or len(batch) not in (2, 3):
        raise ValueError(
            f"{where} must be (inputs, targets) or (inputs, targets, weights), got a "
            f"{type(batch).__name__}; `train_batches` is an iterable of batches (for one batch "
            "pass `[batch]`)."
        )


def _check_preconditioned(preconditioned):
    if not isinstance(preconditioned, PreconditionedQueries):
        raise TypeError(
            "`preconditioned` must be the PreconditionedQueries returned by "
            f"influence.precondition, got {type(preconditioned).__name__}."
        )


def batch_scores(
    apply_fn: ApplyFn,
    params: PyTree,
    preconditioned: PreconditionedQueries,
    batch: Batch,
    *,
    loss: LossLike = "cross_entropy",
    per_layer: bool = False,
) -> Float[Array, "Q N"] | dict[str, Float[Array, "Q N"]]:
    """The influence scores of one training batch: ``I(q, m) = p_qᵀ ∇ℓ_m``, ``[Q, N]``.

    The pure function :func:`scores` maps (jitted) over the batches: one forward and one backward
    pass of the batch, then per parameter tap the output tangent in the direction ``p_q``
    contracted with the stored cotangent of ``ℓ_m`` (no ``[N, D]`` per-example gradients; see
    the module docstring for kernels shared over positions).

    Args:
      apply_fn: ``apply_fn(params, inputs) -> outputs [N, *P, C]`` (examples independent).
      params: parameter pytree.
      preconditioned: from :func:`precondition`.
      batch: ``(inputs, targets)`` or ``(inputs, targets, weights)``.
      loss: the loss of :func:`precondition`.
      per_layer: return a dict leaf path -> ``[Q, N]`` (one term per float leaf, summing to
        the total).

    Returns:
      ``[Q, N]``, or with ``per_layer`` a dict ``jax.tree_util.keystr`` path -> ``[Q, N]``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from curvjax import influence
      >>> apply_fn = lambda p, x: x @ p["w"]
      >>> params = {"w": jnp.ones((4, 3)) / 4}
      >>> train = (jnp.eye(6, 4), jnp.array([0, 1, 2, 0, 1, 2]))
      >>> pq = influence.precondition(apply_fn, params, train, damping=0.1,
      ...                             curvature="kflr", curvature_batch=train)
      >>> influence.batch_scores(apply_fn, params, pq, train).shape
      (6, 6)

    References:
      Grosse et al., "Studying large language model generalization with influence functions",
      2023.
    """
    _check_preconditioned(preconditioned)
    _check_batch(batch, "`batch`")
    p = backprop.run(apply_fn, params, batch, loss=loss, reduction="sum")
    directions = _float_entries(p, preconditioned.preconditioned)
    values = leafwise.direction_inner_products(p, directions, per_leaf=per_layer)
    if not per_layer:
        return values
    return dict(zip(_float_paths(p), values, strict=True))


def _stream(step, train_batches, per_layer: bool):
    parts = []
    for i, batch in enumerate(train_batches):
        _check_batch(batch, f"training batch {i}")
        parts.append(step(batch))
    if not parts:
        raise ValueError("`train_batches` is empty: give at least one training batch.")
    if per_layer:
        return {k: jnp.concatenate([part[k] for part in parts], axis=-1) for k in parts[0]}
    return jnp.concatenate(parts, axis=-1)


def scores(
    apply_fn: ApplyFn,
    params: PyTree,
    queries: Batch | PreconditionedQueries,
    train_batches: Iterable[Batch],
    *,
    damping: float | Float[Array, ""] | None = None,
    curvature: str | PyTree = "ekfac",
    curvature_batch: Batch | None = None,
    loss: LossLike = "cross_entropy",
    reduction: str = "mean",
    key: PRNGKeyArray | None = None,
    factored: bool = False,
    per_layer: bool = False,
    maxiter: int = 100,
    tol: float = 1e-6,
) -> Float[Array, "Q M"] | dict[str, Float[Array, "Q M"]]:
    """Influence scores of every training example on every query: ``[num_queries, num_train]``.

    .. math::
        I(q, m) = ∇ℓ_q^⊤ (C + λ I)^{-1} ∇ℓ_m ,

    positive for a helpful training example (the module :mod:`curvjax.influence` states the
    conventions). The query gradients are preconditioned once (:func:`precondition`, or pass its
    result as ``queries``); the training batches are streamed, each through the jitted
    :func:`batch_scores` (one compilation per batch shape), without per-example gradients.

    Args:
      apply_fn: ``apply_fn(params, inputs) -> outputs [N, *P, C]`` (examples independent:
        models with batch statistics are refused).
      params: parameter pytree.
      queries: the query batch, or the :class:`PreconditionedQueries` of :func:`precondition`
        (then ``damping`` and the curvature arguments are not used).
      train_batches: an iterable of training batches ``(inputs, targets[, weights])`` (a list or a
        generator); their examples are the columns, in order.
      damping, curvature, curvature_batch, reduction, key, factored, maxiter, tol: as for
        :func:`precondition`.
      loss: ``"cross_entropy"``, ``"mse"`` or a :class:`curvjax.losses.Loss`.
      per_layer: per-leaf scores ``p_{q,k}ᵀ ∇_k ℓ_m`` (their sum over leaves ``k`` is the total).

    Returns:
      ``[Q, M]`` with ``M`` the training examples of all batches, or with ``per_layer`` a dict
      ``jax.tree_util.keystr`` leaf path -> ``[Q, M]``.

    Example:
      >>> import jax.numpy as jnp
      >>> from curvjax import influence
      >>> apply_fn = lambda p, x: x @ p["w"]
      >>> params = {"w": jnp.ones((4, 3)) / 4}
      >>> train = (jnp.eye(6, 4), jnp.array([0, 1, 2, 0, 1, 2]))
      >>> queries = (jnp.ones((2, 4)), jnp.array([0, 1]))
      >>> s = influence.scores(apply_fn, params, queries, [train, train], damping=0.1,
      ...                      curvature_batch=train)
      >>> s.shape
      (2, 12)

    References:
      Koh & Liang, "Understanding black-box predictions via influence functions", ICML 2017.
      Grosse et al., "Studying large language model generalization with influence functions",
      2023.
    """
    if not isinstance(queries, PreconditionedQueries):
        queries = precondition(
            apply_fn,
            params,
            queries,
            damping=damping,
            curvature=curvature,
            curvature_batch=curvature_batch,
            loss=loss,
            reduction=reduction,
            key=key,
            factored=factored,
            maxiter=maxiter,
            tol=tol,
        )
    step = _jitted(batch_scores, apply_fn, loss=loss, per_layer=per_layer)
    return _stream(lambda batch: step(params, queries, batch), train_batches, per_layer)


#: ``fn`` -> ``jax.jit(fn)`` with ``apply_fn`` and the keyword options static (see :func:`_jitted`)
_COMPILED: dict = {}


def _jitted(fn, apply_fn, **static):
    """``fn(apply_fn, *args, **static)`` jitted; compiled once per ``apply_fn`` and options when
    they are hashable (repeated calls reuse the compilation), else once per call."""
    try:
        hash((apply_fn, *static.values()))
    except TypeError:
        return jax.jit(functools.partial(fn, apply_fn, **static))
    if fn not in _COMPILED:
        _COMPILED[fn] = jax.jit(fn, static_argnums=0, static_argnames=tuple(static))
    compiled = _COMPILED[fn]
    return lambda *args, **kwargs: compiled(apply_fn, *args, **kwargs, **static)


# ------------------------------------------------------------------------------- self-influence


def _kronecker_self(p, k, tap, root) -> jax.Array | None:
    """``Σ ((Q_Aᵀ ⊗ Q_Bᵀ) g_m)² / (s + λ)`` from ``a`` and ``b`` rotated into the eigenbasis, or
    ``None`` when ``root`` is not a Kronecker root in the tap's canonical layout."""
    if root.kind != "kronecker":
        return None
    form = rules.bilinear_form(tap, p.acts[tap.id], p.columns_of_gradient()[tap.id])
    if not np.array_equal(leafwise.canonical_index(p, tap, k, form), root.index):
        return None
    a = jnp.einsum("ngti,gij->ngtj", form.a, root.a_vectors.astype(form.a.dtype))
    b = jnp.einsum("ngto,gop->ngtp", form.b[:, 0], root.b_vectors.astype(form.b.dtype))
    weight = (root.std**2).astype(a.dtype)  # 1 / (s + λ), [G, I, O]
    n, g, t, i = a.shape
    o = b.shape[-1]
    if t == 1:
        return jnp.einsum("ngi,ngo,gio->n", a[:, :, 0] ** 2, b[:, :, 0] ** 2, weight)

    def rotated(ab):
        grads = jnp.einsum("ngti,ngto->ngio", *ab)
        return jnp.einsum("ngio,gio->n", grads**2, weight)

    return chunking.chunked_map(rotated, (a, b), chunking.chunk_size(n, g * i * o))


def _self_from_directions(p, k, block, damping, factored) -> jax.Array:
    """``‖Rᵀ g_m‖²`` with ``R Rᵀ = (C_k + λ I)⁻¹``: the columns of ``R`` as directions."""
    leaf = p.model.float_leaves(p.params)[k]
    root = block.damped_inverse_sqrt(damping, factored=factored)
    columns = root.to_dense().T.reshape(-1, *jnp.shape(leaf))  # [D noise, *leaf]
    directions = [None] * len(p.model.float_index)
    directions[k] = columns
    inner = leafwise.direction_inner_products(p, directions)  # [D, N]
    return jnp.sum(inner**2, axis=0)


def batch_self_influence(
    apply_fn: ApplyFn,
    params: PyTree,
    curvature: PyTree,
    batch: Batch,
    *,
    damping: float | Float[Array, ""],
    loss: LossLike = "cross_entropy",
    factored: bool = False,
    per_layer: bool = False,
) -> Float[Array, " N"] | dict[str, Float[Array, " N"]]:
    """Self-influence ``∇ℓ_mᵀ (C + λ I)⁻¹ ∇ℓ_m`` of one training batch for block curvatures.

    Per leaf ``k`` with block ``C_k`` (the sum over leaves is the total):

    * Kronecker and EKFAC blocks of a dense or convolution kernel: ``a`` and ``b`` are rotated
      into the eigenbasis ``Q_A ⊗ Q_B`` and ``Σ_{i,o} ((Q_Aᵀ G_m Q_B)_{io})² / (s_{io} + λ)``
      (``s`` the block's eigenvalues; ``G_m = Σ_t a_{m,t} b_{m,t}ᵀ`` formed in the rotated basis
      a chunk of examples at a time where positions share the weight, never for ``T = 1``);
    * other leaves of at most 1024 entries (biases, normalisation scales): ``‖Rᵀ ∇_kℓ_m‖²``
      with ``R Rᵀ = (C_k + λ I)⁻¹``, the columns of ``R`` contracted with the taps like query
      directions;
    * larger leaves without a Kronecker eigenbasis (embeddings, tied or transformed weights)
      fall back to per-example gradients ``[N, *leaf.shape]`` and ``⟨g, (C_k + λ I)⁻¹ g⟩``.

    Args:
      apply_fn, params, batch, loss: as for :func:`batch_scores`.
      curvature: a params-shaped tree of blocks (or diagonals).
      damping: ``λ ≥ 0``.
      factored: the factored Tikhonov damping for :class:`curvjax.KroneckerBlock` blocks.
      per_layer: a dict leaf path -> ``[N]`` instead of the total.

    Returns:
      ``[N]``, or a dict ``jax.tree_util.keystr`` leaf path -> ``[N]``.

    Example:
      >>> import jax.numpy as jnp, curvjax
      >>> from curvjax import influence
      >>> apply_fn = lambda p, x: x @ p["w"]
      >>> params = {"w": jnp.ones((4, 3)) / 4}
      >>> train = (jnp.eye(6, 4), jnp.array([0, 1, 2, 0, 1, 2]))
      >>> blocks = curvjax.kflr(apply_fn, params, train)
      >>> influence.batch_self_influence(apply_fn, params, blocks, train, damping=0.1).shape
      (6,)

    References:
      Grosse et al., "Studying large language model generalization with influence functions",
      2023.
    """
    _check_batch(batch, "`batch`")
    p = backprop.run(apply_fn, params, batch, loss=loss, reduction="sum")
    n = p.model.num_examples
    entries = _float_entries_blocks(p, curvature)
    leaves = p.model.float_leaves(p.params)
    dtype = jnp.promote_types(p.outputs.dtype, jnp.float32)
    result: list = [jnp.zeros((n,), dtype) for _ in leaves]
    large = []
    for k, entry in enumerate(entries):
        block = blocks.as_block(entry)
        if block is None:
            raise ValueError(
                f"`curvature` has no block at leaf {_float_paths(p)[k]}: pass a curvature "
                "computed for the same parameters."
            )
        block.check_leaf(f"leaf {_float_paths(p)[k]}", leaves[k])
        if not p.model.taps_of_leaf[k]:
            continue  # an unused leaf: zero gradient
        tap = leafwise.fast_tap_of(p.model, k)
        if tap is not None:
            value = _kronecker_self(
                p, k, tap, block.damped_inverse_sqrt(damping, factored=factored)
            )
            if value is not None:
                result[k] = value.astype(dtype)
                continue
        if block.size <= DIRECTIONS_LIMIT:
            result[k] = _self_from_directions(p, k, block, damping, factored).astype(dtype)
        else:
            large.append((k, block))
    if large:
        grads = leafwise.per_example_grads(p)
        for k, block in large:
            g = grads[k]
            solved = jax.vmap(
                lambda x, block=block: block.damped_solve(x, damping, factored=factored)
            )(g)
            result[k] = jnp.sum((g * solved).reshape(n, -1), axis=1).astype(dtype)
    if per_layer:
        return dict(zip(_float_paths(p), result, strict=True))
    return sum(result[1:], result[0])


def _float_entries_blocks(p, curvature) -> list:
    is_entry = lambda x: x is None or blocks.is_block(x)  # noqa: E731
    try:
        flat = p.model.param_tree.flatten_up_to(
            jax.tree.map(lambda x: x, curvature, is_leaf=is_entry)
        )
    except (ValueError, TypeError) as error:
        raise ValueError(
            f"`curvature` must be a pytree like `params` of blocks or diagonals: {error}"
        ) from None
    return [flat[i] for i in p.model.float_index]


def _cg_self_influence(
    apply_fn,
    params,
    batch,
    curvature_batch,
    damping,
    tol,
    *,
    curvature,
    loss,
    reduction,
    maxiter,
    per_layer,
):
    """Self-influence for the exact curvature: per-example gradients, one CG solve each."""
    p = backprop.run(apply_fn, params, batch, loss=loss, reduction="sum")
    grads = leafwise.per_example_grads(p)  # list over float leaves, [N, *leaf]
    g_tree = p.model.unflatten_float(grads)
    solved, info = _cg_each(
        apply_fn, params, curvature_batch, g_tree, damping, tol, curvature, loss, reduction, maxiter
    )
    solved = _float_entries(p, solved)
    n = p.model.num_examples
    parts = [jnp.sum((g * s).reshape(n, -1), axis=1) for g, s in zip(grads, solved, strict=True)]
    parts = [jnp.where(info.converged, x, jnp.nan) for x in parts]
    if per_layer:
        return dict(zip(_float_paths(p), parts, strict=True)), info
    return sum(parts[1:], parts[0]), info


def self_influence(
    apply_fn: ApplyFn,
    params: PyTree,
    train_batches: Iterable[Batch],
    *,
    damping: float | Float[Array, ""],
    curvature: str | PyTree = "ekfac",
    curvature_batch: Batch | None = None,
    loss: LossLike = "cross_entropy",
    reduction: str = "mean",
    key: PRNGKeyArray | None = None,
    factored: bool = False,
    per_layer: bool = False,
    maxiter: int = 100,
    tol: float = 1e-6,
) -> Float[Array, " M"] | dict[str, Float[Array, " M"]]:
    """Self-influence of every training example: ``I(m, m) = ∇ℓ_mᵀ (C + λ I)⁻¹ ∇ℓ_m``.

    .. math::
        I(m, m) = ∇ℓ_m^⊤ (C + λ I)^{-1} ∇ℓ_m \\;\\ge 0 \\quad (C \\succeq 0),

    large for examples the model finds surprising or memorises (mislabelled data, outliers).
    Block curvatures are evaluated per leaf as :func:`batch_self_influence` describes (Kronecker
    and EKFAC kernels in their eigenbasis, without per-example gradients); the exact ``"ggn"`` /
    ``"hessian"`` forms each example's gradient and solves one conjugate-gradient system per
    example (costly: for small models and checks). Batches are streamed, each jitted.

    Args:
      apply_fn, params, loss: as for :func:`scores`.
      train_batches: an iterable of training batches (for one batch pass ``[batch]``).
      damping, curvature, curvature_batch, reduction, key, factored, maxiter, tol: as for
        :func:`precondition`.
      per_layer: a dict leaf path -> ``[M]`` (per-leaf terms ``∇_kℓ_mᵀ [(C + λ I)⁻¹ ∇ℓ_m]_k``,
        summing to the total).

    Returns:
      ``[M]`` over the examples of all batches, or a dict ``jax.tree_util.keystr`` path -> ``[M]``.

    Raises:
      ValueError: as :func:`precondition`; for ``"ggn"`` / ``"hessian"`` also when conjugate
        gradients did not converge for some example (with concrete values; NaN under ``jit``).

    Example:
      >>> import jax.numpy as jnp
      >>> from curvjax import influence
      >>> apply_fn = lambda p, x: x @ p["w"]
      >>> params = {"w": jnp.ones((4, 3)) / 4}
      >>> train = (jnp.eye(6, 4), jnp.array([0, 1, 2, 0, 1, 2]))
      >>> influence.self_influence(apply_fn, params, [train], damping=0.1,
      ...                          curvature_batch=train).shape
      (6,)

    References:
      Koh & Liang, "Understanding black-box predictions via influence functions", ICML 2017.
      Grosse et al., "Studying large language model generalization with influence functions",
      2023.
    """
    solve.check_damping(damping)
    fitted = _fit(
        apply_fn, params, curvature, curvature_batch, loss=loss, reduction=reduction, key=key
    )
    if isinstance(fitted, str):
        step = _jitted(
            _cg_self_influence,
            apply_fn,
            curvature=fitted,
            loss=loss,
            reduction=reduction,
            maxiter=maxiter,
            per_layer=per_layer,
        )

        def checked(batch):
            values, info = step(params, batch, curvature_batch, damping, tol)
            if not np.all(np.asarray(info.converged)):
                bad = np.flatnonzero(~np.asarray(info.converged)).tolist()
                raise ValueError(
                    f"conjugate gradients did not converge for training examples {bad} of a "
                    f"batch; raise maxiter (now {maxiter}) or the damping (now {damping!r})."
                )
            return values

        return _stream(checked, train_batches, per_layer)
    step = _jitted(
        batch_self_influence, apply_fn, loss=loss, factored=factored, per_layer=per_layer
    )
    return _stream(
        lambda batch: step(params, fitted, batch, damping=damping), train_batches, per_layer
    )


# ------------------------------------------------------------------------------- ranking


def top_k(scores: Float[Array, "Q M"], k: int) -> TopK:
    """The ``k`` most and least influential training examples per query.

    Args:
      scores: ``[Q, M]`` from :func:`scores` (the total, not the per-layer dict).
      k: how many, ``1 ≤ k ≤ M``.

    Returns:
      A :class:`TopK` ``(most, most_scores, least, least_scores)``, each ``[Q, k]``: the indices
      of the highest scores (most helpful), highest first, and of the lowest (most harmful),
      lowest first.

    Example:
      >>> import jax.numpy as jnp
      >>> from curvjax import influence
      >>> result = influence.top_k(jnp.array([[0.5, -2.0, 3.0, 0.1]]), 2)
      >>> result.most.tolist(), result.least.tolist()
      ([[2, 0]], [[1, 3]])

    References:
      Koh & Liang, "Understanding black-box predictions via influence functions", ICML 2017.
    """
    if isinstance(scores, dict):
        raise TypeError(
            "top_k ranks the total scores [Q, M]; for per-layer scores pass one entry, "
            "e.g. top_k(per_layer[path], k), or sum them."
        )
    scores = jnp.asarray(scores)
    if scores.ndim != 2:
        raise ValueError(f"scores must be [num_queries, num_train], got shape {scores.shape}.")
    if not isinstance(k, int | np.integer) or not 1 <= k <= scores.shape[1]:
        raise ValueError(f"k={k!r}; give an integer with 1 ≤ k ≤ {scores.shape[1]} (num_train).")
    most_scores, most = jax.lax.top_k(scores, int(k))
    neg_scores, least = jax.lax.top_k(-scores, int(k))
    return TopK(most, most_scores, least, -neg_scores)
