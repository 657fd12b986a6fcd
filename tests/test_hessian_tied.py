"""Exact Hessian diagonal for tied parameters against dense jax.hessian references (float64).

A leaf consumed by several equations, one of which reads an activation that depends on the same
leaf (one kernel applied in two layers, ``w`` and ``wᵀ``, an embedding table used by the lookup
and again as the output projection), has Hessian cross terms between its uses. Every test here
compares ``curvjax.hessian_diag`` with the diagonal of ``jax.hessian`` of the reduced loss written
from its definition, never with curvjax itself.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference
from helpers import assert_tree_close
from jax.flatten_util import ravel_pytree

import curvjax
from curvjax._src import diagonals, lm, taps

FAST = reference.FAST_COMPILE
N, D = 4, 3


def _normal(rng, shape, scale=1.0):
    return jnp.asarray(scale * rng.standard_normal(shape), jnp.float64)


def _cross_entropy(logits, labels):
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.take_along_axis(logp, labels[..., None], axis=-1)[..., 0]


def _dense_diag(total, params):
    """``diag(∇² total)`` at ``params`` from the dense Hessian, as a params-shaped tree."""
    flat, unravel = ravel_pytree(params)
    hess = jax.jit(jax.hessian(lambda v: total(unravel(v))), compiler_options=FAST)(flat)
    return unravel(jnp.diag(hess))


def _hessian_diag(apply_fn, params, batch, **kwargs):
    fn = lambda p, b: curvjax.hessian_diag(apply_fn, p, b, **kwargs)  # noqa: E731
    return jax.jit(fn, compiler_options=FAST)(params, batch)


def twice(p, x):
    """One kernel applied in two successive layers: ``tanh(tanh(x W + b) W)``."""
    return jnp.tanh(jnp.tanh(x @ p["w"] + p["b"][None]) @ p["w"])


def transposed(p, x):
    """A kernel and its transpose: ``tanh(x W + b) Wᵀ`` (an autoencoder with tied weights)."""
    return jnp.tanh(x @ p["w"] + p["b"][None]) @ p["w"].T


def _mlp_case(fn, seed):
    rng = np.random.default_rng(seed)
    hidden = D if fn is twice else 5
    params = {"w": _normal(rng, (D, hidden), 0.9), "b": _normal(rng, (hidden,), 0.3)}
    x = _normal(rng, (N, D))
    return params, x


@pytest.mark.parametrize("fn", [twice, transposed], ids=["twice", "transposed"])
def test_tied_kernels_with_cross_entropy(fn):
    """``L = (1/N) Σ_n CE(f(x_n), y_n)`` with the kernel used twice."""
    params, x = _mlp_case(fn, 0)
    labels = jnp.asarray(np.arange(N) % D, jnp.int32)

    def total(p):
        return jnp.mean(_cross_entropy(fn(p, x), labels))

    want = _dense_diag(total, params)
    got = _hessian_diag(fn, params, (x, labels))
    assert_tree_close(got, want, params, what=fn.__name__)


def shared_scale(p, x):
    """One scale vector in two elementwise products: ``(tanh(x ⊙ s) ⊙ s) V``."""
    return (jnp.tanh(x * p["s"][None]) * p["s"][None]) @ p["v"]


def _conv(x, k):
    return jax.lax.conv_general_dilated(
        x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )


def conv_twice(p, x):
    """One convolution kernel applied in two layers, then a mean over the pixels."""
    return jnp.mean(_conv(jnp.tanh(_conv(x, p["k"])), p["k"]), axis=(1, 2))


@pytest.mark.parametrize("fn", [shared_scale, conv_twice], ids=["scale", "conv"])
def test_other_bilinear_tied_uses(fn):
    """Tied uses through ``mul`` (a broadcast scale) and ``conv_general_dilated``."""
    rng = np.random.default_rng(8)
    if fn is shared_scale:
        params = {"s": _normal(rng, (D,)), "v": _normal(rng, (D, 2))}
        x = _normal(rng, (N, D))
    else:
        params = {"k": _normal(rng, (3, 3, 2, 2), 0.5)}
        x = _normal(rng, (N, 4, 4, 2))
    labels = jnp.asarray(np.arange(N) % 2, jnp.int32)

    def total(p):
        return jnp.mean(_cross_entropy(fn(p, x), labels))

    want = _dense_diag(total, params)
    got = _hessian_diag(fn, params, (x, labels))
    assert_tree_close(got, want, params, what=fn.__name__)


def test_tied_kernel_with_mse_and_sum():
    """``L = Σ_n ||f(x_n) - y_n||²`` (the output Hessian ``2I``) for ``tanh(x W + b) Wᵀ``."""
    params, x = _mlp_case(transposed, 1)
    y = _normal(np.random.default_rng(2), (N, D))

    def total(p):
        return jnp.sum((transposed(p, x) - y) ** 2)

    want = _dense_diag(total, params)
    got = _hessian_diag(transposed, params, (x, y), loss="mse", reduction="sum")
    assert_tree_close(got, want, params, what="mse")


def test_the_cross_term_between_uses_matters():
    """Untying the two uses (separate copies ``W_1``, ``W_2``) and adding the diagonals of the
    per-use Hessian blocks misses the cross blocks ``∂²L/∂W_1∂W_2``: that sum differs from the
    exact diagonal, which curvjax matches (so the test above could fail without the tied columns)."""
    params, x = _mlp_case(twice, 3)
    labels = jnp.asarray(np.arange(N) % D, jnp.int32)

    def untied(w1, w2, b):
        h = jnp.tanh(x @ w1 + b[None])
        return jnp.mean(_cross_entropy(jnp.tanh(h @ w2), labels))

    w, b = params["w"], params["b"]

    def use_block_diag(i):  # diag(∂²L/∂W_i²) with the other use held at W
        use_i = lambda v: untied(*[v if j == i else w for j in (0, 1)], b)  # noqa: E731
        hess = jax.jit(jax.hessian(use_i), compiler_options=FAST)(w)
        return jnp.diagonal(hess.reshape(w.size, w.size)).reshape(w.shape)

    blocks = use_block_diag(0) + use_block_diag(1)
    exact = _dense_diag(lambda p: untied(p["w"], p["w"], p["b"]), params)["w"]
    got = _hessian_diag(twice, params, (x, labels))["w"]
    gap = float(jnp.max(jnp.abs(blocks - exact)))
    assert gap > 1e-3 * float(jnp.max(jnp.abs(exact)))  # the cross blocks are far from rounding
    np.testing.assert_allclose(got, exact, rtol=1e-10, atol=1e-13 * float(jnp.max(jnp.abs(exact))))


def tiny_lm(p, tokens):
    """Tied embedding: ``h = tanh(E[tokens] W + b)``, logits ``h Eᵀ`` ``[N, T, V]``."""
    h = jnp.tanh(jnp.take(p["embed"], tokens, axis=0) @ p["w"] + p["b"][None, None])
    return jnp.einsum("ntd,vd->ntv", h, p["embed"])


def _tokens(seed, n, t, vocab):
    rng = np.random.default_rng(seed)
    tokens = jnp.asarray(rng.integers(0, vocab, (n, t)), jnp.int32)
    labels = jnp.asarray(rng.integers(0, vocab, (n, t)), jnp.int32)
    mask = jnp.ones((n, t)).at[0, t - 2 :].set(0.0).at[n - 1, t - 1].set(0.0)  # right padding
    return tokens, labels, mask


def test_tied_embedding_lm_with_padding_and_token_mean():
    """``L = Σ_{n,t} w_{n,t} CE(f_{n,t}, y_{n,t}) / Σ w`` for the tied-embedding model."""
    vocab, t, d = 6, 4, 3
    rng = np.random.default_rng(4)
    params = {
        "embed": _normal(rng, (vocab, d), 0.8),
        "w": _normal(rng, (d, d), 0.8),
        "b": _normal(rng, (d,), 0.2),
    }
    tokens, labels, mask = _tokens(5, 3, t, vocab)

    def total(p):
        return jnp.sum(mask * _cross_entropy(tiny_lm(p, tokens), labels)) / jnp.sum(mask)

    want = _dense_diag(total, params)
    got = _hessian_diag(tiny_lm, params, (tokens, labels, mask), reduction="token_mean")
    assert_tree_close(got, want, params, what="tiny lm")


TINY = lm.Config(vocab_size=7, width=4, num_heads=2, num_layers=1, seq_len=3, mlp_ratio=2)


def test_transformer_lm_with_tied_embedding():
    """The flax transformer LM (token and position embeddings, a pre-LN block with causal
    attention and a GELU MLP, a final LayerNorm and the tied output projection ``h Eᵀ``) at a
    tiny size, padding mask and token mean."""
    apply_fn = lm.make_apply_fn(TINY)
    params = lm.init(jax.random.key(0), TINY)
    rng = np.random.default_rng(6)
    # float64, and entries large enough for the curvature terms to be far above rounding
    params = jax.tree.map(
        lambda a: _normal(rng, a.shape, 0.5) + jnp.asarray(a, jnp.float64), params
    )
    tokens, labels, mask = _tokens(7, 2, TINY.seq_len, TINY.vocab_size)

    def total(p):
        logits = apply_fn(p, tokens)
        return jnp.sum(mask * _cross_entropy(logits, labels)) / jnp.sum(mask)

    want = _dense_diag(total, params)
    got = _hessian_diag(apply_fn, params, (tokens, labels, mask), reduction="token_mean")
    assert_tree_close(got, want, params, what="transformer lm")


def test_inspect_and_the_size_guard_count_the_tied_taps():
    """``curvjax.inspect`` no longer names tied taps as preventing the exact diagonal; the tied
    output projection is a residual node of ``2 min(|x|, |E|)`` columns that the size guard
    counts."""
    vocab, t, d = 6, 4, 3
    params = {"embed": jnp.ones((vocab, d)), "w": jnp.ones((d, d)), "b": jnp.ones((d,))}
    tokens = jnp.zeros((2, t), jnp.int32)
    report = curvjax.inspect(tiny_lm, params, tokens)
    assert report.hessian_issues == ()
    assert all(leaf.hessian_diag is None for leaf in report.leaves)
    model = taps.TracedModel(tiny_lm, params, tokens, residuals=True)
    tied = [q for q in model.nodes if q.kind == taps.TIED_NODE]
    assert len(tied) == 1 and model.taps[tied[0].tap].primitive == "dot_general"
    assert [tap.tied for tap in model.taps].count(True) == 1  # the lookup `gather` is not tied
    assert diagonals.node_column_count(tied[0]) == 2 * min(t * d, vocab * d)
    assert diagonals.residual_cost_issue(model) is None


def test_tied_columns_count_in_the_size_guard(monkeypatch):
    """With room for every residual column but the tied tap's, the exact method refuses."""
    vocab, t, d = 6, 4, 3
    params = {"embed": jnp.ones((vocab, d)), "w": jnp.ones((d, d)), "b": jnp.ones((d,))}
    tokens = jnp.zeros((2, t), jnp.int32)
    model = taps.TracedModel(tiny_lm, params, tokens, residuals=True)
    counts = {q.kind: diagonals.node_column_count(q) for q in model.nodes}
    span = int(np.prod(model.out_aval.shape)) + t * d + t * d + vocab * d  # outputs, tanh, x, E
    monkeypatch.setattr(diagonals, "MAX_RESIDUAL_ELEMENTS", 2 * sum(counts.values()) * span - 1)
    assert "backpropagated columns per example" in diagonals.residual_cost_issue(model)
    monkeypatch.setattr(diagonals, "MAX_RESIDUAL_ELEMENTS", 2 * sum(counts.values()) * span)
    assert diagonals.residual_cost_issue(model) is None
