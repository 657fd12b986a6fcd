"""The registry of quantities that :func:`curvjax.extract` computes.

A quantity is one :class:`Quantity` entry: which set of backpropagated vectors it needs beyond
the loss gradient (``"exact"``: the columns of the loss-Hessian factor ``√κ S_n``; ``"mc"``: ``M``
Monte-Carlo columns), the additive per-tap *reduction* it takes over those vectors (``"sum_sq"``:
``Σ_m w_m g_m²``; ``"kron"``: the Kronecker output factors and full blocks; ``"chain"``: the
cross-layer factors of a dense chain), and how its per-leaf result is assembled from the reduced
parts. Every requested quantity that needs the same vector set (with the same options) shares one
backpropagation of that set, in which all their reductions are evaluated together: this is how one
forward and one backward pass per vector set serves any combination of quantities.

Adding a quantity is one :func:`register` call (plus its public wrapper, see :func:`compute_one`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from curvjax._src import backprop, chain, clipping, diagonals, ekfac, kronecker, leafwise


@dataclasses.dataclass(frozen=True)
class Quantity:
    """One quantity of :func:`curvjax.extract`.

    Attributes:
      name: the public name (a key of ``extract``'s result).
      assemble: ``assemble(context, parts) -> value``; ``parts`` is the summed output of the
        quantity's reduction over its vector set (``None`` without a vector set). The value is a
        list over the float leaves (unflattened into a params-shaped pytree) unless ``per_leaf``
        is false.
      vectors: ``None``, ``"exact"`` or ``"mc"``: the set of backpropagated vectors it needs.
      reduction: a key of :data:`REDUCTIONS`, additive over the vectors of the set.
      options: the quantity's options and their defaults (e.g. ``{"mc_samples": 1}``); an option
        ``"vectors"`` lets the user choose the vector set.
      curvature: the result is a curvature (diagonal or blocks) that
        :func:`curvjax.optim.precondition_by_curvature` accepts.
      per_leaf: the result is one value per float leaf.
      residuals: the pass must record the Hessian residual nodes.
      output_taps: ``output_taps(model) -> taps`` whose outputs the pass must make injectable.
      leaf_dtype: the per-leaf values have the leaf's shape (or ``[N, *shape]``) and are returned
        in the leaf's dtype; other values (norms, Kronecker factors) stay in the precision they
        were accumulated in (at least float32).
    """

    name: str
    assemble: Callable[[Context, Any], Any]
    vectors: str | None = None
    reduction: str | None = None
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    curvature: bool = False
    per_leaf: bool = True
    residuals: bool = False
    output_taps: Callable | None = None
    leaf_dtype: bool = False


REGISTRY: dict[str, Quantity] = {}

#: Additive reductions over backpropagated vectors: ``(pass, tap cotangents, weights) -> parts``.
REDUCTIONS: dict[str, Callable] = {
    "sum_sq": lambda p, cols, weights: leafwise.sum_sq(p, cols, weights),
    "kron": lambda p, cols, weights: kronecker.additive_parts(p, cols),
    "kron_reduce": lambda p, cols, weights: kronecker.additive_parts(
        p, cols, approximation="reduce"
    ),
    "chain": lambda p, cols, weights: chain.output_factors(p, cols),
}

#: The vector sets: ``(pass, key, options) -> columns [N, M, *P, C]`` (or ``positions.Columns``).
VECTOR_SETS: dict[str, Callable] = {
    "exact": lambda p, key, options: p.objective.exact_columns(p.outputs),
    "mc": lambda p, key, options: p.objective.mc_columns(key, p.outputs, options["mc_samples"]),
}
_SET_OPTIONS = {"exact": (), "mc": ("mc_samples",)}


def register(quantity: Quantity) -> Quantity:
    """Add ``quantity`` to the registry (its name must be new)."""
    if quantity.name in REGISTRY:
        raise ValueError(f"a quantity named {quantity.name!r} is already registered.")
    if quantity.reduction is not None and quantity.reduction not in REDUCTIONS:
        raise ValueError(
            f"unknown reduction {quantity.reduction!r}; use one of {list(REDUCTIONS)}."
        )
    if (quantity.vectors is None) != (quantity.reduction is None):
        raise ValueError("`vectors` and `reduction` are given together or not at all.")
    REGISTRY[quantity.name] = quantity
    return quantity


def names() -> tuple[str, ...]:
    """Every registered quantity, in registration order."""
    return tuple(REGISTRY)


def curvature_names() -> tuple[str, ...]:
    """The quantities whose result is a curvature (diagonal or blocks)."""
    return tuple(q.name for q in REGISTRY.values() if q.curvature)


class Context:
    """One pass and the requested quantities; vector sets and quantities computed at most once."""

    def __init__(self, p: backprop.Pass, requested: Sequence[str], key, options: Mapping):
        self.p, self.key, self.options = p, key, options
        self.requested = tuple(requested)
        self._cache: dict = {}

    def value(self, name: str):
        """The value of quantity ``name`` (computed once)."""
        if ("value", name) not in self._cache:
            quantity = REGISTRY[name]
            parts = self._parts(name) if quantity.vectors is not None else None
            self._cache[("value", name)] = quantity.assemble(self, parts)
        return self._cache[("value", name)]

    def _set_key(self, name: str) -> tuple:
        vectors = _vectors(name, self.options[name])
        return (vectors, *(self.options[name][o] for o in _SET_OPTIONS[vectors]))

    def _parts(self, name: str):
        """The reduction of ``name``, from one backpropagation shared with its set's quantities."""
        set_key = self._set_key(name)
        if ("set", set_key) not in self._cache:
            sharing = [
                q for q in self.requested if REGISTRY[q].vectors and self._set_key(q) == set_key
            ]
            if name not in sharing:
                sharing.append(name)  # needed by another quantity's assembly (e.g. variance)
            reductions = sorted({_reduction(q, self.options[q]) for q in sharing})
            p = self.p
            columns = VECTOR_SETS[set_key[0]](p, self.key, self.options[name])

            def reduce(cols, weights):
                return {r: REDUCTIONS[r](p, cols, weights) for r in reductions}

            self._cache[("set", set_key)] = p.reduce_columns(reduce, columns)
        return self._cache[("set", set_key)][_reduction(name, self.options[name])]


def _reduction(name: str, options: Mapping) -> str:
    """The reduction of quantity ``name``; an ``approximation`` option other than ``"expand"``
    selects the variant ``"<reduction>_<approximation>"`` (so that variants never share parts)."""
    base = REGISTRY[name].reduction
    approximation = options.get("approximation", kronecker.DEFAULT_APPROXIMATION)
    return base if approximation == kronecker.DEFAULT_APPROXIMATION else f"{base}_{approximation}"


def _vectors(name: str, options: Mapping) -> str | None:
    """The vector set of quantity ``name`` under its resolved ``options``."""
    return options.get("vectors", REGISTRY[name].vectors)


def _options(requested: Sequence[str], mc_samples: int, options: Mapping | None) -> dict:
    options = dict(options or {})
    unknown = [name for name in options if name not in REGISTRY]
    if unknown:
        raise ValueError(f"options for unknown quantities {unknown}; available: {list(names())}.")
    resolved = {}
    for name in requested:
        defaults = dict(REGISTRY[name].options)
        if "mc_samples" in defaults:
            defaults["mc_samples"] = mc_samples
        given = dict(options.get(name, {}))
        bad = [o for o in given if o not in defaults]
        if bad:
            raise ValueError(
                f"quantity {name!r} has no option {bad[0]!r}; its options are {list(defaults)}."
            )
        defaults.update(given)
        if "basis" in defaults:  # EKFAC: the basis chooses the vector set
            defaults["vectors"] = ekfac.vectors_of_basis(defaults["basis"])
        if "approximation" in defaults:
            kronecker.check_approximation(defaults["approximation"])
        if defaults.get("vectors", "mc") not in VECTOR_SETS:
            raise ValueError(
                f"quantity {name!r}: option vectors={defaults['vectors']!r}; use one of "
                f"{list(VECTOR_SETS)}."
            )
        resolved[name] = defaults
    return resolved


def compute(
    apply_fn, params, batch, quantities, *, loss, reduction, key=None, mc_samples=1, options=None
) -> tuple[backprop.Pass, dict]:
    """``(pass, {name: value})`` for ``quantities``, sharing one pass and one backpropagation per
    vector set."""
    if isinstance(quantities, str):
        quantities = (quantities,)
    quantities = tuple(quantities)
    unknown = [q for q in quantities if q not in REGISTRY]
    if unknown:
        raise ValueError(f"unknown quantities {unknown}; available: {list(names())}.")
    resolved = _options(quantities, mc_samples, options)
    sampling = [q for q in quantities if _vectors(q, resolved[q]) == "mc"]
    if key is None and sampling:
        raise ValueError(
            f"{sampling} sample from the model's predictive: pass `key=jax.random.key(...)`."
        )
    residuals = any(REGISTRY[q].residuals for q in quantities)
    hooks = [REGISTRY[q].output_taps for q in quantities if REGISTRY[q].output_taps is not None]
    p = backprop.run(
        apply_fn,
        params,
        batch,
        loss=loss,
        reduction=reduction,
        residuals=residuals,
        output_taps=_output_taps(hooks),
    )
    context = Context(p, quantities, key, resolved)
    return p, {name: context.value(name) for name in quantities}


def _output_taps(hooks) -> Callable | None:
    if not hooks:
        return None
    return lambda model: [t.id for hook in hooks for t in hook(model)]


def result(p: backprop.Pass, name: str, value):
    """The public form of a quantity's value (a params-shaped pytree for per-leaf quantities)."""
    quantity = REGISTRY[name]
    if not quantity.per_leaf:
        return value
    if quantity.leaf_dtype:
        leaves = p.model.float_leaves(p.params)
        value = [v.astype(jnp.result_type(leaf)) for v, leaf in zip(value, leaves, strict=True)]
    return p.model.unflatten_float(value)


def compute_one(name: str, apply_fn, params, batch, **kwargs):
    """One quantity, as its public wrapper returns it."""
    p, values = compute(apply_fn, params, batch, (name,), **kwargs)
    return result(p, name, values[name])


def _variance_from(sum_squared, gradient, num_examples: int):
    """``(1/N) Σ g_n² − ((1/N) Σ g_n)²`` from ``Σ g_n²`` and ``Σ g_n = ∇L``."""
    return jax.tree.map(
        lambda s, g: s / num_examples - (g / num_examples) ** 2, sum_squared, gradient
    )


# --- the quantities --------------------------------------------------------------------------
register(
    Quantity("per_example_grads", lambda c, _: leafwise.per_example_grads(c.p), leaf_dtype=True)
)
register(Quantity("batch_l2", lambda c, _: leafwise.sq_norms(c.p)))
register(
    Quantity(
        "sum_grad_squared",
        lambda c, _: leafwise.sum_sq(c.p, c.p.columns_of_gradient()),
        leaf_dtype=True,
    )
)
register(
    Quantity(
        "variance",
        lambda c, _: _variance_from(c.value("sum_grad_squared"), c.p.grad, c.p.model.num_examples),
        leaf_dtype=True,
    )
)
register(
    Quantity(
        "clipped_grad",
        lambda c, _: clipping.clip(c.p, **c.options["clipped_grad"]),
        options={"clip_norm": None, "groups": None},
        per_leaf=False,
    )
)
register(
    Quantity(
        "ggn_diag",
        lambda c, parts: parts,
        vectors="exact",
        reduction="sum_sq",
        curvature=True,
        leaf_dtype=True,
    )
)
register(
    Quantity(
        "ggn_diag_mc",
        lambda c, parts: parts,
        vectors="mc",
        reduction="sum_sq",
        options={"mc_samples": 1},
        curvature=True,
        leaf_dtype=True,
    )
)
register(
    Quantity(
        "hessian_diag",
        lambda c, _: diagonals.hessian_diag_of(c.p),
        curvature=True,
        residuals=True,
        leaf_dtype=True,
    )
)
register(
    Quantity(
        "kfac",
        lambda c, parts: kronecker.assemble(
            c.p, parts, approximation=c.options["kfac"]["approximation"]
        ),
        vectors="mc",
        reduction="kron",
        options={"mc_samples": 1, "approximation": kronecker.DEFAULT_APPROXIMATION},
        curvature=True,
    )
)
register(
    Quantity(
        "kflr",
        lambda c, parts: kronecker.assemble(
            c.p, parts, approximation=c.options["kflr"]["approximation"]
        ),
        vectors="exact",
        reduction="kron",
        options={"approximation": kronecker.DEFAULT_APPROXIMATION},
        curvature=True,
    )
)
register(
    Quantity(
        "kfra",
        lambda c, parts: kronecker.kfra_of(c.p, parts),
        vectors="exact",
        reduction="kron",
        curvature=True,
        output_taps=kronecker.chain_of,
    )
)
register(
    Quantity(
        "chain_factors",
        lambda c, parts: chain.assemble(c.p, parts),
        vectors="mc",
        reduction="chain",
        options={"mc_samples": 1, "vectors": "mc"},
        per_leaf=False,
    )
)


def _ekfac(c: Context, parts):
    """EKFAC from the shared Kronecker parts and a second backpropagation of the same vectors."""
    options = c.options["ekfac"]
    columns = VECTOR_SETS[_vectors("ekfac", options)](c.p, c.key, options)
    return ekfac.ekfac_of(c.p, parts, columns, approximation=options["approximation"])


register(
    Quantity(
        "ekfac",
        _ekfac,
        vectors="mc",
        reduction="kron",
        options={
            "mc_samples": 1,
            "basis": "kfac",
            "approximation": kronecker.DEFAULT_APPROXIMATION,
        },
        curvature=True,
    )
)
