"""Rule for any tap: the VJP of its own equation, one example at a time.

Exact for every primitive, because each example is evaluated on its own: the per-example
gradient of a tap's parameter inputs is ``vjp(θ̃ ↦ eqn(θ̃, a_n))(b_n)``.
"""

from __future__ import annotations

import jax
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
