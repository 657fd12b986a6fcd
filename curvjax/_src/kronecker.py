"""Kronecker-factored curvature blocks: KFAC, KFLR and KFRA.

For a dense or convolution kernel consumed by one tap, the GGN block of the reduced loss is
approximated as ``A ⊗ B`` (per feature group ``g``) in the tap's canonical order ``(g, i, o)``:

.. math::
    A_g = \\frac{1}{N T} \\sum_{n, t} a_{n,t,g} a_{n,t,g}^⊤, \\qquad
    B_g = \\sum_{n, m, t} b_{n,m,t,g} b_{n,m,t,g}^⊤ ,

where ``a`` are the layer inputs (patches for convolutions, Grosse & Martens 2016), ``T`` the number
of positions sharing the weight (1 for dense layers; the "expand" convention of Eschenhagen et
al. 2023 for convolutions), and ``b`` the output cotangents of the backpropagated vectors, which
carry ``√κ``: for mean reduction ``A ⊗ B = (1/N Σ a aᵀ) ⊗ (1/N Σ_n Σ_c b̂ b̂ᵀ)`` as in SPEC.md.
KFLR backpropagates the exact factor ``S_n`` (Botev et al. 2017), KFAC ``M`` sampled columns
(Martens & Grosse 2015), KFRA replaces the per-example backpropagation of ``B`` by the batch-averaged
recursion ``B̄⁽ⁱ⁻¹⁾ = (1/N) Σ_n J_nᵀ B̄⁽ⁱ⁾ J_n`` along a chain of dense layers.

Biases are kept as their own block (no homogeneous coordinate): 1-D leaves (biases, LayerNorm
scales and offsets) get the full block ``Σ_{n,m} g gᵀ`` of the same backpropagated vectors (the
exact GGN block for KFLR and KFRA, its Monte-Carlo estimate for KFAC), every other leaf that is not
a kernel of a single dense/conv tap (embeddings, tied weights) the diagonal of that block.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from curvjax._src import backprop, diagonals, leafwise, rules


class KroneckerBlock(NamedTuple):
    """``P (⊕_g A_g ⊗ B_g) Pᵀ``: a Kronecker-factored block of one kernel leaf.

    Attributes:
      a: ``[G, I, I]`` input-side factors (``G = 1`` unless feature groups / dot batch dims).
      b: ``[G, O, O]`` output-side factors.
      index: ``[D]`` int32, for each entry of the leaf (row-major) its canonical position
        ``(g·I + i)·O + o``; for a flax ``Dense`` kernel ``[d_in, d_out]`` this is the identity.
    """

    a: jax.Array
    b: jax.Array
    index: jax.Array


class DenseBlock(NamedTuple):
    """A full ``[D, D]`` block over the leaf's entries (row-major)."""

    matrix: jax.Array


class DiagonalBlock(NamedTuple):
    """A diagonal block; ``diagonal`` has the leaf's shape."""

    diagonal: jax.Array


def block_to_dense(block) -> jax.Array:
    """The ``[D, D]`` matrix of one block, rows and columns in the leaf's row-major order.

    Example:
      >>> import jax.numpy as jnp, curvjax
      >>> blk = curvjax.KroneckerBlock(jnp.eye(2)[None], 2 * jnp.eye(3)[None], jnp.arange(6))
      >>> curvjax.block_to_dense(blk).shape
      (6, 6)
    """
    if isinstance(block, DiagonalBlock):
        return jnp.diag(block.diagonal.ravel())
    if isinstance(block, DenseBlock):
        return block.matrix
    if isinstance(block, KroneckerBlock):
        canon = jax.scipy.linalg.block_diag(
            *[jnp.kron(block.a[g], block.b[g]) for g in range(block.a.shape[0])]
        )
        return canon[block.index][:, block.index]
    raise TypeError(f"not a curvature block: {type(block).__name__}")


def blocks_to_dense(blocks) -> jax.Array:
    """Block-diagonal ``[D, D]`` matrix of a params-shaped tree of blocks.

    Leaves are taken in ``jax.tree.leaves`` order of the parameters (``None`` entries, for
    non-float leaves, are skipped), each flattened row-major: the order of
    ``jax.flatten_util.ravel_pytree`` on the float leaves, as :func:`curvjax.ggn_matrix` uses.
    """
    is_block = lambda x: isinstance(x, KroneckerBlock | DenseBlock | DiagonalBlock)  # noqa: E731
    mats = [block_to_dense(b) for b in jax.tree.leaves(blocks, is_leaf=is_block)]
    return jax.scipy.linalg.block_diag(*mats)


def _kernel_factors(form, n: int):
    t = form.a.shape[2]
    a = jnp.einsum("ngti,ngtj->gij", form.a, form.a) / (n * t)
    b = jnp.einsum("nmgto,nmgtp->gop", form.b, form.b)
    return a, b


def blocks(p: backprop.Pass, cols: dict, kernel_b=None) -> list:
    """Blocks for every float leaf from backpropagated vectors ``cols`` (tap id -> ``[N, M, …]``).

    ``kernel_b`` optionally maps tap ids to replacement ``B`` factors (KFRA).
    """
    n = p.model.num_examples
    leaves = p.model.float_leaves(p.params)
    fast = leafwise.fast_taps(p)
    result: list = [None] * len(leaves)
    for k, tap in fast.items():
        form = rules.bilinear_form(tap, p.acts[tap.id], cols[tap.id])
        a, b = _kernel_factors(form, n)
        if kernel_b is not None and tap.id in kernel_b:
            b = kernel_b[tap.id]
        result[k] = KroneckerBlock(a, b, leafwise.canonical_index(p, tap, k, form))
    rest = [k for k in range(len(leaves)) if k not in fast]
    full = [k for k in rest if jnp.ndim(leaves[k]) <= 1 and p.model.taps_of_leaf[k]]
    for k, matrix in zip(full, leafwise.outer_sum(p, cols, full), strict=True):
        result[k] = DenseBlock(matrix)
    diag = [k for k in rest if k not in full]
    if diag:
        sums = leafwise.sum_sq(p, cols)
        for k in diag:
            result[k] = DiagonalBlock(sums[k])
    return result


def kflr_of(p: backprop.Pass, cols=None) -> list:
    cols = p.backpropagate(diagonals.ggn_columns(p)) if cols is None else cols
    return blocks(p, cols)


def kfac_of(p: backprop.Pass, key, mc_samples: int, cols=None) -> list:
    cols = p.backpropagate(diagonals.mc_columns(p, key, mc_samples)) if cols is None else cols
    return blocks(p, cols)


def chain_of(model) -> list:
    """The kernel taps of a feed-forward chain of dense layers, input to output, or raise."""
    kernels = [t for t in model.taps if t.is_kernel]
    problem = None
    if not kernels:
        problem = "it has no dense layer"
    elif any(t.primitive != "dot_general" for t in kernels):
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


def kfra_of(p: backprop.Pass, cols=None) -> list:
    """KFRA from a pass run with ``output_taps`` = the chain's kernel taps."""
    kernels = chain_of(p.model)
    cols = p.backpropagate(diagonals.ggn_columns(p)) if cols is None else cols
    n = p.model.num_examples
    last = kernels[-1]
    b_bar = {
        last.id: _kernel_factors(rules.bilinear_form(last, p.acts[last.id], cols[last.id]), n)[1]
    }
    for below, above in zip(kernels[-2::-1], kernels[:0:-1], strict=True):
        b_above = b_bar[above.id][0]  # [O, O], G = 1
        eigvals, eigvecs = jnp.linalg.eigh(b_above)
        root = eigvecs * jnp.sqrt(jnp.clip(eigvals, 0.0))[None, :]  # B̄ = R Rᵀ, columns of R
        out_shape = p.tap_outputs[above.id][0].shape[1:]
        columns = jnp.broadcast_to(root.T.reshape(-1, *out_shape), (n, root.shape[1], *out_shape))
        out_cols = jnp.zeros((n, root.shape[1], p.outputs.shape[1]), p.outputs.dtype)
        outputs = {
            t: (
                columns
                if t == above.id
                else jnp.zeros((n, root.shape[1], *p.tap_outputs[t][0].shape[1:]), p.outputs.dtype),
            )
            for t in p.tap_outputs
        }
        propagated = p.backpropagate(out_cols, output_columns=outputs)[below.id][0]
        b = propagated.reshape(n, root.shape[1], -1)
        b_bar[below.id] = (jnp.einsum("nmo,nmp->op", b, b) / n)[None]
    return blocks(p, cols, kernel_b=b_bar)
