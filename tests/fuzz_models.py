"""Random models from a small grammar, for property-based tests of every quantity (hypothesis).

A model is described by a :class:`Spec`: plain tuples (printable, hashable, so a shrunk failure is
a one-line reproducer) that :func:`build` turns into ``(apply_fn, params, batch)``. The grammar:

* inputs: a float vector ``[d]``, a float sequence ``[T, d]``, a float image ``[H, W, c]`` or int32
  tokens ``[T]`` (then the first layer is an embedding gather);
* layers (each example's activation is a vector, a sequence or an image):
  ``dense`` (on the last axis, optional bias), ``act`` (tanh, sigmoid, relu, gelu, softplus, and a
  ``custom_jvp`` swish), ``conv`` (1-D on sequences, 2-D on images, ``lax.conv_general_dilated``
  with random strides, padding, kernel dilation and feature groups), ``residual``
  (``x + W₂ σ(W₁ x)``), ``concat`` (``[x, σ(W x)]``), ``layernorm``, ``pool`` (avg / max via
  ``lax.reduce_window``), ``attention`` (``softmax(q kᵀ/√h) v`` over the positions), ``transpose``
  (swap the two position axes of an image, or position and feature axes of a sequence),
  ``reshape`` (image -> sequence, sequence -> vector, vector -> sequence), ``tied`` (one square
  kernel used twice: ``W σ(W x)``), and ``wrap`` (``jax.jit`` / ``jax.checkpoint`` around a
  sub-list of layers, nestable);
* heads: ``dense`` (positions averaged or flattened first) or ``tied_embed`` (logits
  ``h Eᵀ`` with the input embedding ``E``, so ``C`` is the vocabulary);
* losses ``cross_entropy`` / ``mse`` × reductions ``mean`` / ``sum``.

Parameters and inputs are float64 from a numpy Generator (``seed``): ``jax.random`` would compile a
kernel per shape. Sizes are tiny (``N = 3``, widths ≤ 6) so each model compiles in a moment.
:func:`productions` counts the grammar's productions used by a spec (for the histogram the long
run records).
"""

from __future__ import annotations

import collections
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import strategies as st
from jax import lax

N = 3  #: batch size of every fuzzed model
MAX_WIDTH = 6  #: largest feature width
ACTIVATIONS = ("tanh", "sigmoid", "relu", "gelu", "softplus", "swish_custom_jvp")
LOSSES = ("cross_entropy", "mse")
REDUCTIONS = ("mean", "sum")


class Spec(NamedTuple):
    """A random model: its input, layers, head, loss, reduction and the numpy seed of its values.

    ``inputs`` is ``("vec", d)``, ``("seq", T, d)``, ``("img", H, W, c)`` or ``("tokens", T, V, d)``
    (``V`` the vocabulary, ``d`` the embedding width). ``layers`` is a tuple of tuples
    ``(name, *arguments)`` (see :func:`_layer`); ``head`` is ``("dense", C, pool)`` with ``pool``
    ``"mean"`` or ``"flatten"``, or ``("tied_embed",)``.
    """

    inputs: tuple
    layers: tuple
    head: tuple
    loss: str
    reduction: str
    seed: int


# ---------------------------------------------------------------------------------------------
# the strategy


def _out_len(length: int, k: int, stride: int, padding, dilation: int) -> int:
    span = dilation * (k - 1) + 1
    if padding == "SAME":
        return -(-length // stride)
    lo, hi = (0, 0) if padding == "VALID" else padding
    return (length + lo + hi - span) // stride + 1


@st.composite
def _conv(draw, shape):
    """A conv layer for activation ``shape`` (``(T, c)`` or ``(H, W, c)``); None if none fits."""
    *spatial, c_in = shape
    groups = draw(st.sampled_from([g for g in (1, 2, 3) if c_in % g == 0]))
    c_out = groups * draw(st.integers(1, MAX_WIDTH // groups))
    kernel, strides, dilations, paddings = [], [], [], []
    for length in spatial:
        k = draw(st.integers(1, min(3, length)))
        dilation = draw(st.integers(1, 2)) if k > 1 else 1
        stride = draw(st.integers(1, 2))
        kind = draw(st.sampled_from(["VALID", "SAME", "explicit"]))
        padding = (draw(st.integers(0, 1)), draw(st.integers(0, 1))) if kind == "explicit" else kind
        if _out_len(length, k, stride, padding, dilation) < 1:
            k, dilation, padding = 1, 1, "VALID"
        kernel.append(k)
        strides.append(stride)
        dilations.append(dilation)
        paddings.append(padding)
    # one padding mode for all axes when it is a string (lax's API); explicit pairs per axis
    if all(isinstance(p, tuple) for p in paddings):
        padding = tuple(paddings)
    elif paddings.count(paddings[0]) == len(paddings) and isinstance(paddings[0], str):
        padding = paddings[0]
    else:
        padding = tuple(p if isinstance(p, tuple) else (0, 0) for p in paddings)
        if any(
            _out_len(n, k, s, p, d) < 1
            for n, k, s, p, d in zip(spatial, kernel, strides, padding, dilations, strict=True)
        ):
            padding = "SAME"
    bias = draw(st.booleans())
    return ("conv", tuple(kernel), tuple(strides), padding, tuple(dilations), groups, c_out, bias)


def conv_out_shape(shape: tuple, layer: tuple) -> tuple:
    _, kernel, strides, padding, dilations, _, c_out, _ = layer
    *spatial, _ = shape
    pads = [padding] * len(spatial) if isinstance(padding, str) else list(padding)
    out = [
        _out_len(n, k, s, p, d)
        for n, k, s, p, d in zip(spatial, kernel, strides, pads, dilations, strict=True)
    ]
    return (*out, c_out)


def next_shape(shape: tuple, layer: tuple) -> tuple:
    """The per-example activation shape after ``layer``."""
    name = layer[0]
    if name in ("dense", "custom_jvp_dense"):
        return (*shape[:-1], layer[1])
    if name == "conv":
        return conv_out_shape(shape, layer)
    if name == "concat":
        return (*shape[:-1], shape[-1] + layer[1])
    if name == "pool":
        _, _, window, stride = layer
        return (*[(n - window) // stride + 1 for n in shape[:-1]], shape[-1])
    if name == "attention":
        return (shape[0], layer[1])
    if name == "transpose":
        return (shape[1], shape[0]) if len(shape) == 2 else (shape[1], shape[0], shape[2])
    if name == "reshape":
        return layer[1]
    if name == "wrap":
        for inner in layer[2]:
            shape = next_shape(shape, inner)
        return shape
    return shape  # act, residual, layernorm, tied


@st.composite
def _layer(draw, shape: tuple, depth: int):
    """One layer that accepts activations of per-example ``shape``."""
    d = shape[-1]
    spatial = shape[:-1]
    options = ["dense", "act", "residual", "layernorm", "tied", "custom_jvp_dense"]
    if d < MAX_WIDTH:
        options.append("concat")
    if len(shape) in (2, 3):
        options += ["conv", "conv", "transpose", "reshape"]
        if min(spatial) >= 2:
            options.append("pool")
    if len(shape) == 1 and d >= 2 and d % 2 == 0:
        options.append("reshape")
    if len(shape) == 2:
        options.append("attention")
    if depth < 2:
        options.append("wrap")
    name = draw(st.sampled_from(options))
    act = st.sampled_from(ACTIVATIONS)
    width = st.integers(1, MAX_WIDTH)
    if name == "dense":
        return ("dense", draw(width), draw(st.booleans()))
    if name == "act":
        return ("act", draw(act))
    if name == "residual":
        return ("residual", draw(width), draw(act))
    if name == "layernorm":
        return ("layernorm",)
    if name == "custom_jvp_dense":
        return ("custom_jvp_dense", draw(width))
    if name == "tied":
        return ("tied", draw(act))
    if name == "concat":
        return ("concat", draw(st.integers(1, MAX_WIDTH - d)), draw(act))
    if name == "conv":
        return draw(_conv(shape))
    if name == "pool":
        window = 2
        stride = draw(st.integers(1, 2))
        return ("pool", draw(st.sampled_from(["avg", "max"])), window, stride)
    if name == "attention":
        return ("attention", draw(st.integers(1, 4)))
    if name == "transpose":
        if len(shape) == 2 and shape[0] > MAX_WIDTH:
            return ("act", draw(act))
        return ("transpose",)
    if name == "reshape":
        if len(shape) == 3:
            return ("reshape", (shape[0] * shape[1], d))
        if len(shape) == 2:
            if shape[0] * d > 2 * MAX_WIDTH:
                return ("act", draw(act))
            return ("reshape", (shape[0] * d,))
        return ("reshape", (2, d // 2))
    # wrap: jit / checkpoint around one or two layers
    kind = draw(st.sampled_from(["jit", "remat"]))
    inner = []
    inner_shape = shape
    for _ in range(draw(st.integers(1, 2))):
        layer = draw(_layer(inner_shape, depth + 1))
        inner.append(layer)
        inner_shape = next_shape(inner_shape, layer)
    return ("wrap", kind, tuple(inner))


def _size(shape: tuple) -> int:
    return math.prod(shape)


@st.composite
def specs(draw, min_layers: int = 0, max_layers: int = 4) -> Spec:
    """A hypothesis strategy of :class:`Spec` with ``min_layers`` to ``max_layers`` layers (fewer
    where a drawn layer would make the activations too large and is dropped)."""
    kind = draw(st.sampled_from(["vec", "seq", "img", "tokens"]))
    if kind == "vec":
        inputs = ("vec", draw(st.integers(1, 5)))
        shape = inputs[1:]
    elif kind == "seq":
        inputs = ("seq", draw(st.integers(2, 4)), draw(st.integers(1, 3)))
        shape = inputs[1:]
    elif kind == "img":
        inputs = ("img", draw(st.integers(2, 4)), draw(st.integers(2, 4)), draw(st.integers(1, 3)))
        shape = inputs[1:]
    else:
        inputs = (
            "tokens",
            draw(st.integers(2, 4)),
            draw(st.integers(3, 6)),
            draw(st.integers(2, 4)),
        )
        shape = (inputs[1], inputs[3])
    layers = []
    for _ in range(draw(st.integers(min_layers, max_layers))):
        layer = draw(_layer(shape, 0))
        new_shape = next_shape(shape, layer)
        if _size(new_shape) > 48:  # keep the models tiny
            continue
        layers.append(layer)
        shape = new_shape
    loss = draw(st.sampled_from(LOSSES))
    reduction = draw(st.sampled_from(REDUCTIONS))
    head_options = ["dense"]
    if kind == "tokens" and len(shape) == 2 and shape[-1] == inputs[3]:
        head_options.append("tied_embed")
    head_kind = draw(st.sampled_from(head_options))
    if head_kind == "tied_embed":
        head = ("tied_embed",)
    else:
        pool = "flatten" if len(shape) > 1 and _size(shape) <= 24 else "mean"
        if len(shape) > 1:
            pool = draw(st.sampled_from(sorted({pool, "mean"})))
        head = ("dense", draw(st.integers(2, 3)), pool)
    seed = draw(st.integers(0, 2**32 - 1))
    return Spec(inputs, tuple(layers), head, loss, reduction, seed)


# ---------------------------------------------------------------------------------------------
# building


@jax.custom_jvp
def swish(x):
    """``x σ(x)`` with a hand-written JVP rule (a user-defined ``custom_jvp``)."""
    return x * jax.nn.sigmoid(x)


@swish.defjvp
def _swish_jvp(primals, tangents):
    (x,), (t,) = primals, tangents
    s = jax.nn.sigmoid(x)
    return x * s, (s + x * s * (1.0 - s)) * t


@jax.custom_jvp
def tanh_dense(w, x):
    """``tanh(x w)`` over the last axis, with a hand-written JVP rule in both arguments (a
    ``custom_jvp`` wrapper around a whole layer, its parameters inside)."""
    return jnp.tanh(jnp.einsum("...i,io->...o", x, w))


@tanh_dense.defjvp
def _tanh_dense_jvp(primals, tangents):
    (w, x), (dw, dx) = primals, tangents
    y = tanh_dense(w, x)
    dz = jnp.einsum("...i,io->...o", dx, w) + jnp.einsum("...i,io->...o", x, dw)
    return y, (1.0 - y**2) * dz


_ACT: dict[str, Callable] = {
    "tanh": jnp.tanh,
    "sigmoid": jax.nn.sigmoid,
    "relu": jax.nn.relu,
    "gelu": jax.nn.gelu,
    "softplus": jax.nn.softplus,
    "swish_custom_jvp": swish,
}


def _bcast(b: jax.Array, ndim: int) -> jax.Array:
    """Lift a ``[d]`` bias to rank ``ndim`` explicitly (the tests forbid rank promotion)."""
    return jnp.reshape(b, (1,) * (ndim - 1) + (b.shape[-1],))


def _linear(x, w, b=None):
    y = jnp.einsum("...i,io->...o", x, w)
    return y if b is None else y + _bcast(b, y.ndim)


class _Builder:
    def __init__(self, rng: np.random.Generator):
        self.rng = rng
        self.params: dict[str, jax.Array] = {}

    def new(self, shape: tuple, fan_in: int | None = None, bias: bool = False) -> str:
        name = f"p{len(self.params)}"
        values = self.rng.standard_normal(shape)
        if fan_in is not None:
            values = values / np.sqrt(max(fan_in, 1))
        elif bias:
            values = 0.3 * values
        self.params[name] = jnp.asarray(values, jnp.float64)
        return name

    def dense(self, d_in, d_out, bias=True):
        w = self.new((d_in, d_out), fan_in=d_in)
        b = self.new((d_out,), bias=True) if bias else None
        return lambda p, x: _linear(x, p[w], None if b is None else p[b])

    def layer(self, shape: tuple, layer: tuple) -> Callable:
        """``f(params, x)`` for batched ``x`` ``[N, *shape]``."""
        name, *args = layer
        d = shape[-1]
        if name == "dense":
            return self.dense(d, args[0], args[1])
        if name == "act":
            return lambda p, x, f=_ACT[args[0]]: f(x)
        if name == "residual":
            width, act = args
            f1, f2 = self.dense(d, width), self.dense(width, d)
            return lambda p, x: x + f2(p, _ACT[act](f1(p, x)))
        if name == "concat":
            width, act = args
            f = self.dense(d, width)
            return lambda p, x: jnp.concatenate([x, _ACT[act](f(p, x))], axis=-1)
        if name == "layernorm":
            scale = self.new((d,), bias=True)
            self.params[scale] = self.params[scale] + 1.0
            shift = self.new((d,), bias=True)

            def layernorm(p, x):
                mean = jnp.mean(x, axis=-1, keepdims=True)
                var = jnp.mean((x - mean) ** 2, axis=-1, keepdims=True)
                y = (x - mean) * lax.rsqrt(var + 1e-5)
                return y * _bcast(p[scale], x.ndim) + _bcast(p[shift], x.ndim)

            return layernorm
        if name == "custom_jvp_dense":
            w = self.new((d, args[0]), fan_in=d)
            return lambda p, x: tanh_dense(p[w], x)
        if name == "tied":
            w = self.new((d, d), fan_in=d)
            act = _ACT[args[0]]
            return lambda p, x: _linear(act(_linear(x, p[w])), p[w])
        if name == "conv":
            kernel, strides, padding, dilations, groups, c_out, bias = args
            w = self.new((*kernel, d // groups, c_out), fan_in=math.prod(kernel) * d // groups)
            b = self.new((c_out,), bias=True) if bias else None
            spec = ("NWC", "WIO", "NWC") if len(kernel) == 1 else ("NHWC", "HWIO", "NHWC")

            def conv(p, x):
                y = lax.conv_general_dilated(
                    x,
                    p[w],
                    window_strides=strides,
                    padding=padding,
                    rhs_dilation=dilations,
                    dimension_numbers=spec,
                    feature_group_count=groups,
                )
                return y if b is None else y + _bcast(p[b], y.ndim)

            return conv
        if name == "pool":
            kind, window, stride = args
            spatial = len(shape) - 1
            dims = (1, *(window,) * spatial, 1)
            steps = (1, *(stride,) * spatial, 1)
            if kind == "max":
                return lambda p, x: lax.reduce_window(x, -jnp.inf, lax.max, dims, steps, "VALID")
            size = float(window**spatial)
            return lambda p, x: lax.reduce_window(x, 0.0, lax.add, dims, steps, "VALID") / size
        if name == "attention":
            h = args[0]
            q, k, v = (self.dense(d, h) for _ in range(3))

            def attention(p, x):
                scores = jnp.einsum("ntd,nsd->nts", q(p, x), k(p, x)) / np.sqrt(h)
                return jnp.einsum("nts,nsd->ntd", jax.nn.softmax(scores, axis=-1), v(p, x))

            return attention
        if name == "transpose":
            axes = (0, 2, 1) if len(shape) == 2 else (0, 2, 1, 3)
            return lambda p, x: jnp.transpose(x, axes)
        if name == "reshape":
            target = args[0]
            return lambda p, x: jnp.reshape(x, (x.shape[0], *target))
        if name == "wrap":
            kind, inner = args
            fns = []
            for sub in inner:
                fns.append(self.layer(shape, sub))
                shape = next_shape(shape, sub)

            def block(p, x):
                for f in fns:
                    x = f(p, x)
                return x

            return jax.jit(block) if kind == "jit" else jax.checkpoint(block)
        raise ValueError(f"unknown layer {layer!r}")


def build(spec: Spec) -> tuple[Callable, dict[str, jax.Array], tuple, int]:
    """``(apply_fn, params, batch, num_classes)`` of a spec; ``batch = (inputs, targets)``."""
    rng = np.random.default_rng(spec.seed)
    builder = _Builder(rng)
    kind = spec.inputs[0]
    fns = []
    if kind == "tokens":
        _, length, vocab, width = spec.inputs
        table = builder.new((vocab, width), fan_in=1)
        fns.append(lambda p, x: jnp.take(p[table], x, axis=0))
        inputs = jnp.asarray(rng.integers(0, vocab, (N, length)), jnp.int32)
        shape = (length, width)
    else:
        shape = spec.inputs[1:]
        inputs = jnp.asarray(rng.standard_normal((N, *shape)), jnp.float64)
    for layer in spec.layers:
        fns.append(builder.layer(shape, layer))
        shape = next_shape(shape, layer)
    if spec.head[0] == "tied_embed":
        num_classes = spec.inputs[2]

        def head(p, x):
            return jnp.einsum("nd,vd->nv", jnp.mean(x, axis=1), p[table])

    else:
        num_classes, pool = spec.head[1], spec.head[2]
        if len(shape) == 1:
            pool = "flatten"
        d_in = _size(shape) if pool == "flatten" else shape[-1]
        out = builder.dense(d_in, num_classes)

        def head(p, x):
            if x.ndim > 2:
                if pool == "flatten":
                    x = jnp.reshape(x, (x.shape[0], -1))
                else:
                    x = jnp.mean(x, axis=tuple(range(1, x.ndim - 1)))
            return out(p, x)

    fns.append(head)

    def apply_fn(params, x):
        for f in fns:
            x = f(params, x)
        return x

    if spec.loss == "cross_entropy":
        targets = jnp.asarray(rng.integers(0, num_classes, (N,)), jnp.int32)
    else:
        targets = jnp.asarray(rng.standard_normal((N, num_classes)), jnp.float64)
    return apply_fn, builder.params, (inputs, targets), num_classes


def productions(spec: Spec) -> collections.Counter:
    """How often each production of the grammar occurs in ``spec`` (for the fuzzing histogram)."""
    counts: collections.Counter = collections.Counter()
    counts[f"input:{spec.inputs[0]}"] += 1
    counts[f"loss:{spec.loss}"] += 1
    counts[f"reduction:{spec.reduction}"] += 1
    counts[f"head:{spec.head[0]}" + (f":{spec.head[2]}" if spec.head[0] == "dense" else "")] += 1

    def visit(layers):
        for layer in layers:
            name = layer[0]
            counts[f"layer:{name}"] += 1
            if name in ("act", "tied"):
                counts[f"activation:{layer[1]}"] += 1
            elif name in ("residual", "concat"):
                counts[f"activation:{layer[2]}"] += 1
            elif name == "pool":
                counts[f"pool:{layer[1]}"] += 1
            elif name == "wrap":
                counts[f"wrap:{layer[1]}"] += 1
                visit(layer[2])
            elif name == "conv":
                _, kernel, strides, padding, dilations, groups, _, _ = layer
                counts[f"conv:{len(kernel)}d"] += 1
                if max(strides) > 1:
                    counts["conv:strided"] += 1
                if max(dilations) > 1:
                    counts["conv:dilated"] += 1
                if groups > 1:
                    counts["conv:grouped"] += 1
                counts[f"conv:padding:{padding if isinstance(padding, str) else 'explicit'}"] += 1
            elif name == "reshape":
                counts[f"reshape:to{len(layer[1])}d"] += 1

    visit(spec.layers)
    return counts


def describe(spec: Spec) -> dict[str, Any]:
    """A JSON-friendly form of a spec."""
    return {k: repr(v) if isinstance(v, tuple) else v for k, v in spec._asdict().items()}


# ---------------------------------------------------------------------------------------------
# the properties

#: Relative tolerance of every comparison: ``max |value - reference| <= RTOL * scale`` per leaf,
#: ``scale`` the largest magnitude of the reference (of the whole quantity, so a leaf that is
#: exactly zero in the reference is held to the same absolute bound). Both sides are float64 sums
#: of at most a few hundred terms of tiny models, with rounding errors ~1e-15 relative; 1e-9
#: leaves a wide margin for reassociation and for the cancellation in the variance (whose scale
#: is taken from E[g²] instead) while any formula error (a missing term, a wrong factor) shows up
#: at O(1).
RTOL = 1e-9

QUANTITIES = (
    "per_example_grads",
    "batch_l2",
    "variance",
    "ggn_diag",
    "clipped_grad",
    "kflr",
    "kfac",
    "hessian_diag",
)


class Mismatch(AssertionError):
    """A quantity disagrees with its float64 reference (or raised where it must not)."""


def _compare(name: str, value: Any, reference: Any, scale: float | None = None) -> float:
    """Check leaf by leaf; return the largest error relative to ``scale``."""
    values, references = jax.tree.leaves(value), jax.tree.leaves(reference)
    if len(values) != len(references):
        raise Mismatch(f"{name}: {len(values)} leaves, reference has {len(references)}")
    if scale is None:
        scale = max((float(np.max(np.abs(r))) for r in references if np.size(r)), default=0.0)
    scale = max(scale, 1e-300)
    worst = 0.0
    for v, r in zip(values, references, strict=True):
        v, r = np.asarray(v), np.asarray(r)
        if v.shape != r.shape:
            raise Mismatch(f"{name}: shape {v.shape}, reference {r.shape}")
        if not np.all(np.isfinite(v)):
            raise Mismatch(f"{name}: non-finite values")
        error = float(np.max(np.abs(v - r), initial=0.0)) / scale
        worst = max(worst, error)
    if worst > RTOL:
        raise Mismatch(f"{name}: relative error {worst:.3e} > {RTOL:g}")
    return worst


def _check_blocks(name: str, blocks: Any) -> float:
    """Kronecker-factored blocks: finite, symmetric and positive semi-definite (as ``[D, D]``)."""
    import curvjax

    dense = np.asarray(curvjax.blocks_to_dense(blocks))
    if not np.all(np.isfinite(dense)):
        raise Mismatch(f"{name}: non-finite block entries")
    scale = max(float(np.max(np.abs(dense), initial=0.0)), 1e-300)
    asym = float(np.max(np.abs(dense - dense.T), initial=0.0)) / scale
    if asym > RTOL:
        raise Mismatch(f"{name}: asymmetric (relative {asym:.3e})")
    # eigenvalues of a PSD matrix computed in float64 are >= -O(eps * ||M|| * D)
    low = float(np.min(np.linalg.eigvalsh(0.5 * (dense + dense.T)), initial=0.0)) / scale
    if low < -RTOL:
        raise Mismatch(f"{name}: not positive semi-definite (relative eigenvalue {low:.3e})")
    return asym


def check(spec: Spec, quantities: tuple[str, ...] = QUANTITIES) -> dict[str, Any]:
    """Every quantity of ``spec``'s model against its float64 reference.

    Returns ``{quantity: largest relative error}``, with ``"refused"`` for an exact Hessian
    diagonal that raised its documented ``ValueError``; raises :class:`Mismatch` on a wrong
    number, and lets any other exception through (curvjax must not raise on these models).
    """
    import reference as ref

    import curvjax

    apply_fn, params, batch, _ = build(spec)
    loss, reduction = spec.loss, spec.reduction
    kw = dict(loss=loss, reduction=reduction)
    out: dict[str, Any] = {}
    need_g = {"per_example_grads", "batch_l2", "variance"} & set(quantities)
    g_ref = ref.per_example_grads(apply_fn, params, batch, loss, reduction) if need_g else None
    if "per_example_grads" in quantities:
        value = curvjax.per_example_grads(apply_fn, params, batch, **kw)
        out["per_example_grads"] = _compare("per_example_grads", value, g_ref)
    if "batch_l2" in quantities:
        expected = jax.tree.map(lambda a: np.sum(np.reshape(a, (N, -1)) ** 2, axis=1), g_ref)
        value = curvjax.batch_l2(apply_fn, params, batch, **kw)
        out["batch_l2"] = _compare("batch_l2", value, expected)
    if "variance" in quantities:
        g = jax.tree.map(np.asarray, g_ref)
        expected = jax.tree.map(lambda a: np.mean(a**2, 0) - np.mean(a, 0) ** 2, g)
        scale = max(float(np.max(np.mean(a**2, 0))) for a in jax.tree.leaves(g))
        value = curvjax.variance(apply_fn, params, batch, **kw)
        out["variance"] = _compare("variance", value, expected, scale)
    if "ggn_diag" in quantities:
        value = curvjax.ggn_diag(apply_fn, params, batch, **kw)
        out["ggn_diag"] = _compare("ggn_diag", value, ref.ggn_diag(apply_fn, params, batch, **kw))
    if "clipped_grad" in quantities:
        # the unscaled per-example gradients, clipped at their median norm (so some are clipped)
        g = jax.tree.map(np.asarray, ref.per_example_grads(apply_fn, params, batch, loss, "sum"))
        norms = np.sqrt(sum(np.sum(np.reshape(a, (N, -1)) ** 2, 1) for a in jax.tree.leaves(g)))
        clip = float(np.median(norms))
        factor = np.minimum(1.0, clip / np.maximum(norms, 1e-300))
        expected = jax.tree.map(lambda a: np.tensordot(factor, a, axes=1), g)
        value = curvjax.clipped_grad(apply_fn, params, batch, clip_norm=clip, loss=loss)
        out["clipped_grad"] = max(
            _compare("clipped_grad.grad", value.grad, expected),
            _compare("clipped_grad.norms", value.norms, norms),
        )
    if "kflr" in quantities:
        out["kflr"] = _check_blocks("kflr", curvjax.kflr(apply_fn, params, batch, **kw))
    if "kfac" in quantities:
        blocks = curvjax.kfac(apply_fn, params, batch, key=jax.random.key(0), **kw)
        out["kfac"] = _check_blocks("kfac", blocks)
    if "hessian_diag" in quantities:
        try:
            value = curvjax.hessian_diag(apply_fn, params, batch, **kw)
        except ValueError as error:
            if "hutchinson" not in str(error):
                raise
            out["hessian_diag"] = "refused"
        else:
            expected = ref.hessian_diag(apply_fn, params, batch, **kw)
            out["hessian_diag"] = _compare("hessian_diag", value, expected)
    return out
