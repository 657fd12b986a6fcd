# ruff: noqa: F722  (jaxtyping shape strings are not forward references)
"""Stochastic trace estimators and stochastic Lanczos quadrature (spectral density)."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, PRNGKeyArray

from curvjax._src.spectral import krylov
from curvjax._src.spectral.operators import LinearOperator


def _rademacher(key, shape, dtype):
    return jax.random.rademacher(key, shape, dtype=dtype)


Matvec = Callable[[Float[Array, " D"]], Float[Array, " D"]]


def hutchinson_trace(
    matvec: Matvec, size: int, dtype: Any, *, key: PRNGKeyArray, num_matvecs: int
) -> Float[Array, ""]:
    """Hutchinson's estimate ``(1/m) Σ_j z_jᵀ A z_j`` with ``m`` Rademacher probes.

    .. math::
        \\mathbb{E}[z^⊤ A z] = \\operatorname{tr}(A), \\qquad z_i \\in \\{-1, +1\\}.

    Args:
      matvec: ``[D] -> [D]`` (vmappable).
      size: ``D``.
      dtype: dtype of the probes.
      key: PRNG key for the probes.
      num_matvecs: ``m``, the number of probes and products.

    Returns:
      A scalar, unbiased for ``tr(A)``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from curvjax.spectral import hutchinson_trace
      >>> a = jnp.array([[2.0, 1.0], [1.0, 3.0]])
      >>> est = hutchinson_trace(lambda v: a @ v, 2, a.dtype, key=jax.random.key(0), num_matvecs=8)
      >>> est.shape
      ()

    References:
      Hutchinson, "A stochastic estimator of the trace of the influence matrix", 1989.
    """
    probes = _rademacher(key, (num_matvecs, size), dtype)
    return jnp.mean(jnp.einsum("md,md->m", probes, jax.vmap(matvec)(probes)))


def hutchpp_trace(
    matvec: Matvec, size: int, dtype: Any, *, key: PRNGKeyArray, num_matvecs: int
) -> Float[Array, ""]:
    """Hutch++ with a budget of ``m`` products: exact trace on a sketched range, Hutchinson on the rest.

    .. math::
        \\operatorname{tr}(Q^⊤ A Q) + \\frac{1}{m - 2s}
        \\operatorname{tr}\\big(G^⊤ (I - QQ^⊤) A (I - QQ^⊤) G\\big), \\quad Q = \\operatorname{qr}(A S),

    with ``s = m // 3`` sketch columns ``S``; unbiased, and with error ``O(1/m)`` instead of
    Hutchinson's ``O(1/√m)`` for matrices with decaying spectra.

    Args:
      matvec: ``[D] -> [D]`` (vmappable).
      size: ``D``.
      dtype: dtype of the probes.
      key: PRNG key for the sketch and the probes.
      num_matvecs: ``m ≥ 3``, the number of products.

    Returns:
      A scalar, unbiased for ``tr(A)`` (exact when ``A`` has rank at most ``m // 3``).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from curvjax.spectral import hutchpp_trace
      >>> a = jnp.diag(jnp.array([5.0, 1.0, 0.0, 0.0, 0.0, 0.0]))  # rank 2
      >>> est = hutchpp_trace(lambda v: a @ v, 6, a.dtype, key=jax.random.key(0), num_matvecs=6)
      >>> round(float(est), 4)
      6.0

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


def slq_nodes(
    matvec: Matvec,
    size: int,
    dtype: Any,
    *,
    key: PRNGKeyArray,
    num_probes: int,
    num_steps: int,
) -> tuple[Float[Array, "P m"], Float[Array, "P m"]]:
    """Stochastic Lanczos quadrature: nodes and weights of ``num_probes`` Gauss quadratures.

    For a probe ``v`` (Rademacher, normalised), ``m`` Lanczos steps give ``T_m = S Θ Sᵀ``; the
    spectral measure ``vᵀ δ(A − x) v / ||v||²`` is approximated by nodes ``θ_j`` with weights
    ``S_{1j}²`` (which sum to one):

    .. math::
        \\frac{vᵀ f(A) v}{‖v‖^2} ≈ \\sum_j S_{1j}^2 f(θ_j) .

    Args:
      matvec: symmetric ``[D] -> [D]``.
      size: ``D``.
      dtype: dtype of the probes.
      key: PRNG key for the probes.
      num_probes: ``P``.
      num_steps: ``m``, Lanczos steps (products) per probe at most.

    Returns:
      ``(nodes, weights)`` both ``[num_probes, num_steps]``; after an invariant subspace the unused
      nodes have weight zero.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from curvjax.spectral import slq_nodes
      >>> a = jnp.diag(jnp.array([1.0, 2.0, 3.0]))
      >>> nodes, weights = slq_nodes(
      ...     lambda v: a @ v, 3, a.dtype, key=jax.random.key(0), num_probes=2, num_steps=3
      ... )
      >>> nodes.shape, jnp.allclose(weights.sum(axis=1), 1.0).item()
      ((2, 3), True)

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


def spectral_density(
    nodes: Float[Array, "P m"],
    weights: Float[Array, "P m"],
    *,
    num_points: int = 1000,
    sigma: float | None = None,
) -> tuple[Float[Array, " n"], Float[Array, " n"]]:
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

    Example:
      >>> import jax.numpy as jnp
      >>> from curvjax.spectral import spectral_density
      >>> grid, dens = spectral_density(jnp.array([[1.0, 3.0]]), jnp.array([[0.5, 0.5]]), num_points=500)
      >>> round(float(jnp.trapezoid(dens, grid)), 4)
      1.0

    References:
      Lin, Saad & Yang, "Approximating spectral densities of large matrices", SIAM Review 2016.
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


class _Structure:
    """A matvec's jaxpr as a static argument, equal to another when its text is the same.

    Two operators with the same structure (same model and shapes, other parameter values) print
    the same jaxpr and share one compilation; their arrays travel as arguments.
    """

    def __init__(self, jaxpr):
        self.jaxpr = jaxpr
        self.text = str(jaxpr)
        (vector,) = jaxpr.invars
        self.size = vector.aval.shape[0]
        self.dtype = vector.aval.dtype

    def __hash__(self):
        return hash(self.text)

    def __eq__(self, other):
        return isinstance(other, _Structure) and self.text == other.text


@functools.partial(jax.jit, static_argnames=("structure", "num_probes", "num_steps"))
def _slq_batch(consts, key, *, structure, num_probes, num_steps):
    def matvec(v):
        return jax.core.eval_jaxpr(structure.jaxpr, consts, v)[0]

    return slq_nodes(
        matvec,
        structure.size,
        structure.dtype,
        key=key,
        num_probes=num_probes,
        num_steps=num_steps,
    )


_density_from_nodes = jax.jit(
    lambda nodes, weights, sigma, num_points: spectral_density(
        nodes, weights, num_points=num_points, sigma=sigma
    ),
    static_argnames="num_points",
)


def density(
    operator: LinearOperator,
    *,
    key: PRNGKeyArray,
    num_probes: int = 10,
    num_steps: int = 80,
    num_points: int = 1000,
    sigma: float | None = None,
    probes_per_call: int = 5,
    progress: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Spectral density of ``operator`` by stochastic Lanczos quadrature, with optional progress.

    Runs :func:`slq_nodes` in compiled batches of ``probes_per_call`` probes (printing
    ``probes done / total`` to stderr after each batch when ``progress``), then
    :func:`spectral_density` of all the nodes:

    .. math::
        φ(x) ≈ \\frac{1}{P} \\sum_{p, j} S^{(p)\\,2}_{1j} \\, \\mathcal N(x; θ^{(p)}_j, σ^2) .

    The operator's arrays are arguments of the compiled batch, not constants in it: a second
    call on an operator of the same model and shapes (e.g. other parameter values) re-uses the
    compilation.

    Args:
      operator: a :class:`~curvjax.spectral.LinearOperator` of size ``D``.
      key: PRNG key for the probes.
      num_probes: ``P``, SLQ probes.
      num_steps: Lanczos steps per probe.
      num_points: grid size.
      sigma: broadening, as for :func:`spectral_density` (default 1% of the node range).
      probes_per_call: probes per compiled batch.
      progress: print ``probes done / total`` to stderr after each batch.

    Returns:
      ``(grid [num_points], density [num_points])`` as numpy arrays, with
      ``trapezoid(density, grid) = 1``.

    Example:
      >>> import jax, jax.numpy as jnp, numpy as np
      >>> from curvjax import spectral
      >>> params = {"w": jnp.ones(4)}
      >>> op = spectral.diagonal_operator({"w": jnp.array([1.0, 2.0, 3.0, 4.0])}, params)
      >>> grid, dens = spectral.density(op, key=jax.random.key(0), num_probes=2, num_steps=4)
      >>> grid.shape, round(float(np.trapezoid(dens, grid)), 4)
      ((1000,), 1.0)

    References:
      Ubaru, Chen & Saad, "Fast estimation of tr(f(A)) via stochastic Lanczos quadrature", 2017;
      Ghorbani, Krishnan & Xiao, "An investigation into neural net optimization via Hessian
      eigenvalue density", ICML 2019.
    """
    closed = jax.make_jaxpr(operator.matvec)(jax.ShapeDtypeStruct((operator.size,), operator.dtype))
    structure = _Structure(closed.jaxpr)
    nodes, weights = [], []
    done = 0
    for call, k in enumerate(jax.random.split(key, -(-num_probes // probes_per_call))):
        count = min(probes_per_call, num_probes - call * probes_per_call)
        nd, wt = _slq_batch(
            list(closed.consts), k, structure=structure, num_probes=count, num_steps=num_steps
        )
        nodes.append(nd)
        weights.append(wt)
        done += count
        if progress:
            print(f"spectral density: {done}/{num_probes} probes", file=sys.stderr, flush=True)
    grid, dens = _density_from_nodes(
        jnp.concatenate(nodes), jnp.concatenate(weights), sigma, num_points=num_points
    )
    return np.asarray(grid), np.asarray(dens)
