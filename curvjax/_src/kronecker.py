"""Kronecker-factored curvature blocks: KFAC, KFLR and KFRA.

For a dense or convolution kernel, the GGN block of the reduced loss is approximated as
``A ⊗ B`` (per feature group ``g``) in the tap's canonical order ``(g, i, o)``. With ``a`` the
layer inputs (patches for convolutions, Grosse & Martens 2016) at the ``T`` positions that share
the weight (1 for a dense layer applied to a vector; sequence positions, pixels) and ``b`` the
output cotangents of the backpropagated vectors (which carry ``√κ``), two approximations of
Eschenhagen et al. (2023, §3) are offered:

.. math::
    \\text{expand:}\\quad A_g = \\frac{1}{N T} \\sum_{n, t} a_{n,t,g} a_{n,t,g}^⊤, \\qquad
    B_g = \\sum_{n, m, t} b_{n,m,t,g} b_{n,m,t,g}^⊤ ;

    \\text{reduce:}\\quad A_g = \\frac{1}{N} \\sum_n \\bar a_{n,g} \\bar a_{n,g}^⊤, \\;
    \\bar a_{n,g} = \\frac{1}{T} \\sum_t a_{n,t,g}, \\qquad
    B_g = \\sum_{n, m} \\bar b_{n,m,g} \\bar b_{n,m,g}^⊤, \\;
    \\bar b_{n,m,g} = \\sum_t b_{n,m,t,g} .

Expand (the default) treats the positions like extra examples; it is exact for deep linear
networks with a loss that sums per-position terms (MSE). Reduce treats each example's positions
as one input; it is exact for deep linear networks whose positions are summed or averaged before
the loss. Both coincide for ``T = 1``. For mean reduction (``κ = 1/N``) the expand product reads
``(1/(NT) Σ a aᵀ) ⊗ (1/N Σ b̂ b̂ᵀ)`` with ``b̂`` the cotangents of ``ℓ_n``.

**Padding.** ``A`` is a statistic of the layer's inputs and averages over all ``N T`` positions,
padded ones (weight 0 in the loss) included: a layer's positions need not correspond to the
output positions that the weights refer to. ``B``, which carries the loss weights through the
backpropagated vectors, and every exact quantity ignore positions of weight 0.

KFLR backpropagates the exact factor ``S_n`` (Botev et al. 2017), KFAC ``M`` sampled columns
(Martens & Grosse 2015), KFRA replaces the per-example backpropagation of ``B`` by the batch-averaged
recursion ``B̄⁽ⁱ⁻¹⁾ = (1/N) Σ_n J_nᵀ B̄⁽ⁱ⁾ J_n`` along a chain of dense layers.

**Tied weights.** A kernel consumed by ``U > 1`` dense/convolution taps with the same layout
(one weight applied in several layers or places) gets one Kronecker block in which the uses are
treated like further positions sharing the weight: with ``T' = Σ_u T_u`` the positions of all
uses, ``A`` and ``B`` are the formulas above summed over ``(u, t)`` in place of ``t``, ``T'`` in
place of ``T``. The exact block ``Σ_{u,v}`` (cross terms between uses included) is not a
Kronecker product; the approximation is exact where expand (reduce) is exact with the uses as
positions, e.g. a weight applied separately to two halves of the input, each with its own
per-position MSE terms.

**Recurrent cells.** A kernel closed over by a ``lax.scan`` body and consumed there by one
``dot_general`` (an RNN cell ``h_s = σ(h_{s-1} W_h + x_s W_x)``) is shared over the ``S`` steps
like a dense layer over positions: the steps are its positions (``T = S`` times the product's
own positions), with ``a_{n,s}`` the product's input and ``b_{n,m,s}`` the cotangent of its
output at step ``s``, recovered by re-running the scan of each example with a perturbation of
that output. A kernel used inside the body in any other way keeps the diagonal block.

Biases are kept as their own block (no homogeneous coordinate): 1-D leaves (biases, LayerNorm
scales and offsets) get the full block ``Σ_{n,m} g gᵀ`` of the same backpropagated vectors (the
exact GGN block for KFLR and KFRA, its Monte-Carlo estimate for KFAC), every other leaf (an
embedding looked up by ``gather``, a weight transformed before use, a kernel whose uses differ in
layout, e.g. an embedding tied with a transposed output projection) the diagonal of that block.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from curvjax._src import backprop, leafwise, rules
from curvjax._src.blocks import DenseBlock, DiagonalBlock, KroneckerBlock
from curvjax._src.rules import dense
from curvjax._src.rules import scan as scan_rule

#: The approximations of weight sharing over positions (and over the uses of a tied kernel).
APPROXIMATIONS = ("expand", "reduce")
DEFAULT_APPROXIMATION = "expand"


def check_approximation(approximation: str) -> str:
    """``approximation`` if it is one of :data:`APPROXIMATIONS`, else a ``ValueError``."""
    if approximation not in APPROXIMATIONS:
        raise ValueError(
            f"approximation={approximation!r} is not one of {APPROXIMATIONS}: 'expand' treats the "
            "positions that share a weight like examples (per-position losses), 'reduce' sums "
            "them first (positions pooled before the loss)."
        )
    return approximation


def _gram_of_rows(rows):
    """``Σ_r x_r x_rᵀ`` per group for ``rows`` ``[G, R, D]`` -> ``[G, D, D]``.

    The rows are the major axis of each group's operand: XLA's CPU dot then reads them in place
    instead of first copying them into a layout with the contraction axis minor.
    """
    return jax.lax.dot_general(rows, rows, (((1,), (1,)), ((0,), (0,))))


def _input_rows(forms, n: int, approximation: str):
    """``(rows [G, R, I], denominator)`` with ``A = rowsᵀ rows / denominator`` per group."""
    positions = sum(form.a.shape[2] for form in forms)
    if approximation == "reduce":
        mean = sum(jnp.sum(form.a, axis=2) for form in forms) / positions  # [N, G, I]
        return jnp.moveaxis(mean, 1, 0), n
    _, g, _, i = forms[0].a.shape
    rows = [jnp.moveaxis(f.a, 1, 0).reshape(g, -1, i) for f in forms]
    rows = rows[0] if len(rows) == 1 else jnp.concatenate(rows, axis=1)
    return rows, n * positions


def _input_factor(forms, n: int, approximation: str):
    """``A`` ``[G, I, I]`` from the forms of a kernel's uses (one form per use)."""
    rows, denominator = _input_rows(forms, n, approximation)
    return _gram_of_rows(rows) / denominator


#: The eigenbasis of a factor is taken from the SVD of its rows when they number at most this
#: fraction of its dimension (see :func:`eigh_of_rows`).
FEW_ROWS = 0.5


def eigh_of_rows(rows, denominator, factor):
    """Eigenvalues ``[G, D]`` and eigenvectors ``[G, D, D]`` (columns) of ``factor`` =
    ``rowsᵀ rows / denominator`` (per group ``g``; not sorted).

    With ``R ≤ FEW_ROWS · D`` rows (a dense layer's ``A`` from a batch smaller than its width) the
    factor has rank at most ``R``: its range is spanned by the right singular vectors ``V`` of the
    rows (an SVD costing ``O(R² D)``, more accurate than an eigendecomposition of the product), with
    eigenvalues ``σ² / denominator``, and a Householder QR of ``V`` completes them to an orthonormal
    basis whose last ``D - R`` columns span the null space (eigenvalue 0, which any orthonormal
    basis of it diagonalises). ``O(R D²)`` instead of an ``O(D³)`` eigendecomposition of ``factor``,
    which is used otherwise.
    """
    g, r, d = rows.shape
    if r > FEW_ROWS * d:
        return jnp.linalg.eigh(factor)
    _, sigma, vt = jnp.linalg.svd(rows, full_matrices=False)
    right = jnp.swapaxes(vt, 1, 2)  # [G, D, R]
    complete, _ = jnp.linalg.qr(right, mode="complete")  # [G, D, D]
    vectors = jnp.concatenate([right, complete[:, :, r:]], axis=2)
    values = jnp.concatenate([sigma**2 / denominator, jnp.zeros((g, d - r), sigma.dtype)], axis=1)
    return values, vectors


def input_eigh(p: backprop.Pass, uses, approximation: str, factor):
    """:func:`eigh_of_rows` of the input factor ``factor`` (``A``) of a kernel's ``uses``."""
    forms = _forms(p, uses, p.columns_of_gradient())
    rows, denominator = _input_rows(forms, p.model.num_examples, approximation)
    return eigh_of_rows(rows, denominator, factor)


def _output_factor(forms, approximation: str):
    """``B`` ``[G, O, O]`` from the forms of a kernel's uses (one form per use)."""
    if approximation == "reduce":
        total = sum(jnp.sum(form.b, axis=3) for form in forms)  # [N, M, G, O]
        n, m, g, o = total.shape
        return _gram_of_rows(jnp.moveaxis(total, 2, 0).reshape(g, n * m, o))
    g, o = forms[0].b.shape[2], forms[0].b.shape[-1]
    rows = [jnp.moveaxis(f.b, 2, 0).reshape(g, -1, o) for f in forms]
    return _gram_of_rows(rows[0] if len(rows) == 1 else jnp.concatenate(rows, axis=1))


class _Use(NamedTuple):
    """One use of a kernel leaf: how to get its bilinear form and its canonical index."""

    form: Callable  # (pass, tap id -> cotangents [N, M, ...]) -> bilinear.Form
    index: Callable  # (pass) -> [D] canonical position of every leaf entry (numpy)


def _tap_use(tap, k: int) -> _Use:
    def form(p, cols):
        return rules.bilinear_form(tap, p.acts[tap.id], cols[tap.id])

    def index(p):
        return leafwise.canonical_index(p, tap, k, form(p, p.columns_of_gradient()))

    return _Use(form, index)


def _forms(p: backprop.Pass, uses, cols) -> list:
    return [use.form(p, cols) for use in uses]


def _tied_uses(p: backprop.Pass, k: int):
    """The uses of kernel leaf ``k`` if every one is a bilinear tap of the same layout, else None."""
    taps = p.model.taps_of_leaf[k]
    if len(taps) < 2 or not all(
        t.chain_leaf == k and rules.has_bilinear_form(t) and len(t.leaves) == 1 for t in taps
    ):
        return None
    uses = [_tap_use(tap, k) for tap in taps]
    forms = _forms(p, uses, p.columns_of_gradient())
    shapes = {(f.a.shape[1], f.a.shape[3], f.b.shape[-1]) for f in forms}
    if len(shapes) != 1:
        return None
    first = uses[0].index(p)
    if not all(np.array_equal(use.index(p), first) for use in uses[1:]):
        return None
    return uses


def _scan_use(p: backprop.Pass, k: int):
    """The use of kernel leaf ``k`` by one ``dot_general`` inside a ``scan`` body, or None."""
    taps = p.model.taps_of_leaf[k]
    if len(taps) != 1 or taps[0].eqn.primitive is not jax.lax.scan_p:
        return None
    (tap,) = taps
    try:  # a weight transformed non-linearly before the scan has a value-dependent pull-back
        carriers = _operands_of_leaf(p, tap, k)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return None
    if len(carriers) != 1:
        return None
    (position,) = carriers
    body_index = scan_rule.dense_use(tap, position)
    if body_index is None:
        return None
    slot = tap.param_positions.index(position)

    def form(p, cols):
        return scan_rule.form(
            tap, position, body_index, p.statics[tap.id], p.acts[tap.id], cols[tap.id]
        )

    try:
        index = _permutation_index(p, tap, k, slot, scan_rule.layout(tap, position, body_index))
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return None
    if index is None:
        return None
    return [_Use(form, lambda p: index)]


def _operands_of_leaf(p: backprop.Pass, tap, k: int) -> list[int]:
    """The parameter operands of ``tap`` through which leaf ``k`` enters."""
    values, vjp = leafwise._param_side(p, [tap], [k])
    found = []
    with jax.ensure_compile_time_eval():
        for slot, position in enumerate(tap.param_positions):
            cot = tuple(
                jnp.ones_like(v) if j == slot else jnp.zeros_like(v)
                for j, v in enumerate(values[tap.id])
            )
            if np.any(np.asarray(vjp({tap.id: cot})[0][0]) != 0):
                found.append(position)
    return found


def _permutation_index(p: backprop.Pass, tap, k: int, slot: int, layout):
    """Canonical index of leaf ``k`` that reaches ``tap``'s parameter operand ``slot`` through a
    relayout (``None`` if that map is not a permutation, e.g. a transformed weight);
    ``layout = (g, i, o, to_param)`` of the operand."""
    g, i, o, to_param = layout
    return leafwise.pulled_positions(p, tap, k, (g, i, o), to_param, slot)


def _layout(p: backprop.Pass):
    """``({leaf: [uses]}, full, diagonal)``: which float leaves get Kronecker, full and diagonal
    blocks (Kronecker: the kernel of one bilinear tap, of several with the same layout, or of one
    product inside a ``scan`` body)."""
    ndims = [jnp.ndim(leaf) for leaf in p.model.float_leaves(p.params)]
    fast, full, diag = leafwise.block_layout(p.model, ndims)
    kron = {k: [_tap_use(tap, k)] for k, tap in fast.items()}
    for k in diag:
        uses = _tied_uses(p, k) or _scan_use(p, k)
        if uses is not None:
            kron[k] = uses
    return kron, full, [k for k in diag if k not in kron]


def kernel_uses(p: backprop.Pass) -> dict:
    """``{leaf: [uses]}`` of the Kronecker-factored leaves (the ``kron`` part of the layout)."""
    return _layout(p)[0]


def forms_of(p: backprop.Pass, uses, cols: dict) -> list:
    """The bilinear forms of a kernel's ``uses`` for the tap cotangents ``cols``."""
    return _forms(p, uses, cols)


def additive_parts(p: backprop.Pass, cols: dict, *, approximation: str = DEFAULT_APPROXIMATION):
    """The parts of the blocks that sum over backpropagated vectors."""
    kron, full, diag = _layout(p)
    parts = {"b": {}, "full": {}, "diag": {}}
    for k, uses in kron.items():
        parts["b"][k] = _output_factor(_forms(p, uses, cols), approximation)
    parts["full"] = dict(zip(full, leafwise.outer_sum(p, cols, full), strict=True))
    if diag:
        sums = leafwise.sum_sq(p, cols)
        parts["diag"] = {k: sums[k] for k in diag}
    return parts


def assemble(p: backprop.Pass, parts: dict, *, approximation: str = DEFAULT_APPROXIMATION) -> list:
    """Blocks for every float leaf from :func:`additive_parts` (summed over all vectors)."""
    n = p.model.num_examples
    kron, full, diag = _layout(p)
    result: list = [None] * len(p.model.float_index)
    gradient_cols = p.columns_of_gradient()  # only the activations of the forms are used below
    for k, uses in kron.items():
        forms = _forms(p, uses, gradient_cols)
        a = _input_factor(forms, n, approximation)
        result[k] = KroneckerBlock(a, parts["b"][k], uses[0].index(p))
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
            if any(len(model.taps_of_leaf[k]) > 1 for k in tap.leaves):
                problem = f"the weight of {tap.where} is used more than once (tied)"
                break
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
        parts = p.reduce_columns(
            lambda c, w: additive_parts(p, c), p.objective.exact_columns(p.outputs)
        )
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
    b = {
        k: b_bar.get(fast[k].id, factor) if k in fast else factor
        for k, factor in parts["b"].items()
    }
    parts = dict(parts, b=b)
    return assemble(p, parts)
