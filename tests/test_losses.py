"""Losses against jax.hessian, independent loss formulas, and MC unbiasedness."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import curvjax
from curvjax import losses

C = 4


def _output_and_target(name, seed):
    f = jax.random.normal(jax.random.key(seed), (C,), dtype=jnp.float64) * 2.0
    if name == "cross_entropy":
        return f, jnp.asarray(seed % C)
    return f, jax.random.normal(jax.random.key(seed + 100), (C,), dtype=jnp.float64)


def _independent_value(name, f, y):
    if name == "cross_entropy":
        return optax.softmax_cross_entropy_with_integer_labels(f, y)
    return jnp.sum((f - y) ** 2)


@pytest.mark.parametrize("name", ["cross_entropy", "mse"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_value_grad_and_hessian_factor(name, seed):
    loss = losses.resolve(name)
    f, y = _output_and_target(name, seed)
    np.testing.assert_allclose(loss.value(f, y), _independent_value(name, f, y), rtol=1e-12)
    np.testing.assert_allclose(
        loss.output_grad(f, y), jax.grad(_independent_value, argnums=1)(name, f, y), rtol=1e-12
    )
    s = loss.hessian_factor(f, y)
    hess = jax.hessian(_independent_value, argnums=1)(name, f, y)
    np.testing.assert_allclose(s @ s.T, hess, atol=1e-13)


@pytest.mark.parametrize("name", ["cross_entropy", "mse"])
def test_mc_factor_is_unbiased(name):
    """Mean of S̃S̃ᵀ over K independent keys converges to H: every entry within 5 standard errors."""
    loss = losses.resolve(name)
    f, y = _output_and_target(name, 3)
    num_keys, mc_samples = 4000, 2
    keys = jax.random.split(jax.random.key(7), num_keys)
    factors = jax.vmap(lambda k: loss.mc_factor(k, f, mc_samples))(keys)
    assert factors.shape == (num_keys, C, mc_samples)
    outer = jnp.einsum("kcm,kdm->kcd", factors, factors)
    mean = outer.mean(0)
    stderr = outer.std(0) / np.sqrt(num_keys)
    hess = jax.hessian(_independent_value, argnums=1)(name, f, y)
    assert np.all(np.abs(mean - hess) <= 5 * stderr + 1e-12)
    # The test can fail: a biased estimator (e.g. without the 1/√M scaling) is rejected.
    assert not np.all(np.abs(mc_samples * mean - hess) <= 5 * stderr + 1e-12)


def test_resolve_errors_and_custom_loss():
    with pytest.raises(ValueError, match="unsupported loss 'hinge'"):
        losses.resolve("hinge")
    half_mse = losses.Loss(
        name="half_mse",
        value=lambda f, y: 0.5 * jnp.sum((f - y) ** 2),
        hessian_factor=lambda f, y: jnp.eye(f.shape[0], dtype=f.dtype),
    )
    assert losses.resolve(half_mse) is half_mse
    with pytest.raises(ValueError, match="no predictive distribution"):
        half_mse.mc_factor(jax.random.key(0), jnp.zeros(3), 1)
    apply_fn = lambda p, x: x @ p["w"]
    params = {"w": jax.random.normal(jax.random.key(0), (3, 2), dtype=jnp.float64)}
    x = jax.random.normal(jax.random.key(1), (5, 3), dtype=jnp.float64)
    y = jax.random.normal(jax.random.key(2), (5, 2), dtype=jnp.float64)
    g_half = curvjax.grad(apply_fn, params, (x, y), loss=half_mse)["w"]
    g_mse = curvjax.grad(apply_fn, params, (x, y), loss="mse")["w"]
    np.testing.assert_allclose(2 * g_half, g_mse, rtol=1e-12)
    pe = curvjax.per_example_grads(apply_fn, params, (x, y), loss=half_mse, reduction="sum")
    np.testing.assert_allclose(2 * pe["w"].sum(0), 5 * g_mse, rtol=1e-12)


def test_reduction_scale():
    assert losses.resolve("mse") is losses.mse
    with pytest.raises(ValueError, match="unsupported reduction 'max'"):
        curvjax.grad(
            lambda p, x: x @ p,
            jnp.ones((2, 2)),
            (jnp.ones((3, 2)), jnp.ones((3, 2))),
            loss="mse",
            reduction="max",
        )
