# ruff: noqa: F722  (jaxtyping shape strings are not forward references)
"""Operator-level entry points: top eigenpairs and trace by method name."""

from __future__ import annotations

import jax
from jaxtyping import Array, Float, PRNGKeyArray

from curvjax._src.spectral import estimators, krylov
from curvjax._src.spectral.operators import LinearOperator


def top_eigenpairs(
    operator: LinearOperator,
    k: int,
    *,
    key: PRNGKeyArray,
    method: str = "lanczos",
    max_matvecs: int = 200,
    tol: float | None = None,
) -> krylov.Eigenpairs:
    """The ``k`` top eigenpairs of ``operator`` and the number of products used.

    ``"lanczos"`` returns the ``k`` largest eigenvalues ``λ_1 ≥ … ≥ λ_k`` of the symmetric
    operator ``A`` with their unit eigenvectors, stopping once every Ritz residual
    ``‖A y_j − θ_j y_j‖`` is below ``tol · |θ_j|``; ``"power"`` returns the ``k`` of largest
    magnitude, one after the other. The work done follows the steps taken: ``max_matvecs`` only
    bounds it.

    Args:
      operator: a :class:`LinearOperator` of size ``D``.
      k: how many.
      key: PRNG key for the (Gaussian) starting vector.
      method: ``"lanczos"`` (full reorthogonalisation, largest algebraic eigenvalues, stops when
        the Ritz residuals are below ``tol`` relative, default ``1e-6``) or ``"power"`` (power
        iteration with deflation as PyHessian, largest magnitude, per-eigenvalue relative change
        below ``tol``, default ``1e-3``, PyHessian's default).
      max_matvecs: bound on the products (Lanczos: in total; power: per eigenvalue).
      tol: see ``method``.

    Returns:
      :class:`Eigenpairs` with ``eigenvalues [k]``, ``eigenvectors`` as rows ``[k, D]``
      (``operator.to_tree`` maps one to a params-shaped pytree), ``num_matvecs`` the products made
      and ``converged [k]`` whether each pair met ``tol`` within ``max_matvecs``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from curvjax import spectral
      >>> apply_fn = lambda p, x: x @ p["w"]
      >>> params = {"w": jnp.ones((3, 2))}
      >>> batch = (jnp.eye(3), jnp.array([0, 1, 0]))
      >>> op = spectral.ggn_operator(apply_fn, params, batch)
      >>> top = spectral.top_eigenpairs(op, k=1, key=jax.random.key(0))
      >>> top.eigenvectors.shape, bool(top.converged.all()), int(top.num_matvecs) <= op.size
      ((1, 6), True, True)

    References:
      Parlett, *The Symmetric Eigenvalue Problem*, 1998, ch. 13; Yao, Gholami, Keutzer & Mahoney,
      "PyHessian: Neural networks through the lens of the Hessian", 2020.
    """
    start = jax.random.normal(key, (operator.size,), operator.dtype)
    if method == "lanczos":
        return krylov.lanczos_top_k(
            operator.matvec, start, k, max_steps=max_matvecs, tol=1e-6 if tol is None else tol
        )
    if method == "power":
        return krylov.power_iteration_top_k(
            operator.matvec, start, k, max_iters=max_matvecs, tol=1e-3 if tol is None else tol
        )
    raise ValueError(f"unknown method {method!r}: use 'lanczos' or 'power'.")


def trace(
    operator: LinearOperator,
    *,
    key: PRNGKeyArray | None = None,
    method: str = "hutchpp",
    num_matvecs: int = 30,
) -> Float[Array, ""]:
    """Trace ``tr(A) = Σ_i A_ii`` of ``operator``: exact for structured approximations, else stochastic.

    Args:
      operator: a :class:`LinearOperator`.
      key: PRNG key (stochastic methods).
      method: ``"exact"`` (operators with an exact ``trace``, such as ``diagonal_operator`` and
        ``blocks_operator``), ``"hutchinson"`` or ``"hutchpp"`` (unbiased estimates).
      num_matvecs: the product budget of the stochastic methods.

    Returns:
      A scalar.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from curvjax import spectral
      >>> params = {"w": jnp.ones(3)}
      >>> op = spectral.diagonal_operator({"w": jnp.array([1.0, 2.0, 3.0])}, params)
      >>> float(spectral.trace(op, method="exact"))
      6.0
      >>> float(spectral.trace(op, key=jax.random.key(0), method="hutchinson", num_matvecs=4))
      6.0

    References:
      Hutchinson, "A stochastic estimator of the trace of the influence matrix", 1989;
      Meyer, Musco, Musco & Woodruff, "Hutch++: optimal stochastic trace estimation", SOSA 2021.
    """
    if method == "exact":
        if operator.trace is None:
            raise ValueError(
                "this operator has no exact trace; use method='hutchpp' with key=jax.random.key(...)."
            )
        return operator.trace()
    if key is None:
        raise ValueError(f"method={method!r} needs `key=jax.random.key(...)`.")
    fn = {"hutchinson": estimators.hutchinson_trace, "hutchpp": estimators.hutchpp_trace}.get(
        method
    )
    if fn is None:
        raise ValueError(f"unknown method {method!r}: use 'exact', 'hutchinson' or 'hutchpp'.")
    return fn(operator.matvec, operator.size, operator.dtype, key=key, num_matvecs=num_matvecs)
