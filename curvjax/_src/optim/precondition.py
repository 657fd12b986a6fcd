# ruff: noqa: F722  (jaxtyping shape strings are not forward references)
"""Curvature-preconditioned gradient descent (Dangel et al. 2020, eq. 27-29) as an optax transform."""

from __future__ import annotations

import jax
import optax
from jaxtyping import Array, Float

from curvjax._src import blocks as blocks_lib
from curvjax._src import extract as extract_lib
from curvjax._src import quantities
from curvjax._src.typing import ApplyFn, LossLike

QUANTITIES = quantities.curvature_names()


def leaf_name(path) -> str:
    return "params" + jax.tree_util.keystr(path)


def add_l2(grads, params, l2):
    """``∇L + η θ`` (``grads`` alone when ``η`` is the literal ``0``)."""
    if isinstance(l2, int | float) and l2 == 0:
        return grads
    if params is None:
        raise ValueError("`l2` > 0 needs `params` in `update(updates, state, params, ...)`.")
    return jax.tree.map(lambda g, p: g + l2 * p, grads, params)


def check_scalar(name: str, value, *, positive: bool = False) -> None:
    """Raise if a concrete ``value`` is negative (or, with ``positive``, not positive).

    Traced values (inside ``jit``) are not checked.
    """
    if isinstance(value, jax.core.Tracer):
        return
    try:
        number = float(value)
    except (TypeError, ValueError):
        return
    if positive and not number > 0:
        raise ValueError(f"`{name}` must be positive, got {value}: pass a value > 0.")
    if not number >= 0:
        raise ValueError(f"`{name}` must be non-negative, got {value}: pass a value ≥ 0.")


def apply_damped_inverse(inverse, vector: jax.Array, damping) -> jax.Array:
    """``(G + c I)⁻¹ v`` for one leaf from a block or its eigendecomposed form (Kronecker: factored).

    ``None`` (non-float leaves) leaves ``v`` unchanged.
    """
    if inverse is None:
        return vector
    return inverse.damped_power(vector, damping)


def curvature_leaves(curvature, updates) -> list:
    """``curvature`` flattened to one entry per leaf of ``updates``, each checked."""
    paths_leaves, treedef = jax.tree_util.tree_flatten_with_path(updates)
    try:
        blocks = treedef.flatten_up_to(curvature)
    except (ValueError, TypeError) as err:
        raise ValueError(
            "`curvature` must have the structure of the parameters (a params-shaped tree of "
            f"arrays or curvjax blocks): {err}"
        ) from None
    blocks = [blocks_lib.as_block(block) for block in blocks]
    for (path, leaf), block in zip(paths_leaves, blocks, strict=True):
        if block is not None:
            block.check_leaf(leaf_name(path), leaf)
    return blocks


def compute_curvature(
    quantity, apply_fn, params, batch, key, *, loss, reduction, mc_samples, options=None
):
    """The convenience path: ``quantity`` of ``apply_fn`` at ``params`` on ``batch``."""
    if quantity is None:
        raise ValueError(
            "`update` got no `curvature`: pass `curvature=` (e.g. from `curvjax.extract`) or build "
            f"the transform with `quantity=` (one of {QUANTITIES}) and pass `batch=`."
        )
    if apply_fn is None:
        raise ValueError(
            "`update` got no `curvature`: pass `curvature=`, or build the transform with "
            "`apply_fn=` to compute it from `batch=`."
        )
    if batch is None:
        raise ValueError("`update` got neither `curvature` nor `batch`: pass one of them.")
    if params is None:
        raise ValueError("computing the curvature needs `params` in `update`.")
    out = extract_lib.extract(
        apply_fn,
        params,
        batch,
        (quantity,),
        loss=loss,
        reduction=reduction,
        key=key,
        mc_samples=mc_samples,
        options=options,
    )
    return out[quantity]


def precondition_by_curvature(
    damping: float | Float[Array, ""] = 1e-3,
    l2: float | Float[Array, ""] = 0.0,
    *,
    quantity: str | None = None,
    apply_fn: ApplyFn | None = None,
    loss: LossLike = "cross_entropy",
    reduction: str = "mean",
    mc_samples: int = 1,
) -> optax.GradientTransformationExtraArgs:
    """Precondition the gradient by a damped curvature approximation (BackPACK's optimizers).

    The update direction is

    .. math::
        d = \\big(G + (λ + η) I\\big)^{-1} \\big(∇L + η θ\\big),

    to be followed by ``optax.scale(-α)`` (or ``optax.scale_by_learning_rate``):
    ``θ ← θ - α d``. ``G`` is the curvature passed at each step, per parameter leaf:

    * a diagonal (``ggn_diag``, ``ggn_diag_mc``, ``hessian_diag``: arrays shaped like the leaves,
      or :class:`curvjax.DiagonalBlock`): ``d = (∇L + ηθ) / (G + λ + η)`` elementwise;
    * a :class:`curvjax.DenseBlock`: a Cholesky solve with ``G + (λ + η) I``;
    * a :class:`curvjax.KroneckerBlock` (``kfac``, ``kflr``, ``kfra``): ``A ⊗ B + (λ+η) I`` is
      replaced by the factored damping of Martens & Grosse (2015), per feature group ``g``,

      .. math::
          \\big(A_g + π_g \\sqrt{λ+η}\\, I\\big) ⊗ \\big(B_g + \\tfrac{\\sqrt{λ+η}}{π_g} I\\big),
          \\qquad π_g = \\sqrt{\\frac{\\operatorname{tr}(A_g)/\\dim A_g}
          {\\operatorname{tr}(B_g)/\\dim B_g}},

      solved with Cholesky factorisations of the two damped factors (in the block's canonical
      order, permuted back to the leaf with ``index``);
    * a :class:`curvjax.EigenKroneckerBlock` (``ekfac``): the exact damped inverse in its
      eigenbasis, ``(Q_A ⊗ Q_B) diag(1/(s + λ + η)) (Q_A ⊗ Q_B)ᵀ``;
    * ``None`` (non-float leaves): the update passes through unchanged.

    Negative entries of ``hessian_diag`` are used as they are (no clipping): choose ``λ`` so that
    ``G + λ + η`` stays positive. For Kronecker and dense blocks the damping of each factor is at
    least ``ε tr`` of the factor (``ε`` the machine epsilon of its dtype), the smallest shift a
    Cholesky factorisation in that dtype resolves: in float32 a tiny ``λ`` (say ``10⁻⁸``) on
    rank-deficient factors (fewer examples than inputs) gives finite directions.

    **Two ways to call ``update``** (both inside the caller's ``jax.jit``):

    * *one pass* — ``update(grads, state, params, curvature=G)`` with ``grads`` and ``G`` from one
      :func:`curvjax.extract` call (``out["grad"]``, ``out["kfac"]``);
    * *convenience* — ``update(grads, state, params, batch=batch, key=key)``: the transform
      computes ``quantity`` itself (needs ``quantity=`` and ``apply_fn=`` here; ``key`` for the
      Monte-Carlo quantities ``ggn_diag_mc``, ``kfac`` and ``ekfac``).

    Args:
      damping: ``λ ≥ 0`` (a float or a traced scalar).
      l2: ``η ≥ 0``, the strength of the ℓ2 regularisation ``η/2 ||θ||²`` added to ``L``.
      quantity: for the convenience path, one of ``"ggn_diag"``, ``"ggn_diag_mc"``,
        ``"hessian_diag"``, ``"kfac"``, ``"kflr"``, ``"kfra"``, ``"ekfac"`` (its Monte-Carlo
        basis).
      apply_fn: for the convenience path, ``apply_fn(params, inputs) -> outputs [N, C]``.
      loss: for the convenience path: ``"cross_entropy"``, ``"mse"`` or a
        :class:`curvjax.losses.Loss`.
      reduction: for the convenience path: ``"mean"``, ``"sum"`` or ``"token_mean"``.
      mc_samples: for the convenience path: Monte-Carlo samples per example.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` (state ``optax.EmptyState``) whose updates are
      ``d``, shaped like the parameters.

    Example:
      >>> import jax, jax.numpy as jnp, optax, curvjax
      >>> from curvjax.optim import precondition_by_curvature
      >>> apply_fn = lambda p, x: x @ p["w"] + p["b"][None, :]
      >>> params = {"w": jnp.zeros((4, 3)), "b": jnp.zeros(3)}
      >>> batch = (jnp.ones((8, 4)), jnp.arange(8) % 3)
      >>> opt = optax.chain(precondition_by_curvature(damping=1e-2), optax.scale(-0.1))
      >>> @jax.jit
      ... def step(params, state, batch):
      ...     out = curvjax.extract(apply_fn, params, batch, ["kflr"])  # one pass
      ...     updates, state = opt.update(out["grad"], state, params, curvature=out["kflr"])
      ...     return optax.apply_updates(params, updates), state
      >>> params, state = step(params, opt.init(params), batch)
      >>> params["w"].shape
      (4, 3)

    References:
      Dangel, Kunstner & Hennig, "BackPACK: Packing more into backprop", ICLR 2020, eq. 27-29;
      Martens & Grosse, "Optimizing neural networks with Kronecker-factored approximate
      curvature", ICML 2015, §6.3.
    """
    if quantity is not None and quantity not in QUANTITIES:
        raise ValueError(f"unknown `quantity` {quantity!r}; use one of {QUANTITIES}.")
    check_scalar("damping", damping)
    check_scalar("l2", l2)

    def init(params):
        del params
        return optax.EmptyState()

    def update(updates, state, params=None, *, curvature=None, batch=None, key=None, **extra):
        del extra
        if curvature is None:
            curvature = compute_curvature(
                quantity,
                apply_fn,
                params,
                batch,
                key,
                loss=loss,
                reduction=reduction,
                mc_samples=mc_samples,
            )
        shift = damping + l2
        grads = add_l2(updates, params, l2)
        leaves, treedef = jax.tree.flatten(grads)
        blocks = curvature_leaves(curvature, grads)
        directions = [
            g if block is None else block.damped_solve(g, shift)
            for g, block in zip(leaves, blocks, strict=True)
        ]
        return jax.tree.unflatten(treedef, directions), state

    return optax.GradientTransformationExtraArgs(init, update)
