"""Noisy K-FAC / KFAC-VI: posterior sampling, update rule, schedules, predictive.

References are dense numpy matrices (``np.kron``, ``np.linalg.inv``) built from the factors, the
equations of KFAC-VI (eq. 6-14) written out in numpy, and ``jax.grad`` (tests/reference.py).
"""

from __future__ import annotations

import doctest
import functools
import importlib

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import reference

import curvjax
from curvjax._src.optim.noisy_kfac import (
    NoisyKfacState,
    noisy_kfac,
    noisy_kfac_predict,
    noisy_kfac_sample,
)
from curvjax._src.optim.schedules import proportional_momentum, warmup_polynomial_decay

fast_jit = functools.partial(jax.jit, compiler_options=reference.FAST_COMPILE)
sample_fn = fast_jit(noisy_kfac_sample, static_argnames="num_samples")

I_DIM, O_DIM = 3, 2  # one layer y = x Wᵀ + b with W [O, I]: a non-identity index


def linear_t(params, x):
    """A dense layer with the kernel stored transposed, ``[O, I]``."""
    return x @ params["w"].T + params["b"][None, :]


def mlp(params, x):
    h = jnp.tanh(x @ params["w1"] + params["b1"][None, :])
    return h @ params["w2"] + params["b2"][None, :]


def _spd(rng, n, scale):
    q, _ = np.linalg.qr(rng.normal(size=(n, n)))
    return (q * (scale * np.geomspace(1.0, 20.0, n))) @ q.T


def _hand_index():
    """For ``W [O, I]`` entry ``(o, i)`` (row-major ``o·I + i``): canonical ``i·O + o``."""
    o, i = np.meshgrid(np.arange(O_DIM), np.arange(I_DIM), indexing="ij")
    return (i * O_DIM + o).ravel()


def _damped_kron(a, b, damping, factored):
    """Dense ``F̂ + γI`` of the Kronecker block in canonical order, with the documented split."""
    if not factored:
        return np.kron(a, b) + damping * np.eye(a.shape[0] * b.shape[0])
    pi = np.sqrt((np.trace(a) / a.shape[0]) / (np.trace(b) / b.shape[0]))
    root = np.sqrt(damping)
    return np.kron(a + pi * root * np.eye(a.shape[0]), b + root / pi * np.eye(b.shape[0]))


def _single_layer_setup(seed=0):
    rng = np.random.default_rng(seed)
    params = {
        "w": jnp.asarray(rng.normal(size=(O_DIM, I_DIM))),
        "b": jnp.asarray(rng.normal(size=(O_DIM,))),
    }
    a = _spd(rng, I_DIM, 0.5)
    b = _spd(rng, O_DIM, 2.0)
    bias_block = _spd(rng, O_DIM, 1.0)
    return rng, params, a, b, bias_block


def _curvature(a, b, bias_block, index):
    return {
        "w": curvjax.KroneckerBlock(jnp.asarray(a)[None], jnp.asarray(b)[None], index),
        "b": curvjax.DenseBlock(jnp.asarray(bias_block)),
    }


def _covariance_z(samples, mean, cov):
    """Largest |z|-score of the empirical mean and covariance against ``(mean, cov)``."""
    n = samples.shape[0]
    centered = samples - samples.mean(axis=0, keepdims=True)
    empirical = centered.T @ centered / (n - 1)
    var = np.diag(cov)
    se_cov = np.sqrt((var[:, None] * var[None, :] + cov**2) / n)
    se_mean = np.sqrt(var / n)
    z_cov = np.abs(empirical - cov) / se_cov
    z_mean = np.abs(samples.mean(axis=0) - mean) / se_mean
    return max(z_cov.max(), z_mean.max())


@pytest.mark.parametrize("factored", [True, False])
def test_sample_covariance_matches_damped_kronecker_inverse(factored):
    _, params, a, b, bias_block = _single_layer_setup()
    rho, damping = 0.3, 0.4
    opt = noisy_kfac(
        linear_t,
        jnp.ones((1, I_DIM)),
        learning_rate=0.1,
        rho=rho,
        damping=damping,
        factored_damping=factored,
    )
    state = fast_jit(opt.init)(params)
    index = state[0].factors["w"].index
    np.testing.assert_array_equal(np.asarray(index), _hand_index())
    grads = jax.tree.map(jnp.zeros_like, params)
    # first update: β_0 = 1, so F̂ is exactly the curvature passed in
    curvature = _curvature(a, b, bias_block, index)
    _, state = fast_jit(opt.update)(grads, state, params, curvature=curvature)

    n = 20000
    thetas = sample_fn(params, state, jax.random.key(3), num_samples=n)
    flat = np.concatenate([np.asarray(thetas["w"]).reshape(n, -1), np.asarray(thetas["b"])], 1)
    mean = np.concatenate([np.asarray(params["w"]).ravel(), np.asarray(params["b"])])

    idx = _hand_index()
    sigma_w = rho**2 * np.linalg.inv(_damped_kron(a, b, damping, factored))[np.ix_(idx, idx)]
    sigma_b = rho**2 * np.diag(1.0 / (np.diag(bias_block) + damping))
    cov = np.zeros((8, 8))
    cov[:6, :6], cov[6:, 6:] = sigma_w, sigma_b
    assert _covariance_z(flat, mean, cov) < 5.0

    # the test has power: the transposed layout or the other damping split are rejected
    wrong = cov.copy()
    wrong[:6, :6] = rho**2 * np.linalg.inv(_damped_kron(a, b, damping, factored))
    assert _covariance_z(flat, mean, wrong) > 10.0
    wrong[:6, :6] = (
        rho**2 * np.linalg.inv(_damped_kron(a, b, damping, not factored))[np.ix_(idx, idx)]
    )
    assert _covariance_z(flat, mean, wrong) > 10.0


def test_two_updates_equal_dense_formula_with_momentum_and_sample_axis():
    rng, params, a1, b1, bias1 = _single_layer_setup(1)
    a2, b2, bias2 = _spd(rng, I_DIM, 1.0), _spd(rng, O_DIM, 0.7), _spd(rng, O_DIM, 0.3)
    g1 = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape)), params)
    g2 = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape)), params)
    lrs, mom, wd, beta, damping = (0.3, 0.2), 0.8, 0.05, 0.7, 0.25

    opt = noisy_kfac(
        linear_t,
        jnp.ones((1, I_DIM)),
        learning_rate=lambda t: jnp.where(t == 0, lrs[0], lrs[1]),
        rho=0.1,
        damping=damping,
        ema_decay=1 - beta,
        momentum=mom,
        weight_decay=wd,
    )
    update = fast_jit(opt.update)
    state = fast_jit(opt.init)(params)
    index = state[0].factors["w"].index
    u1, state = update(g1, state, params, curvature=_curvature(a1, b1, bias1, index))
    params1 = optax.apply_updates(params, u1)
    # second step: gradient and curvature with a leading axis of two weight samples
    spread = jnp.asarray(rng.normal(size=(2,)))[:, None, None]
    g2_samples = jax.tree.map(
        lambda g: jnp.stack([g + 1.0, g - 1.0]) if g.ndim == 2 else jnp.stack([g, g]), g2
    )
    curv2 = _curvature(a2, b2, bias2, index)
    curv2 = {
        "w": curvjax.KroneckerBlock(
            jnp.stack([curv2["w"].a, curv2["w"].a]) * (1 + spread[:, None]),
            jnp.stack([curv2["w"].b, curv2["w"].b]),
            jnp.stack([index, index]),
        ),
        "b": curvjax.DenseBlock(jnp.stack([curv2["b"].matrix * 0.5, curv2["b"].matrix * 1.5])),
    }
    u2, state = update(g2_samples, state, params1, curvature=curv2)

    # dense reference (numpy), eq. 9-11
    idx = _hand_index()

    def precond(a, b, bias):
        kron = np.linalg.inv(_damped_kron(a, b, damping, True))[np.ix_(idx, idx)]
        return kron, np.diag(1.0 / (np.diag(bias) + damping))

    def flat(tree):
        return np.concatenate([np.asarray(tree["w"]).ravel(), np.asarray(tree["b"])])

    def step(pw, pb, g, mu, v, alpha):
        direction = np.concatenate([pw @ g[:6], pb @ g[6:]])
        return direction + wd / alpha * mu + (mom * v if v is not None else 0.0)

    mu0 = flat(params)
    pw1, pb1 = precond(a1, b1, bias1)
    v1 = step(pw1, pb1, flat(g1), mu0, None, lrs[0])
    np.testing.assert_allclose(flat(u1), -lrs[0] * v1, rtol=1e-10, atol=1e-12)

    mean_a2 = a2 * (1 + float(np.mean(np.asarray(spread))))
    a_hat = (1 - beta) * a1 + beta * mean_a2  # β_1 = max(0.7, 1/2)
    b_hat = (1 - beta) * b1 + beta * b2
    bias_hat = (1 - beta) * bias1 + beta * bias2
    pw2, pb2 = precond(a_hat, b_hat, bias_hat)
    v2 = step(pw2, pb2, flat(g2), mu0 - lrs[0] * v1, v1, lrs[1])
    np.testing.assert_allclose(flat(u2), -lrs[1] * v2, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(np.asarray(state[0].factors["w"].a[0]), a_hat, rtol=1e-12)
    assert int(state[0].count) == 2


def grouped_conv(params, x):
    """A 2x2 convolution with two feature groups (G = 2) followed by a dense layer."""
    y = jax.lax.conv_general_dilated(
        x,
        params["k"],
        (1, 1),
        "VALID",
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=2,
    )
    return y.reshape(y.shape[0], -1) @ params["w"]


def test_grouped_conv_update_equals_dense_solve():
    rng = np.random.default_rng(4)
    params = {
        "k": jnp.asarray(rng.normal(size=(2, 2, 1, 4))),
        "w": jnp.asarray(rng.normal(size=(36, 3)) * 0.3),
    }
    x = jnp.asarray(rng.normal(size=(5, 4, 4, 2)))
    batch = (x, jnp.asarray(np.arange(5) % 3))
    lr, damping = 0.2, 0.3
    opt = noisy_kfac(grouped_conv, x, learning_rate=lr, rho=0.1, damping=damping)
    state = fast_jit(opt.init)(params)
    kfac_blocks = fast_jit(curvjax.kfac, static_argnums=0)
    curvature = kfac_blocks(grouped_conv, params, batch, key=jax.random.key(1))
    grads = reference.grad(grouped_conv, params, batch)
    updates, _ = fast_jit(opt.update)(grads, state, params, curvature=curvature)
    assert curvature["k"].a.shape[0] == 2  # two groups

    for name in ("k", "w"):
        block = curvature[name]
        canon = []
        for a, b in zip(np.asarray(block.a), np.asarray(block.b), strict=True):
            canon.append(_damped_kron(a, b, damping, True))  # π per group
        dense = np.zeros((sum(c.shape[0] for c in canon),) * 2)
        start = 0
        for c in canon:
            dense[start : start + c.shape[0], start : start + c.shape[0]] = c
            start += c.shape[0]
        idx = np.asarray(block.index)
        assert sorted(idx.tolist()) == list(range(idx.size))
        expected = -lr * np.linalg.solve(dense[np.ix_(idx, idx)], np.asarray(grads[name]).ravel())
        np.testing.assert_allclose(np.asarray(updates[name]).ravel(), expected, rtol=1e-9)


def test_schedule_matches_equations_13_14_pointwise():
    init, base, warm, total, epoch, power = 1e-3, 1e-2, 7, 40, 9, 2.3
    lr = warmup_polynomial_decay(
        init_value=init,
        base_value=base,
        warmup_steps=warm,
        total_steps=total,
        steps_per_epoch=epoch,
        power=power,
    )
    steps = np.arange(0, total + epoch + 6)
    got = np.asarray(jax.jit(jax.vmap(lr))(jnp.asarray(steps)))
    final = total + epoch  # eq. 13
    expected = []
    for t in steps:
        if t < warm:
            expected.append(init + (base - init) * t / warm)
        elif t <= final:
            expected.append(base * (1 - (t - warm) / (final - warm)) ** power)  # eq. 14
        else:
            expected.append(0.0)
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-15)
    assert got[warm] == pytest.approx(base) and got[total] > 0

    momentum = proportional_momentum(0.9, lr, base_learning_rate=base)  # eq. 6
    np.testing.assert_allclose(
        np.asarray(jax.vmap(momentum)(jnp.asarray(steps))), 0.9 * np.asarray(expected) / base
    )


def test_convenience_path_averages_gradient_and_factors_over_weight_samples():
    rng = np.random.default_rng(5)
    n, d, h, c = 6, 3, 4, 3
    params = {
        "w1": jnp.asarray(rng.normal(size=(d, h)) * 0.5),
        "b1": jnp.asarray(rng.normal(size=(h,)) * 0.1),
        "w2": jnp.asarray(rng.normal(size=(h, c)) * 0.5),
        "b2": jnp.asarray(rng.normal(size=(c,)) * 0.1),
    }
    x = jnp.asarray(rng.normal(size=(n, d)))
    batch = (x, jnp.asarray(np.arange(n) % c))
    m, rho, damping, lr = 3, 0.2, 0.5, 0.1
    opt = noisy_kfac(
        mlp,
        x,
        learning_rate=lr,
        rho=rho,
        damping=damping,
        num_samples=m,
        factored_damping=False,
    )
    chained = optax.chain(opt, optax.scale(1.0))
    state0 = fast_jit(chained.init)(params)

    @fast_jit
    @chex.assert_max_traces(n=1)
    def step(params, state, key):
        return chained.update(None, state, params, batch=batch, key=key)

    key = jax.random.key(7)
    updates, state = step(params, state0, key)
    step(params, state0, jax.random.key(8))  # no retrace
    st = state[0][0]  # chain(noisy_kfac = chain(scale_by_noisy_kfac, ...), scale)
    assert isinstance(st, NoisyKfacState)

    # the documented sample convention, drawn by the public sampler from the initial state
    thetas = [sample_fn(params, state0, jax.random.split(k)[0]) for k in jax.random.split(key, m)]
    assert float(jnp.abs(thetas[0]["w1"] - thetas[1]["w1"]).max()) > 1e-3
    grads = [reference.grad(mlp, t, batch) for t in thetas]
    mean_grad = jax.tree.map(lambda *g: np.mean(np.stack(g), 0), *grads)
    xs = np.asarray(x)
    a1 = xs.T @ xs / n
    hidden = [np.tanh(xs @ np.asarray(t["w1"]) + np.asarray(t["b1"])[None]) for t in thetas]
    a2 = np.mean([hh.T @ hh / n for hh in hidden], axis=0)
    np.testing.assert_allclose(np.asarray(st.factors["w1"].a[0]), a1, rtol=1e-10)
    np.testing.assert_allclose(np.asarray(st.factors["w2"].a[0]), a2, rtol=1e-10)

    # the update is -α (F̂ + γI)⁻¹ ḡ with F̂ = A ⊗ B from the state (exact damping, index = id)
    for name in ("w1", "w2"):
        f = st.factors[name]
        dense = np.kron(np.asarray(f.a[0]), np.asarray(f.b[0]))
        expected = -lr * np.linalg.solve(
            dense + damping * np.eye(dense.shape[0]), mean_grad[name].ravel()
        )
        np.testing.assert_allclose(np.asarray(updates[name]).ravel(), expected, rtol=1e-8)
    diag = np.asarray(st.factors["b2"].diagonal)
    np.testing.assert_allclose(
        np.asarray(updates["b2"]), -lr * mean_grad["b2"] / (diag + damping), rtol=1e-8
    )
    # the gradient at the mean is not what was used: the samples matter
    at_mean = reference.grad(mlp, params, batch)
    assert np.abs(np.asarray(at_mean["w2"]) - mean_grad["w2"]).max() > 1e-3


def test_predictive_averages_softmax_over_samples():
    rng = np.random.default_rng(2)
    params = {"w1": jnp.asarray(rng.normal(size=(3, 4))), "b1": jnp.zeros(4)}
    params |= {"w2": jnp.asarray(rng.normal(size=(4, 3))), "b2": jnp.zeros(3)}
    x = jnp.asarray(rng.normal(size=(5, 3)))
    opt = noisy_kfac(mlp, x, learning_rate=0.1, rho=0.5, damping=1.0)
    state = (optax.EmptyState(), fast_jit(opt.init)(params))  # inside a chain-like state
    key, s = jax.random.key(11), 7
    predict = fast_jit(
        noisy_kfac_predict, static_argnums=0, static_argnames=("num_samples", "sample_batch_size")
    )
    probs = predict(mlp, params, state, x, key, num_samples=s)
    stacked = sample_fn(params, state, key, num_samples=s)
    expected = []
    for i, k in enumerate(jax.random.split(key, s)):
        theta = sample_fn(params, state, k)
        np.testing.assert_allclose(np.asarray(stacked["w2"][i]), np.asarray(theta["w2"]))
        logits = np.asarray(mlp(theta, x))
        e = np.exp(logits - logits.max(1, keepdims=True))
        expected.append(e / e.sum(1, keepdims=True))
    np.testing.assert_allclose(np.asarray(probs), np.mean(expected, 0), rtol=1e-10)
    chunked = predict(mlp, params, state, x, key, num_samples=s, sample_batch_size=3)
    np.testing.assert_allclose(np.asarray(chunked), np.asarray(probs), rtol=1e-10)
    one = np.asarray(predict(mlp, params, state, x, key, num_samples=1))
    assert np.abs(one - np.asarray(probs)).max() > 1e-3


def test_errors_name_what_is_missing():
    params = {"w": jnp.zeros((O_DIM, I_DIM)), "b": jnp.zeros(O_DIM)}
    opt = noisy_kfac(linear_t, jnp.ones((1, I_DIM)), learning_rate=0.1, rho=0.1, damping=0.1)
    state = opt.init(params)
    with pytest.raises(ValueError, match="no `curvature` and no batch"):
        opt.update(None, state, params, key=jax.random.key(0))
    bad = {
        "w": curvjax.DiagonalBlock(jnp.ones((O_DIM, I_DIM))),
        "b": curvjax.DenseBlock(jnp.eye(2)),
    }
    with pytest.raises(ValueError, match=r"params\['w'\]"):
        opt.update(params, state, params, curvature=bad)
    with pytest.raises(ValueError, match="damping"):
        noisy_kfac(linear_t, None, learning_rate=0.1, rho=0.1, damping=0.0)


@pytest.mark.parametrize(
    "module", ["curvjax._src.optim.noisy_kfac", "curvjax._src.optim.schedules"]
)
def test_docstring_examples(module):
    result = doctest.testmod(importlib.import_module(module), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0 and result.attempted > 0
