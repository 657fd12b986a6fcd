"""Losses against jax.hessian of independent loss formulas, and MC unbiasedness."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import curvjax
from curvjax import losses

C = 4
SMOOTHING = 0.2
NAMES = [
    "cross_entropy",
    "soft_cross_entropy",
    "label_smoothing",
    "sigmoid_binary_cross_entropy",
    "gaussian_nll",
    "mse",
]


def _loss(name):
    if name == "label_smoothing":
        return losses.cross_entropy_with_label_smoothing(SMOOTHING)
    return losses.resolve(name)


def _output_and_target(name, seed):
    key_f, key_y = jax.random.split(jax.random.key(seed))
    f = jax.random.normal(key_f, (C,), dtype=jnp.float64) * 2.0
    if name in ("cross_entropy", "label_smoothing"):
        return f, jnp.asarray(seed % C)
    if name == "soft_cross_entropy":
        return f, jax.nn.softmax(2.0 * jax.random.normal(key_y, (C,), dtype=jnp.float64))
    if name == "sigmoid_binary_cross_entropy":
        return f, jax.random.uniform(key_y, (C,), dtype=jnp.float64)
    if name == "gaussian_nll":
        return f, jax.random.normal(key_y, (C // 2,), dtype=jnp.float64) * 2.0
    return f, jax.random.normal(key_y, (C,), dtype=jnp.float64)


def _independent_value(name, f, y):
    """Each loss from optax / jax.scipy (or its textbook formula), not from curvjax."""
    if name == "cross_entropy":
        return optax.softmax_cross_entropy_with_integer_labels(f, y)
    if name == "soft_cross_entropy":
        return optax.softmax_cross_entropy(f, y)
    if name == "label_smoothing":
        return optax.softmax_cross_entropy(f, optax.smooth_labels(jax.nn.one_hot(y, C), SMOOTHING))
    if name == "sigmoid_binary_cross_entropy":
        return jnp.sum(optax.sigmoid_binary_cross_entropy(f, y))
    if name == "gaussian_nll":
        mean, log_var = f[: C // 2], f[C // 2 :]
        return -jnp.sum(jax.scipy.stats.norm.logpdf(y, mean, jnp.exp(0.5 * log_var)))
    return jnp.sum((f - y) ** 2)


def _gaussian_fisher(f):
    """``E_{ŷ ~ N(μ, e^s)} ∇²_f ℓ(f, ŷ)`` by Gauss-Hermite quadrature of ``jax.hessian``.

    Every entry of the Hessian is a polynomial of degree ≤ 2 in one ``ŷ_d``, so 5 nodes (exact to
    degree 9) give the expectation to rounding; the same node serves all ``d`` at once because no
    entry mixes two targets.
    """
    nodes, weights = np.polynomial.hermite_e.hermegauss(5)
    weights = weights / np.sqrt(2 * np.pi)
    mean, log_var = f[: C // 2], f[C // 2 :]
    hess = jax.hessian(_independent_value, argnums=1)
    return sum(
        w * hess("gaussian_nll", f, mean + jnp.exp(0.5 * log_var) * z)
        for z, w in zip(nodes, weights, strict=True)
    )


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("seed", [0, 1])
def test_value_grad_and_hessian_factor(name, seed):
    loss = _loss(name)
    f, y = _output_and_target(name, seed)
    np.testing.assert_allclose(loss.value(f, y), _independent_value(name, f, y), rtol=1e-12)
    np.testing.assert_allclose(
        loss.output_grad(f, y), jax.grad(_independent_value, argnums=1)(name, f, y), rtol=1e-11
    )
    hess = jax.hessian(_independent_value, argnums=1)(name, f, y)
    s = loss.hessian_factor(f, y)
    # float64 rounding of O(1) entries: 1e-12 absolute.
    if name == "gaussian_nll":
        # the documented surrogate: the Fisher, diag(e^{-s}, ½), an independent quadrature here
        np.testing.assert_allclose(s @ s.T, _gaussian_fisher(f), atol=1e-12)
        fisher = jnp.diag(jnp.concatenate([jnp.exp(-f[C // 2 :]), jnp.full(C // 2, 0.5)]))
        np.testing.assert_allclose(s @ s.T, fisher, atol=1e-12)
        # and the exact Hessian is indefinite here, so a PSD factor could not be exact
        assert np.linalg.eigvalsh(np.asarray(hess)).min() < -1e-3
    else:
        np.testing.assert_allclose(s @ s.T, hess, atol=1e-12)
    u, signs = loss.signed_hessian_factor(f, y)
    np.testing.assert_allclose(u @ (signs[:, None] * u.T), hess, atol=1e-12)
    # the GGN's product S Sᵀ v without S (a closed form for the built-in losses)
    v = jnp.cos(jnp.arange(f.shape[0], dtype=f.dtype))
    np.testing.assert_allclose(loss.factor_times(f, y, v), (s @ s.T) @ v, atol=1e-12)


@pytest.mark.parametrize("name", NAMES)
def test_mc_factor_is_unbiased(name):
    """Mean of S̃S̃ᵀ over K independent keys converges to S Sᵀ: every entry within 5 standard
    errors (a false alarm per entry has probability < 1e-6 under the normal approximation)."""
    loss = _loss(name)
    f, y = _output_and_target(name, 3)
    num_keys, mc_samples = 4000, 2
    keys = jax.random.split(jax.random.key(7), num_keys)
    factors = jax.vmap(lambda k: loss.mc_factor(k, f, mc_samples))(keys)
    assert factors.shape == (num_keys, C, mc_samples)
    outer = jnp.einsum("kcm,kdm->kcd", factors, factors)
    mean = outer.mean(0)
    stderr = outer.std(0) / np.sqrt(num_keys)
    if name == "gaussian_nll":
        target = _gaussian_fisher(f)
    else:
        target = jax.hessian(_independent_value, argnums=1)(name, f, y)
    # + 1e-12 for entries that are constant (zero variance), e.g. the softmax's rank deficiency
    assert np.all(np.abs(mean - target) <= 5 * stderr + 1e-12)
    # The test can fail: a biased estimator (e.g. without the 1/√M scaling) is rejected.
    assert not np.all(np.abs(mc_samples * mean - target) <= 5 * stderr + 1e-12)


@pytest.mark.parametrize(
    ("name", "good", "bad", "message"),
    [
        ("cross_entropy", np.zeros((3, 2), int), np.zeros((3, 2)), r"integer class labels"),
        ("cross_entropy", np.zeros((3, 2), int), np.zeros((3,), int), r"\(3, 2\).*\(3,\)"),
        ("cross_entropy", np.zeros((3, 2), int), np.full((3, 2), 4), r"\[0, 4\).*\[4, 4\]"),
        ("label_smoothing", np.ones((3, 2), int), np.full((3, 2), -1), r"\[0, 4\).*\[-1, -1\]"),
        (
            "soft_cross_entropy",
            np.full((3, 2, C), 0.25),
            np.full((3, 2, C), 0.3),
            r"row sums in \[1.2",
        ),
        ("soft_cross_entropy", np.full((3, 2, C), 0.25), np.zeros((3, 2), int), r"\(3, 2, 4\)"),
        (
            "sigmoid_binary_cross_entropy",
            np.ones((3, 2, C), bool),
            np.full((3, 2, C), 1.5),
            r"\[0, 1\].*\[1.5, 1.5\]",
        ),
        (
            "gaussian_nll",
            np.zeros((3, 2, C // 2)),
            np.zeros((3, 2, C)),
            r"\(3, 2, 2\).*\(3, 2, 4\)",
        ),
        ("mse", np.zeros((3, 2, C)), np.zeros((3, 2, C + 1)), r"\(3, 2, 4\).*\(3, 2, 5\)"),
    ],
)
def test_target_checks(name, good, bad, message):
    """Targets for outputs [N, T, C] = [3, 2, 4]: the good ones pass, the bad ones name the loss,
    what it expects and what it received."""
    loss = _loss(name)
    outputs = jax.ShapeDtypeStruct((3, 2, C), jnp.float32)
    loss.check_targets(outputs, good)
    with pytest.raises(ValueError, match=rf"loss '{re.escape(loss.name)}'.*{message}"):
        loss.check_targets(outputs, bad)


def _position_targets(name, n, t):
    """Targets [N, T] or [N, T, ·] for outputs [N, T, C]."""
    key = jax.random.key(11)
    if name in ("cross_entropy", "label_smoothing"):
        return jax.random.randint(key, (n, t), 0, C)
    if name == "soft_cross_entropy":
        return jax.nn.softmax(jax.random.normal(key, (n, t, C), dtype=jnp.float64), axis=-1)
    if name == "sigmoid_binary_cross_entropy":
        return jax.random.uniform(key, (n, t, C), dtype=jnp.float64)
    if name == "gaussian_nll":
        return jax.random.normal(key, (n, t, C // 2), dtype=jnp.float64)
    return jax.random.normal(key, (n, t, C), dtype=jnp.float64)


@pytest.mark.parametrize("name", [n for n in NAMES if n not in ("cross_entropy", "mse")])
def test_ggn_diag_of_each_loss_on_positions(name):
    """curvjax.ggn_diag with outputs [N, T, C] against κ Σ_{n,t} diag(J_{n,t}ᵀ H_{n,t} J_{n,t}),
    H from jax.hessian of the independent formula (the quadrature Fisher for gaussian_nll)."""
    n, t = 3, 2
    w = jax.random.normal(jax.random.key(0), (3, C), dtype=jnp.float64)
    x = jax.random.normal(jax.random.key(1), (n, t, 3), dtype=jnp.float64)
    y = _position_targets(name, n, t)
    apply_fn = lambda p, xs: jnp.tanh(xs @ p)  # noqa: E731
    got = curvjax.ggn_diag(apply_fn, w, (x, y), loss=_loss(name), reduction="mean")
    jac = jax.jacobian(apply_fn)(w, x).reshape(n * t, C, -1)  # [NT, C, D]
    f = apply_fn(w, x).reshape(n * t, C)
    yf = y.reshape(n * t, *y.shape[2:])
    if name == "gaussian_nll":
        hess = jax.vmap(_gaussian_fisher)(f)
    else:
        hess = jax.vmap(jax.hessian(_independent_value, argnums=1), (None, 0, 0))(name, f, yf)
    want = jnp.einsum("qcd,qce,qed->d", jac, hess, jac) / n
    np.testing.assert_allclose(got.reshape(-1), want, rtol=1e-10, atol=1e-14)


def test_gaussian_nll_needs_an_even_number_of_outputs():
    with pytest.raises(ValueError, match=r"'gaussian_nll'.*even.*\(3, 5\)"):
        losses.gaussian_nll.check_targets(jax.ShapeDtypeStruct((3, 5), jnp.float32), np.zeros(3))
    with pytest.raises(ValueError, match="must be even, got 3"):
        losses.gaussian_nll.value(jnp.zeros(3), jnp.zeros(1))


def test_label_smoothing_factory():
    zero = losses.cross_entropy_with_label_smoothing(0)
    f, y = _output_and_target("cross_entropy", 5)
    np.testing.assert_allclose(zero.value(f, y), losses.cross_entropy.value(f, y), rtol=1e-14)
    for alpha in (-0.1, 1.5, "0.1", True):
        with pytest.raises(ValueError, match="must be a number in \\[0, 1\\]"):
            losses.cross_entropy_with_label_smoothing(alpha)


def test_resolve_knows_every_parameter_free_loss():
    for name in ("cross_entropy", "soft_cross_entropy", "sigmoid_binary_cross_entropy"):
        assert losses.resolve(name) is getattr(losses, name)
    assert losses.resolve("gaussian_nll") is losses.gaussian_nll
    assert set(losses.LOSSES) == set(NAMES) - {"label_smoothing"}
    with pytest.raises(ValueError, match="cross_entropy_with_label_smoothing"):
        losses.resolve("label_smoothing")


def _convex_user_value(f, y):
    return jax.nn.logsumexp(f) - f[0] + 0.5 * jnp.sum((f - y) ** 2 * jnp.arange(1.0, C + 1))


def _convex_reference_hessian(f, y):
    """Written out: softmax Hessian plus diag(1..C)."""
    p = jax.nn.softmax(f)
    return jnp.diag(p) - jnp.outer(p, p) + jnp.diag(jnp.arange(1.0, C + 1))


def _nonconvex_user_value(f, y):
    return jnp.sum(jnp.cos(f - y)) + 0.1 * jnp.sum(f) ** 2


def _nonconvex_reference_hessian(f, y):
    """Written out: -diag(cos(f - y)) + 0.2 · 11ᵀ."""
    return -jnp.diag(jnp.cos(f - y)) + 0.2 * jnp.ones((C, C))


@pytest.mark.parametrize("seed", [0, 1])
def test_automatic_factor_of_a_value_only_loss(seed):
    f, y = _output_and_target("mse", seed)
    convex = losses.Loss(name="convex", value=_convex_user_value)
    s = convex.hessian_factor(f, y)
    np.testing.assert_allclose(s @ s.T, _convex_reference_hessian(f, y), atol=1e-12)
    u, signs = convex.signed_hessian_factor(f, y)
    np.testing.assert_allclose(
        u @ (signs[:, None] * u.T), _convex_reference_hessian(f, y), atol=1e-12
    )

    nonconvex = losses.Loss(name="nonconvex", value=_nonconvex_user_value)
    hess = np.asarray(_nonconvex_reference_hessian(f, y))
    eigvals, eigvecs = np.linalg.eigh(hess)
    assert eigvals.min() < -0.1  # the test case really is indefinite
    clamped = (eigvecs * np.maximum(eigvals, 0)) @ eigvecs.T
    s = nonconvex.hessian_factor(f, y)
    np.testing.assert_allclose(s @ s.T, clamped, atol=1e-12)  # documented clamp
    u, signs = nonconvex.signed_hessian_factor(f, y)
    np.testing.assert_allclose(u @ (signs[:, None] * u.T), hess, atol=1e-12)  # exact
    with pytest.raises(ValueError, match="'nonconvex' defines no predictive distribution"):
        nonconvex.mc_factor(jax.random.key(0), f, 1)


def test_automatic_factor_in_the_ggn():
    """A value-only ‖f − y‖² gives the GGN of the built-in mse (whose factor is √2 I)."""
    apply_fn = lambda p, x: jnp.tanh(x @ p["w"])  # noqa: E731
    params = {"w": jax.random.normal(jax.random.key(0), (3, 2), dtype=jnp.float64)}
    x = jax.random.normal(jax.random.key(1), (5, 3), dtype=jnp.float64)
    y = jax.random.normal(jax.random.key(2), (5, 2), dtype=jnp.float64)
    value_only = losses.Loss(name="squares", value=lambda f, t: jnp.sum((f - t) ** 2))
    ggn_auto = curvjax.ggn_matrix(apply_fn, params, (x, y), loss=value_only)
    ggn_mse = curvjax.ggn_matrix(apply_fn, params, (x, y), loss="mse")
    np.testing.assert_allclose(ggn_auto, ggn_mse, atol=1e-12)


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
    apply_fn = lambda p, x: x @ p["w"]  # noqa: E731
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
