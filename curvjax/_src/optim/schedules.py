"""Schedules of the Noisy K-FAC / KFAC-VI experiments: warm-up, polynomial decay, scaled momentum.

Both are plain optax schedules (``step -> value``, jit-able), usable with any optax transform.
"""

from __future__ import annotations

import jax.numpy as jnp
import optax


def warmup_polynomial_decay(
    *,
    init_value: float,
    base_value: float,
    warmup_steps: int,
    total_steps: int,
    steps_per_epoch: int,
    power: float,
) -> optax.Schedule:
    """Linear warm-up to ``base_value``, then polynomial decay (KFAC-VI, eq. 13-14).

    .. math::
        α^{(t)} = α^{(0)} + (α^{(\\text{base})} - α^{(0)}) \\frac{t}{T_\\text{start}}
        \\quad (t < T_\\text{start}),

        T'_\\text{fin} = T_\\text{fin} + T_\\text{epoch}, \\qquad
        α^{(t)} = α^{(\\text{base})}
        \\Big(1 - \\frac{t - T_\\text{start}}{T'_\\text{fin} - T_\\text{start}}\\Big)^{p_\\text{decay}}
        \\quad (t ≥ T_\\text{start}),

    with ``T_start = warmup_steps``, ``T_fin = total_steps``, ``T_epoch = steps_per_epoch`` and
    ``p_decay = power``. The warm-up is linear ("gradual warm-up", Goyal et al. 2017) and reaches
    ``base_value`` at ``t = T_start``; because ``T'_fin`` lies one epoch after the last step, the
    value stays positive during training. Past ``T'_fin`` the value is 0.

    Args:
      init_value: ``α^(0)``, the value at step 0.
      base_value: ``α^(base)``, the value at the end of the warm-up.
      warmup_steps: ``T_start`` (0 for no warm-up).
      total_steps: ``T_fin``, the number of training steps.
      steps_per_epoch: ``T_epoch``.
      power: ``p_decay``.

    Returns:
      An ``optax.Schedule``: ``step [] int -> value [] float``.

    Example:
      >>> from curvjax.optim import warmup_polynomial_decay
      >>> lr = warmup_polynomial_decay(init_value=0.1, base_value=1.0, warmup_steps=10,
      ...                              total_steps=100, steps_per_epoch=10, power=2.0)
      >>> [round(float(lr(t)), 4) for t in (0, 5, 10, 55, 110)]
      [0.1, 0.55, 1.0, 0.3025, 0.0]

    References:
      Nakata, Osawa & Yokota, "Variational deep learning based on natural gradient" (KFAC-VI),
      eq. 13-14; Goyal et al., "Accurate, large minibatch SGD", 2017 (gradual warm-up).
    """
    if warmup_steps < 0 or total_steps + steps_per_epoch <= warmup_steps:
        raise ValueError(
            f"need 0 <= warmup_steps < total_steps + steps_per_epoch, got warmup_steps="
            f"{warmup_steps}, total_steps={total_steps}, steps_per_epoch={steps_per_epoch}."
        )
    final = total_steps + steps_per_epoch

    def schedule(step):
        t = jnp.asarray(step).astype(jnp.result_type(float))
        if warmup_steps > 0:
            warm = init_value + (base_value - init_value) * t / warmup_steps
        else:
            warm = jnp.asarray(base_value, t.dtype)
        frac = jnp.clip((t - warmup_steps) / (final - warmup_steps), 0.0, 1.0)
        decay = base_value * (1.0 - frac) ** power
        return jnp.where(t < warmup_steps, warm, decay)

    return schedule


def proportional_momentum(
    base_momentum: float, learning_rate: optax.ScalarOrSchedule, base_learning_rate: float
) -> optax.Schedule:
    """Momentum that follows the learning rate: ``m^(t) = (α^(t) / α^(base)) m^(base)`` (eq. 6).

    .. math::
        m^{(t)} = \\frac{α^{(t)}}{α^{(\\text{base})}} \\, m^{(\\text{base})}

    With :func:`warmup_polynomial_decay` the momentum ramps up with the learning rate during the
    warm-up, reaches ``base_momentum`` with it and decays with it.

    Args:
      base_momentum: ``m^(base)``.
      learning_rate: the learning rate ``α^(t)`` (a float or an optax schedule).
      base_learning_rate: ``α^(base)`` (must be positive).

    Returns:
      An ``optax.Schedule``: ``step -> m^(t)``.

    Example:
      >>> from curvjax.optim import proportional_momentum
      >>> momentum = proportional_momentum(0.9, lambda t: 0.5 / (1 + t), base_learning_rate=0.5)
      >>> round(float(momentum(1)), 4)
      0.45

    References:
      Nakata, Osawa & Yokota, "Variational deep learning based on natural gradient" (KFAC-VI),
      eq. 6.
    """
    if not base_learning_rate > 0:
        raise ValueError(f"base_learning_rate must be positive, got {base_learning_rate}.")

    def schedule(step):
        alpha = learning_rate(step) if callable(learning_rate) else learning_rate
        return base_momentum * jnp.asarray(alpha) / base_learning_rate

    return schedule
