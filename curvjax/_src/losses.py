# ruff: noqa: F722  (jaxtyping shape strings are not forward references)
"""Losses that know the factorisation of their output Hessian.

A :class:`Loss` describes one output vector ``f`` of ``C`` entries (one example of a classifier, one
position of a sequence model): its value ``ℓ(f, y)``, a symmetric factor ``S`` of the output Hessian
``∇²_f ℓ = S Sᵀ`` and Monte-Carlo columns ``∇_f ℓ(f, ŷ_m)`` with ``ŷ_m ~ p(y | f)`` whose outer
products average to ``S Sᵀ``. Everything else in curvjax vmaps these functions over examples and
positions.

Built-in losses (``p = softmax(f)``, ``σ`` the logistic sigmoid; targets for outputs
``[N, *P, C]``):

- ``cross_entropy``: integer labels ``[N, *P]``; ``S Sᵀ = diag(p) − p pᵀ``.
- ``soft_cross_entropy``: probability rows ``[N, *P, C]``; ``S Sᵀ = diag(p) − p pᵀ``.
- ``cross_entropy_with_label_smoothing(alpha)``: integer labels; ``S Sᵀ = diag(p) − p pᵀ``.
- ``sigmoid_binary_cross_entropy``: values in ``[0, 1]``, ``[N, *P, C]``; ``S Sᵀ = diag(σ(1 − σ))``.
- ``gaussian_nll``: ``[N, *P, C/2]``; ``S Sᵀ`` the Fisher ``diag(e^{−s}, ½)`` (the exact Hessian is
  indefinite).
- ``mse``: ``[N, *P, C]``; ``S Sᵀ = 2 I``.

Example:
  >>> import jax, jax.numpy as jnp, curvjax
  >>> f = jnp.array([1.0, -1.0, 0.5])
  >>> s = curvjax.losses.cross_entropy.hessian_factor(f, jnp.asarray(0))
  >>> bool(jnp.allclose(s @ s.T, jax.hessian(curvjax.losses.cross_entropy.value)(f, 0), atol=1e-6))
  True
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Float

Array = jax.Array


def _eigh_factor(value: Callable, f: Array, y: Any) -> Array:
    """``V diag(√max(λ, 0))`` of the eigendecomposition of ``∇²_f value(f, y)``."""
    hess = jax.hessian(value)(f, y)
    eigvals, eigvecs = jnp.linalg.eigh(0.5 * (hess + hess.T))
    return eigvecs * jnp.sqrt(jnp.maximum(eigvals, 0.0))[None, :]


def _signed_eigh_factor(value: Callable, f: Array, y: Any) -> tuple[Array, Array]:
    """``(V diag(√|λ|), sign λ)`` of the eigendecomposition of ``∇²_f value(f, y)``."""
    hess = jax.hessian(value)(f, y)
    eigvals, eigvecs = jnp.linalg.eigh(0.5 * (hess + hess.T))
    return eigvecs * jnp.sqrt(jnp.abs(eigvals))[None, :], jnp.sign(eigvals)


@dataclasses.dataclass(frozen=True)
class Loss:
    """A loss of one output vector with its output-Hessian factor.

    .. math::
        ℓ = ℓ(f, y), \\qquad ∇^2_f ℓ = S S^⊤, \\qquad
        \\mathbb{E}_{ŷ \\sim p(y | f)}\\big[∇_f ℓ(f, ŷ) ∇_f ℓ(f, ŷ)^⊤\\big] = S S^⊤ .

    All functions act on one output vector: ``f`` has shape ``[C]`` and ``y`` the shape of one
    target (a scalar label, or ``[C]``). curvjax applies them to every example and position of the
    outputs ``[N, *P, C]``.

    If ``hessian_factor`` is omitted it is computed from ``value``: the output Hessian
    ``H = ∇²_f ℓ(f, y)`` by ``jax.hessian`` (``C`` forward-over-reverse passes per output vector)
    and its eigendecomposition ``H = V diag(λ) Vᵀ`` give ``S = V diag(√max(λ, 0))``. Negative
    eigenvalues are clamped to zero, so for a loss that is not convex in ``f`` the GGN quantities
    use ``H₊ = V diag(max(λ, 0)) Vᵀ``, the positive-semidefinite matrix nearest to ``H`` (a GGN
    needs a positive-semidefinite loss Hessian); :meth:`signed_hessian_factor` still returns the
    exact ``H = V diag(√|λ|) diag(sign λ) diag(√|λ|) Vᵀ``. The eigendecomposition costs ``O(C³)``
    per output vector; give ``hessian_factor`` when ``C`` is large.

    Args:
      name: a short name used in messages.
      value: ``(f, y) -> scalar``, the loss ``ℓ(f, y)`` of one output vector.
      hessian_factor: ``(f, y) -> [C, K]`` with ``S Sᵀ = ∇²_f ℓ(f, y)`` (usually ``K = C``), or
        a positive-semidefinite surrogate of an indefinite ``∇²_f ℓ`` (then also give
        ``exact_hessian_factor``). ``None``: computed from ``value`` as above.
      sample_output_grads: ``(key, f, mc_samples) -> [C, M]``, columns ``∇_f ℓ(f, ŷ_m)`` with
        ``ŷ_m`` drawn from the model's predictive ``p(y | f)`` (not yet scaled by ``1/√M``), so
        that ``E[S̃ S̃ᵀ] = S Sᵀ``. ``None`` if the loss has no predictive distribution;
        Monte-Carlo quantities then raise.
      check_targets: optional ``(outputs, targets) -> None`` that raises ``ValueError`` for targets
        the loss cannot take; ``outputs`` is a ``jax.ShapeDtypeStruct`` ``[N, *P, C]`` and
        ``targets`` concrete arrays ``[N, *P, ...]`` (called outside of ``jit`` only).
      exact_hessian_factor: optional ``(f, y) -> ([C, K'], [K'])``, a factor ``U`` and signs
        ``d ∈ {−1, 0, 1}`` with ``U diag(d) Uᵀ = ∇²_f ℓ(f, y)`` exactly, for losses whose
        ``hessian_factor`` is a surrogate; see :meth:`signed_hessian_factor`.
      factor_product: optional ``(f, y, u [C]) -> S Sᵀ u`` without forming ``S`` (``O(C)``
        instead of ``O(C²)`` for the softmax); see :meth:`factor_times`.

    Example:
      >>> import jax, jax.numpy as jnp, curvjax
      >>> half_mse = curvjax.losses.Loss(
      ...     name="half_mse",
      ...     value=lambda f, y: 0.5 * jnp.sum((f - y) ** 2),
      ...     hessian_factor=lambda f, y: jnp.eye(f.shape[0], dtype=f.dtype),
      ... )
      >>> float(half_mse.value(jnp.ones(3), jnp.zeros(3)))
      1.5
      >>> log_cosh = curvjax.losses.Loss(
      ...     name="log_cosh", value=lambda f, y: jnp.sum(jnp.log(jnp.cosh(f - y)))
      ... )
      >>> s = log_cosh.hessian_factor(jnp.array([0.0, 1.0]), jnp.zeros(2))  # from jax.hessian
      >>> [round(float(h), 4) for h in jnp.diag(s @ s.T)]  # 1 / cosh²(f − y)
      [1.0, 0.42]
    """

    name: str
    value: Callable[[Array, Any], Array]
    hessian_factor: Callable[[Array, Any], Array] | None = None
    sample_output_grads: Callable[[Array, Array, int], Array] | None = None
    check_targets: Callable[[Any, Any], None] | None = None
    exact_hessian_factor: Callable[[Array, Any], tuple[Array, Array]] | None = None
    factor_product: Callable[[Array, Any, Array], Array] | None = None

    def __post_init__(self):
        if not callable(self.value):
            raise TypeError(
                f"loss {self.name!r}: `value` must be a function (f, y) -> scalar, "
                f"got {type(self.value).__name__}."
            )
        if self.hessian_factor is None:
            object.__setattr__(self, "hessian_factor", functools.partial(_eigh_factor, self.value))
            if self.exact_hessian_factor is None:
                object.__setattr__(
                    self,
                    "exact_hessian_factor",
                    functools.partial(_signed_eigh_factor, self.value),
                )

    def output_grad(self, f: Float[Array, " C"], y: Any) -> Float[Array, " C"]:
        """``∇_f ℓ(f, y)`` for one output vector, by automatic differentiation of ``value``."""
        return jax.grad(self.value)(f, y)

    def factor_times(
        self, f: Float[Array, " C"], y: Any, u: Float[Array, " C"]
    ) -> Float[Array, " C"]:
        """``S Sᵀ u`` (the GGN's loss-Hessian product), by ``factor_product`` when the loss has
        one, else through ``hessian_factor``."""
        if self.factor_product is not None:
            return self.factor_product(f, y, u)
        s = self.hessian_factor(f, y)
        return s @ (s.T @ u)

    def signed_hessian_factor(
        self, f: Float[Array, " C"], y: Any
    ) -> tuple[Float[Array, "C K"], Float[Array, " K"]]:
        """A signed factorisation of the exact output Hessian, ``∇²_f ℓ = U diag(d) Uᵀ``.

        ``(hessian_factor(f, y), 1)`` unless the loss's ``hessian_factor`` is a
        positive-semidefinite surrogate of an indefinite Hessian (``gaussian_nll``, or a clamped
        automatic factor), where the exact ``U`` and signs ``d ∈ {−1, 0, 1}`` are returned.
        Quantities of the Hessian (rather than of the GGN) use this.
        """
        if self.exact_hessian_factor is not None:
            return self.exact_hessian_factor(f, y)
        s = self.hessian_factor(f, y)
        return s, jnp.ones(s.shape[1], s.dtype)

    def mc_factor(self, key: Array, f: Float[Array, " C"], mc_samples: int) -> Float[Array, "C M"]:
        """``[C, M]`` Monte-Carlo factor ``S̃`` with ``E[S̃ S̃ᵀ] = S Sᵀ`` for one output vector."""
        if self.sample_output_grads is None:
            raise ValueError(
                f"loss {self.name!r} defines no predictive distribution "
                "(`sample_output_grads=None`), so Monte-Carlo quantities are unavailable; "
                "use the exact quantity instead (e.g. `ggn_diag` rather than `ggn_diag_mc`) or "
                "give the loss a `sample_output_grads=(key, f, mc_samples) -> [C, M]`."
            )
        columns = self.sample_output_grads(key, f, mc_samples)
        return columns / jnp.sqrt(jnp.asarray(mc_samples, dtype=f.dtype))


# -- target checks ----------------------------------------------------------------------------


def _as_array(targets):
    """Concrete targets as a numpy array; abstract ones (a ``jax.ShapeDtypeStruct``, the targets
    under ``jit``) unchanged: their shape and dtype are checked, their values are not."""
    if isinstance(targets, jax.ShapeDtypeStruct):
        return targets
    return np.asarray(targets)


def _concrete(targets) -> bool:
    return isinstance(targets, np.ndarray) and targets.size > 0


def _check_labels(name: str, outputs, targets) -> None:
    """Integer labels ``[N, *P]`` in ``[0, C)``."""
    targets = _as_array(targets)
    expected = tuple(outputs.shape[:-1])
    if not np.issubdtype(targets.dtype, np.integer):
        raise ValueError(
            f"loss {name!r} takes integer class labels of shape [N, *P] = {expected}, got "
            f"targets of dtype {targets.dtype}; convert one-hot targets with "
            "`targets.argmax(-1)`, or use 'soft_cross_entropy' for probability targets."
        )
    if targets.shape != expected:
        raise ValueError(
            f"loss {name!r} takes labels of shape [N, *P] = {expected} for outputs of shape "
            f"{tuple(outputs.shape)}, got targets of shape {targets.shape}."
        )
    num_classes = outputs.shape[-1]
    if _concrete(targets) and (targets.min() < 0 or targets.max() >= num_classes):
        raise ValueError(
            f"loss {name!r}: labels must lie in [0, {num_classes}) for a model with "
            f"{num_classes} outputs, got labels in [{targets.min()}, {targets.max()}]; "
            "give padded positions weight 0 in batch[2] rather than an out-of-range label."
        )


def _dense_targets(name: str, outputs, targets, expected: tuple, what: str) -> np.ndarray:
    targets = _as_array(targets)
    if not (np.issubdtype(targets.dtype, np.number) or targets.dtype == np.bool_):
        raise ValueError(f"loss {name!r} takes numeric targets, got dtype {targets.dtype}.")
    if targets.shape != expected:
        raise ValueError(
            f"loss {name!r} takes {what} of shape {expected} for outputs of shape "
            f"{tuple(outputs.shape)}, got targets of shape {targets.shape}."
        )
    return targets


def _tolerance(dtype) -> float:
    eps = np.finfo(dtype).eps if np.issubdtype(dtype, np.floating) else 0.0
    return max(1e-3, 8 * float(eps))


def _check_probabilities(name: str, outputs, targets) -> None:
    """Rows ``[N, *P, C]`` of non-negative numbers summing to one."""
    targets = _dense_targets(
        name, outputs, targets, tuple(outputs.shape), "probability targets [N, *P, C]"
    )
    if not np.issubdtype(targets.dtype, np.floating):
        raise ValueError(
            f"loss {name!r} takes floating-point probability targets, got dtype {targets.dtype}; "
            "use 'cross_entropy' for integer labels."
        )
    if not _concrete(targets):
        return
    tol = _tolerance(targets.dtype)
    sums = targets.astype(np.float64).sum(-1)
    if targets.min() < -tol or np.abs(sums - 1).max() > tol:
        raise ValueError(
            f"loss {name!r} takes probability targets (non-negative, each row over the last axis "
            f"summing to 1), got entries in [{targets.min()}, {targets.max()}] and row sums in "
            f"[{sums.min()}, {sums.max()}]."
        )


def _check_unit_interval(name: str, outputs, targets) -> None:
    """Values ``[N, *P, C]`` in ``[0, 1]``."""
    targets = _dense_targets(
        name, outputs, targets, tuple(outputs.shape), "targets in [0, 1] of shape [N, *P, C]"
    )
    if _concrete(targets) and (targets.min() < 0 or targets.max() > 1):
        raise ValueError(
            f"loss {name!r} takes targets in [0, 1] (one probability per output), got values in "
            f"[{targets.min()}, {targets.max()}]."
        )


def _check_gaussian(name: str, outputs, targets) -> None:
    """Real targets ``[N, *P, D]`` for outputs ``[N, *P, 2D]``."""
    c = outputs.shape[-1]
    if c % 2:
        raise ValueError(
            f"loss {name!r} reads the outputs' last axis as D means followed by D log-variances, "
            f"so it must have an even length, got outputs of shape {tuple(outputs.shape)}."
        )
    expected = (*outputs.shape[:-1], c // 2)
    _dense_targets(name, outputs, targets, expected, "targets [N, *P, D] (D = C/2)")


def _check_same_shape(name: str, outputs, targets) -> None:
    """Real targets of the outputs' shape."""
    _dense_targets(name, outputs, targets, tuple(outputs.shape), "targets [N, *P, C]")


# -- softmax cross-entropy family ------------------------------------------------------------------


def _softmax_factor(f: Array, y: Any) -> Array:
    del y
    p = jax.nn.softmax(f)
    sqrt_p = jnp.sqrt(p)
    return jnp.diag(sqrt_p) - jnp.outer(p, sqrt_p)


def _softmax_product(f: Array, y: Any, u: Array) -> Array:
    del y
    p = jax.nn.softmax(f)
    return p * u - p * jnp.sum(p * u)  # (diag(p) - p pᵀ) u


def _categorical_samples(key: Array, f: Array, mc_samples: int) -> Array:
    p = jax.nn.softmax(f)
    labels = jax.random.categorical(key, f, shape=(mc_samples,))
    return p[:, None] - jax.nn.one_hot(labels, f.shape[0], dtype=f.dtype).T


def _cross_entropy_value(f: Array, y: Array) -> Array:
    return -jax.nn.log_softmax(f)[y]


def _soft_cross_entropy_value(f: Array, y: Array) -> Array:
    return -jnp.sum(y * jax.nn.log_softmax(f))


def _smoothed_cross_entropy_value(alpha: float, f: Array, y: Array) -> Array:
    num_classes = f.shape[0]
    q = (1.0 - alpha) * jax.nn.one_hot(y, num_classes, dtype=f.dtype) + alpha / num_classes
    return -jnp.sum(q * jax.nn.log_softmax(f))


class _CrossEntropy(Loss):
    """Softmax cross-entropy with integer class labels.

    .. math::
        ℓ(f, y) = -\\log p_y, \\quad p = \\mathrm{softmax}(f), \\qquad
        ∇^2_f ℓ = \\mathrm{diag}(p) - p p^⊤ = S S^⊤, \\quad
        S = \\mathrm{diag}(\\sqrt{p}) - p \\sqrt{p}^⊤ .

    Targets: integer labels ``[N, *P]`` in ``[0, C)`` for outputs ``[N, *P, C]``. Monte-Carlo
    columns: ``p − e_ŷ`` with ``ŷ ~ Categorical(p)``.

    Example:
      >>> import jax.numpy as jnp, curvjax
      >>> f = jnp.log(jnp.array([0.5, 0.25, 0.25]))
      >>> round(float(curvjax.losses.cross_entropy.value(f, 1)), 4)  # -log 0.25
      1.3863
    """


class _SoftCrossEntropy(Loss):
    """Softmax cross-entropy with probability (soft) targets.

    .. math::
        ℓ(f, y) = -\\sum_c y_c \\log p_c, \\quad p = \\mathrm{softmax}(f), \\qquad
        ∇^2_f ℓ = \\Big(\\sum_c y_c\\Big) (\\mathrm{diag}(p) - p p^⊤) = \\mathrm{diag}(p) - p p^⊤ .

    The targets are probability vectors (``Σ_c y_c = 1``), so the output Hessian, its factor and
    the Monte-Carlo columns (``p − e_ŷ``, ``ŷ ~ Categorical(p)``) are those of
    ``cross_entropy``. Targets: ``[N, *P, C]``, non-negative, each row summing to 1 (a one-hot row
    gives ``cross_entropy``).

    Example:
      >>> import jax.numpy as jnp, curvjax
      >>> f = jnp.log(jnp.array([0.5, 0.25, 0.25]))
      >>> y = jnp.array([0.5, 0.5, 0.0])
      >>> round(float(curvjax.losses.soft_cross_entropy.value(f, y)), 4)  # ½ log 2 + ½ log 4
      1.0397
    """


class _LabelSmoothedCrossEntropy(Loss):
    """Softmax cross-entropy against labels smoothed towards the uniform distribution.

    .. math::
        ℓ(f, y) = -\\sum_c q_c \\log p_c, \\quad q = (1 - α) e_y + α / C, \\qquad
        ∇^2_f ℓ = \\mathrm{diag}(p) - p p^⊤ .

    Made by :func:`cross_entropy_with_label_smoothing`; integer labels ``[N, *P]``, the factor and
    the Monte-Carlo columns of ``cross_entropy``.

    Example:
      >>> import jax.numpy as jnp, curvjax
      >>> loss = curvjax.losses.cross_entropy_with_label_smoothing(0.0)
      >>> f = jnp.log(jnp.array([0.5, 0.25, 0.25]))
      >>> round(float(loss.value(f, 1)), 4)  # α = 0 is cross_entropy
      1.3863
    """


def cross_entropy_with_label_smoothing(alpha: float) -> Loss:
    """Softmax cross-entropy with label smoothing ``alpha``, for integer labels.

    The label ``y`` is replaced by the distribution ``q = (1 − α) e_y + α/C`` (the convention of
    ``optax.smooth_labels`` and of ``torch.nn.CrossEntropyLoss(label_smoothing=α)``):

    .. math::
        ℓ(f, y) = -\\sum_c q_c \\log p_c
                = (1 - α) (-\\log p_y) + \\frac{α}{C} \\sum_c (-\\log p_c), \\qquad
        ∇^2_f ℓ = \\mathrm{diag}(p) - p p^⊤ ,

    since ``Σ_c q_c = 1``: the output Hessian, its factor and the Monte-Carlo columns
    (``p − e_ŷ``, ``ŷ ~ Categorical(p)``, the model's own predictive) are those of
    ``cross_entropy``; only the value and the gradient change.

    Args:
      alpha: the smoothing, ``0 ≤ α ≤ 1`` (``0`` is ``cross_entropy``).

    Returns:
      a :class:`Loss` taking integer labels ``[N, *P]`` for outputs ``[N, *P, C]``.

    Example:
      >>> import jax.numpy as jnp, curvjax
      >>> loss = curvjax.losses.cross_entropy_with_label_smoothing(0.3)
      >>> f = jnp.log(jnp.array([0.5, 0.25, 0.25]))
      >>> round(float(loss.value(f, 0)), 4)  # 0.8 log 2 + 0.2 log 4
      0.8318

    References:
      Szegedy et al., "Rethinking the Inception architecture for computer vision", CVPR 2016, §7.
    """
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not 0 <= alpha <= 1:
        raise ValueError(
            f"`alpha` (the label smoothing) must be a number in [0, 1], got {alpha!r}."
        )
    alpha = float(alpha)
    name = f"cross_entropy_with_label_smoothing({alpha})"
    return _LabelSmoothedCrossEntropy(
        name=name,
        value=functools.partial(_smoothed_cross_entropy_value, alpha),
        hessian_factor=_softmax_factor,
        factor_product=_softmax_product,
        sample_output_grads=_categorical_samples,
        check_targets=functools.partial(_check_labels, name),
    )


# -- sigmoid binary cross-entropy ------------------------------------------------------------------


def _sigmoid_bce_value(f: Array, y: Array) -> Array:
    # -y log σ(f) - (1 - y) log σ(-f) = softplus(f) - y f
    return jnp.sum(jax.nn.softplus(f) - y * f)


def _sigmoid_bce_factor(f: Array, y: Array) -> Array:
    del y
    # √(σ(f) σ(-f)) in log space: no cancellation in 1 - σ(f) for large f
    return jnp.diag(jnp.exp(0.5 * (jax.nn.log_sigmoid(f) + jax.nn.log_sigmoid(-f))))


def _sigmoid_bce_product(f: Array, y: Array, u: Array) -> Array:
    del y
    return jnp.exp(jax.nn.log_sigmoid(f) + jax.nn.log_sigmoid(-f)) * u


def _sigmoid_bce_samples(key: Array, f: Array, mc_samples: int) -> Array:
    sigma = jax.nn.sigmoid(f)
    labels = jax.random.bernoulli(key, sigma[:, None], (f.shape[0], mc_samples))
    return sigma[:, None] - labels.astype(f.dtype)


class _SigmoidBinaryCrossEntropy(Loss):
    """Sigmoid binary cross-entropy, one independent binary label per output (multi-label).

    .. math::
        ℓ(f, y) = \\sum_c -y_c \\log σ(f_c) - (1 - y_c) \\log(1 - σ(f_c))
                = \\sum_c \\mathrm{softplus}(f_c) - y_c f_c , \\qquad
        ∇^2_f ℓ = \\mathrm{diag}\\big(σ(f)(1 - σ(f))\\big) = S S^⊤ .

    Targets: ``[N, *P, C]`` in ``[0, 1]`` (hard 0/1 labels or soft probabilities; boolean,
    integer or floating). Monte-Carlo columns: ``σ(f) − ŷ`` with independent
    ``ŷ_c ~ Bernoulli(σ(f_c))``.

    Example:
      >>> import jax.numpy as jnp, curvjax
      >>> loss = curvjax.losses.sigmoid_binary_cross_entropy
      >>> round(float(loss.value(jnp.zeros(2), jnp.array([1.0, 0.0]))), 4)  # 2 log 2
      1.3863
      >>> loss.hessian_factor(jnp.zeros(2), None).tolist()  # √(½ · ½)
      [[0.5, 0.0], [0.0, 0.5]]
    """


# -- heteroscedastic Gaussian ----------------------------------------------------------------------


def _split_gaussian(f: Array) -> tuple[Array, Array]:
    c = f.shape[0]
    if c % 2:
        raise ValueError(
            "loss 'gaussian_nll' reads an output vector as D means followed by D log-variances, "
            f"so its length must be even, got {c}."
        )
    return f[: c // 2], f[c // 2 :]


def _gaussian_nll_value(f: Array, y: Array) -> Array:
    mean, log_var = _split_gaussian(f)
    return 0.5 * jnp.sum(math.log(2 * math.pi) + log_var + (y - mean) ** 2 * jnp.exp(-log_var))


def _gaussian_fisher_factor(f: Array, y: Array) -> Array:
    del y
    _, log_var = _split_gaussian(f)
    half = jnp.full_like(log_var, math.sqrt(0.5))
    return jnp.diag(jnp.concatenate([jnp.exp(-0.5 * log_var), half]))


def _gaussian_exact_factor(f: Array, y: Array) -> tuple[Array, Array]:
    # Per target: [[a², a² r], [a² r, ½ a² r²]] = a² (1, r)(1, r)ᵀ − ½ a² r² e₂e₂ᵀ, a = e^{-s/2}.
    mean, log_var = _split_gaussian(f)
    a = jnp.exp(-0.5 * log_var)
    ar = a * (y - mean)
    zeros = jnp.zeros((a.shape[0], a.shape[0]), f.dtype)
    u = jnp.block([[jnp.diag(a), zeros], [jnp.diag(ar), jnp.diag(ar) / math.sqrt(2.0)]])
    signs = jnp.concatenate([jnp.ones_like(a), -jnp.ones_like(a)])
    return u, signs


def _gaussian_samples(key: Array, f: Array, mc_samples: int) -> Array:
    # ŷ = μ + e^{s/2} z: ∇_μ ℓ = -z e^{-s/2}, ∇_s ℓ = ½ (1 - z²)
    _, log_var = _split_gaussian(f)
    z = jax.random.normal(key, (log_var.shape[0], mc_samples), dtype=f.dtype)
    return jnp.concatenate([-z * jnp.exp(-0.5 * log_var)[:, None], 0.5 * (1.0 - z**2)], axis=0)


class _GaussianNLL(Loss):
    """Gaussian negative log-likelihood with a predicted mean and log-variance (heteroscedastic).

    The output vector ``f = (μ_1..μ_D, s_1..s_D)`` holds ``D`` means followed by ``D``
    log-variances ``s = log σ²``, so ``C = 2D``; the targets are ``[N, *P, D]``:

    .. math::
        ℓ(f, y) = \\frac12 \\sum_d \\Big(\\log 2π + s_d + (y_d - μ_d)^2 e^{-s_d}\\Big) .

    Its exact output Hessian, per target ``d`` in the coordinates ``(μ_d, s_d)`` with
    ``r = y_d − μ_d``,

    .. math::
        ∇^2 ℓ = e^{-s_d} \\begin{pmatrix} 1 & r \\\\ r & r^2/2 \\end{pmatrix} ,

    has determinant ``−½ r² e^{−2 s_d} ≤ 0``: it is indefinite wherever ``y_d ≠ μ_d``, and a GGN
    needs a positive-semidefinite loss Hessian. ``hessian_factor`` therefore factors its
    expectation under the model's predictive ``ŷ ~ N(μ, diag(e^s))``, the Fisher information

    .. math::
        F = \\mathbb{E}_ŷ\\big[∇^2_f ℓ(f, ŷ)\\big] = \\mathbb{E}_ŷ\\big[∇_f ℓ ∇_f ℓ^⊤\\big]
          = \\mathrm{diag}(e^{-s_1}, …, e^{-s_D}, ½, …, ½) = S S^⊤ ,

    so the GGN quantities of this loss (``ggn_diag``, ``kflr``, ``ggn_vp``, …) are the
    Fisher-type GGN ``Σ Jᵀ F J``: the expected loss Hessian, which is the Fisher information of
    the model's predictive with respect to the parameters. The Monte-Carlo columns ``∇_f ℓ(f, ŷ) = (−z e^{−s/2}, ½(1 − z²))``,
    ``ŷ = μ + e^{s/2} z``, ``z ~ N(0, I)``, are unbiased for ``F``. Quantities of the exact
    Hessian use :meth:`signed_hessian_factor`, the exact signed factorisation
    ``e^{−s}(1, r)(1, r)ᵀ − ½ r² e^{−s} e_s e_sᵀ``.

    Example:
      >>> import jax.numpy as jnp, curvjax
      >>> loss = curvjax.losses.gaussian_nll
      >>> f = jnp.array([0.0, 0.0])  # μ = 0, log σ² = 0
      >>> round(float(loss.value(f, jnp.array([1.0]))), 4)  # ½ (log 2π + 1)
      1.4189
      >>> s = loss.hessian_factor(f, jnp.array([1.0]))
      >>> jnp.round(s @ s.T, 4).tolist()  # the Fisher diag(e^{-s}, ½)
      [[1.0, 0.0], [0.0, 0.5]]

    References:
      Kendall & Gal, "What uncertainties do we need in Bayesian deep learning for computer
      vision?", NeurIPS 2017 (the mean and log-variance outputs).
      Martens, "New insights and perspectives on the natural gradient method", JMLR 2020, §9
      (the GGN and the Fisher).
    """


# -- squared error ---------------------------------------------------------------------------------


def _mse_value(f: Array, y: Array) -> Array:
    return jnp.sum((f - y) ** 2)


def _mse_factor(f: Array, y: Array) -> Array:
    del y
    return jnp.sqrt(2.0) * jnp.eye(f.shape[0], dtype=f.dtype)


def _mse_product(f: Array, y: Array, u: Array) -> Array:
    del f, y
    return 2.0 * u


def _mse_samples(key: Array, f: Array, mc_samples: int) -> Array:
    # p(y | f) ∝ exp(-||f - y||²) is N(f, I/2); ∇_f ℓ(f, ŷ) = 2 (f - ŷ) = -√2 ε with ε ~ N(0, I).
    noise = jax.random.normal(key, (f.shape[0], mc_samples), dtype=f.dtype)
    return -jnp.sqrt(2.0) * noise


class _MSE(Loss):
    """Squared error, summed over the outputs (no ½, no mean over ``C``).

    .. math::
        ℓ(f, y) = \\lVert f - y \\rVert^2, \\qquad ∇^2_f ℓ = 2 I = S S^⊤, \\quad S = \\sqrt2 I .

    Targets: ``[N, *P, C]``. Monte-Carlo columns: ``2(f − ŷ)`` with ``ŷ ~ N(f, I/2)``, the
    Gaussian whose negative log-likelihood is ``ℓ`` up to a constant.

    Example:
      >>> import jax.numpy as jnp, curvjax
      >>> float(curvjax.losses.mse.value(jnp.array([1.0, 2.0]), jnp.array([0.0, 0.0])))
      5.0
    """


cross_entropy: Loss = _CrossEntropy(
    name="cross_entropy",
    value=_cross_entropy_value,
    hessian_factor=_softmax_factor,
    factor_product=_softmax_product,
    sample_output_grads=_categorical_samples,
    check_targets=functools.partial(_check_labels, "cross_entropy"),
)

soft_cross_entropy: Loss = _SoftCrossEntropy(
    name="soft_cross_entropy",
    value=_soft_cross_entropy_value,
    hessian_factor=_softmax_factor,
    factor_product=_softmax_product,
    sample_output_grads=_categorical_samples,
    check_targets=functools.partial(_check_probabilities, "soft_cross_entropy"),
)

sigmoid_binary_cross_entropy: Loss = _SigmoidBinaryCrossEntropy(
    name="sigmoid_binary_cross_entropy",
    value=_sigmoid_bce_value,
    hessian_factor=_sigmoid_bce_factor,
    factor_product=_sigmoid_bce_product,
    sample_output_grads=_sigmoid_bce_samples,
    check_targets=functools.partial(_check_unit_interval, "sigmoid_binary_cross_entropy"),
)

gaussian_nll: Loss = _GaussianNLL(
    name="gaussian_nll",
    value=_gaussian_nll_value,
    hessian_factor=_gaussian_fisher_factor,
    sample_output_grads=_gaussian_samples,
    check_targets=functools.partial(_check_gaussian, "gaussian_nll"),
    exact_hessian_factor=_gaussian_exact_factor,
)

mse: Loss = _MSE(
    name="mse",
    value=_mse_value,
    hessian_factor=_mse_factor,
    factor_product=_mse_product,
    sample_output_grads=_mse_samples,
    check_targets=functools.partial(_check_same_shape, "mse"),
)

#: the built-in losses without parameters, by the name ``loss=`` accepts
LOSSES: dict[str, Loss] = {
    loss.name: loss
    for loss in (cross_entropy, soft_cross_entropy, sigmoid_binary_cross_entropy, gaussian_nll, mse)
}


_ABSTRACT_CHECKS = (
    _check_labels,
    _check_probabilities,
    _check_unit_interval,
    _check_gaussian,
    _check_same_shape,
)


def checks_abstract_targets(loss: Loss) -> bool:
    """Whether ``loss.check_targets`` also takes ``jax.ShapeDtypeStruct`` targets (the built-in
    checks do: under ``jit`` they check the targets' shape and dtype; a user's check is called on
    concrete targets only)."""
    check = loss.check_targets
    return isinstance(check, functools.partial) and check.func in _ABSTRACT_CHECKS


def resolve(loss: str | Loss) -> Loss:
    """The :class:`Loss` named by ``loss`` (a key of ``LOSSES``), or ``loss`` itself.

    Example:
      >>> import curvjax
      >>> curvjax.losses.resolve("gaussian_nll").name
      'gaussian_nll'
    """
    if isinstance(loss, Loss):
        return loss
    if isinstance(loss, str) and loss in LOSSES:
        return LOSSES[loss]
    raise ValueError(
        f"unsupported loss {loss!r}: use one of {sorted(LOSSES)}, "
        "`curvjax.losses.cross_entropy_with_label_smoothing(alpha)`, or a `curvjax.losses.Loss` "
        "that supplies the per-position value (and optionally the output-Hessian factor)."
    )
