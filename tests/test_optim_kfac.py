"""Preconditioned gradient descent and K-FAC against dense numpy references (float64).

Every expected value is assembled here from dense matrices: the GGN from ``reference.ggn_matrix``
(``jax.jacobian`` / ``jax.hessian``), damped Kronecker products with ``np.kron`` and inverses with
``np.linalg``. Where the factors themselves come from curvjax (``kflr`` is tested elsewhere), only
their assembly and inversion is checked here; the cross-layer factors of the block-tridiagonal
K-FAC are checked against per-example Jacobians.
"""

import chex
import jax
import jax.numpy as jnp
import models
import numpy as np
import optax
import pytest
import reference

import curvjax
from curvjax import chain_factors
from curvjax._src.optim import tridiagonal
from curvjax._src.optim.kfac import kfac, levenberg_marquardt, scale_by_kfac
from curvjax._src.optim.precondition import precondition_by_curvature

FAST = reference.FAST_COMPILE
RTOL = 1e-9


def _jit(fn, **kwargs):
    return jax.jit(fn, compiler_options=FAST, **kwargs)


def _close(actual, expected, rtol=RTOL, what=""):
    actual, expected = np.asarray(actual), np.asarray(expected)
    scale = max(float(np.max(np.abs(expected))), 1e-300)
    err = float(np.max(np.abs(actual - expected)))
    assert err <= rtol * scale, f"{what}: max error {err:.3e} > {rtol:.1e} × {scale:.3e}"


def _flat(tree):
    return np.asarray(jax.flatten_util.ravel_pytree(tree)[0])


def _pi(a, b):
    return np.sqrt((np.trace(a) / a.shape[0]) / (np.trace(b) / b.shape[0]))


def _damped_kron(a, b, c, swap=False):
    """``(A + π√c I) ⊗ (B + √c/π I)`` (``swap``: the factors in the other order), numpy."""
    a, b = np.asarray(a), np.asarray(b)
    pi = _pi(a, b)
    ad = a + pi * np.sqrt(c) * np.eye(a.shape[0])
    bd = b + np.sqrt(c) / pi * np.eye(b.shape[0])
    return np.kron(bd, ad) if swap else np.kron(ad, bd)


# ---------------------------------------------------------------------------- models


def elementwise_apply(p, x):
    """``f = x ⊙ w``: with MSE its GGN (= Hessian) is exactly diagonal."""
    return x * p["w"][None, :]


def linear_transposed_apply(p, x):
    """One dense layer stored ``[O, I]`` (equinox layout): the leaf order is ``o·I + i``."""
    return x @ p["w"].T


def linear_apply(p, x):
    return x @ p["w"] + p["b"][None, :]


def mlp_apply(p, x):
    """Three dense layers; the second stores its kernel ``[O, I]``; the last has no bias."""
    h = jnp.tanh(x @ p["w1"] + p["b1"][None, :])
    h = jnp.tanh(h @ p["w2"].T + p["b2"][None, :])
    return h @ p["w3"]


def _mlp_params(seed=0):
    rng = np.random.default_rng(seed)
    shapes = {"w1": (4, 5), "b1": (5,), "w2": (6, 5), "b2": (6,), "w3": (6, 3)}
    return {k: jnp.asarray(rng.standard_normal(s) / 2) for k, s in shapes.items()}


def _batch(seed, n=7, d=4, classes=3):
    rng = np.random.default_rng(100 + seed)
    return jnp.asarray(rng.standard_normal((n, d))), jnp.asarray(rng.integers(0, classes, n))


# ---------------------------------------------------------------------------- preconditioned GD


def test_precondition_diagonal_equals_dense_solve():
    """G exactly diagonal: the update is ``(G + (λ+η)I)⁻¹(∇L + ηθ)`` for both call paths."""
    rng = np.random.default_rng(0)
    params = {"w": jnp.asarray(rng.standard_normal(3))}
    batch = (jnp.asarray(rng.standard_normal((5, 3))), jnp.asarray(rng.standard_normal((5, 3))))
    lam, eta = 0.3, 0.05
    ggn = np.asarray(reference.ggn_matrix(elementwise_apply, params, batch, "mse"))
    assert np.allclose(ggn, np.diag(np.diag(ggn)))  # the premise of the exact comparison
    g = _flat(reference.grad(elementwise_apply, params, batch, "mse"))
    expected = np.linalg.solve(ggn + (lam + eta) * np.eye(3), g + eta * _flat(params))

    one_pass = precondition_by_curvature(damping=lam, l2=eta)
    convenience = precondition_by_curvature(
        damping=lam, l2=eta, quantity="hessian_diag", apply_fn=elementwise_apply, loss="mse"
    )

    @_jit
    def run(params, batch):
        out = curvjax.extract(elementwise_apply, params, batch, ["ggn_diag"], loss="mse")
        d1, _ = one_pass.update(
            out["grad"], one_pass.init(params), params, curvature=out["ggn_diag"]
        )
        d2, _ = convenience.update(out["grad"], convenience.init(params), params, batch=batch)
        return d1, d2

    d1, d2 = run(params, batch)
    _close(_flat(d1), expected, what="one pass (ggn_diag)")
    _close(_flat(d2), expected, what="convenience (hessian_diag)")


def test_precondition_kronecker_exact_case():
    """One example, one dense layer: G = A ⊗ B exactly (checked); the update inverts the
    π-damped product, in the leaf order of an ``[O, I]`` kernel (a permuted canonical index)."""
    rng = np.random.default_rng(1)
    params = {"w": jnp.asarray(rng.standard_normal((3, 4)))}  # [O, I]
    batch = (jnp.asarray(rng.standard_normal((1, 4))), jnp.asarray([2]))
    lam, eta = 0.2, 0.1
    x = np.asarray(batch[0][0])
    f = np.asarray(linear_transposed_apply(params, batch[0])[0])
    p = np.exp(f - f.max()) / np.exp(f - f.max()).sum()
    a, b = np.outer(x, x), np.diag(p) - np.outer(p, p)
    ggn = np.asarray(reference.ggn_matrix(linear_transposed_apply, params, batch))
    _close(ggn, np.kron(b, a), rtol=1e-12, what="premise G = B ⊗ A in leaf order")
    g = _flat(reference.grad(linear_transposed_apply, params, batch))
    expected = np.linalg.solve(_damped_kron(a, b, lam + eta, swap=True), g + eta * _flat(params))

    tx = optax.chain(
        precondition_by_curvature(
            damping=lam, l2=eta, quantity="kflr", apply_fn=linear_transposed_apply
        ),
        optax.scale(-1.0),
    )

    @_jit
    def run(params, batch):
        out = curvjax.extract(linear_transposed_apply, params, batch, ["kflr"])
        d1, _ = tx.update(out["grad"], tx.init(params), params, curvature=out["kflr"])
        d2, _ = tx.update(out["grad"], tx.init(params), params, batch=batch)
        return d1, d2

    d1, d2 = run(params, batch)
    _close(-_flat(d1), expected, what="one pass")
    _close(-_flat(d2), expected, what="convenience")


def test_precondition_grouped_conv_blocks():
    """Grouped convolution (G = 2, permuted index) and bias blocks: the update equals the dense
    solve with ``P (⊕_g (A_g+π_g√c I) ⊗ (B_g+√c/π_g I)) Pᵀ`` and ``M + cI`` assembled in numpy."""
    case = models.get_case("cnn_grouped")
    batch = models.make_batch(case, "cross_entropy")
    lam, eta = 0.05, 0.01
    tx = precondition_by_curvature(damping=lam, l2=eta)

    @_jit
    def run(params, batch):
        out = curvjax.extract(case.apply_fn, params, batch, ["kflr"])
        d, _ = tx.update(out["grad"], tx.init(params), params, curvature=out["kflr"])
        return out, d

    out, d = run(case.params, batch)
    c = lam + eta
    is_block = lambda x: isinstance(  # noqa: E731
        x, curvjax.KroneckerBlock | curvjax.DenseBlock | curvjax.DiagonalBlock
    )
    blocks = jax.tree.leaves(out["kflr"], is_leaf=is_block)
    groups_seen = 0
    for block, g, theta, got in zip(
        blocks,
        jax.tree.leaves(out["grad"]),
        jax.tree.leaves(case.params),
        jax.tree.leaves(d),
        strict=True,
    ):
        rhs = np.asarray(g).ravel() + eta * np.asarray(theta).ravel()
        if isinstance(block, curvjax.KroneckerBlock):
            a, b, index = (np.asarray(v) for v in (block.a, block.b, block.index))
            groups_seen = max(groups_seen, a.shape[0])
            size = a.shape[0] * a.shape[1] * b.shape[1]
            canon = np.zeros((size, size))
            step = a.shape[1] * b.shape[1]
            for k in range(a.shape[0]):
                canon[k * step : (k + 1) * step, k * step : (k + 1) * step] = _damped_kron(
                    a[k], b[k], c
                )
            matrix = canon[np.ix_(index, index)]
        else:
            matrix = np.asarray(block.matrix) + c * np.eye(rhs.size)
        _close(np.asarray(got).ravel(), np.linalg.solve(matrix, rhs), what=type(block).__name__)
    assert groups_seen == 2


def test_missing_extra_arguments_are_named():
    params = {"w": jnp.ones((4, 3)), "b": jnp.zeros(3)}
    grads = jax.tree.map(jnp.ones_like, params)
    tx = precondition_by_curvature(damping=0.1)
    with pytest.raises(ValueError, match="curvature"):
        tx.update(grads, tx.init(params), params)
    tx = precondition_by_curvature(damping=0.1, quantity="kflr")
    with pytest.raises(ValueError, match="apply_fn"):
        tx.update(grads, tx.init(params), params, batch=_batch(0))
    tx = precondition_by_curvature(damping=0.1, l2=0.1)
    with pytest.raises(ValueError, match="params"):
        tx.update(grads, tx.init(params), None, curvature=grads)
    opt = kfac(linear_apply, _batch(0)[0])
    with pytest.raises(ValueError, match="batch"):
        opt.update(grads, opt.init(params), params)
    opt = scale_by_kfac(linear_apply, _batch(0)[0])
    with pytest.raises(ValueError, match="curvature"):
        opt.update(grads, opt.init(params), params)
    with pytest.raises(ValueError, match="tridiagonal"):
        scale_by_kfac(
            models.get_case("cnn_valid").apply_fn, jnp.ones((1, 6, 6, 2)), block="tridiagonal"
        ).init(models.get_case("cnn_valid").params)


# ---------------------------------------------------------------------------- K-FAC (diagonal)


def _kfac_dense(blocks, c):
    """Per leaf of the MLP: the damped K-FAC matrix in leaf order (numpy)."""
    out = {}
    for name, block in blocks.items():
        if isinstance(block, curvjax.KroneckerBlock):
            a, b = np.asarray(block.a[0]), np.asarray(block.b[0])
            out[name] = _damped_kron(a, b, c, swap=(name == "w2"))  # w2 is stored [O, I]
        else:
            out[name] = np.asarray(block.matrix) + c * np.eye(block.matrix.shape[0])
    return out


def _mix(b1, b2, w):
    return jax.tree.map(lambda x, y: x if x.dtype.kind == "i" else w * x + (1 - w) * y, b1, b2)


def test_scale_by_kfac_moving_average_and_refresh():
    """T = 2: step 0 solves with F1, step 1 still with F1's eigendecompositions, step 2 with the
    average ``ε F_avg + (1-ε) F3`` where ``F_avg = (F1 + F2)/2`` (``ε_k = min(1-1/k, 0.95)``)."""
    params = _mlp_params()
    batches = [_batch(k) for k in range(3)]
    lam, eta = 0.1, 0.02
    opt = scale_by_kfac(
        mlp_apply, batches[0][0], damping=lam, l2=eta, inverse_interval=2, quantity="kflr"
    )

    @_jit
    @chex.assert_max_traces(n=1)
    def step(state, params, batch):
        out = curvjax.extract(mlp_apply, params, batch, ["kflr"])
        d, new_state = opt.update(out["grad"], state, params, curvature=out["kflr"])
        d_convenience, _ = opt.update(out["grad"], state, params, batch=batch)
        return d, d_convenience, new_state, out

    state = opt.init(params)
    outs, dirs = [], []
    for batch in batches:
        d, d_convenience, state, out = step(state, params, batch)
        outs.append(out)
        dirs.append(d)
        _close(_flat(d_convenience), _flat(d), rtol=1e-12, what="convenience path")
    f1, f2, f3 = (o["kflr"] for o in outs)
    used = [f1, f1, _mix(_mix(f1, f2, 0.5), f3, 2 / 3)]
    for k in range(3):
        dense = _kfac_dense(used[k], lam + eta)
        for name in params:
            rhs = np.asarray(outs[k]["grad"][name] + eta * params[name]).ravel()
            expected = np.linalg.solve(dense[name], rhs)
            _close(np.asarray(dirs[k][name]).ravel(), expected, what=f"step {k} {name}")
    assert int(state.count) == 3


def _ggn(params, batch):
    return np.asarray(reference.ggn_matrix(mlp_apply, params, batch))


def test_kfac_quadratic_model_step_and_momentum():
    """Fixed damping, T = 1: δ₁ = αΔ₁ with α from the exact GGN, δ₂ = αΔ₂ + μδ₁ from the 2×2
    system; Δ = -(damped K-FAC)⁻¹(∇L + ηθ) assembled densely."""
    params = _mlp_params(1)
    batches = [_batch(3), _batch(4)]
    lam, eta = 0.05, 0.01
    c = lam + eta
    opt = kfac(
        mlp_apply,
        batches[0][0],
        damping=lam,
        l2=eta,
        inverse_interval=1,
        adapt_damping=False,
        quantity="kflr",
    )

    @_jit
    def step(state, params, batch):
        out = curvjax.extract(mlp_apply, params, batch, ["kflr"])
        d, state = opt.update(out["grad"], state, params, curvature=out["kflr"], batch=batch)
        return d, state, out

    state = opt.init(params)
    previous, factors = None, None
    for k, batch in enumerate(batches):
        d, state, out = step(state, params, batch)
        factors = out["kflr"] if factors is None else _mix(factors, out["kflr"], 0.5)
        dense = _kfac_dense(factors, c)
        grad_h = {n: np.asarray(out["grad"][n] + eta * params[n]).ravel() for n in params}
        proposal = {n: -np.linalg.solve(dense[n], grad_h[n]) for n in params}
        names = sorted(params)  # ravel_pytree order
        big_delta = np.concatenate([proposal[n] for n in names])
        big_grad = np.concatenate([grad_h[n] for n in names])
        curvature = _ggn(params, batch) + c * np.eye(big_delta.size)
        if previous is None:
            alpha = -(big_grad @ big_delta) / (big_delta @ curvature @ big_delta)
            expected = alpha * big_delta
        else:
            vs = np.stack([big_delta, previous])
            coef = np.linalg.solve(vs @ curvature @ vs.T, -(vs @ big_grad))
            assert abs(coef[1]) > 1e-6  # momentum is actually used
            expected = coef @ vs
        _close(_flat(d), expected, rtol=1e-8, what=f"step {k}")
        previous = _flat(d)
        params = optax.apply_updates(params, d)


def test_levenberg_marquardt_rule():
    lam, omega = 0.1, 0.9
    assert float(levenberg_marquardt(lam, 0.9, omega, 1e-8)) == pytest.approx(lam * omega)
    assert float(levenberg_marquardt(lam, 0.1, omega, 1e-8)) == pytest.approx(lam / omega)
    assert float(levenberg_marquardt(lam, -3.0, omega, 1e-8)) == pytest.approx(lam / omega)
    assert float(levenberg_marquardt(lam, 0.5, omega, 1e-8)) == pytest.approx(lam)
    assert float(levenberg_marquardt(lam, jnp.nan, omega, 1e-8)) == pytest.approx(lam)
    assert float(levenberg_marquardt(1e-9, 0.9, omega, 1e-8)) == pytest.approx(1e-8)


@pytest.mark.parametrize("curvature_scale, moves", [(0.02, "up"), (50.0, "down")])
def test_kfac_damping_adapts_to_reduction_ratio(curvature_scale, moves):
    """A loss whose declared curvature is ``s`` times the true one: ``s ≪ 1`` overshoots
    (ρ < 1/4, λ grows), ``s ≫ 1`` undershoots (ρ ≈ 2 > 3/4, λ shrinks). ρ is recomputed from the
    true loss and the dense GGN of the declared model."""
    rng = np.random.default_rng(5)
    params = {"w": jnp.asarray(rng.standard_normal((4, 3))), "b": jnp.zeros(3)}
    batch = (jnp.asarray(rng.standard_normal((6, 4))), jnp.asarray(rng.standard_normal((6, 3))))
    declared = curvjax.losses.Loss(
        name="scaled_mse",
        value=lambda f, y: jnp.sum((f - y) ** 2),
        hessian_factor=lambda f, y: jnp.sqrt(2.0 * curvature_scale) * jnp.eye(f.shape[0]),
    )
    lam, eta, omega = 1e-3, 0.01, 0.9
    opt = kfac(
        linear_apply,
        batch[0],
        damping=lam,
        l2=eta,
        inverse_interval=1,
        momentum=False,
        adaptation_interval=1,
        damping_decay=omega,
        quantity="kflr",
        loss=declared,
    )

    @_jit
    def step(state, params, batch):
        grads = reference.grad(linear_apply, params, batch, "mse")
        return opt.update(grads, state, params, batch=batch)

    delta, state = step(opt.init(params), params, batch)
    moved = optax.apply_updates(params, delta)

    def h(p):
        value = float(reference.reduced_loss(linear_apply, p, batch, "mse"))
        return value + 0.5 * eta * float(_flat(p) @ _flat(p))

    g = _flat(reference.grad(linear_apply, params, batch, "mse")) + eta * _flat(params)
    ggn = curvature_scale * np.asarray(reference.ggn_matrix(linear_apply, params, batch, "mse"))
    d = _flat(delta)
    rho = (h(moved) - h(params)) / (g @ d + 0.5 * d @ (ggn + eta * np.eye(d.size)) @ d)
    assert float(state.rho) == pytest.approx(rho, rel=1e-8)
    if moves == "up":
        assert rho < 0.25 and float(state.damping) == pytest.approx(lam / omega)
    else:
        assert rho > 0.75 and float(state.damping) == pytest.approx(lam * omega)


# ---------------------------------------------------------------------------- tridiagonal


def _layer_jacobians(params, x_n):
    """Per example: inputs ā_l (with 1 for biased layers) and ∂f/∂z_l for the three layers."""
    z1 = x_n @ params["w1"] + params["b1"]
    h1 = jnp.tanh(z1)
    z2 = h1 @ params["w2"].T + params["b2"]
    h2 = jnp.tanh(z2)
    head2 = lambda z: jnp.tanh(z) @ params["w3"]
    head1 = lambda z: head2(jnp.tanh(z) @ params["w2"].T + params["b2"])
    inputs = [jnp.append(x_n, 1.0), jnp.append(h1, 1.0), h2]
    jacobians = [jax.jacobian(head1)(z1), jax.jacobian(head2)(z2), jnp.eye(3)]
    return inputs, jacobians


def test_chain_factors_against_per_example_jacobians():
    """KFLR columns: ``G_{l,m} = κ Σ_n J_lᵀ H_n J_m`` and ``Ā_{l,m} = (1/N) Σ_n ā_l ā_mᵀ``."""
    params = _mlp_params(2)
    batch = _batch(5)
    f = _jit(lambda p, b: chain_factors(mlp_apply, p, b, quantity="kflr"))(params, batch)
    factors = f["chain_factors"]
    n = batch[0].shape[0]
    inputs, jacobians = jax.vmap(lambda x: _layer_jacobians(params, x))(batch[0])
    hess = np.asarray(reference.loss_hessians(mlp_apply, params, batch))
    for layer in range(3):
        for other, a_got, g_got in (
            (layer, factors.a, factors.g),
            (layer + 1, factors.a_cross, factors.g_cross),
        ):
            if other == 3:
                continue
            a_ref = np.einsum("ni,nj->ij", inputs[layer], inputs[other]) / n
            g_ref = np.einsum("nci,ncd,ndj->ij", jacobians[layer], hess, jacobians[other]) / n
            _close(a_got[layer], a_ref, rtol=1e-10, what=f"A {layer},{other}")
            _close(g_got[layer], g_ref, rtol=1e-10, what=f"G {layer},{other}")
    _close(_flat(f["grad"]), _flat(reference.grad(mlp_apply, params, batch)), what="grad")


def _to_layers(tree):
    """Params-shaped tree -> the layer matrices W̄_l (kernel [I, O] then the bias row)."""
    return [
        np.vstack([np.asarray(tree["w1"]), np.asarray(tree["b1"])[None]]),
        np.vstack([np.asarray(tree["w2"]).T, np.asarray(tree["b2"])[None]]),
        np.asarray(tree["w3"]),
    ]


def _tridiagonal_precision(factors, c):
    """``F̂⁻¹`` from the damped ``F̃`` band by the chain formula
    ``Σ_l [F̃_{l:l+2}]⁻¹ - Σ_{interior l} [F̃_{l,l}]⁻¹`` (zero-padded), and the damped ``F̃``."""
    a = [np.asarray(x) for x in factors.a]
    g = [np.asarray(x) for x in factors.g]
    sizes = [x.shape[0] * y.shape[0] for x, y in zip(a, g, strict=True)]
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    band = np.zeros((offsets[-1], offsets[-1]))
    for k in range(3):
        s = slice(offsets[k], offsets[k + 1])
        band[s, s] = _damped_kron(a[k], g[k], c)
        if k < 2:
            t = slice(offsets[k + 1], offsets[k + 2])
            cross = np.kron(np.asarray(factors.a_cross[k]), np.asarray(factors.g_cross[k]))
            band[s, t], band[t, s] = cross, cross.T
    precision = np.zeros_like(band)
    for k in range(2):
        s = slice(offsets[k], offsets[k + 2])
        precision[s, s] += np.linalg.inv(band[s, s])
    s = slice(offsets[1], offsets[2])
    precision[s, s] -= np.linalg.inv(band[s, s])
    return precision, band, offsets


def test_tridiagonal_step_equals_dense_block_tridiagonal_inverse():
    """``scale_by_kfac(block="tridiagonal")`` on a 3-layer chain: the direction is ``F̂⁻¹(∇L+ηθ)``
    with ``F̂⁻¹`` built densely from the same factors; ``F̂`` matches ``F̃`` on the band."""
    params = _mlp_params(3)
    batch = _batch(6)
    lam, eta = 0.03, 0.02
    c = lam + eta
    opt = scale_by_kfac(
        mlp_apply,
        batch[0],
        damping=lam,
        l2=eta,
        inverse_interval=1,
        block="tridiagonal",
        quantity="kflr",
    )

    @_jit
    def run(params, batch):
        f = chain_factors(mlp_apply, params, batch, quantity="kflr")
        d1, _ = opt.update(f["grad"], opt.init(params), params, curvature=f["chain_factors"])
        d2, _ = opt.update(f["grad"], opt.init(params), params, batch=batch)
        return f, d1, d2

    f, d1, d2 = run(params, batch)
    precision, band, offsets = _tridiagonal_precision(f["chain_factors"], c)
    covariance = np.linalg.inv(precision)
    for k in range(3):
        for m in (k, k + 1):
            if m < 3:
                s, t = slice(offsets[k], offsets[k + 1]), slice(offsets[m], offsets[m + 1])
                _close(covariance[s, t], band[s, t], rtol=1e-8, what=f"F̂ block {k},{m}")
    rhs_tree = jax.tree.map(lambda g, p: g + eta * p, f["grad"], params)
    rhs = np.concatenate([w.ravel() for w in _to_layers(rhs_tree)])
    expected = precision @ rhs
    for what, d in (("one pass", d1), ("convenience", d2)):
        got = np.concatenate([w.ravel() for w in _to_layers(d)])
        _close(got, expected, rtol=1e-8, what=what)
    # The off-diagonal blocks matter: the block-diagonal inverse differs.
    blockdiag = np.zeros_like(band)
    for k in range(3):
        s = slice(offsets[k], offsets[k + 1])
        blockdiag[s, s] = np.linalg.inv(band[s, s])
    assert np.max(np.abs(blockdiag @ rhs - expected)) > 1e-3 * np.max(np.abs(expected))


def test_tridiagonal_kfac_trains_under_jit_in_a_chain():
    """Convenience path with Monte-Carlo factors, inverses every 2 steps, ``lax.cond`` inside one
    compiled step, no retracing; the loss goes down."""
    params = _mlp_params(4)
    batch = _batch(7, n=16)
    opt = optax.chain(
        optax.clip_by_global_norm(10.0),
        kfac(mlp_apply, batch[0], damping=0.1, inverse_interval=2, block="tridiagonal"),
    )

    @_jit
    @chex.assert_max_traces(n=1)
    def step(params, state, key):
        loss, grads = jax.value_and_grad(reference.reduced_loss.eager, argnums=1)(
            mlp_apply, params, batch
        )
        updates, state = opt.update(grads, state, params, batch=batch, key=key)
        return optax.apply_updates(params, updates), state, loss

    state = opt.init(params)
    losses = []
    for k in range(6):
        params, state, loss = step(params, state, jax.random.key(k))
        losses.append(float(loss))
    assert losses[-1] < 0.7 * losses[0]
    assert int(state[1].count) == 6 and np.isfinite(float(state[1].damping))
    assert tridiagonal.ChainFactors is type(state[1].factors)
