"""Per-example clipping (``curvjax.clipped_grad``) against ``vmap(grad)`` + clip + sum in float64.

The reference forms every per-example gradient of the unscaled, weighted per-example loss with
``jax.vmap(jax.grad)``, clips it (globally, per leaf, per labelled group) and sums; curvjax never
forms them. Every model of the zoo that treats examples independently, and the transformer LM with
a padding mask.
"""

import chex
import jax
import jax.numpy as jnp
import models
import numpy as np
import optax
import pytest
import reference
from helpers import assert_tree_close

import curvjax
from curvjax._src import lm

CASES = [name for name, tags in models.TAGS.items() if "mixes_examples" not in tags]
# per-example weights: a padded example (0), a half and a double weight
WEIGHTS = np.array([1.0, 0.5, 2.0, 1.0, 0.0])
# both sides are float64 sums of a few hundred O(1) products; the clipping factors are computed
# from norms that agree to ~1e-15, so 1e-10 relative leaves a margin of about 1e4 over rounding
RTOL = 1e-10


def _per_example(apply_fn, params, batch, loss="cross_entropy"):
    """``ĝ_n = w_n ∇ℓ(f(θ, x_n), y_n)`` from ``vmap(grad)``: a params-shaped tree of ``[N, ...]``."""
    inputs, targets, weights = batch
    grads = reference.per_example_grads(apply_fn, params, (inputs, targets), loss, "sum")
    return jax.tree.map(
        lambda g: g * weights.reshape((-1,) + (1,) * (g.ndim - 1)) if g is not None else None,
        grads,
    )


def _sq(g):
    return jnp.sum(g.reshape(g.shape[0], -1) ** 2, axis=1)


def _clip_sum(grads, norms, c):
    factor = jnp.minimum(1.0, c / jnp.where(norms > 0, norms, 1.0))
    return jax.tree.map(lambda g: jnp.tensordot(factor, g, axes=1), grads)


def _labels(params):
    """One label per leaf: its first path entry (a layer, for the flax models)."""
    return jax.tree_util.tree_map_with_path(lambda path, _: str(path[:2]), params)


@pytest.mark.parametrize("name", CASES)
def test_clipped_sum_matches_vmap_grad(name):
    case = models.get_case(name)
    x, y = models.make_batch(case, "cross_entropy")
    batch = (x, y, jnp.asarray(WEIGHTS))
    grads = _per_example(case.apply_fn, case.params, batch)
    floats = [g for g in jax.tree.leaves(grads)]
    norms = jnp.sqrt(sum(_sq(g) for g in floats))
    c = float(np.median(np.asarray(norms)[:4]))  # some real examples clipped, some not
    labels = _labels(case.params)

    def ours(params, batch, c):
        global_ = curvjax.clipped_grad(case.apply_fn, params, batch, clip_norm=c)
        per_leaf = curvjax.clipped_grad(case.apply_fn, params, batch, clip_norm=c, groups="leaf")
        grouped = curvjax.clipped_grad(case.apply_fn, params, batch, clip_norm=c / 2, groups=labels)
        return global_, per_leaf, grouped

    global_, per_leaf, grouped = jax.jit(ours, compiler_options=reference.FAST_COMPILE)(
        case.params, batch, c
    )
    # one global norm
    assert_tree_close(global_.grad, _clip_sum(grads, norms, c), case.params, rtol=RTOL)
    np.testing.assert_allclose(global_.norms, norms, rtol=RTOL, atol=1e-14)
    real = WEIGHTS > 0
    np.testing.assert_allclose(global_.clipped_fraction, np.mean(np.asarray(norms)[real] > c))
    # every leaf its own norm
    leaf_norms = jax.tree.map(lambda g: jnp.sqrt(_sq(g)), grads)
    want = jax.tree.map(lambda g, nm: _clip_sum(g, nm, c), grads, leaf_norms)
    assert_tree_close(per_leaf.grad, want, case.params, rtol=RTOL)
    for got, nm in zip(jax.tree.leaves(per_leaf.norms), jax.tree.leaves(leaf_norms), strict=True):
        np.testing.assert_allclose(got, nm, rtol=RTOL, atol=1e-14)
    # labelled groups (one per layer)
    label_leaves = jax.tree.leaves(labels)
    grad_leaves, treedef = jax.tree.flatten(grads)
    flags = reference.float_mask(case.params)
    float_labels = [lab for lab, f in zip(label_leaves, flags, strict=True) if f]
    want = []
    for g, lab in zip(grad_leaves, float_labels, strict=True):
        members = [h for h, m in zip(grad_leaves, float_labels, strict=True) if m == lab]
        want.append(_clip_sum(g, jnp.sqrt(sum(_sq(h) for h in members)), c / 2))
        np.testing.assert_allclose(
            grouped.norms[lab], jnp.sqrt(sum(_sq(h) for h in members)), rtol=RTOL, atol=1e-14
        )
    assert_tree_close(grouped.grad, jax.tree.unflatten(treedef, want), case.params, rtol=RTOL)


def test_language_model_with_padding_mask():
    config = lm.Config(vocab_size=16, width=16, num_heads=2, num_layers=2, seq_len=8)
    shapes = jax.eval_shape(lambda key: lm.init(key, config), jax.random.key(0))
    params = models.fill("clipping_lm", shapes)
    apply_fn = lm.make_apply_fn(config)
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, 16, (4, 8)), jnp.int32)
    targets = jnp.asarray(rng.integers(0, 16, (4, 8)), jnp.int32)
    lengths = np.array([8, 5, 3, 0])  # the last sequence is all padding
    mask = jnp.asarray(np.arange(8)[None, :] < lengths[:, None], jnp.float64)

    def loss_n(p, t, y, w):
        logits = apply_fn(p, t[None])[0]
        return jnp.sum(w * optax.softmax_cross_entropy_with_integer_labels(logits, y))

    grads = jax.vmap(jax.grad(loss_n), (None, 0, 0, 0))(params, tokens, targets, mask)
    norms = jnp.sqrt(sum(_sq(g) for g in jax.tree.leaves(grads)))
    c = float(norms[1])  # the longest sequence is clipped, the others not
    out = jax.jit(
        lambda p, b: curvjax.clipped_grad(apply_fn, p, b, clip_norm=c),
        compiler_options=reference.FAST_COMPILE,
    )(params, (tokens, targets, mask))
    assert_tree_close(out.grad, _clip_sum(grads, norms, c), params, rtol=RTOL)
    np.testing.assert_allclose(out.norms, norms, rtol=RTOL, atol=1e-14)
    assert float(out.clipped_fraction) == pytest.approx(1 / 3)  # 3 sequences with a weight


def test_no_recompilation_when_the_number_of_real_examples_changes():
    case = models.get_case("mlp_tanh")
    x, y = models.make_batch(case, "cross_entropy")
    chex.clear_trace_counter()

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(params, batch):
        return curvjax.clipped_grad(case.apply_fn, params, batch, clip_norm=0.1)

    results = []
    for count in (5, 3, 1):
        mask = jnp.asarray(np.arange(5) < count, jnp.float64)
        results.append(step(case.params, (x, y, mask)))
    # the padded batch with 3 real examples equals the unpadded batch of those 3
    alone = curvjax.clipped_grad(case.apply_fn, case.params, (x[:3], y[:3]), clip_norm=0.1)
    assert_tree_close(results[1].grad, alone.grad, case.params, rtol=RTOL)
    assert float(results[1].clipped_fraction) == float(alone.clipped_fraction)


def test_extract_quantity_is_independent_of_the_reduction():
    case = models.get_case("cnn_grouped")
    batch = models.make_batch(case, "mse")
    want = curvjax.clipped_grad(case.apply_fn, case.params, batch, clip_norm=0.3, loss="mse")
    for reduction in ("mean", "sum"):
        out = curvjax.extract(
            case.apply_fn,
            case.params,
            batch,
            ["clipped_grad", "batch_l2"],
            loss="mse",
            reduction=reduction,
            options={"clipped_grad": {"clip_norm": 0.3}},
        )
        assert_tree_close(out["clipped_grad"].grad, want.grad, case.params, rtol=RTOL)
        np.testing.assert_allclose(out["clipped_grad"].norms, want.norms, rtol=RTOL)


def test_dict_clip_norms_per_group_and_unclipped_limit():
    case = models.get_case("mlp_tanh")
    x, y = models.make_batch(case, "cross_entropy")
    labels = _labels(case.params)
    names = sorted(set(jax.tree.leaves(labels)))
    grads = _per_example(case.apply_fn, case.params, (x, y, jnp.ones(5)))
    # a huge norm clips nothing: the clipped sum is the gradient of the summed loss
    out = curvjax.clipped_grad(
        case.apply_fn, case.params, (x, y), clip_norm={k: 1e9 for k in names}, groups=labels
    )
    assert_tree_close(out.grad, jax.tree.map(lambda g: g.sum(0), grads), case.params, rtol=RTOL)
    assert all(float(f) == 0.0 for f in out.clipped_fraction.values())
    # a different norm per group
    limits = {k: 0.05 * (i + 1) for i, k in enumerate(names)}
    out = curvjax.clipped_grad(case.apply_fn, case.params, (x, y), clip_norm=limits, groups=labels)
    flat, treedef = jax.tree.flatten(grads)
    label_leaves = jax.tree.leaves(labels)
    want = []
    for g, lab in zip(flat, label_leaves, strict=True):
        members = [h for h, m in zip(flat, label_leaves, strict=True) if m == lab]
        want.append(_clip_sum(g, jnp.sqrt(sum(_sq(h) for h in members)), limits[lab]))
    assert_tree_close(out.grad, jax.tree.unflatten(treedef, want), case.params, rtol=RTOL)


def test_bad_input_gets_clear_errors():
    case = models.get_case("mlp_tanh")
    batch = models.make_batch(case, "cross_entropy")
    fn, p = case.apply_fn, case.params
    with pytest.raises(ValueError, match="per-example"):
        bn = models.get_case("batchnorm_mlp")
        curvjax.clipped_grad(bn.apply_fn, bn.params, models.make_batch(bn, "mse"), clip_norm=1.0)
    with pytest.raises(ValueError, match="positive"):
        curvjax.clipped_grad(fn, p, batch, clip_norm=0.0)
    with pytest.raises(ValueError, match="clip_norm"):
        curvjax.extract(fn, p, batch, ["clipped_grad"])
    with pytest.raises(ValueError, match="groups"):
        curvjax.clipped_grad(fn, p, batch, clip_norm=1.0, groups="layer")
    with pytest.raises(ValueError, match="structure"):
        curvjax.clipped_grad(fn, p, batch, clip_norm=1.0, groups={"a": 0})
    with pytest.raises(ValueError, match="labelled"):
        curvjax.clipped_grad(fn, p, batch, clip_norm={"a": 1.0})
    labels = _labels(p)
    with pytest.raises(ValueError, match="no entry"):
        curvjax.clipped_grad(fn, p, batch, clip_norm={"nope": 1.0}, groups=labels)
    with pytest.raises(ValueError, match="NaN"):
        curvjax.clipped_grad(fn, p, (batch[0] * jnp.nan, batch[1]), clip_norm=1.0)
