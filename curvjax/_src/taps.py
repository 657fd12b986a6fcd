"""Parameter taps: the equations of a traced model that consume parameters.

The model ``apply_fn(params, inputs)`` is traced once to a jaxpr **at batch size one**. Every variable
is classified as

* *static*: computed from parameters and constants only (e.g. ``reshape(bias)``), or
* *activation*: depends on the inputs.

An equation that takes both a parameter-derived static input and an activation is a **tap**
(``dot_general`` of a dense layer, ``conv_general_dilated``, the ``add`` of a bias, the ``mul`` of a
LayerNorm scale, a ``gather`` of an embedding, or any other primitive). Calls (``jit``,
``custom_jvp_call``, ``custom_vjp_call``, ``remat``, ``closed_call``) that contain taps are entered
recursively; calls without taps are bound unchanged, keeping their custom derivative rules.

The jaxpr is re-evaluated with a perturbation ``ε`` added to every tap's output, recording the
tap's activation inputs ``a``. Evaluated under ``jax.vmap`` over the examples, the VJP with respect
to ``ε`` gives every tap's output cotangent ``b_n`` **per example**, for one or many backpropagated
vectors at once. Because each example is evaluated on its own, a tap's per-example parameter
gradient is exactly the VJP of that one equation at ``(a_n, b_n)``, whatever the operation.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax._src import source_info_util
from jax.extend import core as jex

STATIC_CONST, STATIC_PARAM, ACTIVATION = 0, 1, 2

# Primitives that only re-lay-out the elements of their single operand (a bijection).
_RELAYOUT = frozenset(
    {"reshape", "transpose", "convert_element_type", "squeeze", "expand_dims", "copy", "copy_p"}
)
# Call-like primitives entered recursively when they contain a tap.
_CALLS = frozenset(
    {
        "jit",
        "pjit",
        "closed_call",
        "core_call",
        "custom_jvp_call",
        "custom_vjp_call",
        "remat",
        "remat2",
        "checkpoint",
    }
)


@dataclasses.dataclass(frozen=True)
class _Dep:
    kind: int
    leaves: frozenset = frozenset()
    chain_leaf: int | None = None  # set when the value is a pure relayout of this one leaf


_CONST = _Dep(STATIC_CONST)
_ACT = _Dep(ACTIVATION)


@dataclasses.dataclass(frozen=True, eq=False)
class Tap:
    """One parameter-consuming equation.

    Attributes:
      id: position in :attr:`TracedModel.taps`.
      eqn: the jaxpr equation (traced at batch size one).
      act_positions: positions of ``eqn.invars`` that carry activations.
      static_positions: positions fed by parameters or constants.
      param_positions: the subset of ``static_positions`` that depends on parameters.
      leaves: indices (into the flat float leaves) of the parameters this tap consumes.
      chain_leaf: when the tap has one parameter input and it is a pure relayout
        (reshape/transpose/convert) of a single leaf, that leaf's index, else ``None``.
      where: the source line that produced the equation, for messages.
    """

    id: int
    eqn: Any
    act_positions: tuple[int, ...]
    static_positions: tuple[int, ...]
    param_positions: tuple[int, ...]
    leaves: frozenset
    chain_leaf: int | None
    where: str

    @property
    def primitive(self) -> str:
        return self.eqn.primitive.name

    def param_avals(self):
        return [self.eqn.invars[p].aval for p in self.param_positions]

    def float_outputs(self) -> list[bool]:
        return [_is_float(v.aval.dtype) for v in self.eqn.outvars]


@dataclasses.dataclass
class _Plan:
    """How to evaluate one (possibly nested) jaxpr: one step per equation."""

    jaxpr: Any
    consts: Sequence[Any]
    steps: list  # ("static" | "act" | "tap" | "nested", payload)


def _is_float(dtype) -> bool:
    return jnp.issubdtype(dtype, jnp.floating) or jnp.issubdtype(dtype, jnp.complexfloating)


def _subjaxpr(eqn):
    for name in ("jaxpr", "call_jaxpr"):
        sub = eqn.params.get(name)
        if isinstance(sub, jex.ClosedJaxpr):
            return sub.jaxpr, sub.consts
        if isinstance(sub, jex.Jaxpr):
            return sub, ()
    return None


def bind(eqn, invals: Sequence[Any]) -> list[Any]:
    """Apply ``eqn``'s primitive to ``invals``; always returns a list of outputs."""
    params = eqn.primitive.get_bind_params(eqn.params)
    with eqn.ctx.manager:
        out = eqn.primitive.bind(*invals, **params)
    return list(out) if eqn.primitive.multiple_results else [out]


def describe(eqn) -> str:
    """``primitive at file:line`` for messages."""
    try:
        where = source_info_util.summarize(eqn.source_info)
    except Exception:  # pragma: no cover - best effort only
        where = "unknown location"
    return f"`{eqn.primitive.name}` at {where}"


def _analyse(jaxpr, consts, in_deps, taps: list) -> tuple[_Plan, list]:
    env: dict = {}

    def read(atom) -> _Dep:
        if isinstance(atom, jex.Literal):
            return _CONST
        return env[atom]

    for var in jaxpr.constvars:
        env[var] = _CONST
    for var, dep in zip(jaxpr.invars, in_deps, strict=True):
        env[var] = dep

    steps = []
    for eqn in jaxpr.eqns:
        deps = [read(v) for v in eqn.invars]
        kinds = {d.kind for d in deps}
        if ACTIVATION not in kinds:
            out_dep = _static_dep(eqn, deps)
            steps.append(("static", None))
            for var in eqn.outvars:
                env[var] = out_dep
            continue
        if STATIC_PARAM not in kinds:
            steps.append(("act", None))
            for var in eqn.outvars:
                env[var] = _ACT
            continue
        sub = _subjaxpr(eqn) if eqn.primitive.name in _CALLS else None
        if sub is not None:
            plan, out_deps = _analyse(sub[0], sub[1], deps, taps)
            steps.append(("nested", plan))
            for var, dep in zip(eqn.outvars, out_deps, strict=True):
                env[var] = dep
            continue
        tap = _make_tap(len(taps), eqn, deps)
        taps.append(tap)
        steps.append(("tap", tap))
        for var in eqn.outvars:
            env[var] = _ACT
    out_deps = [read(v) for v in jaxpr.outvars]
    return _Plan(jaxpr, consts, steps), out_deps


def _static_dep(eqn, deps: list[_Dep]) -> _Dep:
    params = [d for d in deps if d.kind == STATIC_PARAM]
    if not params:
        return _CONST
    leaves = frozenset().union(*(d.leaves for d in params))
    chain = None
    name = eqn.primitive.name
    if len(deps) == 1 and params[0].chain_leaf is not None:
        in_size = int(np.prod(eqn.invars[0].aval.shape))
        out_size = int(np.prod(eqn.outvars[0].aval.shape))
        relayout = name in _RELAYOUT or (name == "broadcast_in_dim" and in_size == out_size)
        if relayout and in_size == out_size:
            chain = params[0].chain_leaf
    return _Dep(STATIC_PARAM, leaves, chain)


def _make_tap(index: int, eqn, deps: list[_Dep]) -> Tap:
    acts = tuple(i for i, d in enumerate(deps) if d.kind == ACTIVATION)
    statics = tuple(i for i, d in enumerate(deps) if d.kind != ACTIVATION)
    params = tuple(i for i, d in enumerate(deps) if d.kind == STATIC_PARAM)
    leaves = frozenset().union(*(deps[i].leaves for i in params))
    chain = deps[params[0]].chain_leaf if len(params) == 1 else None
    return Tap(index, eqn, acts, statics, params, leaves, chain, describe(eqn))


def _evaluate(plan: _Plan, args, *, static_only: bool, eps=None, acts=None, statics=None):
    """Evaluate ``plan`` (see :meth:`TracedModel.forward` / :meth:`TracedModel.static_values`)."""
    env: dict = {}

    def read(atom):
        if isinstance(atom, jex.Literal):
            return atom.val
        return env.get(atom)

    for var, val in zip(plan.jaxpr.constvars, plan.consts, strict=True):
        env[var] = val
    for var, val in zip(plan.jaxpr.invars, args, strict=True):
        env[var] = val

    for eqn, (kind, payload) in zip(plan.jaxpr.eqns, plan.steps, strict=True):
        if kind == "act" and static_only:
            continue
        invals = [read(v) for v in eqn.invars]
        if kind == "nested":
            outs = _evaluate(
                payload, invals, static_only=static_only, eps=eps, acts=acts, statics=statics
            )
        elif kind == "tap":
            tap = payload
            if static_only:
                statics[tap.id] = tuple(invals[i] for i in tap.static_positions)
                continue
            acts[tap.id] = tuple(invals[i] for i in tap.act_positions)
            outs = bind(eqn, invals)
            outs = [o if e is None else o + e for o, e in zip(outs, eps[tap.id], strict=True)]
        else:
            outs = bind(eqn, invals)
        for var, val in zip(eqn.outvars, outs, strict=True):
            env[var] = val
    return [read(v) for v in plan.jaxpr.outvars]


def _leaf_name(path) -> str:
    return "params" + jax.tree_util.keystr(path)


class TracedModel:
    """``apply_fn`` traced at batch size one, with its taps.

    Args:
      apply_fn: ``apply_fn(params, inputs) -> outputs`` with outputs ``[N, C]``.
      params: the parameter pytree; floating-point leaves are differentiated, other leaves are held
        fixed (curvjax returns ``None`` for them).
      inputs: array or pytree of arrays with a common leading batch axis ``N``.
    """

    def __init__(self, apply_fn, params, inputs):
        leaves_with_path, self.param_tree = jax.tree_util.tree_flatten_with_path(params)
        self.leaf_names = [_leaf_name(p) for p, _ in leaves_with_path]
        leaves = [leaf for _, leaf in leaves_with_path]
        self.is_float = [_is_float(jnp.result_type(leaf)) for leaf in leaves]
        self.float_index = [i for i, f in enumerate(self.is_float) if f]
        x_leaves, self.input_tree = jax.tree.flatten(inputs)
        if not x_leaves:
            raise ValueError("`inputs` (batch[0]) contains no arrays.")
        self.num_examples = _batch_size(x_leaves)

        def flat_fn(param_leaves, x_leaves):
            p = jax.tree.unflatten(self.param_tree, param_leaves)
            x = jax.tree.unflatten(self.input_tree, x_leaves)
            return apply_fn(p, x)

        param_structs = [jax.ShapeDtypeStruct(jnp.shape(a), jnp.result_type(a)) for a in leaves]
        x_structs = [
            jax.ShapeDtypeStruct((1, *jnp.shape(a)[1:]), jnp.result_type(a)) for a in x_leaves
        ]
        closed, out_shape = jax.make_jaxpr(flat_fn, return_shape=True)(param_structs, x_structs)
        if not isinstance(out_shape, jax.ShapeDtypeStruct) or len(out_shape.shape) != 2:
            raise ValueError(
                "apply_fn(params, inputs) must return one array of shape [N, C]; for a single "
                f"example it returned {jax.tree.map(lambda s: s.shape, out_shape)}."
            )
        self.jaxpr = closed
        self.out_aval = out_shape

        float_position = {leaf: k for k, leaf in enumerate(self.float_index)}
        in_deps = []
        for i, _ in enumerate(leaves):
            if self.is_float[i]:
                k = float_position[i]
                in_deps.append(_Dep(STATIC_PARAM, frozenset({k}), k))
            else:
                in_deps.append(_CONST)
        in_deps += [_ACT] * len(x_leaves)
        self.taps: list[Tap] = []
        self.plan, out_deps = _analyse(closed.jaxpr, closed.consts, in_deps, self.taps)
        if out_deps[0].kind != ACTIVATION:
            raise ValueError(
                "the model's outputs do not depend on `inputs`; nothing to do per example."
            )
        self.taps_of_leaf: list[list[Tap]] = [[] for _ in self.float_index]
        for tap in self.taps:
            for k in tap.leaves:
                self.taps_of_leaf[k].append(tap)
        self.num_params = len(leaves)

    # --- parameters -------------------------------------------------------------------------
    def float_leaves(self, params) -> list:
        leaves = jax.tree.leaves(params)
        return [leaves[i] for i in self.float_index]

    def merge(self, params, float_leaves) -> list:
        """All leaves of ``params`` with the float ones replaced by ``float_leaves``."""
        leaves = list(jax.tree.leaves(params))
        for i, leaf in zip(self.float_index, float_leaves, strict=True):
            leaves[i] = leaf
        return leaves

    def unflatten_float(self, float_values) -> Any:
        """A params-shaped pytree from per-float-leaf values (``None`` at non-float leaves)."""
        leaves: list = [None] * self.num_params
        for i, value in zip(self.float_index, float_values, strict=True):
            leaves[i] = value
        return jax.tree.unflatten(self.param_tree, leaves)

    # --- evaluation -------------------------------------------------------------------------
    def static_values(self, param_leaves) -> dict[int, tuple]:
        """Values of every tap's static inputs (parameters and constants), no inputs needed."""
        statics: dict[int, tuple] = {}
        args = list(param_leaves) + [None] * (len(self.plan.jaxpr.invars) - len(param_leaves))
        _evaluate(self.plan, args, static_only=True, statics=statics)
        return statics

    def zero_perturbations(self, dtype_like=None) -> dict[int, tuple]:
        """Zero ``ε`` for every float output of every tap, batched: ``[N, *out_shape]``."""
        del dtype_like
        n = self.num_examples
        eps = {}
        for tap in self.taps:
            eps[tap.id] = tuple(
                jnp.zeros((n, *v.aval.shape), v.aval.dtype) if _is_float(v.aval.dtype) else None
                for v in tap.eqn.outvars
            )
        return eps

    def forward_one(self, param_leaves, x_one, eps_one):
        """One example: returns (outputs ``[C]``, activation inputs of every tap)."""
        acts: dict[int, tuple] = {}
        x_leaves = [a[None] for a in jax.tree.leaves(x_one)]
        (out,) = _evaluate(
            self.plan, list(param_leaves) + x_leaves, static_only=False, eps=eps_one, acts=acts
        )
        return out[0], acts

    def forward(self, param_leaves, inputs, eps):
        """All examples: ``(outputs [N, C], acts)`` with acts ``[N, *shape at batch size 1]``."""
        x_leaves = jax.tree.leaves(inputs)
        return jax.vmap(self.forward_one, in_axes=(None, 0, 0))(param_leaves, x_leaves, eps)


def _batch_size(x_leaves) -> int:
    sizes = {jnp.shape(a)[0] if jnp.ndim(a) else None for a in x_leaves}
    if None in sizes:
        raise ValueError("every leaf of `inputs` needs a leading batch axis; got a scalar leaf.")
    if len(sizes) != 1:
        shapes = [jnp.shape(a) for a in x_leaves]
        raise ValueError(f"the leaves of `inputs` disagree on the batch size: shapes {shapes}.")
    (n,) = sizes
    if n == 0:
        raise ValueError("the batch is empty (N = 0).")
    return n
