"""Losses that know the factorisation of their output Hessian.

A :class:`Loss` describes one example: its value ``ℓ(f_n, y_n)`` for an output vector ``f_n`` of
C entries, a symmetric factor ``S_n`` of the output Hessian ``H_n = ∇²_f ℓ = S_n S_nᵀ`` and Monte-Carlo
factors ``S̃_n`` (M columns ``∇_f ℓ(f_n, ŷ_m) / √M`` with ``ŷ_m ~ p(y | f_n)``) whose outer product is
an unbiased estimate of ``H_n``. Everything else in curvjax vmaps these per-example functions.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

REDUCTIONS = ("mean", "sum")


@dataclasses.dataclass(frozen=True)
class Loss:
    """A per-example loss with its output-Hessian factor.

    .. math::
        ℓ_n = ℓ(f_n, y_n), \\qquad ∇^2_f ℓ_n = S_n S_n^⊤, \\qquad
        \\mathbb{E}_{ŷ \\sim p(y | f_n)}\\big[∇_f ℓ(f_n, ŷ) ∇_f ℓ(f_n, ŷ)^⊤\\big] = ∇^2_f ℓ_n .

    All functions act on one example: ``f`` has shape ``[C]``, ``y`` the shape of one target.

    Args:
      name: a short name used in messages.
      value: ``(f, y) -> scalar``, the per-example loss ``ℓ(f, y)``.
      hessian_factor: ``(f, y) -> [C, K]`` with ``S Sᵀ = ∇²_f ℓ(f, y)`` (usually ``K = C``).
      sample_output_grads: ``(key, f, mc_samples) -> [C, M]``, columns ``∇_f ℓ(f, ŷ_m)`` with
        ``ŷ_m`` drawn from the model's predictive ``p(y | f)`` (not yet scaled by ``1/√M``).
        ``None`` if the loss has no predictive distribution; Monte-Carlo quantities then raise.
      check_targets: optional ``(outputs [N, C], targets) -> None`` that raises ``ValueError`` for
        targets the loss cannot take (called outside of ``jit`` only where values are concrete).

    Example:
      >>> import jax.numpy as jnp, curvjax
      >>> half_mse = curvjax.losses.Loss(
      ...     name="half_mse",
      ...     value=lambda f, y: 0.5 * jnp.sum((f - y) ** 2),
      ...     hessian_factor=lambda f, y: jnp.eye(f.shape[0], dtype=f.dtype),
      ... )
      >>> float(half_mse.value(jnp.ones(3), jnp.zeros(3)))
      1.5
    """

    name: str
    value: Callable[[Array, Any], Array]
    hessian_factor: Callable[[Array, Any], Array]
    sample_output_grads: Callable[[Array, Array, int], Array] | None = None
    check_targets: Callable[[Array, Any], None] | None = None

    def output_grad(self, f: Array, y: Any) -> Array:
        """``∇_f ℓ(f, y)`` for one example, by automatic differentiation of ``value``."""
        return jax.grad(self.value)(f, y)

    def mc_factor(self, key: Array, f: Array, mc_samples: int) -> Array:
        """``[C, M]`` Monte-Carlo factor ``S̃`` with ``E[S̃ S̃ᵀ] = ∇²_f ℓ`` for one example."""
        if self.sample_output_grads is None:
            raise ValueError(
                f"loss {self.name!r} defines no predictive distribution "
                "(`sample_output_grads=None`), so Monte-Carlo quantities are unavailable; "
                "use the exact quantity instead (e.g. `ggn_diag` rather than `ggn_diag_mc`)."
            )
        columns = self.sample_output_grads(key, f, mc_samples)
        return columns / jnp.sqrt(jnp.asarray(mc_samples, dtype=f.dtype))


def _cross_entropy_value(f: Array, y: Array) -> Array:
    return -jax.nn.log_softmax(f)[y]


def _cross_entropy_factor(f: Array, y: Array) -> Array:
    del y
    p = jax.nn.softmax(f)
    sqrt_p = jnp.sqrt(p)
    return jnp.diag(sqrt_p) - jnp.outer(p, sqrt_p)


def _cross_entropy_samples(key: Array, f: Array, mc_samples: int) -> Array:
    p = jax.nn.softmax(f)
    labels = jax.random.categorical(key, f, shape=(mc_samples,))
    return p[:, None] - jax.nn.one_hot(labels, f.shape[0], dtype=f.dtype).T


def _cross_entropy_check(outputs: Array, targets: Array) -> None:
    targets = np.asarray(targets)
    if not np.issubdtype(targets.dtype, np.integer):
        raise ValueError(
            "loss 'cross_entropy' takes integer class labels of shape [N], got targets of dtype "
            f"{targets.dtype}; convert one-hot targets with `targets.argmax(-1)`."
        )
    if targets.shape != outputs.shape[:1]:
        raise ValueError(
            f"loss 'cross_entropy' takes labels of shape [N] = {outputs.shape[:1]}, "
            f"got targets of shape {targets.shape}."
        )
    num_classes = outputs.shape[-1]
    if targets.size and (targets.min() < 0 or targets.max() >= num_classes):
        raise ValueError(
            f"loss 'cross_entropy': labels must lie in [0, {num_classes}) for a model with "
            f"{num_classes} outputs, got labels in [{targets.min()}, {targets.max()}]."
        )


def _mse_value(f: Array, y: Array) -> Array:
    return jnp.sum((f - y) ** 2)


def _mse_factor(f: Array, y: Array) -> Array:
    del y
    return jnp.sqrt(2.0) * jnp.eye(f.shape[0], dtype=f.dtype)


def _mse_samples(key: Array, f: Array, mc_samples: int) -> Array:
    # p(y | f) ∝ exp(-||f - y||²) is N(f, I/2); ∇_f ℓ(f, ŷ) = 2 (f - ŷ) = -√2 ε with ε ~ N(0, I).
    noise = jax.random.normal(key, (f.shape[0], mc_samples), dtype=f.dtype)
    return -jnp.sqrt(2.0) * noise


def _mse_check(outputs: Array, targets: Array) -> None:
    targets = np.asarray(targets)
    if targets.shape != outputs.shape:
        raise ValueError(
            f"loss 'mse' takes targets of the outputs' shape {outputs.shape}, "
            f"got targets of shape {targets.shape}."
        )


cross_entropy = Loss(
    name="cross_entropy",
    value=_cross_entropy_value,
    hessian_factor=_cross_entropy_factor,
    sample_output_grads=_cross_entropy_samples,
    check_targets=_cross_entropy_check,
)

mse = Loss(
    name="mse",
    value=_mse_value,
    hessian_factor=_mse_factor,
    sample_output_grads=_mse_samples,
    check_targets=_mse_check,
)

LOSSES = {"cross_entropy": cross_entropy, "mse": mse}


def resolve(loss: str | Loss) -> Loss:
    """Return the :class:`Loss` named by ``loss`` (``"cross_entropy"`` or ``"mse"``) or ``loss``."""
    if isinstance(loss, Loss):
        return loss
    if isinstance(loss, str) and loss in LOSSES:
        return LOSSES[loss]
    raise ValueError(
        f"unsupported loss {loss!r}: use one of {sorted(LOSSES)} or a `curvjax.losses.Loss` "
        "that supplies the per-example value and the output-Hessian factor."
    )


def reduction_scale(reduction: str, num_examples: int) -> float:
    """``κ`` in ``L = κ Σ_n ℓ_n``: ``1/N`` for ``"mean"``, ``1`` for ``"sum"``."""
    if reduction == "mean":
        return 1.0 / num_examples
    if reduction == "sum":
        return 1.0
    raise ValueError(f"unsupported reduction {reduction!r}: use 'mean' or 'sum'.")
