# ruff: noqa: F722  (jaxtyping shape strings are not forward references)
"""Privacy accounting of DP-SGD with Poisson subsampling (through Google's ``dp-accounting``) and
the Poisson sampler into fixed-size padded batches."""

from __future__ import annotations

import numbers
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float, Int, PRNGKeyArray

_ACCOUNTANTS = ("pld", "rdp")


def _import_dp_accounting():
    try:
        import dp_accounting
    except ImportError as error:
        raise ImportError(
            "Privacy accounting needs Google's dp-accounting package: "
            'pip install "curvjax[privacy]" (or pip install dp-accounting).'
        ) from error
    return dp_accounting


def _check_accounting_args(sampling_rate, steps, delta, accountant, dataset_size, max_batch_size):
    steps = int(steps) if isinstance(steps, numbers.Integral) else steps
    if not 0 < sampling_rate <= 1:
        raise ValueError(f"`sampling_rate` must be in (0, 1], got {sampling_rate}.")
    if not isinstance(steps, numbers.Integral) or steps < 0:
        raise ValueError(f"`steps` must be a non-negative int, got {steps!r}.")
    if not 0 < delta < 1:
        raise ValueError(f"`delta` must be in (0, 1), got {delta}.")
    if accountant not in _ACCOUNTANTS:
        raise ValueError(f'`accountant` must be "pld" or "rdp", got {accountant!r}.')
    if (dataset_size is None) != (max_batch_size is None):
        raise ValueError(
            "Pass both `dataset_size` and `max_batch_size` (batches truncated to at most "
            "max_batch_size, as poisson_batch draws them) or neither (plain Poisson sampling)."
        )
    if max_batch_size is not None:
        if accountant != "pld":
            raise ValueError(
                'Truncated Poisson sampling (`max_batch_size`) is accounted by accountant="pld" '
                f"only, got accountant={accountant!r}."
            )
        if not isinstance(dataset_size, numbers.Integral) or dataset_size < 1:
            raise ValueError(f"`dataset_size` must be a positive int, got {dataset_size!r}.")
        if not isinstance(max_batch_size, numbers.Integral) or max_batch_size < 1:
            raise ValueError(f"`max_batch_size` must be a positive int, got {max_batch_size!r}.")
    # plain Python numbers for dp-accounting (numpy / jax scalars are accepted here)
    return (
        float(sampling_rate),
        steps,
        float(delta),
        None if dataset_size is None else int(dataset_size),
        None if max_batch_size is None else int(max_batch_size),
    )


def _event(dp_accounting, noise_multiplier, sampling_rate, steps, dataset_size, max_batch_size):
    if max_batch_size is None:
        step = dp_accounting.PoissonSampledDpEvent(
            sampling_rate, dp_accounting.GaussianDpEvent(noise_multiplier)
        )
    else:
        truncated = getattr(dp_accounting, "TruncatedSubsampledGaussianDpEvent", None)
        if truncated is None:
            raise ImportError(
                "Accounting for truncated Poisson batches needs dp-accounting>=0.6: "
                'pip install -U "dp-accounting>=0.6".'
            )
        step = truncated(
            dataset_size=dataset_size,
            sampling_probability=sampling_rate,
            truncated_batch_size=max_batch_size,
            noise_multiplier=noise_multiplier,
        )
    return dp_accounting.SelfComposedDpEvent(step, steps)


def _make_accountant(dp_accounting, accountant):
    if accountant == "pld":
        return dp_accounting.pld.PLDAccountant()
    return dp_accounting.rdp.RdpAccountant()


def epsilon(
    noise_multiplier: float,
    sampling_rate: float,
    steps: int,
    delta: float,
    *,
    accountant: str = "pld",
    dataset_size: int | None = None,
    max_batch_size: int | None = None,
) -> float:
    """ε of DP-SGD with Poisson subsampling after ``steps`` steps, at a given ``δ``.

    Each step samples every example independently with probability ``q`` and releases the
    clipped sum plus Gaussian noise of standard deviation ``σ c`` (:func:`curvjax.optim.dp_aggregate`),
    the subsampled Gaussian mechanism; ``steps`` of them composed are

    .. math::
        \\mathcal M = \\big(\\mathrm{PoissonSample}_q \\circ \\mathrm{Gauss}_σ\\big)^{\\circ T},

    whose ``(ε, δ)`` guarantee (add-or-remove-one neighbouring data sets) is computed by
    ``dp-accounting``: the privacy loss distribution (``accountant="pld"``, tight up to a
    pessimistic discretisation) or Rényi DP (``"rdp"``, faster, a looser upper bound).

    **Truncated batches.** Batches from :func:`poisson_batch` hold at most ``max_batch_size``
    examples: when more are drawn, a random subset of that size is kept, and plain Poisson
    accounting no longer applies. Pass ``dataset_size`` and ``max_batch_size`` to account for
    exactly this sampler (dp-accounting's truncated subsampled Gaussian, PLD only; its ε is at
    least the untruncated one and equal to it when truncation is improbable).

    Args:
      noise_multiplier: ``σ ≥ 0`` (``0`` gives ``inf``).
      sampling_rate: ``q ∈ (0, 1]``, the probability that an example is in a batch.
      steps: ``T ≥ 0``, the number of noisy steps.
      delta: ``δ ∈ (0, 1)``, usually below ``1 / N``.
      accountant: ``"pld"`` or ``"rdp"``.
      dataset_size: ``N``, for truncated batches (with ``max_batch_size``).
      max_batch_size: the padded batch size of :func:`poisson_batch`, for truncated batches.

    Returns:
      ε as a Python float (``inf`` for ``σ = 0`` and ``T > 0``; ``0`` for ``T = 0``).

    Raises:
      ImportError: when ``dp-accounting`` is not installed (``pip install "curvjax[privacy]"``).

    Example:
      >>> from curvjax import privacy
      >>> eps = privacy.epsilon(noise_multiplier=1.1, sampling_rate=0.01, steps=1000, delta=1e-5,
      ...                       accountant="rdp")
      >>> round(eps, 2)
      1.71

    References:
      Abadi et al., "Deep learning with differential privacy", CCS 2016;
      Mironov, Talwar and Zhang, "Rényi differential privacy of the sampled Gaussian mechanism",
      2019; Koskela, Jälkö and Honkela, "Computing tight differential privacy guarantees using
      FFT", AISTATS 2020.
    """
    dp_accounting = _import_dp_accounting()
    sampling_rate, steps, delta, dataset_size, max_batch_size = _check_accounting_args(
        sampling_rate, steps, delta, accountant, dataset_size, max_batch_size
    )
    noise_multiplier = float(noise_multiplier)
    if noise_multiplier < 0:
        raise ValueError(f"`noise_multiplier` must be non-negative, got {noise_multiplier}.")
    if steps == 0:
        return 0.0  # nothing released
    event = _event(
        dp_accounting, noise_multiplier, sampling_rate, steps, dataset_size, max_batch_size
    )
    return float(_make_accountant(dp_accounting, accountant).compose(event).get_epsilon(delta))


def noise_multiplier(
    target_epsilon: float,
    sampling_rate: float,
    steps: int,
    delta: float,
    *,
    accountant: str = "pld",
    dataset_size: int | None = None,
    max_batch_size: int | None = None,
) -> float:
    """The smallest noise multiplier ``σ`` whose DP-SGD run satisfies ``(target_epsilon, δ)``-DP.

    .. math::
        σ^\\star = \\min \\{ σ \\ge 0 : ε(σ, q, T, δ) \\le ε_{target} \\},

    with ``ε`` as :func:`epsilon` computes it (the same accountant and sampler arguments), found by
    ``dp_accounting.calibrate_dp_mechanism`` (Brent's method on ``ε(σ) - ε_target``, then a step
    up if needed so that the returned ``σ`` never exceeds the budget; within ``10⁻⁶`` of ``σ*``).
    Each evaluation is one accounting: a fraction of a second with ``"rdp"``, around a second with
    ``"pld"`` (more for small ``σ`` and for truncated batches).

    Args:
      target_epsilon: ``ε_target > 0``.
      sampling_rate: ``q ∈ (0, 1]``.
      steps: ``T ≥ 1``.
      delta: ``δ ∈ (0, 1)``.
      accountant: ``"pld"`` or ``"rdp"``.
      dataset_size: ``N``, for truncated batches (with ``max_batch_size``), see :func:`epsilon`.
      max_batch_size: the padded batch size of :func:`poisson_batch`.

    Returns:
      ``σ`` as a Python float, with ``epsilon(σ, ...) ≤ target_epsilon``.

    Raises:
      ImportError: when ``dp-accounting`` is not installed (``pip install "curvjax[privacy]"``).

    Example:
      >>> from curvjax import privacy
      >>> sigma = privacy.noise_multiplier(target_epsilon=3.0, sampling_rate=0.01, steps=1000,
      ...                                  delta=1e-5, accountant="rdp")
      >>> round(sigma, 3)
      0.865

    References:
      Abadi et al., "Deep learning with differential privacy", CCS 2016.
    """
    dp_accounting = _import_dp_accounting()
    sampling_rate, steps, delta, dataset_size, max_batch_size = _check_accounting_args(
        sampling_rate, steps, delta, accountant, dataset_size, max_batch_size
    )
    target_epsilon = float(target_epsilon)
    if not target_epsilon > 0:
        raise ValueError(f"`target_epsilon` must be positive, got {target_epsilon}.")
    if steps < 1:
        raise ValueError("`steps` must be at least 1 to calibrate a noise multiplier.")
    sigma = dp_accounting.calibrate_dp_mechanism(
        make_fresh_accountant=lambda: _make_accountant(dp_accounting, accountant),
        make_event_from_param=lambda s: _event(
            dp_accounting, s, sampling_rate, steps, dataset_size, max_batch_size
        ),
        target_epsilon=target_epsilon,
        target_delta=delta,
        bracket_interval=dp_accounting.LowerEndpointAndGuess(0.0, 1.0),
    )
    return float(sigma)


class PoissonBatch(NamedTuple):
    """A Poisson-sampled batch padded to a fixed size (:func:`poisson_batch`)."""

    # [max_batch_size] int32: indices into the data set; the first min(num_sampled, max_batch_size)
    # are the sampled examples, the rest are valid indices of unsampled examples (mask 0)
    indices: Int[Array, " max_batch_size"]
    # [max_batch_size] float: 1 for a sampled example, 0 for padding
    mask: Float[Array, " max_batch_size"]
    # [] int32: the number of examples Poisson sampling drew, before truncation to max_batch_size
    num_sampled: Int[Array, ""]


def poisson_batch(
    key: PRNGKeyArray,
    num_examples: int,
    sampling_rate: ArrayLike,
    max_batch_size: int,
) -> PoissonBatch:
    """Poisson subsampling into a fixed-size padded batch: one compiled step for every batch size.

    Every example ``n`` of the ``N = num_examples`` is in the batch independently with probability
    ``q``: with ``u_n ~ U[0, 1)`` i.i.d., the sampled set is ``S = {n : u_n < q}`` and
    ``|S| ~ Binomial(N, q)``. The batch holds the ``max_batch_size`` examples of smallest
    ``u_n``: all of ``S`` first (``mask = 1``), then padding (``mask = 0``). Use the mask as the
    per-example weights of :func:`curvjax.clipped_grad`, so that padded examples contribute
    nothing, and divide by the expected batch size ``q N`` in :func:`curvjax.optim.dp_aggregate`.
    Shapes never depend on ``|S|``: no recompilation.

    **Truncation.** If ``|S| > max_batch_size`` the batch keeps the ``max_batch_size`` sampled
    examples of smallest ``u_n``, a uniformly random subset of ``S`` (given ``S``, those ``u_n``
    are i.i.d. uniform on ``[0, q)``), and ``num_sampled > max_batch_size`` says so. This is
    no longer Poisson sampling, and the plain Poisson accounting of :func:`epsilon` does not cover
    it. Two honest options: account for the truncated sampler exactly with
    ``epsilon(..., dataset_size=N, max_batch_size=max_batch_size)``, or choose
    ``max_batch_size`` several standard deviations above ``q N`` (e.g.
    ``q N + 6 √(q N (1 - q))``) so that truncation is improbable, and check ``num_sampled``.
    The function never raises for truncation: inside ``jax.jit`` it could not, and the first
    option makes the truncated step private by itself.

    Args:
      key: a ``jax.random.key``.
      num_examples: ``N``, the size of the data set (static).
      sampling_rate: ``q ∈ (0, 1]``.
      max_batch_size: the padded batch size, ``1 ≤ max_batch_size ≤ N`` (static).

    Returns:
      :class:`PoissonBatch` ``(indices [max_batch_size] int32, mask [max_batch_size] float,
      num_sampled [] int32)``.

    Example:
      >>> import jax
      >>> from curvjax import privacy
      >>> batch = privacy.poisson_batch(jax.random.key(0), num_examples=1000, sampling_rate=0.05,
      ...                               max_batch_size=90)
      >>> batch.indices.shape, batch.mask.shape
      ((90,), (90,))
      >>> bool(batch.mask.sum() == min(int(batch.num_sampled), 90))
      True

    References:
      Abadi et al., "Deep learning with differential privacy", CCS 2016 (Poisson sampling, the
      "lot"); Mironov, Talwar and Zhang, "Rényi differential privacy of the sampled Gaussian
      mechanism", 2019.
    """
    if not isinstance(num_examples, numbers.Integral) or num_examples < 1:
        raise ValueError(f"`num_examples` must be a positive int, got {num_examples!r}.")
    if not isinstance(max_batch_size, numbers.Integral) or not 1 <= max_batch_size <= num_examples:
        raise ValueError(
            f"`max_batch_size` must be an int in [1, num_examples={num_examples}], got "
            f"{max_batch_size!r}."
        )
    try:
        rate = float(sampling_rate)
    except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):
        rate = None
    if rate is not None and not 0 < rate <= 1:
        raise ValueError(f"`sampling_rate` must be in (0, 1], got {rate}.")
    uniforms = jax.random.uniform(key, (num_examples,))
    _, indices = jax.lax.top_k(-uniforms, max_batch_size)
    sampled = uniforms < sampling_rate
    mask = sampled[indices].astype(jnp.result_type(float))
    num_sampled = jnp.sum(sampled, dtype=jnp.int32)
    return PoissonBatch(indices.astype(jnp.int32), mask, num_sampled)
