"""Influence scores against the dense formula ``G_q (C + λ I)⁻¹ G_mᵀ``.

``G`` holds the per-example loss gradients from ``jax.vmap(jax.grad)`` of each example's own
(weighted, position-summed) loss, flattened in ``ravel_pytree`` order; ``C`` is the dense matrix
of the same curvature blocks (``blocks_to_dense``) or the exact GGN from ``jax.jacrev``. The
references never use curvjax's taps.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import models
import numpy as np
import optax
import pytest
import reference

import curvjax
from curvjax import influence
from curvjax._src import influence as influence_impl
from curvjax._src import lm

LAMBDA = 0.2
# float64 throughout, systems of condition number ≲ 1e3: the tap-based scores and the dense
# formula agree to ~1e-13 relative; 1e-9 is far below any wrong scaling, sign, mask or layout.
RTOL = 1e-9


@functools.partial(jax.jit, static_argnums=0, static_argnames="loss")
def per_example_loss_grads(apply_fn, params, inputs, targets, weights, loss="cross_entropy"):
    """``[N, D]``: ``∇_θ Σ_p w_{n,p} ℓ(f(θ, x_n)_p, y_{n,p})`` by ``vmap(grad)`` on single examples."""
    flat, unravel = reference.flatten_float(params)

    def loss_n(v, x, y, w):
        out = apply_fn(unravel(v), jax.tree.map(lambda a: a[None], x))[0]
        if loss == "mse":
            per = jnp.sum((out - y) ** 2, axis=-1)
        else:
            per = optax.softmax_cross_entropy_with_integer_labels(out, y)
        return jnp.sum(w * per)

    return jax.vmap(jax.grad(loss_n), in_axes=(None, 0, 0, 0))(flat, inputs, targets, weights)


#: the dense matrix of a tree of blocks, compiled (eagerly it runs op by op)
to_dense = jax.jit(curvjax.blocks_to_dense)


def fit(fn, apply_fn, params, batch, **kwargs):
    """A curvjax curvature under ``jit`` (compiling once is faster than running it eagerly)."""
    return jax.jit(lambda p: fn(apply_fn, p, batch, **kwargs))(params)


def dense_scores(g_q, g_m, curvature_matrix, damping):
    solved = np.linalg.solve(curvature_matrix + damping * np.eye(len(curvature_matrix)), g_m.T)
    return g_q @ solved


def leaf_slices(params):
    return reference.float_slices(params)


def check_per_layer(per_layer, total, g_q, g_m, dense, params, block_diagonal=True):
    """Per-leaf scores sum to the total and equal the per-leaf dense formula."""
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    assert list(per_layer) == paths
    np.testing.assert_allclose(sum(per_layer.values()), total, rtol=RTOL, atol=RTOL)
    preconditioned = np.linalg.solve(dense + LAMBDA * np.eye(len(dense)), g_q.T)  # p_q
    for path, sl in zip(paths, leaf_slices(params), strict=True):
        if block_diagonal:
            block = dense[sl, sl]
            expected = g_q[:, sl] @ np.linalg.solve(
                block + LAMBDA * np.eye(len(block)), g_m[:, sl].T
            )
        else:
            expected = preconditioned[sl].T @ g_m[:, sl].T  # p_{q,k}ᵀ ∇_k ℓ_m
        np.testing.assert_allclose(per_layer[path], expected, rtol=RTOL, atol=RTOL)


# --------------------------------------------------------------------------------------------
# a dense model: Kronecker kernels, full bias blocks, weighted examples


@pytest.fixture(scope="module")
def mlp():
    case = models.get_case("plain_mlp")
    inputs, targets = models.make_batch(case, "cross_entropy")
    weights = jnp.array([1.0, 0.0, 0.5, 1.0, 2.0])  # a padded example and non-unit weights
    train = (inputs, targets, weights)
    rng = np.random.default_rng(3)
    queries = (
        jnp.asarray(rng.standard_normal((3, 4))),
        jnp.asarray(rng.integers(0, 3, 3), jnp.int32),
    )
    g_m = np.asarray(per_example_loss_grads(case.apply_fn, case.params, *train))
    g_q = np.asarray(per_example_loss_grads(case.apply_fn, case.params, *queries, jnp.ones(3)))
    return case, train, queries, g_m, g_q


@pytest.mark.parametrize("curvature", ["ekfac", "ggn"])
def test_scores_and_self_influence_match_dense(mlp, curvature):
    case, train, queries, g_m, g_q = mlp
    apply_fn, params = case.apply_fn, case.params
    if curvature == "ggn":
        # C from the unweighted examples (the reference GGN takes no weights); the scores still
        # use the weighted training gradients
        dense = np.asarray(reference.ggn_matrix(apply_fn, params, train[:2]))
        fit_batch = train[:2]
        blocks_tree = None
    else:
        fit_batch = train
        # the string "ekfac" without a key uses the exact output factors (basis "kflr")
        blocks_tree = fit(curvjax.ekfac, apply_fn, params, fit_batch, basis="kflr")
        dense = np.asarray(to_dense(blocks_tree))
    pre = influence.precondition(
        apply_fn,
        params,
        queries,
        damping=LAMBDA,
        curvature=curvature,
        curvature_batch=fit_batch,
        tol=1e-13,
        maxiter=200,
    )
    # streamed over two batches (3 + 2 examples): the columns in order
    batches = [jax.tree.map(lambda x: x[:3], train), jax.tree.map(lambda x: x[3:], train)]
    got = influence.scores(apply_fn, params, pre, batches)
    expected = dense_scores(g_q, g_m, dense, LAMBDA)
    assert got.shape == (3, 5)
    np.testing.assert_allclose(got, expected, rtol=RTOL, atol=RTOL * np.abs(expected).max())
    assert np.all(np.asarray(got[:, 1]) == 0.0)  # weight 0: no influence

    per_layer = influence.scores(apply_fn, params, pre, [train], per_layer=True)
    check_per_layer(per_layer, got, g_q, g_m, dense, params, block_diagonal=curvature != "ggn")

    self_inf = influence.self_influence(
        apply_fn,
        params,
        [train],
        damping=LAMBDA,
        curvature=curvature if blocks_tree is None else blocks_tree,
        curvature_batch=fit_batch,
        tol=1e-13,
        maxiter=200,
    )
    expected_self = np.diag(dense_scores(g_m, g_m, dense, LAMBDA))
    np.testing.assert_allclose(self_inf, expected_self, rtol=RTOL, atol=RTOL * expected_self.max())


def test_named_curvature_equals_its_tree(mlp):
    case, train, queries, g_m, g_q = mlp
    apply_fn, params = case.apply_fn, case.params
    key = jax.random.key(4)
    tree = fit(curvjax.kfac, apply_fn, params, train, key=key)
    by_name = influence.scores(
        apply_fn,
        params,
        queries,
        [train],
        damping=LAMBDA,
        curvature="kfac",
        curvature_batch=train,
        key=key,
    )
    by_tree = influence.scores(apply_fn, params, queries, [train], damping=LAMBDA, curvature=tree)
    np.testing.assert_allclose(by_name, by_tree, rtol=RTOL, atol=RTOL)
    expected = dense_scores(g_q, g_m, np.asarray(to_dense(tree)), LAMBDA)
    np.testing.assert_allclose(by_tree, expected, rtol=RTOL, atol=RTOL * np.abs(expected).max())


def test_self_influence_paths_agree(mlp, monkeypatch):
    """The eigenbasis, column and per-example-gradient routes give the same numbers."""
    case, train, _, g_m, _ = mlp
    apply_fn, params = case.apply_fn, case.params
    tree = fit(curvjax.kflr, apply_fn, params, train)
    dense = np.asarray(to_dense(tree))
    expected = np.diag(dense_scores(g_m, g_m, dense, LAMBDA))

    def self_influence(curvature):  # a fresh trace: reads DIRECTIONS_LIMIT as patched
        return jax.jit(
            lambda c, b: influence.batch_self_influence(apply_fn, params, c, b, damping=LAMBDA)
        )(curvature, train)

    # kernels in the eigenbasis, biases (full blocks) by the columns of the inverse root
    np.testing.assert_allclose(
        self_influence(tree), expected, rtol=RTOL, atol=RTOL * expected.max()
    )
    monkeypatch.setattr(influence_impl, "DIRECTIONS_LIMIT", 0)  # biases: per-example gradients
    np.testing.assert_allclose(
        self_influence(tree), expected, rtol=RTOL, atol=RTOL * expected.max()
    )
    diag = fit(curvjax.ggn_diag, apply_fn, params, train)  # diagonal blocks: no eigenbasis
    got = self_influence(diag)
    inv = 1.0 / (np.asarray(jax.flatten_util.ravel_pytree(diag)[0]) + LAMBDA)
    np.testing.assert_allclose(got, np.einsum("nd,d,nd->n", g_m, inv, g_m), rtol=RTOL)


# --------------------------------------------------------------------------------------------
# a convolution model and the [N, T, V] language model with a padding mask


def test_conv_model():
    case = models.get_case("cnn_valid")
    inputs, targets = models.make_batch(case, "cross_entropy")
    train = (inputs, targets)
    tree = fit(curvjax.ekfac, case.apply_fn, case.params, train, basis="kflr")
    dense = np.asarray(to_dense(tree))
    g_m = np.asarray(per_example_loss_grads(case.apply_fn, case.params, *train, jnp.ones(5)))
    queries = jax.tree.map(lambda x: x[:2], train)
    got = influence.scores(
        case.apply_fn, case.params, queries, [train], damping=LAMBDA, curvature=tree
    )
    expected = dense_scores(g_m[:2], g_m, dense, LAMBDA)
    np.testing.assert_allclose(got, expected, rtol=RTOL, atol=RTOL * np.abs(expected).max())
    # one query: the convolutions contract forward-mode tangents instead of chunked gradients
    one = influence.scores(
        case.apply_fn,
        case.params,
        jax.tree.map(lambda x: x[:1], queries),
        [train],
        damping=LAMBDA,
        curvature=tree,
    )
    np.testing.assert_allclose(one, expected[:1], rtol=RTOL, atol=RTOL * np.abs(expected).max())
    self_inf = influence.self_influence(
        case.apply_fn, case.params, [train], damping=LAMBDA, curvature=tree
    )
    expected_self = np.diag(dense_scores(g_m, g_m, dense, LAMBDA))
    np.testing.assert_allclose(self_inf, expected_self, rtol=RTOL, atol=RTOL * expected_self.max())


def test_language_model_with_padding_mask():
    config = lm.Config(vocab_size=7, width=4, num_heads=1, num_layers=1, seq_len=3, mlp_ratio=1)
    shapes = jax.eval_shape(lambda key: lm.init(key, config), jax.random.key(0))
    params = models.fill("influence_lm", shapes)
    apply_fn = lm.make_apply_fn(config)
    rng = np.random.default_rng(5)
    tokens = jnp.asarray(rng.integers(0, 7, (4, 3)), jnp.int32)
    targets = jnp.asarray(rng.integers(0, 7, (4, 3)), jnp.int32)
    mask = jnp.array([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0], [1.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    train = (tokens, targets, mask)
    tree = fit(curvjax.ekfac, apply_fn, params, train, basis="kflr", reduction="token_mean")
    dense = np.asarray(to_dense(tree))
    g_m = np.asarray(per_example_loss_grads(apply_fn, params, *train))
    queries = jax.tree.map(lambda x: x[2:], train)
    pre = influence.precondition(apply_fn, params, queries, damping=LAMBDA, curvature=tree)
    got = influence.scores(apply_fn, params, pre, [train])
    expected = dense_scores(g_m[2:], g_m, dense, LAMBDA)
    np.testing.assert_allclose(got, expected, rtol=RTOL, atol=RTOL * np.abs(expected).max())
    # self-influence of masked sequences: the eigenbasis route for the kernels, the diagonal and
    # full blocks of the embedding, biases and scales, against the dense formula
    self_inf = influence.self_influence(apply_fn, params, [train], damping=LAMBDA, curvature=tree)
    expected_self = np.diag(dense_scores(g_m, g_m, dense, LAMBDA))
    np.testing.assert_allclose(self_inf, expected_self, rtol=RTOL, atol=RTOL * expected_self.max())


# --------------------------------------------------------------------------------------------
# ranking and errors


def test_top_k():
    scores = jnp.asarray(np.random.default_rng(6).standard_normal((3, 8)))
    result = influence.top_k(scores, 3)
    order = np.argsort(np.asarray(scores), axis=1)
    np.testing.assert_array_equal(result.most, order[:, ::-1][:, :3])
    np.testing.assert_array_equal(result.least, order[:, :3])
    np.testing.assert_array_equal(
        result.most_scores, np.take_along_axis(np.asarray(scores), order[:, ::-1][:, :3], 1)
    )
    np.testing.assert_array_equal(
        result.least_scores, np.take_along_axis(np.asarray(scores), order[:, :3], 1)
    )
    with pytest.raises(ValueError, match="k=9"):
        influence.top_k(scores, 9)
    with pytest.raises(TypeError, match="per-layer"):
        influence.top_k({"w": scores}, 2)


def test_errors(mlp):
    case, train, queries, _, _ = mlp
    apply_fn, params = case.apply_fn, case.params
    with pytest.raises(ValueError, match="curvature_batch"):
        influence.precondition(apply_fn, params, queries, damping=LAMBDA, curvature="kflr")
    with pytest.raises(ValueError, match="curvature='fisher'"):
        influence.precondition(
            apply_fn, params, queries, damping=LAMBDA, curvature="fisher", curvature_batch=train
        )
    with pytest.raises(ValueError, match="damping"):
        influence.precondition(
            apply_fn, params, queries, damping=-1.0, curvature="kflr", curvature_batch=train
        )
    diag = fit(curvjax.ggn_diag, apply_fn, params, train)
    pre = influence.precondition(apply_fn, params, queries, damping=LAMBDA, curvature=diag)
    with pytest.raises(ValueError, match=r"pass `\[batch\]`"):
        influence.scores(apply_fn, params, pre, train)  # one batch, not a list of batches
    with pytest.raises(ValueError, match="empty"):
        influence.scores(apply_fn, params, pre, [])
    # conjugate gradients with too small a budget: an error, not a silently wrong number
    with pytest.raises(ValueError, match="did not converge"):
        influence.precondition(
            apply_fn,
            params,
            queries,
            damping=LAMBDA,
            curvature="ggn",
            curvature_batch=train,
            maxiter=1,
        )
    bn = models.get_case("batchnorm_mlp")
    bn_batch = models.make_batch(bn, "cross_entropy")
    bn_pre = influence.PreconditionedQueries(None, jax.tree.map(jnp.zeros_like, bn.params), None)
    with pytest.raises(ValueError, match="mix"):
        influence.scores(bn.apply_fn, bn.params, bn_pre, [bn_batch])
