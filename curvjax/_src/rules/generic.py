"""Rule for any tap: the VJP of its own equation, one example at a time.

Exact for every primitive, because each example is evaluated on its own: the per-example
gradient of a tap's parameter inputs is ``vjp(θ̃ ↦ eqn(θ̃, a_n))(b_n)``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from curvjax._src import primitives


def _assemble(tap, statics, params, acts_n):
    invals = [None] * len(tap.eqn.invars)
    for pos, value in zip(tap.static_positions, statics, strict=True):
        invals[pos] = value
    for pos, value in zip(tap.param_positions, params, strict=True):
        invals[pos] = value
    for pos, value in zip(tap.act_positions, acts_n, strict=True):
        invals[pos] = value
    return invals


def param_grad_one(tap, statics, acts_n, cots_n) -> tuple:
    """Gradient of ``<b_n, eqn(θ̃, a_n)>`` w.r.t. the tap's parameter inputs, for one example."""
    params = [statics[tap.static_positions.index(p)] for p in tap.param_positions]

    def apply(*param_values):
        return tuple(primitives.bind(tap.eqn, _assemble(tap, statics, param_values, acts_n)))

    outs, vjp_fn = jax.vjp(apply, *params)
    cots = tuple(
        c if c is not None else np.zeros(o.shape, dtype=jax.dtypes.float0)
        for o, c in zip(outs, cots_n, strict=True)
    )
    return vjp_fn(cots)


def param_grads(tap, statics, acts, cots) -> tuple:
    """Per-example parameter gradients ``[N, *θ̃.shape]`` for each parameter input of ``tap``."""
    return jax.vmap(lambda a, c: param_grad_one(tap, statics, a, c))(acts, cots)


def weighted_param_grad_sum(tap, statics, acts, cots, scale) -> tuple:
    """``Σ_n s_n vjp(θ̃ ↦ eqn(θ̃, a_n))(b_n)`` for each parameter input, without ``[N, *θ̃.shape]``.

    One VJP of the equation applied to all examples (``vmap`` over ``a``, ``θ̃`` shared), with
    the output cotangents scaled per example: the contraction over examples happens inside the
    transposed equation (for a dense or convolution tap, one matrix product or one
    backward-filter convolution), as in the ordinary backward pass.

    Args:
      scale: ``[N]`` the weights ``s_n``.
    """
    params = [statics[tap.static_positions.index(p)] for p in tap.param_positions]

    def apply(*param_values):
        def one(acts_n):
            return tuple(primitives.bind(tap.eqn, _assemble(tap, statics, param_values, acts_n)))

        return jax.vmap(one)(acts)

    outs, vjp_fn = jax.vjp(apply, *params)

    def scaled(o, c):
        if c is None:
            return np.zeros(o.shape, dtype=jax.dtypes.float0)
        return c * scale.reshape(scale.shape + (1,) * (c.ndim - 1)).astype(c.dtype)

    return vjp_fn(tuple(scaled(o, c) for o, c in zip(outs, cots, strict=True)))


def tangent_inner(tap, statics, acts, cots, tangents) -> jax.Array:
    """``⟨jvp(θ̃ ↦ eqn(θ̃, a_n))(u), b_n⟩`` for every example ``n``: ``[N]``, without ``g_n``.

    The dual of :func:`weighted_param_grad_sum`: the inner product of a parameter direction ``u``
    with each example's gradient of the tap, ``⟨u, vjp(θ̃ ↦ eqn(θ̃, a_n))(b_n)⟩``, is the tap's
    output tangent in direction ``u`` (its JVP in the parameter inputs, the activation inputs
    held fixed) contracted with the output cotangent ``b_n``. One forward-mode evaluation of the
    equation for all examples (``vmap`` over ``a``, ``u`` shared): for a dense tap
    ``Σ_t a_{n,t}ᵀ U b_{n,t}``, for a convolution the convolution of ``a_n`` with ``U``.

    Args:
      tangents: one tangent per parameter input of the tap, shaped like it.
    """
    params = [statics[tap.static_positions.index(p)] for p in tap.param_positions]

    def one(acts_n, cots_n):
        def apply(*param_values):
            return tuple(primitives.bind(tap.eqn, _assemble(tap, statics, param_values, acts_n)))

        tangents_cast = [
            t.astype(jnp.result_type(p)) for t, p in zip(tangents, params, strict=True)
        ]
        _, out_tangents = jax.jvp(apply, tuple(params), tuple(tangents_cast))
        total = 0.0
        for t, c in zip(out_tangents, cots_n, strict=True):
            if c is not None:
                wide = jnp.promote_types(jnp.promote_types(t.dtype, c.dtype), jnp.float32)
                total = total + jnp.sum(t.astype(wide) * c.astype(wide))
        return total

    return jax.vmap(one)(acts, cots)
