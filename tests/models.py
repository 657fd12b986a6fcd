"""A zoo of tiny models used by every exactness test.

Each entry of :data:`CASES` is a zero-argument function building a :class:`Case`; use
:func:`get_case` to build (and cache) one by name, and :func:`case_names` to select cases by tag
(tags are static, in :data:`TAGS`, so selecting builds nothing).  Every case has batch size
``N = 5`` (not a power of two, so that axis mix-ups show), float64 parameters and inputs (int32
tokens where stated), built deterministically: the parameter structure comes from the framework
(``init`` under ``jax.eval_shape``), the values from numpy Generators seeded by the case name (see
:func:`fill`), so biases are nonzero and norm scales are not 1, and zero-init does not hide bugs.

``apply_fn(params, inputs)`` returns outputs of shape ``[N, num_classes]``; ``num_classes`` is 3
except for ``tied_embed`` (7, the vocabulary).  No model relies on implicit rank promotion.

Tags (a case may carry several):

* framework: ``"linen"`` (params are the variables dict ``{"params": ...}``), ``"nnx"``,
  ``"equinox"``, ``"plain"`` (hand-written ``jnp`` on a dict of arrays).
* layer kinds: ``"dense"``, ``"conv"``, ``"conv1d"``, ``"pool"``, ``"residual"``, ``"layernorm"``,
  ``"batchnorm"``, ``"attention"``, ``"embed"``, ``"tied"`` (one weight used twice), ``"scan"``.
* ``"chain"``: a feed-forward chain of dense layers with elementwise activations in between (no
  weight sharing, no skip connections): the structure KFRA and block-tridiagonal K-FAC assume.
* ``"single_layer"``: exactly one dense layer (multinomial logistic / linear regression).
* ``"relu"``: has ReLU or max-pool kinks (so it is not ``"smooth"``).
* ``"piecewise_linear"``: every output is, locally, affine in the parameters of each single layer
  (ReLU / max-pool / avg-pool / identity activations, every weight used once).  For these models
  the Hessian and the GGN have equal diagonals and equal per-leaf diagonal blocks; the full
  matrices still differ in the cross-layer blocks unless the model has a single layer.
* ``"linear"``: no activation at all (deep linear network or a single layer).
* ``"smooth"``: every operation is smooth (C^2) at the evaluation point; finite differences and
  Hessian residual terms apply.
* ``"mixes_examples"``: outputs of one example depend on other examples (BatchNorm with batch
  statistics); per-example quantities are undefined.
* ``"int_inputs"``: the inputs are int32 token ids ``[N, T]``.
* ``"int_leaf"``: ``params`` holds non-float (int32) leaves that must be skipped.
* ``"nested_jit"``, ``"remat"``, ``"custom_jvp"``, ``"custom_vjp"``: the jaxpr contains a nested
  ``jit`` equation (the primitive JAX 0.10 calls ``jit``, formerly ``pjit``), a ``remat2``
  (``jax.checkpoint``), or a user-defined ``custom_jvp_call`` / ``custom_vjp_call``.  Untagged
  cases have them too: ``jax.nn.relu`` is ``custom_jvp_call(jit(max))``, ``jax.nn.softplus`` is
  ``jit(custom_jvp_call(logaddexp))``, and flax ``Embed`` does its ``gather`` inside a nested
  ``jit`` (``jnp.take``).
* ``"no_forward_mode"``: forward-mode autodiff (``jax.jvp``, ``jax.jacfwd``, ``jax.hessian``) of
  ``apply_fn`` raises (``custom_vjp``); second derivatives need reverse-over-reverse.
"""

from __future__ import annotations

import functools
import zlib
from collections.abc import Callable
from typing import Any, NamedTuple

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

N = 5  #: batch size of every case
NUM_CLASSES = 3  #: number of outputs of every case but ``tied_embed``
LOSSES = ("cross_entropy", "mse")
REDUCTIONS = ("mean", "sum")


class Case(NamedTuple):
    """One small model with its parameters and a batch of inputs."""

    name: str
    apply_fn: Callable  # apply_fn(params, inputs) -> [N, num_classes]
    params: Any  # pytree; float64 leaves (plus int32 leaves only for tag "int_leaf")
    inputs: Any  # array or pytree of arrays with leading axis N
    num_classes: int  # C
    tags: frozenset[str]


#: name -> zero-argument builder of the :class:`Case` (filled by ``_register``; table order)
CASES: dict[str, Callable[[], Case]] = {}
#: name -> tags, available without building the case
TAGS: dict[str, frozenset[str]] = {}


def _register(name: str, *tags: str):
    """Decorator: register ``builder(name) -> (apply_fn, params, inputs[, num_classes])``."""

    def decorator(builder):
        @functools.wraps(builder)
        def build() -> Case:
            apply_fn, params, inputs, *rest = builder(name)
            num_classes = rest[0] if rest else NUM_CLASSES
            return Case(name, apply_fn, params, inputs, num_classes, TAGS[name])

        CASES[name] = build
        TAGS[name] = frozenset(tags)
        return build

    return decorator


# ---------------------------------------------------------------------------------------------
# helpers
#
# Values come from numpy Generators seeded by the case name, not from the frameworks' initialisers:
# jax.random compiles a threefry kernel for every new shape (about 0.2 s each on CPU, minutes for
# the zoo), while building the structure with ``jax.eval_shape`` and filling it from numpy costs
# nothing.  The fill is already "away from init": biases are nonzero and norm scales are not 1.


def _seed(name: str) -> int:
    """A deterministic seed from a name (Python's ``hash`` of a str is salted per process)."""
    return zlib.crc32(name.encode())


def _rng(name: str, salt: str) -> np.random.Generator:
    return np.random.default_rng(_seed(name + "/" + salt))


def fill(name: str, shapes: Any, out_axis: int = -1) -> Any:
    """Replace every leaf of ``shapes`` (arrays or ``jax.ShapeDtypeStruct``) by float64 values.

    Leaves with ``ndim >= 2`` (kernels, embeddings) get ``normal / sqrt(fan_in)`` with
    ``fan_in = size / shape[out_axis]`` (``out_axis=-1`` for flax layouts, ``0`` for equinox);
    1-D and scalar leaves get ``0.3 * normal``, plus 1 if their path contains ``"scale"``
    (LayerNorm / BatchNorm scales).
    """
    rng = _rng(name, "params")

    def leaf(path, x):
        shape = tuple(x.shape)
        values = rng.standard_normal(shape)
        if len(shape) >= 2:
            values = values / np.sqrt(np.prod(shape) / shape[out_axis])
        else:
            values = 0.3 * values + (1.0 if "scale" in jax.tree_util.keystr(path) else 0.0)
        return jnp.asarray(values, jnp.float64)

    return jax.tree_util.tree_map_with_path(leaf, shapes)


def to_float64(tree: Any) -> Any:
    """Cast every floating-point leaf of ``tree`` to float64; other leaves are kept."""
    return jax.tree.map(
        lambda a: a.astype(jnp.float64) if jnp.issubdtype(a.dtype, jnp.floating) else a, tree
    )


def _float_inputs(name: str, shape: tuple[int, ...]) -> jax.Array:
    return jnp.asarray(_rng(name, "inputs").standard_normal((N, *shape)), jnp.float64)


def _token_inputs(name: str, length: int, vocab: int) -> jax.Array:
    return jnp.asarray(_rng(name, "inputs").integers(0, vocab, (N, length)), jnp.int32)


def _flatten(x: jax.Array) -> jax.Array:
    return jnp.reshape(x, (x.shape[0], -1))


def _linen(name: str, module: nn.Module, inputs: jax.Array):
    """A linen case; params are the full variables dict ``{"params": ...}`` (structure from
    ``module.init`` under ``jax.eval_shape``, values from :func:`fill`)."""
    shapes = jax.eval_shape(module.init, jax.random.key(0), inputs)
    return module.apply, fill(name, shapes), inputs


def _plain_params(name: str, sizes=(4, 5, NUM_CLASSES)) -> dict[str, jax.Array]:
    """``{"w1", "b1", "w2", "b2", ...}`` for a plain-jnp MLP with the given widths."""
    shapes = {}
    for i, (d_in, d_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        shapes[f"w{i + 1}"] = jax.ShapeDtypeStruct((d_in, d_out), jnp.float64)
        shapes[f"b{i + 1}"] = jax.ShapeDtypeStruct((d_out,), jnp.float64)
    return fill(name, shapes)


# ---------------------------------------------------------------------------------------------
# flax linen MLPs


class MLP(nn.Module):
    """Dense -> act -> Dense -> act -> Dense (``features`` gives the widths)."""

    features: tuple[int, ...] = (6, 5, NUM_CLASSES)
    activation: Callable | None = nn.relu

    @nn.compact
    def __call__(self, x):
        for i, width in enumerate(self.features):
            x = nn.Dense(width)(x)
            if i < len(self.features) - 1 and self.activation is not None:
                x = self.activation(x)
        return x


def _mlp(activation):
    def builder(name):
        return _linen(name, MLP(activation=activation), _float_inputs(name, (4,)))

    return builder


_MLP = ("linen", "dense", "chain")
_register("mlp_relu", *_MLP, "relu", "piecewise_linear")(_mlp(nn.relu))
_register("mlp_tanh", *_MLP, "smooth")(_mlp(nn.tanh))
_register("mlp_sigmoid", *_MLP, "smooth")(_mlp(nn.sigmoid))
_register("mlp_softplus", *_MLP, "smooth")(_mlp(nn.softplus))
_register("mlp_gelu", *_MLP, "smooth")(_mlp(functools.partial(nn.gelu, approximate=True)))
_register("mlp_gelu_erf", *_MLP, "smooth")(_mlp(functools.partial(nn.gelu, approximate=False)))


@_register("linear_chain", *_MLP, "linear", "piecewise_linear", "smooth")
def linear_chain(name):
    """A deep linear network: three Dense layers, no activation."""
    return _linen(name, MLP(activation=None), _float_inputs(name, (4,)))


@_register("dense_single", *_MLP, "single_layer", "linear", "piecewise_linear", "smooth")
def dense_single(name):
    """A single Dense layer (multinomial logistic / linear regression)."""
    return _linen(name, nn.Dense(NUM_CLASSES), _float_inputs(name, (4,)))


# ---------------------------------------------------------------------------------------------
# CNNs


class CNN(nn.Module):
    """Conv -> act [-> pool] [-> Conv -> act] -> flatten -> Dense."""

    conv_kwargs: tuple[dict, ...]
    activation: Callable = nn.relu
    pool: str | None = None  # "max" or "avg" (window 2, stride 1), after the first conv

    @nn.compact
    def __call__(self, x):
        ndim = x.ndim - 2
        for i, kwargs in enumerate(self.conv_kwargs):
            x = self.activation(nn.Conv(**kwargs)(x))
            if i == 0 and self.pool is not None:
                pool = nn.max_pool if self.pool == "max" else nn.avg_pool
                x = pool(x, window_shape=(2,) * ndim, strides=(1,) * ndim)
        return nn.Dense(NUM_CLASSES)(_flatten(x))


def _cnn(shape, *conv_kwargs, activation=nn.relu, pool=None):
    def builder(name):
        module = CNN(conv_kwargs=conv_kwargs, activation=activation, pool=pool)
        return _linen(name, module, _float_inputs(name, shape))

    return builder


_CNN_RELU = ("linen", "conv", "relu", "piecewise_linear")

cnn_stride2_same = _register("cnn_stride2_same", *_CNN_RELU, "pool")(
    _cnn(
        (6, 6, 2),
        dict(features=3, kernel_size=(3, 3), strides=(2, 2), padding="SAME"),
        pool="max",
    )
)
"""2-D conv, 3x3 kernel, stride 2, SAME padding, max-pool, Dense head."""

cnn_valid = _register("cnn_valid", *_CNN_RELU, "pool")(
    _cnn(
        (6, 6, 2),
        dict(features=3, kernel_size=(3, 3), padding="VALID"),
        dict(features=2, kernel_size=(2, 2), padding="VALID", use_bias=False),
        pool="avg",
    )
)
"""2-D conv with VALID padding, avg-pool, a second conv without bias, Dense head."""

cnn_explicit_padding = _register("cnn_explicit_padding", *_CNN_RELU)(
    _cnn((5, 4, 2), dict(features=3, kernel_size=(3, 2), padding=((1, 2), (0, 1))))
)
"""2-D conv with explicit asymmetric padding ((1, 2), (0, 1)) and a 3x2 kernel."""

cnn_dilated = _register("cnn_dilated", *_CNN_RELU)(
    _cnn(
        (6, 6, 2),
        dict(features=3, kernel_size=(2, 2), kernel_dilation=(2, 2), padding="VALID"),
    )
)
"""2-D conv with kernel dilation 2."""

cnn_grouped = _register("cnn_grouped", *_CNN_RELU)(
    _cnn(
        (5, 5, 4),
        dict(features=4, kernel_size=(2, 2), feature_group_count=2, padding="VALID"),
        dict(features=2, kernel_size=(2, 2), strides=(2, 2), padding="VALID"),
    )
)
"""2-D conv with feature_group_count 2 (4 -> 4 channels), then a strided ordinary conv."""

conv1d = _register("conv1d", *_CNN_RELU, "conv1d", "pool")(
    _cnn(
        (7, 2),
        dict(features=3, kernel_size=(3,), padding="SAME"),
        dict(features=2, kernel_size=(2,), strides=(2,), padding="VALID"),
        pool="avg",
    )
)
"""1-D conv on ``[N, L, C_in]`` inputs (stride 1, avg-pool, then stride 2)."""

cnn_tanh = _register("cnn_tanh", "linen", "conv", "pool", "smooth")(
    _cnn(
        (5, 5, 2),
        dict(features=3, kernel_size=(3, 3), padding="SAME"),
        dict(features=2, kernel_size=(2, 2), strides=(2, 2), padding="VALID"),
        activation=nn.tanh,
        pool="avg",
    )
)
"""Two 2-D convs with tanh, avg-pool in between, Dense head."""


# ---------------------------------------------------------------------------------------------
# residual, LayerNorm, BatchNorm


class DenseResidual(nn.Module):
    """Dense -> relu -> [x + Dense(relu(Dense(x)))] -> relu -> Dense."""

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(4)(x))
        x = x + nn.Dense(4)(nn.relu(nn.Dense(5)(x)))
        return nn.Dense(NUM_CLASSES)(nn.relu(x))


@_register("residual_dense", "linen", "dense", "residual", "relu", "piecewise_linear")
def residual_dense(name):
    """A residual block of Dense layers."""
    return _linen(name, DenseResidual(), _float_inputs(name, (3,)))


class ConvResidual(nn.Module):
    """Conv -> tanh -> [x + Conv(tanh(Conv1x1(x)))] -> flatten -> Dense."""

    @nn.compact
    def __call__(self, x):
        x = nn.tanh(nn.Conv(3, (3, 3))(x))
        x = x + nn.Conv(3, (3, 3))(nn.tanh(nn.Conv(2, (1, 1))(x)))
        return nn.Dense(NUM_CLASSES)(_flatten(x))


@_register("residual_conv", "linen", "conv", "residual", "smooth")
def residual_conv(name):
    """A residual block of SAME-padded convolutions with tanh."""
    return _linen(name, ConvResidual(), _float_inputs(name, (4, 4, 2)))


class LayerNormMLP(nn.Module):
    """Dense -> LayerNorm -> tanh -> Dense -> LayerNorm -> relu -> Dense."""

    @nn.compact
    def __call__(self, x):
        x = nn.tanh(nn.LayerNorm()(nn.Dense(6)(x)))
        x = nn.relu(nn.LayerNorm()(nn.Dense(5)(x)))
        return nn.Dense(NUM_CLASSES)(x)


@_register("layernorm_mlp", "linen", "dense", "layernorm", "relu")
def layernorm_mlp(name):
    """An MLP with LayerNorm after each hidden Dense layer."""
    return _linen(name, LayerNormMLP(), _float_inputs(name, (4,)))


class BatchNormMLP(nn.Module):
    """Dense -> BatchNorm (batch statistics) -> relu -> Dense."""

    @nn.compact
    def __call__(self, x):
        x = nn.BatchNorm(use_running_average=False)(nn.Dense(4)(x))
        return nn.Dense(NUM_CLASSES)(nn.relu(x))


@_register("batchnorm_mlp", "linen", "dense", "batchnorm", "relu", "mixes_examples")
def batchnorm_mlp(name):
    """BatchNorm with batch statistics; params are ``{"params": ...}``, the running statistics
    are closed over and their update is dropped."""
    module = BatchNormMLP()
    inputs = _float_inputs(name, (3,))
    shapes = jax.eval_shape(module.init, jax.random.key(0), inputs)
    params = fill(name, {"params": shapes["params"]})
    stats = jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.float64), shapes["batch_stats"])

    def apply_fn(p, x):
        out, _ = module.apply({**p, "batch_stats": stats}, x, mutable=["batch_stats"])
        return out

    return apply_fn, params, inputs


# ---------------------------------------------------------------------------------------------
# attention, embeddings, tied weights


class AttentionClassifier(nn.Module):
    """Dense(4) -> x + 2-head self-attention(x) -> mean over positions -> Dense."""

    @nn.compact
    def __call__(self, x):
        x = nn.Dense(4)(x)
        x = x + nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=4)(x)
        return nn.Dense(NUM_CLASSES)(jnp.mean(x, axis=1))


@_register("attention", "linen", "attention", "dense", "residual", "smooth")
def attention(name):
    """Multi-head self-attention over T = 4 positions; inputs ``[N, 4, 3]``."""
    return _linen(name, AttentionClassifier(), _float_inputs(name, (4, 3)))


class EmbedClassifier(nn.Module):
    """Embed(7, 4) on tokens -> mean over positions -> tanh -> Dense."""

    @nn.compact
    def __call__(self, tokens):
        x = nn.Embed(num_embeddings=7, features=4)(tokens)
        return nn.Dense(NUM_CLASSES)(nn.tanh(jnp.mean(x, axis=1)))


@_register("embed", "linen", "embed", "dense", "int_inputs", "smooth")
def embed(name):
    """An embedding of int32 tokens ``[N, 4]`` (vocabulary 7)."""
    return _linen(name, EmbedClassifier(), _token_inputs(name, 4, 7))


TIED_VOCAB = 7


class TiedEmbed(nn.Module):
    """Embed -> mean -> tanh(Dense) -> ``embed.attend`` (logits over the vocabulary)."""

    @nn.compact
    def __call__(self, tokens):
        emb = nn.Embed(num_embeddings=TIED_VOCAB, features=4)
        x = jnp.mean(emb(tokens), axis=1)
        x = nn.tanh(nn.Dense(4)(x))
        return emb.attend(x)


@_register("tied_embed", "linen", "embed", "tied", "dense", "int_inputs", "smooth")
def tied_embed(name):
    """Tied input / output embedding; ``num_classes`` is the vocabulary size 7."""
    return (*_linen(name, TiedEmbed(), _token_inputs(name, 3, TIED_VOCAB)), TIED_VOCAB)


def _tied_plain_apply(p, x):
    h = jnp.tanh(x @ p["w"] + p["b"][None, :])
    h = jnp.tanh(h @ p["w"] + p["b"][None, :])  # the same square matrix and bias, used again
    return h @ p["head"]


@_register("tied_plain", "plain", "dense", "tied", "smooth")
def tied_plain(name):
    """Plain jnp: one square weight matrix and bias applied twice, then a head."""
    shapes = {"w": (4, 4), "b": (4,), "head": (4, NUM_CLASSES)}
    params = fill(name, {k: jax.ShapeDtypeStruct(v, jnp.float64) for k, v in shapes.items()})
    return _tied_plain_apply, params, _float_inputs(name, (4,))


# ---------------------------------------------------------------------------------------------
# other frameworks


class NnxMLP(nnx.Module):
    """nnx: Linear -> tanh -> Linear -> relu -> Linear."""

    def __init__(self, rngs: nnx.Rngs):
        self.l1 = nnx.Linear(4, 6, rngs=rngs)
        self.l2 = nnx.Linear(6, 5, rngs=rngs)
        self.l3 = nnx.Linear(5, NUM_CLASSES, rngs=rngs)

    def __call__(self, x):
        return self.l3(nnx.relu(self.l2(nnx.tanh(self.l1(x)))))


@_register("nnx_mlp", "nnx", "dense", "chain", "relu")
def nnx_mlp(name):
    """A flax nnx model; params are the ``nnx.State`` from ``nnx.split`` (``Param`` nodes)."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: NnxMLP(nnx.Rngs(0))))
    state = fill(name, state)

    def apply_fn(p, x):
        return nnx.merge(graphdef, p)(x)

    return apply_fn, state, _float_inputs(name, (4,))


@_register("nnx_mlp_pure_dict", "nnx", "dense", "chain", "relu")
def nnx_mlp_pure_dict(name):
    """The nnx model with params in the pure-dict form (``nnx.to_pure_dict``)."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: NnxMLP(nnx.Rngs(0))))
    pure = fill(name, nnx.to_pure_dict(state))

    def apply_fn(p, x):
        return nnx.merge(graphdef, p)(x)  # merge accepts the pure dict directly

    return apply_fn, pure, _float_inputs(name, (4,))


def _is_shape(x) -> bool:
    return isinstance(x, jax.ShapeDtypeStruct)


@_register("equinox_mlp", "equinox", "dense", "chain", "smooth")
def equinox_mlp(name):
    """``eqx.nn.MLP`` (softplus, depth 2) vmapped over the batch; weights are ``[out, in]``."""
    model = eqx.filter_eval_shape(
        lambda: eqx.nn.MLP(
            in_size=4,
            out_size=NUM_CLASSES,
            width_size=5,
            depth=2,
            activation=jax.nn.softplus,
            key=jax.random.key(0),
        )
    )
    params, static = eqx.partition(model, _is_shape)
    params = fill(name, params, out_axis=0)

    def apply_fn(p, x):
        return jax.vmap(eqx.combine(p, static))(x)

    return apply_fn, params, _float_inputs(name, (4,))


class EqxConv(eqx.Module):
    """equinox: Conv2d (channels-first, one example) -> tanh -> flatten -> Linear."""

    conv: eqx.nn.Conv2d
    head: eqx.nn.Linear

    def __init__(self, key):
        k1, k2 = jax.random.split(key)
        self.conv = eqx.nn.Conv2d(2, 3, kernel_size=2, stride=1, padding=1, key=k1)
        self.head = eqx.nn.Linear(3 * 5 * 5, NUM_CLASSES, key=k2)

    def __call__(self, x):  # x: [2, 4, 4]
        return self.head(jnp.reshape(jnp.tanh(self.conv(x)), (-1,)))


@_register("equinox_conv", "equinox", "conv", "dense", "smooth")
def equinox_conv(name):
    """An equinox conv net (per-example CHW layout, inputs ``[N, 2, 4, 4]``), vmapped."""
    model = eqx.filter_eval_shape(lambda: EqxConv(jax.random.key(0)))
    params, static = eqx.partition(model, _is_shape)
    params = fill(name, params, out_axis=0)

    def apply_fn(p, x):
        return jax.vmap(eqx.combine(p, static))(x)

    return apply_fn, params, _float_inputs(name, (2, 4, 4))


# ---------------------------------------------------------------------------------------------
# a language model (not in CASES: its outputs are [N, T, V], one row of logits per position)


class EqxLMBlock(eqx.Module):
    """equinox twin of a pre-LN transformer block on one sequence ``[T, d]``: ``x + attn(ln(x))``
    (causal multi-head, plain jnp), then ``x + mlp(ln(x))`` (GELU, tanh form)."""

    norm_attention: eqx.nn.LayerNorm
    qkv: eqx.nn.Linear
    attention_out: eqx.nn.Linear
    norm_mlp: eqx.nn.LayerNorm
    mlp_in: eqx.nn.Linear
    mlp_out: eqx.nn.Linear
    num_heads: int = eqx.field(static=True)

    def __init__(self, width, num_heads, mlp_ratio, key):
        k1, k2, k3, k4 = jax.random.split(key, 4)
        self.norm_attention = eqx.nn.LayerNorm(width, eps=1e-6)
        self.qkv = eqx.nn.Linear(width, 3 * width, key=k1)
        self.attention_out = eqx.nn.Linear(width, width, key=k2)
        self.norm_mlp = eqx.nn.LayerNorm(width, eps=1e-6)
        self.mlp_in = eqx.nn.Linear(width, mlp_ratio * width, key=k3)
        self.mlp_out = eqx.nn.Linear(mlp_ratio * width, width, key=k4)
        self.num_heads = num_heads

    def __call__(self, x):  # x: [T, d]
        length, width = x.shape
        heads = self.num_heads
        qkv = jax.vmap(self.qkv)(jax.vmap(self.norm_attention)(x))
        qkv = jnp.reshape(qkv, (length, 3, heads, width // heads))
        q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]
        scores = jnp.einsum("thd,shd->hts", q, k) / np.sqrt(width // heads)
        causal = jnp.tril(jnp.ones((length, length), dtype=bool))
        scores = jnp.where(causal[None], scores, jnp.finfo(scores.dtype).min)
        attended = jnp.einsum("hts,shd->thd", jax.nn.softmax(scores, axis=-1), v)
        x = x + jax.vmap(self.attention_out)(jnp.reshape(attended, (length, width)))
        h = jax.nn.gelu(jax.vmap(self.mlp_in)(jax.vmap(self.norm_mlp)(x)))
        return x + jax.vmap(self.mlp_out)(h)


class EqxLM(eqx.Module):
    """equinox decoder-only LM on one sequence: ``tokens [T] -> logits [T, V]``; token plus
    learned position embeddings, pre-LN blocks, final LayerNorm, tied output embedding
    (``logits = h Eᵀ``)."""

    embed: eqx.nn.Embedding
    positions: jax.Array  # [max_len, d]
    blocks: list
    norm_final: eqx.nn.LayerNorm

    def __init__(self, vocab_size, width, num_heads, num_layers, max_len, mlp_ratio, key):
        keys = jax.random.split(key, num_layers + 2)
        self.embed = eqx.nn.Embedding(vocab_size, width, key=keys[0])
        self.positions = 0.02 * jax.random.normal(keys[1], (max_len, width))
        self.blocks = [EqxLMBlock(width, num_heads, mlp_ratio, key=k) for k in keys[2:]]
        self.norm_final = eqx.nn.LayerNorm(width, eps=1e-6)

    def __call__(self, tokens):  # tokens: [T] int
        x = self.embed.weight[tokens] + self.positions[: tokens.shape[0]]
        for block in self.blocks:
            x = block(x)
        return jax.vmap(self.norm_final)(x) @ self.embed.weight.T


def equinox_lm(
    vocab_size=16, width=16, num_heads=2, num_layers=1, max_len=8, mlp_ratio=4, name="equinox_lm"
):
    """``(apply_fn, params)`` of :class:`EqxLM` vmapped over the batch: ``apply_fn(params,
    tokens [N, T]) -> logits [N, T, V]`` (``T <= max_len``); float64 params from :func:`fill`
    (weights ``[out, in]``)."""
    model = eqx.filter_eval_shape(
        lambda: EqxLM(
            vocab_size, width, num_heads, num_layers, max_len, mlp_ratio, key=jax.random.key(0)
        )
    )
    params, static = eqx.partition(model, _is_shape)
    params = fill(name, params, out_axis=0)

    def apply_fn(p, tokens):
        return jax.vmap(eqx.combine(p, static))(tokens)

    return apply_fn, params


# ---------------------------------------------------------------------------------------------
# plain jnp


def _plain_mlp_apply(p, x):
    return jnp.tanh(x @ p["w1"] + p["b1"][None, :]) @ p["w2"] + p["b2"][None, :]


@_register("plain_mlp", "plain", "dense", "chain", "smooth")
def plain_mlp(name):
    """Plain jnp: ``tanh(x W1 + b1) W2 + b2`` on a params dict."""
    return _plain_mlp_apply, _plain_params(name), _float_inputs(name, (4,))


def _plain_int_leaf_apply(p, x):
    h = jax.nn.relu(x @ p["w1"] + p["b1"][None, :])
    h = h[:, p["perm"]]  # int32 leaf used as a gather index
    offset = p["offset"].astype(h.dtype)[None, :]  # int32 leaf, cast and added
    return h @ p["w2"] + p["b2"][None, :] + offset


@_register("plain_with_int_leaf", "plain", "dense", "int_leaf", "relu", "piecewise_linear")
def plain_with_int_leaf(name):
    """Plain jnp whose params hold int32 leaves: ``perm`` (a permutation of the hidden units,
    used as a gather index) and ``offset`` (cast to float and added to the outputs)."""
    params = _plain_params(name)
    params["perm"] = jnp.array([2, 0, 4, 1, 3], jnp.int32)
    params["offset"] = jnp.array([1, -1, 2], jnp.int32)
    return _plain_int_leaf_apply, params, _float_inputs(name, (4,))


# ---------------------------------------------------------------------------------------------
# jit, remat, custom derivatives, scan


@jax.jit
def _jitted_dense(w, b, x):
    return x @ w + b[None, :]


@jax.jit
def _jitted_apply(p, x):
    h = jnp.tanh(_jitted_dense(p["w1"], p["b1"], x))
    return _jitted_dense(p["w2"], p["b2"], h)


@_register("nested_jit", "plain", "dense", "chain", "smooth", "nested_jit")
def nested_jit(name):
    """Plain jnp: a jitted apply_fn that calls a jitted dense layer twice (nested ``jit``)."""
    return _jitted_apply, _plain_params(name), _float_inputs(name, (4,))


class RematMLP(nn.Module):
    """Dense -> tanh -> remat(Dense) -> tanh -> Dense."""

    @nn.compact
    def __call__(self, x):
        x = nn.tanh(nn.Dense(6)(x))
        x = nn.tanh(nn.remat(nn.Dense)(5)(x))
        return nn.Dense(NUM_CLASSES)(x)


@_register("remat_mlp", *_MLP, "smooth", "remat")
def remat_mlp(name):
    """A linen MLP with one layer wrapped in ``nn.remat`` (``jax.checkpoint``)."""
    return _linen(name, RematMLP(), _float_inputs(name, (4,)))


@jax.custom_jvp
def custom_jvp_softplus(x):
    """softplus with a hand-written JVP rule."""
    return jnp.logaddexp(x, 0.0)


@custom_jvp_softplus.defjvp
def _custom_jvp_softplus_jvp(primals, tangents):
    (x,), (t,) = primals, tangents
    return custom_jvp_softplus(x), jax.nn.sigmoid(x) * t


@jax.custom_vjp
def custom_vjp_softplus(x):
    """softplus with a hand-written VJP rule (so no forward-mode autodiff)."""
    return jnp.logaddexp(x, 0.0)


def _custom_vjp_softplus_fwd(x):
    return custom_vjp_softplus(x), x


def _custom_vjp_softplus_bwd(x, g):
    return (g * jax.nn.sigmoid(x),)


custom_vjp_softplus.defvjp(_custom_vjp_softplus_fwd, _custom_vjp_softplus_bwd)


@_register("custom_jvp_mlp", *_MLP, "smooth", "custom_jvp")
def custom_jvp_mlp(name):
    """A linen MLP whose activation is a user ``custom_jvp`` softplus."""
    return _linen(name, MLP(activation=custom_jvp_softplus), _float_inputs(name, (4,)))


@_register("custom_vjp_mlp", *_MLP, "smooth", "custom_vjp", "no_forward_mode")
def custom_vjp_mlp(name):
    """A linen MLP whose activation is a user ``custom_vjp`` softplus."""
    return _linen(name, MLP(activation=custom_vjp_softplus), _float_inputs(name, (4,)))


def _scan_apply(p, x):
    h = jnp.tanh(x @ p["w_in"])

    def layer(h, wb):
        w, b = wb
        return jnp.tanh(h @ w + b[None, :]), None

    h, _ = jax.lax.scan(layer, h, (p["w_stack"], p["b_stack"]))
    return h @ p["w_out"]


@_register("scan_mlp", "plain", "dense", "scan", "smooth")
def scan_mlp(name):
    """Plain jnp: 3 hidden layers with stacked weights ``[3, 4, 4]`` applied by ``lax.scan``."""
    shapes = {"w_in": (4, 4), "w_stack": (3, 4, 4), "w_out": (4, NUM_CLASSES)}
    params = fill(name, {k: jax.ShapeDtypeStruct(v, jnp.float64) for k, v in shapes.items()})
    params["b_stack"] = jnp.asarray(0.3 * _rng(name, "bias").standard_normal((3, 4)))
    return _scan_apply, params, _float_inputs(name, (4,))


# ---------------------------------------------------------------------------------------------
# access


@functools.cache
def get_case(name: str) -> Case:
    """Build the case ``name`` once and cache it (the same ``apply_fn`` object every time)."""
    if not jax.config.jax_enable_x64:
        raise RuntimeError(
            "the model zoo is float64: call jax.config.update('jax_enable_x64', True) first"
        )
    return CASES[name]()


def case_names(include=(), exclude=()) -> list[str]:
    """Names of the cases (table order) carrying every tag in ``include`` and none in
    ``exclude``; e.g. ``case_names(include={"smooth"}, exclude={"mixes_examples"})``."""
    include, exclude = set(include), set(exclude)
    return [name for name, tags in TAGS.items() if include <= tags and not exclude & tags]


def make_batch(case: Case, loss: str) -> tuple[Any, jax.Array]:
    """A deterministic ``(inputs, targets)`` batch for ``case``.

    ``loss="cross_entropy"``: int32 labels ``[N]`` in ``[0, C)``;
    ``loss="mse"``: float64 targets ``[N, C]`` from a standard normal.
    """
    rng = _rng(case.name, "targets/" + loss)
    if loss == "cross_entropy":
        targets = jnp.asarray(rng.integers(0, case.num_classes, (N,)), jnp.int32)
    elif loss == "mse":
        targets = jnp.asarray(rng.standard_normal((N, case.num_classes)), jnp.float64)
    else:
        raise ValueError(f"unknown loss {loss!r}; expected 'cross_entropy' or 'mse'")
    return case.inputs, targets
