"""Gradient noise scale and per-leaf SNR against statistics of float64 ``vmap(grad)`` gradients."""

import doctest
import importlib

import jax
import jax.numpy as jnp
import models
import numpy as np
import pytest
import reference

import curvjax

CASES = [("mlp_tanh", "mse"), ("cnn_valid", "cross_entropy")]


def _example_grads(case, batch, loss, weights=None):
    """``[N, D_k]`` per leaf: ``ĝ_n = w_n ∇ℓ_n`` by ``vmap(grad)`` (numpy, float leaves only)."""
    g = reference.per_example_grads(case.apply_fn, case.params, batch, loss, "sum")
    leaves = reference.float_leaves(g, case.params)
    n = leaves[0].shape[0]
    w = np.ones(n) if weights is None else np.asarray(weights)
    return [w[:, None] * np.asarray(a).reshape(n, -1) for a in leaves]


def _statistics(leaves, real):
    """Per leaf ``(tr Σ_k, ‖G_k‖²)`` estimated directly from the per-example gradient rows:
    the unbiased sample covariance's trace and ``‖mean‖² - tr/m``."""
    out = []
    for rows in leaves:
        rows = rows[np.asarray(real, bool)]
        m = rows.shape[0]
        trace = float(np.sum(np.var(rows, axis=0, ddof=1)))
        out.append((trace, float(np.sum(np.mean(rows, axis=0) ** 2)) - trace / m))
    return out


def _check(result, params, want):
    # float64 throughout; the estimates subtract quantities of similar size (Σ‖ĝ_n‖² - m‖ḡ‖²),
    # so compare relative to the larger of the two terms, at a few hundred ulps of it.
    traces = reference.float_leaves(result.trace_cov_per_leaf, params)
    signals = reference.float_leaves(result.grad_sq_norm_per_leaf, params)
    snrs = reference.float_leaves(result.snr, params)
    assert len(traces) == len(want)
    for got_t, got_s, got_r, (t, s) in zip(traces, signals, snrs, want, strict=True):
        scale = abs(t) + abs(s)
        np.testing.assert_allclose(float(got_t), t, rtol=0, atol=1e-10 * scale)
        np.testing.assert_allclose(float(got_s), s, rtol=0, atol=1e-10 * scale)
        np.testing.assert_allclose(float(got_r), s / t, rtol=1e-8)
    trace = sum(t for t, _ in want)
    signal = sum(s for _, s in want)
    scale = abs(trace) + abs(signal)
    np.testing.assert_allclose(float(result.trace_cov), trace, rtol=0, atol=1e-10 * scale)
    np.testing.assert_allclose(float(result.grad_sq_norm), signal, rtol=0, atol=1e-10 * scale)
    np.testing.assert_allclose(float(result.b_simple), trace / signal, rtol=1e-8)


def _jitted(case, loss):
    return jax.jit(
        lambda p, b: curvjax.gradient_noise_scale(case.apply_fn, p, b, loss=loss),
        compiler_options=reference.FAST_COMPILE,
    )


@pytest.mark.parametrize(("name", "loss"), CASES)
def test_matches_vmap_grad_statistics(name, loss):
    case = models.get_case(name)
    batch = models.make_batch(case, loss)
    result = _jitted(case, loss)(case.params, batch)
    assert int(result.num_examples) == models.N
    want = _statistics(_example_grads(case, batch, loss), np.ones(models.N))
    _check(result, case.params, want)


@pytest.mark.parametrize(("name", "loss"), CASES)
def test_masked_batch_equals_batch_of_real_examples(name, loss):
    case = models.get_case(name)
    inputs, targets = models.make_batch(case, loss)
    mask = jnp.array([1.0, 0.0, 1.0, 1.0, 0.0])
    keep = np.flatnonzero(np.asarray(mask))
    fn = _jitted(case, loss)  # the mask is traced: m is counted under jit
    masked = fn(case.params, (inputs, targets, mask))
    small = fn(case.params, (inputs[keep], targets[keep]))
    assert int(masked.num_examples) == int(small.num_examples) == 3
    want = _statistics(_example_grads(case, (inputs, targets), loss), mask)
    _check(masked, case.params, want)
    _check(small, case.params, want)


def test_weighted_batch():
    # a non-binary weight scales ℓ_n (so ĝ_n = w_n ∇ℓ_n); weight 0 leaves the example out of m
    case = models.get_case("mlp_tanh")
    inputs, targets = models.make_batch(case, "cross_entropy")
    weights = jnp.array([0.5, 2.0, 0.0, 1.0, 1.5])
    result = _jitted(case, "cross_entropy")(case.params, (inputs, targets, weights))
    assert int(result.num_examples) == 4
    leaves = _example_grads(case, (inputs, targets), "cross_entropy", weights)
    _check(result, case.params, _statistics(leaves, weights > 0))


def test_position_weights():
    # outputs [N, T, C] with a [N, T] mask: ℓ_n = Σ_t w_{n,t} ℓ(f_{n,t}, y_{n,t}); a sequence whose
    # positions are all masked is not an example (m = N - 1), a partly masked one is
    rng = np.random.default_rng(1)
    n, t, d, c = 5, 4, 3, 2
    params = {"w": jnp.asarray(rng.standard_normal((d, c))), "b": jnp.asarray([0.1, -0.3])}
    x = jnp.asarray(rng.standard_normal((n, t, d)))
    y = jnp.asarray(rng.integers(0, c, (n, t)), jnp.int32)
    mask = np.ones((n, t))
    mask[1] = 0.0
    mask[3, 2:] = 0.0

    def apply_fn(p, inputs):
        return jnp.tanh(inputs @ p["w"]) + p["b"][None, None, :]

    def loss_n(p, x_n, y_n, w_n):
        f = apply_fn(p, x_n[None])[0]
        per_position = jax.vmap(
            lambda f_t, y_t: reference.per_example_loss("cross_entropy", f_t, y_t)
        )
        return jnp.sum(w_n * per_position(f, y_n))

    g = jax.vmap(jax.grad(loss_n), in_axes=(None, 0, 0, 0))(params, x, y, jnp.asarray(mask))
    leaves = [np.asarray(g[k]).reshape(n, -1) for k in sorted(params)]
    result = jax.jit(curvjax.gradient_noise_scale, static_argnums=0)(
        apply_fn, params, (x, y, jnp.asarray(mask))
    )
    assert int(result.num_examples) == n - 1
    _check(result, params, _statistics(leaves, mask.sum(1) > 0))


def test_fewer_than_two_examples():
    case = models.get_case("mlp_tanh")
    inputs, targets = models.make_batch(case, "cross_entropy")
    one = jnp.array([0.0, 0.0, 1.0, 0.0, 0.0])
    with pytest.raises(ValueError, match="at least 2"):
        curvjax.gradient_noise_scale(case.apply_fn, case.params, (inputs, targets, one))
    with pytest.raises(ValueError, match="at least 2"):
        curvjax.gradient_noise_scale(case.apply_fn, case.params, (inputs[:1], targets[:1]))
    with pytest.raises(ValueError, match="num_examples"):
        curvjax.gradient_noise_scale_from_sums({"w": jnp.ones(3)}, {"w": jnp.ones(1)}, 1)
    # under jit the count is traced: NaN, never a number
    result = _jitted(case, "cross_entropy")(case.params, (inputs, targets, one))
    assert np.isnan(float(result.b_simple)) and np.isnan(float(result.trace_cov))
    assert all(np.isnan(float(s)) for s in jax.tree.leaves(result.snr))


def test_estimators_are_unbiased():
    """Batches drawn with replacement from a fixed population of P examples: the draws are iid
    from the population's empirical distribution, so ``G`` is the population mean of ``ĝ`` and
    ``Σ`` its population covariance (normalised by ``1/P``), both exact."""
    rng = np.random.default_rng(0)
    population, batch_size, num_batches = 12, 4, 4000
    x = jnp.asarray(rng.standard_normal((population, 3)))
    y = jnp.asarray(rng.integers(0, 2, population), jnp.int32)
    params = {"w": jnp.asarray(rng.standard_normal((3, 2))), "b": jnp.asarray([0.3, -0.2])}

    def apply_fn(p, inputs):
        return inputs @ p["w"] + p["b"][None, :]

    def loss_n(p, x_n, y_n):
        return reference.per_example_loss("cross_entropy", apply_fn(p, x_n[None])[0], y_n)

    g = jax.vmap(jax.grad(loss_n), in_axes=(None, 0, 0))(params, x, y)
    rows = {k: np.asarray(v).reshape(population, -1) for k, v in g.items()}
    true_trace = {k: float(np.sum(np.var(r, axis=0))) for k, r in rows.items()}  # ddof=0
    true_signal = {k: float(np.sum(np.mean(r, axis=0) ** 2)) for k, r in rows.items()}

    index = jnp.asarray(rng.integers(0, population, (num_batches, batch_size)))
    estimate = jax.jit(
        jax.vmap(lambda i: curvjax.gradient_noise_scale(apply_fn, params, (x[i], y[i])))
    )(index)
    pairs = [(estimate.trace_cov, sum(true_trace.values()))]
    pairs.append((estimate.grad_sq_norm, sum(true_signal.values())))
    for k in params:
        pairs.append((estimate.trace_cov_per_leaf[k], true_trace[k]))
        pairs.append((estimate.grad_sq_norm_per_leaf[k], true_signal[k]))
    for samples, truth in pairs:
        samples = np.asarray(samples)
        se = np.std(samples, ddof=1) / np.sqrt(num_batches)
        # 5 standard errors: a false alarm for one of the 6 checks has probability below 1e-5;
        # a biased estimator (e.g. ‖ḡ‖² for ‖G‖², biased by tr Σ / B) fails by many SE (below)
        assert abs(np.mean(samples) - truth) < 5 * se, (np.mean(samples), truth, se)
    biased = np.asarray(estimate.grad_sq_norm + estimate.trace_cov / batch_size)
    se = np.std(biased, ddof=1) / np.sqrt(num_batches)
    assert abs(np.mean(biased) - sum(true_signal.values())) > 5 * se


def test_docstring_examples():
    module = importlib.import_module("curvjax._src.diagnostics")
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0 and result.attempted > 0
