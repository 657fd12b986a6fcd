"""DP-SGD as optax transforms: noise added to the clipped sum of per-example gradients.

:func:`dp_aggregate` turns the clipped sum ``Σ_n clip(ĝ_n)`` (what :func:`curvjax.clipped_grad`
returns, from one backward pass) into the privatised gradient ``(Σ_n clip(ĝ_n) + σ c ξ) / B``;
any optax optimizer can follow it in an ``optax.chain``. :func:`dpsgd` is that chain with SGD.
"""

from __future__ import annotations

import numbers
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import ArrayLike, PRNGKeyArray


class DpAggregateState(NamedTuple):
    """State of :func:`dp_aggregate`: the random key of the next step's noise."""

    # [] typed PRNG key (jax.random.key): split into one key per leaf and the next state's key at
    # every update
    rng_key: PRNGKeyArray


def _as_key(seed) -> PRNGKeyArray:
    if isinstance(seed, jax.Array) and jnp.issubdtype(seed.dtype, jax.dtypes.prng_key):
        return seed
    if isinstance(seed, numbers.Integral) or (
        isinstance(seed, (np.ndarray, jax.Array)) and seed.shape == () and seed.dtype.kind in "iu"
    ):
        return jax.random.key(seed)
    if isinstance(seed, (np.ndarray, jax.Array)) and seed.dtype == jnp.uint32:
        return jax.random.wrap_key_data(jnp.asarray(seed))
    raise TypeError(
        f"`seed` must be an int or a key from `jax.random.key(...)`, got {type(seed).__name__}."
    )


def _concrete(value) -> float | None:
    """``float(value)`` when it is known at trace time, ``None`` for a traced value."""
    try:
        return float(value)
    except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):
        return None


def _check_hyperparameters(l2_norm_clip, noise_multiplier, expected_batch_size) -> None:
    clip = _concrete(l2_norm_clip)
    if clip is not None and not clip > 0:
        raise ValueError(f"`l2_norm_clip` must be positive, got {clip}.")
    noise = _concrete(noise_multiplier)
    if noise is not None and not noise >= 0:
        raise ValueError(
            f"`noise_multiplier` must be non-negative, got {noise} (0 turns the noise off)."
        )
    size = _concrete(expected_batch_size)
    if size is not None and not size > 0:
        raise ValueError(
            f"`expected_batch_size` must be positive, got {size}: with Poisson sampling at rate q "
            "from N examples it is q·N."
        )


def dp_aggregate(
    l2_norm_clip: ArrayLike,
    noise_multiplier: ArrayLike,
    seed: int | PRNGKeyArray,
    *,
    expected_batch_size: ArrayLike,
) -> optax.GradientTransformation:
    """Privatise the clipped sum of per-example gradients: Gaussian noise, then divide by ``B``.

    ``update(updates, state, params=None)`` takes as ``updates`` the clipped **sum** of the
    per-example gradients (params-shaped, e.g. ``curvjax.clipped_grad(...).grad``) and returns

    .. math::
        \\tilde g = \\frac{1}{B} \\Big( \\sum_n \\min\\big(1, \\tfrac{c}{\\lVert \\hat g_n \\rVert}
        \\big) \\hat g_n + σ c ξ \\Big), \\qquad ξ \\sim \\mathcal N(0, I),

    with ``c = l2_norm_clip``, ``σ = noise_multiplier`` and ``B = expected_batch_size``: the
    Gaussian mechanism of DP-SGD (Abadi et al. 2016, Algorithm 1). Each step splits the key in the
    state into a new state key and one key per leaf; each leaf gets its own standard normal draw
    of its shape and dtype. ``None`` leaves (non-float parameters in ``clipped_grad``) stay
    ``None``. ``σ = 0`` gives the clipped mean without noise (not private).

    **Which B.** With Poisson subsampling (each example in the batch independently with probability
    ``q`` from a data set of ``N`` examples, as the accounting of :mod:`curvjax.privacy` assumes)
    the realised batch size is random; divide by the expected size ``B = q N``, not by the number
    of examples drawn: the realised size depends on the data set and would leak through the
    divisor. With fixed-size padded batches (:func:`curvjax.privacy.poisson_batch`, padded entries
    masked to weight 0) the padding adds nothing to the sum and ``B`` stays ``q N``, whatever the
    padded size. Then the expectation of ``g̃`` over the sampling and the noise is exactly the
    mean clipped gradient of the data set, ``(1/N) Σ_{n=1}^{N} clip(ĝ_n)``.

    **Relation to** ``optax.contrib.differentially_private_aggregate``. Same argument names, the
    same state field ``rng_key`` and the same per-leaf draws: for the same key (``seed``), ours on
    the clipped sum times ``B`` equals optax's on the same batch's per-example gradients times
    the batch's size. Optax clips per-example gradients itself (``[batch, ...]`` leaves, memory
    ``batch × D``) and divides by the realised batch size; here the clipping is done before
    (:func:`curvjax.clipped_grad`, without per-example gradients) and the divisor is the expected
    batch size, as Poisson sampling requires.

    Args:
      l2_norm_clip: ``c > 0``, the clipping norm used for the clipped sum (it scales the noise);
        for a sum clipped per group with norms ``c_γ`` (``clipped_grad(..., groups=...)``) its
        sensitivity, ``sqrt(Σ_γ c_γ²)``.
      noise_multiplier: ``σ ≥ 0``, the noise standard deviation over the clipping norm.
      seed: an int or a key from ``jax.random.key`` for the first step's noise.
      expected_batch_size: ``B > 0``, the expected number of examples per batch (``q N`` under
        Poisson sampling at rate ``q``; the batch size for fixed batches).

    Returns:
      An ``optax.GradientTransformation`` with state :class:`DpAggregateState`.

    Raises:
      ValueError: for ``l2_norm_clip ≤ 0``, ``noise_multiplier < 0`` or
        ``expected_batch_size ≤ 0`` (checked when the values are concrete).

    Example:
      >>> import jax.numpy as jnp
      >>> from curvjax.optim import dp_aggregate
      >>> clipped_sum = {"w": jnp.array([3.0, -1.0])}
      >>> tx = dp_aggregate(l2_norm_clip=1.0, noise_multiplier=0.0, seed=0, expected_batch_size=4)
      >>> update, state = tx.update(clipped_sum, tx.init(clipped_sum))
      >>> update["w"].tolist()
      [0.75, -0.25]

    References:
      Abadi et al., "Deep learning with differential privacy", CCS 2016, Algorithm 1.
    """
    _check_hyperparameters(l2_norm_clip, noise_multiplier, expected_batch_size)
    key = _as_key(seed)

    def init(params) -> DpAggregateState:
        del params
        return DpAggregateState(rng_key=key)

    def update(updates, state: DpAggregateState, params=None):
        del params
        leaves, treedef = jax.tree.flatten(updates)
        for leaf in leaves:
            if not jnp.issubdtype(jnp.result_type(leaf), jnp.floating):
                raise TypeError(
                    "`updates` of dp_aggregate must hold floating-point leaves (or None for "
                    f"non-float parameters), got a leaf of dtype {jnp.result_type(leaf)}."
                )
        next_key, *leaf_keys = jax.random.split(state.rng_key, len(leaves) + 1)
        scale = l2_norm_clip * noise_multiplier
        private = [
            (leaf + scale * jax.random.normal(leaf_key, jnp.shape(leaf), jnp.result_type(leaf)))
            / expected_batch_size
            for leaf, leaf_key in zip(leaves, leaf_keys, strict=True)
        ]
        return jax.tree.unflatten(treedef, private), DpAggregateState(rng_key=next_key)

    return optax.GradientTransformation(init, update)


def dpsgd(
    learning_rate: optax.ScalarOrSchedule,
    l2_norm_clip: ArrayLike,
    noise_multiplier: ArrayLike,
    seed: int | PRNGKeyArray,
    momentum: float | None = None,
    nesterov: bool = False,
    *,
    expected_batch_size: ArrayLike,
) -> optax.GradientTransformation:
    """DP-SGD on the clipped sum: :func:`dp_aggregate` followed by ``optax.sgd``.

    .. math::
        θ ← θ - α \\, \\frac{1}{B} \\Big( \\sum_n \\mathrm{clip}_c(\\hat g_n) + σ c ξ \\Big)

    (with momentum ``v ← \\tilde g + m v`` before the step when ``momentum`` is given). It is
    ``optax.chain(dp_aggregate(l2_norm_clip, noise_multiplier, seed, expected_batch_size=B),
    optax.sgd(learning_rate, momentum, nesterov))``, with the arguments in the order of
    ``optax.contrib.dpsgd``; ``expected_batch_size`` is keyword-only, so that a positional momentum
    is never read as a batch size. Feed ``update`` the clipped sum, e.g.
    ``curvjax.clipped_grad(apply_fn, params, batch, clip_norm=c).grad``.

    Args:
      learning_rate: ``α`` (float or optax schedule).
      l2_norm_clip: ``c > 0``, the clipping norm.
      noise_multiplier: ``σ ≥ 0``.
      seed: an int or a key from ``jax.random.key``.
      momentum: ``m`` for heavy-ball momentum, ``None`` for none.
      nesterov: Nesterov momentum.
      expected_batch_size: ``B > 0`` (``q N`` under Poisson sampling), see :func:`dp_aggregate`.

    Returns:
      An ``optax.GradientTransformation``; its state is the chain's, the first entry a
      :class:`DpAggregateState`.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> from curvjax.optim import dpsgd
      >>> params = {"w": jnp.array([1.0, 1.0])}
      >>> tx = dpsgd(0.5, l2_norm_clip=1.0, noise_multiplier=0.0, seed=0, expected_batch_size=2)
      >>> update, state = tx.update({"w": jnp.array([2.0, 0.0])}, tx.init(params), params)
      >>> optax.apply_updates(params, update)["w"].tolist()
      [0.5, 1.0]

    References:
      Abadi et al., "Deep learning with differential privacy", CCS 2016, Algorithm 1.
    """
    return optax.chain(
        dp_aggregate(l2_norm_clip, noise_multiplier, seed, expected_batch_size=expected_batch_size),
        optax.sgd(learning_rate, momentum=momentum, nesterov=nesterov),
    )
