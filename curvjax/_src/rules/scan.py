"""Dense layers inside a ``lax.scan`` body (RNN cells): the steps as positions sharing a weight.

A ``scan`` that closes over a parameter is one tap of the traced model (its per-example gradient
comes from the generic rule). When the parameter's body variable is consumed by exactly one
``dot_general`` of the body, the weight is shared over the ``S`` steps exactly as a dense layer
shares it over positions: ``∂ℓ_n/∂W = Σ_s a_{n,s} b_{n,s}ᵀ`` with ``a_{n,s}`` the product's other
operand and ``b_{n,s}`` the cotangent of its output at step ``s``. :func:`form` recovers both by
re-running the scan of one example with a perturbation ``ε_s`` added to that product's output,
recording its input, and pulling the tap's output cotangents back to ``ε``.
"""

from __future__ import annotations

import types

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from curvjax._src import primitives
from curvjax._src.rules import bilinear, dense


def dense_use(tap, position: int) -> int | None:
    """The index of the one body ``dot_general`` that consumes the scan operand ``position``.

    ``None`` unless ``tap`` is a ``scan``, ``position`` one of its constants, and the body uses
    that constant exactly once, as an operand of a ``dot_general`` with another operand.
    """
    eqn = tap.eqn
    if eqn.primitive is not lax.scan_p or position >= eqn.params["num_consts"]:
        return None
    body = eqn.params["jaxpr"].jaxpr
    var = body.invars[position]
    uses = [
        (i, j)
        for i, inner in enumerate(body.eqns)
        for j, atom in enumerate(inner.invars)
        if atom is var
    ]
    if len(uses) != 1 or any(out is var for out in body.outvars):
        return None
    (i, j), inner = uses[0], body.eqns[uses[0][0]]
    if inner.primitive is not lax.dot_general_p or inner.invars[1 - j] is var:
        return None
    return i


def _inner_tap(tap, position: int, index: int):
    """The body product as a tap-like object for :func:`curvjax._src.rules.dense.form`."""
    body = tap.eqn.params["jaxpr"].jaxpr
    inner = body.eqns[index]
    q = next(j for j, atom in enumerate(inner.invars) if atom is body.invars[position])
    return types.SimpleNamespace(eqn=inner, param_positions=(q,), act_positions=(1 - q,))


def _run(eqn, index: int, act: int, invals, eps):
    """The scan of one example with ``eps [S, *out]`` added to body equation ``index``'s output.

    Returns ``(outputs of the scan, operand ``act`` of that product at every step [S, *shape])``.
    """
    params = eqn.params
    closed = params["jaxpr"]
    n_consts, n_carry = params["num_consts"], params["num_carry"]
    consts, init = invals[:n_consts], invals[n_consts : n_consts + n_carry]
    xs = invals[n_consts + n_carry :]

    def body(carry, step):
        x_t, eps_t = step
        recorded = []

        def evaluate(i, inner, values):
            outs = primitives.bind(inner, values)
            if i == index:
                recorded.append(values[act])
                outs = [outs[0] + eps_t]
            return outs

        outs = primitives.walk(closed.jaxpr, closed.consts, [*consts, *carry, *x_t], evaluate)
        return outs[:n_carry], (outs[n_carry:], recorded[0])

    carry, (ys, recorded) = lax.scan(
        body, list(init), (list(xs), eps), length=params["length"], reverse=params["reverse"]
    )
    return [*carry, *ys], recorded


def _zero_cotangent(x):
    if jnp.issubdtype(x.dtype, jnp.inexact):
        return jnp.zeros_like(x)
    return np.zeros(x.shape, jax.dtypes.float0)


def form(tap, position: int, index: int, statics, acts, cots) -> bilinear.Form:
    """Canonical ``(A [N, G, S·T, I], B [N, M, G, S·T, O])`` of the body product ``index``.

    Args:
      tap: the ``scan`` tap.
      position: the scan operand that carries the weight.
      index: the body equation from :func:`dense_use`.
      statics: the values of the tap's static inputs (shared by all examples).
      acts: the tap's activation inputs, ``[N, *shape]`` each.
      cots: the tap's output cotangents, ``[N, M, *shape]`` each (``None`` for outputs that are
        not floating point).
    """
    eqn = tap.eqn
    inner = _inner_tap(tap, position, index)
    (act,) = inner.act_positions
    out_aval = inner.eqn.outvars[0].aval
    steps = eqn.params["length"]
    n = jax.tree.leaves(acts)[0].shape[0]
    m = next(c for c in cots if c is not None).shape[1]

    def one(acts_n, cots_n):
        invals = [None] * len(eqn.invars)
        for pos, value in zip(tap.static_positions, statics, strict=True):
            invals[pos] = value
        for pos, value in zip(tap.act_positions, acts_n, strict=True):
            invals[pos] = value
        eps = jnp.zeros((steps, *out_aval.shape), out_aval.dtype)
        outs, vjp, recorded = jax.vjp(lambda e: _run(eqn, index, act, invals, e), eps, has_aux=True)

        def pull(cots_nm):
            cot = [
                _zero_cotangent(o) if c is None else c.astype(o.dtype)
                for o, c in zip(outs, cots_nm, strict=True)
            ]
            return vjp(cot)[0]

        return recorded, jax.vmap(pull)(list(cots_n))  # [S, *act], [M, S, *out]

    a, b = jax.vmap(one)(tuple(acts), tuple(cots))
    a = a.reshape(n * steps, *a.shape[2:])
    b = jnp.moveaxis(b, 2, 1).reshape(n * steps, m, *b.shape[3:])
    canon = dense.form(inner, (a,), (b,))
    _, g, t, i = canon.a.shape
    o = canon.b.shape[-1]
    a_canon = canon.a.reshape(n, steps, g, t, i).transpose(0, 2, 1, 3, 4).reshape(n, g, -1, i)
    b_canon = canon.b.reshape(n, steps, m, g, t, o).transpose(0, 2, 3, 1, 4, 5)
    return bilinear.Form(a_canon, b_canon.reshape(n, m, g, -1, o), canon.to_param)


def layout(tap, position: int, index: int):
    """``(G, I, O, to_param)`` of the body product ``index`` (static shapes only)."""
    inner = _inner_tap(tap, position, index)
    (act,) = inner.act_positions
    act_aval, out_aval = inner.eqn.invars[act].aval, inner.eqn.outvars[0].aval
    a = jnp.zeros((1, *act_aval.shape), act_aval.dtype)
    b = jnp.zeros((1, 1, *out_aval.shape), out_aval.dtype)
    canon = jax.eval_shape(lambda a, b: dense.form(inner, (a,), (b,))[:2], a, b)
    g, i, o = canon[0].shape[1], canon[0].shape[3], canon[1].shape[-1]
    return g, i, o, dense.form(inner, (a,), (b,)).to_param
