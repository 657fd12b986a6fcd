"""Diagonals of the GGN and of the Hessian (BackPACK's DiagGGN, DiagGGN-MC, DiagHessian)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from curvjax._src import backprop, leafwise, positions, primitives, products
from curvjax._src import taps as taps_lib

# --- exact Hessian diagonal -----------------------------------------------------------------


def _unbroadcast(x: jax.Array, shape) -> jax.Array:
    """Sum ``x`` (trailing dims broadcast from ``shape``) back to ``shape`` (the VJP of broadcast)."""
    lead = x.ndim - len(shape)
    axes = tuple(lead + i for i, d in enumerate(shape) if d == 1 and x.shape[lead + i] != 1)
    return jnp.sum(x, axis=axes, keepdims=True) if axes else x


def _node_value(node: taps_lib.Node, statics, delta):
    """``(u_1, …, u_k) ↦ ⟨δ, op(u_1, …, u_k)⟩``: the node's term whose Hessian is the residual."""
    eqn = node.eqn

    def value(*us):
        invals = [None] * len(eqn.invars)
        for pos, v in zip(node.static_positions, statics, strict=True):
            invals[pos] = v
        for pos, v in zip(node.act_positions, us, strict=True):
            invals[pos] = v
        return jnp.sum(delta * primitives.bind(eqn, invals)[0])

    return value


def _bilinear_columns(node: taps_lib.Node, statics, inputs, delta):
    """Residual columns of a bilinear node ``z = B(x, y)`` (e.g. ``dot_general``) for one example.

    ``⟨δ, B(x, y)⟩`` has the Hessian ``[[0, R], [Rᵀ, 0]]`` with ``R = ∂²⟨δ, B⟩ / ∂x ∂y``
    (``|x| × |y|``, taking ``x`` the smaller operand). With ``r_i`` the ``i``-th row of ``R`` and
    ``s_i = ‖r_i‖^{1/2}``,

    .. math::
        \\begin{bmatrix} 0 & R \\\\ R^⊤ & 0 \\end{bmatrix}
        = \\sum_i c_i^+ c_i^{+⊤} - c_i^- c_i^{-⊤}, \\qquad
        c_i^± = \\tfrac{1}{\\sqrt 2} (s_i e_i, ± r_i / s_i),

    so the node gives ``2 min(|x|, |y|)`` columns with weights ``±1`` (``s_i`` balances the two
    halves of a column; rows with ``r_i = 0`` give zero columns).

    Returns:
      (per operand ``[2 |x|, *operand.shape]`` cotangent columns, weights ``[2 |x|]``).
    """
    value = _node_value(node, statics, delta)
    small = 0 if inputs[0].size <= inputs[1].size else 1
    big = 1 - small
    x, y = inputs[small], inputs[big]

    def grad_big(xv):  # ∂⟨δ, B⟩/∂y, linear in x
        args = [None, None]
        args[small], args[big] = xv, y
        return jax.grad(value, argnums=big)(*args)

    rows = jax.jacfwd(grad_big)(x)  # [*y.shape, *x.shape]: exact, grad_big is linear
    rows = rows.reshape(y.size, x.size).T  # [|x|, |y|]
    norm = jnp.sqrt(jnp.sum(rows * rows, axis=1))  # [|x|]
    safe = jnp.where(norm > 0, norm, 1.0)
    s = jnp.sqrt(safe)
    x_part = jnp.diag(jnp.where(norm > 0, s, 0.0)) / jnp.sqrt(2.0)  # [|x|, |x|]
    y_part = rows / s[:, None] / jnp.sqrt(2.0)  # [|x|, |y|]
    x_cols = jnp.concatenate([x_part, x_part]).reshape(-1, *x.shape).astype(x.dtype)
    y_cols = jnp.concatenate([y_part, -y_part]).reshape(-1, *y.shape).astype(y.dtype)
    columns = [None, None]
    columns[small], columns[big] = x_cols, y_cols
    ones = jnp.ones((x.size,), delta.dtype)
    return columns, jnp.concatenate([ones, -ones])


def _tied_columns(node: taps_lib.Node, statics, inputs, delta):
    """Residual columns of a tied tap ``z = B(x, θ̃)`` for one example (``x`` depends on ``θ``).

    Writing each use ``u`` of a tied leaf ``θ`` as its own variable ``θ_u``, ``∇²L(θ)`` is the sum
    of all blocks ``∂²L / ∂θ_u ∂θ_v``. Backpropagation through the uses gives every term but, at
    each tap whose activation ``x`` depends on ``θ``, the cross term of ``⟨δ, B(x, θ̃)⟩`` in the
    pair ``(x, θ̃)``: the bilinear residual ``[[0, R], [Rᵀ, 0]]`` of :func:`_bilinear_columns`.
    Its columns enter at ``x`` (backpropagated) and at ``θ̃`` (added to the tap's per-column
    parameter gradient, since ``∂θ̃/∂θ`` is the parameter-side relayout, before squaring).

    Returns:
      (``[2 m, *x.shape]`` activation columns, ``[2 m, *θ̃.shape]`` parameter columns, weights
      ``[2 m]``), ``m = min(|x|, |θ̃|)``.
    """
    (x_pos,) = node.act_positions
    p_pos = node.param_position
    theta = statics[node.static_positions.index(p_pos)]
    rest = tuple(i for i in node.static_positions if i != p_pos)
    pair = dataclasses.replace(
        node, act_positions=(x_pos, p_pos), static_positions=rest, kind=taps_lib.BILINEAR_NODE
    )
    rest_statics = tuple(statics[node.static_positions.index(i)] for i in rest)
    (x_cols, theta_cols), weights = _bilinear_columns(pair, rest_statics, (inputs[0], theta), delta)
    return x_cols, theta_cols, weights


def _node_columns(node: taps_lib.Node, statics, inputs, delta):
    """Residual columns of one node for one example.

    The node ``z = op(u_1, …, u_k)`` acts elementwise (after broadcasting its operands to the
    output shape), so ``δ ⊙ ∇²op`` is a ``k × k`` matrix per output element ``e``. Its eigenpairs
    ``(λ, v)`` give columns ``√|λ| v_j e_e`` injected at operand ``j``, with weight ``sign(λ)``.

    Returns:
      (per operand ``[M, *operand.shape]`` cotangent columns, weights ``[M]``), ``M = d k``.
    """
    if node.kind == taps_lib.BILINEAR_NODE:
        return _bilinear_columns(node, statics, inputs, delta)
    out_shape = node.eqn.outvars[0].aval.shape
    k = len(node.act_positions)
    wide = [jnp.broadcast_to(u, out_shape) for u in inputs]
    value = _node_value(node, statics, delta)
    grad = jax.grad(value, argnums=tuple(range(k)))
    rows = []
    for j in range(k):
        tangent = tuple(
            jnp.ones_like(u) if i == j else jnp.zeros_like(u) for i, u in enumerate(wide)
        )
        rows.append(jnp.stack(jax.jvp(grad, tuple(wide), tangent)[1], axis=-1))
    hess = jnp.stack(rows, axis=-1).reshape(-1, k, k)  # [d, k, k], symmetric per element
    # eigh needs at least float32 (a bfloat16 model); the columns go back in each operand's dtype
    eigvals, eigvecs = jnp.linalg.eigh(hess.astype(jnp.promote_types(hess.dtype, jnp.float32)))
    scale = jnp.sqrt(jnp.abs(eigvals))  # [d, k]
    d = hess.shape[0]
    columns = []
    for j, u in enumerate(inputs):
        coef = scale * eigvecs[:, j, :]  # [d, k]: column (e, r) holds coef[e, r] at element e
        col = jnp.einsum("er,ef->erf", coef, jnp.eye(d, dtype=coef.dtype))
        col = col.reshape(d * k, *out_shape)
        columns.append(_unbroadcast(col, u.shape).astype(u.dtype))
    return columns, jnp.sign(eigvals).reshape(d * k).astype(hess.dtype)


#: Most elements the residual columns of the exact Hessian diagonal may occupy, ``N`` examples
#: times the residual columns per example times the size of what one column spans (every node's
#: operands and the outputs): 2 GiB in float64, 1 GiB in float32.
MAX_RESIDUAL_ELEMENTS = 1 << 28


def node_column_count(node: taps_lib.Node) -> int:
    """Residual columns one example backpropagates for ``node``.

    Elementwise nodes: ``d k`` (``d`` output elements, ``k`` activation operands); bilinear nodes
    (``dot_general`` of two activations): ``2 min(|x|, |y|)``; tied taps ``z = B(x, θ̃)``:
    ``2 min(|x|, |θ̃|)``.
    """
    sizes = [int(np.prod(node.eqn.invars[i].aval.shape)) for i in node.act_positions]
    if node.kind == taps_lib.TIED_NODE:
        sizes.append(int(np.prod(node.eqn.invars[node.param_position].aval.shape)))
    if node.kind in (taps_lib.BILINEAR_NODE, taps_lib.TIED_NODE):
        return 2 * min(sizes)
    return int(np.prod(node.eqn.outvars[0].aval.shape)) * len(sizes)


def residual_cost_issue(model: taps_lib.TracedModel) -> str | None:
    """Why the residual columns of ``model`` are too many for the exact method, else ``None``."""
    if not model.nodes:
        return None
    counts = [node_column_count(q) for q in model.nodes]
    span = int(np.prod(model.out_aval.shape)) + sum(
        int(np.prod(q.eqn.invars[i].aval.shape))
        for q in model.nodes
        for i in (*q.act_positions, q.param_position)
        if i is not None
    )
    elements = model.num_examples * sum(counts) * span
    if elements <= MAX_RESIDUAL_ELEMENTS:
        return None
    big = max(range(len(counts)), key=counts.__getitem__)
    where = primitives.describe(model.nodes[big].eqn)
    return (
        f"its {len(counts)} residual nodes need {sum(counts)} backpropagated columns per example "
        f"(the largest, {where}, {counts[big]}), {elements:.2e} elements for "
        f"N = {model.num_examples}, more than the {MAX_RESIDUAL_ELEMENTS:.2e} allowed (the count "
        "grows linearly with N: fewer examples per call would lower it)"
    )


def _check_exact(p: backprop.Pass) -> None:
    issues = list(p.model.unsupported) + [t.hessian_issue for t in p.model.taps if t.hessian_issue]
    if not issues:
        cost = residual_cost_issue(p.model)
        issues = [cost] if cost is not None else []
    if issues:
        raise ValueError(
            "the exact Hessian diagonal cannot treat this model: "
            + "; ".join(issues[:5])
            + ("; …" if len(issues) > 5 else "")
            + ". Use `hessian_diag(..., method='hutchinson', key=jax.random.key(0), "
            "mc_samples=...)`, an unbiased estimate that works for any model."
        )


def hessian_diag_of(p: backprop.Pass) -> list:
    """Exact ``diag(∇²L)`` from a pass recorded with ``residuals=True``.

    The GGN columns and the residual columns of the elementwise and bilinear nodes are reduced
    together; the residual columns of tied taps (whose parameter halves are added directly to the
    tied leaves' per-column gradients) are reduced apart, for the tied leaves only (for any other
    leaf each ``+`` column cancels its ``-`` twin).
    """
    _check_exact(p)
    s_cols, signs = p.objective.signed_columns(p.outputs)  # [N, K, *P, C], [N, K]
    n = s_cols.shape[0]
    nodes = p.model.nodes

    def probes_of(m, node=None, cols=None):
        return {
            q.id: (
                tuple(cols)
                if node is not None and q.id == node.id
                else tuple(jnp.zeros((n, m, *u.shape[1:]), u.dtype) for u in p.probes[q.id])
            )
            for q in nodes
        }

    def out_zeros(m):
        return jnp.zeros((n, m, *s_cols.shape[2:]), s_cols.dtype)

    out_parts, probe_parts, weight_parts = [s_cols], [probes_of(s_cols.shape[1])], [signs]
    tied_parts = []  # (node, activation columns, parameter columns, weights)
    for node in nodes:
        statics = p.node_statics[node.id]
        if node.kind == taps_lib.TIED_NODE:
            fn = lambda u, dl, node=node, st=statics: _tied_columns(node, st, u, dl[0])  # noqa: E731
            tied_parts.append((node, *jax.vmap(fn)(p.probes[node.id], p.node_cots[node.id])))
            continue
        fn = lambda u, dl, node=node, st=statics: _node_columns(node, st, u, dl[0])  # noqa: E731
        cols, weights = jax.vmap(fn)(p.probes[node.id], p.node_cots[node.id])
        m = weights.shape[1]
        out_parts.append(out_zeros(m))
        probe_parts.append(probes_of(m, node, cols))
        weight_parts.append(weights)
    result = _reduce(p, out_parts, probe_parts, weight_parts)
    if not tied_parts:
        return result
    direct_parts = []
    probe_parts, weight_parts, out_parts = [], [], []
    for node, x_cols, theta_cols, weights in tied_parts:
        m = weights.shape[1]
        out_parts.append(out_zeros(m))
        probe_parts.append(probes_of(m, node, (x_cols,)))
        weight_parts.append(weights)
        direct_parts.append(
            {
                q.tap: theta_cols
                if q.id == node.id
                else jnp.zeros((n, m, *_param_aval(q).shape), _param_aval(q).dtype)
                for q, *_ in tied_parts
            }
        )
    leaves = sorted({k for q, *_ in tied_parts for k in p.model.taps[q.tap].leaves})
    direct = jax.tree.map(lambda *xs: jnp.concatenate(xs, axis=1), *direct_parts)
    cross = _reduce(p, out_parts, probe_parts, weight_parts, direct, leaves)
    for k in leaves:
        result[k] = result[k] + cross[k]
    return result


def _param_aval(node: taps_lib.Node):
    return node.eqn.invars[node.param_position].aval


def _reduce(p: backprop.Pass, out_parts, probe_parts, weight_parts, direct=None, leaves=None):
    """``leafwise.sum_sq`` of the concatenated column parts (and direct parameter columns)."""
    dtype = out_parts[0].dtype
    columns = jnp.concatenate(out_parts, axis=1)
    probes = jax.tree.map(lambda *xs: jnp.concatenate(xs, axis=1), *probe_parts)
    weights = jnp.concatenate([w.astype(dtype) for w in weight_parts], axis=1)
    if direct is None:
        fn = lambda c, w: leafwise.sum_sq(p, c, w)  # noqa: E731
    else:
        fn = lambda c, w, d: leafwise.sum_sq(p, c, w, d, leaves)  # noqa: E731
    return p.reduce_columns(
        fn, columns, weights=weights, probe_columns=probes, direct_columns=direct
    )


def hutchinson_diag(apply_fn, params, batch, *, loss, reduction, key, mc_samples):
    """``mean_s v_s ⊙ ∇²L v_s`` with Rademacher ``v_s`` (forward-over-reverse products)."""
    positions.check_key(key, "hessian_diag(method='hutchinson') and its Rademacher probes")
    if not isinstance(mc_samples, int) or mc_samples < 1:
        raise ValueError(f"`mc_samples` must be a positive integer, got {mc_samples!r}.")
    w = products.whole_batch(apply_fn, params, batch, loss, reduction)
    floats, reduced, to_tree = w.floats, w.reduced, w.to_tree

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
