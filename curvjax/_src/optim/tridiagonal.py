"""Block-tridiagonal K-FAC for feed-forward chains of dense layers (Martens & Grosse 2015, §4.3).

Layers ``l = 0, …, L-1`` of the chain have inputs ``ā_l`` (the layer input with a ``1`` appended
when the layer's bias is folded in, the homogeneous coordinate) and output cotangents ``b_l``.
With ``W̄_l = [W_l; b_lᵀ]`` of shape ``[I_l(+1), O_l]`` (kernel rows, then the bias row) and the
row-major ``vec``, per-example gradients are ``vec(ā gᵀ) = ā ⊗ g`` and the Kronecker-factored
Fisher / GGN has the blocks

.. math::
    \\tilde F_{l,l} = \\bar A_{l,l} ⊗ G_{l,l}, \\qquad \\tilde F_{l,l+1} = \\bar A_{l,l+1} ⊗ G_{l,l+1},
    \\qquad \\bar A_{l,m} = \\tfrac{1}{N} \\sum_n ā_{l,n} ā_{m,n}^⊤, \\quad
    G_{l,m} = \\sum_{n,k} b_{l,n,k} b_{m,n,k}^⊤ ,

``k`` running over the backpropagated vectors (the Monte-Carlo columns of K-FAC or the exact
columns of ``√κ S_n``), the same vectors for both layers. The scaling is that of
:func:`curvjax.kfac`: ``Ā ⊗ G`` approximates the GGN block of the reduced loss.

``F̂`` is the matrix that agrees with ``F̃`` on the diagonal and first off-diagonal blocks and
whose inverse is block-tridiagonal (a Gaussian chain ``vec DW_l | vec DW_{l+1}``):

.. math::
    \\hat F^{-1} = Ξ^⊤ Λ Ξ, \\quad Ξ_{l,l} = I, \\; Ξ_{l,l+1} = -Ψ_l, \\quad
    Ψ_l = \\tilde F_{l,l+1} \\tilde F_{l+1,l+1}^{-1} = Ψ^A_l ⊗ Ψ^G_l, \\quad
    Λ = \\operatorname{diag}(Σ_{0|1}^{-1}, …, Σ_{L-2|L-1}^{-1}, \\tilde F_{L-1,L-1}^{-1}),

with ``Ψ^A_l = Ā_{l,l+1} Ā_{l+1,l+1}⁻¹``, ``Ψ^G_l = G_{l,l+1} G_{l+1,l+1}⁻¹`` and
``Σ_{l|l+1} = Ā_{l,l} ⊗ G_{l,l} - Ψ^A_l Ā_{l+1,l+1} Ψ^{A⊤}_l ⊗ Ψ^G_l G_{l+1,l+1} Ψ^{G⊤}_l``, inverted
through two generalised eigendecompositions (``kronecker_difference_solve`` of the blocks module).

Damping (the factored Tikhonov damping of §6.3 on the diagonal factors): ``Ā_{l,l}`` and
``G_{l,l}`` are replaced everywhere by ``Ā_{l,l} + π_l √c I`` and ``G_{l,l} + √c/π_l I``
(``c = λ + η``; each shift at least ``ε tr`` of its factor, the resolution of the dtype, as in
the blocks module); the cross factors are not damped. Since every ``F̃`` built from one set of
per-example vectors (or a moving average of such) is a principal submatrix of a Tracy-Singh
product of two positive semi-definite matrices, the ``Σ_{l|l+1}`` stay positive definite.

The factors, cross-layer ones included, come from :func:`curvjax.chain_factors` (the quantity
``"chain_factors"`` of :func:`curvjax.extract`).
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp

from curvjax._src import blocks as blocks_lib
from curvjax._src.chain import ChainFactors, Layer


class TridiagonalInverse(NamedTuple):
    """The damped block-tridiagonal inverse ``F̂⁻¹`` of a chain, ready to apply.

    Attributes:
      a_vectors: ``L`` arrays ``[I_l, I_l]``: ``P`` of the input-side generalised eigenproblem.
      a_values: ``L`` arrays ``[I_l]``: its eigenvalues ``s`` (zero for the last layer).
      g_vectors: ``L`` arrays ``[O_l, O_l]``: ``P`` of the output side.
      g_values: ``L`` arrays ``[O_l]``.
      psi_a: ``L-1`` arrays ``[I_l, I_{l+1}]``: ``Ψ^A_l``.
      psi_g: ``L-1`` arrays ``[O_l, O_{l+1}]``: ``Ψ^G_l``.
    """

    a_vectors: tuple
    a_values: tuple
    g_vectors: tuple
    g_values: tuple
    psi_a: tuple
    psi_g: tuple


def tridiagonal_inverse(factors: ChainFactors, damping) -> TridiagonalInverse:
    """Precompute the damped ``F̂⁻¹`` of the module docstring (``damping`` is ``c = λ + η``)."""
    a_damped, g_damped = [], []
    for a, g in zip(factors.a, factors.g, strict=True):
        # π√c and √c/π, floored at the factors' resolution ε tr (see the blocks module)
        shift_a, shift_g = blocks_lib.factored_shifts(a[None], g[None], damping)
        a_damped.append(a + shift_a[0] * jnp.eye(a.shape[0], dtype=a.dtype))
        g_damped.append(g + shift_g[0] * jnp.eye(g.shape[0], dtype=g.dtype))
    psi_a, psi_g, c_a, c_g = [], [], [], []
    for k, (ac, gc) in enumerate(zip(factors.a_cross, factors.g_cross, strict=True)):
        pa = jnp.linalg.solve(a_damped[k + 1], ac.T).T  # Ā_{k,k+1} Ā_{k+1,k+1}⁻¹
        pg = jnp.linalg.solve(g_damped[k + 1], gc.T).T
        psi_a.append(pa)
        psi_g.append(pg)
        c_a.append(pa @ ac.T)  # Ψ^A Ā_{l+1,l+1} Ψ^Aᵀ
        c_g.append(pg @ gc.T)
    c_a.append(jnp.zeros_like(a_damped[-1]))
    c_g.append(jnp.zeros_like(g_damped[-1]))
    a_eig = [blocks_lib.generalized_eigh(a, c) for a, c in zip(a_damped, c_a, strict=True)]
    g_eig = [blocks_lib.generalized_eigh(g, c) for g, c in zip(g_damped, c_g, strict=True)]
    return TridiagonalInverse(
        a_vectors=tuple(e[0] for e in a_eig),
        a_values=tuple(e[1] for e in a_eig),
        g_vectors=tuple(e[0] for e in g_eig),
        g_values=tuple(e[1] for e in g_eig),
        psi_a=tuple(psi_a),
        psi_g=tuple(psi_g),
    )


def apply_tridiagonal_inverse(inverse: TridiagonalInverse, mats: list) -> list:
    """``F̂⁻¹ v = Ξᵀ Λ Ξ v`` for ``v`` given as the layer matrices ``W̄_l [I_l, O_l]``."""
    num = len(mats)
    u = [
        mats[k] - inverse.psi_a[k] @ mats[k + 1] @ inverse.psi_g[k].T if k < num - 1 else mats[k]
        for k in range(num)
    ]
    w = [
        blocks_lib.kronecker_difference_solve(
            inverse.a_vectors[k],
            inverse.a_values[k],
            inverse.g_vectors[k],
            inverse.g_values[k],
            u[k],
        )
        for k in range(num)
    ]
    return [
        w[k] - inverse.psi_a[k - 1].T @ w[k - 1] @ inverse.psi_g[k - 1] if k > 0 else w[k]
        for k in range(num)
    ]


def to_layer_matrices(leaves: list, layers: list[Layer], factors: ChainFactors) -> list:
    """Float leaves (kernels, biases) -> ``W̄_l [I_l, O_l]`` (canonical kernel, then bias row)."""
    mats = []
    for layer, index, a, g in zip(layers, factors.index, factors.a, factors.g, strict=True):
        o = g.shape[0]
        i = a.shape[0] - (layer.bias is not None)
        w = blocks_lib.to_canonical(leaves[layer.kernel], index, (1, i, o))[0]
        if layer.bias is not None:
            w = jnp.concatenate([w, leaves[layer.bias].reshape(1, o)], axis=0)
        mats.append(w)
    return mats


def from_layer_matrices(mats: list, leaves: list, layers: list[Layer], factors) -> list:
    """Inverse of :func:`to_layer_matrices`: new float leaves shaped like ``leaves``."""
    out = list(leaves)
    for w, layer, index in zip(mats, layers, factors.index, strict=True):
        kernel = w[:-1] if layer.bias is not None else w
        out[layer.kernel] = blocks_lib.from_canonical(
            kernel[None], index, leaves[layer.kernel].shape
        )
        if layer.bias is not None:
            out[layer.bias] = w[-1].reshape(leaves[layer.bias].shape)
    return out
