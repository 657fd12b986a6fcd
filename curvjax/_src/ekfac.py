# ruff: noqa: F722  (jaxtyping shape strings are not forward references)
"""Eigenvalue-corrected Kronecker factors (EKFAC, George et al. 2018).

For a Kronecker-factored kernel with factors ``A_g = Q_A diag(·) Q_Aᵀ`` and
``B_g = Q_B diag(·) Q_Bᵀ`` (those of :func:`curvjax.kfac` or :func:`curvjax.kflr`), EKFAC keeps
the eigenbasis ``Q = Q_A ⊗ Q_B`` and replaces the eigenvalues ``a_i b_o`` by the second moments
of the gradients in that basis:

.. math::
    s_{g,i,o} = \\sum_{n} \\sum_{c} \\big(Q_{A,g}^⊤ \\, G_{n,c,g} \\, Q_{B,g}\\big)_{io}^2, \\qquad
    G_{n,c,g} = \\sum_t a_{n,t,g} \\, b_{n,c,t,g}^⊤ ,

with ``b_{n,c}`` the cotangents of the same backpropagated vectors that define ``B`` (the ``C``
columns of ``√κ S_n`` for the ``"kflr"`` basis, the ``M`` Monte-Carlo columns, which carry
``1/√M``, for ``"kfac"``), so that ``Σ_{n,c} vec G_{n,c} vec G_{n,c}ᵀ`` is exactly the matrix the
factors approximate (the GGN block, or its Monte-Carlo estimate). ``diag(s)`` is the diagonal of
that matrix in the basis ``Q``: the EKFAC block ``Q diag(s) Qᵀ`` is its Frobenius projection onto
the matrices diagonal in ``Q``, never farther from it than ``A ⊗ B`` (which is diagonal in ``Q``
too). Positions that share the weight (convolutions, sequences) and the uses of a tied kernel
enter the per-example gradient ``G_{n,c}`` as the sum over ``t``; padded positions carry
zero cotangents.

Computation: the eigenbasis of ``A`` comes from the SVD of its rows when they are fewer than
half its dimension (a dense layer wider than the batch; see
:func:`curvjax._src.kronecker.eigh_of_rows`), from an eigendecomposition of ``A`` otherwise.
``a`` is projected by ``Q_A`` and ``b`` by ``Q_B`` first, then the rotated per-example gradient
``Σ_t ã_{n,t} b̃_{n,c,t}ᵀ`` is squared and summed (for ``T = 1`` as ``(ã²)ᵀ (b̃²)`` without
forming it; otherwise a chunk of examples at a time), or, where it costs fewer operations
(convolutions), the per-example gradient is formed first and rotated. ``s`` needs the eigenbasis
of ``B``, which is known only after all the vectors have been backpropagated, while the
backpropagation runs a chunk of vectors at a time and keeps no cotangents: the vectors are
backpropagated a second time (the forward pass and ``A`` are shared, and so are the factors with
``kfac`` / ``kflr`` requested in the same :func:`curvjax.extract` call). When all the vectors fit
in one chunk (Monte-Carlo factors), the two backpropagations are the same computation and XLA
evaluates it once (DeepOBS 3c3d: the second adds no flops). Keeping every cotangent instead would
hold ``N C T O`` numbers per layer (for a language model's vocabulary ``C``, far more than a
second backward pass costs).

**CPU threads.** The eigendecompositions run in LAPACK (OpenBLAS, through SciPy), whose threads
compete with XLA's for the same cores: on 2 cores, 3c3d's EKFAC takes 2.3 gradients with
OpenBLAS limited to one thread (``OPENBLAS_NUM_THREADS=1`` before starting Python, or
``threadpoolctl.threadpool_limits(1, "blas")``) against 3.3-3.9, varying, without.
"""

from __future__ import annotations

import jax.numpy as jnp
from jaxtyping import Array, Float

from curvjax._src import backprop, chunking, kronecker
from curvjax._src.blocks import EigenKroneckerBlock, KroneckerEigh
from curvjax._src.rules import bilinear

#: The factors whose eigenbasis EKFAC corrects, and the vector set each backpropagates.
BASES = {"kfac": "mc", "kflr": "exact"}


def vectors_of_basis(basis: str) -> str:
    """The vector set (``"mc"`` or ``"exact"``) of ``basis``, or a ``ValueError``."""
    if basis not in BASES:
        raise ValueError(
            f"basis={basis!r} is not one of {tuple(BASES)}: 'kfac' takes the eigenbasis of the "
            "Monte-Carlo factors (needs `key`), 'kflr' that of the exact output factors."
        )
    return BASES[basis]


def rotate_form(
    a_vectors: Float[Array, "G I I"], b_vectors: Float[Array, "G O O"], form: bilinear.Form
) -> bilinear.Form:
    """The bilinear form of the rotated gradients ``Q_Aᵀ G_{n,m} Q_B``.

    Args:
      a_vectors: ``[G, I, I]`` eigenvectors (columns) ``Q_A``.
      b_vectors: ``[G, O, O]`` eigenvectors (columns) ``Q_B``.
      form: a tap's :class:`~curvjax.BilinearForm`, ``a [N, G, T, I]``, ``b [N, M, G, T, O]``.

    Returns:
      The form with ``ã = a Q_A`` ``[N, G, T, I]`` and ``b̃ = b Q_B`` ``[N, M, G, T, O]``, whose
      per-example gradients ``Σ_t ã_t b̃_tᵀ`` are ``Q_Aᵀ G_{n,m} Q_B`` (same ``to_param``).
    """
    a = jnp.einsum("ngti,gij->ngtj", form.a, a_vectors.astype(form.a.dtype))
    b = jnp.einsum("nmgto,gop->nmgtp", form.b, b_vectors.astype(form.b.dtype))
    return bilinear.Form(a, b, form.to_param)


def join_forms(forms: list) -> bilinear.Form:
    """One form for the uses of a tied kernel: their positions concatenated (same layout)."""
    if len(forms) == 1:
        return forms[0]
    a = jnp.concatenate([f.a for f in forms], axis=2)
    b = jnp.concatenate([f.b for f in forms], axis=3)
    return bilinear.Form(a, b, forms[0].to_param)


def rotate_forms(a_vectors, b_vectors, forms: list) -> bilinear.Form:
    """The uses' forms rotated by :func:`rotate_form` and joined (:func:`join_forms`)."""
    return join_forms([rotate_form(a_vectors, b_vectors, f) for f in forms])


def taps_first(t: int, i: int, o: int, m: int = 1) -> bool:
    """Whether rotating the taps first (``T I² / M + T O²`` per example and vector) costs no more
    than rotating the per-example gradient (``I O (I + O)``)."""
    return t == 1 or t * (i * i / m + o * o) <= i * o * (i + o)


def _canonical(x):
    return x


def rotated_sum_sq(
    forms: list, a_vectors: Float[Array, "G I I"], b_vectors: Float[Array, "G O O"], weights=None
) -> Float[Array, "G I O"]:
    """``Σ_{n,m} w_{n,m} (Q_Aᵀ G_{n,m} Q_B)²`` in the canonical ``[G, I, O]`` layout.

    ``forms`` are the forms of one kernel's uses (summed into one per-example gradient). Two
    orders, the cheaper per example and vector is taken: rotate ``a`` and ``b`` first, then form
    ``Σ_t ã_t b̃_tᵀ`` (``T I² / M + T O² + T I O`` multiply-adds; for ``T = 1`` the squares need
    no outer product), or form ``G = Σ_t a_t b_tᵀ`` first, then rotate it, ``Q_Aᵀ G Q_B``
    (``T I O + I O (I + O)``): cheaper for convolutions, whose ``T`` positions outnumber ``I``.
    """
    joined = join_forms(forms)
    n, g, t, i = joined.a.shape
    m, o = joined.b.shape[1], joined.b.shape[-1]
    if taps_first(t, i, o, m):
        rotated = rotate_forms(a_vectors, b_vectors, forms)
        return bilinear.sum_sq(rotated._replace(to_param=_canonical), weights)
    if weights is None:
        weights = jnp.ones((n, m), joined.b.dtype)
    q_a = a_vectors.astype(joined.a.dtype)
    q_b = b_vectors.astype(joined.b.dtype)

    def direct(abw):
        a, b, w = abw
        grads = jnp.einsum("ngti,nmgto->nmgio", a, b)
        rotated = jnp.einsum("gij,nmgio->nmgjo", q_a, grads)
        rotated = jnp.einsum("nmgjo,gop->nmgjp", rotated, q_b)
        return jnp.einsum("nm,nmgjp->gjp", w.astype(rotated.dtype), rotated**2)

    chunk = chunking.chunk_size(n, m * g * i * o)
    return chunking.chunked_sum(direct, (joined.a, joined.b, weights), chunk)


def per_example_quadratic(
    block: EigenKroneckerBlock, forms: list, scale: Float[Array, "G I O"]
) -> Float[Array, "N M"]:
    """``Σ_{g,i,o} scale_{gio} (Q_Aᵀ G_{n,m} Q_B)²_{gio}`` per example and vector.

    With ``scale = (s + λ)^{-1}`` (``1 / block.damped_scaling(λ)``) this is
    ``vec(G_{n,m})ᵀ (C + λ I)⁻¹ vec(G_{n,m})`` for the EKFAC block ``C`` (self-influence), computed
    from the taps without forming ``G_{n,m}`` when ``T = 1``, else a chunk of examples at a time.

    Args:
      block: the kernel's :class:`~curvjax.EigenKroneckerBlock`.
      forms: the bilinear forms of the kernel's uses (``a [N, G, T, I]``, ``b [N, M, G, T, O]``).
      scale: ``[G, I, O]`` weights of the squared rotated entries.

    Returns:
      ``[N, M]``.
    """
    rot = rotate_forms(block.a_vectors, block.b_vectors, forms)
    n, g, t, i = rot.a.shape
    m, o = rot.b.shape[1], rot.b.shape[-1]
    if t == 1:
        return jnp.einsum("ngi,gio,nmgo->nm", rot.a[:, :, 0] ** 2, scale, rot.b[:, :, :, 0] ** 2)

    def direct(ab):
        a, b = ab
        grads = jnp.einsum("ngti,nmgto->nmgio", a, b)
        return jnp.einsum("nmgio,gio->nm", grads**2, scale)

    chunk = chunking.chunk_size(n, m * g * i * o)
    return chunking.chunked_map(direct, (rot.a, rot.b), chunk)


def ekfac_of(
    p: backprop.Pass,
    parts: dict,
    columns,
    *,
    approximation: str = kronecker.DEFAULT_APPROXIMATION,
) -> list:
    """EKFAC blocks for every float leaf of a pass.

    Args:
      p: the pass.
      parts: :func:`curvjax._src.kronecker.additive_parts` of ``columns`` (summed over them).
      columns: the backpropagated vectors that define the output factors (exact or Monte-Carlo).
      approximation: how positions sharing a weight enter the factors (their eigenbases only;
        ``s`` is always that of the per-example gradients).

    Returns:
      One entry per float leaf: :class:`~curvjax.EigenKroneckerBlock` at the Kronecker-factored
      kernels, the block of :func:`curvjax._src.kronecker.assemble` elsewhere.
    """
    blocks = kronecker.assemble(p, parts, approximation=approximation)
    uses = kronecker.kernel_uses(p)
    bases = {}
    for k, kernel_uses in uses.items():
        a_values, a_vectors = kronecker.input_eigh(p, kernel_uses, approximation, blocks[k].a)
        b_values, b_vectors = jnp.linalg.eigh(blocks[k].b)
        bases[k] = KroneckerEigh(a_values, a_vectors, b_values, b_vectors, blocks[k].index)

    def scalings(cols, weights):
        return {
            k: rotated_sum_sq(
                kronecker.forms_of(p, uses[k], cols), e.a_vectors, e.b_vectors, weights
            )
            for k, e in bases.items()
        }

    scaling = p.reduce_columns(scalings, columns) if bases else {}
    for k, e in bases.items():
        blocks[k] = EigenKroneckerBlock(
            e.a_vectors, e.b_vectors, scaling[k].astype(e.a_vectors.dtype), blocks[k].index
        )
    return blocks
