"""Several quantities from one forward and one backward pass (BackPACK's ``with backpack(...)``)."""

from __future__ import annotations

from curvjax._src import backprop, first_order, leafwise


class _Quantities:
    """Lazily computed quantities of one :class:`~curvjax._src.backprop.Pass`, each at most once."""

    def __init__(self, p: backprop.Pass):
        self.p = p
        self.cache: dict = {}

    def get(self, name: str):
        if name not in self.cache:
            self.cache[name] = QUANTITIES[name](self)
        return self.cache[name]


QUANTITIES = {
    "per_example_grads": lambda q: leafwise.per_example_grads(q.p),
    "batch_l2": lambda q: leafwise.sq_norms(q.p),
    "sum_grad_squared": lambda q: leafwise.sum_sq(q.p, q.p.columns_of_gradient()),
    "variance": lambda q: first_order.variance_from(
        q.get("sum_grad_squared"), q.p.grad, q.p.model.num_examples
    ),
}


def extract(
    apply_fn,
    params,
    batch,
    quantities=(),
    *,
    loss="cross_entropy",
    reduction="mean",
):
    """The loss, the gradient and any set of quantities, from one forward and backward pass.

    The model is evaluated once; the loss gradient is backpropagated once, and every requested
    first-order quantity is computed from the activations and output cotangents recorded at the
    parameter taps during that pass.

    Args:
      apply_fn: ``apply_fn(params, inputs) -> outputs [N, C]``.
      params: parameter pytree.
      batch: ``(inputs, targets)``.
      quantities: names from ``"per_example_grads"``, ``"batch_l2"``, ``"sum_grad_squared"``,
        ``"variance"``.
      loss: ``"cross_entropy"``, ``"mse"`` or a :class:`curvjax.losses.Loss`.
      reduction: ``"mean"`` or ``"sum"``.

    Returns:
      A dict with ``"loss"`` (the scalar ``L``), ``"grad"`` (pytree like ``params``) and one entry
      per requested quantity, each as the function of the same name returns it.

    Example:
      >>> import jax.numpy as jnp, curvjax
      >>> apply_fn = lambda p, x: x @ p["w"]
      >>> batch = (jnp.ones((5, 4)), jnp.array([0, 1, 2, 0, 1]))
      >>> out = curvjax.extract(apply_fn, {"w": jnp.ones((4, 3))}, batch, ["variance", "batch_l2"])
      >>> sorted(out)
      ['batch_l2', 'grad', 'loss', 'variance']
    """
    if isinstance(quantities, str):
        quantities = (quantities,)
    unknown = [q for q in quantities if q not in QUANTITIES]
    if unknown:
        raise ValueError(f"unknown quantities {unknown}; available: {sorted(QUANTITIES)}.")
    p = backprop.run(apply_fn, params, batch, loss=loss, reduction=reduction)
    q = _Quantities(p)
    result = {"loss": p.loss, "grad": p.model.unflatten_float(p.grad)}
    for name in quantities:
        result[name] = p.model.unflatten_float(q.get(name))
    return result
