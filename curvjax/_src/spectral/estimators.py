"""Stochastic trace estimators and stochastic Lanczos quadrature (spectral density)."""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np

from curvjax._src.spectral import krylov


def _rademacher(key, shape, dtype):
    return jax.random.rademacher(key, shape, dtype=dtype)


def hutchinson_trace(matvec, size: int, dtype, *, key, num_matvecs: int) -> jax.Array:
    """Hutchinson's estimate ``(1/m) Σ_j z_jᵀ A z_j`` with ``m`` Rademacher probes.

    .. math::
        \\mathbb{E}[z^⊤ A z] = \\operatorname{tr}(A), \\qquad z_i \\in \\{-1, +1\\}.

    References:
      Hutchinson, "A stochastic estimator of the trace of the influence matrix", 1989.
    """
    probes = _rademacher(key, (num_matvecs, size), dtype)
    return jnp.mean(jnp.einsum("md,md->m", probes, jax.vmap(matvec)(probes)))


def hutchpp_trace(matvec, size: int, dtype, *, key, num_matvecs: int) -> jax.Array:
    """Hutch++ with a budget of ``m`` products: exact trace on a sketched range, Hutchinson on the rest.

    .. math::
        \\operatorname{tr}(Q^⊤ A Q) + \\frac{1}{m - 2s}
        \\operatorname{tr}\\big(G^⊤ (I - QQ^⊤) A (I - QQ^⊤) G\\big), \\quad Q = \\operatorname{qr}(A S),

    with ``s = m // 3`` sketch columns ``S``; unbiased, and with error ``O(1/m)`` instead of
    Hutchinson's ``O(1/√m)`` for matrices with decaying spectra.

    References:
      Meyer, Musco, Musco & Woodruff, "Hutch++: optimal stochastic trace estimation", SOSA 2021.
    """
    if num_matvecs < 3:
        raise ValueError(f"Hutch++ needs at least 3 products, got num_matvecs={num_matvecs}.")
    s = num_matvecs // 3
    g = num_matvecs - 2 * s
    k_sketch, k_probe = jax.random.split(key)
    sketch = _rademacher(k_sketch, (s, size), dtype)
    q, _ = jnp.linalg.qr(jax.vmap(matvec)(sketch).T)  # [D, s]
    exact = jnp.trace(q.T @ jax.vmap(matvec)(q.T).T)
    probes = _rademacher(k_probe, (g, size), dtype)
    probes = probes - (probes @ q) @ q.T
    rest = jnp.einsum("md,md->m", probes, jax.vmap(matvec)(probes))
    return exact + jnp.sum(rest) / g


def slq_nodes(matvec, size: int, dtype, *, key, num_probes: int, num_steps: int):
    """Stochastic Lanczos quadrature: nodes and weights of ``num_probes`` Gauss quadratures.

    For a probe ``v`` (Rademacher, normalised), ``m`` Lanczos steps give ``T_m = S Θ Sᵀ``; the
    spectral measure ``vᵀ δ(A − x) v / ||v||²`` is approximated by nodes ``θ_j`` with weights
    ``S_{1j}²`` (which sum to one).

    Returns:
      ``(nodes, weights)`` both ``[num_probes, num_steps]``.

    References:
      Ubaru, Chen & Saad, "Fast estimation of tr(f(A)) via stochastic Lanczos quadrature", 2017;
      Ghorbani, Krishnan & Xiao, "An investigation into neural net optimization via Hessian
      eigenvalue density", ICML 2019.
    """

    def one(k):
        start = _rademacher(k, (size,), dtype)
        tri = krylov.lanczos_tridiagonal(matvec, start, num_steps)
        theta, s = jnp.linalg.eigh(tri.matrix())
        valid = jnp.arange(num_steps) >= num_steps - tri.steps  # decoupled rows sort first
        return theta, jnp.where(valid, s[0] ** 2, 0.0)

    return jax.lax.map(one, jax.random.split(key, num_probes))


def spectral_density(nodes, weights, *, num_points: int = 1000, sigma: float | None = None):
    """Gaussian-broadened density from SLQ nodes and weights, normalised to integrate to one.

    .. math::
        φ(x) = \\frac{1}{P} \\sum_{p, j} w_{pj} \\, \\mathcal N(x; θ_{pj}, σ^2) .

    Args:
      nodes, weights: ``[P, m]`` from :func:`slq_nodes`.
      num_points: grid size.
      sigma: broadening; default 1% of the node range.

    Returns:
      ``(grid [num_points], density [num_points])`` with ``trapezoid(density, grid) = 1``; the grid
      extends ``5σ`` plus 5% of the range beyond the extreme nodes.
    """
    active = weights > 0
    low = jnp.min(jnp.where(active, nodes, jnp.inf))
    high = jnp.max(jnp.where(active, nodes, -jnp.inf))
    span = jnp.maximum(high - low, 1e-12 * jnp.maximum(jnp.abs(high), 1.0))
    sigma = 0.01 * span if sigma is None else sigma
    pad = 0.05 * span + 5 * sigma
    grid = jnp.linspace(low - pad, high + pad, num_points)
    gauss = jnp.exp(-0.5 * ((grid[:, None, None] - nodes[None]) / sigma) ** 2) / (
        sigma * jnp.sqrt(2 * jnp.pi)
    )
    density = jnp.sum(gauss * weights[None], axis=(1, 2)) / nodes.shape[0]
    return grid, density / jnp.trapezoid(density, grid)


def density(
    operator,
    *,
    key,
    num_probes: int = 10,
    num_steps: int = 80,
    num_points: int = 1000,
    sigma=None,
    probes_per_call: int = 5,
    progress: bool = False,
):
    """Host-side convenience: SLQ in jitted batches of probes, with optional progress on stderr.

    Args:
      operator: a :class:`~curvjax.spectral.LinearOperator`.
      key: PRNG key for the probes.
      num_probes, num_steps: SLQ probes and Lanczos steps per probe.
      num_points, sigma: as for :func:`spectral_density`.
      probes_per_call: probes per jitted call.
      progress: print ``probes done / total`` to stderr after each call.

    Returns:
      ``(grid, density)`` as numpy arrays.
    """
    fn = jax.jit(
        lambda k, n: slq_nodes(
            operator.matvec, operator.size, operator.dtype, key=k, num_probes=n, num_steps=num_steps
        ),
        static_argnums=1,
    )
    nodes, weights = [], []
    done = 0
    for call, k in enumerate(jax.random.split(key, -(-num_probes // probes_per_call))):
        count = min(probes_per_call, num_probes - call * probes_per_call)
        nd, wt = fn(k, count)
        nodes.append(nd)
        weights.append(wt)
        done += count
        if progress:
            print(f"spectral density: {done}/{num_probes} probes", file=sys.stderr, flush=True)
    grid, dens = spectral_density(
        jnp.concatenate(nodes), jnp.concatenate(weights), num_points=num_points, sigma=sigma
    )
    return np.asarray(grid), np.asarray(dens)
