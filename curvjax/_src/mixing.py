"""Detect models that combine different examples of a batch.

Per-example quantities (per-example gradients, their norms and variance, GGN and Hessian
diagonals, ...) are only defined when output ``n`` of the model depends on input ``n`` alone.
curvjax evaluates the model's jaxpr traced at batch size one under ``vmap``, so a model that
mixes examples (flax ``BatchNorm(use_running_average=False)`` normalising with batch statistics,
a mean over the batch axis, attention across examples) would silently give wrong numbers. This
module finds such models structurally, from the jaxpr traced at the real batch size ``N``.

Representation
--------------
Every variable carries either ``None`` (it does not depend on the example index, or we stopped
tracking it) or a *stride* ``s``: the example index of the element at row-major flat position
``i`` is ``(i // s) % N``. An input of shape ``(N, d1, ..., dk)`` batched along axis 0 has
``s = d1 * ... * dk``. This form survives ``reshape`` unchanged (a reshape keeps flat positions),
so ``(N, T, D) -> (N * T, D) -> (N, T, D)`` needs no special case. Operations that act along an
axis locate the example index in the shape: axis ``j`` *holds* the example index when its stride
``st_j`` divides ``s`` and ``N * s`` divides ``st_j * d_j``; the index is then
``(i_j // q) % N`` with sub-stride ``q = s // st_j``. Axis ``j`` is *free* of the example index
when ``d_j == 1``, or ``st_j * d_j`` divides ``s``, or ``N * s`` divides ``st_j``; reducing,
sorting or windowing along an axis that is not free combines examples.

Each primitive has a small rule (its ``mixing`` entry in :mod:`curvjax._src.primitives`) that maps the strides of its inputs to the
strides of its outputs and reports the equation when it combines examples: elementwise operations
whose operands index examples differently, reductions / cumulative ops / sorts / pooling over the
example axis, ``dot_general`` contracting it or pairing two batched operands, convolutions over it,
slicing, padding, concatenating or reversing it, gathers that read rows of the example axis at
indices that are not the example's own (``x[idx]``; ``h[jnp.arange(N), idx]`` is recognised as
per-example by following how the indices were built), scans over the examples whose carry
takes data from the step's example, and elementwise operations pairing example ``n`` with row
``n`` of an array that is not an input (a closed-over array whose rows differ, or an ``iota``
along the example axis: evaluated one example at a time, every example would get row 0).
Nested jaxprs (``jit``, ``custom_jvp_call``,
``custom_vjp_call``, ``remat``, ``closed_call``, ``cond``, ``scan``, ``while``) are entered.
Cases the rules cannot follow stop the tracking of their outputs (the outputs are treated as
independent of the examples): the detector prefers a miss to a false alarm. Known misses: loops
that take examples out one by one (``dynamic_slice`` at a loop counter), and arrays with a row
per example passed as parameters. A false alarm is silenced
with :func:`assume_independent_examples`. A primitive without a
rule that receives batched data is reported by an :class:`UnknownPrimitiveWarning` naming it and
its source line, so that such a miss is never silent.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import os
import re
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax.extend import source_info_util
from jax.extend.core import ClosedJaxpr, Jaxpr, JaxprEqn

__all__ = ["assume_independent_examples", "check_no_batch_mixing", "find_batch_mixing"]

Stride = int | None


class UnknownPrimitiveWarning(UserWarning):
    """The batch-mixing check met a primitive it has no rule for, receiving batched data."""


_STRICT = False  # tests set this to surface errors inside rules instead of ignoring them
_ASSUMED = contextvars.ContextVar("curvjax_assume_independent_examples", default=False)


@contextlib.contextmanager
def assume_independent_examples():
    """Skip the batch-mixing check: the caller vouches that examples do not interact.

    Every per-example quantity (and the optimizers and spectral operators built on them) first
    checks, from the model's jaxpr at the real batch size, that output ``n`` depends on input
    ``n`` alone, and refuses a model that combines examples. The check is structural, so it can
    raise for a model that touches the batch axis in a way that happens not to mix examples, e.g.
    one that processes the batch in two halves, ``concatenate([f(x[:h]), f(x[h:])])``. Inside
    this context (or in a function decorated with it) the check, and its warning about
    primitives without a rule, are skipped; the quantities are then computed from the model
    evaluated one example at a time, which is only correct if the claim holds. The check runs
    while tracing, so the context must enclose the first call of a jitted function.

    Example:
      >>> import jax.numpy as jnp, curvjax
      >>> def apply_fn(p, x):  # the batch in two halves: flagged, but example-independent
      ...     h = x.shape[0] // 2
      ...     return jnp.concatenate([x[:h] @ p, x[h:] @ p])
      >>> p, x, y = jnp.ones((3, 2)), jnp.ones((4, 3)), jnp.zeros(4, dtype=int)
      >>> with curvjax.assume_independent_examples():
      ...     norms = curvjax.batch_l2(apply_fn, p, (x, y))
      >>> norms.shape
      (4,)
    """
    token = _ASSUMED.set(True)
    try:
        yield
    finally:
        _ASSUMED.reset(token)


class _Context:
    """Batch size, collected reports and the name-stack prefix of the enclosing equations."""

    def __init__(self, batch_size: int):
        self.n = batch_size
        self.reports: list[str] = []
        self.scope = ""
        self.where = ""
        self.unknown_lines: list[str] = []
        # how values were built, for index arithmetic: variable -> the equation computing it,
        # and the variables of entered calls -> the caller's operands
        self.producers: dict = {}
        self.aliases: dict = {}
        self.consts: dict = {}  # closed-over arrays of the traced model: constvar -> value

    def unknown(self, eqn: JaxprEqn) -> None:
        """Record an equation of a primitive without a mixing rule that receives batched data."""
        where = source_line(eqn) or self.where or "unknown source line"
        self.unknown_lines.append(f"`{eqn.primitive.name}` ({where})")

    def report(self, eqn: JaxprEqn, what: str) -> None:
        scope = "/".join(p for p in (self.scope, str(eqn.source_info.name_stack)) if p)
        where = source_line(eqn) or self.where or "unknown source line"
        self.reports.append(
            f"`{eqn.primitive.name}` {what}" + (f" in {scope}" if scope else "") + f" ({where})"
        )


def _is_plain_call(eqn) -> bool:
    """A call with one body run once (``pjit``, ``remat``, custom derivatives), not a loop or a
    branch."""
    inner = eqn.params.get("jaxpr", eqn.params.get("call_jaxpr"))
    return inner is not None and eqn.primitive.name not in ("scan", "while", "cond")


def _follow_call(ctx, eqn, var):
    """``var``, an output of the plain call ``eqn``, as the output of its body, with the body's
    producers and aliases registered in ``ctx``; ``None`` if the body does not line up."""
    inner = eqn.params.get("jaxpr", eqn.params.get("call_jaxpr"))
    inner = inner.jaxpr if isinstance(inner, ClosedJaxpr) else inner
    if len(inner.outvars) != len(eqn.outvars) or len(inner.invars) != len(eqn.invars):
        return None
    ctx.producers.update((v, e) for e in inner.eqns for v in e.outvars)
    ctx.aliases.update(zip(inner.invars, eqn.invars, strict=True))
    return inner.outvars[eqn.outvars.index(var)]


#: curvjax's own source directory (frames inside it are never the user's line)
_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep


def source_line(eqn: JaxprEqn) -> str:
    """The user's source line of an equation (``""`` when unknown)."""
    try:
        lines = source_info_util.summarize(eqn.source_info, num_frames=16).splitlines()
    except Exception:  # pragma: no cover - best effort only
        return ""
    lines = [line for line in lines if line not in ("", "<unknown>", "unknown")]
    # outermost first: the innermost frame outside installed packages (flax, equinox) and outside
    # curvjax itself (installed or editable) is the user's code; JAX's own filter only skips
    # packages that sit under the standard library's path, which a virtual environment's do not
    for line in reversed(lines):
        if not re.search(r"[/\\](site|dist)-packages[/\\]", line) and not line.startswith(
            _PACKAGE_DIR
        ):
            return line
    return lines[-1] if lines else ""


# ----------------------------------------------------------------------------- stride helpers


def _shape(atom) -> tuple[int, ...]:
    return tuple(atom.aval.shape)


def _strides(shape: Sequence[int]) -> list[int]:
    return [math.prod(shape[j + 1 :]) for j in range(len(shape))]


def _locate(shape: Sequence[int], s: int, n: int) -> tuple[int, int] | None:
    """The axis ``j`` holding the example index and its sub-stride ``q``, or None."""
    for j, (d, st) in enumerate(zip(shape, _strides(shape), strict=True)):
        if d > 1 and s % st == 0 and (st * d) % (s * n) == 0:
            return j, s // st
    return None


def _touches(shape: Sequence[int], s: int, n: int, axis: int) -> bool:
    """Whether moving along ``axis`` can change the example index."""
    d, st = shape[axis], _strides(shape)[axis]
    return d > 1 and s % (st * d) != 0 and st % (s * n) != 0


def _place(shape: Sequence[int], axis: int, q: int) -> int:
    """Stride of an array of ``shape`` whose example index sits in ``axis``, sub-stride ``q``."""
    return q * _strides(shape)[axis]


def _none(eqn: JaxprEqn) -> list[Stride]:
    return [None] * len(eqn.outvars)


# ----------------------------------------------------------------------------- rules


def elementwise_rule(eqn, ins, ctx):
    # Operands have the output's rank; dimensions of size one broadcast implicitly.
    out = _shape(eqn.outvars[0])
    strides = set()
    for var, s in zip(eqn.invars, ins, strict=True):
        if s is None:
            continue
        loc = _locate(_shape(var), s, ctx.n)
        if _shape(var) != out and loc is None:
            return _none(eqn)
        strides.add(s if _shape(var) == out else _place(out, *loc))
    if len(strides) > 1:
        ctx.report(eqn, "combines operands that index examples along different axes")
        return _none(eqn)
    (s,) = strides
    loc = _locate(out, s, ctx.n)
    if loc is not None and loc[1] == 1:
        for var, t in zip(eqn.invars, ins, strict=True):
            if (
                t is None
                and len(_shape(var)) == len(out)
                and _shape(var)[loc[0]] == ctx.n
                and _has_rows(ctx, var, loc[0])
            ):
                ctx.report(
                    eqn,
                    "combines each example with its row of an array that is not an input "
                    "(closed over, or built from the batch size: evaluated one example at a "
                    "time, every example would get the first row; pass it in `inputs`)",
                )
                return _none(eqn)
    return [s if _shape(v) == out else None for v in eqn.outvars]


def _has_rows(ctx, var, axis: int) -> bool:
    """Whether the example-independent ``var`` provably varies along ``axis`` (a row per example).

    Follows broadcasts, reshapes that add or drop unit axes, slices, casts and elementwise
    operations back to a closed-over array (whose values are checked) or an ``iota`` along
    ``axis``; anything else, parameters included, counts as not varying (no false alarm).
    """
    for _ in range(64):
        var = _resolve(ctx, var)
        if hasattr(var, "val"):
            return False
        if var in ctx.consts:
            value = np.asarray(ctx.consts[var])
            return bool(np.any(np.diff(value, axis=axis) != 0))
        eqn = ctx.producers.get(var)
        if eqn is None:
            return False
        name, p, shape = eqn.primitive.name, eqn.params, _shape(var)
        src = _shape(eqn.invars[0]) if eqn.invars else ()
        if name == "iota":
            return p["dimension"] == axis
        if name == "broadcast_in_dim":
            dims = p["broadcast_dimensions"]
            if axis not in dims or src[dims.index(axis)] != shape[axis]:
                return False
            var, axis = eqn.invars[0], dims.index(axis)
        elif name in ("reshape", "squeeze", "expand_dims"):
            if p.get("dimensions") is not None:
                return False
            kept = [d for d in range(len(shape)) if shape[d] != 1]
            kept_src = [d for d in range(len(src)) if src[d] != 1]
            if [shape[d] for d in kept] != [src[d] for d in kept_src]:
                return False
            var, axis = eqn.invars[0], kept_src[kept.index(axis)]
        elif name in ("slice", "convert_element_type", "copy", "copy_p"):
            var = eqn.invars[0]
        elif primitives_lookup(eqn).mixing is elementwise_rule or name == "select_n":
            same = [v for v in eqn.invars if not hasattr(v, "val") and _shape(v) == shape]
            return any(_has_rows(ctx, v, axis) for v in same)
        else:
            if not _is_plain_call(eqn):
                return False
            var = _follow_call(ctx, eqn, var)
            if var is None:
                return False
    return False


def primitives_lookup(eqn):
    from curvjax._src import primitives  # the registry imports this module's rules

    return primitives.lookup(eqn)


def identity_rule(eqn, ins, ctx):
    return list(ins[: len(eqn.outvars)])


def reshape_rule(eqn, ins, ctx):
    # A reshape keeps row-major flat positions, hence the stride; `dimensions` transposes first.
    dims = eqn.params.get("dimensions")
    if dims is None:
        return [ins[0]]
    shape = _shape(eqn.invars[0])
    loc = _locate(shape, ins[0], ctx.n)
    if loc is None:
        return [None]
    return [_place([shape[d] for d in dims], list(dims).index(loc[0]), loc[1])]


def broadcast_in_dim_rule(eqn, ins, ctx):
    loc = _locate(_shape(eqn.invars[0]), ins[0], ctx.n)
    if loc is None:
        return [None]
    j, q = loc
    return [_place(_shape(eqn.outvars[0]), eqn.params["broadcast_dimensions"][j], q)]


def transpose_rule(eqn, ins, ctx):
    loc = _locate(_shape(eqn.invars[0]), ins[0], ctx.n)
    if loc is None:
        return [None]
    j, q = loc
    return [_place(_shape(eqn.outvars[0]), list(eqn.params["permutation"]).index(j), q)]


def _along(ctx, eqn, operands, ins, outs, axes, what, removed=False):
    """Shared rule for operations that act along ``axes`` of the ``operands`` giving ``outs``."""
    locs = set()
    for var, s in zip(operands, ins, strict=True):
        if s is None:
            continue
        shape = _shape(var)
        if any(_touches(shape, s, ctx.n, a) for a in axes):
            ctx.report(eqn, f"{what} the example axis")
            return [None] * len(outs)
        locs.add(_locate(shape, s, ctx.n))
    if len(locs) > 1 and None not in locs:
        ctx.report(eqn, "combines operands that index examples along different axes")
    if len(locs) != 1 or None in locs:
        return [None] * len(outs)
    ((j, q),) = locs
    if removed:
        j -= sum(a < j for a in axes)
    return [_place(_shape(v), j, q) for v in outs]


def _along_axes(eqn, ins, ctx, axes, what, removed=False, operands=None):
    """``_along`` for the first ``operands`` inputs of ``eqn`` (the rest: init or fill values)."""
    k = len(eqn.invars) if operands is None else operands
    if any(s is not None for s in ins[k:]):
        return _none(eqn)  # batched init or padding values: unusual, stop tracking
    return _along(ctx, eqn, eqn.invars[:k], ins[:k], eqn.outvars, axes, what, removed)


def reduction_rule(eqn, ins, ctx):
    axes = eqn.params.get("axes", eqn.params.get("dimensions"))
    operands = len(eqn.outvars) if eqn.primitive.name == "reduce" else None
    return _along_axes(eqn, ins, ctx, axes, "reduces over", removed=True, operands=operands)


def collective_rule(eqn, ins, ctx):
    # vmap turns a collective over the vmapped axis name into integer (positional) axes.
    axes = [a for a in eqn.params["axes"] if isinstance(a, int)]
    return [
        _along(ctx, eqn, [var], [s], [out], axes, "reduces over", removed=True)[0]
        for var, s, out in zip(eqn.invars, ins, eqn.outvars, strict=True)
    ]


def cumulative_rule(eqn, ins, ctx):
    return _along_axes(eqn, ins, ctx, [eqn.params["axis"]], "accumulates along")


def sort_rule(eqn, ins, ctx):
    return _along_axes(eqn, ins, ctx, [eqn.params["dimension"]], "sorts along")


def top_k_rule(eqn, ins, ctx):
    axis = eqn.params.get("axis", len(_shape(eqn.invars[0])) - 1)
    return _along_axes(eqn, ins, ctx, [axis], "selects the top k along")


def split_rule(eqn, ins, ctx):
    return _along_axes(eqn, ins, ctx, [eqn.params["axis"]], "splits")


def rev_rule(eqn, ins, ctx):
    return _along_axes(eqn, ins, ctx, eqn.params["dimensions"], "reverses")


def windowed_rule(eqn, ins, ctx):
    p, shape = eqn.params, _shape(eqn.invars[0])
    ones = (1,) * len(shape)
    moving = [
        a
        for a in range(len(shape))
        if p["window_dimensions"][a] != 1
        or p["window_strides"][a] != 1
        or tuple(p["padding"][a]) != (0, 0)
        or p.get("base_dilation", ones)[a] != 1
    ]
    return _along_axes(eqn, ins, ctx, moving, "pools over", operands=len(eqn.outvars))


def slice_rule(eqn, ins, ctx):
    shape, p = _shape(eqn.invars[0]), eqn.params
    strides = p["strides"] or (1,) * len(shape)
    cut = [
        a
        for a in range(len(shape))
        if p["start_indices"][a] != 0 or p["limit_indices"][a] != shape[a] or strides[a] != 1
    ]
    return _along_axes(eqn, ins, ctx, cut, "slices")


def pad_rule(eqn, ins, ctx):
    padded = [a for a, cfg in enumerate(eqn.params["padding_config"]) if tuple(cfg) != (0, 0, 0)]
    return _along_axes(eqn, ins, ctx, padded, "pads", operands=1)


def concatenate_rule(eqn, ins, ctx):
    return _along_axes(eqn, ins, ctx, [eqn.params["dimension"]], "concatenates along")


def stack_rule(eqn, ins, ctx):
    # Every operand gains the new axis ``axis``; the operands must index examples alike.
    axis, out = eqn.params["axis"], _shape(eqn.outvars[0])
    locs = set()
    for var, s in zip(eqn.invars, ins, strict=True):
        if s is None:
            continue
        loc = _locate(_shape(var), s, ctx.n)
        if loc is None:
            return [None]
        locs.add(loc)
    if len(locs) > 1:
        ctx.report(eqn, "combines operands that index examples along different axes")
        return [None]
    ((j, q),) = locs
    return [_place(out, j if j < axis else j + 1, q)]


def tile_rule(eqn, ins, ctx):
    # Repeating an array keeps the example index of each element: ``(i // s) % N`` with the
    # example axis's stride in the tiled shape (a repeat along the example axis is a copy).
    loc = _locate(_shape(eqn.invars[0]), ins[0], ctx.n)
    if loc is None:
        return [None]
    return [_place(_shape(eqn.outvars[0]), *loc)]


def dynamic_slice_rule(eqn, ins, ctx):
    shape, sizes = _shape(eqn.invars[0]), eqn.params["slice_sizes"]
    loc = None if ins[0] is None else _locate(shape, ins[0], ctx.n)
    if loc is None or any(s is not None for s in ins[1:]) or sizes[loc[0]] != shape[loc[0]]:
        return [None]  # e.g. one example taken out inside a loop: stop tracking, do not report
    return [_place(_shape(eqn.outvars[0]), *loc)]


def dynamic_update_slice_rule(eqn, ins, ctx):
    operand, update = _shape(eqn.invars[0]), _shape(eqn.invars[1])
    locs = {
        _locate(shape, s, ctx.n)
        for shape, s in zip((operand, update), ins[:2], strict=True)
        if s is not None
    }
    if len(locs) != 1 or any(s is not None for s in ins[2:]):
        return [None]
    (loc,) = locs
    if loc is None or operand[loc[0]] != update[loc[0]]:
        return [None]
    return [_place(operand, *loc)]


def dot_general_rule(eqn, ins, ctx):
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    lhs, rhs = _shape(eqn.invars[0]), _shape(eqn.invars[1])
    lhs_free = [a for a in range(len(lhs)) if a not in lc and a not in lb]
    rhs_free = [a for a in range(len(rhs)) if a not in rc and a not in rb]
    places = []
    for s, shape, contract, batch, free, offset in (
        (ins[0], lhs, lc, lb, lhs_free, len(lb)),
        (ins[1], rhs, rc, rb, rhs_free, len(lb) + len(lhs_free)),
    ):
        if s is None:
            continue
        if any(_touches(shape, s, ctx.n, a) for a in contract):
            ctx.report(eqn, "contracts (sums) over the example axis")
            return [None]
        loc = _locate(shape, s, ctx.n)
        if loc is None:
            return [None]
        j, q = loc
        places.append((list(batch).index(j) if j in batch else offset + free.index(j), q))
    if len(places) == 2 and places[0] != places[1]:
        ctx.report(eqn, "pairs every example of one operand with every example of the other")
        return [None]
    return [_place(_shape(eqn.outvars[0]), *places[0])]


def conv_rule(eqn, ins, ctx):
    p = eqn.params
    lhs_spec, rhs_spec, out_spec = p["dimension_numbers"]
    lhs, rhs, out = _shape(eqn.invars[0]), _shape(eqn.invars[1]), _shape(eqn.outvars[0])
    locs = [
        None if s is None else _locate(shape, s, ctx.n)
        for s, shape in zip(ins, (lhs, rhs), strict=True)
    ]
    if any(s is not None and loc is None for s, loc in zip(ins, locs, strict=True)):
        return [None]
    lhs_loc, rhs_loc = locs
    groups = p["feature_group_count"]
    if rhs_loc is None and lhs_loc[0] == lhs_spec[0] and p["batch_group_count"] == 1:
        return [_place(out, out_spec[0], lhs_loc[1])]  # the usual case: batch in the batch dim
    if lhs_loc is None and rhs_loc[0] == rhs_spec[0]:
        return [_place(out, out_spec[1], rhs_loc[1])]  # per-example kernels, shared input
    if lhs_loc is not None and rhs_loc is not None and p["batch_group_count"] == 1:
        # vmap of a convolution over both input and kernel: examples become feature groups.
        in_group, out_group = lhs[lhs_spec[1]] // groups, rhs[rhs_spec[0]] // groups
        (lj, lq), (rj, rq) = lhs_loc, rhs_loc
        if (
            lj == lhs_spec[1]
            and rj == rhs_spec[0]
            and lq % in_group == 0
            and rq % out_group == 0
            and lq // in_group == rq // out_group
        ):
            return [_place(out, out_spec[1], rq)]
    ctx.report(eqn, "convolves over or across the example axis")
    return [None]


def gather_rule(eqn, ins, ctx):
    dn, sizes = eqn.params["dimension_numbers"], eqn.params["slice_sizes"]
    operand, indices, out = _shape(eqn.invars[0]), _shape(eqn.invars[1]), _shape(eqn.outvars[0])
    out_batch = [d for d in range(len(out)) if d not in dn.offset_dims]
    places = []
    if ins[1] is not None:
        loc = _locate(indices, ins[1], ctx.n)
        if loc is None or loc[0] == len(indices) - 1:
            return [None]
        places.append((out_batch[loc[0]], loc[1]))
    if ins[0] is not None:
        loc = _locate(operand, ins[0], ctx.n)
        if loc is None:
            return [None]
        j, q = loc
        kept = [
            a
            for a in range(len(operand))
            if a not in dn.collapsed_slice_dims and a not in dn.operand_batching_dims
        ]
        if j in dn.operand_batching_dims:
            k = list(dn.operand_batching_dims).index(j)
            places.append((out_batch[dn.start_indices_batching_dims[k]], q))
        elif j in kept and sizes[j] == operand[j]:
            places.append((dn.offset_dims[kept.index(j)], q))
        elif ins[1] is not None and j in dn.start_index_map and q == 1:
            # Per-example indices into the example axis: legitimate only where they pick example
            # n for row n, as ``h[jnp.arange(N), idx]`` does (the example axis indexed by iota).
            axis, k = _locate(indices, ins[1], ctx.n)[0], list(dn.start_index_map).index(j)
            if not _is_example_index(ctx, eqn.invars[1], axis, {len(indices) - 1: k}):
                ctx.report(eqn, "reads other examples' rows, at indices computed from the data")
                return [None]
        elif ins[1] is None and j in dn.start_index_map and q == 1:
            # Fixed indices into the example axis: the identity (``x[jnp.arange(N)]``) or not.
            k = list(dn.start_index_map).index(j)
            rows = [
                a
                for a in range(len(indices) - 1)
                if _is_example_index(ctx, eqn.invars[1], a, {len(indices) - 1: k})
            ]
            if not rows:
                ctx.report(eqn, "selects or reorders examples at fixed indices")
                return [None]
            places.append((out_batch[rows[0]], 1))
        else:
            return [None]  # indexing into the example axis: data dependent, stop tracking
    if len(places) == 2 and places[0] != places[1]:
        ctx.report(eqn, "pairs the indices of one example with the data of another")
        return [None]
    return [_place(out, *places[0])]


def _resolve(ctx, var):
    """The caller's operand behind an input of an entered call (``var`` itself otherwise)."""
    while not hasattr(var, "val") and var in ctx.aliases:
        var = ctx.aliases[var]
    return var


def _is_example_index(ctx, var, axis: int, fixed: dict[int, int]) -> bool:
    """Whether ``var[..., i_axis, ...]`` (other coordinates as in ``fixed``) equals ``i_axis``.

    Follows how the value was built (iota along ``axis``, broadcasts, concatenations, casts and
    jnp's normalisation of negative indices) in the current jaxpr; anything else: False.
    """
    for _ in range(64):
        if hasattr(var, "val"):
            return False
        if var in ctx.aliases:  # an input of an entered call: the caller's operand
            var = ctx.aliases[var]
            continue
        if var not in ctx.producers:
            return False
        eqn = ctx.producers[var]
        name, p, shape = eqn.primitive.name, eqn.params, _shape(var)
        if _is_plain_call(eqn):
            # an output of a call (jnp functions are jitted): follow it inside
            var = _follow_call(ctx, eqn, var)
            if var is None:
                return False
            continue
        if name == "iota":
            return p["dimension"] == axis and shape[axis] == ctx.n
        if name in ("convert_element_type", "copy", "copy_p"):
            var = eqn.invars[0]
        elif name == "broadcast_in_dim":
            dims, src = p["broadcast_dimensions"], _shape(eqn.invars[0])
            if axis not in dims or src[dims.index(axis)] != shape[axis]:
                return False
            fixed = {
                dims.index(d): (0 if src[dims.index(d)] == 1 else i)
                for d, i in fixed.items()
                if d in dims
            }
            var, axis = eqn.invars[0], dims.index(axis)
        elif name == "concatenate":
            d = p["dimension"]
            if d not in fixed:
                return False
            start = 0
            for piece in eqn.invars:
                size = _shape(piece)[d]
                if start <= fixed[d] < start + size:
                    var, fixed = piece, {**fixed, d: fixed[d] - start}
                    break
                start += size
        elif name == "select_n" and len(eqn.invars) == 3:
            # jnp's ``where(i < 0, i + size, i)``: the value is ``i`` for a non-negative ``i``
            pred, first, second = (_resolve(ctx, v) for v in eqn.invars)
            lt, add = ctx.producers.get(pred), ctx.producers.get(second)
            if not (
                lt is not None
                and add is not None
                and lt.primitive.name == "lt"
                and add.primitive.name == "add"
                and _resolve(ctx, lt.invars[0]) is first
                and _resolve(ctx, add.invars[0]) is first
            ):
                return False
            var = first
        else:
            return False
    return False


def scatter_rule(eqn, ins, ctx):
    dn = eqn.params["dimension_numbers"]
    operand, indices, updates = (_shape(v) for v in eqn.invars[:3])
    window = [
        a
        for a in range(len(operand))
        if a not in dn.inserted_window_dims and a not in dn.operand_batching_dims
    ]
    scatter_dims = [d for d in range(len(updates)) if d not in dn.update_window_dims]
    places = set()
    if ins[0] is not None:  # the output keeps the operand's examples where it is not written
        places.add(_locate(operand, ins[0], ctx.n))
    for shape, s, is_updates in ((indices, ins[1], False), (updates, ins[2], True)):
        if s is None:
            continue
        loc = _locate(shape, s, ctx.n)
        if loc is None:
            return [None]
        j, q = loc
        if is_updates and j in dn.update_window_dims:
            axis = window[list(dn.update_window_dims).index(j)]
            if shape[j] != operand[axis]:
                return [None]
            places.add((axis, q))
            continue
        if is_updates:
            j = scatter_dims.index(j)  # the matching dimension of the indices
        if j not in dn.scatter_indices_batching_dims:
            return [None]  # per-example positions in a shared operand: stop tracking
        k = list(dn.scatter_indices_batching_dims).index(j)
        places.add((dn.operand_batching_dims[k], q))
    if None in places:
        return [None]
    if len(places) > 1:
        ctx.report(eqn, "writes the data of one example into the place of another")
        return [None]
    return [_place(operand, *places.pop())]


# ----------------------------------------------------------------------------- nested jaxprs


def _inner(ctx, eqn, jaxpr, ins):
    """Propagate through a nested jaxpr; its reports fall back to ``eqn``'s scope and line."""
    saved = ctx.scope, ctx.where
    ctx.scope = "/".join(p for p in (ctx.scope, str(eqn.source_info.name_stack)) if p)
    ctx.where = source_line(eqn) or ctx.where
    try:
        if isinstance(jaxpr, ClosedJaxpr):
            jaxpr = jaxpr.jaxpr
        return _propagate(jaxpr, ins, ctx)
    finally:
        ctx.scope, ctx.where = saved


def call_rule(param):
    def rule(eqn, ins, ctx):
        inner = eqn.params[param]
        inner = inner.jaxpr if isinstance(inner, ClosedJaxpr) else inner
        ctx.aliases.update(zip(inner.invars, eqn.invars, strict=False))
        outs = _inner(ctx, eqn, inner, ins)
        return outs if len(outs) == len(eqn.outvars) else _none(eqn)

    return rule


def cond_rule(eqn, ins, ctx):
    if ins[0] is not None:
        return _none(eqn)
    outs = [_inner(ctx, eqn, branch, ins[1:]) for branch in eqn.params["branches"]]
    return [o[0] if len(set(o)) == 1 else None for o in zip(*outs, strict=True)]


def _fixed_point(ctx, init, body):
    """Run ``body(carry, ctx)`` until the carry strides are stable; keep the last reports."""
    carry, unstable = list(init), [False] * len(init)
    for _ in range(2 * len(carry) + 2):
        trial = _Context(ctx.n)
        trial.scope, trial.where = ctx.scope, ctx.where
        trial.producers, trial.aliases, trial.consts = ctx.producers, ctx.aliases, ctx.consts
        outs = body(carry, trial)
        changed = False
        for i, new in enumerate(outs[: len(carry)]):
            if unstable[i] or new == carry[i]:
                continue
            changed = True
            if carry[i] is None:
                carry[i] = new
            else:
                carry[i], unstable[i] = None, True
        if not changed:
            ctx.reports.extend(trial.reports)
            ctx.unknown_lines.extend(trial.unknown_lines)
            return [None if i < len(carry) and unstable[i] else o for i, o in enumerate(outs)]
    return None


def while_rule(eqn, ins, ctx):
    # The loop condition is not inspected: under vmap it reduces a batched predicate over the
    # examples (`reduce_or`), which is legitimate per-example control flow.
    nc = eqn.params["cond_nconsts"] + eqn.params["body_nconsts"]
    consts = list(ins[eqn.params["cond_nconsts"] : nc])
    outs = _fixed_point(
        ctx, ins[nc:], lambda carry, c: _inner(c, eqn, eqn.params["body_jaxpr"], consts + carry)
    )
    return _none(eqn) if outs is None else outs


def _tainted(jaxpr: Jaxpr, tainted: Sequence[bool]) -> list[bool]:
    """Which outputs of ``jaxpr`` may depend on the inputs marked ``tainted`` (conservative)."""
    marked = {v for v, t in zip(jaxpr.invars, tainted, strict=True) if t}
    for eqn in jaxpr.eqns:
        if any(not hasattr(v, "val") and v in marked for v in eqn.invars):
            marked.update(eqn.outvars)
    return [not hasattr(v, "val") and v in marked for v in jaxpr.outvars]


def scan_rule(eqn, ins, ctx):
    nc, ncarry = eqn.params["num_consts"], eqn.params["num_carry"]
    length, jaxpr = eqn.params["length"], eqn.params["jaxpr"]
    jaxpr = jaxpr.jaxpr if isinstance(jaxpr, ClosedJaxpr) else jaxpr
    xs, over_examples = [], []
    for v, s in zip(eqn.invars[nc + ncarry :], ins[nc + ncarry :], strict=True):
        over = s is not None and math.prod(_shape(v)[1:]) % (s * ctx.n) != 0
        if over and _locate(_shape(v), s, ctx.n) != (0, 1):
            return _none(eqn)  # the examples split over the scanned axis and another: give up
        over_examples.append(over)
        xs.append(None if over else s)  # one example per step: its slice is followed by taint
    consts, init = list(ins[:nc]), list(ins[nc : nc + ncarry])
    outs = _fixed_point(
        ctx, init, lambda carry, c: _inner(c, eqn, eqn.params["jaxpr"], consts + carry + xs)
    )
    if outs is None:
        return _none(eqn)
    if any(over_examples):
        # A scan whose steps are the examples: the step's slice is one example. Whatever the
        # carry takes from it reaches the following examples; the per-step outputs that depend on
        # the slice (and not on other batched data) are per-example again, row t being example t.
        tainted = [False] * (nc + ncarry) + over_examples
        for _ in range(ncarry + 1):  # a carry tainted in one step taints the next
            flows = _tainted(jaxpr, tainted)
            carry_flows = flows[:ncarry]
            if carry_flows == tainted[nc : nc + ncarry]:
                break
            tainted[nc : nc + ncarry] = [
                a or b for a, b in zip(tainted[nc : nc + ncarry], carry_flows, strict=True)
            ]
        if any(flows[:ncarry]):
            ctx.report(eqn, "carries state from one example to the next (a scan over the examples)")
            return _none(eqn)
        ys = [
            math.prod(_shape(v)[1:]) if f and s is None and length == ctx.n else None
            for v, s, f in zip(eqn.outvars[ncarry:], outs[ncarry:], flows[ncarry:], strict=True)
        ]
        return [None] * ncarry + ys
    ys = [
        None if s is None or math.prod(_shape(v)[1:]) % (s * ctx.n) else s
        for v, s in zip(eqn.outvars[ncarry:], outs[ncarry:], strict=True)
    ]
    return outs[:ncarry] + ys


def _propagate(jaxpr: Jaxpr, ins: Sequence[Stride], ctx: _Context) -> list[Stride]:
    from curvjax._src import primitives  # the registry imports this module's rules

    def step(index, eqn, strides):
        if all(s is None for s in strides):
            return _none(eqn)  # nothing batched goes in: cannot mix
        rule = primitives.lookup(eqn).mixing
        if rule is None:
            ctx.unknown(eqn)
            return _none(eqn)
        try:
            return rule(eqn, strides, ctx)
        except Exception:  # noqa: BLE001 - a rule that cannot follow an equation stops tracking
            if _STRICT:
                raise
            return _none(eqn)

    ctx.producers.update((v, eqn) for eqn in jaxpr.eqns for v in eqn.outvars)
    return primitives.walk(jaxpr, (None,) * len(jaxpr.constvars), ins, step, literal=_no_stride)


def _no_stride(atom) -> Stride:
    return None


def _trace(apply_fn, params, inputs) -> tuple[ClosedJaxpr, list[int | None], int] | None:
    """``(jaxpr, batch_axes, N)`` of ``apply_fn(params, inputs)``, or None when ``N <= 1``."""
    flat, treedef = jax.tree_util.tree_flatten((params, inputs))
    num_params = len(jax.tree_util.tree_leaves(params))
    is_array = [hasattr(x, "shape") and hasattr(x, "dtype") for x in flat]
    specs = [
        jax.ShapeDtypeStruct(tuple(x.shape), x.dtype, weak_type=getattr(x, "weak_type", False))
        for x, a in zip(flat, is_array, strict=True)
        if a
    ]
    num_param_arrays = sum(is_array[:num_params])
    n = next((x.shape[0] for x in specs[num_param_arrays:] if x.shape), 1)
    if n <= 1:
        return None

    def traced(*arrays):
        it = iter(arrays)
        leaves = [next(it) if a else x for x, a in zip(flat, is_array, strict=True)]
        return apply_fn(*jax.tree_util.tree_unflatten(treedef, leaves))

    closed = jax.make_jaxpr(traced)(*specs)
    batch_axes = [
        0 if i >= num_param_arrays and x.shape and x.shape[0] == n else None
        for i, x in enumerate(specs)
    ]
    return closed, batch_axes, n


# ----------------------------------------------------------------------------- public API


def find_batch_mixing(
    closed_jaxpr: ClosedJaxpr, batch_axes: Sequence[int | None], batch_size: int
) -> list[str]:
    """Describe the equations of a jaxpr that combine different examples of the batch.

    Args:
      closed_jaxpr: the model traced at the real batch size, e.g. by ``jax.make_jaxpr``.
      batch_axes: for each input variable of the jaxpr, the axis that indexes examples (its size
        must be ``batch_size``), or ``None`` for inputs that do not depend on the example
        (parameters).
      batch_size: the number of examples ``N``.

    Returns:
      One human-readable line per offending equation (primitive, what it does to the example
      axis, flax module path when known and source line); empty if none is found. With
      ``batch_size == 1`` nothing can be mixed and the list is empty.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> jaxpr = jax.make_jaxpr(lambda x: x - x.mean(axis=0, keepdims=True))(jnp.ones((4, 3)))
      >>> [line.split(" (")[0] for line in find_batch_mixing(jaxpr, [0], 4)]
      ['`reduce_sum` reduces over the example axis']
    """
    if batch_size <= 1:
        _input_strides(closed_jaxpr.jaxpr, batch_axes, batch_size)  # still validate the axes
        return []
    jaxpr = closed_jaxpr.jaxpr
    unknown: list[str] = []
    ins = _input_strides(jaxpr, batch_axes, batch_size)
    reports = _analyse(jaxpr, ins, batch_size, unknown, closed_jaxpr.consts)[1]
    _warn_unknown(unknown)
    return reports


def _input_strides(jaxpr: Jaxpr, batch_axes: Sequence[int | None], n: int) -> list[Stride]:
    if len(batch_axes) != len(jaxpr.invars):
        raise ValueError(
            f"batch_axes has {len(batch_axes)} entries but the jaxpr has "
            f"{len(jaxpr.invars)} inputs; give one axis (or None) per input."
        )
    ins: list[Stride] = []
    for i, (var, axis) in enumerate(zip(jaxpr.invars, batch_axes, strict=True)):
        shape = _shape(var)
        if axis is not None and (not -len(shape) <= axis < len(shape) or shape[axis] != n):
            raise ValueError(
                f"input {i} of the jaxpr has shape {shape}, which has no axis {axis} of size "
                f"batch_size={n}."
            )
        ins.append(None if axis is None else math.prod(shape[axis % len(shape) + 1 :]))
    return ins


def _analyse(
    jaxpr: Jaxpr,
    ins: list[Stride],
    n: int,
    unknown: list[str] | None = None,
    consts: Sequence[Any] = (),
) -> tuple[list[Stride], list[str]]:
    """Output strides (None where untracked) and the deduplicated reports.

    The primitives without a rule that saw batched data are appended to ``unknown``; ``consts``
    are the values of ``jaxpr``'s constvars (closed-over arrays), when known.
    """
    ctx = _Context(n)
    ctx.consts = dict(zip(jaxpr.constvars, consts, strict=False))
    outs = _propagate(jaxpr, ins, ctx)
    if unknown is not None:
        unknown.extend(line for line in dict.fromkeys(ctx.unknown_lines) if line not in unknown)
    return outs, list(dict.fromkeys(ctx.reports))


def _warn_unknown(unknown: list[str]) -> None:
    if unknown:
        warnings.warn(
            "curvjax's batch-mixing check has no rule for "
            + ", ".join(unknown)
            + ", which receive(s) data of the batch; it cannot tell whether they combine "
            "different examples and stopped following their outputs. If they do, per-example "
            "quantities are undefined for this model.",
            UnknownPrimitiveWarning,
            stacklevel=4,
        )


def model_report(apply_fn: Callable, params: Any, inputs: Any) -> tuple[list[str], list[str]]:
    """``(equations that mix examples, primitives without a rule)`` of ``apply_fn``; no warning."""
    traced = _trace(apply_fn, params, inputs)
    if traced is None:
        return [], []
    closed, batch_axes, n = traced
    unknown: list[str] = []
    ins = _input_strides(closed.jaxpr, batch_axes, n)
    reports = _analyse(closed.jaxpr, ins, n, unknown, closed.consts)[1]
    return reports, unknown


def check_no_batch_mixing(apply_fn: Callable, params: Any, inputs: Any) -> None:
    """Raise if ``apply_fn`` combines different examples of the batch.

    ``apply_fn(params, inputs)`` is traced abstractly with ``jax.make_jaxpr`` (no computation);
    every array leaf of ``inputs`` whose leading axis has size ``N`` (the leading size of the
    first leaf) indexes examples, parameters never do. Non-array leaves are held static.

    Args:
      apply_fn: the model, ``apply_fn(params, inputs) -> outputs [N, C]``.
      params: parameter pytree.
      inputs: array or pytree of arrays with leading batch axis ``N``.

    Raises:
      ValueError: naming the operations that combine examples; per-example quantities are
        undefined for such a model. Nothing is checked when ``N == 1``.

    Example:
      >>> import jax.numpy as jnp
      >>> check_no_batch_mixing(lambda p, x: x @ p, jnp.ones((3, 2)), jnp.ones((4, 3)))
    """
    if _ASSUMED.get():
        return  # the caller vouches for the model (assume_independent_examples)
    found, unknown = model_report(apply_fn, params, inputs)
    _warn_unknown(unknown)
    if found:
        lines = "\n".join(f"  - {line}" for line in found)
        raise ValueError(
            "apply_fn combines different examples of the batch, so per-example quantities "
            "(per-example gradients, their norms and variance, GGN / Hessian diagonals, "
            "Kronecker factors) are undefined for this model. Operations that mix examples:\n"
            f"{lines}\n"
            "This usually comes from BatchNorm normalising with batch statistics: use running "
            "averages (flax `nn.BatchNorm(use_running_average=True)`, equinox `BatchNorm` in "
            "inference mode) when computing curvjax quantities, or replace it by LayerNorm / "
            "GroupNorm. Other operations across the batch axis (means over examples, attention "
            "between examples) must be removed from apply_fn. If the model does not combine "
            "examples after all (e.g. it processes the batch in parts), compute the quantities "
            "inside `with curvjax.assume_independent_examples():`."
        )
