"""DP-SGD transforms: the noise's mean and standard deviation over many keys, the noise-free case
against the clipped mean, chaining, and equality with optax.contrib on the same per-example grads."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import curvjax
from curvjax import privacy
from curvjax.optim import DpAggregateState, dp_aggregate, dpsgd

CLIP = 0.7
SIGMA = 1.3
B = 6.5  # expected batch size q N: need not be an integer, nor the realised size


def _clipped_sum():
    """A params-shaped clipped sum with a None leaf (a non-float parameter)."""
    rng = np.random.default_rng(0)
    return {
        "dense": {
            "kernel": jnp.asarray(rng.normal(size=(3, 4))),
            "bias": jnp.asarray(rng.normal(size=4)),
        },
        "step": None,
    }


def _flat(tree):
    return np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree)])


@functools.cache
def _many_updates(num_keys):
    """``[K, D]``: the transform's output for ``num_keys`` independent keys (vmapped state)."""
    tx = dp_aggregate(CLIP, SIGMA, 0, expected_batch_size=B)
    keys = jax.random.split(jax.random.key(1), num_keys)
    step = jax.jit(jax.vmap(lambda k: tx.update(_clipped_sum(), DpAggregateState(rng_key=k))[0]))
    out = step(keys)
    assert out["step"] is None
    leaves = [np.asarray(x).reshape(num_keys, -1) for x in jax.tree.leaves(out)]
    return np.concatenate(leaves, axis=1)


def test_mean_over_keys_is_the_clipped_sum_over_b():
    num_keys = 4000
    samples = _many_updates(num_keys)
    expected = _flat(_clipped_sum()) / B
    # each coordinate's mean has standard error σ c / (B √K); 16 coordinates at 5 SE: a false
    # alarm has probability ~1e-5, while dividing by the wrong size (e.g. 6 or 7 instead of 6.5)
    # moves some coordinate by over 8 SE
    standard_error = SIGMA * CLIP / (B * np.sqrt(num_keys))
    z = np.abs(samples.mean(axis=0) - expected) / standard_error
    assert z.max() < 5, z


def test_noise_standard_deviation_and_independence():
    num_keys = 4000
    samples = _many_updates(num_keys)
    noise = samples - _flat(_clipped_sum())[None] / B
    dim = noise.shape[1]
    target = SIGMA * CLIP / B
    # pooled std over K·D i.i.d. normal draws: relative standard error 1 / √(2 K D) ≈ 0.28%;
    # 5 SE is 1.4%, far below the error of a missing or extra factor
    pooled = np.sqrt(np.mean(noise**2))
    assert abs(pooled / target - 1) < 5 / np.sqrt(2 * num_keys * dim)
    # every coordinate on its own: relative SE 1 / √(2K) ≈ 1.1%, 5 SE
    per_coordinate = np.sqrt(np.mean(noise**2, axis=0))
    assert np.max(np.abs(per_coordinate / target - 1)) < 5 / np.sqrt(2 * num_keys)
    # independent across coordinates and leaves (a key reused between leaves would correlate
    # them fully): the sample correlation of independent normals has SE 1/√K ≈ 0.016; 120 pairs
    corr = np.corrcoef(noise, rowvar=False)
    off_diagonal = corr[~np.eye(dim, dtype=bool)]
    assert np.max(np.abs(off_diagonal)) < 5 / np.sqrt(num_keys)


def test_zero_noise_gives_exactly_the_clipped_sum_over_b():
    clipped = _clipped_sum()
    tx = dp_aggregate(l2_norm_clip=CLIP, noise_multiplier=0.0, seed=3, expected_batch_size=B)
    out, _ = jax.jit(tx.update)(clipped, tx.init(clipped))
    # σ = 0 adds an exact 0; XLA may divide as a product with 1/B: one rounding, 2.2e-16
    np.testing.assert_allclose(_flat(out), _flat(clipped) / B, rtol=3e-16, atol=0)
    assert out["step"] is None


def test_consecutive_steps_draw_different_noise_and_same_seed_repeats():
    clipped = _clipped_sum()
    tx = dp_aggregate(CLIP, SIGMA, 5, expected_batch_size=B)
    update = jax.jit(tx.update)
    state = tx.init(clipped)
    first, state = update(clipped, state)
    second, _ = update(clipped, state)
    assert np.min(np.abs(_flat(first) - _flat(second))) > 0
    again, _ = update(clipped, tx.init(clipped))
    np.testing.assert_array_equal(_flat(first), _flat(again))
    other = dp_aggregate(CLIP, SIGMA, jax.random.key(6), expected_batch_size=B)
    third, _ = other.update(clipped, other.init(clipped))
    assert np.min(np.abs(_flat(first) - _flat(third))) > 0


def test_noise_multiplier_and_key_may_be_traced():
    """Built inside jit with a traced σ and key (one compilation for runs at several ε)."""
    clipped = _clipped_sum()

    @jax.jit
    def privatise(sigma, key):
        tx = dp_aggregate(CLIP, sigma, key, expected_batch_size=B)
        return tx.update(clipped, tx.init(clipped))[0]

    eager = dp_aggregate(CLIP, SIGMA, jax.random.key(9), expected_batch_size=B)
    want, _ = eager.update(clipped, eager.init(clipped))
    np.testing.assert_allclose(
        _flat(privatise(SIGMA, jax.random.key(9))), _flat(want), rtol=1e-14, atol=1e-15
    )
    np.testing.assert_allclose(
        _flat(privatise(0.0, jax.random.key(9))), _flat(clipped) / B, rtol=3e-16, atol=0
    )


def test_chains_in_front_of_adam():
    params = jax.tree.map(lambda x: None if x is None else jnp.zeros_like(x), _clipped_sum())
    private = optax.chain(dp_aggregate(CLIP, 0.0, 0, expected_batch_size=B), optax.adam(0.1))
    plain = optax.adam(0.1)  # the reference: adam on the clipped mean
    private_state, plain_state = private.init(params), plain.init(params)
    for scale in (1.0, -2.0, 3.0):
        clipped = jax.tree.map(lambda x, s=scale: s * x, _clipped_sum())
        got, private_state = private.update(clipped, private_state, params)
        want, plain_state = plain.update(
            jax.tree.map(lambda x: x / B, clipped), plain_state, params
        )
        np.testing.assert_allclose(_flat(got), _flat(want), rtol=1e-14)
        params = optax.apply_updates(params, got)


def test_dpsgd_is_sgd_with_momentum_on_the_clipped_mean():
    lr, momentum = 0.3, 0.9
    params = {"w": jnp.array([1.0, -2.0, 0.5])}
    tx = dpsgd(lr, CLIP, 0.0, 0, momentum, expected_batch_size=B)
    state = tx.init(params)
    velocity, reference = np.zeros(3), np.asarray(params["w"])
    for step in range(3):
        clipped = {"w": jnp.array([0.4, -1.0, 2.0]) * (step + 1)}
        update, state = tx.update(clipped, state, params)
        params = optax.apply_updates(params, update)
        velocity = np.asarray(clipped["w"]) / B + momentum * velocity  # heavy ball, v ← g + m v
        reference = reference - lr * velocity
        np.testing.assert_allclose(np.asarray(params["w"]), reference, rtol=1e-14)


def test_equals_optax_contrib_on_the_same_per_example_grads():
    """Same key, same draws: ours (clipped sum) · B equals optax's (per-example grads) · N."""
    rng = np.random.default_rng(2)
    num = 5
    per_example = {
        "a": jnp.asarray(rng.normal(size=(num, 3, 2))),
        "b": jnp.asarray(rng.normal(size=(num, 4))),
    }
    # float64 reference clipping: global norm over all leaves of each example
    norms = np.sqrt(
        sum(np.sum(np.asarray(g).reshape(num, -1) ** 2, axis=1) for g in per_example.values())
    )
    assert np.sum(norms > CLIP) >= 3  # clipping is active for most examples
    factor = np.minimum(1.0, CLIP / norms)
    clipped_sum = {
        k: jnp.asarray(np.tensordot(factor, np.asarray(g), axes=1)) for k, g in per_example.items()
    }

    ours = dp_aggregate(CLIP, SIGMA, jax.random.key(7), expected_batch_size=B)
    theirs = optax.contrib.differentially_private_aggregate(CLIP, SIGMA, jax.random.key(7))
    params = jax.tree.map(lambda g: g[0], per_example)
    ours_state, theirs_state = ours.init(params), theirs.init(params)
    for _ in range(2):  # the second step checks that the key is carried the same way
        got, ours_state = ours.update(clipped_sum, ours_state)
        want, theirs_state = theirs.update(per_example, theirs_state)
        np.testing.assert_allclose(_flat(got) * B, _flat(want) * num, rtol=1e-12)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"l2_norm_clip": 0.0}, "l2_norm_clip"),
        ({"l2_norm_clip": -1.0}, "l2_norm_clip"),
        ({"noise_multiplier": -0.1}, "noise_multiplier"),
        ({"expected_batch_size": 0}, "expected_batch_size"),
    ],
)
def test_invalid_arguments_are_named(kwargs, name):
    args = {"l2_norm_clip": 1.0, "noise_multiplier": 1.0, "seed": 0, "expected_batch_size": 8}
    with pytest.raises(ValueError, match=name):
        dp_aggregate(**(args | kwargs))
    with pytest.raises(ValueError, match=name):
        dpsgd(0.1, **(args | kwargs))


def test_integer_leaf_is_refused():
    tx = dp_aggregate(1.0, 1.0, 0, expected_batch_size=4)
    with pytest.raises(TypeError, match="floating-point"):
        tx.update({"w": jnp.ones(3), "count": jnp.array(2)}, tx.init(None))


def test_one_private_step_with_clipped_grad_against_vmap_grad():
    """Poisson batch -> clipped_grad (mask as weights) -> dp_aggregate with σ = 0, against the
    float64 reference: vmap(grad) on the sampled examples, clipped and summed in numpy, over q N."""
    rng = np.random.default_rng(4)
    num_examples, rate, padded = 30, 0.3, 20
    x = jnp.asarray(rng.normal(size=(num_examples, 5)))
    y = jnp.asarray(rng.integers(0, 3, size=num_examples))
    params = {
        "w1": jnp.asarray(rng.normal(size=(5, 6))),
        "b1": jnp.asarray(rng.normal(size=6)),
        "w2": jnp.asarray(rng.normal(size=(6, 3))),
    }

    def apply_fn(p, inputs):
        return jnp.tanh(inputs @ p["w1"] + p["b1"][None]) @ p["w2"]

    clip = 3.0  # between the smallest and the largest per-example norm of this model
    expected_size = rate * num_examples
    tx = optax.chain(dp_aggregate(clip, 0.0, 0, expected_batch_size=expected_size), optax.sgd(1.0))

    @jax.jit
    def step(params, state, key):
        sample = privacy.poisson_batch(key, num_examples, rate, padded)
        batch = (x[sample.indices], y[sample.indices], sample.mask)
        clipped = curvjax.clipped_grad(apply_fn, params, batch, clip_norm=clip)
        update, state = tx.update(clipped.grad, state, params)
        return update, state, sample

    update, _, sample = step(params, tx.init(params), jax.random.key(3))
    real = np.asarray(sample.indices)[np.asarray(sample.mask) > 0]
    assert 0 < len(real) == int(sample.num_sampled) < padded

    def example_loss(p, xn, yn):
        return -jax.nn.log_softmax(apply_fn(p, xn[None])[0])[yn]

    per_example = jax.vmap(jax.grad(example_loss), in_axes=(None, 0, 0))(params, x[real], y[real])
    flat = np.concatenate([np.asarray(per_example[k]).reshape(len(real), -1) for k in params], 1)
    norms = np.linalg.norm(flat, axis=1)
    assert np.any(norms > clip) and np.any(norms < clip)  # both branches of the clip are used
    reference = -(np.minimum(1.0, clip / norms) @ flat) / expected_size  # sgd(1): minus the grad
    got = np.concatenate([np.ravel(update[k]) for k in params])
    # float64 sums over 20 examples: a few hundred ulps of the largest entry
    np.testing.assert_allclose(got, reference, rtol=1e-10, atol=1e-13 * np.abs(reference).max())
