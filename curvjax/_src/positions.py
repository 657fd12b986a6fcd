"""The loss of whole examples: per-position losses summed with weights, and the reduction.

A model's outputs are ``[N, *P, C]``: ``N`` examples, positions ``P`` (none for a classifier,
``[T]`` for a sequence model, ``[H, W]`` for a segmentation map) and ``C`` outputs per position.
A :class:`~curvjax.losses.Loss` describes one position; the loss of example ``n`` sums its
positions with weights ``w_{n,p}`` (a 0/1 padding mask or real non-negative weights, default 1):

.. math::
    ℓ_n = \\sum_p w_{n,p} \\, ℓ(f_{n,p}, y_{n,p}), \\qquad L = κ \\sum_n ℓ_n ,

with ``κ = 1`` (``"sum"``), ``1/N`` (``"mean"``) or ``1 / Σ_{n,p} w_{n,p}`` (``"token_mean"``, the
loss a language-model trainer writes as ``(loss * mask).sum() / mask.sum()``). The output Hessian
of ``ℓ_n`` is block diagonal over positions, ``⊕_p w_{n,p} S_{n,p} S_{n,p}^⊤``, so the exact columns
of example ``n`` are ``|P| · K`` vectors ``√(κ w_{n,p}) S_{n,p} e_k`` each living at one position,
and the Monte-Carlo columns sample one target per position at once (the columns of different
positions have mean zero and are independent, so the cross-position terms vanish in expectation).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from curvjax._src import losses as losses_lib

Array = jax.Array

REDUCTIONS = ("mean", "sum", "token_mean")


def _is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def split_batch(batch) -> tuple[Any, Any, Any]:
    """``(inputs, targets, weights or None)`` of a batch ``(inputs, targets[, weights])``."""
    if not isinstance(batch, tuple | list) or len(batch) not in (2, 3):
        raise ValueError(
            "`batch` must be (inputs, targets) or (inputs, targets, weights), got "
            + type(batch).__name__
            + (f" of length {len(batch)}" if isinstance(batch, tuple | list) else "")
            + "; pass a tuple such as `(x, y)` (weights [N] or [N, *P] as a third entry)."
        )
    return batch[0], batch[1], batch[2] if len(batch) == 3 else None


def batch_size(inputs) -> int:
    """``N``, the leading axis shared by every leaf of ``inputs`` (at least one example)."""
    shapes = [tuple(jnp.shape(a)) for a in jax.tree.leaves(inputs)]
    if not shapes:
        raise ValueError(
            "`inputs` (batch[0]) contains no arrays; pass an array [N, ...] or a pytree of them."
        )
    if any(not s for s in shapes):
        raise ValueError(
            f"every leaf of `inputs` (batch[0]) needs a leading batch axis N, got shapes {shapes}; "
            "add the axis (`x[None]` for one example) or move values shared by all examples "
            "into `params` or into `apply_fn`."
        )
    sizes = sorted({s[0] for s in shapes})
    if len(sizes) != 1:
        raise ValueError(
            f"the leaves of `inputs` (batch[0]) disagree on the batch size N: shapes {shapes}; "
            "give every leaf one row per example, and move values shared by all examples into "
            "`params` or into `apply_fn`."
        )
    if sizes[0] == 0:
        raise ValueError(
            f"the batch is empty (N = 0): `inputs` (batch[0]) has shapes {shapes}; pass at least "
            "one example."
        )
    return sizes[0]


def check_finite(name: str, tree) -> None:
    """Raise if a concrete floating-point leaf of ``tree`` holds NaN or Inf (no-op under jit)."""
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        if not _is_concrete(leaf) or not jnp.issubdtype(jnp.result_type(leaf), jnp.inexact):
            continue
        if not np.all(np.isfinite(np.asarray(leaf))):
            raise ValueError(
                f"{name}{jax.tree_util.keystr(path)} contains NaN or Inf; curvjax would return "
                "NaN quantities. Check the data and the parameters: drop or impute the "
                "non-finite entries (a padded example needs finite values and weight 0 in "
                "batch[2])."
            )


def check_key(key, needed_by: str) -> None:
    """Raise unless ``key`` is one PRNG key (``needed_by`` names what samples with it)."""
    if key is None:
        raise ValueError(f"{needed_by} need `key=jax.random.key(...)`.")
    if not _is_key(key):
        raise TypeError(
            "`key` must be a PRNG key from `jax.random.key(seed)` (or a legacy "
            f"`jax.random.PRNGKey(seed)`), got {_describe(key)}; "
            "for a seed use `key=jax.random.key(seed)`."
        )


class Columns(NamedTuple):
    """``count`` output-cotangent columns made a chunk at a time.

    Attributes:
      count: the number ``M`` of columns.
      make: ``make(index [m]) -> [N, m, *P, C]``, the columns of the 1-based indices ``index``
        (index 0 makes a zero column, for padding).
    """

    count: int
    make: Any


class Objective(NamedTuple):
    """The reduced loss ``L = κ Σ_n Σ_p w_{n,p} ℓ(f_{n,p}, y_{n,p})`` of one batch.

    Attributes:
      loss: the per-position :class:`~curvjax.losses.Loss`.
      scale: ``κ`` (a scalar; traced for ``"token_mean"`` under ``jit``).
      targets: the targets, every leaf ``[N, *P, ...]``.
      weights: ``[N, *P]`` position weights.
      positions: the shape ``P``.
    """

    loss: losses_lib.Loss
    scale: Any
    targets: Any
    weights: Array
    positions: tuple

    # -- per example, on flattened positions ------------------------------------------------
    def _flat(self, f, y, w):
        q = math.prod(self.positions)
        return (
            f.reshape(q, f.shape[-1]),
            jax.tree.map(lambda t: t.reshape(q, *t.shape[len(self.positions) :]), y),
            w.reshape(q),
        )

    def _example_value(self, f, y, w):
        f, y, w = self._flat(f, y, w)
        return jnp.sum(w * jax.vmap(self.loss.value)(f, y))

    def _example_factors(self, f, y, w, signed=False):
        """``[|P|, C, K]``: ``√w_p S_p`` per position, on flattened positions (and the signs
        ``[|P|, K]`` of the exact output Hessian's factor when ``signed``)."""
        f, y, w = self._flat(f, y, w)
        if signed:
            s, signs = jax.vmap(self.loss.signed_hessian_factor)(f, y)
        else:
            s, signs = jax.vmap(self.loss.hessian_factor)(f, y), None
        return (jnp.sqrt(w)[:, None, None] * s).astype(f.dtype), signs

    def _example_columns(self, f, y, w, signed=False):
        """``[|P| K, *P, C]``: ``√w_p S_p e_k`` at position ``p`` (and the signs ``[|P| K]`` of
        the exact output Hessian's factor when ``signed``)."""
        s, signs = self._example_factors(f, y, w, signed)
        q, c, k = s.shape
        cols = jnp.einsum("pck,pr->pkrc", s, jnp.eye(q, dtype=s.dtype)).reshape(q * k, *f.shape)
        return (cols, signs.reshape(q * k).astype(f.dtype)) if signed else cols

    def _example_mc(self, key, f, w, mc_samples):
        """``[M, *P, C]``: one sampled target per position and column, ``√(w_p / M)`` scaled."""
        shape = f.shape
        q = math.prod(self.positions)
        keys = jax.random.split(key, q)
        flat_f, w = f.reshape(q, shape[-1]), w.reshape(q)
        s = jax.vmap(lambda kk, ff: self.loss.mc_factor(kk, ff, mc_samples))(keys, flat_f)
        s = (jnp.sqrt(w)[:, None, None] * s).astype(f.dtype)  # [Q, C, M]
        return jnp.moveaxis(s, -1, 0).reshape(mc_samples, *shape)

    def _example_hessian_times(self, f, y, w, u):
        shape = f.shape
        f, y, w = self._flat(f, y, w)
        u = u.reshape(f.shape)

        def one(fp, yp, wp, up):
            return wp * self.loss.factor_times(fp, yp, up)

        return jax.vmap(one)(f, y, w, u).reshape(shape)

    # -- the batch ------------------------------------------------------------------------
    def per_example(self, outputs: Array) -> Array:
        """``[N]``: ``ℓ_n`` (without ``κ``)."""
        return jax.vmap(self._example_value)(outputs, self.targets, self.weights)

    def value(self, outputs: Array) -> Array:
        """``L = κ Σ_n ℓ_n``."""
        return self.scale * jnp.sum(self.per_example(outputs))

    def output_grads(self, outputs: Array) -> Array:
        """``[N, *P, C]``: ``∇_{f_n} (κ ℓ_n)``."""
        grads = jax.vmap(jax.grad(self._example_value))(outputs, self.targets, self.weights)
        return (self.scale * grads).astype(outputs.dtype)

    def factor_columns(self, outputs: Array) -> Array:
        """``[N, |P| K, *P, C]``: the columns of ``√κ ⊕_p √w_{n,p} S_{n,p}``."""
        cols = jax.vmap(self._example_columns)(outputs, self.targets, self.weights)
        return (jnp.sqrt(self.scale) * cols).astype(outputs.dtype)

    def exact_columns(self, outputs: Array):
        """:meth:`factor_columns`, as an array without positions and as :class:`Columns` made a
        chunk at a time with positions (all at once they would hold ``N |P|² K C`` numbers)."""
        if not self.positions:
            return self.factor_columns(outputs)
        n, q, c = outputs.shape[0], math.prod(self.positions), outputs.shape[-1]

        def factors(f, y, w):  # [Q K, C]: √w_p S_p e_k, indexed p K + k
            return jnp.swapaxes(self._example_factors(f, y, w)[0], 1, 2).reshape(-1, c)

        flat = jax.vmap(factors)(outputs, self.targets, self.weights)  # [N, Q K, C]
        flat = (jnp.sqrt(self.scale) * flat).astype(outputs.dtype)
        k = flat.shape[1] // q

        def make(index):
            j = jnp.maximum(index - 1, 0)
            vals = flat[:, j] * (index > 0).astype(flat.dtype)[None, :, None]  # [N, m, C]
            where = jax.nn.one_hot(j // k, q, dtype=flat.dtype)  # [m, Q]
            cols = vals[:, :, None, :] * where[None, :, :, None]  # [N, m, Q, C]
            return cols.reshape(n, index.shape[0], *self.positions, c)

        return Columns(q * k, make)

    def signed_columns(self, outputs: Array) -> tuple[Array, Array]:
        """``([N, |P| K, *P, C], signs [N, |P| K])``: columns ``u`` and signs ``d`` of the exact
        output Hessian, ``Σ_k d_k u_k u_kᵀ = κ ⊕_p w_{n,p} ∇²ℓ_{n,p}`` (equal to
        :meth:`factor_columns` with ``d = 1`` unless the loss's factor is a positive-semidefinite
        surrogate, e.g. ``gaussian_nll``)."""
        fn = lambda f, y, w: self._example_columns(f, y, w, signed=True)  # noqa: E731
        cols, signs = jax.vmap(fn)(outputs, self.targets, self.weights)
        return (jnp.sqrt(self.scale) * cols).astype(outputs.dtype), signs

    def mc_columns(self, key, outputs: Array, mc_samples: int) -> Array:
        """``[N, M, *P, C]`` Monte-Carlo columns, ``E[S̃ S̃ᵀ] = κ ⊕_p w_{n,p} ∇²ℓ_{n,p}``."""
        check_key(key, "Monte-Carlo quantities")
        if not isinstance(mc_samples, int) or mc_samples < 1:
            raise ValueError(f"`mc_samples` must be a positive integer, got {mc_samples!r}.")
        keys = jax.random.split(key, outputs.shape[0])
        sample = lambda k, f, w: self._example_mc(k, f, w, mc_samples)  # noqa: E731
        cols = jax.vmap(sample)(keys, outputs, self.weights)
        return (jnp.sqrt(self.scale) * cols).astype(outputs.dtype)

    def hessian_times(self, outputs: Array, u: Array) -> Array:
        """``[N, *P, C]``: ``κ ⊕_p w_{n,p} ∇²ℓ_{n,p} u_{n,p}`` (the GGN's loss-Hessian step)."""
        h_u = jax.vmap(self._example_hessian_times)(outputs, self.targets, self.weights, u)
        return (self.scale * h_u).astype(outputs.dtype)


def _is_key(key) -> bool:
    if not isinstance(key, jax.Array):
        return False
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        return key.shape == ()
    return key.dtype == jnp.uint32 and key.shape == (2,)


def _describe(x) -> str:
    if hasattr(x, "dtype") and hasattr(x, "shape"):
        return f"an array of dtype {x.dtype} and shape {tuple(x.shape)}"
    return f"{type(x).__name__} {x!r}"


def _broadcast_weights(weights, n: int, positions: tuple, dtype):
    if weights is None:
        return jnp.ones((n, *positions), dtype)
    shape = jnp.shape(weights)
    if shape not in ((n,), (n, *positions)):
        raise ValueError(
            f"the weights (batch[2]) must have shape [N] = {(n,)} or [N, *P] = "
            f"{(n, *positions)} for outputs of shape [N, *P, C], got {shape}."
        )
    if not jnp.issubdtype(jnp.result_type(weights), jnp.number):
        raise ValueError(f"the weights (batch[2]) must be numbers, got dtype {weights.dtype}.")
    if _is_concrete(weights):
        w = np.asarray(weights)
        if not np.all(np.isfinite(w)) or np.any(w < 0):
            raise ValueError(
                "the weights (batch[2]) must be finite and non-negative (0 masks a position)."
            )
    weights = jnp.asarray(weights, dtype)
    return jnp.broadcast_to(
        weights.reshape(shape + (1,) * (1 + len(positions) - len(shape))), (n, *positions)
    )


def reduction_scale(reduction: str, weights: Array):
    """``κ`` for ``reduction`` given the ``[N, *P]`` weights."""
    if reduction == "mean":
        return 1.0 / weights.shape[0]
    if reduction == "sum":
        return 1.0
    if reduction == "token_mean":
        if _is_concrete(weights) and not np.any(np.asarray(weights) > 0):
            raise ValueError(
                "reduction='token_mean' divides by the sum of the weights, which is 0 here "
                "(every position is masked)."
            )
        # under jit an all-masked batch cannot raise: κ = 0 makes its loss and every quantity 0,
        # as a trainer's `(loss * mask).sum() / max(mask.sum(), 1)` does, instead of 0/0 = NaN
        total = jnp.sum(weights)
        return jnp.where(total > 0, 1.0 / jnp.where(total > 0, total, 1.0), 0.0)
    raise ValueError(
        f"unsupported reduction {reduction!r}: use 'mean' (over examples), 'sum' or "
        "'token_mean' (over weighted positions)."
    )


def objective(loss, reduction: str, outputs_struct, targets, weights=None) -> Objective:
    """The :class:`Objective` of a batch, with its targets and weights checked.

    Args:
      loss: a loss name or :class:`~curvjax.losses.Loss` (of one position).
      reduction: ``"mean"``, ``"sum"`` or ``"token_mean"``.
      outputs_struct: the shape and dtype of the outputs ``[N, *P, C]``.
      targets: a pytree whose leaves are ``[N, *P, ...]``.
      weights: ``None``, ``[N]`` or ``[N, *P]``.
    """
    loss_fn = losses_lib.resolve(loss)
    shape = tuple(outputs_struct.shape)
    if len(shape) < 2:
        raise ValueError(
            f"the model's outputs must be [N, C] or [N, *positions, C], got shape {shape}; "
            "keep a trailing output axis in apply_fn (`out[:, None]` for one output per example)."
        )
    n, positions = shape[0], shape[1:-1]
    leaves = jax.tree.leaves(targets)
    if not leaves:
        raise ValueError("`targets` (batch[1]) contains no arrays.")
    for leaf in leaves:
        if tuple(jnp.shape(leaf)[: 1 + len(positions)]) != (n, *positions):
            raise ValueError(
                f"the targets' leading axes must be [N, *P] = {(n, *positions)} (the batch size "
                f"N of the inputs and the positions P of the outputs [N, *P, C] = {shape}), got "
                f"targets of shape {jnp.shape(leaf)}; give one target per example (and position)."
            )
    w = _broadcast_weights(weights, n, positions, outputs_struct.dtype)
    scale = reduction_scale(reduction, w)
    if loss_fn.check_targets is not None and all(_is_concrete(t) for t in leaves):
        _check_valid_targets(loss_fn, shape, outputs_struct.dtype, targets, w, weights)
    elif loss_fn.check_targets is not None and losses_lib.checks_abstract_targets(loss_fn):
        # under jit: the targets' shapes and dtypes (their values are not known)
        rows = n * math.prod(positions)
        abstract = jax.tree.map(
            lambda t: jax.ShapeDtypeStruct(
                (rows, *jnp.shape(t)[1 + len(positions) :]), jnp.result_type(t)
            ),
            targets,
        )
        loss_fn.check_targets(
            jax.ShapeDtypeStruct((rows, shape[-1]), outputs_struct.dtype), abstract
        )
    return Objective(loss_fn, scale, targets, w, positions)


def _check_valid_targets(loss_fn, shape, dtype, targets, w, weights) -> None:
    """The loss's target check on the positions that count (weight ≠ 0, when known)."""
    n, positions, c = shape[0], shape[1:-1], shape[-1]
    rank = 1 + len(positions)
    if weights is not None and _is_concrete(weights):
        keep = np.asarray(w).reshape(-1) != 0
    else:
        keep = np.ones(n * math.prod(positions), bool)
    flat = jax.tree.map(lambda t: np.asarray(t).reshape(-1, *np.shape(t)[rank:])[keep], targets)
    loss_fn.check_targets(jax.ShapeDtypeStruct((int(keep.sum()), c), dtype), flat)


def placeholder_batch(apply_fn, params, inputs) -> tuple[Any, Array]:
    """``(inputs, zero labels [N, *P])``: a batch for tracing a model's layout (cross-entropy)."""
    out = jax.eval_shape(apply_fn, params, inputs)
    return inputs, jnp.zeros(out.shape[:-1], jnp.int32)
