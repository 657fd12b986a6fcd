"""Krylov eigensolvers: Lanczos with full reorthogonalisation, and power iteration with deflation.

Both run as ``lax`` loops under ``jax.jit`` and report the number of matrix-vector products used.
matfree (Krämer et al.) provides Lanczos tridiagonalisation for JAX; curvjax keeps to its runtime
dependencies (jax, flax, optax, chex, numpy) and implements the few lines it needs here.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class Tridiagonal(NamedTuple):
    """A Lanczos decomposition ``A Q_mᵀ ≈ Q_mᵀ T_m``.

    Attributes:
      basis: ``[m, D]`` orthonormal rows ``q_1 … q_m``.
      diag: ``[m]`` the ``α_i``.
      offdiag: ``[m]`` the ``β_i`` (``β_m`` couples to the next, unused vector).
      steps: number of valid steps (``< m`` after an invariant subspace was found).
    """

    basis: jax.Array
    diag: jax.Array
    offdiag: jax.Array
    steps: jax.Array

    def matrix(self) -> jax.Array:
        """``T_m`` ``[m, m]``; rows beyond :attr:`steps` are decoupled and pushed below the rest."""
        m = self.diag.shape[0]
        valid = jnp.arange(m) < self.steps
        low = (
            jnp.min(jnp.where(valid, self.diag, jnp.inf)) - 1.0 - 2 * jnp.max(jnp.abs(self.offdiag))
        )
        d = jnp.where(valid, self.diag, low - jnp.arange(m))
        e = jnp.where(jnp.arange(m - 1) < self.steps - 1, self.offdiag[:-1], 0.0)
        return jnp.diag(d) + jnp.diag(e, 1) + jnp.diag(e, -1)


def _orthogonalise(w, basis):
    # Twice is enough (Parlett's "twice is enough"); zero rows of the basis contribute nothing.
    for _ in range(2):
        w = w - basis.T @ (basis @ w)
    return w


def lanczos_tridiagonal(matvec, start, num_steps: int) -> Tridiagonal:
    """``num_steps`` Lanczos steps from ``start`` with full reorthogonalisation.

    Args:
      matvec: symmetric ``[D] -> [D]``.
      start: ``[D]`` starting vector (normalised here).
      num_steps: ``m``, the number of matrix-vector products.

    Returns:
      A :class:`Tridiagonal`.
    """
    size = start.shape[0]
    dtype = start.dtype
    tiny = jnp.finfo(dtype).eps * 10

    def step(i, carry):
        basis, diag, offdiag, steps, beta_prev = carry
        q = basis[i]
        w = matvec(q)
        alpha = jnp.vdot(q, w)
        w = _orthogonalise(w, basis)
        beta = jnp.linalg.norm(w)
        active = (i < steps) & (beta > tiny * jnp.maximum(1.0, jnp.abs(alpha)))
        nxt = jnp.where(active, w / jnp.where(beta > 0, beta, 1.0), 0.0)
        basis = jax.lax.cond(i + 1 < num_steps, lambda b: b.at[i + 1].set(nxt), lambda b: b, basis)
        steps = jnp.where((i < steps) & ~active, i + 1, steps)
        del beta_prev
        return basis, diag.at[i].set(alpha), offdiag.at[i].set(beta), steps, beta

    basis = jnp.zeros((num_steps, size), dtype).at[0].set(start / jnp.linalg.norm(start))
    init = (basis, jnp.zeros(num_steps, dtype), jnp.zeros(num_steps, dtype), num_steps, 0.0)
    basis, diag, offdiag, steps, _ = jax.lax.fori_loop(0, num_steps, step, init)
    return Tridiagonal(basis, diag, offdiag, jnp.asarray(steps))


class Eigenpairs(NamedTuple):
    """Top eigenvalues (descending), eigenvectors ``[k, D]`` and the products used."""

    eigenvalues: jax.Array
    eigenvectors: jax.Array
    num_matvecs: jax.Array


def lanczos_top_k(matvec, start, k: int, *, max_steps: int = 100, tol: float = 1e-6) -> Eigenpairs:
    """The ``k`` largest eigenpairs by Lanczos with full reorthogonalisation, stopping early.

    After each step past ``k`` the Ritz pairs of ``T_i`` are checked: the residual
    ``||A y − θ y|| = β_i |s_{i,j}|`` of the top ``k`` must be below ``tol · |θ_j|`` (the eigenvalue
    error is then of order ``residual² / gap``, far smaller).

    Args:
      matvec: symmetric ``[D] -> [D]``.
      start: ``[D]`` starting vector.
      k: number of eigenpairs (largest algebraic).
      max_steps: upper bound on the products.
      tol: relative residual tolerance.

    Returns:
      :class:`Eigenpairs` with ``num_matvecs`` the steps taken.
    """
    size = start.shape[0]
    m = min(max_steps, size)
    dtype = start.dtype

    def ritz(state):
        basis, diag, offdiag, i = state
        tri = Tridiagonal(basis, diag, offdiag, i)
        theta, s = jnp.linalg.eigh(tri.matrix())
        return theta[::-1][:k], s[:, ::-1][:, :k]

    def converged(state):
        basis, diag, offdiag, i = state
        theta, s = ritz(state)
        beta = offdiag[jnp.maximum(i - 1, 0)]
        last = s[jnp.maximum(i - 1, 0)]
        ok = jnp.all(jnp.abs(beta * last) <= tol * jnp.maximum(jnp.abs(theta), 1e-30))
        return (i >= k) & (ok | (beta <= jnp.finfo(dtype).eps * 10))

    def cond(state):
        return (state[3] < m) & ~converged(state)

    def body(state):
        basis, diag, offdiag, i = state
        q = basis[i]
        w = matvec(q)
        alpha = jnp.vdot(q, w)
        w = _orthogonalise(w, basis)
        beta = jnp.linalg.norm(w)
        nxt = w / jnp.where(beta > 0, beta, 1.0)
        basis = jnp.where(i + 1 < m, basis.at[jnp.minimum(i + 1, m - 1)].set(nxt), basis)
        return basis, diag.at[i].set(alpha), offdiag.at[i].set(beta), i + 1

    basis = jnp.zeros((m, size), dtype).at[0].set(start / jnp.linalg.norm(start))
    init = (basis, jnp.zeros(m, dtype), jnp.zeros(m, dtype), jnp.asarray(0))
    state = jax.lax.while_loop(cond, body, init)
    theta, s = ritz(state)
    vectors = s.T @ state[0]
    return Eigenpairs(theta, vectors, state[3])


def power_iteration_top_k(
    matvec, start, k: int, *, max_iters: int = 100, tol: float = 1e-3
) -> Eigenpairs:
    """The ``k`` eigenpairs of largest magnitude by power iteration with deflation (PyHessian).

    Each eigenpair starts from ``start``, is orthogonalised against the ones found before every
    product, and stops when the Rayleigh quotient changes by less than ``tol`` relative (PyHessian's
    rule and default) or after ``max_iters`` products.

    Returns:
      :class:`Eigenpairs` (in the order found) with the total number of products.
    """
    found = jnp.zeros((k, start.shape[0]), start.dtype)
    values = []
    total = jnp.asarray(0)

    for j in range(k):

        def cond(state):
            _, lam, lam_prev, it = state
            change = jnp.abs(lam - lam_prev) / (jnp.abs(lam_prev) + 1e-6)
            return (it < max_iters) & ((it < 2) | (change >= tol))

        def body(state, found=found):
            v, lam, _, it = state
            v = _orthogonalise(v, found)
            v = v / jnp.linalg.norm(v)
            hv = matvec(v)
            new = jnp.vdot(v, hv)
            return hv / jnp.linalg.norm(hv), new, lam, it + 1

        v0 = _orthogonalise(start, found)
        v0 = v0 / jnp.linalg.norm(v0)
        v, lam, _, iters = jax.lax.while_loop(
            cond,
            body,
            (v0, jnp.full((), jnp.inf, start.dtype), jnp.full((), jnp.inf, start.dtype), 0),
        )
        v = _orthogonalise(v, found)
        found = found.at[j].set(v / jnp.linalg.norm(v))
        values.append(lam)
        total = total + iters
    return Eigenpairs(jnp.stack(values), found, total)
