"""Models that compute in lower precision than their parameters, or in higher.

* bfloat16 compute: float32 parameters cast to bfloat16 inside ``apply_fn`` (the usual setting of
  language models), and parameters stored in bfloat16;
* float32 parameters with float64 inputs (the computation promotes to float64).

Every quantity runs, returns parameter-shaped results in each leaf's dtype and statistics (norms,
Kronecker factors) in at least float32, and agrees with float64 references of the same model
computed in float64 to the precision of the computation.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference

import curvjax
import curvjax.spectral

N, D, H, C = 6, 4, 5, 3
QUANTITIES = ["per_example_grads", "batch_l2", "variance", "ggn_diag", "hessian_diag"]


def _model(dtype):
    """A two-layer tanh network computing in ``dtype`` whatever its parameters' dtype."""

    def apply_fn(p, x):
        p = jax.tree.map(lambda a: a.astype(dtype), p)
        h = jnp.tanh(x.astype(dtype) @ p["w1"] + p["b1"][None])
        return (h @ p["w2"]).astype(jnp.float32)

    return apply_fn


def _problem():
    rng = np.random.default_rng(0)
    params = {
        "w1": rng.standard_normal((D, H)) / 2,
        "b1": rng.standard_normal(H) / 4,
        "w2": rng.standard_normal((H, C)) / 2,
    }
    x = rng.standard_normal((N, D))
    y = jnp.asarray(rng.integers(0, C, N), jnp.int32)
    return params, x, y


def _references(params64, x64, y):
    f64 = _model(jnp.float64)
    args = (f64, params64, (x64, y), "cross_entropy", "mean")
    pe = reference.per_example_grads(*args)
    return {
        "per_example_grads": pe,
        "batch_l2": jax.tree.map(lambda a: jnp.sum(a.reshape(N, -1) ** 2, 1), pe),
        "variance": jax.tree.map(lambda a: jnp.mean(a**2, 0) - jnp.mean(a, 0) ** 2, pe),
        "ggn_diag": reference.ggn_diag(*args),
        "hessian_diag": reference.hessian_diag(*args),
    }


def _close(got, want, rtol, what):
    for (path, g), w in zip(
        jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want), strict=True
    ):
        g, w = np.asarray(g, np.float64), np.asarray(w)
        scale = float(np.max(np.abs(w)))
        err = float(np.max(np.abs(g - w)))
        assert err <= rtol * scale + 1e-30, (
            f"{what}{jax.tree_util.keystr(path)}: {err} > {rtol} * {scale}"
        )


# bfloat16 keeps 8 significant bits (unit roundoff 2^-9 ≈ 2e-3); a quantity of this two-layer
# network passes through about ten rounded operations (inputs, two products, tanh, softmax,
# the backward products, the final cast), so its relative error is at most ~10 · 2^-8 ≈ 0.04.
BF16_RTOL = 0.05


@pytest.mark.parametrize("stored", ["float32", "bfloat16"])
def test_bfloat16_compute(stored):
    params, x, y = _problem()
    params_in = jax.tree.map(lambda a: jnp.asarray(a, stored), params)
    x_in = jnp.asarray(x, jnp.float32)
    want = _references(
        jax.tree.map(lambda a: jnp.asarray(a, stored).astype(jnp.float64), params),
        x_in.astype(jnp.float64),
        y,
    )
    f = _model(jnp.bfloat16)
    out = jax.jit(
        lambda p, b: curvjax.extract(
            f,
            p,
            b,
            QUANTITIES + ["kflr", "kfac", "clipped_grad"],
            key=jax.random.key(0),
            options={"clipped_grad": {"clip_norm": 1e9}},
        ),
    )(params_in, (x_in, y))
    for name in QUANTITIES:
        _close(out[name], want[name], BF16_RTOL, name)
        for leaf, value in zip(jax.tree.leaves(params_in), jax.tree.leaves(out[name]), strict=True):
            if name == "batch_l2":  # per-example norms: at least float32
                assert value.dtype == jnp.promote_types(leaf.dtype, jnp.float32), name
            else:  # parameter-shaped: the leaf's dtype
                assert value.dtype == leaf.dtype, name
    for name in ["kflr", "kfac"]:
        for block in jax.tree.leaves(out[name], is_leaf=lambda b: isinstance(b, tuple)):
            for factor in jax.tree.leaves(block):
                assert factor.dtype == jnp.float32 and np.all(np.isfinite(factor)), name
    # nothing clipped: the clipped sum is Σ_n ∇ℓ_n, N times the sum of g_n = ∇ℓ_n / N
    grad = jax.tree.map(lambda g: N * jnp.sum(g, 0), want["per_example_grads"])
    _close(out["clipped_grad"].grad, grad, BF16_RTOL, "clipped_grad")


def test_float32_params_float64_inputs():
    """The model promotes to float64: results round once to the float32 leaves."""
    params, x, y = _problem()
    p32 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params)

    def f(p, x):
        return jnp.tanh(x @ p["w1"] + p["b1"][None]) @ p["w2"]

    want = _references(jax.tree.map(lambda a: a.astype(jnp.float64), p32), jnp.asarray(x), y)
    out = curvjax.extract(f, p32, (jnp.asarray(x), y), QUANTITIES + ["kflr"])
    # float64 computation, one rounding to float32 at the end (2^-24 ≈ 6e-8), with a margin for
    # the few float64 operations that follow the rounding of batch_l2's sums
    for name in QUANTITIES:
        _close(out[name], want[name], 1e-6, name)
    kflr64 = curvjax.kflr(
        f, jax.tree.map(lambda a: a.astype(jnp.float64), p32), (jnp.asarray(x), y)
    )
    for got, ref in zip(jax.tree.leaves(out["kflr"]), jax.tree.leaves(kflr64), strict=True):
        np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-7 * float(np.max(np.abs(ref))))


def test_spectra_of_a_bfloat16_model_run_in_float32():
    params, x, y = _problem()
    p16 = jax.tree.map(lambda a: jnp.asarray(a, jnp.bfloat16), params)
    x16 = jnp.asarray(x, jnp.bfloat16)

    def f(p, x):
        return jnp.tanh(x @ p["w1"] + p["b1"][None]) @ p["w2"]

    op = curvjax.spectral.hessian_operator(f, p16, (x16, y))
    assert op.dtype == jnp.float32
    top = curvjax.spectral.top_eigenpairs(op, 2, key=jax.random.key(0))
    p64 = jax.tree.map(lambda a: a.astype(jnp.float64), p16)
    dense = reference.hessian_matrix(_model(jnp.float64), p64, (x16.astype(jnp.float64), y))
    want = np.sort(np.linalg.eigvalsh(np.asarray(dense)))[::-1][:2]
    # Hessian-vector products of a bfloat16 model: relative error of a few bfloat16 roundings
    np.testing.assert_allclose(np.sort(np.asarray(top.eigenvalues))[::-1], want, rtol=BF16_RTOL)


def test_bfloat16_leaf_larger_than_bfloat16_integers_computed_in_float32():
    """A kernel stored in bfloat16 with more than 256 entries (positions 256+ are not integers
    bfloat16 represents) used in float32: the Kronecker layout and tied norms stay exact."""
    rng = np.random.default_rng(1)
    p16 = {
        "w": jnp.asarray(rng.standard_normal((20, 16)) / 4, jnp.bfloat16),
        "v": jnp.asarray(rng.standard_normal((16, 3)) / 4, jnp.bfloat16),
    }
    p32 = jax.tree.map(lambda a: a.astype(jnp.float32), p16)
    x = jnp.asarray(rng.standard_normal((4, 5, 20)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 3, 4), jnp.int32)

    def f(p, x):  # w used twice, the second time transposed (tied): [N, T, 20] -> [N, 3]
        p = jax.tree.map(lambda a: a.astype(jnp.float32), p)
        h = jnp.tanh(x @ p["w"])
        r = jnp.tanh(h @ p["w"].T) @ p["w"]
        return r.mean(axis=1) @ p["v"]

    got = curvjax.extract(f, p16, (x, y), ["kflr", "batch_l2"])
    want = curvjax.extract(f, p32, (x, y), ["kflr", "batch_l2"])
    # the same float32 computation; values pulled back to a bfloat16 leaf are rounded to it once
    # (relative 2^-9); a wrong layout would move whole entries (errors of order one)
    for name in ["kflr", "batch_l2"]:
        for a, b in zip(jax.tree.leaves(got[name]), jax.tree.leaves(want[name]), strict=True):
            a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
            np.testing.assert_allclose(a, b, rtol=2.0**-7, atol=2.0**-7 * np.max(np.abs(b)))


def test_clipping_a_bfloat16_model_with_a_norm_bfloat16_cannot_represent():
    params, x, y = _problem()
    f = _model(jnp.bfloat16)
    p32 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params)
    out = curvjax.clipped_grad(f, p32, (jnp.asarray(x, jnp.float32), y), clip_norm=0.1)
    assert out.norms.dtype == jnp.float32
    # c = 0.1 is not a bfloat16 number (0.10009765625 is the nearest): clipped examples are
    # compared with c itself, and the clipped sum of N clipped examples has norm at most N c up
    # to the bfloat16 sums of the contraction (relative 2^-8)
    assert float(out.clipped_fraction) == 1.0
    total = np.sqrt(
        sum(float(jnp.sum(jnp.square(g.astype(jnp.float32)))) for g in jax.tree.leaves(out.grad))
    )
    assert total <= N * 0.1 * (1 + 2.0**-7)
