# ruff: noqa: F722  (jaxtyping shape strings are not forward references)
"""Krylov eigensolvers: Lanczos with full reorthogonalisation, and power iteration with deflation.

Both run as ``lax`` loops under ``jax.jit`` and report the number of matrix-vector products used.
Their cost follows the steps taken, not the bound on them: the Lanczos basis is stored in blocks of
rows and each step reorthogonalises against at most twice the blocks filled so far, and the Ritz
problem is solved every few steps on the smallest of a few preset sizes that holds the steps taken.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

#: Rows per block of the Lanczos basis: step ``i`` reorthogonalises against the first ``n`` blocks,
#: ``n`` the smallest power of two (or all blocks) with ``16 n ≥ i + 1``.
_BLOCK = 16

Matvec = Callable[[Float[Array, " D"]], Float[Array, " D"]]


class Tridiagonal(NamedTuple):
    """A Lanczos decomposition ``A Q_mᵀ = Q_mᵀ T_m + β_m q_{m+1} e_mᵀ``.

    Attributes:
      basis: ``[m, D]`` orthonormal rows ``q_1 … q_m``.
      diag: ``[m]`` the ``α_i``.
      offdiag: ``[m]`` the ``β_i`` (``β_m`` couples to the next, unused vector).
      steps: number of valid steps (``< m`` after an invariant subspace was found).
    """

    basis: Float[Array, "m D"]
    diag: Float[Array, " m"]
    offdiag: Float[Array, " m"]
    steps: Int[Array, ""]

    def matrix(self) -> Float[Array, "m m"]:
        """``T_m`` ``[m, m]``; rows beyond :attr:`steps` are decoupled and pushed below the rest."""
        return _tridiagonal_matrix(self.diag, self.offdiag, self.steps)


def _tridiagonal_matrix(diag, offdiag, steps):
    m = diag.shape[0]
    valid = jnp.arange(m) < steps
    low = jnp.min(jnp.where(valid, diag, jnp.inf)) - 1.0 - 2 * jnp.max(jnp.abs(offdiag))
    d = jnp.where(valid, diag, low - jnp.arange(m))
    e = jnp.where(jnp.arange(m - 1) < steps - 1, offdiag[: m - 1], 0.0)
    return jnp.diag(d) + jnp.diag(e, 1) + jnp.diag(e, -1)


def _blocks_used(rows):
    return (rows + _BLOCK - 1) // _BLOCK


def _orthogonalise_blocks(w, blocks, rows):
    """``w − Q Qᵀ w`` twice over the first ``rows`` rows of ``blocks [B, b, D]``.

    Reads the first ``n`` blocks, ``n`` the smallest power of two (or ``B``) holding ``rows``
    rows, so the cost follows the rows filled ("twice is enough", Parlett); unfilled rows are zero
    and contribute nothing.
    """
    total = blocks.shape[0]
    counts = [1]
    while counts[-1] < total:
        counts.append(min(total, 2 * counts[-1]))

    def project(n):
        def branch(w, blocks):
            q = blocks[:n].reshape(n * _BLOCK, -1)
            for _ in range(2):
                w = w - q.T @ (q @ w)
            return w

        return branch

    index = jnp.sum(jnp.asarray(counts) < _blocks_used(rows))
    return jax.lax.switch(index, [project(n) for n in counts], w, blocks)


def _lanczos_step(matvec, blocks, q, i):
    """One Lanczos step from ``q = q_i`` (row ``i``): ``(blocks with row i + 1, q_{i+1}, α_i, β_i)``.

    ``q`` is carried rather than read back from ``blocks``: reading it there makes XLA copy the
    whole basis at every step.
    """
    w = matvec(q).astype(q.dtype)
    alpha = jnp.vdot(q, w)
    w = _orthogonalise_blocks(w, blocks, i + 1)
    beta = jnp.linalg.norm(w)
    nxt = w / jnp.where(beta > 0, beta, 1.0)
    blocks = blocks.at[(i + 1) // _BLOCK, (i + 1) % _BLOCK].set(nxt)
    return blocks, nxt, alpha, beta


def _empty_basis(start, rows):
    """``[⌈(rows + 1) / b⌉, b, D]`` zeros with the normalised ``start`` as row 0."""
    size = start.shape[0]
    blocks = jnp.zeros((_blocks_used(rows + 1), _BLOCK, size), start.dtype)
    return blocks.at[0, 0].set(start / jnp.linalg.norm(start))


def _broke(diag, offdiag, steps, size):
    """Whether the last step found an invariant subspace: ``β_i ≤ 10 ε √D max_{j ≤ i}(|α_j|, β_j)``.

    The scale is that of the rounding error of a product with ``‖A‖ ≥ max(|α_j|, β_j)``; the
    test reads the stored ``α, β`` (a flag carried from the loop body made XLA copy the whole
    basis at every step).
    """
    last = jnp.maximum(steps - 1, 0)
    filled = jnp.arange(diag.shape[0]) < steps
    scale = jnp.max(jnp.where(filled, jnp.maximum(jnp.abs(diag), offdiag), 0.0))
    return (steps > 0) & (offdiag[last] <= 10 * jnp.finfo(diag.dtype).eps * size**0.5 * scale)


def _lanczos_loop(matvec, start, m: int, go_on):
    """Lanczos steps while ``i < m`` and ``go_on(diag, offdiag, i)``: ``(blocks, diag, offdiag,
    steps)``."""
    dtype = start.dtype

    def cond(state):
        _, _, diag, offdiag, i = state
        return (i < m) & go_on(diag, offdiag, i)

    def body(state):
        blocks, q, diag, offdiag, i = state
        blocks, q, alpha, beta = _lanczos_step(matvec, blocks, q, i)
        return blocks, q, diag.at[i].set(alpha), offdiag.at[i].set(beta), i + 1

    blocks = _empty_basis(start, m)
    init = (blocks, blocks[0, 0], jnp.zeros(m, dtype), jnp.zeros(m, dtype), jnp.asarray(0))
    blocks, _, diag, offdiag, steps = jax.lax.while_loop(cond, body, init)
    return blocks, diag, offdiag, steps


def lanczos_tridiagonal(matvec: Matvec, start: Float[Array, " D"], num_steps: int) -> Tridiagonal:
    """``num_steps`` Lanczos steps from ``start`` with full reorthogonalisation.

    Builds an orthonormal basis ``Q_m`` of the Krylov space
    ``span{v, Av, …, A^{m−1} v}`` (``v = start / ‖start‖``) and the tridiagonal
    ``T_m = Q_m A Q_mᵀ``:

    .. math::
        A q_i = β_{i−1} q_{i−1} + α_i q_i + β_i q_{i+1}, \\qquad
        α_i = q_iᵀ A q_i, \\quad β_i = ‖(I − Q_i^⊤ Q_i) A q_i‖ ,

    each new vector being orthogonalised (twice) against all previous ones. The loop stops when an
    invariant subspace is found (``β_i ≈ 0``); then ``steps < num_steps`` and fewer products were
    made.

    Args:
      matvec: symmetric ``[D] -> [D]``.
      start: ``[D]`` starting vector (normalised here).
      num_steps: ``m``, the number of matrix-vector products at most.

    Returns:
      A :class:`Tridiagonal` with ``basis [m, D]``, ``diag [m]``, ``offdiag [m]``.

    Example:
      >>> import jax.numpy as jnp
      >>> from curvjax.spectral import lanczos_tridiagonal
      >>> a = jnp.diag(jnp.arange(1.0, 6.0))
      >>> tri = lanczos_tridiagonal(lambda v: a @ v, jnp.ones(5), 5)
      >>> jnp.allclose(jnp.linalg.eigvalsh(tri.matrix()), jnp.arange(1.0, 6.0), atol=1e-4).item()
      True

    References:
      Lanczos, "An iteration method for the solution of the eigenvalue problem of linear
      differential and integral operators", 1950; Parlett, *The Symmetric Eigenvalue Problem*,
      1998, ch. 13.
    """
    m = num_steps
    blocks, diag, offdiag, steps = _lanczos_loop(
        matvec, start, m, lambda diag, offdiag, i: ~_broke(diag, offdiag, i, start.shape[0])
    )
    basis = blocks.reshape(-1, start.shape[0])[:m]
    # After a breakdown the last vector written is not part of the basis.
    basis = jnp.where((jnp.arange(m) < steps)[:, None], basis, 0.0)
    offdiag = jnp.where(jnp.arange(m) < steps, offdiag, 0.0)
    return Tridiagonal(basis, diag, offdiag, steps)


class Eigenpairs(NamedTuple):
    """Eigenpairs found by an iterative solver, with the work done and whether each converged.

    Attributes:
      eigenvalues: ``[k]`` (Lanczos: descending; power iteration: in the order found).
      eigenvectors: ``[k, D]`` unit rows.
      num_matvecs: the matrix-vector products made (a scalar integer).
      converged: ``[k]`` booleans, one per pair: the pair met the solver's tolerance before the
        bound on the products (``all(converged)`` is the overall flag).
    """

    eigenvalues: Float[Array, " k"]
    eigenvectors: Float[Array, "k D"]
    num_matvecs: Int[Array, ""]
    converged: Bool[Array, " k"]


def _bucket_sizes(m: int, k: int) -> list[int]:
    """Sizes of the Ritz problems: ``max(k, 16)`` doubling up to ``m``."""
    sizes = [min(m, max(k, 16))]
    while sizes[-1] < m:
        sizes.append(min(m, 2 * sizes[-1]))
    return sizes


def _ritz(diag, offdiag, steps, k, sizes):
    """Top-``k`` Ritz values ``[k]``, coefficients ``[m, k]`` and residual norms ``[k]`` of ``T_i``.

    The eigenproblem is solved at the smallest preset size ``n ≥ i`` (rows ``i … n − 1`` are
    decoupled and pushed below the spectrum), so its cost follows the steps taken.
    """
    m = diag.shape[0]

    def solve(n):
        def branch(diag, offdiag, steps):
            t = _tridiagonal_matrix(diag[:n], offdiag[:n], steps)
            theta, s = jnp.linalg.eigh(t)
            theta, s = theta[::-1][:k], s[:, ::-1][:, :k]
            return theta, jnp.zeros((m, k), s.dtype).at[:n].set(s)

        return branch

    index = jnp.searchsorted(jnp.asarray(sizes), steps, side="left")
    theta, s = jax.lax.switch(
        jnp.minimum(index, len(sizes) - 1), [solve(n) for n in sizes], diag, offdiag, steps
    )
    last = jnp.maximum(steps - 1, 0)
    residual = jnp.abs(offdiag[last] * s[last])  # ‖A y_j − θ_j y_j‖ = β_i |s_{i,j}|
    return theta, s, residual


def lanczos_top_k(
    matvec: Matvec,
    start: Float[Array, " D"],
    k: int,
    *,
    max_steps: int = 100,
    tol: float = 1e-6,
    check_every: int = 2,
) -> Eigenpairs:
    """The ``k`` largest eigenpairs by Lanczos with full reorthogonalisation, stopping early.

    After ``i`` steps the Ritz pairs ``(θ_j, y_j = Q_iᵀ s_j)`` of ``T_i = S Θ Sᵀ`` approximate
    eigenpairs of ``A`` with residual

    .. math::
        ‖A y_j − θ_j y_j‖ = β_i \\, |s_{i,j}| ,

    and the loop stops once the residuals of the top ``k`` are below ``tol · |θ_j|`` (the
    eigenvalue error is then of order ``residual² / gap``, far smaller), checked every
    ``check_every`` steps from step ``k`` on, or at an invariant subspace, or after ``max_steps``
    products. A step costs one product plus ``O(i · D)`` for the reorthogonalisation; a check
    costs an eigendecomposition of a ``[n, n]`` tridiagonal with ``n`` the smallest of
    ``max(k, 16)·2^j`` that is at least ``i``.

    Args:
      matvec: symmetric ``[D] -> [D]``.
      start: ``[D]`` starting vector.
      k: number of eigenpairs (largest algebraic).
      max_steps: upper bound on the products.
      tol: relative residual tolerance.
      check_every: steps between convergence checks.

    Returns:
      :class:`Eigenpairs` (descending) with ``num_matvecs`` the steps taken and ``converged[j]``
      whether pair ``j`` met ``tol`` (False for all that did not when ``max_steps`` ran out).

    Example:
      >>> import jax.numpy as jnp
      >>> from curvjax.spectral import lanczos_top_k
      >>> a = jnp.diag(jnp.array([1.0, 2.0, 3.0, 10.0, 20.0]))
      >>> top = lanczos_top_k(lambda v: a @ v, jnp.ones(5), 2, tol=1e-4)
      >>> top.eigenvalues.round(3).tolist(), bool(top.converged.all()), int(top.num_matvecs)
      ([20.0, 10.0], True, 5)

    References:
      Parlett, *The Symmetric Eigenvalue Problem*, 1998, ch. 13 (Ritz residuals, §13.2).
    """
    size = start.shape[0]
    m = min(max_steps, size)
    if k > m:
        raise ValueError(
            f"k={k} eigenpairs need at least k Lanczos steps, but max_steps={max_steps} and the "
            f"operator has size {size}: lower k or raise max_steps (max_matvecs)."
        )
    dtype = start.dtype
    sizes = _bucket_sizes(m, k)

    def converged(diag, offdiag, i, broke):
        theta, _, residual = _ritz(diag, offdiag, i, k, sizes)
        ok = residual <= tol * jnp.maximum(jnp.abs(theta), jnp.finfo(dtype).tiny)
        return (ok | broke) & (jnp.arange(k) < i)

    def go_on(diag, offdiag, i):
        broke = _broke(diag, offdiag, i, size)
        check = (i >= k) & ((i - k) % check_every == 0) & ~broke
        done = jax.lax.cond(
            check, lambda: jnp.all(converged(diag, offdiag, i, broke)), lambda: jnp.asarray(False)
        )
        return ~broke & ~done

    blocks, diag, offdiag, steps = _lanczos_loop(matvec, start, m, go_on)
    theta, s, _ = _ritz(diag, offdiag, steps, k, sizes)
    ok = converged(diag, offdiag, steps, _broke(diag, offdiag, steps, size))
    # y_j = Σ_i s_{i,j} q_i over the filled blocks only.
    coeffs = jnp.zeros((blocks.shape[0] * _BLOCK, k), dtype).at[:m].set(s)
    coeffs = coeffs.reshape(blocks.shape[0], _BLOCK, k)
    vectors = jax.lax.fori_loop(
        0,
        _blocks_used(steps),
        lambda j, acc: acc + coeffs[j].T @ blocks[j],
        jnp.zeros((k, size), dtype),
    )
    return Eigenpairs(theta, vectors, steps, ok)


def power_iteration_top_k(
    matvec: Matvec,
    start: Float[Array, " D"],
    k: int,
    *,
    max_iters: int = 100,
    tol: float = 1e-3,
) -> Eigenpairs:
    """The ``k`` eigenpairs of largest magnitude by power iteration with deflation (PyHessian).

    For the ``j``-th pair, ``v ← A P v / ‖A P v‖`` with ``P`` the projector orthogonal to the
    pairs found before, and the Rayleigh quotient ``λ = vᵀ A v``; the iteration stops when
    ``|λ_t − λ_{t−1}| < tol · (|λ_{t−1}| + 10⁻⁶)`` (PyHessian's rule and default) or after
    ``max_iters`` products. Each pair costs the products it takes.

    Args:
      matvec: symmetric ``[D] -> [D]``.
      start: ``[D]`` starting vector of every pair.
      k: number of eigenpairs.
      max_iters: bound on the products per pair.
      tol: relative change of the Rayleigh quotient.

    Returns:
      :class:`Eigenpairs` in the order found, with the total number of products and
      ``converged[j]`` whether pair ``j`` met ``tol`` within ``max_iters``.

    Example:
      >>> import jax.numpy as jnp
      >>> from curvjax.spectral import power_iteration_top_k
      >>> a = jnp.diag(jnp.array([1.0, 2.0, -10.0]))
      >>> top = power_iteration_top_k(lambda v: a @ v, jnp.ones(3), 1, tol=1e-6)
      >>> round(float(top.eigenvalues[0]), 4), bool(top.converged[0])
      (-10.0, True)

    References:
      Yao, Gholami, Keutzer & Mahoney, "PyHessian: Neural networks through the lens of the
      Hessian", 2020.
    """
    found = jnp.zeros((k, start.shape[0]), start.dtype)
    values, flags = [], []
    total = jnp.asarray(0)

    def project(v, found):
        for _ in range(2):
            v = v - found.T @ (found @ v)
        return v

    def change(lam, lam_prev):
        return jnp.abs(lam - lam_prev) / (jnp.abs(lam_prev) + 1e-6)

    for j in range(k):

        def cond(state):
            _, lam, lam_prev, it = state
            return (it < max_iters) & ((it < 2) | (change(lam, lam_prev) >= tol))

        def body(state, found=found):
            v, lam, _, it = state
            v = project(v, found)
            v = v / jnp.linalg.norm(v)
            hv = matvec(v).astype(v.dtype)
            new = jnp.vdot(v, hv)
            return hv / jnp.linalg.norm(hv), new, lam, it + 1

        v0 = project(start, found)
        v0 = v0 / jnp.linalg.norm(v0)
        inf = jnp.full((), jnp.inf, start.dtype)
        v, lam, lam_prev, iters = jax.lax.while_loop(cond, body, (v0, inf, inf, 0))
        v = project(v, found)
        found = found.at[j].set(v / jnp.linalg.norm(v))
        values.append(lam)
        flags.append((iters >= 2) & (change(lam, lam_prev) < tol))
        total = total + iters
    return Eigenpairs(jnp.stack(values), found, total, jnp.stack(flags))
