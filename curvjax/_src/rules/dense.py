"""Rule for ``dot_general`` taps (dense layers, einsum projections, attention weights).

With the parameter ``θ̃`` as one operand and the activation ``a`` as the other, the dimensions of
the activation split into dot batch dimensions ``G`` (shared with ``θ̃``), contracted ones ``I`` and
free ones ``T`` (positions over which the weight is shared, e.g. sequence positions; the batch-one
axis is one of them). The output cotangent ``b`` splits into ``G``, ``T`` and the parameter's free
dimensions ``O``. Per example, ``∂ℓ_n/∂θ̃[g, i, o] = Σ_t a[g, t, i] b[g, t, o]``.
"""

from __future__ import annotations

import numpy as np

from curvjax._src.rules import bilinear


def applies(tap) -> bool:
    """One parameter operand and one activation operand."""
    return len(tap.param_positions) == 1 and len(tap.act_positions) == 1


def form(tap, acts, cots) -> bilinear.Form:
    """Canonical ``(A [N, G, T, I], B [N, M, G, T, O])`` of a ``dot_general`` tap."""
    eqn = tap.eqn
    (param_pos,) = tap.param_positions
    (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = eqn.params["dimension_numbers"]
    lhs_rank, rhs_rank = (len(v.aval.shape) for v in eqn.invars)
    if param_pos == 1:
        act_c, act_b, par_c, par_b = lhs_contract, lhs_batch, rhs_contract, rhs_batch
        act_rank, par_rank = lhs_rank, rhs_rank
    else:
        act_c, act_b, par_c, par_b = rhs_contract, rhs_batch, lhs_contract, lhs_batch
        act_rank, par_rank = rhs_rank, lhs_rank
    act_free = [d for d in range(act_rank) if d not in act_c and d not in act_b]
    par_free = [d for d in range(par_rank) if d not in par_c and d not in par_b]
    act_shape = eqn.invars[tap.act_positions[0]].aval.shape
    par_shape = eqn.invars[param_pos].aval.shape
    sizes_g = [act_shape[d] for d in act_b]
    g, t = int(np.prod(sizes_g)), int(np.prod([act_shape[d] for d in act_free]))
    i = int(np.prod([act_shape[d] for d in act_c]))
    o = int(np.prod([par_shape[d] for d in par_free]))

    (a,) = acts  # [N, *act_shape]
    n = a.shape[0]
    perm = [0] + [1 + d for d in (*act_b, *act_free, *act_c)]
    a_canon = a.transpose(perm).reshape(n, g, t, i)

    (b,) = cots  # [N, M, *out_shape]; out dims: (G, lhs free, rhs free)
    m = b.shape[1]
    n_g, n_act_free, n_par_free = len(act_b), len(act_free), len(par_free)
    if param_pos == 1:
        b_canon = b.reshape(n, m, g, t, o)
    else:
        out_rank = n_g + n_par_free + n_act_free
        perm_b = [0, 1] + [2 + d for d in range(n_g)]
        perm_b += [2 + n_g + n_par_free + d for d in range(n_act_free)]
        perm_b += [2 + n_g + d for d in range(n_par_free)]
        assert len(perm_b) == out_rank + 2
        b_canon = b.transpose(perm_b).reshape(n, m, g, t, o)

    par_order = (*par_b, *par_c, *par_free)
    inverse = np.argsort(par_order)
    canon_shape = tuple(par_shape[d] for d in par_order)

    def to_param(x):
        lead = x.shape[:-3]
        x = x.reshape(*lead, *canon_shape)
        return x.transpose(*range(len(lead)), *(len(lead) + int(k) for k in inverse))

    return bilinear.Form(a_canon, b_canon, to_param)
