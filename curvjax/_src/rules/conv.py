"""Rule for ``conv_general_dilated`` taps (convolution kernels), by patch extraction.

Following Grosse & Martens (2016), the input is unfolded into patches so that the convolution is a
matrix product shared over the ``T`` output positions: for feature groups ``G``, patch features
``I = C_in/G × prod(kernel window)`` (channel-major) and output features ``O = C_out/G``. Any stride,
padding, input or kernel dilation, feature grouping and spatial rank is supported;
``batch_group_count > 1`` falls back to the generic rule.
"""

from __future__ import annotations

import numpy as np
from jax import lax

from curvjax._src.rules import bilinear


def applies(tap) -> bool:
    """The kernel is the parameter, the input the activation, no batch grouping."""
    return (
        tap.param_positions == (1,)
        and tap.act_positions == (0,)
        and tap.eqn.params["batch_group_count"] == 1
    )


def form(tap, acts, cots) -> bilinear.Form:
    """Canonical ``(A [N, G, T, I], B [N, M, G, T, O])`` of a convolution tap."""
    eqn = tap.eqn
    p = eqn.params
    lhs_spec, rhs_spec, out_spec = p["dimension_numbers"]
    kernel_shape = eqn.invars[1].aval.shape
    window = tuple(kernel_shape[d] for d in rhs_spec[2:])
    groups = p["feature_group_count"]
    c_out = kernel_shape[rhs_spec[0]]
    c_in_group = kernel_shape[rhs_spec[1]]
    o = c_out // groups

    (a,) = acts  # [N, *lhs_shape], lhs batch dimension has size 1
    n = a.shape[0]
    lhs = a.transpose(0, *(1 + d for d in lhs_spec))  # [N, 1, C_in, *spatial]
    lhs = lhs.reshape(n, *lhs.shape[2:])
    patches = lax.conv_general_dilated_patches(
        lhs,
        filter_shape=window,
        window_strides=p["window_strides"],
        padding=p["padding"],
        lhs_dilation=p["lhs_dilation"],
        rhs_dilation=p["rhs_dilation"],
        precision=lax.Precision.HIGHEST,  # a selection: exact only without reduced-precision (TF32) products
    )  # [N, C_in * prod(window), *out_spatial]
    rank = patches.ndim
    patches = patches.transpose(0, *range(2, rank), 1)  # [N, *out_spatial, C_in * window]
    patches = patches.reshape(n, -1, groups, c_in_group * int(np.prod(window)))
    a_canon = patches.transpose(0, 2, 1, 3)  # [N, G, T, I]

    (b,) = cots  # [N, M, *out_shape]
    m = b.shape[1]
    b = b.transpose(0, 1, *(2 + d for d in out_spec))  # [N, M, 1, C_out, *spatial]
    b = b.reshape(n, m, c_out, -1).transpose(0, 1, 3, 2)  # [N, M, T, C_out]
    b_canon = b.reshape(n, m, -1, groups, o).transpose(0, 1, 3, 2, 4)  # [N, M, G, T, O]

    kernel_order = (rhs_spec[1], *rhs_spec[2:], rhs_spec[0])
    inverse = np.argsort(kernel_order)

    def to_param(x):
        lead = x.shape[:-3]
        k = len(lead)
        x = x.reshape(*lead, groups, c_in_group, *window, o)
        # -> [..., C_in/G, *window, G, O] -> [..., C_in/G, *window, C_out]
        x = x.transpose(*range(k), *range(k + 1, k + 2 + len(window)), k, k + 2 + len(window))
        x = x.reshape(*lead, c_in_group, *window, c_out)
        return x.transpose(*range(k), *(k + int(d) for d in inverse))

    return bilinear.Form(a_canon, b_canon, to_param)
