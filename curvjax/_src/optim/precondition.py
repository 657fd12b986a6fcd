"""Curvature-preconditioned gradient descent (Dangel et al. 2020, eq. 27-29) as an optax transform."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from curvjax._src import extract as extract_lib
from curvjax._src import quantities
from curvjax._src.kronecker import DenseBlock, DiagonalBlock, KroneckerBlock
from curvjax._src.optim import linalg

BLOCKS = (KroneckerBlock, DenseBlock, DiagonalBlock)
QUANTITIES = quantities.curvature_names()


def is_block(x) -> bool:
    return isinstance(x, BLOCKS)


def leaf_name(path) -> str:
    return "params" + jax.tree_util.keystr(path)


def add_l2(grads, params, l2):
    """``∇L + η θ`` (``grads`` alone when ``η`` is the literal ``0``)."""
    if isinstance(l2, int | float) and l2 == 0:
        return grads
    if params is None:
        raise ValueError("`l2` > 0 needs `params` in `update(updates, state, params, ...)`.")
    return jax.tree.map(lambda g, p: g + l2 * p, grads, params)


def block_eigh(block):
    """What the damped inverse of ``block`` needs, independent of the damping.

    A :class:`~curvjax._src.optim.linalg.KroneckerEigh` for a Kronecker block, a
    :class:`~curvjax._src.optim.linalg.DenseEigh` for a dense block, the diagonal block itself, and
    ``None`` for ``None`` (non-float leaves).
    """
    if isinstance(block, KroneckerBlock):
        return linalg.kronecker_eigh(block.a, block.b, block.index)
    if isinstance(block, DenseBlock):
        return linalg.dense_eigh(block.matrix)
    return block


def apply_damped_inverse(inverse, vector: jax.Array, damping) -> jax.Array:
    """``(G + c I)⁻¹ v`` for one leaf, ``G`` given by :func:`block_eigh` (Kronecker: factored).

    ``inverse`` may also be a plain array (a diagonal curvature shaped like the leaf).
    """
    if inverse is None:
        return vector
    if isinstance(inverse, linalg.KroneckerEigh):
        g, i = inverse.a_values.shape
        shape = (g, i, inverse.b_values.shape[1])
        canon = linalg.to_canonical(vector, inverse.index, shape)
        solved = linalg.damped_kronecker_power(inverse, canon, damping)
        return linalg.from_canonical(solved, inverse.index, vector.shape)
    if isinstance(inverse, linalg.DenseEigh):
        return linalg.damped_dense_power(inverse, vector, damping)
    diagonal = inverse.diagonal if isinstance(inverse, DiagonalBlock) else inverse
    return vector / (diagonal.reshape(vector.shape) + damping)


def solve_damped(block, vector: jax.Array, damping) -> jax.Array:
    """``(G + c I)⁻¹ v`` for one leaf straight from ``block`` (Cholesky solves, no state)."""
    if isinstance(block, KroneckerBlock):
        shape = (block.a.shape[0], block.a.shape[1], block.b.shape[1])
        canon = linalg.to_canonical(vector, block.index, shape)
        solved = linalg.damped_kronecker_solve(block.a, block.b, canon, damping)
        return linalg.from_canonical(solved, block.index, vector.shape)
    if isinstance(block, DenseBlock):
        eye = jnp.eye(block.matrix.shape[0], dtype=block.matrix.dtype)
        factor = jax.scipy.linalg.cho_factor(block.matrix + damping * eye)
        return jax.scipy.linalg.cho_solve(factor, vector.reshape(-1)).reshape(vector.shape)
    return apply_damped_inverse(block, vector, damping)


def check_leaf(name: str, leaf, block) -> None:
    """Raise a ``ValueError`` naming the leaf if ``block`` cannot be a curvature of ``leaf``."""
    size = int(jnp.size(leaf))
    if isinstance(block, KroneckerBlock):
        if block.index.shape != (size,):
            raise ValueError(
                f"`curvature` for {name} is a KroneckerBlock over {block.index.shape[0]} entries, "
                f"the leaf has {size}: compute the curvature for the same parameters."
            )
    elif isinstance(block, DenseBlock):
        if block.matrix.shape != (size, size):
            raise ValueError(
                f"`curvature` for {name} is a DenseBlock of shape {block.matrix.shape}, the leaf "
                f"has {size} entries."
            )
    elif block is not None:
        diagonal = block.diagonal if isinstance(block, DiagonalBlock) else block
        if jnp.shape(diagonal) != jnp.shape(leaf):
            raise ValueError(
                f"`curvature` for {name} has shape {jnp.shape(diagonal)}, the leaf "
                f"{jnp.shape(leaf)}: pass a diagonal shaped like the parameters or curvjax blocks."
            )


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
    for (path, leaf), block in zip(paths_leaves, blocks, strict=True):
        check_leaf(leaf_name(path), leaf, block)
    return blocks


def compute_curvature(quantity, apply_fn, params, batch, key, *, loss, reduction, mc_samples):
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
    )
    return out[quantity]


def precondition_by_curvature(
    damping=1e-3,
    l2=0.0,
    *,
    quantity: str | None = None,
    apply_fn: Callable | None = None,
    loss="cross_entropy",
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
    * ``None`` (non-float leaves): the update passes through unchanged.

    Negative entries of ``hessian_diag`` are used as they are (no clipping): choose ``λ`` so that
    ``G + λ + η`` stays positive.

    **Two ways to call ``update``** (both inside the caller's ``jax.jit``):

    * *one pass* — ``update(grads, state, params, curvature=G)`` with ``grads`` and ``G`` from one
      :func:`curvjax.extract` call (``out["grad"]``, ``out["kfac"]``);
    * *convenience* — ``update(grads, state, params, batch=batch, key=key)``: the transform
      computes ``quantity`` itself (needs ``quantity=`` and ``apply_fn=`` here; ``key`` for the
      Monte-Carlo quantities ``ggn_diag_mc`` and ``kfac``).

    Args:
      damping: ``λ ≥ 0`` (a float or a traced scalar).
      l2: ``η ≥ 0``, the strength of the ℓ2 regularisation ``η/2 ||θ||²`` added to ``L``.
      quantity: for the convenience path, one of ``"ggn_diag"``, ``"ggn_diag_mc"``,
        ``"hessian_diag"``, ``"kfac"``, ``"kflr"``, ``"kfra"``.
      apply_fn: for the convenience path, ``apply_fn(params, inputs) -> outputs [N, C]``.
      loss: for the convenience path: ``"cross_entropy"``, ``"mse"`` or a
        :class:`curvjax.losses.Loss`.
      reduction: for the convenience path: ``"mean"`` or ``"sum"``.
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
            solve_damped(block, g, shift) for g, block in zip(leaves, blocks, strict=True)
        ]
        return jax.tree.unflatten(treedef, directions), state

    return optax.GradientTransformationExtraArgs(init, update)


def tree_vdot(x: Any, y: Any) -> jax.Array:
    """``Σ_leaves <x, y>``."""
    parts = [jnp.vdot(a, b) for a, b in zip(jax.tree.leaves(x), jax.tree.leaves(y), strict=True)]
    return sum(parts) if parts else jnp.zeros([])
