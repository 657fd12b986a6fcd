"""Edge cases of ``curvjax.clipped_grad`` against float64 ``vmap(grad)`` + clip + sum.

Parameters shared by several taps through different transforms, labelled groups that split the
leaves of one tap, int and unused leaves, an all-padding batch, an example whose gradient is
exactly zero, clipping norms traced under ``jit`` / ``vmap``, float32 without x64, per-position
weights of a sequence model, and a batch sharded over several CPU devices.
"""

import functools
import sys
import textwrap

import jax
import jax.numpy as jnp
import models
import numpy as np
import optax
import pytest
import reference
from helpers import run_on_host_devices

import curvjax
from curvjax._src import leafwise, quantities

# float64 sums of a few dozen O(1) products on both sides; the clipping factors come from norms
# that agree to ~1e-15, so 1e-10 relative leaves a margin of about 1e4 over rounding
RTOL = 1e-10
ATOL = 1e-13
N = 5
WEIGHTS = jnp.asarray([1.0, 0.5, 2.0, 1.0, 0.0])  # a padded example last


def _batch(seed=0):
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.normal(size=(N, 4))), jnp.asarray(rng.integers(0, 3, N), jnp.int32)


def _params(seed, **shapes):
    rng = np.random.default_rng(seed)
    return {k: jnp.asarray(rng.normal(size=s)) for k, s in shapes.items()}


@functools.partial(jax.jit, static_argnums=0, compiler_options=reference.FAST_COMPILE)
def _per_example_grads(apply_fn, params, inputs, targets, weights):
    """``ĝ_n = ∇_θ Σ_p w_{n,p} ℓ(f_{n,p}, y_{n,p})`` from ``vmap(grad)``: ``[N, ...]`` per leaf."""

    def loss_n(p, x_n, y_n, w_n):
        logits = apply_fn(p, x_n[None])[0]
        return jnp.sum(w_n * optax.softmax_cross_entropy_with_integer_labels(logits, y_n))

    return jax.vmap(jax.grad(loss_n), (None, 0, 0, 0))(params, inputs, targets, weights)


def _reference(apply_fn, params, inputs, targets, weights, clip_norm, groups=None):
    """``Σ_n min(1, c/‖ĝ_{n,γ}‖) ĝ_n`` per group ``γ`` from ``vmap(grad)`` of the weighted loss.

    ``groups``: None (one norm) or a dict like ``params`` of labels; ``weights`` ``[N]`` or
    ``[N, T]``. Returns ``(clipped sum, {label: norms [N]})``.
    """
    grads = _per_example_grads(apply_fn, params, inputs, targets, weights)
    leaves, treedef = jax.tree.flatten(grads)
    labels = [None] * len(leaves) if groups is None else jax.tree.leaves(groups)
    sq = [jnp.sum(g.reshape(g.shape[0], -1) ** 2, axis=1) for g in leaves]
    norms = {
        lab: jnp.sqrt(sum(s for s, m in zip(sq, labels, strict=True) if m == lab)) for lab in labels
    }
    limits = clip_norm if isinstance(clip_norm, dict) else dict.fromkeys(labels, clip_norm)
    clipped = []
    for g, lab in zip(leaves, labels, strict=True):
        factor = jnp.minimum(1.0, limits[lab] / jnp.where(norms[lab] > 0, norms[lab], 1.0))
        clipped.append(jnp.tensordot(factor, g, axes=1))
    return jax.tree.unflatten(treedef, clipped), norms


def _between(norms, real):
    """A clipping norm halfway between the two middle norms of the real examples: some are
    clipped, some not, and none sits at the threshold where rounding could flip it."""
    values = np.sort(np.asarray(norms)[real])
    middle = len(values) // 2
    return float(0.5 * (values[middle - 1] + values[middle]))


def _close(got, want, rtol=RTOL, atol=ATOL):
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=rtol, atol=atol)


def _shared_apply(p, x):
    """``w`` read by three taps: as is, doubled, and transposed."""
    h = jnp.tanh(x @ p["w"]) + jnp.tanh(x @ (2 * p["w"]))
    return jnp.tanh(h @ p["w"].T) @ p["v"]


def test_parameter_used_by_several_taps_through_different_transforms():
    params = _params(1, w=(4, 4), v=(4, 3))
    x, y = _batch()
    for groups in (None, {"w": "w", "v": "v"}):
        want, norms = _reference(_shared_apply, params, x, y, WEIGHTS, 0.5, groups)
        out = curvjax.clipped_grad(
            _shared_apply, params, (x, y, WEIGHTS), clip_norm=0.5, groups=groups and "leaf"
        )
        _close(out.grad, want)
        got = [out.norms] if groups is None else jax.tree.leaves(out.norms)
        _close(got, list(norms.values()))


def _split_apply(p, x):
    """One dense tap whose parameter input ``w1 + w2`` mixes two groups, plus a bias."""
    return x @ (p["w1"] + p["w2"]) + p["b"][None]


def _concat_apply(p, x):
    """One tap reading the first columns of ``[w1 w2]``: half of ``w2`` unused."""
    return x @ jnp.concatenate([p["w1"], p["w2"]], axis=1)[:, :3] + p["b"][None]


@pytest.mark.parametrize("apply_fn", [_split_apply, _concat_apply])
def test_groups_that_split_the_parameter_input_of_one_tap(apply_fn):
    params = _params(2, w1=(4, 3), w2=(4, 3), b=(3,))
    x, y = _batch()
    groups = {"w1": "a", "w2": "b", "b": "a"}
    limits = {"a": 0.3, "b": 0.7}
    want, norms = _reference(apply_fn, params, x, y, WEIGHTS, limits, groups)
    out = curvjax.clipped_grad(apply_fn, params, (x, y, WEIGHTS), clip_norm=limits, groups=groups)
    _close(out.grad, want)
    _close(out.norms, norms)
    want, _ = _reference(apply_fn, params, x, y, WEIGHTS, 0.4, {k: k for k in params})
    _close(
        curvjax.clipped_grad(apply_fn, params, (x, y, WEIGHTS), clip_norm=0.4, groups="leaf").grad,
        want,
    )


TRANSFORMS = {
    # the tap's parameter input is a product of two leaves of different groups
    "param_side_matmul": lambda p, x: jnp.tanh(x @ (p["w1"] @ p["w2"])) + p["v"][None, :3],
    # one select tap with two parameter inputs from different groups
    "select_two_params": lambda p, x: jnp.where(x > 0, p["w1"][0][None], p["v"][None]) @ p["w2"],
    # parameters reaching the outputs through a static sum added to the activations
    "static_sum_added": lambda p, x: x @ p["w2"] + jnp.sum(p["w1"]) + jnp.sum(p["v"] ** 2),
}


@pytest.mark.parametrize("name", TRANSFORMS)
def test_parameter_side_transforms_across_groups(name):
    apply_fn = TRANSFORMS[name]
    params = _params(7, w1=(4, 4), w2=(4, 3), v=(4,))
    x, y = _batch()
    groups = {"w1": "a", "w2": "b", "v": "b"}
    for labels, arg in ((None, None), ({k: k for k in params}, "leaf"), (groups, groups)):
        want, _ = _reference(apply_fn, params, x, y, WEIGHTS, 0.4, labels)
        got = curvjax.clipped_grad(apply_fn, params, (x, y, WEIGHTS), clip_norm=0.4, groups=arg)
        _close(got.grad, want)


def _kept_apply(p, x):
    """Sequence layers with T = 16 positions and few features: their per-example gradients are
    formed for the norms and kept for the sum, read back through a transpose, a reshape of a flat
    leaf and a convolution kernel."""
    h = jnp.tanh(x @ p["wt"].T) + jnp.tanh(x @ p["wf"].reshape(2, 3))
    h = jax.lax.conv_general_dilated(
        h, p["k"], (1,), "SAME", dimension_numbers=("NWC", "WIO", "NWC")
    )
    return jnp.mean(jnp.tanh(h), axis=1) @ p["h"]


def test_kept_per_example_gradients_through_relayouts():
    params = _params(8, wt=(3, 2), wf=(6,), k=(3, 3, 3), h=(3, 3))
    rng = np.random.default_rng(8)
    x = jnp.asarray(rng.normal(size=(N, 16, 2)))
    y = jnp.asarray(rng.integers(0, 3, N), jnp.int32)
    groups = {"wt": "a", "wf": "a", "k": "b", "h": "b"}
    # the case exercises the kept path: wt, wf and k keep their per-example gradients
    p, _ = quantities.compute(
        _kept_apply, params, (x, y), ("batch_l2",), loss="cross_entropy", reduction="sum"
    )
    kept = leafwise.sq_norms_keeping(p)[1]
    names = {p.model.leaf_names[p.model.float_index[k]] for k in kept}
    assert names == {"params['k']", "params['wf']", "params['wt']"}
    for labels, arg in ((None, None), ({k: k for k in params}, "leaf"), (groups, groups)):
        want, _ = _reference(_kept_apply, params, x, y, WEIGHTS, 0.3, labels)
        got = curvjax.clipped_grad(_kept_apply, params, (x, y, WEIGHTS), clip_norm=0.3, groups=arg)
        _close(got.grad, want)


def _int_leaf_apply(p, x):
    return (x @ p["w"]) * p["k"].astype(x.dtype)


def test_int_and_unused_leaves():
    params = _params(3, w=(4, 3), unused=(2, 2)) | {"k": jnp.array(3, jnp.int32)}
    x, y = _batch()
    want, _ = _reference(lambda p, x: 3.0 * (x @ p["w"]), {"w": params["w"]}, x, y, WEIGHTS, 0.3)
    for groups in (None, "leaf", {"w": "a", "unused": "b", "k": "a"}):
        out = curvjax.clipped_grad(
            _int_leaf_apply, params, (x, y, WEIGHTS), clip_norm=0.3, groups=groups
        )
        assert out.grad["k"] is None
        np.testing.assert_array_equal(out.grad["unused"], 0.0)
        _close(out.grad["w"], want["w"])
    # the unused leaf's group has norm 0 and clips nothing
    np.testing.assert_array_equal(out.norms["b"], 0.0)
    assert float(out.clipped_fraction["b"]) == 0.0


def test_all_padding_batch_and_zero_gradient_examples():
    params = _params(4, w1=(4, 3), w2=(4, 3), b=(3,))
    x, y = _batch()
    # no real example: zero sum, zero norms, nothing clipped, no NaN
    for groups in (None, "leaf"):
        out = jax.jit(
            lambda b, g=groups: curvjax.clipped_grad(
                _split_apply, params, b, clip_norm=0.3, groups=g
            )
        )((x, y, jnp.zeros(N)))
        _close(out.grad, jax.tree.map(jnp.zeros_like, params), atol=0)
        for leaf in jax.tree.leaves((out.norms, out.clipped_fraction)):
            np.testing.assert_array_equal(leaf, 0.0)
    # an input of zeros through a layer without bias: that example's gradient is exactly 0
    x0 = x.at[1].set(0.0)

    def apply_fn(p, x):
        return x @ p["w1"]

    for groups in (None, "leaf"):
        out = curvjax.clipped_grad(
            apply_fn, {"w1": params["w1"]}, (x0, y, WEIGHTS), clip_norm=0.3, groups=groups
        )
        norms = out.norms if groups is None else out.norms["w1"]
        assert float(norms[1]) == 0.0
        want, _ = _reference(apply_fn, {"w1": params["w1"]}, x0, y, WEIGHTS, 0.3)
        _close(out.grad, want)


def test_clip_norms_traced_under_jit_and_vmap():
    params = _params(5, w1=(4, 3), w2=(4, 3), b=(3,))
    x, y = _batch()
    groups = {"w1": "a", "w2": "b", "b": "a"}
    limits = {"a": 0.3, "b": 0.5}
    out = jax.jit(
        lambda c: curvjax.clipped_grad(
            _split_apply, params, (x, y, WEIGHTS), clip_norm=c, groups=groups
        ),
        compiler_options=reference.FAST_COMPILE,
    )(limits)
    _close(out.grad, _reference(_split_apply, params, x, y, WEIGHTS, limits, groups)[0])
    limits = jnp.asarray([0.1, 0.5, 2.0])
    out = jax.vmap(
        lambda c: curvjax.clipped_grad(_split_apply, params, (x, y, WEIGHTS), clip_norm=c)
    )(limits)
    for i, c in enumerate(np.asarray(limits)):
        want, _ = _reference(_split_apply, params, x, y, WEIGHTS, float(c))
        _close(jax.tree.map(lambda a, i=i: a[i], out.grad), want)


@pytest.mark.parametrize("name", ["nnx_mlp", "equinox_conv"])
def test_float32_without_x64(name):
    case = models.get_case(name)
    x, y = models.make_batch(case, "cross_entropy")
    p32 = jax.tree.map(lambda a: np.asarray(a, np.float32), case.params)
    x32 = np.asarray(x, np.float32)
    # the reference runs in float64 on the very float32 values
    p64 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), p32)
    _, norms = _reference(case.apply_fn, p64, jnp.asarray(x32, jnp.float64), y, WEIGHTS, 1.0)
    c = _between(norms[None], np.asarray(WEIGHTS) > 0)
    want, norms = _reference(case.apply_fn, p64, jnp.asarray(x32, jnp.float64), y, WEIGHTS, c)
    with jax.enable_x64(False):
        out = jax.jit(lambda p, b: curvjax.clipped_grad(case.apply_fn, p, b, clip_norm=c))(
            jax.tree.map(jnp.asarray, p32),
            (jnp.asarray(x32), jnp.asarray(y, jnp.int32), jnp.asarray(WEIGHTS, jnp.float32)),
        )
    assert {leaf.dtype for leaf in jax.tree.leaves((out.grad, out.norms))} == {np.dtype("float32")}
    # float32 sums of a few dozen O(1) terms, each rounded at eps ≈ 1.2e-7, and clipping factors
    # from norms with ~eps relative error: 100 eps of each leaf's largest entry is a wide margin
    # (measured: ~4 eps) that still catches a wrong factor or a dropped term
    eps = float(np.finfo(np.float32).eps)
    for got, ref in zip(jax.tree.leaves(out.grad), jax.tree.leaves(want), strict=True):
        scale = float(np.max(np.abs(ref)))
        np.testing.assert_allclose(np.asarray(got, np.float64), ref, rtol=0, atol=100 * eps * scale)
    np.testing.assert_allclose(out.norms, norms[None], rtol=100 * eps)


def test_sequence_model_with_per_position_weights():
    apply_fn, params = models.equinox_lm(
        vocab_size=12, width=8, num_heads=2, num_layers=1, max_len=6
    )
    rng = np.random.default_rng(6)
    tokens = jnp.asarray(rng.integers(0, 12, (4, 6)), jnp.int32)
    targets = jnp.asarray(rng.integers(0, 12, (4, 6)), jnp.int32)
    lengths = np.array([6, 4, 1, 0])  # the last sequence is all padding
    mask = np.arange(6)[None, :] < lengths[:, None]
    weights = jnp.asarray(rng.uniform(0.0, 2.0, (4, 6)) * mask)
    _, norms = _reference(apply_fn, params, tokens, targets, weights, 1.0)
    c = _between(norms[None], lengths > 0)
    want, norms = _reference(apply_fn, params, tokens, targets, weights, c)
    out = jax.jit(
        lambda p, b: curvjax.clipped_grad(apply_fn, p, b, clip_norm=c),
        compiler_options=reference.FAST_COMPILE,
    )(params, (tokens, targets, weights))
    _close(out.grad, want)
    np.testing.assert_allclose(out.norms, norms[None], rtol=RTOL, atol=1e-14)
    real = lengths > 0
    assert float(out.clipped_fraction) == pytest.approx(np.mean(np.asarray(norms[None])[real] > c))


SHARDED = textwrap.dedent(
    """
    import jax, jax.numpy as jnp, numpy as np, optax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    import curvjax
    jax.config.update("jax_enable_x64", True)
    assert jax.device_count() == 4, jax.devices()
    rng = np.random.default_rng(0)
    params = {"w1": jnp.asarray(rng.normal(size=(3, 5))), "b1": jnp.zeros(5),
              "w2": jnp.asarray(rng.normal(size=(5, 3)))}
    def apply_fn(p, x):
        return jnp.tanh(x @ p["w1"] + p["b1"][None]) @ p["w2"]
    x = jnp.asarray(rng.normal(size=(8, 3)))
    y = jnp.arange(8) % 3
    w = jnp.asarray((np.arange(8) < 6).astype(float))  # two padded examples
    def loss_n(p, x_n, y_n, w_n):
        logits = apply_fn(p, x_n[None])[0]
        return w_n * optax.softmax_cross_entropy_with_integer_labels(logits, y_n)
    g = jax.vmap(jax.grad(loss_n), (None, 0, 0, 0))(params, x, y, w)
    sq = {k: jnp.sum(v.reshape(8, -1) ** 2, 1) for k, v in g.items()}
    norms = jnp.sqrt(sum(sq.values()))
    c = float(np.median(norms[:6]))
    def clip(v, nm):
        return jnp.tensordot(jnp.minimum(1.0, c / jnp.where(nm > 0, nm, 1.0)), v, 1)
    mesh = Mesh(np.array(jax.devices()), ("data",))
    batch = jax.device_put((x, y, w), NamedSharding(mesh, P("data")))
    assert len(batch[0].sharding.device_set) == 4
    fn = jax.jit(lambda p, b, c, groups: curvjax.clipped_grad(
        apply_fn, p, b, clip_norm=c, groups=groups), static_argnums=3)
    out = fn(params, batch, c, None)
    for k in params:
        np.testing.assert_allclose(out.grad[k], clip(g[k], norms), rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(out.norms, norms, rtol=1e-10, atol=1e-14)
    out = fn(params, batch, c, "leaf")
    for k in params:
        nm = jnp.sqrt(sq[k])
        np.testing.assert_allclose(out.grad[k], clip(g[k], nm), rtol=1e-10, atol=1e-14)
        np.testing.assert_allclose(out.norms[k], nm, rtol=1e-10, atol=1e-14)
    print("SHARDED-OK")
    """
)


@pytest.mark.skipif(sys.platform == "win32", reason="uses XLA host-platform devices")
def test_batch_sharded_over_4_devices():
    run_on_host_devices(SHARDED, 4)


def test_extract_token_mean_all_masked_under_jit():
    """An empty token-mean batch under jit (an empty Poisson sample): loss and every quantity 0,
    as `(loss * mask).sum() / max(mask.sum(), 1)` gives, not 0/0 = NaN; outside jit it raises."""
    params = {"w": jnp.ones((4, 3))}
    x = jnp.ones((2, 3, 4))  # [N, T, features]: outputs [N, T, 3]
    y = jnp.zeros((2, 3), jnp.int32)

    def run(weights):
        return curvjax.extract(
            lambda p, x: x @ p["w"],
            params,
            (x, y, weights),
            ["clipped_grad", "batch_l2", "ggn_diag"],
            reduction="token_mean",
            options={"clipped_grad": {"clip_norm": 1.0}},
        )

    out = jax.jit(run)(jnp.zeros((2, 3)))
    for value in jax.tree.leaves(out):
        np.testing.assert_array_equal(value, 0.0)
    with pytest.raises(ValueError, match="masked"):
        run(jnp.zeros((2, 3)))
