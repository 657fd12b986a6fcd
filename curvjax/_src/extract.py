"""Several quantities from one forward pass and one backward pass per set of propagated vectors.

This is BackPACK's ``with backpack(Variance(), KFAC(), ...)``: the model is evaluated once, the
loss gradient is backpropagated once, and each further set of vectors (the columns of the exact
loss-Hessian factor, the Monte-Carlo columns, the Hessian residual columns) once, all quantities
that need the same set sharing it.
"""

from __future__ import annotations

from curvjax._src import backprop, diagonals, first_order, kronecker, leafwise
from curvjax._src import taps as taps_lib

FIRST_ORDER = ("per_example_grads", "batch_l2", "sum_grad_squared", "variance")
SECOND_ORDER = ("ggn_diag", "ggn_diag_mc", "hessian_diag", "kfac", "kflr", "kfra")
NEEDS_KEY = ("ggn_diag_mc", "kfac")


class _Quantities:
    """Lazily computed quantities of one pass, each (and each set of vectors) at most once."""

    def __init__(self, p: backprop.Pass, key, mc_samples, requested):
        self.p, self.key, self.mc_samples = p, key, mc_samples
        self.requested = frozenset(requested)
        self.cache: dict = {}

    def column_parts(self, columns, diagonal: str, kronecker_names) -> dict:
        """One pass over a set of vectors serving every quantity that needs it."""
        want_diag = diagonal in self.requested
        want_kron = bool(self.requested & set(kronecker_names))
        p = self.p

        def fn(cols, weights):
            out = {}
            if want_diag:
                out["diag"] = leafwise.sum_sq(p, cols, weights)
            if want_kron:
                out["kron"] = kronecker.additive_parts(p, cols)
            return out

        return p.reduce_columns(fn, columns)

    def get(self, name: str):
        if name not in self.cache:
            self.cache[name] = _RULES[name](self)
        return self.cache[name]


_RULES = {
    "per_example_grads": lambda q: leafwise.per_example_grads(q.p),
    "batch_l2": lambda q: leafwise.sq_norms(q.p),
    "sum_grad_squared": lambda q: leafwise.sum_sq(q.p, q.p.columns_of_gradient()),
    "variance": lambda q: first_order.variance_from(
        q.get("sum_grad_squared"), q.p.grad, q.p.model.num_examples
    ),
    "exact_parts": lambda q: q.column_parts(
        diagonals.ggn_columns(q.p), "ggn_diag", ("kflr", "kfra")
    ),
    "mc_parts": lambda q: q.column_parts(
        diagonals.mc_columns(q.p, q.key, q.mc_samples), "ggn_diag_mc", ("kfac",)
    ),
    "ggn_diag": lambda q: q.get("exact_parts")["diag"],
    "ggn_diag_mc": lambda q: q.get("mc_parts")["diag"],
    "hessian_diag": lambda q: diagonals.hessian_diag_of(q.p),
    "kflr": lambda q: kronecker.assemble(q.p, q.get("exact_parts")["kron"]),
    "kfac": lambda q: kronecker.assemble(q.p, q.get("mc_parts")["kron"]),
    "kfra": lambda q: kronecker.kfra_of(q.p, q.get("exact_parts")["kron"]),
}

QUANTITIES = FIRST_ORDER + SECOND_ORDER


def run_pass(apply_fn, params, batch, quantities, *, loss, reduction):
    """The pass that serves ``quantities`` (Hessian nodes and chain outputs only when needed)."""
    residuals = "hessian_diag" in quantities
    output_taps = ()
    if "kfra" in quantities:
        model = taps_lib.TracedModel(apply_fn, params, batch[0])
        output_taps = [t.id for t in kronecker.chain_of(model)]
    return backprop.run(
        apply_fn,
        params,
        batch,
        loss=loss,
        reduction=reduction,
        residuals=residuals,
        output_taps=output_taps,
    )


def compute(apply_fn, params, batch, quantities, *, loss, reduction, key=None, mc_samples=1):
    """``(pass, {name: list over float leaves})`` for ``quantities``."""
    if isinstance(quantities, str):
        quantities = (quantities,)
    unknown = [q for q in quantities if q not in QUANTITIES]
    if unknown:
        raise ValueError(f"unknown quantities {unknown}; available: {list(QUANTITIES)}.")
    if key is None and any(q in NEEDS_KEY for q in quantities):
        raise ValueError(
            f"{[q for q in quantities if q in NEEDS_KEY]} sample from the model's predictive: "
            "pass `key=jax.random.key(...)`."
        )
    p = run_pass(apply_fn, params, batch, quantities, loss=loss, reduction=reduction)
    q = _Quantities(p, key, mc_samples, quantities)
    return p, {name: q.get(name) for name in quantities}


def extract(
    apply_fn,
    params,
    batch,
    quantities=(),
    *,
    loss="cross_entropy",
    reduction="mean",
    key=None,
    mc_samples=1,
):
    """The loss, the gradient and any set of quantities, sharing one forward and backward pass.

    Args:
      apply_fn: ``apply_fn(params, inputs) -> outputs [N, C]``.
      params: parameter pytree.
      batch: ``(inputs, targets)``.
      quantities: names from ``"per_example_grads"``, ``"batch_l2"``, ``"sum_grad_squared"``,
        ``"variance"``, ``"ggn_diag"``, ``"ggn_diag_mc"``, ``"hessian_diag"`` (exact),
        ``"kfac"``, ``"kflr"``, ``"kfra"``.
      loss: ``"cross_entropy"``, ``"mse"`` or a :class:`curvjax.losses.Loss`.
      reduction: ``"mean"`` or ``"sum"``.
      key: PRNG key for the Monte-Carlo quantities (``ggn_diag_mc`` and ``kfac`` share samples).
      mc_samples: number of sampled columns ``M`` per example.

    Returns:
      A dict with ``"loss"`` (the scalar ``L``), ``"grad"`` (pytree like ``params``) and one entry
      per requested quantity, each as the function of the same name returns it.

    Example:
      >>> import jax.numpy as jnp, curvjax
      >>> apply_fn = lambda p, x: x @ p["w"]
      >>> batch = (jnp.ones((5, 4)), jnp.array([0, 1, 2, 0, 1]))
      >>> out = curvjax.extract(apply_fn, {"w": jnp.ones((4, 3))}, batch, ["variance", "kflr"])
      >>> sorted(out)
      ['grad', 'kflr', 'loss', 'variance']
    """
    p, values = compute(
        apply_fn,
        params,
        batch,
        quantities,
        loss=loss,
        reduction=reduction,
        key=key,
        mc_samples=mc_samples,
    )
    result = {"loss": p.loss, "grad": p.model.unflatten_float(p.grad)}
    for name, value in values.items():
        result[name] = p.model.unflatten_float(value)
    return result
