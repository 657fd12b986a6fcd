"""Several quantities from one forward pass and one backward pass per set of propagated vectors.

This is BackPACK's ``with backpack(Variance(), KFAC(), ...)``: the model is evaluated once, the
loss gradient is backpropagated once, and each further set of vectors (the columns of the exact
loss-Hessian factor, the Monte-Carlo columns, the Hessian residual columns) once, all quantities
that need the same set sharing it. The quantities are the entries of
:mod:`curvjax._src.quantities`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from typing import Any

from jaxtyping import Array, PRNGKeyArray, PyTree

from curvjax._src import losses as losses_lib
from curvjax._src import mixing
from curvjax._src import quantities as registry


def extract(
    apply_fn: Callable,
    params: PyTree,
    batch: tuple[PyTree, PyTree],
    quantities: Sequence[str] = (),
    *,
    loss: str | losses_lib.Loss = "cross_entropy",
    reduction: str = "mean",
    key: PRNGKeyArray | None = None,
    mc_samples: int = 1,
    options: Mapping[str, Mapping[str, Any]] | None = None,
    independent_examples: bool = False,
) -> dict[str, Array | PyTree]:
    """The loss, the gradient and any set of quantities, sharing one forward and backward pass.

    The model is evaluated once; the loss gradient is backpropagated once; every further set of
    vectors is backpropagated once (in chunks) for all the requested quantities that need it:
    the ``C`` exact columns of ``√κ S_n`` serve ``ggn_diag``, ``kflr`` and ``kfra`` together, the
    ``M`` Monte-Carlo columns ``ggn_diag_mc``, ``kfac`` and ``chain_factors`` (with the same
    samples when their ``mc_samples`` agree).

    ``apply_fn`` must be deterministic: it is evaluated one example at a time, where a random draw
    (dropout, noise on activations) is not the draw that example gets in the batch. A model that
    draws random numbers (any ``jax.random`` sampler, flax ``Dropout`` with
    ``deterministic=False``, inside nested ``jit`` / ``remat`` / control flow too) is refused with
    an error naming the draw and its source line; turn dropout off for curvature
    (``deterministic=True``, nnx ``model.eval()``, equinox ``inference=True``), or draw the mask
    outside and pass it per example in ``inputs`` (``inputs = (x, mask)``), which is exact.

    Output ``n`` must depend on input ``n`` alone. A model that combines examples (BatchNorm with
    batch statistics, a mean, sort or attention over the batch, ``x[idx]`` reading other
    examples' rows, a scan over the examples that carries state, a closed-over array with a row
    per example such as ``mask[: x.shape[0]]``: pass it in ``inputs``) is refused with an error
    naming the operation; a primitive the check has no rule for is named in an
    ``UnknownPrimitiveWarning``. Known miss: a loop that takes examples out one by one at its
    counter. For a false alarm (e.g. a model that processes the batch in parts), pass
    ``independent_examples=True``, or compute inside
    ``with curvjax.assume_independent_examples():`` (which also covers the other functions, the
    optimizers and the spectral operators).

    *Checks under* ``jax.jit``. Outside ``jit`` the batch's structure, shapes and dtypes are
    checked and so are its values: labels in ``[0, C)``, weights finite and non-negative, no NaN
    or Inf in inputs, targets or params. Under ``jit`` values are tracers, so only structure,
    shapes and dtypes are checked (batch sizes, target shape and dtype, output rank, loss,
    reduction and quantity names, the key's type): NaN and Inf propagate to the results, and an
    out-of-range integer label is clamped to the nearest class by JAX's gather. To check values
    inside a jitted step, wrap it with ``jax.experimental.checkify``
    (``checkify.checkify(jax.jit(step), errors=checkify.float_checks)``, then ``err.throw()``),
    and add ``checkify.check(jnp.all((y >= 0) & (y < C)), "labels out of range")`` for labels.

    Args:
      apply_fn: ``apply_fn(params, inputs) -> outputs [N, C]``.
      params: parameter pytree.
      batch: ``(inputs, targets)`` or ``(inputs, targets, weights)`` (weights ``[N]`` or ``[N, *P]``).
      quantities: names from ``"per_example_grads"``, ``"batch_l2"``, ``"sum_grad_squared"``,
        ``"variance"``, ``"ggn_diag"``, ``"ggn_diag_mc"``, ``"hessian_diag"`` (exact),
        ``"kfac"``, ``"kflr"``, ``"kfra"``, ``"ekfac"`` (eigenvalue-corrected K-FAC; option
        ``basis``: ``"kfac"``, Monte-Carlo, the default, or ``"kflr"``, exact),
        ``"chain_factors"``, ``"clipped_grad"`` (needs the option
        ``{"clipped_grad": {"clip_norm": c}}``; the clipped sum of the unscaled per-example
        gradients, whatever ``reduction`` is).
      loss: ``"cross_entropy"``, ``"mse"`` or a :class:`curvjax.losses.Loss`.
      reduction: ``"mean"``, ``"sum"`` or ``"token_mean"``.
      key: PRNG key for the Monte-Carlo quantities.
      mc_samples: default number of sampled columns ``M`` per example.
      options: per-quantity options overriding the defaults, e.g.
        ``{"kfac": {"mc_samples": 4}}`` (then ``kfac`` and ``ggn_diag_mc`` no longer share their
        samples), ``{"kflr": {"approximation": "reduce"}}`` (weights shared over positions:
        ``"expand"``, the default, or ``"reduce"``) or ``{"chain_factors": {"vectors": "exact"}}``
        (the exact columns instead of Monte-Carlo ones).
      independent_examples: skip the batch-mixing check: the caller vouches that output ``n``
        depends on input ``n`` alone (see :func:`curvjax.assume_independent_examples`).

    Returns:
      A dict with ``"loss"`` (the scalar ``L``), ``"grad"`` (pytree like ``params``) and one entry
      per requested quantity, each as the function of the same name returns it.

    Example:
      >>> import jax, jax.numpy as jnp, curvjax
      >>> apply_fn = lambda p, x: x @ p["w"]
      >>> batch = (jnp.ones((5, 4)), jnp.array([0, 1, 2, 0, 1]))
      >>> out = curvjax.extract(apply_fn, {"w": jnp.ones((4, 3))}, batch, ["variance", "kflr"])
      >>> sorted(out)
      ['grad', 'kflr', 'loss', 'variance']
      >>> out = curvjax.extract(
      ...     apply_fn, {"w": jnp.ones((4, 3))}, batch, ["ggn_diag_mc", "kfac"],
      ...     key=jax.random.key(0), options={"kfac": {"mc_samples": 4}})
      >>> out["kfac"]["w"].b.shape
      (1, 3, 3)
    """
    opt_out = mixing.assume_independent_examples() if independent_examples else nullcontext()
    with opt_out:
        p, values = registry.compute(
            apply_fn,
            params,
            batch,
            quantities,
            loss=loss,
            reduction=reduction,
            key=key,
            mc_samples=mc_samples,
            options=options,
        )
    result = {"loss": p.loss, "grad": p.model.unflatten_float(p.grad)}
    for name, value in values.items():
        result[name] = registry.result(p, name, value)
    return result
