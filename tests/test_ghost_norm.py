"""Per-example gradient norms of weight-shared and tied dense layers without N × D memory.

``batch_l2`` evaluates ``||Σ_t a_t b_tᵀ||²`` per layer by the Gram identity or by forming the
gradient a chunk of examples at a time, whichever costs fewer flops; tied uses of one weight are
concatenated along the positions. Values are compared with ``vmap(grad)`` in float64.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import curvjax
from curvjax._src import backprop, leafwise, rules

# Both sides are float64 sums of at most a few hundred products of O(1) numbers: agreement to
# 1e-10 relative leaves a margin of about 1e4 over the accumulated rounding.
RTOL = 1e-10


def _cross_entropy(logits, y):
    return optax.softmax_cross_entropy_with_integer_labels(logits, y)


def shared(params, x):
    """A dense layer applied at every position ``[N, T, d] -> [N, T, h]``, mean-pooled, then a head."""
    h = jnp.tanh(x @ params["w"])
    return h.mean(axis=1) @ params["head"]


def tied(params, x):
    """``w`` used three times: ``x w``, then ``h wᵀ`` (transposed); ``v`` in two layers (same
    orientation); a head."""
    h = jnp.tanh(x @ params["w"])  # [N, T, h]
    h = jnp.tanh(h @ params["v"])
    h = jnp.tanh(h @ params["v"])
    r = jnp.sin(h @ params["w"].T)  # [N, T, d]
    r = jnp.tanh(r @ params["w"])
    return r.mean(axis=1) @ params["head"]


def tied_with_scale(params, x):
    """``w`` in a dense layer and also as a scalar read from one of its entries."""
    h = jnp.tanh(x @ params["w"]) * params["w"][0, 0]
    return h.mean(axis=1) @ params["head"]


def _problem(key, n, t, d, h, c=3, with_v=False):
    keys = jax.random.split(key, 5)
    params = {
        "w": jax.random.normal(keys[0], (d, h)) / np.sqrt(d),
        "head": jax.random.normal(keys[1], (h, c)),
    }
    if with_v:
        params["v"] = jax.random.normal(keys[2], (h, h)) / np.sqrt(h)
    x = jax.random.normal(keys[3], (n, t, d))
    y = jax.random.randint(keys[4], (n,), 0, c)
    return params, (x, y)


def _reference(apply_fn, params, batch):
    x, y = batch

    def loss(p, xn, yn):
        return _cross_entropy(apply_fn(p, xn[None])[0], yn)

    grads = jax.vmap(jax.grad(loss), (None, 0, 0))(params, x, y)
    return jax.tree.map(lambda g: jnp.sum(g.reshape(g.shape[0], -1) ** 2, axis=1), grads)


def _methods(apply_fn, params, batch):
    p = backprop.run(apply_fn, params, batch, reduction="sum")
    names = [jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_leaves_with_path(params)]
    methods = leafwise.sq_norm_methods(p)
    return {names[i]: methods[k] for k, i in enumerate(p.model.float_index)}


def _check(apply_fn, params, batch):
    got = jax.jit(lambda p, b: curvjax.batch_l2(apply_fn, p, b, reduction="sum"))(params, batch)
    want = _reference(apply_fn, params, batch)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(g, w, rtol=RTOL, atol=0)


@pytest.mark.parametrize(
    ("t", "d", "h", "method"),
    [
        (12, 3, 4, "direct"),  # T²(d+h) = 1008 > T d h + d h = 156: form g_n
        (3, 8, 10, "gram"),  # T²(d+h) = 162 < T d h + d h = 320: Gram matrices
    ],
)
def test_shared_dense_layer_norms_by_the_cheaper_form(t, d, h, method):
    params, batch = _problem(jax.random.key(0), 5, t, d, h)
    methods = _methods(shared, params, batch)
    assert methods == {"['head']": "outer", "['w']": method}
    _check(shared, params, batch)


@pytest.mark.parametrize(("t", "d", "h", "method"), [(1, 9, 7, "gram"), (16, 2, 3, "direct")])
def test_tied_weights_include_the_cross_terms_between_uses(t, d, h, method):
    """Three uses of ``w`` (one transposed) and two of ``v``: the positions of all uses are
    concatenated, so the cross terms between uses are in the norm (``3T`` and ``2T`` positions)."""
    params, batch = _problem(jax.random.key(1), 4, t, d, h, with_v=True)
    methods = _methods(tied, params, batch)
    assert methods["['w']"] == method and methods["['v']"] == method
    _check(tied, params, batch)
    # without the cross terms (the sum of the per-use norms) the answer differs
    p = backprop.run(tied, params, batch, reduction="sum")
    k = p.model.float_index.index(2)  # the leaves are head, v, w
    cols = p.columns_of_gradient()
    per_use = sum(
        leafwise._form_sq_norms(f.a, f.b[:, 0])
        for f in (
            rules.bilinear_form(tap, p.acts[tap.id], cols[tap.id])
            for tap in p.model.taps_of_leaf[k]
        )
    )
    want = _reference(tied, params, batch)["w"]
    assert np.max(np.abs(per_use - want) / want) > 1e-3


def test_a_tied_weight_with_a_non_dense_use_forms_per_example_gradients():
    params, batch = _problem(jax.random.key(2), 4, 5, 3, 4)
    assert _methods(tied_with_scale, params, batch)["['w']"] == "per_example"
    _check(tied_with_scale, params, batch)


def per_position(params, x):
    """``[N, T, d] -> [N, T, C]``: a shared dense layer and a shared head, logits per position."""
    return jnp.tanh(x @ params["w"]) @ params["head"]


@pytest.mark.parametrize(("t", "d", "h", "method"), [(3, 8, 10, "gram"), (12, 3, 4, "direct")])
def test_norms_with_per_position_outputs_and_a_padding_mask(t, d, h, method):
    """Logits ``[N, T, C]``, a 0/1 mask, token-mean reduction: ``g_n = ∇ Σ_t w_t ℓ_t / Σ w``."""
    params, (x, _) = _problem(jax.random.key(3), 4, t, d, h)
    keys = jax.random.split(jax.random.key(4), 2)
    y = jax.random.randint(keys[0], (4, t), 0, 3)
    mask = (jax.random.uniform(keys[1], (4, t)) < 0.7).astype(x.dtype).at[:, 0].set(1.0)
    batch = (x, y, mask)
    p = backprop.run(per_position, params, batch, reduction="token_mean")
    methods = leafwise.sq_norm_methods(p)
    assert methods[p.model.float_index.index(1)] == method  # leaves: head, w

    def loss(q, xn, yn, wn):
        return jnp.sum(wn * _cross_entropy(per_position(q, xn[None])[0], yn)) / jnp.sum(mask)

    grads = jax.vmap(jax.grad(loss), (None, 0, 0, 0))(params, x, y, mask)
    got = curvjax.batch_l2(per_position, params, batch, reduction="token_mean")
    for g, ref in zip(jax.tree.leaves(got), jax.tree.leaves(grads), strict=True):
        want = jnp.sum(ref.reshape(ref.shape[0], -1) ** 2, axis=1)
        np.testing.assert_allclose(g, want, rtol=RTOL, atol=0)


def _temp_bytes(fn, params, batch):
    compiled = jax.jit(fn).lower(params, batch).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def _tied_memory_problem(n, t, d, h):
    params = {
        "w": jax.ShapeDtypeStruct((d, h), jnp.float32),
        "v": jax.ShapeDtypeStruct((h, h), jnp.float32),
        "head": jax.ShapeDtypeStruct((d, 10), jnp.float32),
    }
    batch = (
        jax.ShapeDtypeStruct((n, t // 2, d), jnp.float32),  # tied: 2 uses of t/2 positions
        jax.ShapeDtypeStruct((n,), jnp.int32),
    )

    def model(p, x):
        r = jnp.tanh(x @ p["w"]) @ p["v"]
        return jnp.tanh(r @ p["w"].T).mean(axis=1) @ p["head"]

    small = jax.tree.map(lambda s: jnp.zeros((2, *s.shape[1:]), s.dtype), batch)
    params_small = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), params)
    methods = _methods(model, params_small, small)
    grad = _temp_bytes(lambda p, b: curvjax.grad(model, p, b), params, batch)
    norms = _temp_bytes(lambda p, b: curvjax.batch_l2(model, p, b), params, batch)
    size = sum(int(np.prod(s.shape)) for s in jax.tree.leaves(params))
    return methods, grad, norms, n * size * 4


def test_gram_norms_of_tied_layers_stay_far_below_n_times_d():
    """float32, compiled only: ``w`` ``[256, 1024]`` used at 4 positions and again transposed
    (``T = 8``: Gram, ``T²(d + h) = 82K < T d h = 2.1M`` flops per example), ``v``
    ``[1024, 1024]`` at 4. Per-example gradients of the ``N = 256`` examples would take 1.25 GiB;
    XLA's temporaries for ``batch_l2`` are 22 MiB here (the gradient's: 16 MiB). The bounds leave
    a margin of about 1.5 over those figures."""
    methods, grad, norms, materialised = _tied_memory_problem(256, 8, 256, 1024)
    assert methods["['w']"] == methods["['v']"] == "gram"
    assert norms <= 2 * grad, (norms, grad)
    assert norms <= materialised / 40, (norms, materialised)


def test_direct_norms_of_tied_layers_are_chunked():
    """float32, compiled only: ``w`` ``[128, 128]`` at 2 × 128 positions (``T = 256``: forming
    ``g_n`` costs ``T d h = 4.2M`` flops per example, the Gram form 16.8M). ``g_n`` is formed a
    chunk of examples at a time: XLA's temporaries stay within twice the gradient's (which
    holds the ``N × T × d`` activations; with ``T(d + h) > d h`` the ``N × D`` per-example
    gradients are smaller than those, so the bound is against the gradient: 128 MiB against the
    gradient's 80 MiB here)."""
    methods, grad, norms, _ = _tied_memory_problem(256, 256, 128, 128)
    assert methods["['w']"] == methods["['v']"] == "direct"
    assert norms <= 2 * grad, (norms, grad)
