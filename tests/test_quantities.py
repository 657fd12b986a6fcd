"""The quantity registry behind curvjax.extract: sharing, per-quantity options, chain factors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import curvjax
from curvjax._src import backprop, quantities


def _chain():
    k1, k2, k3 = jax.random.split(jax.random.key(1), 3)
    params = {
        "w1": jax.random.normal(k1, (4, 5), jnp.float64) / 2,
        "w2": jax.random.normal(k2, (5, 3), jnp.float64) / 2,
    }
    x = jax.random.normal(k3, (6, 4), jnp.float64)
    apply_fn = lambda p, x: jnp.tanh(x @ p["w1"]) @ p["w2"]  # noqa: E731
    return apply_fn, params, (x, jnp.arange(6) % 3)


def _close(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-12, atol=1e-14)


def test_every_public_quantity_is_registered_and_reachable():
    apply_fn, params, batch = _chain()
    for name in quantities.names():
        assert hasattr(curvjax, name), name  # each entry has its public wrapper
        options = {name: {"clip_norm": 1.0}} if name == "clipped_grad" else None
        out = curvjax.extract(
            apply_fn, params, batch, [name], key=jax.random.key(0), options=options
        )
        assert name in out
    assert set(quantities.curvature_names()) == {
        "ggn_diag", "ggn_diag_mc", "hessian_diag", "kfac", "kflr", "kfra", "ekfac"
    }  # fmt: skip


def test_quantities_sharing_a_vector_set_share_one_backpropagation(monkeypatch):
    apply_fn, params, batch = _chain()
    calls = []
    original = backprop.Pass.reduce_columns

    def counting(self, fn, columns, **kwargs):
        calls.append(columns.shape)
        return original(self, fn, columns, **kwargs)

    monkeypatch.setattr(backprop.Pass, "reduce_columns", counting)
    curvjax.extract(apply_fn, params, batch, ["ggn_diag", "kflr", "variance"])
    assert calls == [(6, 3, 3)]  # the C = 3 exact columns, once
    calls.clear()
    key = jax.random.key(0)
    curvjax.extract(apply_fn, params, batch, ["ggn_diag_mc", "kfac"], key=key, mc_samples=2)
    assert calls == [(6, 2, 3)]
    calls.clear()
    options = {"kfac": {"mc_samples": 5}}
    curvjax.extract(apply_fn, params, batch, ["ggn_diag_mc", "kfac"], key=key, options=options)
    assert sorted(calls) == [(6, 1, 3), (6, 5, 3)]  # different options: two sets


def test_per_quantity_options_match_separate_runs():
    apply_fn, params, batch = _chain()
    key = jax.random.key(3)
    both = curvjax.extract(
        apply_fn,
        params,
        batch,
        ["ggn_diag_mc", "kfac"],
        key=key,
        mc_samples=2,
        options={"kfac": {"mc_samples": 7}},
    )
    kfac = curvjax.extract(apply_fn, params, batch, ["kfac"], key=key, mc_samples=7)["kfac"]
    diag = curvjax.ggn_diag_mc(apply_fn, params, batch, key=key, mc_samples=2)
    _close(both["kfac"], kfac)
    _close(both["ggn_diag_mc"], diag)


def test_options_are_checked():
    apply_fn, params, batch = _chain()
    with pytest.raises(ValueError, match="unknown quantities"):
        curvjax.extract(apply_fn, params, batch, ["kflr"], options={"kfca": {}})
    with pytest.raises(ValueError, match="no option 'mc_samples'"):
        curvjax.extract(apply_fn, params, batch, ["kflr"], options={"kflr": {"mc_samples": 2}})
    with pytest.raises(ValueError, match="key="):
        curvjax.extract(apply_fn, params, batch, ["chain_factors"])
    with pytest.raises(ValueError, match="vectors="):
        curvjax.extract(
            apply_fn, params, batch, ["chain_factors"], options={"chain_factors": {"vectors": "x"}}
        )


def test_chain_factors_is_a_quantity_of_extract():
    apply_fn, params, batch = _chain()
    key = jax.random.key(0)
    standalone = curvjax.chain_factors(apply_fn, params, batch, quantity="kfac", key=key)
    out = curvjax.extract(apply_fn, params, batch, ["kfac", "chain_factors"], key=key)
    _close(out["chain_factors"], standalone["chain_factors"])
    # With the exact columns, the diagonal factors are KFLR's (a chain without folded biases).
    exact = curvjax.extract(
        apply_fn,
        params,
        batch,
        ["kflr", "chain_factors"],
        options={"chain_factors": {"vectors": "exact"}},
    )
    factors = exact["chain_factors"]
    for layer, name in enumerate(["w1", "w2"]):
        np.testing.assert_allclose(factors.a[layer], exact["kflr"][name].a[0], rtol=1e-12)
        np.testing.assert_allclose(factors.g[layer], exact["kflr"][name].b[0], rtol=1e-12)


def test_a_new_quantity_is_one_registry_entry():
    apply_fn, params, batch = _chain()
    entry = quantities.Quantity(
        "ggn_diag_total",
        lambda context, parts: [jnp.sum(leaf) for leaf in parts],
        vectors="exact",
        reduction="sum_sq",
    )
    quantities.register(entry)
    try:
        out = curvjax.extract(apply_fn, params, batch, ["ggn_diag_total", "ggn_diag"])
    finally:
        del quantities.REGISTRY["ggn_diag_total"]
    for name in params:
        np.testing.assert_allclose(out["ggn_diag_total"][name], out["ggn_diag"][name].sum())
    with pytest.raises(ValueError, match="already registered"):
        quantities.register(quantities.REGISTRY["kflr"])
