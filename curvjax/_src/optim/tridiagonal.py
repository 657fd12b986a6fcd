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
through two generalised eigendecompositions (:func:`linalg.kronecker_difference_solve`).

Damping (the factored Tikhonov damping of §6.3 on the diagonal factors): ``Ā_{l,l}`` and
``G_{l,l}`` are replaced everywhere by ``Ā_{l,l} + π_l √c I`` and ``G_{l,l} + √c/π_l I``
(``c = λ + η``); the cross factors are not damped. Since every ``F̃`` built from one set of
per-example vectors (or a moving average of such) is a principal submatrix of a Tracy-Singh
product of two positive semi-definite matrices, the ``Σ_{l|l+1}`` stay positive definite.

The cross-layer factors are not part of :func:`curvjax.kfac`; :func:`chain_factors` computes all
of them from one forward pass and one backward pass of the backpropagated vectors, reading the
per-example layer inputs and output cotangents that curvjax records at each dense tap.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax.numpy as jnp

from curvjax._src import backprop, diagonals, kronecker, leafwise, primitives, rules
from curvjax._src import taps as taps_lib
from curvjax._src.optim import linalg


class ChainFactors(NamedTuple):
    """Kronecker factors of a chain of ``L`` dense layers, with the cross-layer factors.

    Attributes:
      a: ``L`` arrays ``[I_l, I_l]``: ``Ā_{l,l} = (1/N) Σ_n ā_l ā_lᵀ`` (``I_l`` counts the
        homogeneous coordinate when layer ``l``'s bias is folded in).
      g: ``L`` arrays ``[O_l, O_l]``: ``G_{l,l} = Σ_{n,k} b_l b_lᵀ``.
      a_cross: ``L-1`` arrays ``[I_l, I_{l+1}]``: ``Ā_{l,l+1} = (1/N) Σ_n ā_l ā_{l+1}ᵀ``.
      g_cross: ``L-1`` arrays ``[O_l, O_{l+1}]``: ``G_{l,l+1} = Σ_{n,k} b_l b_{l+1}ᵀ``.
      index: ``L`` int32 arrays ``[kernel size]``: each kernel entry's canonical position
        ``i·O + o`` (the identity for a flax ``Dense`` kernel ``[d_in, d_out]``).
    """

    a: tuple
    g: tuple
    a_cross: tuple
    g_cross: tuple
    index: tuple


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


class Layer(NamedTuple):
    """One layer of the chain: its kernel tap and float-leaf indices (bias ``None`` if unfolded)."""

    tap: taps_lib.Tap
    kernel: int
    bias: int | None


def _containing_jaxpr(plan, eqn):
    for e, (kind, payload) in zip(plan.jaxpr.eqns, plan.steps, strict=True):
        if e is eqn:
            return plan.jaxpr
        if kind == "nested":
            found = _containing_jaxpr(payload, eqn)
            if found is not None:
                return found
    return None


def _uses(jaxpr, var) -> int:
    count = sum(1 for e in jaxpr.eqns for v in e.invars if v is var)
    return count + sum(1 for v in jaxpr.outvars if v is var)


def _bias_of(model: taps_lib.TracedModel, tap) -> int | None:
    """The float leaf added right after ``tap``'s output (and used nowhere else), if any."""
    out = tap.eqn.outvars[0]
    jaxpr = _containing_jaxpr(model.plan, tap.eqn)
    if jaxpr is None or _uses(jaxpr, out) != 1:
        return None
    out_size = math.prod(out.aval.shape)
    for u in model.taps:
        if not primitives.is_addition(u.eqn) or len(u.act_positions) != 1:
            continue
        if u.eqn.invars[u.act_positions[0]] is not out or u.chain_leaf is None:
            continue
        k = u.chain_leaf
        if len(u.param_positions) == 1 and model.taps_of_leaf[k] == [u]:
            if math.prod(u.eqn.invars[u.param_positions[0]].aval.shape) == out_size:
                return k
    return None


def chain_layers(model: taps_lib.TracedModel) -> list[Layer]:
    """The layers of a feed-forward chain of dense layers, input to output, or raise."""
    try:
        kernels = kronecker.chain_of(model)
    except ValueError as err:
        raise ValueError(
            f"block='tridiagonal' needs a feed-forward chain of dense layers ({err}); use "
            "block='diagonal'."
        ) from None
    layers, covered = [], set()
    for tap in kernels:
        k = tap.chain_leaf
        if k is None or model.taps_of_leaf[k] != [tap] or not rules.has_bilinear_form(tap):
            raise ValueError(
                f"block='tridiagonal': the kernel of {tap.where} is not a parameter leaf used by "
                "that layer alone; use block='diagonal'."
            )
        bias = _bias_of(model, tap)
        layers.append(Layer(tap, k, bias))
        covered |= {k} if bias is None else {k, bias}
    for k, i in enumerate(model.float_index):
        if k not in covered:
            raise ValueError(
                f"block='tridiagonal' covers the kernels of a chain of dense layers and the biases "
                f"added right after them, but leaf {model.leaf_names[i]} is neither; use "
                "block='diagonal'."
            )
    return layers


def chain_factors(
    apply_fn,
    params,
    batch,
    *,
    quantity: str = "kfac",
    key=None,
    mc_samples: int = 1,
    loss="cross_entropy",
    reduction: str = "mean",
) -> dict:
    """Loss, gradient and the Kronecker factors of a dense chain with cross-layer factors.

    One forward pass records each dense layer's inputs; one backward pass of the gradient and
    one of the vectors (``M`` Monte-Carlo columns for ``quantity="kfac"``, the ``C`` exact columns
    of ``√κ S_n`` for ``"kflr"``; in chunks of vectors when they are many) give the output
    cotangents of every layer for the same vectors:

    .. math::
        \\bar A_{l,m} = \\tfrac{1}{N} \\sum_n ā_{l,n} ā_{m,n}^⊤, \\qquad
        G_{l,m} = \\sum_{n,k} b_{l,n,k} b_{m,n,k}^⊤, \\qquad m ∈ \\{l, l+1\\} .

    A bias added right after a layer's matrix product (and used nowhere else) is folded into the
    layer with a homogeneous coordinate (``ā = [a; 1]``, the bias as the last row of ``W̄``).

    Args:
      apply_fn: ``apply_fn(params, inputs) -> outputs [N, C]``, a feed-forward chain of dense
        layers with elementwise operations between them.
      params: parameter pytree; every float leaf must be a chain kernel or a folded bias.
      batch: ``(inputs, targets)``.
      quantity: ``"kfac"`` (Monte-Carlo, needs ``key``) or ``"kflr"`` (exact columns).
      key: PRNG key for ``"kfac"``.
      mc_samples: Monte-Carlo columns per example for ``"kfac"``.
      loss: ``"cross_entropy"``, ``"mse"`` or a :class:`curvjax.losses.Loss`.
      reduction: ``"mean"`` or ``"sum"``.

    Returns:
      ``{"loss": L, "grad": ∇L (like params), "chain_factors": ChainFactors}``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from curvjax.optim import chain_factors
      >>> apply_fn = lambda p, x: jnp.tanh(x @ p["w1"] + p["b1"][None, :]) @ p["w2"]
      >>> params = {"w1": jnp.ones((4, 5)) / 4, "b1": jnp.zeros(5), "w2": jnp.ones((5, 3)) / 5}
      >>> batch = (jnp.ones((6, 4)), jnp.arange(6) % 3)
      >>> fn = jax.jit(chain_factors, static_argnums=0, static_argnames="quantity")
      >>> f = fn(apply_fn, params, batch, quantity="kflr")["chain_factors"]
      >>> [a.shape for a in f.a], [c.shape for c in f.a_cross]
      ([(5, 5), (5, 5)], [(5, 5)])

    References:
      Martens & Grosse, "Optimizing neural networks with Kronecker-factored approximate
      curvature", ICML 2015, §3 and §4.3.
    """
    p = backprop.run(apply_fn, params, batch, loss=loss, reduction=reduction)
    layers = chain_layers(p.model)
    if quantity == "kfac":
        columns = diagonals.mc_columns(p, key, mc_samples)
    elif quantity == "kflr":
        columns = diagonals.ggn_columns(p)
    else:
        raise ValueError(
            f"`quantity` must be 'kfac' or 'kflr' for chain factors, got {quantity!r}."
        )
    n = p.model.num_examples
    gradient_cols = p.columns_of_gradient()  # the layout of each layer's form
    inputs, index = [], []
    for layer in layers:
        form = rules.bilinear_form(layer.tap, p.acts[layer.tap.id], gradient_cols[layer.tap.id])
        a = form.a[:, 0, 0]  # [N, I]: G = T = 1 in a chain of dense layers
        if layer.bias is not None:
            a = jnp.concatenate([a, jnp.ones((n, 1), a.dtype)], axis=1)
        inputs.append(a)
        index.append(leafwise.canonical_index(p, layer.tap, layer.kernel, form))

    def output_factors(cots, weights):  # additive over the backpropagated vectors
        del weights
        b = [
            rules.bilinear_form(layer.tap, p.acts[layer.tap.id], cots[layer.tap.id]).b[:, :, 0, 0]
            for layer in layers
        ]  # [N, M, O] per layer
        diagonal = tuple(jnp.einsum("nmo,nmp->op", x, x) for x in b)
        cross = tuple(jnp.einsum("nmo,nmp->op", x, y) for x, y in zip(b[:-1], b[1:], strict=True))
        return diagonal, cross

    g_fac, g_cross = p.reduce_columns(output_factors, columns)
    a_fac = tuple(a.T @ a / n for a in inputs)
    a_cross = tuple(x.T @ y / n for x, y in zip(inputs[:-1], inputs[1:], strict=True))
    factors = ChainFactors(a_fac, g_fac, a_cross, g_cross, tuple(index))
    return {"loss": p.loss, "grad": p.model.unflatten_float(p.grad), "chain_factors": factors}


def tridiagonal_inverse(factors: ChainFactors, damping) -> TridiagonalInverse:
    """Precompute the damped ``F̂⁻¹`` of the module docstring (``damping`` is ``c = λ + η``)."""
    root = jnp.sqrt(jnp.asarray(damping, factors.a[0].dtype))
    a_damped, g_damped = [], []
    for a, g in zip(factors.a, factors.g, strict=True):
        pi = linalg.kronecker_pi(a[None], g[None])[0]
        a_damped.append(a + pi * root * jnp.eye(a.shape[0], dtype=a.dtype))
        g_damped.append(g + root / pi * jnp.eye(g.shape[0], dtype=g.dtype))
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
    a_eig = [linalg.generalized_eigh(a, c) for a, c in zip(a_damped, c_a, strict=True)]
    g_eig = [linalg.generalized_eigh(g, c) for g, c in zip(g_damped, c_g, strict=True)]
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
        linalg.kronecker_difference_solve(
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
        w = linalg.to_canonical(leaves[layer.kernel], index, (1, i, o))[0]
        if layer.bias is not None:
            w = jnp.concatenate([w, leaves[layer.bias].reshape(1, o)], axis=0)
        mats.append(w)
    return mats


def from_layer_matrices(mats: list, leaves: list, layers: list[Layer], factors) -> list:
    """Inverse of :func:`to_layer_matrices`: new float leaves shaped like ``leaves``."""
    out = list(leaves)
    for w, layer, index in zip(mats, layers, factors.index, strict=True):
        kernel = w[:-1] if layer.bias is not None else w
        out[layer.kernel] = linalg.from_canonical(kernel[None], index, leaves[layer.kernel].shape)
        if layer.bias is not None:
            out[layer.bias] = w[-1].reshape(leaves[layer.bias].shape)
    return out
