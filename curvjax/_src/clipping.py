"""Per-example gradient clipping from one forward and one backward pass (book-keeping).

With ``ĝ_n = ∇ℓ_n`` the gradient of example ``n``'s unscaled loss, the clipped sum of
differentially private training is

.. math::
    \\bar g = \\sum_n \\min\\Big(1, \\frac{c}{\\lVert ĝ_n \\rVert}\\Big) ĝ_n .

It never forms ``ĝ_n``: the per-example norms come from the taps as for ``batch_l2`` (outer
products, the Gram identity or chunked materialisation, whichever is cheaper per layer), and the
clipped sum is, per tap, one more contraction of the stored activations ``a_n`` and output
cotangents ``b_n`` with the cotangents scaled by the clipping factors ``s_n`` (for a dense layer
``Σ_n s_n a_nᵀ b_n``): the book-keeping method of Bu et al. (2023). Groups of parameters (per layer,
or groups the user names) are clipped to their own norms, each group with its own factors.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from curvjax._src import leafwise
from curvjax._src.backprop import Pass


class ClippedGrad(NamedTuple):
    """The result of :func:`curvjax.clipped_grad`.

    Attributes:
      grad: ``Σ_n min(1, c / ‖ĝ_n‖) ĝ_n``, a pytree like ``params`` (``None`` at non-float
        leaves); with groups, each group's leaves are clipped with that group's factors.
      norms: ``‖ĝ_n‖`` ``[N]`` (one global norm); with ``groups="leaf"`` a pytree like
        ``params`` of ``[N]``; with labelled groups a dict label -> ``[N]``.
      clipped_fraction: the fraction of the examples with a positive weight whose norm exceeds
        the clipping norm; a scalar, or per group in the layout of ``norms``.
    """

    grad: Any
    norms: Any
    clipped_fraction: Any


def _groups(p: Pass, groups) -> tuple[list[int], list[Hashable]]:
    """``(group index of each float leaf, the group labels)``."""
    model = p.model
    num_float = len(model.float_index)
    if groups is None:
        return [0] * num_float, [None]
    if isinstance(groups, str):
        if groups != "leaf":
            raise ValueError(
                f"clipped_grad: groups={groups!r}; use None (one global norm), 'leaf' (each "
                "parameter leaf its own group) or a pytree like params with a label per leaf."
            )
        return list(range(num_float)), list(range(num_float))
    labels, structure = jax.tree.flatten(groups)
    if structure != model.param_tree:
        raise ValueError(
            "clipped_grad: `groups` must be a pytree with the structure of `params` and one "
            f"hashable label per leaf; got {structure}, params have {model.param_tree}."
        )
    float_labels = [labels[i] for i in model.float_index]
    order = list(dict.fromkeys(float_labels))
    return [order.index(label) for label in float_labels], order


def _clip_norms(clip_norm, labels: list, groups) -> list:
    """The clipping norm of each group, checked positive where it is known."""
    if isinstance(clip_norm, Mapping):
        if groups is None or isinstance(groups, str):
            raise ValueError(
                "clipped_grad: a dict `clip_norm` needs labelled `groups` (a pytree like params "
                "with a label per leaf); give one number for groups=None or 'leaf'."
            )
        missing = [label for label in labels if label not in clip_norm]
        if missing:
            raise ValueError(
                f"clipped_grad: `clip_norm` has no entry for the groups {missing}; give one norm "
                "per label of `groups`."
            )
        norms = [clip_norm[label] for label in labels]
    else:
        norms = [clip_norm] * len(labels)
    for label, c in zip(labels, norms, strict=True):
        if c is None:
            raise ValueError("clipped_grad needs `clip_norm`, the clipping norm c > 0.")
        if not isinstance(c, jax.core.Tracer) and not np.all(np.asarray(c) > 0):
            where = "" if label is None else f" (group {label!r})"
            raise ValueError(f"clipped_grad: clip_norm{where} must be positive, got {c}.")
    return norms


def clip(p: Pass, clip_norm, groups=None) -> ClippedGrad:
    """The clipped sum of a pass's per-example gradients (see the module docstring).

    The pass may use any reduction: its per-example gradients ``g_n = κ ĝ_n`` are rescaled by
    ``1/κ``, so the result is that of the unscaled per-example losses.
    """
    group_of_leaf, labels = _groups(p, groups)
    limits = _clip_norms(clip_norm, labels, groups)
    kappa = p.objective.scale
    # 1/κ; κ = 0 only for an all-masked token-mean batch under jit, whose sums are all zero
    inverse = jnp.where(kappa > 0, 1.0 / jnp.where(kappa > 0, kappa, 1.0), 0.0)
    sq, kept = leafwise.sq_norms_keeping(p)  # ‖g_n‖² per float leaf, g_n = κ ĝ_n
    n = p.model.num_examples
    # norms and clipping factors in at least float32: a bfloat16 clip norm would round c itself
    dtype = jnp.promote_types(p.outputs.dtype, jnp.float32)
    real = jnp.any(p.objective.weights.reshape(n, -1) > 0, axis=1)
    count = jnp.maximum(jnp.sum(real), 1)
    norms, factors, fractions = [], [], []
    for group, limit in enumerate(limits):
        total = jnp.zeros((n,), dtype)
        for k, g in enumerate(group_of_leaf):
            if g == group:
                total = total + sq[k]
        norm = jnp.sqrt(total.astype(dtype)) * inverse
        limit = jnp.asarray(limit, dtype)
        over = norm > limit
        factor = jnp.where(over, limit / jnp.where(over, norm, 1), 1)
        norms.append(norm)
        factors.append(factor * inverse)  # the pass's cotangents are those of κ ℓ_n
        fractions.append(jnp.sum(over & real) / count)
    grads = leafwise.weighted_grad_sums(p, factors, group_of_leaf, skip=kept)
    for k, parts in kept.items():
        grads[k] = leafwise.kept_weighted_sum(p, k, parts, factors[group_of_leaf[k]])
    grad = p.model.unflatten_float(grads)
    if groups is None:
        return ClippedGrad(grad, norms[0], fractions[0])
    if isinstance(groups, str):
        return ClippedGrad(grad, p.model.unflatten_float(norms), p.model.unflatten_float(fractions))
    return ClippedGrad(
        grad, dict(zip(labels, norms, strict=True)), dict(zip(labels, fractions, strict=True))
    )
