"""Kronecker factors of a feed-forward chain of dense layers, with the cross-layer factors.

For the block-tridiagonal K-FAC (Martens & Grosse 2015, §4.3), the layers ``l = 0, …, L-1`` of a
chain of dense layers have inputs ``ā_l`` (with a ``1`` appended when the layer's bias is folded
in, the homogeneous coordinate) and output cotangents ``b_{l,n,k}`` of the backpropagated vectors
``k`` (Monte-Carlo columns or the exact columns of ``√κ S_n``):

.. math::
    \\bar A_{l,m} = \\tfrac{1}{N} \\sum_n ā_{l,n} ā_{m,n}^⊤, \\qquad
    G_{l,m} = \\sum_{n,k} b_{l,n,k} b_{m,n,k}^⊤, \\qquad m ∈ \\{l, l+1\\} ,

scaled like :func:`curvjax.kfac`: ``Ā ⊗ G`` approximates the GGN block of the reduced loss. The
quantity ``"chain_factors"`` of :func:`curvjax.extract` computes them in the pass that serves the
other quantities; :func:`chain_factors` is its wrapper.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax.numpy as jnp
from jaxtyping import PRNGKeyArray, PyTree

from curvjax._src import backprop, kronecker, leafwise, primitives, rules
from curvjax._src import taps as taps_lib
from curvjax._src.typing import ApplyFn, Batch, LossLike


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


def output_factors(p: backprop.Pass, cols: dict) -> tuple:
    """``(G_{l,l}, G_{l,l+1})`` for a chunk of backpropagated vectors (additive over vectors)."""
    layers = chain_layers(p.model)
    b = [
        rules.bilinear_form(layer.tap, p.acts[layer.tap.id], cols[layer.tap.id]).b[:, :, 0, 0]
        for layer in layers
    ]  # [N, M, O] per layer
    diagonal = tuple(jnp.einsum("nmo,nmp->op", x, x) for x in b)
    cross = tuple(jnp.einsum("nmo,nmp->op", x, y) for x, y in zip(b[:-1], b[1:], strict=True))
    return diagonal, cross


def assemble(p: backprop.Pass, parts: tuple) -> ChainFactors:
    """:class:`ChainFactors` from the summed :func:`output_factors` and the recorded inputs."""
    layers = chain_layers(p.model)
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
    g_fac, g_cross = parts
    a_fac = tuple(a.T @ a / n for a in inputs)
    a_cross = tuple(x.T @ y / n for x, y in zip(inputs[:-1], inputs[1:], strict=True))
    return ChainFactors(a_fac, g_fac, a_cross, g_cross, tuple(index))


def chain_factors(
    apply_fn: ApplyFn,
    params: PyTree,
    batch: Batch,
    *,
    quantity: str = "kfac",
    key: PRNGKeyArray | None = None,
    mc_samples: int = 1,
    loss: LossLike = "cross_entropy",
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
      batch: ``(inputs, targets)`` or ``(inputs, targets, weights)`` (weights ``[N]`` or ``[N, *P]``).
      quantity: ``"kfac"`` (Monte-Carlo, needs ``key``) or ``"kflr"`` (exact columns).
      key: PRNG key for ``"kfac"``.
      mc_samples: Monte-Carlo columns per example for ``"kfac"``.
      loss: ``"cross_entropy"``, ``"mse"`` or a :class:`curvjax.losses.Loss`.
      reduction: ``"mean"``, ``"sum"`` or ``"token_mean"``.

    Returns:
      ``{"loss": L, "grad": ∇L (like params), "chain_factors": ChainFactors}``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from curvjax import chain_factors
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
    from curvjax._src import extract  # the quantity registry imports this module

    if quantity not in ("kfac", "kflr"):
        raise ValueError(
            f"`quantity` must be 'kfac' or 'kflr' for chain factors, got {quantity!r}."
        )
    vectors = "mc" if quantity == "kfac" else "exact"
    return extract.extract(
        apply_fn,
        params,
        batch,
        ["chain_factors"],
        loss=loss,
        reduction=reduction,
        key=key,
        mc_samples=mc_samples,
        options={"chain_factors": {"vectors": vectors}},
    )
