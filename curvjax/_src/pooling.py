"""Max-pooling whose derivative is a masked selection, fast to backpropagate many vectors through.

JAX differentiates ``reduce_window_max`` by a select-and-scatter that XLA runs element by element
on CPU; backpropagating the ``C`` columns of the loss-Hessian factor through DeepOBS 3C3D spent
three quarters of its time there. Here the forward pass also records, for every output window
``j``, the offset ``o_j`` of its maximum inside the window (the first one in row-major window order
when several elements tie, the choice of XLA's select-and-scatter with ``≥``). The derivative is
the selection ``ẏ_j = ẋ_{s j + d o_j - p_lo}`` (stride ``s``, window dilation ``d``, low padding
``p_lo``); its transpose, which backpropagation applies, is written as a gather: split every input
axis into ``s`` phases (``p + p_lo = s J + r``); phase ``r`` receives, from each window offset
``o`` with ``d o ≡ r (mod s)``, the cotangent of window ``J - ⌊d o / s⌋`` if that window chose
``o``. Only slices and selects, which XLA fuses into one loop per phase, then an interleave of the
phases. The derivative is defined through that transpose (``jax.linear_transpose``), so forward
mode works as well, and reverse mode transposes it back to the gather.
Values and derivatives are exactly those of ``lax.reduce_window_max``.
"""

from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
from jax import lax


def supported(eqn) -> bool:
    """A floating-point ``reduce_window_max`` without base dilation."""
    return (
        eqn.primitive is lax.reduce_window_max_p
        and all(d == 1 for d in eqn.params["base_dilation"])
        and jnp.issubdtype(eqn.invars[0].aval.dtype, jnp.floating)
    )


def override(eqn):
    """The evaluation of ``eqn`` with the selection-based derivative, or ``None`` if unsupported."""
    if not supported(eqn):
        return None
    return lambda invals: [reduce_window_max(invals[0], eqn.params)]


def reduce_window_max(x, params: dict):
    """``lax.reduce_window_max_p.bind(x, **params)`` with the selection-based derivative."""
    return _max_pool(
        x,
        tuple(params["window_dimensions"]),
        tuple(params["window_strides"]),
        tuple(tuple(p) for p in params["padding"]),
        tuple(params["window_dilation"]),
    )


def _bind(x, window, strides, padding, dilation):
    return lax.reduce_window_max_p.bind(
        x,
        window_dimensions=window,
        window_strides=strides,
        padding=padding,
        base_dilation=(1,) * x.ndim,
        window_dilation=dilation,
    )


def _offsets(window):
    return list(itertools.product(*(range(w) for w in window)))


def _chosen_offset(x, y, window, strides, padding, dilation):
    """For every output window, the row-major index of its (first) maximal element; -1 if none."""
    fill = jnp.array(-jnp.inf, x.dtype)
    x_pad = lax.pad(x, fill, [(lo, hi, 0) for lo, hi in padding])
    chosen = jnp.full(y.shape, -1, jnp.int32)
    for k, offset in enumerate(_offsets(window)):
        start = [o * d for o, d in zip(offset, dilation, strict=True)]
        limit = [s + (n - 1) * k + 1 for s, n, k in zip(start, y.shape, strides, strict=True)]
        hit = lax.slice(x_pad, start, limit, strides) == y
        chosen = jnp.where((chosen < 0) & hit, k, chosen)
    return chosen


def _transpose(ct, chosen, in_shape, window, strides, padding, dilation):
    """The cotangent of the pooling input: ``x̄_p = Σ_j [s j + d o_j - p_lo = p] ȳ_j`` (a gather)."""
    offsets = _offsets(window)
    shifts = [
        [(o * d) // s for o, d, s in zip(off, dilation, strides, strict=True)] for off in offsets
    ]
    phases = [
        tuple((o * d) % s for o, d, s in zip(off, dilation, strides, strict=True))
        for off in offsets
    ]
    qmax = [max(q[a] for q in shifts) for a in range(ct.ndim)]
    coarse = [n + q for n, q in zip(ct.shape, qmax, strict=True)]
    ct_pad = lax.pad(ct, jnp.zeros((), ct.dtype), [(q, q, 0) for q in qmax])
    chosen_pad = lax.pad(chosen, jnp.int32(-1), [(q, q, 0) for q in qmax])
    parts = []
    for phase in itertools.product(*(range(s) for s in strides)):
        total = jnp.zeros(coarse, ct.dtype)
        for k, (shift, r) in enumerate(zip(shifts, phases, strict=True)):
            if r != phase:
                continue
            start = [m - q for m, q in zip(qmax, shift, strict=True)]
            limit = [a + c for a, c in zip(start, coarse, strict=True)]
            mine = lax.slice(chosen_pad, start, limit) == k
            total = total + jnp.where(mine, lax.slice(ct_pad, start, limit), 0)
        parts.append(total)
    # [*strides, *coarse] -> [coarse_0, s_0, coarse_1, s_1, ...] -> positions p + p_lo
    stacked = jnp.stack(parts).reshape(*strides, *coarse)
    rank = ct.ndim
    stacked = stacked.transpose([i for a in range(rank) for i in (rank + a, a)])
    spread = stacked.reshape([c * s for c, s in zip(coarse, strides, strict=True)])
    crop = [
        (-lo, n + lo - size, 0)
        for (lo, _), n, size in zip(padding, in_shape, spread.shape, strict=True)
    ]
    return lax.pad(spread, jnp.zeros((), ct.dtype), crop)


@functools.partial(jax.custom_jvp, nondiff_argnums=(1, 2, 3, 4))
def _max_pool(x, window, strides, padding, dilation):
    return _bind(x, window, strides, padding, dilation)


@_max_pool.defjvp
def _max_pool_jvp(window, strides, padding, dilation, primals, tangents):
    (x,), (t,) = primals, tangents
    y = _bind(x, window, strides, padding, dilation)
    chosen = lax.stop_gradient(_chosen_offset(x, y, window, strides, padding, dilation))
    backward = functools.partial(
        _transpose,
        chosen=chosen,
        in_shape=x.shape,
        window=window,
        strides=strides,
        padding=padding,
        dilation=dilation,
    )
    (t_out,) = jax.linear_transpose(backward, jax.ShapeDtypeStruct(y.shape, t.dtype))(t)
    return y, t_out
