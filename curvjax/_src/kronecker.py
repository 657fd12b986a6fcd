"""Kronecker-factored curvature blocks: KFAC, KFLR and KFRA.

For a dense or convolution kernel consumed by one tap, the GGN block of the reduced loss is
approximated as ``A ⊗ B`` (per feature group ``g``) in the tap's canonical order ``(g, i, o)``:

.. math::
    A_g = \\frac{1}{N T} \\sum_{n, t} a_{n,t,g} a_{n,t,g}^⊤, \\qquad
    B_g = \\sum_{n, m, t} b_{n,m,t,g} b_{n,m,t,g}^⊤ ,

where ``a`` are the layer inputs (patches for convolutions, Grosse & Martens 2016), ``T`` the number
of positions sharing the weight (1 for dense layers; the "expand" convention of Eschenhagen et
al. 2023 for convolutions), and ``b`` the output cotangents of the backpropagated vectors, which
carry ``√κ``: for mean reduction ``A ⊗ B = (1/N Σ a aᵀ) ⊗ (1/N Σ_n Σ_c b̂ b̂ᵀ)``.
KFLR backpropagates the exact factor ``S_n`` (Botev et al. 2017), KFAC ``M`` sampled columns
(Martens & Grosse 2015), KFRA replaces the per-example backpropagation of ``B`` by the batch-averaged
recursion ``B̄⁽ⁱ⁻¹⁾ = (1/N) Σ_n J_nᵀ B̄⁽ⁱ⁾ J_n`` along a chain of dense layers.

Biases are kept as their own block (no homogeneous coordinate): 1-D leaves (biases, LayerNorm
scales and offsets) get the full block ``Σ_{n,m} g gᵀ`` of the same backpropagated vectors (the
exact GGN block for KFLR and KFRA, its Monte-Carlo estimate for KFAC), every other leaf that is not
a kernel of a single dense/conv tap (embeddings, tied weights) the diagonal of that block.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from curvjax._src import backprop, diagonals, leafwise, rules
from curvjax._src.blocks import DenseBlock, DiagonalBlock, KroneckerBlock
from curvjax._src.rules import dense


def _gram_of_rows(rows):
    """``Σ_r x_r x_rᵀ`` per group for ``rows`` ``[G, R, D]`` -> ``[G, D, D]``.

    The rows are the major axis of each group's operand: XLA's CPU dot then reads them in place
    instead of first copying them into a layout with the contraction axis minor.
    """
    return jax.lax.dot_general(rows, rows, (((1,), (1,)), ((0,), (0,))))


def _input_factor(form, n: int):
    _, g, t, i = form.a.shape
    return _gram_of_rows(jnp.moveaxis(form.a, 1, 0).reshape(g, n * t, i)) / (n * t)


def _output_factor(form):
    n, m, g, t, o = form.b.shape
    return _gram_of_rows(jnp.moveaxis(form.b, 2, 0).reshape(g, n * m * t, o))


def _layout(p: backprop.Pass):
    """Which float leaves get Kronecker, full and diagonal blocks."""
    ndims = [jnp.ndim(leaf) for leaf in p.model.float_leaves(p.params)]
    return leafwise.block_layout(p.model, ndims)


def additive_parts(p: backprop.Pass, cols: dict, weights=None) -> dict:
    """The parts of the blocks that sum over backpropagated vectors (``weights`` unused, = 1)."""
    del weights
    fast, full, diag = _layout(p)
    parts = {"b": {}, "full": {}, "diag": {}}
    for k, tap in fast.items():
        parts["b"][k] = _output_factor(rules.bilinear_form(tap, p.acts[tap.id], cols[tap.id]))
    parts["full"] = dict(zip(full, leafwise.outer_sum(p, cols, full), strict=True))
    if diag:
        sums = leafwise.sum_sq(p, cols)
        parts["diag"] = {k: sums[k] for k in diag}
    return parts


def assemble(p: backprop.Pass, parts: dict) -> list:
    """Blocks for every float leaf from :func:`additive_parts` (summed over all vectors)."""
    n = p.model.num_examples
    fast, full, diag = _layout(p)
    result: list = [None] * len(p.model.float_index)
    gradient_cols = p.columns_of_gradient()  # only the layout of the form is used below
    for k, tap in fast.items():
        form = rules.bilinear_form(tap, p.acts[tap.id], gradient_cols[tap.id])
        index = leafwise.canonical_index(p, tap, k, form)
        result[k] = KroneckerBlock(_input_factor(form, n), parts["b"][k], index)
    for k in full:
        result[k] = DenseBlock(parts["full"][k])
    for k in diag:
        result[k] = DiagonalBlock(parts["diag"][k])
    return result


def chain_of(model) -> list:
    """The kernel taps of a feed-forward chain of dense layers, input to output, or raise."""
    kernels = [t for t in model.taps if t.is_kernel]
    problem = None
    if not kernels:
        problem = "it has no dense layer"
    elif any(t.info.rule is not dense for t in kernels):
        problem = "KFRA is implemented for chains of dense layers, and it has a convolution"
    else:
        previous = frozenset()
        for tap in kernels:
            if tap.frontier != previous:
                problem = (
                    f"the input of {tap.where} does not come from the previous dense layer alone"
                )
                break
            previous = frozenset({tap.id})
        if problem is None and model.output_frontier != previous:
            problem = "the outputs do not come from the last dense layer alone"
    if problem is None:
        for tap in kernels:
            (pos,) = tap.act_positions
            shape = tap.eqn.invars[pos].aval.shape
            if int(np.prod(shape)) != shape[-1]:
                problem = f"{tap.where} shares its weight over positions (input shape {shape})"
                break
    if problem is not None:
        raise ValueError(
            f"KFRA is defined for feed-forward chains of dense layers, but {problem}; "
            "use `kflr` or `kfac` instead."
        )
    return kernels


def kfra_of(p: backprop.Pass, parts: dict | None = None) -> list:
    """KFRA from a pass run with ``output_taps`` = the chain's kernel taps.

    ``parts`` are :func:`additive_parts` of the exact columns (computed here if not given).
    """
    kernels = chain_of(p.model)
    if parts is None:
        parts = p.reduce_columns(lambda c, w: additive_parts(p, c), diagonals.ggn_columns(p))
    n = p.model.num_examples
    fast = leafwise.fast_taps_of(p.model)
    leaf_of = {tap.id: k for k, tap in fast.items()}
    b_bar = {kernels[-1].id: parts["b"][leaf_of[kernels[-1].id]]}
    dtype = p.outputs.dtype
    for below, above in zip(kernels[-2::-1], kernels[:0:-1], strict=True):
        eigvals, eigvecs = jnp.linalg.eigh(b_bar[above.id][0])
        root = eigvecs * jnp.sqrt(jnp.clip(eigvals, 0.0))[None, :]  # B̄ = R Rᵀ, columns of R
        d = root.shape[1]
        out_shape = p.tap_outputs[above.id][0].shape[1:]
        injected = jnp.broadcast_to(root.T.reshape(d, *out_shape), (n, d, *out_shape))
        outputs = {
            t: (injected if t == above.id else jnp.zeros((n, d, *v[0].shape[1:]), dtype),)
            for t, v in p.tap_outputs.items()
        }
        columns = jnp.zeros((n, d, *p.outputs.shape[1:]), dtype)

        def propagated(cols, w, below=below):
            b = cols[below.id][0].reshape(n, cols[below.id][0].shape[1], -1)
            return jnp.einsum("nmo,nmp->op", b, b) / n

        b_bar[below.id] = p.reduce_columns(propagated, columns, output_columns=outputs)[None]
    parts = dict(parts, b={k: b_bar.get(tap.id, parts["b"][k]) for k, tap in fast.items()})
    return assemble(p, parts)
