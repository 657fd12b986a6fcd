"""Exact Hessian diagonal of transformer blocks against dense jax.hessian references (float64).

The residual terms of attention (``dot_general`` between two activations: ``q kᵀ`` and
``softmax · v``), of softmax, of LayerNorm / RMSNorm and of GELU make the Hessian differ from the
GGN; every test here compares ``curvjax.hessian_diag`` with the diagonal of ``jax.hessian`` of
the reduced loss, never with curvjax itself.
"""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference
from helpers import assert_tree_close
from jax.flatten_util import ravel_pytree

import curvjax
from curvjax._src import diagonals, taps

N, T, D, HEADS, FF, C = 3, 4, 4, 2, 8, 3  # small: the reference Hessian is dense
FAST = reference.FAST_COMPILE


def _normal(rng, shape, scale=1.0):
    """Float64 normal entries from a numpy generator (no JAX compilation)."""
    return jnp.asarray(scale * rng.standard_normal(shape), jnp.float64)


def _plain_params(seed: int = 0, t=T, d=D, heads=HEADS, ff=FF) -> dict:
    rng = np.random.default_rng(seed)
    dh = d // heads
    D, T, HEADS, FF = d, t, heads, ff  # noqa: N806
    return {
        "embed": _normal(rng, (5, D), 0.5),
        "pos": _normal(rng, (T, D), 0.3),
        "ln1": {
            "scale": 1 + _normal(rng, (D,), 0.2),
            "bias": _normal(rng, (D,), 0.2),
        },
        "wq": _normal(rng, (D, HEADS, dh), 0.6),
        "wk": _normal(rng, (D, HEADS, dh), 0.6),
        "wv": _normal(rng, (D, HEADS, dh), 0.5),
        "wo": _normal(rng, (HEADS, dh, D), 0.5),
        "bo": _normal(rng, (D,), 0.1),
        "rms": 1 + _normal(rng, (D,), 0.2),
        "w1": _normal(rng, (D, FF), 0.5),
        "b1": _normal(rng, (FF,), 0.2),
        "w2": _normal(rng, (FF, D), 0.4),
        "b2": _normal(rng, (D,), 0.1),
        "ln_f": {
            "scale": 1 + _normal(rng, (D,), 0.2),
            "bias": _normal(rng, (D,), 0.2),
        },
        "head": _normal(rng, (D, C), 0.7),
    }


def _layernorm(x, p, eps=1e-5):
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + eps) * p["scale"][None, None] + p["bias"][None, None]


def _rmsnorm(x, scale, eps=1e-6):
    return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps) * scale[None, None]


def _plain_block(p, x):
    """A pre-LN GPT block on ``x [N, T, 5]``: causal 2-head attention written with einsum,
    softmax, a tanh-GELU MLP after an RMSNorm, residual adds; the hidden ``[N, T, D]``."""
    return _block(p, jnp.einsum("ntf,fd->ntd", x, p["embed"]))


def _block(p, h):
    """The block on embedded inputs ``h [N, T, D]`` (position embedding added here)."""
    h = h + p["pos"][None]
    length, dh = p["pos"].shape[0], p["wq"].shape[2]
    a = _layernorm(h, p["ln1"])
    q = jnp.einsum("ntd,dhk->nhtk", a, p["wq"])
    k = jnp.einsum("ntd,dhk->nhtk", a, p["wk"])
    v = jnp.einsum("ntd,dhk->nhtk", a, p["wv"])
    scores = jnp.einsum("nhtk,nhsk->nhts", q, k) / float(
        np.sqrt(dh)
    )  # a weak-typed scalar: no promotion
    causal = jnp.tril(jnp.ones((length, length), bool))
    scores = jnp.where(causal[None, None], scores, -1e30)
    probs = jax.nn.softmax(scores, axis=-1)
    attended = jnp.einsum("nhts,nhsk->nhtk", probs, v)
    h = h + jnp.einsum("nhtk,hkd->ntd", attended, p["wo"]) + p["bo"][None, None]
    m = _rmsnorm(h, p["rms"])
    m = jax.nn.gelu(m @ p["w1"] + p["b1"][None, None], approximate=True)
    return h + m @ p["w2"] + p["b2"][None, None]


def plain_gpt(p, x):
    """The block, a final LayerNorm, mean over positions and a dense head: ``[N, C]``."""
    h = _layernorm(_plain_block(p, x), p["ln_f"])
    return jnp.mean(h, axis=1) @ p["head"]


class FlaxBlock(nn.Module):
    """The same architecture from flax.linen layers (erf GELU, causal mask from flax)."""

    @nn.compact
    def __call__(self, x):
        h = nn.Dense(D)(x)
        mask = nn.make_causal_mask(jnp.ones(x.shape[:2]))
        h = h + nn.MultiHeadDotProductAttention(num_heads=HEADS, qkv_features=D)(
            nn.LayerNorm()(h), mask=mask
        )
        m = nn.gelu(nn.Dense(FF)(nn.RMSNorm()(h)), approximate=False)
        h = h + nn.Dense(D)(m)
        return nn.Dense(C)(jnp.mean(nn.LayerNorm()(h), axis=1))


def _flax_case():
    """The flax block with float64 parameters drawn here (flax initialises float32): normal
    entries, plus one for the norms' scales."""
    module = FlaxBlock()
    rng = np.random.default_rng(1)
    x = _normal(rng, (N, T, 5))
    shapes = jax.eval_shape(module.init, jax.random.key(2), x)

    def draw(path, leaf):
        offset = 1.0 if "scale" in jax.tree_util.keystr(path) else 0.0
        return offset + _normal(rng, leaf.shape, 0.4)

    return module.apply, jax.tree_util.tree_map_with_path(draw, shapes), x


def _plain_case():
    return plain_gpt, _plain_params(), _normal(np.random.default_rng(4), (N, T, 5))


CASES = {"plain": _plain_case, "flax": _flax_case}


def _max_gap(a, b, params) -> float:
    return max(
        float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
        for x, y in zip(
            reference.float_leaves(a, params), reference.float_leaves(b, params), strict=True
        )
    )


@pytest.mark.parametrize(
    ("name", "loss", "reduction"), [("plain", "cross_entropy", "mean"), ("flax", "mse", "sum")]
)
def test_gpt_block_hessian_diag_is_exact(name, loss, reduction):
    apply_fn, params, x = CASES[name]()
    rng = np.random.default_rng(5)
    if loss == "cross_entropy":
        targets = jnp.asarray(rng.integers(0, C, (N,)), jnp.int32)
    else:
        targets = _normal(rng, (N, C))
    batch = (x, targets)
    got = jax.jit(
        lambda p, b: curvjax.extract(
            apply_fn, p, b, ["hessian_diag", "ggn_diag"], loss=loss, reduction=reduction
        ),
        compiler_options=FAST,
    )(params, batch)
    want = reference.hessian_diag(apply_fn, params, batch, loss, reduction)
    assert_tree_close(got["hessian_diag"], want, params, what=f"{name}/hessian_diag")
    # the residual terms matter here: a diagonal without them would fail the comparison above
    assert _max_gap(got["ggn_diag"], want, params) > 1e-3 * _max_gap(
        want, jax.tree.map(jnp.zeros_like, want), params
    )


def test_gpt_block_hessian_diag_in_float32():
    """The residual columns enter with weights ±1, so their squares partly cancel; in float32 the
    result still agrees with the float64 reference to 1e-5 of the largest entry (float32 rounding,
    6e-8, over about a thousand signed columns; the observed error is about 1e-6)."""
    apply_fn, params, x = _plain_case()
    labels = jnp.asarray(np.random.default_rng(13).integers(0, C, (N,)), jnp.int32)
    want = reference.hessian_diag(apply_fn, params, (x, labels))
    low = jax.tree.map(lambda a: a.astype(jnp.float32), (params, x))
    got = jax.jit(lambda p, b: curvjax.hessian_diag(apply_fn, p, b), compiler_options=FAST)(
        low[0], (low[1], labels)
    )
    assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(got))
    assert_tree_close(got, want, params, rtol=0.0, floor=1e-5, what="float32/hessian_diag")


def _attention_only(p, x):
    """``(h Wq)(h Wk)ᵀ (h Wv)`` with ``h = x W0``, mean over positions, a dense head: no softmax,
    norm or activation, so the only residuals are the two ``dot_general`` between activations."""
    h = jnp.einsum("ntf,fd->ntd", x, p["w0"])
    q, k, v = (jnp.einsum("ntd,de->nte", h, p[w]) for w in ("wq", "wk", "wv"))
    scores = jnp.einsum("nte,nse->nts", q, k)
    return jnp.mean(jnp.einsum("nts,nse->nte", scores, v), axis=1) @ p["head"]


def test_bilinear_residual_alone():
    """The two ``dot_general`` nodes are the only residuals; they reach the diagonal through
    ``w0``, which feeds both operands of each product (``wq``, ``wk``, ``wv`` feed one operand
    each, so their diagonal blocks equal the GGN's)."""
    rng = np.random.default_rng(6)
    params = {w: _normal(rng, (4, 4), 0.5) for w in ("wq", "wk", "wv")}
    params["w0"] = _normal(rng, (5, 4), 0.5)
    params["head"] = _normal(rng, (4, C), 0.5)
    x = _normal(rng, (N, T, 5))
    batch = (x, _normal(rng, (N, C)))
    model = taps.TracedModel(_attention_only, params, x, residuals=True)
    assert [node.kind for node in model.nodes] == [taps.BILINEAR_NODE] * 2
    got = jax.jit(
        lambda p, b: curvjax.extract(
            _attention_only, p, b, ["hessian_diag", "ggn_diag"], loss="mse"
        ),
        compiler_options=FAST,
    )(params, batch)
    want = reference.hessian_diag(_attention_only, params, batch, "mse")
    assert_tree_close(got["hessian_diag"], want, params, what="attention_only/hessian_diag")
    gap = np.max(np.abs(np.asarray(got["ggn_diag"]["w0"]) - np.asarray(want["w0"])))
    assert gap > 1e-2 * np.max(np.abs(np.asarray(want["w0"])))


def _gram_and_memory(p, x):
    """``h hᵀ`` (one variable as both operands) and ``h xᵀ`` (``x`` does not depend on the
    parameters: no residual), then a tanh and a dense head."""
    h = jnp.einsum("ntf,fd->ntd", x, p["w0"])
    gram = jnp.einsum("ntd,nsd->nts", h, h)
    memory = jnp.einsum("ntd,nsd->nts", h, x[..., :4])
    return jnp.mean(jnp.tanh(gram + memory), axis=1) @ p["head"]


def test_bilinear_node_with_one_variable_twice_and_a_parameter_free_operand():
    rng = np.random.default_rng(12)
    params = {"w0": _normal(rng, (5, 4), 0.5), "head": _normal(rng, (T, C), 0.5)}
    x = _normal(rng, (N, T, 5))
    batch = (x, jnp.asarray(rng.integers(0, C, (N,)), jnp.int32))
    model = taps.TracedModel(_gram_and_memory, params, x, residuals=True)
    kinds = sorted((q.kind, q.eqn.primitive.name) for q in model.nodes)
    assert kinds == [("bilinear", "dot_general"), ("elementwise", "tanh")]
    got = jax.jit(lambda p, b: curvjax.hessian_diag(_gram_and_memory, p, b), compiler_options=FAST)(
        params, batch
    )
    want = reference.hessian_diag(_gram_and_memory, params, batch)
    assert_tree_close(got, want, params, what="gram_and_memory/hessian_diag")


def test_inspect_reports_the_gpt_block_exact():
    apply_fn, params, x = _plain_case()
    report = curvjax.inspect(apply_fn, params, x)
    assert report.hessian_issues == ()
    assert all(leaf.hessian_diag is None for leaf in report.leaves)


def test_operation_without_a_residual_rule_points_to_hutchinson():
    """A product over positions (``reduce_prod``) has no residual rule: a clear error."""

    def apply_fn(p, x):
        h = jnp.tanh(jnp.einsum("ntf,fc->ntc", x, p["w"]))
        return jnp.prod(h, axis=1)

    rng = np.random.default_rng(8)
    params = {"w": _normal(rng, (5, C), 0.5)}
    x = _normal(rng, (N, T, 5))
    batch = (x, jnp.zeros((N,), jnp.int32))
    with pytest.raises(ValueError, match="method='hutchinson'") as info:
        jax.jit(lambda p, b: curvjax.hessian_diag(apply_fn, p, b))(params, batch)  # traced only
    assert "reduce_prod" in str(info.value)
    assert re.search(r"test_hessian_transformer\.py:\d+", str(info.value))


def test_too_many_residual_columns_point_to_hutchinson(monkeypatch):
    """The residual columns grow with the square of the activations' size; beyond
    ``MAX_RESIDUAL_ELEMENTS`` the exact method refuses, naming the largest node."""
    shapes = jax.eval_shape(lambda: _plain_params(t=64, d=64, heads=4, ff=256))
    big = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), shapes)
    x = np.zeros((8, 64, 5))
    issue = diagonals.residual_cost_issue(taps.TracedModel(plain_gpt, big, x, residuals=True))
    assert issue is not None and "test_hessian_transformer.py" in issue  # GELU: 64 · 256 columns
    apply_fn, params, x = _plain_case()
    model = taps.TracedModel(apply_fn, params, x, residuals=True)
    assert diagonals.residual_cost_issue(model) is None
    columns = sum(diagonals.node_column_count(q) for q in model.nodes)
    monkeypatch.setattr(diagonals, "MAX_RESIDUAL_ELEMENTS", N * columns)  # below the real need
    batch = (x, jnp.zeros((N,), jnp.int32))
    with pytest.raises(ValueError, match="method='hutchinson'") as info:
        jax.jit(lambda p, b: curvjax.hessian_diag(apply_fn, p, b))(params, batch)  # traced only
    assert f"{columns} backpropagated columns per example" in str(info.value)


def lm(p, tokens):
    """A one-block language model: token embedding (a gather), the block, a final LayerNorm and
    an untied output projection: logits ``[N, T, V]`` for int tokens ``[N, T]``."""
    h = _block(p, jnp.take(p["embed"], tokens, axis=0))
    return jnp.einsum("ntd,dv->ntv", _layernorm(h, p["ln_f"]), p["head"])


def test_language_model_hessian_diag_is_exact_per_position_with_padding():
    """Outputs ``[N, T, V]``, per-position cross-entropy, a padding mask and the token mean:
    ``L = Σ_{n,t} w_{n,t} CE(f_{n,t}, y_{n,t}) / Σ w``, its Hessian written from that
    definition."""
    vocab = C
    rng = np.random.default_rng(10)
    params = _plain_params(seed=11)  # embed [5, D]: 5 tokens; head [D, C]: C = V logits
    params["embed"] = params["embed"][:vocab]
    tokens = jnp.asarray(rng.integers(0, vocab, (N, T)), jnp.int32)
    labels = jnp.asarray(rng.integers(0, vocab, (N, T)), jnp.int32)
    mask = jnp.ones((N, T)).at[0, T - 2 :].set(0.0).at[2, T - 1].set(0.0)  # right padding
    flat, unravel = ravel_pytree(params)

    def total(v):
        logp = jax.nn.log_softmax(lm(unravel(v), tokens), axis=-1)
        nll = -jnp.take_along_axis(logp, labels[..., None], axis=-1)[..., 0]
        return jnp.sum(mask * nll) / jnp.sum(mask)

    want = jnp.diag(jax.jit(jax.hessian(total), compiler_options=FAST)(flat))
    got = jax.jit(
        lambda p, b: curvjax.hessian_diag(lm, p, b, reduction="token_mean"),
        compiler_options=FAST,
    )(params, (tokens, labels, mask))
    assert_tree_close(got, unravel(want), params, what="lm")
