"""Damped inverses of Kronecker-factored, dense and diagonal curvature blocks.

Shared by the curvature-preconditioned optimizers. Layout conventions (those of
:class:`curvjax.KroneckerBlock`): a block is ``P (⊕_g A_g ⊗ B_g) Pᵀ``; entry ``j`` of a leaf
(row-major) sits at canonical position ``index[j] = (g·I + i)·O + o``. In the canonical layout a
vector is a stack of matrices ``X_g [I, O]`` and ``(A ⊗ B) vec(X) = vec(A X Bᵀ)`` for the row-major
``vec``.

Factored Tikhonov damping (Martens & Grosse 2015, §6.3) replaces ``A ⊗ B + c I`` by

.. math::
    (A + π \\sqrt{c}\\, I) ⊗ (B + \\tfrac{\\sqrt{c}}{π} I), \\qquad
    π = \\sqrt{\\frac{\\operatorname{tr}(A) / \\dim A}{\\operatorname{tr}(B) / \\dim B}} ,

per feature group (``π = 1`` while either trace is zero). Powers of the damped product are taken
in the eigenbases of ``A`` and ``B``: ``(Q_A ⊗ Q_B) diag((a_i + π√c)^p (b_j + √c/π)^p)
(Q_A ⊗ Q_B)ᵀ``; ``p = -1`` is the inverse, ``p = -1/2`` the inverse square root (for sampling
from ``N(0, ρ² (F + c I)⁻¹)``).

The block-tridiagonal K-FAC inverse needs ``(A ⊗ B - C ⊗ D)⁻¹`` with ``A, B`` positive definite
and ``C, D`` positive semi-definite (Martens & Grosse 2015, §4.3 and appendix B): with the
generalised eigendecompositions ``P_1ᵀ A P_1 = I``, ``P_1ᵀ C P_1 = diag(s)`` and
``P_2ᵀ B P_2 = I``, ``P_2ᵀ D P_2 = diag(t)``,

.. math::
    (A ⊗ B - C ⊗ D)^{-1} \\operatorname{vec}(X) =
    \\operatorname{vec}\\Big(P_1 \\big[(P_1^⊤ X P_2) ⊘ (1 - s t^⊤)\\big] P_2^⊤\\Big).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class KroneckerEigh(NamedTuple):
    """Eigendecompositions of the factors of one :class:`curvjax.KroneckerBlock`.

    Attributes:
      a_values: ``[G, I]`` eigenvalues of ``A_g``.
      a_vectors: ``[G, I, I]`` eigenvectors (columns) of ``A_g``.
      b_values: ``[G, O]`` eigenvalues of ``B_g``.
      b_vectors: ``[G, O, O]`` eigenvectors (columns) of ``B_g``.
      index: ``[D]`` int32, the block's canonical position of each leaf entry.
    """

    a_values: jax.Array
    a_vectors: jax.Array
    b_values: jax.Array
    b_vectors: jax.Array
    index: jax.Array


class DenseEigh(NamedTuple):
    """Eigendecomposition of a :class:`curvjax.DenseBlock`.

    Attributes:
      values: ``[D]`` eigenvalues.
      vectors: ``[D, D]`` eigenvectors (columns), rows in the leaf's row-major order.
    """

    values: jax.Array
    vectors: jax.Array


def to_canonical(leaf: jax.Array, index: jax.Array, shape: tuple[int, int, int]) -> jax.Array:
    """Scatter the entries of ``leaf`` to their canonical positions: ``[G, I, O]``."""
    flat = jnp.zeros(index.shape, leaf.dtype).at[index].set(leaf.reshape(-1))
    return flat.reshape(shape)


def from_canonical(canon: jax.Array, index: jax.Array, leaf_shape) -> jax.Array:
    """Gather a canonical ``[G, I, O]`` array back to the leaf's layout."""
    return canon.reshape(-1)[index].reshape(leaf_shape)


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


def kronecker_eigh(a: jax.Array, b: jax.Array, index: jax.Array) -> KroneckerEigh:
    """Eigendecompose the factors ``a [G, I, I]`` and ``b [G, O, O]`` of a Kronecker block."""
    a_values, a_vectors = jnp.linalg.eigh(a)
    b_values, b_vectors = jnp.linalg.eigh(b)
    return KroneckerEigh(a_values, a_vectors, b_values, b_vectors, index)


def damped_kronecker_power(eig: KroneckerEigh, canon: jax.Array, damping, power=-1.0):
    """``[(A + π√c I) ⊗ (B + √c/π I)]^p`` applied to canonical ``canon [G, I, O]``.

    ``π`` comes from the eigenvalue means (``tr A / dim A``), per group.
    """
    root = jnp.sqrt(jnp.asarray(damping, canon.dtype))
    pi = trace_norm_pi(jnp.mean(eig.a_values, axis=-1), jnp.mean(eig.b_values, axis=-1))
    a_damped = eig.a_values + (pi * root)[:, None]
    b_damped = eig.b_values + (root / pi)[:, None]
    scale = (a_damped**power)[:, :, None] * (b_damped**power)[:, None, :]
    rotated = jnp.einsum("gji,gjk,gkl->gil", eig.a_vectors, canon, eig.b_vectors)
    return jnp.einsum("gij,gjk,glk->gil", eig.a_vectors, rotated * scale, eig.b_vectors)


def damped_kronecker_solve(a: jax.Array, b: jax.Array, canon: jax.Array, damping) -> jax.Array:
    """``[(A + π√c I) ⊗ (B + √c/π I)]⁻¹`` applied to canonical ``canon [G, I, O]`` (Cholesky).

    The same as :func:`damped_kronecker_power` with ``p = -1`` without eigendecompositions:
    ``X_g ↦ (A_g + π√c I)⁻¹ X_g (B_g + √c/π I)⁻¹``, for one-off solves.
    """
    root = jnp.sqrt(jnp.asarray(damping, canon.dtype))
    pi = kronecker_pi(a, b)

    def one(a, b, x, pi):
        a_chol = jax.scipy.linalg.cho_factor(a + pi * root * jnp.eye(a.shape[0], dtype=a.dtype))
        b_chol = jax.scipy.linalg.cho_factor(b + root / pi * jnp.eye(b.shape[0], dtype=b.dtype))
        left = jax.scipy.linalg.cho_solve(a_chol, x)
        return jax.scipy.linalg.cho_solve(b_chol, left.T).T

    return jax.vmap(one)(a, b, canon, pi)


def dense_eigh(matrix: jax.Array) -> DenseEigh:
    """Eigendecompose a symmetric ``[D, D]`` block."""
    values, vectors = jnp.linalg.eigh(matrix)
    return DenseEigh(values, vectors)


def damped_dense_power(eig: DenseEigh, vector: jax.Array, damping, power=-1.0) -> jax.Array:
    """``(M + c I)^p v`` for a leaf-shaped ``v`` from the eigendecomposition of ``M``."""
    flat = vector.reshape(-1)
    scale = (eig.values + damping) ** power
    return (eig.vectors @ (scale * (eig.vectors.T @ flat))).reshape(vector.shape)


def generalized_eigh(a: jax.Array, c: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(P, s)`` with ``Pᵀ a P = I`` and ``Pᵀ c P = diag(s)``, for ``a`` positive definite.

    With ``a = U diag(e) Uᵀ`` and ``R = U diag(e^{-1/2})``: ``s, E = eigh(Rᵀ c R)``, ``P = R E``.
    """
    e, u = jnp.linalg.eigh(a)
    r = u * (1.0 / jnp.sqrt(e))[None, :]
    m = r.T @ c @ r
    s, vectors = jnp.linalg.eigh(0.5 * (m + m.T))
    return r @ vectors, s


def kronecker_difference_solve(p1, s1, p2, s2, x: jax.Array) -> jax.Array:
    """``(A ⊗ B - C ⊗ D)⁻¹ vec(X)`` for ``X [I, O]`` from :func:`generalized_eigh` of both pairs."""
    rotated = p1.T @ x @ p2
    denominator = 1.0 - s1[:, None] * s2[None, :]
    return p1 @ (rotated / denominator) @ p2.T
