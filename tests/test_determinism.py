"""Determinism of everything random: the same key gives bit-identical results across calls and
across two separate compilations under ``jax.jit``; different keys give different samples.

Every Monte-Carlo quantity (``ggn_diag_mc``, ``kfac``, ``chain_factors``, the Hutchinson Hessian
diagonal, ``extract``), the spectral estimators that take a key (the Monte-Carlo Fisher operator,
stochastic traces, the spectral density, the random start of ``top_eigenpairs``), the optimizers
that draw (K-FAC's convenience path, Noisy K-FAC's weight samples and predictive), DP-SGD's noise
(``dp_aggregate``, ``dpsgd``) and the Poisson sampler. A tiny MLP keeps it fast.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import curvjax
from curvjax import optim, privacy, spectral

N, D, H, C = 8, 3, 5, 4
_K1, _K2, _K3, _K4 = jax.random.split(jax.random.key(3), 4)
PARAMS = {
    "w1": jax.random.normal(_K1, (D, H)) / np.sqrt(D),
    "b1": jnp.full((H,), 0.1),
    "w2": jax.random.normal(_K2, (H, C)) / np.sqrt(H),
    "b2": jnp.zeros(C),
}
X = jax.random.normal(_K3, (N, D))
Y = jax.random.randint(_K4, (N,), 0, C)
BATCH = (X, Y)
GRADS = jax.tree.map(lambda a: jnp.full_like(a, 0.5), PARAMS)


def mlp(p, x):
    return jnp.tanh(x @ p["w1"] + p["b1"][None]) @ p["w2"] + p["b2"][None]


def _kfac_steps(key):
    opt = optax.chain(optim.scale_by_kfac(mlp, X, damping=1e-2, inverse_interval=1), optax.sgd(0.1))
    updates, _ = opt.update(GRADS, opt.init(PARAMS), PARAMS, batch=BATCH, key=key)
    return updates


def _noisy_kfac_step(key):
    opt = optim.noisy_kfac(mlp, X, learning_rate=0.1, rho=0.01, damping=1e-2)
    state = opt.init(PARAMS)
    updates, state = opt.update(None, state, PARAMS, batch=BATCH, key=key)
    return optax.apply_updates(PARAMS, updates)


def _noisy_kfac_sampling(key):
    state = optim.scale_by_noisy_kfac(mlp, X, rho=0.01, damping=1e-2).init(PARAMS)
    k1, k2 = jax.random.split(key)
    samples = optim.noisy_kfac_sample(PARAMS, state, k1, num_samples=3)
    predictive = optim.noisy_kfac_predict(mlp, PARAMS, state, X, k2, num_samples=3)
    return samples, predictive


def _dp_aggregate(key):
    tx = optim.dp_aggregate(l2_norm_clip=1.0, noise_multiplier=1.0, seed=key, expected_batch_size=4)
    state = tx.init(PARAMS)
    first, state = tx.update(GRADS, state)
    second, _ = tx.update(GRADS, state)
    return first, second


def _dpsgd(key):
    tx = optim.dpsgd(0.1, l2_norm_clip=1.0, noise_multiplier=1.0, seed=key, expected_batch_size=4)
    updates, _ = tx.update(GRADS, tx.init(PARAMS), PARAMS)
    return updates


def _ggn_op():
    return spectral.ggn_operator(mlp, PARAMS, BATCH)


# name -> f(key) returning a pytree of arrays; all run under jax.jit
SAMPLERS = {
    "ggn_diag_mc": lambda k: curvjax.ggn_diag_mc(mlp, PARAMS, BATCH, key=k, mc_samples=2),
    "kfac": lambda k: curvjax.kfac(mlp, PARAMS, BATCH, key=k),
    "chain_factors": lambda k: curvjax.chain_factors(mlp, PARAMS, BATCH, quantity="kfac", key=k),
    "hessian_diag_hutchinson": lambda k: curvjax.hessian_diag(
        mlp, PARAMS, BATCH, method="hutchinson", key=k, mc_samples=3
    ),
    "extract": lambda k: curvjax.extract(mlp, PARAMS, BATCH, ["ggn_diag_mc", "kfac"], key=k),
    "fisher_operator": lambda k: spectral.fisher_operator(mlp, PARAMS, BATCH, key=k).matvec(
        jnp.ones(44)
    ),
    "trace_hutchpp": lambda k: spectral.trace(_ggn_op(), key=k, num_matvecs=6),
    "trace_hutchinson": lambda k: spectral.trace(
        _ggn_op(), key=k, method="hutchinson", num_matvecs=6
    ),
    "slq_nodes": lambda k: spectral.slq_nodes(
        _ggn_op().matvec, 44, jnp.float64, key=k, num_probes=2, num_steps=4
    ),
    "top_eigenpairs": lambda k: spectral.top_eigenpairs(_ggn_op(), 2, key=k, max_matvecs=12),
    "optim_kfac": _kfac_steps,
    "optim_noisy_kfac": _noisy_kfac_step,
    "noisy_kfac_sample_predict": _noisy_kfac_sampling,
    "dp_aggregate": _dp_aggregate,
    "dpsgd": _dpsgd,
    "poisson_batch": lambda k: privacy.poisson_batch(
        k, num_examples=50, sampling_rate=0.2, max_batch_size=20
    ),
}
# the key only seeds the start of an iteration that converges to the same answer
KEY_ONLY_STARTS = {"top_eigenpairs"}


def _identical(a, b) -> bool:
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb)
    return all(
        np.asarray(x).dtype == np.asarray(y).dtype and np.array_equal(x, y, equal_nan=True)
        for x, y in zip(la, lb, strict=True)
    )


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_same_key_bit_identical_different_keys_differ(name):
    fn = jax.jit(SAMPLERS[name])
    k0, k1 = jax.random.key(0), jax.random.key(1)
    a = fn(k0)
    assert _identical(a, fn(jax.random.key(0))), "two calls with the same key differ"
    if name not in KEY_ONLY_STARTS:
        assert not _identical(a, fn(k1)), "different keys gave the same samples"


@pytest.mark.parametrize("name", ["extract", "hessian_diag_hutchinson", "dp_aggregate"])
def test_second_compilation_bit_identical(name):
    """A second, separate compilation of the same function gives the same bits (no state hidden
    in a trace, e.g. a key captured at the first trace)."""
    fn = SAMPLERS[name]
    first, second = jax.jit(fn), jax.jit(lambda k: fn(k))
    assert _identical(first(jax.random.key(2)), second(jax.random.key(2)))


@pytest.mark.parametrize("name", ["dp_aggregate", "poisson_batch"])
def test_eager_calls_bit_identical(name):
    """Outside jit too (nothing random on the host side)."""
    fn = SAMPLERS[name]
    assert _identical(fn(jax.random.key(5)), fn(jax.random.key(5)))


def test_density_same_key_identical():
    """``density`` runs a host loop over probe batches: same key, same curve; other key, other
    curve (its probes differ)."""
    op = _ggn_op()
    kw = dict(num_probes=2, num_steps=4, num_points=40, probes_per_call=1)
    grid, dens = spectral.density(op, key=jax.random.key(0), **kw)
    grid2, dens2 = spectral.density(op, key=jax.random.key(0), **kw)
    assert np.array_equal(grid, grid2) and np.array_equal(dens, dens2)
    _, dens3 = spectral.density(op, key=jax.random.key(1), **kw)
    assert not np.array_equal(dens, dens3)


def test_dp_aggregate_int_seed_is_the_key():
    """``seed=0`` and ``seed=jax.random.key(0)`` give the same noise; successive steps draw new
    noise (the state's key advances)."""
    first, second = _dp_aggregate(jax.random.key(0))
    tx = optim.dp_aggregate(l2_norm_clip=1.0, noise_multiplier=1.0, seed=0, expected_batch_size=4)
    from_int, _ = tx.update(GRADS, tx.init(PARAMS))
    assert _identical(first, from_int)
    assert not _identical(first, second)
