"""Parameter taps: the equations of a traced model that consume parameters.

The model ``apply_fn(params, inputs)`` is traced once to a jaxpr **at batch size one**. Every variable
is classified as

* *static*: computed from parameters and constants only (e.g. ``reshape(bias)``), or
* *activation*: depends on the inputs.

An equation that takes both a parameter-derived static input and an activation is a **tap**
(``dot_general`` of a dense layer, ``conv_general_dilated``, the ``add`` of a bias, the ``mul`` of a
LayerNorm scale, a ``gather`` of an embedding, or any other primitive). Calls (``jit``, ``remat``,
``closed_call``, ``custom_jvp_call``, ``custom_vjp_call``: the entries of
:mod:`curvjax._src.primitives` with a ``call``) that contain taps are entered recursively; calls
without taps are bound unchanged, keeping their custom derivative rules. What the analysis and the
evaluation know about each primitive comes from that registry, and both run its interpreter.

The jaxpr is re-evaluated with a perturbation ``ε`` added to every tap's output, recording the
tap's activation inputs ``a``. Evaluated under ``jax.vmap`` over the examples, the VJP with respect
to ``ε`` gives every tap's output cotangent ``b_n`` **per example**, for one or many backpropagated
vectors at once. Because each example is evaluated on its own, a tap's per-example parameter
gradient is exactly the VJP of that one equation at ``(a_n, b_n)``, whatever the operation.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from curvjax._src import positions, primitives

STATIC_CONST, STATIC_PARAM, ACTIVATION = 0, 1, 2


@dataclasses.dataclass(frozen=True)
class _Dep:
    kind: int
    leaves: frozenset = frozenset()  # float leaves the value depends on
    chain_leaf: int | None = None  # set when the value is a pure relayout of this one leaf
    linear: bool = True  # static values: linear in the leaves
    frontier: frozenset = frozenset()  # activations: the latest kernel taps upstream


_CONST = _Dep(STATIC_CONST)
_INPUT = _Dep(ACTIVATION)


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
      hessian_issue: why the exact Hessian cannot treat this tap (``None`` if it can).
      frontier: the kernel taps (dense/conv) that feed its activation input most recently.
      tied: a bilinear tap whose activation input depends on the parameters it consumes (tied
        weights: ``h @ embᵀ`` after ``emb[tokens]``, one kernel applied in two layers); the exact
        Hessian adds the cross term between its two operands (a :data:`TIED_NODE`).
    """

    id: int
    eqn: Any
    act_positions: tuple[int, ...]
    static_positions: tuple[int, ...]
    param_positions: tuple[int, ...]
    leaves: frozenset
    chain_leaf: int | None
    where: str
    hessian_issue: str | None = None
    frontier: frozenset = frozenset()
    tied: bool = False

    @property
    def primitive(self) -> str:
        return self.eqn.primitive.name

    @property
    def info(self) -> primitives.PrimitiveInfo:
        """The primitive's registry entry."""
        return primitives.lookup(self.eqn)

    @property
    def is_kernel(self) -> bool:
        """A layer kernel: a primitive with a fast rule, applied to one activation."""
        return self.info.rule is not None and len(self.act_positions) == 1


ELEMENTWISE_NODE, BILINEAR_NODE, TIED_NODE = "elementwise", "bilinear", "tied"


@dataclasses.dataclass(frozen=True, eq=False)
class Node:
    """An equation between activations with a non-zero second derivative (a Hessian residual).

    Attributes:
      id: position in :attr:`TracedModel.nodes`.
      eqn: the equation (``tanh``, ``logistic``, ``mul`` of two activations, ``dot_general`` of
        two activations as in attention, ...).
      act_positions: positions of its activation operands (the variables of its Hessian).
      static_positions: the other positions (constants).
      kind: ``"elementwise"`` (the operation acts elementwise after broadcasting, so its Hessian
        is a ``k × k`` matrix per output element) or ``"bilinear"`` (linear in each of its two
        operands separately, e.g. ``dot_general``, whose Hessian couples every pair of operand
        elements that meet in a product) or ``"tied"`` (a tied tap ``z = B(x, θ̃)``, see
        :attr:`Tap.tied`: its Hessian couples the activation ``x`` with the parameter input
        ``θ̃``, which is one of :attr:`static_positions`).
      tap: for a tied node, the id of its tap, else ``None``.
      param_position: for a tied node, the position of the tap's parameter input, else ``None``.
    """

    id: int
    eqn: Any
    act_positions: tuple[int, ...]
    static_positions: tuple[int, ...]
    kind: str = ELEMENTWISE_NODE
    tap: int | None = None
    param_position: int | None = None


@dataclasses.dataclass
class _Plan:
    """How to evaluate one (possibly nested) jaxpr: one step per equation."""

    jaxpr: Any
    consts: Sequence[Any]
    steps: list  # ("static" | "act" | "tap" | "node" | "nested", payload)


def _is_float(dtype) -> bool:
    return jnp.issubdtype(dtype, jnp.floating) or jnp.issubdtype(dtype, jnp.complexfloating)


def _has_override(jaxpr) -> bool:
    """Whether ``jaxpr`` (or a plain call inside it) has an equation with an evaluation override."""
    for eqn in jaxpr.eqns:
        info = primitives.lookup(eqn)
        if info.evaluate is not None and info.evaluate(eqn) is not None:
            return True
        sub = primitives.called_jaxpr(eqn) if info.call is not None and info.call.plain else None
        if sub is not None and _has_override(sub[0]):
            return True
    return False


@dataclasses.dataclass
class _Found:
    """What an analysis collects."""

    taps: list
    nodes: list
    unsupported: list  # descriptions of operations the exact Hessian cannot treat
    residuals: bool  # whether to look for Hessian residual nodes
    where: str = ""  # source line of the innermost enclosing call, for equations without one


def _analyse_call(eqn, sub, deps, found: _Found) -> tuple[_Plan, list]:
    """:func:`_analyse` of a called jaxpr; its equations fall back to the call's source line."""
    outer = found.where
    found.where = primitives.where(eqn) or outer
    try:
        return _analyse(sub[0], sub[1], deps, found)
    finally:
        found.where = outer


def _analyse(jaxpr, consts, in_deps, found: _Found) -> tuple[_Plan, list]:
    steps = []

    def step(index, eqn, deps):
        kinds = {d.kind for d in deps}
        if ACTIVATION not in kinds:
            steps.append(("static", None))
            return [_static_dep(eqn, deps)] * len(eqn.outvars)
        leaves = frozenset().union(*(d.leaves for d in deps))
        sub = primitives.called_jaxpr(eqn)
        if STATIC_PARAM not in kinds:
            frontier = frozenset().union(*(d.frontier for d in deps))
            kind_payload, out_deps = _activation_step(eqn, deps, sub, found)
            steps.append(kind_payload)
            return [
                out_deps[k]
                if out_deps is not None and out_deps[k] is not None
                else _Dep(ACTIVATION, leaves, frontier=frontier)
                for k in range(len(eqn.outvars))
            ]
        if sub is not None:
            plan, out_deps = _analyse_call(eqn, sub, deps, found)
            steps.append(("nested", plan))
            return out_deps
        tap = _make_tap(len(found.taps), eqn, deps, found.where)
        found.taps.append(tap)
        if tap.tied and found.residuals:
            node = Node(
                len(found.nodes),
                eqn,
                tap.act_positions,
                tap.static_positions,
                TIED_NODE,
                tap.id,
                tap.param_positions[0],
            )
            found.nodes.append(node)
            steps.append(("tied", (tap, node)))
        else:
            steps.append(("tap", tap))
        frontier = frozenset({tap.id}) if tap.is_kernel else tap.frontier
        return [_Dep(ACTIVATION, leaves, frontier=frontier)] * len(eqn.outvars)

    const_deps = [_CONST] * len(jaxpr.constvars)
    out_deps = primitives.walk(jaxpr, const_deps, in_deps, step, literal=lambda atom: _CONST)
    return _Plan(jaxpr, consts, steps), out_deps


def _activation_step(eqn, deps, sub, found: _Found):
    """Step for an equation of activations only: bound as is, a Hessian node, or nested."""
    info = primitives.lookup(eqn)
    plain = info.call is not None and info.call.plain
    if not found.residuals:
        if sub is not None and plain and _has_override(sub[0]):
            plan, out_deps = _analyse_call(eqn, sub, deps, found)  # for the override inside
            return ("nested", plan), out_deps
        return ("act", None), None
    acts = tuple(i for i, d in enumerate(deps) if d.kind == ACTIVATION)
    if sub is not None:
        trial = _Found([], [], [], True, found.where)
        _analyse_call(eqn, sub, deps, trial)
        overrides = plain and _has_override(sub[0])
        if not trial.nodes and not trial.unsupported and not trial.taps and not overrides:
            return ("act", None), None
        plan, out_deps = _analyse_call(eqn, sub, deps, found)
        return ("nested", plan), out_deps
    float_acts = [i for i in acts if _is_float(eqn.invars[i].aval.dtype)]
    if info.hessian in (primitives.PIECEWISE, primitives.LINEAR) or not float_acts:
        return ("act", None), None
    if info.hessian == primitives.BILINEAR and sum(bool(deps[i].leaves) for i in float_acts) < 2:
        return ("act", None), None  # linear in each operand, at most one moves with parameters
    if set(float_acts) <= set(info.linear_operands):
        return ("act", None), None  # e.g. `div`: linear in the numerator
    if not any(deps[i].leaves for i in float_acts):
        return ("act", None), None  # upstream of every parameter: no effect on the Hessian
    out_shape = eqn.outvars[0].aval.shape
    elementwise = len(eqn.outvars) == 1 and all(
        len(eqn.invars[i].aval.shape) == len(out_shape)
        and all(d in (1, o) for d, o in zip(eqn.invars[i].aval.shape, out_shape, strict=True))
        for i in float_acts
    )
    second_order = info.hessian in (primitives.ELEMENTWISE, primitives.BILINEAR)
    if info.elementwise and second_order and elementwise:
        statics = tuple(i for i in range(len(deps)) if i not in float_acts)
        node = Node(len(found.nodes), eqn, tuple(float_acts), statics)
        found.nodes.append(node)
        return ("node", node), None
    if info.hessian == primitives.BILINEAR and len(float_acts) == 2 and len(eqn.outvars) == 1:
        statics = tuple(i for i in range(len(deps)) if i not in float_acts)
        node = Node(len(found.nodes), eqn, tuple(float_acts), statics, BILINEAR_NODE)
        found.nodes.append(node)
        return ("node", node), None
    found.unsupported.append(primitives.describe(eqn, found.where))
    return ("act", None), None


def _static_dep(eqn, deps: list[_Dep]) -> _Dep:
    params = [d for d in deps if d.kind == STATIC_PARAM]
    if not params:
        return _CONST
    leaves = frozenset().union(*(d.leaves for d in params))
    info = primitives.lookup(eqn)
    linear_classes = (primitives.LINEAR, primitives.BILINEAR, primitives.PIECEWISE)
    linear = all(d.linear for d in params) and info.hessian in linear_classes
    if info.hessian == primitives.BILINEAR and len(params) > 1:
        linear = False
    chain = None
    if len(deps) == 1 and params[0].chain_leaf is not None:
        in_size = int(np.prod(eqn.invars[0].aval.shape))
        out_size = int(np.prod(eqn.outvars[0].aval.shape))
        if info.relayout and in_size == out_size:
            chain = params[0].chain_leaf
    return _Dep(STATIC_PARAM, leaves, chain, linear)


def _make_tap(index: int, eqn, deps: list[_Dep], fallback: str = "") -> Tap:
    acts = tuple(i for i, d in enumerate(deps) if d.kind == ACTIVATION)
    statics = tuple(i for i, d in enumerate(deps) if d.kind != ACTIVATION)
    params = tuple(i for i, d in enumerate(deps) if d.kind == STATIC_PARAM)
    leaves = frozenset().union(*(deps[i].leaves for i in params))
    chain = deps[params[0]].chain_leaf if len(params) == 1 else None
    float_acts = tuple(i for i in acts if _is_float(eqn.invars[i].aval.dtype))
    act_leaves = frozenset().union(*(deps[i].leaves for i in float_acts))
    frontier = frozenset().union(*(deps[i].frontier for i in acts))
    where = primitives.describe(eqn, fallback)
    info = primitives.lookup(eqn)
    issue, tied = None, False
    if not info.linear_tap:
        issue = f"{where} is not linear in its parameter and activation inputs"
    elif not all(deps[i].linear for i in params):
        issue = f"{where} consumes a parameter transformed non-linearly before use"
    elif leaves & act_leaves and info.hessian == primitives.BILINEAR:
        # tied weights: the cross term between the operands is a residual node (see Node)
        tied = len(float_acts) == len(acts) == 1 and len(params) == 1 and len(eqn.outvars) == 1
        if not tied:
            issue = (
                f"{where} consumes a parameter that also shapes its own input, with "
                f"{len(acts)} activation and {len(params)} parameter operands (the exact "
                "diagonal treats one of each)"
            )
    elif leaves & act_leaves and info.hessian not in (primitives.LINEAR, primitives.PIECEWISE):
        issue = f"{where} consumes a parameter that also shapes its own input"
    return Tap(index, eqn, acts, statics, params, leaves, chain, where, issue, frontier, tied)


@dataclasses.dataclass
class _Recorder:
    """What one evaluation adds and records (see :meth:`TracedModel.forward_one`)."""

    static_only: bool
    eps: dict = dataclasses.field(default_factory=dict)  # ("tap"|"node", id) -> per-output ε
    acts: dict = dataclasses.field(default_factory=dict)  # tap id -> activation inputs
    statics: dict = dataclasses.field(default_factory=dict)  # ("tap"|"node", id) -> static inputs
    probes: dict = dataclasses.field(default_factory=dict)  # node id -> activation inputs
    outputs: dict = dataclasses.field(default_factory=dict)  # tap id -> outputs (if requested)
    output_taps: frozenset = frozenset()


def _evaluate(plan: _Plan, args, rec: _Recorder):
    """Evaluate ``plan``; static-only mode skips everything that needs the inputs."""

    def step(index, eqn, invals):
        kind, payload = plan.steps[index]
        if kind == "tied":
            return _evaluate_tied(eqn, invals, *payload, rec)
        if kind in ("act", "node") and rec.static_only:
            if kind == "node":
                rec.statics[("node", payload.id)] = tuple(
                    invals[i] for i in payload.static_positions
                )
            return [None] * len(eqn.outvars)
        if kind == "nested":
            return _evaluate(payload, invals, rec)
        if kind in ("tap", "node"):
            key = (kind, payload.id)
            if rec.static_only:
                rec.statics[key] = tuple(invals[i] for i in payload.static_positions)
                return [None] * len(eqn.outvars)
            inputs = tuple(invals[i] for i in payload.act_positions)
            if kind == "tap":
                rec.acts[payload.id] = inputs
            else:
                rec.probes[payload.id] = inputs
            outs = primitives.bind(eqn, invals)
            eps = rec.eps.get(key)
            if eps is not None:
                outs = [o if e is None else o + e for o, e in zip(outs, eps, strict=True)]
            if kind == "tap" and payload.id in rec.output_taps:
                rec.outputs[payload.id] = tuple(outs)
            return outs
        override = primitives.lookup(eqn).evaluate
        replacement = override(eqn) if override is not None else None
        if replacement is not None:
            return replacement(invals)
        return primitives.bind(eqn, invals)

    return primitives.walk(plan.jaxpr, plan.consts, args, step)


def _evaluate_tied(eqn, invals, tap: Tap, node: Node, rec: _Recorder):
    """A tied tap: a tap whose activation inputs are also the probes of its node."""
    statics = tuple(invals[i] for i in tap.static_positions)
    if rec.static_only:
        rec.statics[("tap", tap.id)] = rec.statics[("node", node.id)] = statics
        return [None] * len(eqn.outvars)
    inputs = tuple(invals[i] for i in tap.act_positions)
    rec.acts[tap.id] = rec.probes[node.id] = inputs
    outs = primitives.bind(eqn, invals)
    for key in (("tap", tap.id), ("node", node.id)):
        eps = rec.eps.get(key)
        if eps is not None:
            outs = [o if e is None else o + e for o, e in zip(outs, eps, strict=True)]
    if tap.id in rec.output_taps:
        rec.outputs[tap.id] = tuple(outs)
    return outs


def _leaf_name(path) -> str:
    return "params" + jax.tree_util.keystr(path)


class TracedModel:
    """``apply_fn`` traced at batch size one, with its taps.

    Args:
      apply_fn: ``apply_fn(params, inputs) -> outputs`` with outputs ``[N, *P, C]``.
      params: the parameter pytree; floating-point leaves are differentiated, other leaves are held
        fixed (curvjax returns ``None`` for them).
      inputs: array or pytree of arrays with a common leading batch axis ``N``.
      residuals: also find the Hessian residual nodes (elementwise non-linear operations between
        activations), entering calls that contain them.
    """

    def __init__(self, apply_fn, params, inputs, *, residuals: bool = False):
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
        if not isinstance(out_shape, jax.ShapeDtypeStruct) or len(out_shape.shape) < 2:
            raise ValueError(
                "apply_fn(params, inputs) must return one array of shape [N, C] or "
                "[N, *positions, C]; for a single example it returned "
                f"{jax.tree.map(lambda s: s.shape, out_shape)}. Return only the outputs the loss "
                "takes (wrap a model with auxiliary outputs: `lambda p, x: model(p, x)[0]`), "
                "with a trailing output axis (`out[:, None]` for one output per example)."
            )
        primitives.check_deterministic(closed.jaxpr)
        if out_shape.shape[0] != 1:
            raise ValueError(
                "apply_fn, evaluated on one example (inputs with leading axis 1), returned outputs "
                f"of shape {out_shape.shape} instead of (1, ...): something in it has the batch "
                "size built in, typically an array with one row per example closed over (a "
                "pre-drawn dropout mask, per-example data) and broadcast against the activations. "
                "Pass per-example arrays through `inputs` (e.g. `inputs = (x, mask)`)."
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
        in_deps += [_INPUT] * len(x_leaves)
        found = _Found([], [], [], residuals)
        self.plan, out_deps = _analyse(closed.jaxpr, closed.consts, in_deps, found)
        if out_deps[0].kind != ACTIVATION:
            raise ValueError(
                "the model's outputs do not depend on `inputs`; nothing to do per example."
            )
        self.taps: list[Tap] = found.taps
        self.nodes: list[Node] = found.nodes
        self.unsupported: list[str] = found.unsupported
        self.output_frontier = out_deps[0].frontier
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
    def static_values(self, param_leaves) -> dict:
        """Static inputs (parameters, constants) of every tap and node: key ``("tap", id)``."""
        rec = _Recorder(static_only=True)
        args = list(param_leaves) + [None] * (len(self.plan.jaxpr.invars) - len(param_leaves))
        _evaluate(self.plan, args, rec)
        return rec.statics

    def zero_perturbations(self) -> dict:
        """Zero ``ε`` ``[N, *out_shape]`` for every float output of every tap and node."""
        n = self.num_examples

        def zeros(eqn):
            return tuple(
                jnp.zeros((n, *v.aval.shape), v.aval.dtype) if _is_float(v.aval.dtype) else None
                for v in eqn.outvars
            )

        eps = {("tap", t.id): zeros(t.eqn) for t in self.taps}
        eps.update({("node", q.id): zeros(q.eqn) for q in self.nodes})
        return eps

    def forward_one(self, param_leaves, x_one, eps_one, output_taps=frozenset()):
        """One example: ``((outputs [C], probes, tap outputs), acts)``.

        ``probes`` holds the activation inputs of the Hessian nodes, ``tap outputs`` the outputs of
        the taps in ``output_taps``: both are differentiable outputs, so cotangents can be injected
        there; ``acts`` holds the activation inputs of the taps.
        """
        rec = _Recorder(static_only=False, eps=eps_one, output_taps=frozenset(output_taps))
        x_leaves = [a[None] for a in jax.tree.leaves(x_one)]
        (out,) = _evaluate(self.plan, list(param_leaves) + x_leaves, rec)
        return (out[0], rec.probes, rec.outputs), rec.acts

    def forward(self, param_leaves, inputs, eps, output_taps=frozenset()):
        """All examples, under ``vmap``: every result gains a leading axis ``N``."""
        x_leaves = jax.tree.leaves(inputs)
        fn = functools.partial(self.forward_one, output_taps=output_taps)
        return jax.vmap(fn, in_axes=(None, 0, 0))(param_leaves, x_leaves, eps)


def _batch_size(x_leaves) -> int:
    return positions.batch_size(x_leaves)
