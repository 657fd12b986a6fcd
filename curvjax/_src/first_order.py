"""First-order quantities: the gradient, per-example gradients and their statistics."""

from __future__ import annotations

from collections.abc import Hashable, Mapping

import jax
from jaxtyping import PyTree

from curvjax._src import clipping, products, quantities
from curvjax._src.typing import ApplyFn, Batch, LossLike


def grad(
    apply_fn: ApplyFn,
    params: PyTree,
    batch: Batch,
    *,
    loss: LossLike = "cross_entropy",
    reduction: str = "mean",
) -> PyTree:
    """Gradient of the reduced loss.

    .. math::
        ∇L, \\qquad L = κ \\sum_{n=1}^N ℓ(f(θ, x_n), y_n), \\quad κ = 1/N \\text{ (mean) or } 1
        \\text{ (sum)}.

    Args:
      apply_fn: ``apply_fn(params, inputs) -> outputs [N, C]``, any pure JAX function.
      params: parameter pytree.
      batch: ``(inputs, targets)`` or ``(inputs, targets, weights)``; ``inputs`` has a leading
        batch axis ``N``, targets ``[N, *P]`` (labels) or ``[N, *P, ...]``, weights ``[N]`` or
        ``[N, *P]`` (a padding mask or non-negative weights ``w_{n,p}``; default 1).
      loss: ``"cross_entropy"`` (integer labels), ``"mse"`` (``ℓ = ||f - y||²``) or a
        :class:`curvjax.losses.Loss`.
      reduction: ``"mean"``, ``"sum"`` or ``"token_mean"``.

    Returns:
      A pytree like ``params``; ``None`` at non-floating-point leaves.

    Example:
      >>> import jax, jax.numpy as jnp, curvjax
      >>> apply_fn = lambda p, x: x @ p["w"]
      >>> params = {"w": jnp.ones((4, 3))}
      >>> batch = (jnp.ones((5, 4)), jnp.array([0, 1, 2, 0, 1]))
      >>> jax.jit(curvjax.grad, static_argnums=0)(apply_fn, params, batch)["w"].shape
      (4, 3)
    """
    w = products.whole_batch(apply_fn, params, batch, loss, reduction)
    floats, reduced, to_tree = w.floats, w.reduced, w.to_tree
    return to_tree(jax.grad(reduced)(floats))


def per_example_grads(
    apply_fn: ApplyFn,
    params: PyTree,
    batch: Batch,
    *,
    loss: LossLike = "cross_entropy",
    reduction: str = "mean",
) -> PyTree:
    """Per-example gradient contributions (BackPACK's ``BatchGrad``).

    .. math::
        g_n = κ ∇_θ ℓ(f(θ, x_n), y_n), \\qquad \\sum_n g_n = ∇L .

    Args:
      apply_fn: ``apply_fn(params, inputs) -> outputs [N, C]``, any pure JAX function that treats
        examples independently (no batch statistics).
      params: parameter pytree; non-floating-point leaves are held fixed and get ``None``.
      batch: ``(inputs, targets)`` or ``(inputs, targets, weights)``; ``inputs`` has a leading
        batch axis ``N``, targets ``[N, *P]`` (labels) or ``[N, *P, ...]``, weights ``[N]`` or
        ``[N, *P]`` (a padding mask or non-negative weights ``w_{n,p}``; default 1).
      loss: ``"cross_entropy"``, ``"mse"`` or a :class:`curvjax.losses.Loss`.
      reduction: ``"mean"`` (``g_n = ∇ℓ_n / N``), ``"sum"`` (``g_n = ∇ℓ_n``) or
        ``"token_mean"`` (``g_n = ∇ℓ_n / Σ_{n,p} w_{n,p}``).

    Returns:
      A pytree like ``params`` with leaves of shape ``[N, *leaf.shape]``.

    Example:
      >>> import jax.numpy as jnp, curvjax
      >>> apply_fn = lambda p, x: x @ p["w"]
      >>> batch = (jnp.ones((5, 4)), jnp.array([0, 1, 2, 0, 1]))
      >>> curvjax.per_example_grads(apply_fn, {"w": jnp.ones((4, 3))}, batch)["w"].shape
      (5, 4, 3)

    References:
      Dangel, Kunstner & Hennig, "BackPACK: Packing more into backprop", ICLR 2020.
    """
    return quantities.compute_one(
        "per_example_grads", apply_fn, params, batch, loss=loss, reduction=reduction
    )


def batch_l2(
    apply_fn: ApplyFn,
    params: PyTree,
    batch: Batch,
    *,
    loss: LossLike = "cross_entropy",
    reduction: str = "mean",
) -> PyTree:
    """Squared norm of each example's gradient contribution, per leaf (``BatchL2Grad``).

    .. math::
        \\mathrm{batch\\_l2}[n] = \\lVert g_n \\rVert^2 .

    Dense layers use ``||g_n||² = ||a_n||² ||b_n||²``; weight-shared layers (convolutions,
    attention) the Gram identity or chunked per-example gradients, whichever costs less.

    Args:
      apply_fn: ``apply_fn(params, inputs) -> outputs [N, C]``, any pure JAX function that treats
        examples independently (no batch statistics).
      params: parameter pytree; non-floating-point leaves are held fixed and get ``None``.
      batch: ``(inputs, targets)`` or ``(inputs, targets, weights)``; ``inputs`` has a leading
        batch axis ``N``, targets ``[N, *P]`` (labels) or ``[N, *P, ...]``, weights ``[N]`` or
        ``[N, *P]`` (a padding mask or non-negative weights ``w_{n,p}``; default 1).
      loss: ``"cross_entropy"``, ``"mse"`` or a :class:`curvjax.losses.Loss`.
      reduction: ``"mean"`` (``g_n = ∇ℓ_n / N``), ``"sum"`` (``g_n = ∇ℓ_n``) or
        ``"token_mean"`` (``g_n = ∇ℓ_n / Σ_{n,p} w_{n,p}``).

    Returns:
      A pytree like ``params`` with leaves of shape ``[N]``.

    Example:
      >>> import jax.numpy as jnp, curvjax
      >>> apply_fn = lambda p, x: x @ p["w"]
      >>> batch = (jnp.ones((5, 4)), jnp.array([0, 1, 2, 0, 1]))
      >>> curvjax.batch_l2(apply_fn, {"w": jnp.ones((4, 3))}, batch)["w"].shape
      (5,)
    """
    return quantities.compute_one(
        "batch_l2", apply_fn, params, batch, loss=loss, reduction=reduction
    )


def sum_grad_squared(
    apply_fn: ApplyFn,
    params: PyTree,
    batch: Batch,
    *,
    loss: LossLike = "cross_entropy",
    reduction: str = "mean",
) -> PyTree:
    """Sum over examples of the squared gradient contributions (``SumGradSquared``).

    .. math::
        \\sum_n g_n \\odot g_n .

    Args:
      apply_fn: ``apply_fn(params, inputs) -> outputs [N, C]``, any pure JAX function that treats
        examples independently (no batch statistics).
      params: parameter pytree; non-floating-point leaves are held fixed and get ``None``.
      batch: ``(inputs, targets)`` or ``(inputs, targets, weights)``; ``inputs`` has a leading
        batch axis ``N``, targets ``[N, *P]`` (labels) or ``[N, *P, ...]``, weights ``[N]`` or
        ``[N, *P]`` (a padding mask or non-negative weights ``w_{n,p}``; default 1).
      loss: ``"cross_entropy"``, ``"mse"`` or a :class:`curvjax.losses.Loss`.
      reduction: ``"mean"`` (``g_n = ∇ℓ_n / N``), ``"sum"`` (``g_n = ∇ℓ_n``) or
        ``"token_mean"`` (``g_n = ∇ℓ_n / Σ_{n,p} w_{n,p}``).

    Returns:
      A pytree like ``params``.

    Example:
      >>> import jax.numpy as jnp, curvjax
      >>> apply_fn = lambda p, x: x @ p["w"]
      >>> batch = (jnp.ones((5, 4)), jnp.array([0, 1, 2, 0, 1]))
      >>> curvjax.sum_grad_squared(apply_fn, {"w": jnp.ones((4, 3))}, batch)["w"].shape
      (4, 3)
    """
    return quantities.compute_one(
        "sum_grad_squared", apply_fn, params, batch, loss=loss, reduction=reduction
    )


def variance(
    apply_fn: ApplyFn,
    params: PyTree,
    batch: Batch,
    *,
    loss: LossLike = "cross_entropy",
    reduction: str = "mean",
) -> PyTree:
    """Elementwise population variance of the gradient contributions (``Variance``).

    .. math::
        \\frac{1}{N} \\sum_n g_n \\odot g_n - \\Big(\\frac{1}{N} \\sum_n g_n\\Big)^{\\odot 2} .

    Args:
      apply_fn: ``apply_fn(params, inputs) -> outputs [N, C]``, any pure JAX function that treats
        examples independently (no batch statistics).
      params: parameter pytree; non-floating-point leaves are held fixed and get ``None``.
      batch: ``(inputs, targets)`` or ``(inputs, targets, weights)``; ``inputs`` has a leading
        batch axis ``N``, targets ``[N, *P]`` (labels) or ``[N, *P, ...]``, weights ``[N]`` or
        ``[N, *P]`` (a padding mask or non-negative weights ``w_{n,p}``; default 1).
      loss: ``"cross_entropy"``, ``"mse"`` or a :class:`curvjax.losses.Loss`.
      reduction: ``"mean"`` (``g_n = ∇ℓ_n / N``), ``"sum"`` (``g_n = ∇ℓ_n``) or
        ``"token_mean"`` (``g_n = ∇ℓ_n / Σ_{n,p} w_{n,p}``).

    Returns:
      A pytree like ``params``.

    Example:
      >>> import jax.numpy as jnp, curvjax
      >>> apply_fn = lambda p, x: x @ p["w"]
      >>> batch = (jnp.ones((5, 4)), jnp.array([0, 1, 2, 0, 1]))
      >>> curvjax.variance(apply_fn, {"w": jnp.ones((4, 3))}, batch)["w"].shape
      (4, 3)
    """
    return quantities.compute_one(
        "variance", apply_fn, params, batch, loss=loss, reduction=reduction
    )


def clipped_grad(
    apply_fn: ApplyFn,
    params: PyTree,
    batch: Batch,
    *,
    clip_norm: float | Mapping[Hashable, float],
    loss: LossLike = "cross_entropy",
    groups: None | str | PyTree = None,
) -> clipping.ClippedGrad:
    """Sum of the per-example gradients clipped to norm ``c``, without per-example gradients.

    .. math::
        \\bar g = \\sum_n \\min\\Big(1, \\frac{c}{\\lVert ĝ_n \\rVert}\\Big) ĝ_n,
        \\qquad ĝ_n = ∇_θ ℓ_n = ∇_θ \\sum_p w_{n,p} ℓ(f_{n,p}, y_{n,p}) ,

    the clipped sum of DP-SGD (add noise and divide by the expected batch size with
    :func:`curvjax.optim.dp_aggregate`). One forward and one backward pass: the norms come from
    the taps as for :func:`batch_l2` (no ``N × D`` memory for dense and convolution layers), and
    the clipped sum is one more contraction per tap of its stored activations and the cotangents
    scaled by ``min(1, c/‖ĝ_n‖)`` (the book-keeping method). Exact: the same numbers as
    ``vmap(grad)`` followed by clipping and summing.

    With ``groups``, each group of parameters is clipped to its own norm: ``"leaf"`` makes every
    parameter leaf a group; a pytree like ``params`` with a hashable label per leaf makes the
    leaves with equal labels one group (e.g. one label per layer), and ``clip_norm`` may then be
    a dict label -> norm (the sensitivity of the sum is ``sqrt(Σ_γ c_γ²)``).

    Per-example weights ``w_n`` (``batch = (inputs, targets, weights)``) scale each example's loss
    before clipping, so a 0/1 mask pads a fixed-size batch (Poisson subsampling): padded examples
    contribute nothing and count in no statistic, and under ``jit`` a different number of real
    examples does not recompile. Models that mix examples (batch statistics) are refused.

    Norms and clipping factors are computed in at least float32. For a model that computes in
    bfloat16, layers whose clipped sum is contracted from the stored activations sum over the
    examples in bfloat16, so ``‖clip(ĝ_n)‖ ≤ c`` holds to bfloat16's relative precision (about
    ``2⁻⁸``): for a privacy guarantee, lower ``c`` by that margin in the noise calibration or
    compute the clipping in float32.

    Args:
      apply_fn: ``apply_fn(params, inputs) -> outputs [N, *P, C]``, any pure JAX function that
        treats examples independently.
      params: parameter pytree; non-floating-point leaves are held fixed and get ``None``.
      batch: ``(inputs, targets)`` or ``(inputs, targets, weights)`` (weights ``[N]`` or
        ``[N, *P]``).
      clip_norm: the clipping norm ``c > 0``; with labelled groups a number or a dict
        label -> norm.
      loss: ``"cross_entropy"``, ``"mse"`` or a :class:`curvjax.losses.Loss`.
      groups: ``None`` (one global norm over all parameters), ``"leaf"`` or a pytree of labels.

    Returns:
      A :class:`ClippedGrad` ``(grad, norms, clipped_fraction)``: the clipped sum (a pytree like
      ``params``), the norms ``‖ĝ_n‖`` ``[N]`` and the fraction of the examples with a positive
      weight that were clipped, per group when groups are given.

    Example:
      >>> import jax.numpy as jnp, curvjax
      >>> apply_fn = lambda p, x: x @ p["w"]
      >>> batch = (jnp.ones((5, 4)), jnp.array([0, 1, 2, 0, 1]))
      >>> out = curvjax.clipped_grad(apply_fn, {"w": jnp.ones((4, 3))}, batch, clip_norm=0.5)
      >>> out.grad["w"].shape, out.norms.shape, float(out.clipped_fraction)
      ((4, 3), (5,), 1.0)

    References:
      Abadi et al., "Deep learning with differential privacy", CCS 2016.
      Bu, Wang, Zha & Karypis, "Differentially private optimization on large model at small cost"
      (book-keeping), ICML 2023.
    """
    p, values = quantities.compute(
        apply_fn,
        params,
        batch,
        ("clipped_grad",),
        loss=loss,
        reduction="sum",
        options={"clipped_grad": {"clip_norm": clip_norm, "groups": groups}},
    )
    return values["clipped_grad"]
