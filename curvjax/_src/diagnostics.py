"""Gradient-noise diagnostics from one forward and one backward pass.

The statistics of the per-example gradients ``ĝ_n = ∇ℓ_n`` of a batch (the gradient noise scale
of McCandlish et al. 2018 and per-leaf signal-to-noise ratios), computed from the summed gradient
``Σ_n ĝ_n`` and the per-example squared norms ``‖ĝ_n‖²`` that :func:`curvjax.extract` returns:
no per-example gradient is formed.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, PyTree

from curvjax._src import positions
from curvjax._src.extract import extract
from curvjax._src.typing import ApplyFn, Batch, LossLike, ParamsLike


class GradientNoiseScale(NamedTuple):
    """Unbiased one-batch statistics of the per-example gradients (see
    :func:`gradient_noise_scale`).

    Attributes:
      b_simple: scalar, ``B_simple = tr Σ / ‖G‖²`` from the two unbiased estimates below.
      trace_cov: scalar, the unbiased estimate ``S`` of ``tr Σ``.
      grad_sq_norm: scalar, the unbiased estimate of ``‖G‖²``.
      trace_cov_per_leaf: a pytree like ``params`` of scalars, ``S_k`` (sums to ``trace_cov``).
      grad_sq_norm_per_leaf: a pytree like ``params`` of scalars (sums to ``grad_sq_norm``).
      snr: a pytree like ``params`` of scalars, the per-example signal-to-noise ratio of each
        leaf, ``grad_sq_norm_per_leaf / trace_cov_per_leaf``.
      num_examples: scalar, ``m``, the number of examples with a positive weight.
    """

    b_simple: Float[Array, ""]  # noqa: F722
    trace_cov: Float[Array, ""]  # noqa: F722
    grad_sq_norm: Float[Array, ""]  # noqa: F722
    trace_cov_per_leaf: ParamsLike
    grad_sq_norm_per_leaf: ParamsLike
    snr: ParamsLike
    num_examples: Array


def _is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def _real_examples(weights, n: int) -> Array:
    """``[N]`` booleans: the examples with a positive weight at some position."""
    if weights is None:
        return jnp.ones((n,), bool)
    w = jnp.asarray(weights)
    if w.ndim == 0 or w.shape[0] != n:
        raise ValueError(
            f"the weights (batch[2]) must have shape [N] or [N, *P] with N = {n}, got {w.shape}."
        )
    return jnp.any(w.reshape(n, -1) > 0, axis=1)


def gradient_noise_scale_from_sums(
    grad_sum: ParamsLike,
    sq_norms: PyTree[Float[Array, "N"]],  # noqa: F821, UP037
    num_examples: int | Array,
) -> GradientNoiseScale:
    """Gradient noise scale and per-leaf SNR from a summed gradient and per-example norms.

    The estimator of :func:`gradient_noise_scale`, for users who already hold the two inputs
    from their own :func:`curvjax.extract` call with ``reduction="sum"`` (e.g. the one that also
    computes the clipped gradient of a private step), with ``ḡ_k = grad\\_sum_k / m``:

    .. math::
        S_k = \\frac{\\sum_n \\lVert ĝ_{n,k} \\rVert^2 - m \\lVert ḡ_k \\rVert^2}{m - 1},
        \\qquad \\widehat{\\lVert G_k \\rVert^2} = \\lVert ḡ_k \\rVert^2 - S_k / m .

    Args:
      grad_sum: ``Σ_n ĝ_n``, a pytree like ``params`` (``None`` at non-float leaves).
      sq_norms: per-example squared norms ``‖ĝ_{n,k}‖²`` per leaf, each ``[N]``, with the same
        structure as ``grad_sum``; examples of weight 0 must hold 0 (they do when they come from
        ``extract`` with the same weights).
      num_examples: ``m ≥ 2``, the number of real examples (a Python int or a traced scalar).

    Returns:
      A :class:`GradientNoiseScale`. Under ``jit`` with a traced ``m < 2`` every field is NaN.

    Raises:
      ValueError: if ``num_examples`` is concrete and below 2.

    Example:
      >>> import jax.numpy as jnp, curvjax
      >>> g = {"w": jnp.array([2.0, 0.0])}  # the sum of [1, 1], [1, -1]
      >>> sq = {"w": jnp.array([2.0, 2.0])}
      >>> out = curvjax.gradient_noise_scale_from_sums(g, sq, 2)
      >>> float(out.trace_cov), float(out.grad_sq_norm)
      (2.0, 0.0)

    References:
      McCandlish, Kaplan, Amodei & the OpenAI Dota team, "An empirical model of large-batch
      training", arXiv:1812.06162, 2018, appendix A.1.
    """
    if _is_concrete(num_examples) and int(np.asarray(num_examples)) < 2:
        raise ValueError(
            f"num_examples = {int(np.asarray(num_examples))}: the gradient noise scale needs at "
            "least 2 examples with a positive weight (the covariance of one example is "
            "undefined); pass a larger batch."
        )
    leaves, treedef = jax.tree.flatten(grad_sum)
    norm_leaves = treedef.flatten_up_to(sq_norms)
    if not leaves:
        raise ValueError("grad_sum has no floating-point leaves: there is nothing to measure.")
    # at least float32: the count and the cancellation ‖ḡ‖² − S/m of a bfloat16 model's gradient
    dtype = jnp.promote_types(jnp.result_type(*leaves), jnp.float32)
    m = jnp.asarray(num_examples, dtype)
    valid = m >= 2
    m_safe = jnp.where(valid, m, 2.0)
    nan = jnp.asarray(jnp.nan, dtype)

    trace_leaves, signal_leaves = [], []
    for g, sq in zip(leaves, norm_leaves, strict=True):
        mean_sq = jnp.sum(jnp.square(g / m_safe))  # ‖ḡ_k‖²
        trace = (jnp.sum(sq) - m_safe * mean_sq) / (m_safe - 1.0)
        trace_leaves.append(jnp.where(valid, trace, nan))
        signal_leaves.append(jnp.where(valid, mean_sq - trace / m_safe, nan))
    trace_cov = sum(trace_leaves)
    grad_sq_norm = sum(signal_leaves)
    return GradientNoiseScale(
        b_simple=trace_cov / grad_sq_norm,
        trace_cov=trace_cov,
        grad_sq_norm=grad_sq_norm,
        trace_cov_per_leaf=treedef.unflatten(trace_leaves),
        grad_sq_norm_per_leaf=treedef.unflatten(signal_leaves),
        snr=treedef.unflatten([s / t for s, t in zip(signal_leaves, trace_leaves, strict=True)]),
        num_examples=m,
    )


def gradient_noise_scale(
    apply_fn: ApplyFn,
    params: PyTree,
    batch: Batch,
    *,
    loss: LossLike = "cross_entropy",
) -> GradientNoiseScale:
    """The gradient noise scale ``B_simple`` and per-leaf gradient SNRs, unbiased, from one batch.

    With ``ĝ_n = ∇ℓ_n`` the gradient of the *unscaled* per-example loss
    ``ℓ_n = Σ_p w_{n,p} ℓ(f_{n,p}, y_{n,p})``, seen as a draw from the data distribution with mean
    ``G = E ĝ`` and covariance ``Σ``, McCandlish et al. define the simple noise scale
    ``B_simple = tr Σ / ‖G‖²``: the batch size at which the gradient's noise and signal are of the
    same size (roughly the largest batch that still trains efficiently). From the ``m``
    examples of the batch with a positive weight, ``ḡ = (1/m) Σ_n ĝ_n``,

    .. math::
        S = \\frac{\\sum_n \\lVert ĝ_n \\rVert^2 - m \\lVert ḡ \\rVert^2}{m - 1}, \\qquad
        \\widehat{\\lVert G \\rVert^2} = \\lVert ḡ \\rVert^2 - \\frac{S}{m}, \\qquad
        B_\\text{simple} ≈ \\frac{S}{\\widehat{\\lVert G \\rVert^2}},

    where ``S`` is unbiased for ``tr Σ`` and ``‖ḡ‖² − S/m`` for ``‖G‖²`` (since
    ``E ‖ḡ‖² = ‖G‖² + tr Σ / m``); their ratio is a consistent, not an unbiased, estimate of
    ``B_simple``. The same estimates restricted to each parameter leaf ``k`` give
    ``trace_cov_per_leaf`` (``tr Σ_k``), ``grad_sq_norm_per_leaf`` (``‖G_k‖²``) and the
    per-example signal-to-noise ratio

    .. math::
        \\mathrm{snr}_k = \\widehat{\\lVert G_k \\rVert^2} / S_k ,

    the inverse of the leaf's noise scale (a batch of ``B`` examples has signal-to-noise ratio
    about ``B · snr_k``). One batch gives noisy estimates: for small ``m`` or a small signal
    ``grad_sq_norm`` (per leaf or in total) can be negative, and then ``b_simple`` and ``snr``
    are negative too; average the two estimates over several batches (or an exponential moving
    average, as McCandlish et al. do) before taking their ratio. In float32 the difference
    ``Σ‖ĝ_n‖² − m‖ḡ‖²`` loses digits when the noise is much smaller than the signal.

    Everything comes from one forward and one backward pass: ``Σ_n ĝ_n`` and the per-example
    squared norms ``‖ĝ_{n,k}‖²`` (``batch_l2`` with ``reduction="sum"``) of
    :func:`curvjax.extract`; no per-example gradient is formed. Padded examples (weight 0) have
    ``ĝ_n = 0`` and are left out of ``m``, so a fixed-size padded batch gives the statistics of
    its real examples without recompiling. The fraction of examples whose gradient norm exceeds
    a clipping threshold is the ``clipped_fraction`` of :func:`curvjax.clipped_grad`.

    Args:
      apply_fn: ``apply_fn(params, inputs) -> outputs [N, *P, C]``, any pure JAX function that
        treats examples independently (no batch statistics).
      params: parameter pytree; non-floating-point leaves are held fixed and get ``None``.
      batch: ``(inputs, targets)`` or ``(inputs, targets, weights)``, weights ``[N]`` or
        ``[N, *P]`` (a 0/1 padding mask or non-negative weights, which scale ``ℓ_n``); an
        example is counted in ``m`` when one of its weights is positive. At least two such
        examples are needed.
      loss: ``"cross_entropy"``, ``"mse"`` or a :class:`curvjax.losses.Loss`.

    Returns:
      A :class:`GradientNoiseScale`: scalars ``b_simple``, ``trace_cov``, ``grad_sq_norm``,
      ``num_examples`` (``m``), and pytrees like ``params`` of scalars
      ``trace_cov_per_leaf``, ``grad_sq_norm_per_leaf``, ``snr`` (``None`` at non-float leaves).
      Under ``jit``, a traced mask with fewer than two real examples gives NaN everywhere.

    Raises:
      ValueError: if the batch (with concrete weights) has fewer than two examples with a
        positive weight.

    Example:
      >>> import jax, jax.numpy as jnp, curvjax
      >>> apply_fn = lambda p, x: x @ p["w"]
      >>> params = {"w": jnp.zeros((4, 3))}
      >>> x = jax.random.normal(jax.random.key(0), (8, 4))
      >>> batch = (x, jnp.array([0, 1, 2, 0, 1, 2, 0, 1]), jnp.array([1, 1, 1, 1, 1, 1, 0, 0]))
      >>> out = jax.jit(curvjax.gradient_noise_scale, static_argnums=0)(apply_fn, params, batch)
      >>> int(out.num_examples), out.snr["w"].shape
      (6, ())

    References:
      McCandlish, Kaplan, Amodei & the OpenAI Dota team, "An empirical model of large-batch
      training", arXiv:1812.06162, 2018, section 2.2 and appendix A.1.
    """
    inputs, _, weights = positions.split_batch(batch)
    n = jax.tree.leaves(inputs)[0].shape[0]
    real = _real_examples(weights, n)
    if weights is None:
        num_examples = n
    elif _is_concrete(weights):
        num_examples = int(np.sum(np.asarray(real)))
    else:
        num_examples = jnp.sum(real)
    if _is_concrete(num_examples) and num_examples < 2:
        raise ValueError(
            f"batch has {num_examples} example(s) with a positive weight: the gradient noise "
            "scale needs at least 2 (the covariance of one example is undefined); pass a larger "
            "batch or fewer masked examples."
        )
    out = extract(apply_fn, params, batch, ["batch_l2"], loss=loss, reduction="sum")
    sq_norms = jax.tree.map(lambda s: jnp.where(real, s, 0.0), out["batch_l2"])
    return gradient_noise_scale_from_sums(out["grad"], sq_norms, num_examples)
