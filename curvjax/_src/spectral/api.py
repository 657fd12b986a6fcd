"""Operator-level entry points: top eigenpairs and trace by method name."""

from __future__ import annotations

import jax

from curvjax._src.spectral import estimators, krylov


def top_eigenpairs(
    operator,
    k: int,
    *,
    key,
    method: str = "lanczos",
    max_matvecs: int = 200,
    tol: float | None = None,
) -> krylov.Eigenpairs:
    """The ``k`` top eigenpairs of ``operator`` and the number of products used.

    Args:
      operator: a :class:`LinearOperator`.
      k: how many.
      key: PRNG key for the (Gaussian) starting vector.
      method: ``"lanczos"`` (full reorthogonalisation, largest algebraic eigenvalues, stops when
        the Ritz residuals are below ``tol`` relative, default ``1e-6``) or ``"power"`` (power
        iteration with deflation as PyHessian, largest magnitude, per-eigenvalue relative change
        below ``tol``, default ``1e-3``, PyHessian's default).
      max_matvecs: bound on the products (Lanczos: in total; power: per eigenvalue).
      tol: see ``method``.

    Returns:
      :class:`Eigenpairs` with ``eigenvectors`` as rows ``[k, D]`` (``operator.to_tree`` maps one
      to a params-shaped pytree).
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


def trace(operator, *, key=None, method: str = "hutchpp", num_matvecs: int = 30):
    """Trace of ``operator``: exact for structured approximations, else stochastic.

    Args:
      operator: a :class:`LinearOperator`.
      key: PRNG key (stochastic methods).
      method: ``"exact"`` (structured operators only), ``"hutchinson"`` or ``"hutchpp"``.
      num_matvecs: the product budget of the stochastic methods.
    """
    if method == "exact":
        if operator.trace is None:
            raise ValueError("this operator has no exact trace; use method='hutchpp'.")
        return operator.trace()
    if key is None:
        raise ValueError(f"method={method!r} needs `key=jax.random.key(...)`.")
    fn = {"hutchinson": estimators.hutchinson_trace, "hutchpp": estimators.hutchpp_trace}.get(
        method
    )
    if fn is None:
        raise ValueError(f"unknown method {method!r}: use 'exact', 'hutchinson' or 'hutchpp'.")
    return fn(operator.matvec, operator.size, operator.dtype, key=key, num_matvecs=num_matvecs)
