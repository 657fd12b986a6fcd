"""Hessian spectra: operators, top eigenvalues, traces and spectral densities.

Build an operator for the curvature (``hessian_operator``, ``ggn_operator``, ``fisher_operator``,
``empirical_fisher_operator``) or for an approximation (``diagonal_operator``, ``blocks_operator``
with exact ``eigenvalues()`` and ``trace()``), then ask for ``top_eigenpairs``, ``trace`` or
``density``. Everything but ``density`` (a host loop with progress, compiled once per operator
structure) runs under ``jax.jit``. Iterative solvers cost the products they make and say so
(``num_matvecs``), with a per-pair ``converged`` flag.

Example:
  >>> import jax, jax.numpy as jnp, curvjax
  >>> from curvjax import spectral
  >>> apply_fn = lambda p, x: jnp.tanh(x @ p["w1"]) @ p["w2"]
  >>> params = {"w1": jnp.ones((4, 6)) / 4, "w2": jnp.ones((6, 3)) / 6}
  >>> batch = (jnp.arange(20.0).reshape(5, 4) / 20, jnp.array([0, 1, 2, 0, 1]))
  >>> op = spectral.hessian_operator(apply_fn, params, batch)
  >>> top = spectral.top_eigenpairs(op, k=2, key=jax.random.key(0))
  >>> top.eigenvalues.shape, int(top.num_matvecs) <= 42, bool(top.converged.all())
  ((2,), True, True)
"""

from curvjax._src.spectral.api import top_eigenpairs, trace
from curvjax._src.spectral.estimators import (
    density,
    hutchinson_trace,
    hutchpp_trace,
    slq_nodes,
    spectral_density,
)
from curvjax._src.spectral.krylov import (
    Eigenpairs,
    Tridiagonal,
    lanczos_top_k,
    lanczos_tridiagonal,
    power_iteration_top_k,
)
from curvjax._src.spectral.operators import (
    LinearOperator,
    blocks_operator,
    diagonal_operator,
    empirical_fisher_operator,
    fisher_operator,
    ggn_operator,
    hessian_operator,
)

__all__ = [
    "Eigenpairs",
    "LinearOperator",
    "Tridiagonal",
    "blocks_operator",
    "density",
    "diagonal_operator",
    "empirical_fisher_operator",
    "fisher_operator",
    "ggn_operator",
    "hessian_operator",
    "hutchinson_trace",
    "hutchpp_trace",
    "lanczos_top_k",
    "lanczos_tridiagonal",
    "power_iteration_top_k",
    "slq_nodes",
    "spectral_density",
    "top_eigenpairs",
    "trace",
]
