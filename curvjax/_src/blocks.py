# ruff: noqa: F722, UP037  (jaxtyping shape strings are not forward references)
"""Curvature blocks as linear operators: Kronecker-factored, dense and diagonal.

A block is the curvature of one parameter leaf of ``D`` entries, a symmetric ``[D, D]`` matrix over
the leaf's entries in row-major order. Every block type offers the same operations, so consumers
(spectral operators, preconditioners, K-FAC, Noisy K-FAC) never ask which type they hold:
``to_dense``, ``matvec``, ``eigenvalues``, ``trace``, ``eigh`` (an eigendecomposed form that is a
block itself), the damped power ``(C + c I)^p v``, the damped solve, and a square root of the
damped inverse for sampling.

Kronecker layout: :class:`KroneckerBlock` is ``P (⊕_g A_g ⊗ B_g) Pᵀ``; entry ``j`` of the leaf
(row-major) sits at canonical position ``index[j] = (g·I + i)·O + o``. In the canonical layout a
vector is a stack of matrices ``X_g [I, O]`` and ``(A ⊗ B) vec(X) = vec(A X Bᵀ)`` for the row-major
``vec``. ``index`` is static layout data: blocks are pytrees whose leaves are the float arrays only,
with ``index`` in the tree's auxiliary data, so ``jax.tree.map`` (e.g. a moving average) touches
``a`` and ``b`` and never ``index``. :class:`EigenKroneckerBlock` (EKFAC) shares this layout: it
holds the factors' eigenbases and, in place of the products of their eigenvalues, fitted ones
``s [G, I, O]``; its damping is always exact (``s + c``), never factored.

Factored Tikhonov damping (Martens & Grosse 2015, §6.3) replaces ``A ⊗ B + c I`` by

.. math::
    (A + π \\sqrt{c}\\, I) ⊗ (B + \\tfrac{\\sqrt{c}}{π} I), \\qquad
    π = \\sqrt{\\frac{\\operatorname{tr}(A) / \\dim A}{\\operatorname{tr}(B) / \\dim B}} ,

per feature group (``π = 1`` while either trace is not positive). Powers of the damped product are
taken in the eigenbases of ``A`` and ``B``: ``(Q_A ⊗ Q_B) diag(s^p) (Q_A ⊗ Q_B)ᵀ`` with
``s_ij = (a_i + π√c)(b_j + √c/π)`` (factored) or ``s_ij = a_i b_j + c`` (exact damping).

Resolution floor. An eigendecomposition or Cholesky factorisation of a factor in a floating-point
type with machine epsilon ``ε`` (``2⁻²³`` in float32) resolves its eigenvalues only to about
``ε ‖A‖ ≤ ε tr(A)``: the zero eigenvalues of a rank-deficient factor (fewer examples than inputs)
come out as ``±ε ‖A‖``. The damping added to each factor is therefore at least ``ε tr(A)``
(``ε tr(B)``), and negative eigenvalues of the (positive semi-definite) Kronecker factors count
as zero: ``(max(a_i, 0) + max(π√c, ε tr A))(max(b_j, 0) + max(√c/π, ε tr B))``. Dense blocks
get ``max(c, ε Σ|m_i|)``. The floor only acts when the requested damping is below the
resolution of the dtype (e.g. ``λ = 10⁻⁸`` on float32 factors of trace ``10³``), where the
requested inverse cannot be represented; in float64 it is ``2·10⁻¹⁶ tr`` and changes nothing in
practice.

The block-tridiagonal K-FAC inverse needs ``(A ⊗ B - C ⊗ D)⁻¹`` with ``A, B`` positive definite
and ``C, D`` positive semi-definite (Martens & Grosse 2015, §4.3 and appendix B): with the
generalised eigendecompositions ``P_1ᵀ A P_1 = I``, ``P_1ᵀ C P_1 = diag(s)`` and
``P_2ᵀ B P_2 = I``, ``P_2ᵀ D P_2 = diag(t)``,

.. math::
    (A ⊗ B - C ⊗ D)^{-1} \\operatorname{vec}(X) =
    \\operatorname{vec}\\Big(P_1 \\big[(P_1^⊤ X P_2) ⊘ (1 - s t^⊤)\\big] P_2^⊤\\Big).
"""

from __future__ import annotations

from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

# ---------------------------------------------------------------------------- static layout


class StaticIndex:
    """A read-only int32 numpy array that is hashable and compares by value (pytree aux data)."""

    __slots__ = ("array", "inverse", "_hash")

    def __init__(self, index: Any):
        if isinstance(index, StaticIndex):
            index = index.array
        if isinstance(index, jax.core.Tracer):
            raise ValueError(
                "a KroneckerBlock's `index` is static layout data and must be concrete (a numpy "
                "array or a concrete jax array), got a traced value: build the block outside "
                "the traced function or pass `index` as a numpy array."
            )
        array = np.array(index, dtype=np.int32).reshape(-1)
        array.setflags(write=False)
        inverse = np.empty_like(array)
        inverse[array] = np.arange(array.size, dtype=np.int32)
        inverse.setflags(write=False)
        self.array, self.inverse = array, inverse
        self._hash = hash((array.size, array.tobytes()))

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other: object) -> bool:
        if self is other:
            return True
        if not isinstance(other, StaticIndex):
            return NotImplemented
        return self._hash == other._hash and np.array_equal(self.array, other.array)

    def __repr__(self) -> str:
        return f"StaticIndex(size={self.array.size})"


def to_canonical(leaf: jax.Array, index: jax.Array, shape: tuple[int, int, int]) -> jax.Array:
    """Scatter the entries of ``leaf`` to their canonical positions: ``[G, I, O]``."""
    flat = jnp.zeros(jnp.shape(index), leaf.dtype).at[index].set(leaf.reshape(-1))
    return flat.reshape(shape)


def from_canonical(canon: jax.Array, index: jax.Array, leaf_shape) -> jax.Array:
    """Gather a canonical ``[G, I, O]`` array back to the leaf's layout."""
    return canon.reshape(-1)[index].reshape(leaf_shape)


# ---------------------------------------------------------------------------- Kronecker helpers


def trace_norm_pi(a_trace_mean: jax.Array, b_trace_mean: jax.Array) -> jax.Array:
    """``π = √((tr A / dim A) / (tr B / dim B))`` from the two mean traces; ``1`` if either is ≤ 0."""
    ok = (a_trace_mean > 0) & (b_trace_mean > 0)
    ratio = jnp.where(ok, a_trace_mean, 1.0) / jnp.where(ok, b_trace_mean, 1.0)
    return jnp.where(ok, jnp.sqrt(ratio), 1.0)


def kronecker_pi(a: jax.Array, b: jax.Array) -> jax.Array:
    """:func:`trace_norm_pi` of factors ``a [G, I, I]`` and ``b [G, O, O]``: ``[G]``."""
    mean_a = jnp.trace(a, axis1=-2, axis2=-1) / a.shape[-1]
    mean_b = jnp.trace(b, axis1=-2, axis2=-1) / b.shape[-1]
    return trace_norm_pi(mean_a, mean_b)


def resolution(values_abs_sum: jax.Array) -> jax.Array:
    """``ε Σ|λ_i|``: the smallest eigenvalue shift a factorisation in this dtype resolves."""
    return jnp.finfo(values_abs_sum.dtype).eps * values_abs_sum


def factored_shifts(a: jax.Array, b: jax.Array, damping) -> tuple[jax.Array, jax.Array]:
    """``(max(π√c, ε tr A), max(√c/π, ε tr B))`` per group for factors ``[G, I, I]``, ``[G, O, O]``.

    The factored Tikhonov damping added to each factor, floored at the factor's resolution (the
    module docstring); the traces are of ``|A|``'s diagonal (equal to ``tr A`` for a covariance).
    """
    root = jnp.sqrt(jnp.asarray(damping, a.dtype))
    pi = kronecker_pi(a, b)
    abs_a = jnp.sum(jnp.abs(jnp.diagonal(a, axis1=-2, axis2=-1)), axis=-1)
    abs_b = jnp.sum(jnp.abs(jnp.diagonal(b, axis1=-2, axis2=-1)), axis=-1)
    return jnp.maximum(pi * root, resolution(abs_a)), jnp.maximum(root / pi, resolution(abs_b))


def generalized_eigh(a: jax.Array, c: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(P, s)`` with ``Pᵀ a P = I`` and ``Pᵀ c P = diag(s)``, for ``a`` positive definite.

    With ``a = U diag(e) Uᵀ`` and ``R = U diag(e^{-1/2})``: ``s, E = eigh(Rᵀ c R)``, ``P = R E``.
    """
    e, u = jnp.linalg.eigh(a)
    e = jnp.maximum(e, resolution(jnp.sum(jnp.abs(e))))  # round-off of a near-singular ``a``
    r = u * (1.0 / jnp.sqrt(e))[None, :]
    m = r.T @ c @ r
    s, vectors = jnp.linalg.eigh(0.5 * (m + m.T))
    return r @ vectors, s


def kronecker_difference_solve(p1, s1, p2, s2, x: jax.Array) -> jax.Array:
    """``(A ⊗ B - C ⊗ D)⁻¹ vec(X)`` for ``X [I, O]`` from :func:`generalized_eigh` of both pairs."""
    rotated = p1.T @ x @ p2
    # ``0 ≤ s, t < 1`` in exact arithmetic; round-off can push ``s t`` to 1 or beyond
    eps = jnp.finfo(rotated.dtype).eps
    denominator = jnp.maximum(1.0 - s1[:, None] * s2[None, :], eps)
    return p1 @ (rotated / denominator) @ p2.T


# ---------------------------------------------------------------------------- the hierarchy


class CurvatureBlock:
    """Base class of the curvature blocks: a symmetric ``[D, D]`` operator on one leaf.

    Subclasses list their array fields in ``_fields`` (the pytree children) and their static
    layout in ``_static`` (pytree auxiliary data). ``v`` arguments may have any shape with ``D``
    entries (the leaf's shape, or flat ``[D]``); results have the shape of ``v``.
    """

    _fields: ClassVar[tuple[str, ...]] = ()
    _static: ClassVar[tuple[str, ...]] = ()
    kind: ClassVar[str] = ""

    # --- pytree ----------------------------------------------------------------------------
    def tree_flatten_with_keys(self):
        children = [(jax.tree_util.GetAttrKey(f), getattr(self, f)) for f in self._fields]
        return children, tuple(getattr(self, "_" + s) for s in self._static)

    def tree_flatten(self):
        return [getattr(self, f) for f in self._fields], tuple(
            getattr(self, "_" + s) for s in self._static
        )

    @classmethod
    def tree_unflatten(cls, aux, children):
        obj = object.__new__(cls)
        for name, value in zip(cls._fields, children, strict=True):
            object.__setattr__(obj, name, value)
        for name, value in zip(cls._static, aux, strict=True):
            object.__setattr__(obj, "_" + name, value)
        return obj

    def _replace(self, **changes):
        """A copy with some fields replaced (as ``NamedTuple._replace``)."""
        values = {f: getattr(self, f) for f in self._fields}
        values.update({s: getattr(self, "_" + s) for s in self._static})
        values.update(changes)
        return type(self)(**values)

    def __repr__(self) -> str:
        parts = [f"{f}={_describe(getattr(self, f))}" for f in self._fields]
        parts += [f"{s}={getattr(self, '_' + s)!r}" for s in self._static]
        return f"{type(self).__name__}({', '.join(parts)})"

    # --- the operations --------------------------------------------------------------------
    @property
    def size(self) -> int:
        """``D``, the number of entries of the leaf."""
        raise NotImplementedError

    def to_dense(self) -> Float[Array, "D D"]:
        """The ``[D, D]`` matrix, rows and columns in the leaf's row-major order."""
        raise NotImplementedError

    def matvec(self, v: Float[Array, "..."]) -> Float[Array, "..."]:
        """``C v`` for ``v`` with ``D`` entries; shaped like ``v``."""
        raise NotImplementedError

    def eigenvalues(self) -> Float[Array, " D"]:
        """All ``D`` eigenvalues (unsorted)."""
        raise NotImplementedError

    def trace(self) -> Float[Array, ""]:
        """``tr C``."""
        raise NotImplementedError

    def eigh(self) -> CurvatureBlock:
        """The eigendecomposed form of the block (the same operator; cheap damped powers)."""
        raise NotImplementedError

    def damped_scaling(self, damping, *, factored: bool = True) -> jax.Array:
        """Eigenvalues of the damped block in the basis of :meth:`eigh` (its noise layout)."""
        return self.eigh().damped_scaling(damping, factored=factored)

    def damped_power(self, v, damping, power=-1.0, *, factored: bool = True) -> jax.Array:
        """``(C + c I)^p v`` (for Kronecker blocks with ``factored``: the factored damping)."""
        return self.eigh().damped_power(v, damping, power, factored=factored)

    def damped_solve(self, v, damping, *, factored: bool = True) -> jax.Array:
        """``(C + c I)⁻¹ v`` (Kronecker with ``factored``: the factored damping)."""
        return self.damped_power(v, damping, -1.0, factored=factored)

    def damped_inverse_sqrt(self, damping, *, factored: bool = True, scale=1.0) -> SquareRoot:
        """``R`` with ``R Rᵀ = scale² (C + c I)⁻¹``, for sampling from ``N(0, R Rᵀ)``."""
        return self.eigh().damped_inverse_sqrt(damping, factored=factored, scale=scale)

    def nonnegative(self) -> CurvatureBlock:
        """The eigendecomposed form with negative eigenvalues set to zero."""
        return self.eigh().nonnegative()

    def prior_root(self, std) -> SquareRoot:
        """The square root ``std · I`` in this block's noise layout (a prior before any data)."""
        return self.eigh().prior_root(std)

    def check_leaf(self, name: str, leaf) -> None:
        """Raise a ``ValueError`` naming ``name`` unless the block fits ``leaf``."""
        size = int(np.prod(jnp.shape(leaf), dtype=int))
        if self.size != size:
            raise ValueError(
                f"`curvature` for {name} is a {type(self).__name__} over {self.size} entries, the "
                f"leaf has {size}: compute the curvature for the same parameters."
            )

    def conform(self, block: CurvatureBlock, leaf_shape) -> CurvatureBlock:
        """``block`` (possibly with a leading sample axis, averaged) in this block's form.

        Raises ``ValueError`` (with a message to prefix by the leaf name) if it cannot be.
        """
        raise NotImplementedError

    def moving_average(self, old: CurvatureBlock, decay) -> CurvatureBlock:
        """``decay · old + (1 - decay) · self`` in this block's form (a moving average).

        Field by field for blocks that are linear in their fields (factors, matrices, diagonals:
        for Kronecker blocks the factors are averaged, as K-FAC does); integer fields from
        ``self``.
        """

        def mix(o, n):
            if jnp.issubdtype(n.dtype, jnp.integer):
                return n
            d = jnp.asarray(decay, o.dtype)
            return d * o + (1 - d) * n

        return jax.tree.map(mix, old, self)

    def same_layout(self, other: Any) -> bool:
        """Whether ``other`` is a block of the same type, layout and shapes."""
        if jax.tree.structure(self) != jax.tree.structure(other):
            return False
        return [jnp.shape(x) for x in jax.tree.leaves(self)] == [
            jnp.shape(x) for x in jax.tree.leaves(other)
        ]


def _describe(x) -> str:
    shape = getattr(x, "shape", None)
    return f"[{', '.join(map(str, shape))}]" if shape is not None else repr(x)


def _register(cls):
    return jax.tree_util.register_pytree_with_keys_class(cls)


def _rotate(a_vectors, b_vectors, canon):
    """``Q_Aᵀ X Q_B`` per group."""
    return jnp.einsum("gji,gjk,gkl->gil", a_vectors, canon, b_vectors)


def _unrotate(a_vectors, b_vectors, canon):
    """``Q_A X Q_Bᵀ`` per group."""
    return jnp.einsum("gij,gjk,glk->gil", a_vectors, canon, b_vectors)


def _power(values, power):
    return 1.0 / values if isinstance(power, int | float) and power == -1 else values**power


@_register
class KroneckerBlock(CurvatureBlock):
    """``P (⊕_g A_g ⊗ B_g) Pᵀ``: a Kronecker-factored block of one kernel leaf.

    Attributes:
      a: ``[G, I, I]`` input-side factors (``G = 1`` unless feature groups / dot batch dims).
      b: ``[G, O, O]`` output-side factors.
      index: ``[D]`` int32 numpy array (static), for each entry of the leaf (row-major) its
        canonical position ``(g·I + i)·O + o``; for a flax ``Dense`` kernel ``[d_in, d_out]`` this
        is the identity. It is pytree auxiliary data, not a leaf.

    Example:
      >>> import jax, jax.numpy as jnp, numpy as np, curvjax
      >>> blk = curvjax.KroneckerBlock(jnp.eye(2)[None], 2 * jnp.eye(3)[None], np.arange(6))
      >>> float(blk.trace()), len(jax.tree.leaves(blk))
      (12.0, 2)
    """

    _fields = ("a", "b")
    _static = ("index",)
    kind = "kronecker"

    def __init__(self, a: Float[Array, "G I I"], b: Float[Array, "G O O"], index: Any):
        self.a, self.b = a, b
        self._index = StaticIndex(index)

    @property
    def index(self) -> np.ndarray:
        return self._index.array

    @property
    def size(self) -> int:
        return self._index.array.size

    @property
    def canonical_shape(self) -> tuple[int, int, int]:
        return (self.a.shape[-3], self.a.shape[-1], self.b.shape[-1])

    def to_canonical(self, v: jax.Array) -> Float[Array, "G I O"]:
        """A leaf-ordered ``v`` in the canonical ``[G, I, O]`` layout."""
        return v.reshape(-1)[self._index.inverse].reshape(self.canonical_shape)

    def from_canonical(self, canon: jax.Array, shape) -> jax.Array:
        """A canonical ``[G, I, O]`` array back in the leaf's order, reshaped to ``shape``."""
        return canon.reshape(-1)[self._index.array].reshape(shape)

    def to_dense(self):
        canon = jax.scipy.linalg.block_diag(
            *[jnp.kron(self.a[g], self.b[g]) for g in range(self.a.shape[0])]
        )
        return canon[self.index][:, self.index]

    def matvec(self, v):
        out = jnp.einsum("gij,gjo,gpo->gip", self.a, self.to_canonical(v), self.b)
        return self.from_canonical(out, jnp.shape(v))

    def eigenvalues(self):
        ea, eb = jnp.linalg.eigvalsh(self.a), jnp.linalg.eigvalsh(self.b)  # [G, I], [G, O]
        return jnp.einsum("gi,go->gio", ea, eb).ravel()

    def trace(self):
        return jnp.sum(jnp.trace(self.a, axis1=1, axis2=2) * jnp.trace(self.b, axis1=1, axis2=2))

    def eigh(self) -> KroneckerEigh:
        a_values, a_vectors = jnp.linalg.eigh(self.a)
        b_values, b_vectors = jnp.linalg.eigh(self.b)
        return KroneckerEigh(a_values, a_vectors, b_values, b_vectors, self._index)

    def damped_solve(self, v, damping, *, factored: bool = True):
        """``(C + c I)⁻¹ v``; factored: ``X_g ↦ (A_g + π√c I)⁻¹ X_g (B_g + √c/π I)⁻¹`` (Cholesky)."""
        if not factored:
            return super().damped_solve(v, damping, factored=False)
        canon = self.to_canonical(v)
        shift_a, shift_b = factored_shifts(self.a, self.b, damping)

        def one(a, b, x, da, db):
            a_chol = jax.scipy.linalg.cho_factor(a + da * jnp.eye(a.shape[0], dtype=a.dtype))
            b_chol = jax.scipy.linalg.cho_factor(b + db * jnp.eye(b.shape[0], dtype=b.dtype))
            left = jax.scipy.linalg.cho_solve(a_chol, x)
            return jax.scipy.linalg.cho_solve(b_chol, left.T).T

        solved = jax.vmap(one)(self.a, self.b, canon, shift_a, shift_b)
        return self.from_canonical(solved, jnp.shape(v))

    def prior_root(self, std):
        g, i, o = self.canonical_shape
        dtype = self.a.dtype
        eye = lambda n: jnp.broadcast_to(jnp.eye(n, dtype=dtype), (g, n, n))  # noqa: E731
        return KroneckerRoot(eye(i), eye(o), jnp.full((g, i, o), std, dtype), self._index)

    def conform(self, block, leaf_shape):
        if block.kind != self.kind:
            raise ValueError(
                f"holds a {type(block).__name__}, where a Kronecker-factored kernel is expected"
            )
        a = block.a if block.a.ndim == 3 else jnp.mean(block.a, axis=0)
        b = block.b if block.b.ndim == 3 else jnp.mean(block.b, axis=0)
        if a.shape != self.a.shape or b.shape != self.b.shape:
            raise ValueError(
                f"has factors {a.shape} ⊗ {b.shape}, where {self.a.shape} ⊗ {self.b.shape} "
                "are expected"
            )
        return KroneckerBlock(a, b, self._index)


@_register
class KroneckerEigh(CurvatureBlock):
    """A Kronecker block ``P (⊕_g A_g ⊗ B_g) Pᵀ`` held as the eigendecompositions of its factors.

    Attributes:
      a_values: ``[G, I]`` eigenvalues of ``A_g``.
      a_vectors: ``[G, I, I]`` eigenvectors (columns) of ``A_g``.
      b_values: ``[G, O]`` eigenvalues of ``B_g``.
      b_vectors: ``[G, O, O]`` eigenvectors (columns) of ``B_g``.
      index: ``[D]`` int32 numpy array (static), as for :class:`KroneckerBlock`.
    """

    _fields = ("a_values", "a_vectors", "b_values", "b_vectors")
    _static = ("index",)
    kind = "kronecker"

    def __init__(self, a_values, a_vectors, b_values, b_vectors, index):
        self.a_values, self.a_vectors = a_values, a_vectors
        self.b_values, self.b_vectors = b_values, b_vectors
        self._index = StaticIndex(index)

    index = KroneckerBlock.index
    size = KroneckerBlock.size
    to_canonical = KroneckerBlock.to_canonical
    from_canonical = KroneckerBlock.from_canonical

    @property
    def canonical_shape(self) -> tuple[int, int, int]:
        return (*self.a_values.shape, self.b_values.shape[-1])

    def factors(self) -> KroneckerBlock:
        """The :class:`KroneckerBlock` with ``A_g = Q_A diag(a) Q_Aᵀ`` and ``B_g`` alike."""
        a = jnp.einsum("gij,gj,gkj->gik", self.a_vectors, self.a_values, self.a_vectors)
        b = jnp.einsum("gij,gj,gkj->gik", self.b_vectors, self.b_values, self.b_vectors)
        return KroneckerBlock(a, b, self._index)

    def to_dense(self):
        return self.factors().to_dense()

    def _in_basis(self, v, scale):
        rotated = _rotate(self.a_vectors, self.b_vectors, self.to_canonical(v))
        return self._from_basis(rotated * scale, jnp.shape(v))

    def _from_basis(self, rotated, shape) -> jax.Array:
        """``Q_A X Q_Bᵀ`` for ``X`` ``[G, I, O]`` in the eigenbasis, in the leaf's order."""
        out = _unrotate(self.a_vectors, self.b_vectors, rotated)
        return self.from_canonical(out, shape)

    def matvec(self, v):
        return self._in_basis(v, self.a_values[:, :, None] * self.b_values[:, None, :])

    def eigenvalues(self):
        return (self.a_values[:, :, None] * self.b_values[:, None, :]).ravel()

    def trace(self):
        return jnp.sum(jnp.sum(self.a_values, -1) * jnp.sum(self.b_values, -1))

    def eigh(self):
        return self

    def nonnegative(self):
        return KroneckerEigh(
            jnp.clip(self.a_values, 0.0),
            self.a_vectors,
            jnp.clip(self.b_values, 0.0),
            self.b_vectors,
            self._index,
        )

    def _damped_factors(self, damping):
        """``max(a, 0) + max(π√c, ε Σ|a|)`` and the same for ``b`` (module docstring)."""
        root = jnp.sqrt(jnp.asarray(damping, self.a_values.dtype))
        pi = trace_norm_pi(jnp.mean(self.a_values, axis=-1), jnp.mean(self.b_values, axis=-1))
        floor_a = resolution(jnp.sum(jnp.abs(self.a_values), axis=-1))
        floor_b = resolution(jnp.sum(jnp.abs(self.b_values), axis=-1))
        a_damped = jnp.maximum(self.a_values, 0.0) + jnp.maximum(pi * root, floor_a)[:, None]
        b_damped = jnp.maximum(self.b_values, 0.0) + jnp.maximum(root / pi, floor_b)[:, None]
        return a_damped, b_damped

    def damped_scaling(self, damping, *, factored: bool = True):
        """``[G, I, O]``: ``(a_i + π√c)(b_j + √c/π)`` (factored) or ``a_i b_j + c``."""
        if not factored:
            return self.a_values[:, :, None] * self.b_values[:, None, :] + damping
        a_damped, b_damped = self._damped_factors(damping)
        return a_damped[:, :, None] * b_damped[:, None, :]

    def damped_power(self, v, damping, power=-1.0, *, factored: bool = True):
        if factored:  # the power of each damped factor, as (A ⊗ B)^p = A^p ⊗ B^p
            a_damped, b_damped = self._damped_factors(damping)
            scale = _power(a_damped, power)[:, :, None] * _power(b_damped, power)[:, None, :]
        else:
            scale = _power(self.damped_scaling(damping, factored=False), power)
        return self._in_basis(v, scale)

    def damped_inverse_sqrt(self, damping, *, factored: bool = True, scale=1.0):
        std = scale / jnp.sqrt(self.damped_scaling(damping, factored=factored))
        return KroneckerRoot(self.a_vectors, self.b_vectors, std, self._index)

    def prior_root(self, std):
        g, i, o = self.canonical_shape
        dtype = self.a_vectors.dtype
        eye = lambda n: jnp.broadcast_to(jnp.eye(n, dtype=dtype), (g, n, n))  # noqa: E731
        return KroneckerRoot(eye(i), eye(o), jnp.full((g, i, o), std, dtype), self._index)


@_register
class EigenKroneckerBlock(CurvatureBlock):
    """An eigenvalue-corrected Kronecker block (EKFAC): Kronecker eigenbasis, fitted eigenvalues.

    .. math::
        C = P \\Big(\\bigoplus_g (Q_{A,g} ⊗ Q_{B,g}) \\operatorname{diag}(s_g)
        (Q_{A,g} ⊗ Q_{B,g})^⊤\\Big) P^⊤ ,

    with ``Q_A``, ``Q_B`` the eigenvectors of the Kronecker factors ``A_g``, ``B_g`` and ``s`` the
    second moments of the per-example gradients in that basis (George et al. 2018), so that
    ``C`` is the Frobenius-nearest matrix to the curvature among those diagonal in the basis
    ``Q_A ⊗ Q_B``. The operator is held as its eigendecomposition: every power of the damped
    block is exact, ``(C + c I)^p = (Q_A ⊗ Q_B) diag((s + c)^p) (Q_A ⊗ Q_B)ᵀ`` (the ``factored``
    argument of the damped operations has no meaning here and is ignored). ``s ≥ 0`` by
    construction; no resolution floor is added to ``c``.

    Attributes:
      a_vectors: ``[G, I, I]`` eigenvectors (columns) of the input-side factors.
      b_vectors: ``[G, O, O]`` eigenvectors (columns) of the output-side factors.
      scaling: ``[G, I, O]`` the corrected eigenvalues ``s``, entry ``(g, i, o)`` along
        ``Q_A[g][:, i] ⊗ Q_B[g][:, o]``.
      index: ``[D]`` int32 numpy array (static), as for :class:`KroneckerBlock`.

    Example:
      >>> import jax.numpy as jnp, numpy as np, curvjax
      >>> eye = lambda n: jnp.eye(n)[None]
      >>> blk = curvjax.EigenKroneckerBlock(eye(2), eye(3), jnp.arange(6.0).reshape(1, 2, 3),
      ...                                   np.arange(6))
      >>> float(blk.trace()), blk.damped_solve(jnp.ones(6), 1.0).tolist()[:2]
      (15.0, [1.0, 0.5])

    References:
      George, Laurent, Bouthillier, Ballas & Vincent, "Fast approximate natural gradient descent
      in a Kronecker-factored eigenbasis", NeurIPS 2018.
    """

    _fields = ("a_vectors", "b_vectors", "scaling")
    _static = ("index",)
    kind = "eigen_kronecker"

    def __init__(
        self,
        a_vectors: Float[Array, "G I I"],
        b_vectors: Float[Array, "G O O"],
        scaling: Float[Array, "G I O"],
        index: Any,
    ):
        self.a_vectors, self.b_vectors, self.scaling = a_vectors, b_vectors, scaling
        self._index = StaticIndex(index)

    index = KroneckerBlock.index
    size = KroneckerBlock.size
    to_canonical = KroneckerBlock.to_canonical
    from_canonical = KroneckerBlock.from_canonical
    _in_basis = KroneckerEigh._in_basis
    _from_basis = KroneckerEigh._from_basis
    prior_root = KroneckerEigh.prior_root

    @property
    def canonical_shape(self) -> tuple[int, int, int]:
        return tuple(self.scaling.shape)

    def to_dense(self):
        groups = []
        for g in range(self.scaling.shape[0]):
            basis = jnp.kron(self.a_vectors[g], self.b_vectors[g])  # column (i, o) = q_i ⊗ q_o
            groups.append((basis * self.scaling[g].reshape(-1)[None, :]) @ basis.T)
        canon = jax.scipy.linalg.block_diag(*groups)
        return canon[self.index][:, self.index]

    def matvec(self, v):
        return self._in_basis(v, self.scaling)

    def eigenvalues(self):
        return self.scaling.ravel()

    def trace(self):
        return jnp.sum(self.scaling)

    def eigh(self):
        return self

    def nonnegative(self):
        return self._replace(scaling=jnp.clip(self.scaling, 0.0))

    def damped_scaling(self, damping, *, factored: bool = True):
        """``[G, I, O]``: ``s + c`` (exact damping; ``factored`` is ignored)."""
        del factored
        return self.scaling + damping

    def damped_power(self, v, damping, power=-1.0, *, factored: bool = True):
        """``(C + c I)^p v = (Q_A ⊗ Q_B) diag((s + c)^p) (Q_A ⊗ Q_B)ᵀ v`` (``factored`` ignored)."""
        return self._in_basis(v, _power(self.damped_scaling(damping), power))

    def damped_inverse_sqrt(self, damping, *, factored: bool = True, scale=1.0):
        std = scale / jnp.sqrt(self.damped_scaling(damping, factored=factored))
        return KroneckerRoot(self.a_vectors, self.b_vectors, std, self._index)

    def moving_average(self, old, decay):
        """``decay · old + (1 - decay) · self`` projected onto this block's eigenbasis.

        Eigenbases cannot be averaged entrywise. The result keeps the basis ``Q = Q_A ⊗ Q_B`` of
        ``self`` and the scaling ``decay · diag(Qᵀ C_old Q) + (1 - decay) s``: the
        Frobenius-nearest matrix diagonal in ``Q`` to the averaged operator. For Kronecker bases
        ``diag(Qᵀ C_old Q) = (Q_Aᵀ Q_A')^{∘2} s' ((Q_Bᵀ Q_B')^{∘2})ᵀ`` per group.
        """
        overlap_a = jnp.einsum("gji,gjk->gik", self.a_vectors, old.a_vectors) ** 2
        overlap_b = jnp.einsum("gji,gjk->gik", self.b_vectors, old.b_vectors) ** 2
        projected = jnp.einsum("gij,gjk,glk->gil", overlap_a, old.scaling, overlap_b)
        d = jnp.asarray(decay, self.scaling.dtype)
        return self._replace(scaling=d * projected + (1 - d) * self.scaling)

    def conform(self, block, leaf_shape):
        if block.kind != self.kind:
            raise ValueError(
                f"holds a {type(block).__name__}, where an eigenvalue-corrected Kronecker block "
                "is expected"
            )
        if not self.same_layout(block):
            raise ValueError(
                f"has scaling {block.scaling.shape}, where {self.scaling.shape} is expected (one "
                "block, without a sample axis)"
            )
        return block


@_register
class DenseBlock(CurvatureBlock):
    """A full ``[D, D]`` block over the leaf's entries (row-major).

    Attributes:
      matrix: ``[D, D]``.

    Example:
      >>> import jax.numpy as jnp, curvjax
      >>> blk = curvjax.DenseBlock(jnp.array([[2.0, 1.0], [1.0, 2.0]]))
      >>> blk.matvec(jnp.ones(2)).tolist()
      [3.0, 3.0]
    """

    _fields = ("matrix",)
    kind = "dense"

    def __init__(self, matrix: Float[Array, "D D"]):
        self.matrix = matrix

    @property
    def size(self) -> int:
        return self.matrix.shape[-1]

    def to_dense(self):
        return self.matrix

    def matvec(self, v):
        return (self.matrix @ v.reshape(-1)).reshape(jnp.shape(v))

    def eigenvalues(self):
        return jnp.linalg.eigvalsh(self.matrix)

    def trace(self):
        return jnp.trace(self.matrix)

    def eigh(self) -> DenseEigh:
        values, vectors = jnp.linalg.eigh(self.matrix)
        return DenseEigh(values, vectors)

    def damped_solve(self, v, damping, *, factored: bool = True):
        """``(M + c I)⁻¹ v`` by a Cholesky solve (``factored`` has no effect)."""
        del factored
        eye = jnp.eye(self.matrix.shape[0], dtype=self.matrix.dtype)
        shift = jnp.maximum(damping, resolution(jnp.sum(jnp.abs(jnp.diagonal(self.matrix)))))
        factor = jax.scipy.linalg.cho_factor(self.matrix + shift * eye)
        return jax.scipy.linalg.cho_solve(factor, v.reshape(-1)).reshape(jnp.shape(v))

    def conform(self, block, leaf_shape):
        raise ValueError(f"holds a {type(block).__name__}; a DenseBlock is not kept as a state")


@_register
class DenseEigh(CurvatureBlock):
    """A :class:`DenseBlock` held as its eigendecomposition ``M = Q diag(values) Qᵀ``.

    Attributes:
      values: ``[D]`` eigenvalues.
      vectors: ``[D, D]`` eigenvectors (columns), rows in the leaf's row-major order.
    """

    _fields = ("values", "vectors")
    kind = "dense"

    def __init__(self, values: Float[Array, " D"], vectors: Float[Array, "D D"]):
        self.values, self.vectors = values, vectors

    @property
    def size(self) -> int:
        return self.values.shape[-1]

    def to_dense(self):
        return (self.vectors * self.values[None, :]) @ self.vectors.T

    def _in_basis(self, v, scale):
        flat = v.reshape(-1)
        return (self.vectors @ (scale * (self.vectors.T @ flat))).reshape(jnp.shape(v))

    def matvec(self, v):
        return self._in_basis(v, self.values)

    def eigenvalues(self):
        return self.values

    def trace(self):
        return jnp.sum(self.values)

    def eigh(self):
        return self

    def nonnegative(self):
        return DenseEigh(jnp.clip(self.values, 0.0), self.vectors)

    def damped_scaling(self, damping, *, factored: bool = True):
        """``m_i + max(c, ε Σ|m_i|)`` (the resolution floor of the module docstring)."""
        del factored
        return self.values + jnp.maximum(damping, resolution(jnp.sum(jnp.abs(self.values))))

    def damped_power(self, v, damping, power=-1.0, *, factored: bool = True):
        del factored
        return self._in_basis(v, self.damped_scaling(damping) ** power)

    def damped_inverse_sqrt(self, damping, *, factored: bool = True, scale=1.0):
        return DenseRoot(self.vectors, scale / jnp.sqrt(self.damped_scaling(damping)))

    def prior_root(self, std):
        dtype = self.vectors.dtype
        return DenseRoot(jnp.eye(self.size, dtype=dtype), jnp.full((self.size,), std, dtype))


@_register
class DiagonalBlock(CurvatureBlock):
    """A diagonal block; ``diagonal`` has the leaf's shape (it is its own eigendecomposition).

    Attributes:
      diagonal: the diagonal, shaped like the leaf.

    Example:
      >>> import jax.numpy as jnp, curvjax
      >>> curvjax.DiagonalBlock(jnp.array([1.0, 3.0])).damped_solve(jnp.ones(2), 1.0).tolist()
      [0.5, 0.25]
    """

    _fields = ("diagonal",)
    kind = "diagonal"

    def __init__(self, diagonal: Float[Array, "..."]):
        self.diagonal = diagonal

    @property
    def size(self) -> int:
        return int(np.prod(jnp.shape(self.diagonal), dtype=int))

    def to_dense(self):
        return jnp.diag(self.diagonal.ravel())

    def matvec(self, v):
        return self.diagonal.reshape(jnp.shape(v)) * v

    def eigenvalues(self):
        return self.diagonal.ravel()

    def trace(self):
        return jnp.sum(self.diagonal)

    def eigh(self):
        return self

    def nonnegative(self):
        return DiagonalBlock(jnp.clip(self.diagonal, 0.0))

    def damped_scaling(self, damping, *, factored: bool = True):
        del factored
        return self.diagonal + damping

    def damped_power(self, v, damping, power=-1.0, *, factored: bool = True):
        del factored
        damped = self.diagonal.reshape(jnp.shape(v)) + damping
        if isinstance(power, int | float) and power == -1:
            return v / damped
        return v * damped**power

    def damped_solve(self, v, damping, *, factored: bool = True):
        del factored
        return v / (self.diagonal.reshape(jnp.shape(v)) + damping)

    def damped_inverse_sqrt(self, damping, *, factored: bool = True, scale=1.0):
        return DiagonalRoot(scale / jnp.sqrt(self.damped_scaling(damping)))

    def prior_root(self, std):
        return DiagonalRoot(jnp.full_like(self.diagonal, std))

    def check_leaf(self, name, leaf):
        if jnp.shape(self.diagonal) != jnp.shape(leaf):
            raise ValueError(
                f"`curvature` for {name} has shape {jnp.shape(self.diagonal)}, the leaf "
                f"{jnp.shape(leaf)}: pass a diagonal shaped like the parameters or curvjax blocks."
            )

    def conform(self, block, leaf_shape):
        """The diagonal of ``block`` shaped like the leaf (dense and diagonal blocks)."""
        size = int(np.prod(leaf_shape, dtype=int))
        if block.kind == "dense":
            diagonal = jnp.diagonal(block.matrix, axis1=-2, axis2=-1)
        elif block.kind == "diagonal":
            diagonal = block.diagonal
        else:
            raise ValueError(
                f"holds a {type(block).__name__}, where a diagonal curvature is expected"
            )
        if diagonal.size != size:  # a leading sample axis
            diagonal = jnp.mean(diagonal.reshape(-1, size), axis=0)
        return DiagonalBlock(diagonal.reshape(leaf_shape))


# ---------------------------------------------------------------------------- square roots


class SquareRoot(CurvatureBlock):
    """A square root ``R`` of a damped inverse (not symmetric): ``R Rᵀ = scale² (C + c I)⁻¹``.

    ``R`` maps noise of :attr:`noise_shape` to the leaf's entries; :meth:`sample` draws
    ``R ε`` with ``ε ~ N(0, I)``.
    """

    @property
    def noise_shape(self) -> tuple[int, ...]:
        raise NotImplementedError

    def sample(self, key: jax.Array) -> jax.Array:
        """``R ε``, ``ε ~ N(0, I)`` of :attr:`noise_shape`: ``[D]`` (diagonal: leaf-shaped)."""
        return self.matvec(jax.random.normal(key, self.noise_shape, self.std.dtype))

    def to_dense(self):
        """``R`` as a ``[D, D]`` matrix (rows: leaf entries, columns: noise entries)."""
        eye = jnp.eye(self.size, dtype=self.std.dtype)
        return jax.vmap(lambda e: self.matvec(e.reshape(self.noise_shape)).reshape(-1))(eye).T


@_register
class KroneckerRoot(SquareRoot):
    """``R ε = P vec(Q_A (ε ⊙ std) Q_Bᵀ)`` per group, for canonical noise ``ε [G, I, O]``.

    Attributes:
      a_vectors: ``[G, I, I]`` eigenvectors ``Q_A`` of the input-side factors.
      b_vectors: ``[G, O, O]`` eigenvectors ``Q_B`` of the output-side factors.
      std: ``[G, I, O]`` standard deviations along the eigenvector pairs.
      index: ``[D]`` int32 numpy array (static), as for :class:`KroneckerBlock`.
    """

    _fields = ("a_vectors", "b_vectors", "std")
    _static = ("index",)
    kind = "kronecker"

    def __init__(self, a_vectors, b_vectors, std, index):
        self.a_vectors, self.b_vectors, self.std = a_vectors, b_vectors, std
        self._index = StaticIndex(index)

    index = KroneckerBlock.index
    size = KroneckerBlock.size
    from_canonical = KroneckerBlock.from_canonical

    @property
    def noise_shape(self):
        return tuple(self.std.shape)

    def matvec(self, v):
        canon = _unrotate(self.a_vectors, self.b_vectors, v * self.std)
        return self.from_canonical(canon, (self.size,))


@_register
class DenseRoot(SquareRoot):
    """``R ε = Q (ε ⊙ std)`` for noise ``ε [D]``.

    Attributes:
      vectors: ``[D, D]`` eigenvectors (columns).
      std: ``[D]`` standard deviations along them.
    """

    _fields = ("vectors", "std")
    kind = "dense"

    def __init__(self, vectors, std):
        self.vectors, self.std = vectors, std

    @property
    def size(self):
        return self.std.shape[-1]

    @property
    def noise_shape(self):
        return (self.size,)

    def matvec(self, v):
        return self.vectors @ (v * self.std)


@_register
class DiagonalRoot(SquareRoot):
    """``R ε = std ⊙ ε`` for leaf-shaped noise ``ε``.

    Attributes:
      std: standard deviations, shaped like the leaf.
    """

    _fields = ("std",)
    kind = "diagonal"

    def __init__(self, std):
        self.std = std

    @property
    def size(self):
        return int(np.prod(jnp.shape(self.std), dtype=int))

    @property
    def noise_shape(self):
        return tuple(jnp.shape(self.std))

    def matvec(self, v):
        return v * self.std


# ---------------------------------------------------------------------------- trees of blocks


def is_block(x: Any) -> bool:
    """Whether ``x`` is a curvature block (use as ``is_leaf`` when mapping over trees of blocks)."""
    return isinstance(x, CurvatureBlock)


def as_block(x: Any) -> CurvatureBlock | None:
    """``x`` as a block: blocks and ``None`` as they are, an array as a :class:`DiagonalBlock`."""
    if x is None or is_block(x):
        return x
    return DiagonalBlock(x)


def map_blocks(fn, tree: Any) -> Any:
    """``fn`` applied to every block of ``tree`` (``None`` entries stay ``None``)."""
    return jax.tree.map(fn, tree, is_leaf=is_block)


def block_to_dense(block: CurvatureBlock) -> Float[Array, "D D"]:
    """The ``[D, D]`` matrix of one block, rows and columns in the leaf's row-major order.

    Example:
      >>> import jax.numpy as jnp, curvjax
      >>> blk = curvjax.KroneckerBlock(jnp.eye(2)[None], 2 * jnp.eye(3)[None], jnp.arange(6))
      >>> curvjax.block_to_dense(blk).shape
      (6, 6)
    """
    if not is_block(block):
        raise TypeError(f"not a curvature block: {type(block).__name__}")
    return block.to_dense()


def blocks_to_dense(blocks: Any) -> Float[Array, "D D"]:
    """Block-diagonal ``[D, D]`` matrix of a params-shaped tree of blocks.

    Leaves are taken in ``jax.tree.leaves`` order of the parameters (``None`` entries, for
    non-float leaves, are skipped), each flattened row-major: the order of
    ``jax.flatten_util.ravel_pytree`` on the float leaves, as :func:`curvjax.ggn_matrix` uses.

    Example:
      >>> import jax.numpy as jnp, curvjax
      >>> tree = {"w": curvjax.DenseBlock(jnp.eye(2)), "b": curvjax.DiagonalBlock(jnp.ones(3))}
      >>> curvjax.blocks_to_dense(tree).shape
      (5, 5)
    """
    mats = [block_to_dense(b) for b in jax.tree.leaves(blocks, is_leaf=is_block)]
    return jax.scipy.linalg.block_diag(*mats)
