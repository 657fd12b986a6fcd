"""Diagonals of the GGN and of the Hessian (BackPACK's DiagGGN, DiagGGN-MC, DiagHessian)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from curvjax._src import backprop, leafwise, primitives, products
from curvjax._src import taps as taps_lib


def ggn_columns(p: backprop.Pass) -> jax.Array:
    """``√κ S_n`` as output cotangents ``[N, K, *P, C]`` (``S_n S_nᵀ = ∇²_f ℓ_n``)."""
    return p.objective.factor_columns(p.outputs)


def mc_columns(p: backprop.Pass, key, mc_samples: int) -> jax.Array:
    """``√κ S̃_n`` with ``M`` sampled columns ``[N, M, *P, C]`` (``E[S̃ S̃ᵀ] = ∇²_f ℓ_n``)."""
    return p.objective.mc_columns(key, p.outputs, mc_samples)


# --- exact Hessian diagonal -----------------------------------------------------------------


def _unbroadcast(x: jax.Array, shape) -> jax.Array:
    """Sum ``x`` (trailing dims broadcast from ``shape``) back to ``shape`` (the VJP of broadcast)."""
    lead = x.ndim - len(shape)
    axes = tuple(lead + i for i, d in enumerate(shape) if d == 1 and x.shape[lead + i] != 1)
    return jnp.sum(x, axis=axes, keepdims=True) if axes else x


def _node_columns(node: taps_lib.Node, statics, inputs, delta):
    """Residual columns of one node for one example.

    The node ``z = op(u_1, …, u_k)`` acts elementwise (after broadcasting its operands to the
    output shape), so ``δ ⊙ ∇²op`` is a ``k × k`` matrix per output element ``e``. Its eigenpairs
    ``(λ, v)`` give columns ``√|λ| v_j e_e`` injected at operand ``j``, with weight ``sign(λ)``.

    Returns:
      (per operand ``[M, *operand.shape]`` cotangent columns, weights ``[M]``), ``M = d k``.
    """
    eqn = node.eqn
    out_shape = eqn.outvars[0].aval.shape
    k = len(node.act_positions)
    wide = [jnp.broadcast_to(u, out_shape) for u in inputs]

    def value(*us):
        invals = [None] * len(eqn.invars)
        for pos, v in zip(node.static_positions, statics, strict=True):
            invals[pos] = v
        for pos, v in zip(node.act_positions, us, strict=True):
            invals[pos] = v
        return jnp.sum(delta * primitives.bind(eqn, invals)[0])

    grad = jax.grad(value, argnums=tuple(range(k)))
    rows = []
    for j in range(k):
        tangent = tuple(
            jnp.ones_like(u) if i == j else jnp.zeros_like(u) for i, u in enumerate(wide)
        )
        rows.append(jnp.stack(jax.jvp(grad, tuple(wide), tangent)[1], axis=-1))
    hess = jnp.stack(rows, axis=-1).reshape(-1, k, k)  # [d, k, k], symmetric per element
    eigvals, eigvecs = jnp.linalg.eigh(hess)  # [d, k], [d, k(j), k(r)]
    scale = jnp.sqrt(jnp.abs(eigvals))  # [d, k]
    d = hess.shape[0]
    columns = []
    for j, u in enumerate(inputs):
        coef = scale * eigvecs[:, j, :]  # [d, k]: column (e, r) holds coef[e, r] at element e
        col = jnp.einsum("er,ef->erf", coef, jnp.eye(d, dtype=coef.dtype))
        col = col.reshape(d * k, *out_shape)
        columns.append(_unbroadcast(col, u.shape))
    return columns, jnp.sign(eigvals).reshape(d * k)


def _check_exact(p: backprop.Pass) -> None:
    issues = list(p.model.unsupported) + [t.hessian_issue for t in p.model.taps if t.hessian_issue]
    if issues:
        raise ValueError(
            "the exact Hessian diagonal cannot treat this model: "
            + "; ".join(issues[:5])
            + ("; …" if len(issues) > 5 else "")
            + ". Use `hessian_diag(..., method='hutchinson', key=jax.random.key(0), "
            "mc_samples=...)`, an unbiased estimate that works for any model."
        )


def hessian_diag_of(p: backprop.Pass) -> list:
    """Exact ``diag(∇²L)`` from a pass recorded with ``residuals=True``."""
    _check_exact(p)
    s_cols, signs = p.objective.signed_columns(p.outputs)  # [N, K, *P, C], [N, K]
    n = s_cols.shape[0]
    out_parts, probe_parts, weight_parts = [s_cols], [], [signs.astype(s_cols.dtype)]
    zero_probes = {
        q.id: tuple(jnp.zeros((n, s_cols.shape[1], *u.shape[1:]), u.dtype) for u in p.probes[q.id])
        for q in p.model.nodes
    }
    probe_parts.append(zero_probes)
    for node in p.model.nodes:
        fn = lambda u, dl, node=node: _node_columns(node, p.node_statics[node.id], u, dl[0])  # noqa: E731
        cols, weights = jax.vmap(fn)(p.probes[node.id], p.node_cots[node.id])
        m = weights.shape[1]
        out_parts.append(jnp.zeros((n, m, *s_cols.shape[2:]), s_cols.dtype))
        probe_parts.append(
            {
                q.id: (
                    tuple(cols)
                    if q.id == node.id
                    else tuple(jnp.zeros((n, m, *u.shape[1:]), u.dtype) for u in p.probes[q.id])
                )
                for q in p.model.nodes
            }
        )
        weight_parts.append(weights.astype(s_cols.dtype))
    columns = jnp.concatenate(out_parts, axis=1)
    probes = jax.tree.map(lambda *xs: jnp.concatenate(xs, axis=1), *probe_parts)
    weights = jnp.concatenate(weight_parts, axis=1)
    return p.reduce_columns(
        lambda c, w: leafwise.sum_sq(p, c, w), columns, weights=weights, probe_columns=probes
    )


def hutchinson_diag(apply_fn, params, batch, *, loss, reduction, key, mc_samples):
    """``mean_s v_s ⊙ ∇²L v_s`` with Rademacher ``v_s`` (forward-over-reverse products)."""
    if key is None:
        raise ValueError("method='hutchinson' needs `key=jax.random.key(...)`.")
    if not isinstance(mc_samples, int) or mc_samples < 1:
        raise ValueError(f"`mc_samples` must be a positive integer, got {mc_samples!r}.")
    _, _, _, floats, _, reduced, to_tree, _ = products.whole_batch(
        apply_fn, params, batch, loss, reduction
    )

    def probe(k):
        keys = jax.random.split(k, len(floats))
        v = [
            jax.random.rademacher(kk, jnp.shape(x), dtype=jnp.result_type(x))
            for kk, x in zip(keys, floats, strict=True)
        ]
        hv = jax.jvp(jax.grad(reduced), (floats,), (v,))[1]
        return [a * b for a, b in zip(v, hv, strict=True)]

    def body(total, k):
        return [t + s for t, s in zip(total, probe(k), strict=True)], None

    zeros = [jnp.zeros_like(x) for x in floats]
    total, _ = jax.lax.scan(body, zeros, jax.random.split(key, mc_samples))
    return to_tree([t / mc_samples for t in total])
