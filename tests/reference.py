"""Independent dense references for the exactness tests (never calls curvjax).

Everything here is built from the plainest JAX transformations (``jax.grad``, ``jax.vmap``,
``jax.jacrev``) on the reduced loss of SPEC.md section 1, in float64:

* ``L = (1/N) sum_n l_n`` (``reduction="mean"``) or ``sum_n l_n`` (``"sum"``); ``kappa = 1/N`` or 1.
* ``l_n`` is softmax cross-entropy with integer labels (``loss="cross_entropy"``) or
  ``||f_n - y_n||^2`` summed over the outputs (``loss="mse"``, so ``H_n = 2 I``).
* ``g_n`` is the contribution of example n to ``grad L``: ``kappa * grad l_n``, ``sum_n g_n = grad L``.

Non-float parameter leaves (e.g. an int32 index stored in ``params``) are held fixed: nothing is
differentiated with respect to them.  Every params-shaped result has ``None`` at the position of a
non-float leaf (``None`` is an empty pytree, so such results have fewer leaves than ``params``);
use :func:`float_leaves` to compare any params-shaped result, whatever it holds at non-float
positions, against a reference.  Flat vectors and matrices (``flatten_float``, ``ggn_matrix``,
``hessian_matrix``) use ``jax.flatten_util.ravel_pytree`` order over the float leaves only.

All functions take ``(apply_fn, params, batch, loss="cross_entropy", reduction="mean")`` (the
last two positional or keyword) with ``batch = (inputs, targets)``.  The ones that differentiate
(``reduced_loss``, ``grad``, ``per_example_grads(_flat)``, ``output_jacobian``, ``loss_hessians``,
``ggn_matrix``, ``hessian_matrix``) are wrapped in ``jax.jit`` with ``apply_fn``, ``loss`` and
``reduction`` static (so ``apply_fn`` must be hashable; the zoo's are, and ``get_case`` keeps them
identical between calls) and compiled with :data:`FAST_COMPILE`: eager op-by-op evaluation of these
nested transformations is far slower on CPU than one compilation, and for these tiny programs
XLA's CPU backend spends more time optimising than running.  Called on tracers (inside your own
``jax.jit`` / ``vmap``) they are inlined instead; ``<function>.eager`` is the plain version.  The
cheap post-processing (``batch_l2``, ``sum_grad_squared``, ``variance``, ``ggn_diag``,
``hessian_diag``) runs in numpy when its input is concrete and in ``jnp`` when traced, so it costs
no extra compilation; results are always ``jax.Array`` leaves.

Second derivatives use reverse-over-reverse (``jacrev(jacrev)``), so ``custom_vjp`` models work.
The references for per-example quantities evaluate ``apply_fn`` on one example at a time
(``x_n[None]``), so they are meaningless for models that mix examples (BatchNorm with batch
statistics); ``grad``, ``ggn_matrix`` and ``hessian_matrix`` evaluate the whole batch and are fine.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

LOSSES = ("cross_entropy", "mse")
REDUCTIONS = ("mean", "sum")


#: XLA options for the reference programs: LLVM at -O0 roughly halves the compile time of these
#: tiny programs and does not change float semantics.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _traced(*trees) -> bool:
    return any(isinstance(a, jax.core.Tracer) for a in jax.tree.leaves(trees))


def _jit(fun):
    """``jax.jit`` with ``apply_fn`` / ``loss`` / ``reduction`` static; ``.eager`` is ``fun``.

    Called on tracers (inside the caller's own ``jit`` / ``vmap``, or from another reference),
    ``fun`` is inlined instead: ``compiler_options`` are only allowed on a top-level ``jit``.
    """
    names = [n for n in ("apply_fn", "loss", "reduction") if n in fun.__code__.co_varnames]
    jitted = jax.jit(fun, static_argnames=names, compiler_options=FAST_COMPILE)

    @functools.wraps(fun)
    def wrapper(*args, **kwargs):
        return (fun if _traced(args, kwargs) else jitted)(*args, **kwargs)

    wrapper.eager = fun
    return wrapper


def _xp(*arrays):
    """numpy for concrete arrays (no compilation), ``jax.numpy`` when any is a tracer."""
    return jnp if _traced(arrays) else np


def _as_jax(tree):
    return jax.tree.map(jnp.asarray, tree)


# ---------------------------------------------------------------------------------------------
# float / non-float leaves


def is_float(x: Any) -> bool:
    """Whether a leaf is a floating-point array (the leaves we differentiate)."""
    return hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating)


def float_mask(params: Any) -> list[bool]:
    """For each leaf of ``params`` (``jax.tree.leaves`` order): is it a float leaf?"""
    return [is_float(leaf) for leaf in jax.tree.leaves(params)]


def float_leaves(tree: Any, params: Any) -> list[Any]:
    """The entries of the params-shaped ``tree`` at the float-leaf positions of ``params``.

    ``tree`` must have the structure of ``params`` down to its leaves; at a leaf position it may
    hold anything (an array with extra leading axes, ``None``, a ``float0`` array, ...).  Entries
    at non-float positions are dropped, so references and curvjax results compare leaf by leaf
    whatever either returns for non-float leaves.
    """
    treedef = jax.tree.structure(params)
    subtrees = treedef.flatten_up_to(tree)
    return [s for s, keep in zip(subtrees, float_mask(params), strict=True) if keep]


def float_paths(params: Any) -> list[str]:
    """``jax.tree_util.keystr`` of each float leaf, in :func:`float_leaves` order."""
    leaves = jax.tree_util.tree_leaves_with_path(params)
    return [jax.tree_util.keystr(path) for path, leaf in leaves if is_float(leaf)]


def _split(params: Any) -> tuple[Any, Callable[[Any], Any]]:
    """``(floats, merge)``: ``floats`` is ``params`` with ``None`` at non-float leaves, and
    ``merge(floats)`` puts the fixed non-float leaves back."""
    leaves, treedef = jax.tree.flatten(params)
    mask = float_mask(params)
    floats = treedef.unflatten([x if m else None for x, m in zip(leaves, mask, strict=True)])

    def merge(new_floats: Any) -> Any:
        new = treedef.flatten_up_to(new_floats)
        merged = [n if m else x for n, x, m in zip(new, leaves, mask, strict=True)]
        return treedef.unflatten(merged)

    return floats, merge


def flatten_float(params: Any) -> tuple[jax.Array, Callable[[jax.Array], Any]]:
    """Ravel the float leaves of ``params`` into one vector.

    Returns ``(flat, unravel)``: ``flat`` has shape ``[D]`` (D = number of float entries);
    ``unravel(v)`` is the full ``params`` pytree with the float leaves taken from ``v`` and the
    non-float leaves held at their values in ``params`` (ready to pass to ``apply_fn``).
    """
    floats, merge = _split(params)
    flat, unravel_floats = ravel_pytree(floats)
    return flat, lambda v: merge(unravel_floats(v))


def unflatten_float(vector: jax.Array, params: Any) -> Any:
    """Inverse of ``flatten_float(params)[0]`` for a result: params-shaped, ``None`` at
    non-float leaves."""
    xp = _xp(vector)
    vector = xp.asarray(vector)
    leaves, treedef = jax.tree.flatten(params)
    pieces = iter(float_slices(params))
    out = [xp.reshape(vector[next(pieces)], x.shape) if is_float(x) else None for x in leaves]
    return _as_jax(treedef.unflatten(out))


def float_slices(params: Any) -> list[slice]:
    """The slice of the flat vector owned by each float leaf (:func:`float_leaves` order)."""
    slices, start = [], 0
    for leaf in jax.tree.leaves(params):
        if is_float(leaf):
            slices.append(slice(start, start + leaf.size))
            start += leaf.size
    return slices


# ---------------------------------------------------------------------------------------------
# losses


def _check(loss: str, reduction: str) -> None:
    if loss not in LOSSES:
        raise ValueError(f"loss={loss!r}; expected one of {LOSSES}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction={reduction!r}; expected one of {REDUCTIONS}")


def per_example_loss(loss: str, outputs_n: jax.Array, target_n: jax.Array) -> jax.Array:
    """``l(f_n, y_n)`` for one example: ``outputs_n`` ``[C]``, ``target_n`` an int label
    (cross-entropy) or ``[C]`` (mse, ``sum_c (f_c - y_c)^2``).  Returns a scalar."""
    if loss == "cross_entropy":
        return optax.softmax_cross_entropy_with_integer_labels(outputs_n, target_n)
    if loss == "mse":
        return jnp.sum((outputs_n - target_n) ** 2)
    raise ValueError(f"loss={loss!r}; expected one of {LOSSES}")


def kappa(n: int, reduction: str) -> float:
    """The reduction factor: ``1/N`` for ``"mean"``, ``1`` for ``"sum"``."""
    return 1.0 / n if reduction == "mean" else 1.0


def _batch_size(inputs: Any) -> int:
    return jax.tree.leaves(inputs)[0].shape[0]


def _losses(outputs: jax.Array, targets: jax.Array, loss: str) -> jax.Array:
    return jax.vmap(lambda f, y: per_example_loss(loss, f, y))(outputs, targets)


@_jit
def reduced_loss(apply_fn, params, batch, loss="cross_entropy", reduction="mean") -> jax.Array:
    """``L``: the mean (or sum) over the batch of the per-example losses."""
    _check(loss, reduction)
    inputs, targets = batch
    losses = _losses(apply_fn(params, inputs), targets, loss)
    return kappa(losses.shape[0], reduction) * jnp.sum(losses)


# ---------------------------------------------------------------------------------------------
# first order


@_jit
def grad(apply_fn, params, batch, loss="cross_entropy", reduction="mean") -> Any:
    """``grad L`` (``jax.grad`` of :func:`reduced_loss`); ``None`` at non-float leaves."""
    floats, merge = _split(params)
    return jax.grad(lambda f: reduced_loss(apply_fn, merge(f), batch, loss, reduction))(floats)


@_jit
def per_example_grads(apply_fn, params, batch, loss="cross_entropy", reduction="mean") -> Any:
    """``g_n = kappa * grad l_n``, each leaf ``[N, *leaf.shape]``; ``None`` at non-float leaves.

    ``l_n`` is evaluated on the single example ``x_n[None]`` (vmapped over n).
    """
    _check(loss, reduction)
    inputs, targets = batch
    scale = kappa(_batch_size(inputs), reduction)
    floats, merge = _split(params)

    def loss_n(f, x_n, y_n):
        x_batch = jax.tree.map(lambda a: a[None], x_n)
        return scale * per_example_loss(loss, apply_fn(merge(f), x_batch)[0], y_n)

    return jax.vmap(jax.grad(loss_n), in_axes=(None, 0, 0))(floats, inputs, targets)


@_jit
def per_example_grads_flat(apply_fn, params, batch, loss="cross_entropy", reduction="mean"):
    """``[N, D]``: row n is ``g_n`` flattened, from the Jacobian of the vector of per-example
    losses of the whole batch (a second, batch-level construction of :func:`per_example_grads`)."""
    _check(loss, reduction)
    inputs, targets = batch
    flat, unravel = flatten_float(params)
    scale = kappa(_batch_size(inputs), reduction)
    return jax.jacrev(lambda v: scale * _losses(apply_fn(unravel(v), inputs), targets, loss))(flat)


def _per_example_statistic(statistic):
    """A reference computed leaf by leaf from :func:`per_example_grads` (numpy when concrete)."""

    @functools.wraps(statistic)
    def reference(apply_fn, params, batch, loss="cross_entropy", reduction="mean") -> Any:
        g = per_example_grads(apply_fn, params, batch, loss, reduction)
        xp = _xp(g)
        return _as_jax(jax.tree.map(lambda a: statistic(xp, xp.asarray(a)), g))

    return reference


@_per_example_statistic
def batch_l2(xp, g):
    """``||g_n||^2`` per leaf, leaves ``[N]``; ``None`` at non-float leaves."""
    return xp.sum(xp.reshape(g, (g.shape[0], -1)) ** 2, axis=1)


@_per_example_statistic
def sum_grad_squared(xp, g):
    """``sum_n g_n^2`` elementwise, leaves like ``params``; ``None`` at non-float leaves."""
    return xp.sum(g**2, axis=0)


@_per_example_statistic
def variance(xp, g):
    """``(1/N) sum_n g_n^2 - ((1/N) sum_n g_n)^2`` elementwise; ``None`` at non-float leaves."""
    return xp.mean(g**2, axis=0) - xp.mean(g, axis=0) ** 2


# ---------------------------------------------------------------------------------------------
# second order


@_jit
def output_jacobian(apply_fn, params, batch) -> jax.Array:
    """``J`` of shape ``[N, C, D]``: ``d f_{n,c} / d theta`` over the flat float params."""
    inputs, _ = batch
    flat, unravel = flatten_float(params)
    return jax.jacrev(lambda v: apply_fn(unravel(v), inputs))(flat)


@_jit
def loss_hessians(apply_fn, params, batch, loss="cross_entropy") -> jax.Array:
    """``H_n = d^2 l_n / d f_n^2`` of shape ``[N, C, C]`` (``jax.hessian`` w.r.t. the outputs)."""
    inputs, targets = batch
    outputs = apply_fn(params, inputs)
    hess = jax.hessian(lambda f, y: per_example_loss(loss, f, y))
    return jax.vmap(hess)(outputs, targets)


@_jit
def ggn_matrix(apply_fn, params, batch, loss="cross_entropy", reduction="mean") -> jax.Array:
    """``G = kappa sum_n J_n^T H_n J_n``, ``[D, D]`` over the flat float params."""
    _check(loss, reduction)
    jac = output_jacobian(apply_fn, params, batch)
    hess = loss_hessians(apply_fn, params, batch, loss)
    return kappa(jac.shape[0], reduction) * jnp.einsum("nci,ncd,ndj->ij", jac, hess, jac)


@_jit
def hessian_matrix(apply_fn, params, batch, loss="cross_entropy", reduction="mean") -> jax.Array:
    """``d^2 L / d theta^2``, ``[D, D]`` over the flat float params (reverse-over-reverse)."""
    flat, unravel = flatten_float(params)
    fun = lambda v: reduced_loss(apply_fn, unravel(v), batch, loss, reduction)
    return jax.jacrev(jax.jacrev(fun))(flat)


def _diag(matrix: jax.Array, params: Any) -> Any:
    return unflatten_float(_xp(matrix).diagonal(matrix), params)


def ggn_diag(apply_fn, params, batch, loss="cross_entropy", reduction="mean") -> Any:
    """``diag(G)`` unravelled to the params pytree; ``None`` at non-float leaves."""
    return _diag(ggn_matrix(apply_fn, params, batch, loss, reduction), params)


def hessian_diag(apply_fn, params, batch, loss="cross_entropy", reduction="mean") -> Any:
    """``diag(d^2 L / d theta^2)`` unravelled to the params pytree; ``None`` at non-float leaves."""
    return _diag(hessian_matrix(apply_fn, params, batch, loss, reduction), params)
