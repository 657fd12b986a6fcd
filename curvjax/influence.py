"""Influence functions: the training examples that help or harm each prediction.

For query examples ``q`` and training examples ``m``,

.. math::
    I(q, m) = ∇ℓ_q^⊤ (C + λ I)^{-1} ∇ℓ_m ,

with ``ℓ_n`` the loss of example ``n`` (summed over its positions with the batch's weights, not
divided by the batch size) and ``C`` the curvature of the reduced training loss (by default the
mean over the curvature batch): EKFAC (default), K-FAC, KFLR, the exact GGN or Hessian (conjugate
gradients), or any tree of curvature blocks. A positive score marks a helpful example (training
on it lowers the query loss to first order), a negative one a harmful example.

* :func:`query_gradients` and :func:`precondition` -- ``∇ℓ_q`` and ``p_q = (C + λ I)⁻¹ ∇ℓ_q``,
  computed once.
* :func:`scores` -- ``[num_queries, num_train]`` streamed over training batches (each jitted,
  :func:`batch_scores`), without per-example gradients; ``per_layer=True`` per parameter leaf.
* :func:`self_influence` -- ``I(m, m)`` (:func:`batch_self_influence` per batch).
* :func:`top_k` -- the most helpful and most harmful training examples per query.

Example:
  >>> import jax.numpy as jnp
  >>> from curvjax import influence
  >>> apply_fn = lambda p, x: x @ p["w"]
  >>> params = {"w": jnp.ones((4, 3)) / 4}
  >>> train = (jnp.eye(6, 4), jnp.array([0, 1, 2, 0, 1, 2]))
  >>> queries = (jnp.ones((2, 4)), jnp.array([0, 1]))
  >>> s = influence.scores(apply_fn, params, queries, [train], damping=0.1,
  ...                      curvature_batch=train)
  >>> influence.top_k(s, 3).most.shape
  (2, 3)

References:
  Koh & Liang, "Understanding black-box predictions via influence functions", ICML 2017.
  Grosse et al., "Studying large language model generalization with influence functions", 2023.
"""

from curvjax._src.influence import (
    PreconditionedQueries,
    TopK,
    batch_scores,
    batch_self_influence,
    precondition,
    query_gradients,
    scores,
    self_influence,
    top_k,
)

__all__ = [
    "PreconditionedQueries",
    "TopK",
    "batch_scores",
    "batch_self_influence",
    "precondition",
    "query_gradients",
    "scores",
    "self_influence",
    "top_k",
]
