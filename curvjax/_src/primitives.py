"""What curvjax knows about each JAX primitive, in one table, and the one jaxpr interpreter.

Every fact curvjax uses about a primitive lives in its :class:`PrimitiveInfo` entry, keyed by the
primitive object JAX exports (``jax.lax.dot_general_p``, ``jax.extend.core.primitives.jit_p``, ...):

* ``call``: for call-like primitives (``jit``, ``remat``, ``custom_jvp_call``, ...), where the
  called jaxpr lives and whether the call has a derivative rule of its own;
* ``hessian``: its class for the exact Hessian diagonal -- ``"linear"`` (no second derivative),
  ``"piecewise"`` (piecewise linear or constant: zero second derivative almost everywhere),
  ``"bilinear"`` (linear in each operand separately: ``mul``, ``dot_general``, convolutions),
  ``"elementwise"`` (a non-zero second derivative, applied elementwise), or ``None`` (unknown: the
  exact Hessian diagonal refuses models where it acts between activations);
* ``relayout``: it only re-lays-out the elements of its single operand (when the operand and
  the result have the same size);
* ``linear_tap``: as a parameter tap, it is linear in its parameter and in its activation input;
* ``rule``: a fast per-example rule (an object with ``applies(tap)`` and
  ``form(tap, acts, cots)`` giving the canonical bilinear form of :mod:`curvjax._src.rules.bilinear`);
* ``mixing``: the stride rule of the batch-mixing detector (:mod:`curvjax._src.mixing`);
* ``evaluate``: an evaluation override (the selection-based max-pool derivative).
* ``random``: it draws random numbers (curvjax refuses models that do, see
  :func:`check_deterministic`).

:func:`walk` is the one interpreter: tap analysis, evaluation and batch-mixing detection all run
it with their own per-equation step, and all enter the same calls (:func:`called_jaxpr`).
Users add entries with :func:`curvjax.register_rule`.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from jax import lax
from jax.extend.core import ClosedJaxpr, Jaxpr, Literal, Primitive
from jax.extend.core import primitives as core_primitives

from curvjax._src import mixing, pooling
from curvjax._src.rules import conv, dense

LINEAR, BILINEAR, PIECEWISE, ELEMENTWISE = "linear", "bilinear", "piecewise", "elementwise"
HESSIAN_CLASSES = (LINEAR, BILINEAR, PIECEWISE, ELEMENTWISE)


@dataclasses.dataclass(frozen=True)
class Call:
    """How to enter a call-like primitive.

    Attributes:
      param: the name of the equation parameter holding the called (closed) jaxpr.
      plain: ``True`` when the call has no derivative rule of its own (``jit``, ``remat``), so
        entering it changes no derivative; ``False`` for ``custom_jvp_call`` / ``custom_vjp_call``,
        which are entered only when they contain parameter taps.
    """

    param: str
    plain: bool


@dataclasses.dataclass(frozen=True)
class PrimitiveInfo:
    """Everything curvjax knows about one primitive (see the module docstring)."""

    name: str
    hessian: str | None = None
    relayout: bool = False
    linear_tap: bool = False
    elementwise: bool = False
    linear_operands: tuple[int, ...] = ()
    call: Call | None = None
    rule: Any = None
    mixing: Callable | None = None
    evaluate: Callable | None = None
    random: bool = False


_TABLE: dict[Primitive, PrimitiveInfo] = {}


def _add(primitives, **facts) -> None:
    for primitive in primitives:
        _TABLE[primitive] = PrimitiveInfo(name=primitive.name, **facts)


def _recent(*attributes: str) -> list:
    """Primitives of :mod:`jax.lax` that older or newer JAX versions may lack, by attribute name."""
    return [getattr(lax, a) for a in attributes if hasattr(lax, a)]


P = core_primitives

# --- calls --------------------------------------------------------------------------------------
_add([P.jit_p, P.remat_p], call=Call("jaxpr", plain=True), mixing=mixing.call_rule("jaxpr"))
_add(
    [P.closed_call_p, P.call_p],
    call=Call("call_jaxpr", plain=True),
    mixing=mixing.call_rule("call_jaxpr"),
)
_add(
    [P.custom_jvp_call_p, P.custom_vjp_call_p],
    call=Call("call_jaxpr", plain=False),
    mixing=mixing.call_rule("call_jaxpr"),
)
# Control flow: not entered by tap analysis (a loop that consumes a parameter is one tap with the
# generic rule; the exact Hessian diagonal refuses it), followed by the mixing detector.
_add([lax.cond_p], mixing=mixing.cond_rule)
_add([lax.while_p], mixing=mixing.while_rule)
_add([lax.scan_p], mixing=mixing.scan_rule)

# --- linear -------------------------------------------------------------------------------------
_add([lax.reshape_p], hessian=LINEAR, relayout=True, mixing=mixing.reshape_rule)
_add([lax.transpose_p], hessian=LINEAR, relayout=True, mixing=mixing.transpose_rule)
_add([lax.squeeze_p], hessian=LINEAR, relayout=True, mixing=mixing.identity_rule)
_add(
    [lax.convert_element_type_p, lax.copy_p],
    hessian=LINEAR,
    relayout=True,
    mixing=mixing.elementwise_rule,
)
_add([lax.broadcast_in_dim_p], hessian=LINEAR, relayout=True, mixing=mixing.broadcast_in_dim_rule)
_add([lax.add_p, P.add_jaxvals_p, lax.sub_p], hessian=LINEAR, linear_tap=True, elementwise=True, mixing=mixing.elementwise_rule)  # fmt: skip
_add([lax.neg_p, lax.real_p, lax.imag_p, lax.conj_p, lax.reduce_precision_p], hessian=LINEAR, elementwise=True, mixing=mixing.elementwise_rule)  # fmt: skip
_add([lax.complex_p], hessian=LINEAR, elementwise=True, mixing=mixing.elementwise_rule)
_add([lax.reduce_sum_p], hessian=LINEAR, mixing=mixing.reduction_rule)
_add([lax.slice_p], hessian=LINEAR, mixing=mixing.slice_rule)
_add([lax.dynamic_slice_p], hessian=LINEAR, linear_tap=True, mixing=mixing.dynamic_slice_rule)
_add(
    [lax.dynamic_update_slice_p],
    hessian=LINEAR,
    linear_tap=True,
    mixing=mixing.dynamic_update_slice_rule,
)
_add([lax.gather_p], hessian=LINEAR, linear_tap=True, mixing=mixing.gather_rule)
_add([lax.scatter_add_p, lax.scatter_sub_p], hessian=LINEAR, mixing=mixing.scatter_rule)
_add([lax.concatenate_p], hessian=LINEAR, linear_tap=True, mixing=mixing.concatenate_rule)
_add(_recent("stack_p"), hessian=LINEAR, linear_tap=True, mixing=mixing.stack_rule)
_add(_recent("tile_p"), hessian=LINEAR, mixing=mixing.tile_rule)
_add(_recent("split_p"), hessian=LINEAR, mixing=mixing.split_rule)
_add([lax.pad_p], hessian=LINEAR, linear_tap=True, mixing=mixing.pad_rule)
_add([lax.select_n_p], hessian=LINEAR, linear_tap=True, elementwise=True, mixing=mixing.elementwise_rule)  # fmt: skip
_add([lax.rev_p], hessian=LINEAR, mixing=mixing.rev_rule)
_add([lax.reduce_window_sum_p], hessian=LINEAR, mixing=mixing.windowed_rule)
_add([lax.cumsum_p], hessian=LINEAR, mixing=mixing.cumulative_rule)
_add(
    [lax.sharding_constraint_p, lax.optimization_barrier_p, P.device_put_p],
    hessian=LINEAR,
    mixing=mixing.identity_rule,
)

# --- bilinear: linear in each operand separately ------------------------------------------------
_add([lax.mul_p], hessian=BILINEAR, linear_tap=True, elementwise=True, mixing=mixing.elementwise_rule)  # fmt: skip
_add([lax.dot_general_p], hessian=BILINEAR, linear_tap=True, rule=dense, mixing=mixing.dot_general_rule)  # fmt: skip
_add([lax.conv_general_dilated_p], hessian=BILINEAR, linear_tap=True, rule=conv, mixing=mixing.conv_rule)  # fmt: skip

# --- piecewise linear or constant ---------------------------------------------------------------
_add([lax.max_p, lax.min_p], hessian=PIECEWISE, linear_tap=True, elementwise=True, mixing=mixing.elementwise_rule)  # fmt: skip
_add(
    [
        lax.abs_p, lax.sign_p, lax.floor_p, lax.ceil_p, lax.round_p, lax.clamp_p, lax.eq_p,
        lax.ne_p, lax.lt_p, lax.le_p, lax.gt_p, lax.ge_p, lax.and_p, lax.or_p, lax.not_p,
        lax.xor_p, lax.is_finite_p, lax.nextafter_p, lax.rem_p, lax.stop_gradient_p,
    ],
    hessian=PIECEWISE,
    elementwise=True,
    mixing=mixing.elementwise_rule,
)  # fmt: skip
_add([lax.reduce_max_p, lax.reduce_min_p, lax.argmax_p, lax.argmin_p], hessian=PIECEWISE, mixing=mixing.reduction_rule)  # fmt: skip
_add([lax.cummax_p, lax.cummin_p], hessian=PIECEWISE, mixing=mixing.cumulative_rule)
_add([lax.sort_p], hessian=PIECEWISE, mixing=mixing.sort_rule)
_add([lax.top_k_p], hessian=PIECEWISE, mixing=mixing.top_k_rule)
_add([lax.iota_p], hessian=PIECEWISE)
_add([lax.select_and_gather_add_p], hessian=PIECEWISE)
_add([lax.reduce_window_min_p], hessian=PIECEWISE, mixing=mixing.windowed_rule)
_add(
    [lax.reduce_window_max_p],
    hessian=PIECEWISE,
    mixing=mixing.windowed_rule,
    evaluate=pooling.override,
)

# --- elementwise with a non-zero second derivative ----------------------------------------------
_add(
    [
        lax.tanh_p, lax.logistic_p, lax.exp_p, lax.exp2_p, lax.log_p, lax.log1p_p, lax.expm1_p,
        lax.sin_p, lax.cos_p, lax.tan_p, lax.sqrt_p, lax.rsqrt_p, lax.cbrt_p, lax.integer_pow_p,
        lax.square_p, lax.pow_p, lax.erf_p, lax.erfc_p, lax.erf_inv_p, lax.atan_p, lax.asin_p,
        lax.acos_p, lax.sinh_p, lax.cosh_p, lax.asinh_p, lax.acosh_p, lax.atanh_p, lax.atan2_p,
        lax.lgamma_p, lax.digamma_p,
    ],
    hessian=ELEMENTWISE,
    elementwise=True,
    mixing=mixing.elementwise_rule,
)  # fmt: skip
_add([lax.div_p], hessian=ELEMENTWISE, elementwise=True, linear_operands=(0,), mixing=mixing.elementwise_rule)  # fmt: skip

# --- known to the mixing detector only ----------------------------------------------------------
_add(
    [
        lax.bessel_i0e_p, lax.bessel_i1e_p, lax.clz_p, lax.igamma_p, lax.igamma_grad_a_p,
        lax.igammac_p, lax.polygamma_p, lax.population_count_p, lax.regularized_incomplete_beta_p,
        lax.shift_left_p, lax.shift_right_arithmetic_p, lax.shift_right_logical_p, lax.zeta_p,
    ],
    elementwise=True,
    mixing=mixing.elementwise_rule,
)  # fmt: skip
_add([lax.reduce_p, lax.reduce_prod_p, lax.reduce_and_p, lax.reduce_or_p, lax.reduce_xor_p], mixing=mixing.reduction_rule)  # fmt: skip
_add([lax.cumprod_p, lax.cumlogsumexp_p], mixing=mixing.cumulative_rule)
_add([lax.reduce_window_p], mixing=mixing.windowed_rule)
_add([lax.scatter_p, lax.scatter_mul_p, lax.scatter_min_p, lax.scatter_max_p], mixing=mixing.scatter_rule)  # fmt: skip
_add([lax.psum_p, lax.pmax_p, lax.pmin_p], mixing=mixing.collective_rule)

# --- random draws -------------------------------------------------------------------------------
# Every random number JAX produces comes from one of these (``jax.random`` samplers draw through
# ``random_bits``, whatever the key type or PRNG implementation). Key operations (seed, wrap,
# fold_in, split) draw nothing and are not listed: a model that builds keys without drawing is
# deterministic (flax linen builds a key from ``rngs`` even with ``deterministic=True``).
_add(
    [P.random_bits_p, P.random_gamma_p, P.threefry2x32_p, P.rng_bit_generator_p, P.rng_uniform_p],
    random=True,
)

del P

# Entries added by users (curvjax.register_rule), looked up before the built-in table. Calls to
# custom_jvp / custom_vjp functions are keyed by the called function's name and source location.
_USER: dict[Any, PrimitiveInfo] = {}
_CUSTOM_CALLS = (core_primitives.custom_jvp_call_p, core_primitives.custom_vjp_call_p)


def _custom_call_key(eqn) -> str | None:
    call = eqn.params.get("call_jaxpr")
    debug = getattr(getattr(call, "jaxpr", call), "debug_info", None)
    return getattr(debug, "func_src_info", None)


def lookup(eqn_or_primitive) -> PrimitiveInfo:
    """The entry of an equation's primitive (a user's entry first); unknown: a bare entry."""
    primitive = getattr(eqn_or_primitive, "primitive", eqn_or_primitive)
    if _USER:
        if primitive in _USER:
            return _USER[primitive]
        if primitive in _CUSTOM_CALLS:
            key = _custom_call_key(eqn_or_primitive)
            if key is not None and key in _USER:
                return _USER[key]
    info = _TABLE.get(primitive)
    return info if info is not None else PrimitiveInfo(name=primitive.name)


_ADDITIONS = frozenset({lax.add_p, core_primitives.add_jaxvals_p})


def is_addition(eqn) -> bool:
    """Whether ``eqn`` adds its operands (a bias added to a layer's output)."""
    return eqn.primitive in _ADDITIONS


def function_key(fn) -> str:
    """The key under which calls of a ``jax.custom_vjp`` / ``jax.custom_jvp`` function appear."""
    inner = getattr(fn, "fun", fn)
    code = getattr(inner, "__code__", None)
    if code is None:
        raise TypeError(
            f"register_rule needs a jax primitive or a jax.custom_vjp / jax.custom_jvp function; "
            f"got {type(fn).__name__}."
        )
    return f"{inner.__name__} at {code.co_filename}:{code.co_firstlineno}"


@contextlib.contextmanager
def _registered(key, info: PrimitiveInfo) -> Iterator[None]:
    previous = _USER.get(key)
    _USER[key] = info
    try:
        yield
    finally:
        if previous is None:
            _USER.pop(key, None)
        else:
            _USER[key] = previous


class Registration:
    """What :func:`curvjax.register_rule` returns: ``remove()`` undoes it; also a context manager."""

    def __init__(self, key, info: PrimitiveInfo):
        self._context = _registered(key, info)
        self._context.__enter__()
        self._active = True

    def remove(self) -> None:
        """Undo the registration (restoring an entry it replaced)."""
        if self._active:
            self._active = False
            self._context.__exit__(None, None, None)

    def __enter__(self) -> Registration:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def register_rule(
    primitive: Primitive | Callable,
    *,
    form: Callable | None = None,
    applies: Callable | None = None,
    hessian: str | None = None,
) -> Registration:
    """Register a fast per-example / Kronecker rule or a Hessian class for a primitive.

    A *tap* is an equation of the traced model that consumes a parameter and an activation.
    Without a rule, curvjax differentiates a tap by its own VJP, one example at a time, which is
    exact for any operation. A rule gives the tap's canonical bilinear form instead: per example
    ``n`` the activation factor ``A_n`` ``[G, T, I]`` and, for ``M`` backpropagated vectors, the
    output factor ``B_{n,m}`` ``[G, T, O]`` such that the tap's parameter gradient is

    .. math::
        g_{n,m}[g, i, o] = \\sum_t A_n[g, t, i] \\, B_{n,m}[g, t, o],

    which gives squared norms without forming ``g_n`` and Kronecker factors
    ``A = (1/(N T)) Σ_{n,t} a aᵀ``, ``B = Σ_{n,m,t} b bᵀ`` (the parameter's block in ``kfac`` /
    ``kflr`` becomes a :class:`curvjax.KroneckerBlock`).

    Args:
      primitive: a ``jax.extend.core.Primitive`` (e.g. a user's own primitive), or a
        ``jax.custom_vjp`` / ``jax.custom_jvp`` function: then every call of that function with a
        parameter input is one tap (it is no longer entered), identified by the function's name
        and source line.
      form: ``form(tap, acts, cots) -> (A [N, G, T, I], B [N, M, G, T, O], to_param)`` as a
        :class:`curvjax.BilinearForm` (``to_param`` maps ``[..., G, I, O]`` to
        ``[..., *parameter shape]``). ``tap.eqn`` is the equation (at batch size one),
        ``tap.param_positions`` / ``tap.act_positions`` the positions of its parameter and
        activation inputs; ``acts`` holds the activation inputs ``[N, *shape]``, ``cots`` the
        output cotangents ``[N, M, *shape]``.
      applies: optional ``applies(tap) -> bool``; where it is false the generic rule is used.
        Default: one parameter input and one activation input.
      hessian: the primitive's class for the exact Hessian diagonal: ``"linear"``,
        ``"bilinear"``, ``"piecewise"`` or ``"elementwise"`` (elementwise with a non-zero second
        derivative; its residual is then computed from the primitive's own derivatives).

    Returns:
      A :class:`Registration`; ``remove()`` (or leaving its ``with`` block) undoes it.

    Example:
      >>> import jax, jax.numpy as jnp, curvjax
      >>> @jax.custom_vjp
      ... def fused_dense(x, w):  # a user's fused layer
      ...     return x @ w
      >>> fused_dense.defvjp(lambda x, w: (x @ w, (x, w)), lambda r, g: (g @ r[1].T, r[0].T @ g))
      >>> def form(tap, acts, cots):
      ...     (a,), (b,) = acts, cots  # a [N, 1, I], b [N, M, 1, O]
      ...     n, m = b.shape[:2]
      ...     return curvjax.BilinearForm(a[:, None], b[:, :, None], lambda g: g[..., 0, :, :])
      >>> apply_fn = lambda p, x: fused_dense(x, p["w"])
      >>> params, x = {"w": jnp.ones((4, 3))}, jnp.ones((5, 4))
      >>> with curvjax.register_rule(fused_dense, form=form):
      ...     print(curvjax.inspect(apply_fn, params, x).leaves[0].rules)
      ('fused_dense (user rule)',)
    """
    if hessian is not None and hessian not in HESSIAN_CLASSES:
        raise ValueError(f"hessian={hessian!r}: use one of {HESSIAN_CLASSES} or None.")
    if form is None and hessian is None:
        raise ValueError("register_rule needs `form=` (a fast rule), `hessian=`, or both.")
    if isinstance(primitive, Primitive):
        key, name = primitive, primitive.name
        base = _TABLE.get(primitive, PrimitiveInfo(name=name))
    else:
        key = function_key(primitive)
        name = key.split(" at ")[0]
        base = PrimitiveInfo(name=name, mixing=mixing.call_rule("call_jaxpr"))
    rule = None
    if form is not None:
        rule = _UserRule(name, form, applies)
    info = dataclasses.replace(
        base,
        rule=rule if rule is not None else base.rule,
        hessian=hessian if hessian is not None else base.hessian,
        linear_tap=True if form is not None else base.linear_tap,
        call=base.call if isinstance(primitive, Primitive) else None,
    )
    return Registration(key, info)


@dataclasses.dataclass(frozen=True)
class _UserRule:
    name: str
    form_fn: Callable
    applies_fn: Callable | None

    def applies(self, tap) -> bool:
        if self.applies_fn is not None:
            return bool(self.applies_fn(tap))
        return len(tap.param_positions) == 1 and len(tap.act_positions) == 1

    def form(self, tap, acts, cots):
        return self.form_fn(tap, acts, cots)

    @property
    def label(self) -> str:
        return f"{self.name} (user rule)"


def rule_label(rule) -> str:
    """A short name of a fast rule for messages and :func:`curvjax.inspect`."""
    if rule is None:
        return "generic"
    return getattr(rule, "label", None) or rule.__name__.rsplit(".", 1)[-1]


# --- the interpreter ----------------------------------------------------------------------------


def called_jaxpr(eqn) -> tuple[Jaxpr, Sequence[Any]] | None:
    """``(jaxpr, consts)`` of a call-like equation that curvjax enters, else ``None``."""
    info = lookup(eqn)
    if info.call is None:
        return None
    sub = eqn.params.get(info.call.param)
    if isinstance(sub, ClosedJaxpr):
        return sub.jaxpr, sub.consts
    if isinstance(sub, Jaxpr):
        return sub, ()
    return None


def walk(
    jaxpr: Jaxpr,
    consts: Sequence[Any],
    args: Sequence[Any],
    step: Callable[[int, Any, list], Sequence[Any]],
    *,
    literal: Callable[[Literal], Any] = lambda atom: atom.val,
    default: Any = None,
) -> list:
    """Run ``step(index, eqn, input values) -> output values`` over the equations of ``jaxpr``.

    The environment maps variables to whatever the caller computes (arrays, dependency
    descriptions, strides); literals become ``literal(atom)``, variables never written read as
    ``default``. ``step`` enters calls itself, by calling :func:`walk` on :func:`called_jaxpr`.
    """
    env: dict = {}
    for var, val in zip(jaxpr.constvars, consts, strict=True):
        env[var] = val
    for var, val in zip(jaxpr.invars, args, strict=True):
        env[var] = val

    def read(atom):
        if isinstance(atom, Literal):
            return literal(atom)
        return env.get(atom, default)

    for index, eqn in enumerate(jaxpr.eqns):
        outs = step(index, eqn, [read(v) for v in eqn.invars])
        for var, val in zip(eqn.outvars, outs, strict=True):
            env[var] = val
    return [read(v) for v in jaxpr.outvars]


def bind(eqn, invals: Sequence[Any]) -> list[Any]:
    """Apply ``eqn``'s primitive to ``invals``; always returns a list of outputs."""
    params = eqn.primitive.get_bind_params(eqn.params)
    with eqn.ctx.manager:
        out = eqn.primitive.bind(*invals, **params)
    return list(out) if eqn.primitive.multiple_results else [out]


where = mixing.source_line


def describe(eqn, fallback: str = "") -> str:
    """``primitive at file:line`` for messages (``fallback``: the line of an enclosing call)."""
    return f"`{eqn.primitive.name}` at {where(eqn) or fallback or 'unknown location'}"


def _nested_jaxprs(eqn) -> Iterator[Jaxpr]:
    """Every jaxpr in an equation's parameters (calls, ``cond`` branches, ``scan`` / ``while``)."""
    for value in eqn.params.values():
        for item in value if isinstance(value, (tuple, list)) else (value,):
            if isinstance(item, ClosedJaxpr):
                yield item.jaxpr
            elif isinstance(item, Jaxpr):
                yield item


def random_draws(jaxpr: Jaxpr, fallback: str = "") -> list[str]:
    """Descriptions of the equations of ``jaxpr`` that draw random numbers, nested ones included.

    An equation without a source line of its own gets that of its innermost enclosing call.
    """
    found = []
    for eqn in jaxpr.eqns:
        if lookup(eqn).random:
            found.append(describe(eqn, fallback))
        for sub in _nested_jaxprs(eqn):
            found += random_draws(sub, where(eqn) or fallback)
    return list(dict.fromkeys(found))


def check_deterministic(jaxpr: Jaxpr) -> None:
    """Raise if the model's ``jaxpr`` draws random numbers (dropout, noise on activations).

    curvjax evaluates the model one example at a time; a random draw there is not the draw that
    example gets in the batch (a dropout mask drawn at batch size one is the same mask for every
    example), so every per-example quantity, and even the loss, would silently differ from those
    of the user's batch function.
    """
    draws = random_draws(jaxpr)
    if draws:
        lines = "\n".join(f"  - {line}" for line in draws)
        raise ValueError(
            "apply_fn draws random numbers:\n"
            f"{lines}\n"
            "curvjax evaluates the model one example at a time, where an example's random draws "
            "differ from those it gets in the batch (a dropout mask drawn at batch size one), so "
            "every per-example quantity would silently differ from your batch function's. Make "
            "apply_fn deterministic for curvjax: flax linen `nn.Dropout(..., deterministic=True)` "
            "(and no 'dropout' rng), flax nnx `model.eval()`, equinox `inference=True`, no "
            "`jax.random` calls on activations. To keep the randomness, draw it outside apply_fn "
            "and pass it per example through `inputs` (e.g. `inputs = (x, dropout_mask)` with the "
            "mask `[N, ...]`): then every quantity is that of the masked model. Or compute "
            "per-example gradients with `jax.vmap(jax.grad(loss))` over keys split per example "
            "(`jax.random.split(key, N)`)."
        )
