"""The optimizers in float32 (x64 off): finite, and as accurate as float32 allows.

``precondition_by_curvature``, ``scale_by_kfac`` / ``kfac`` and ``noisy_kfac`` on rank-deficient
factors (fewer examples than a layer's 1,000 inputs), zero gradients, logits of order 1e4 and
damping down to 1e-8: every update is finite and float32, and is checked for a property that a
wrong number would break: where the damped system is well conditioned, the float64 result on the
very same float32 values (tolerance from float32's epsilon and the condition number); where it is
not, the backward error of the damped Kronecker solve (the float32 direction solves the damped
system, with the documented resolution floor, to a residual of a few epsilon of the operator) and
the descent property. A 300-step float32 K-FAC run on digits with adaptive damping down to 1e-8
never produces a NaN and trains.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import reference
from sklearn.datasets import load_digits

import curvjax
from curvjax.optim import kfac, noisy_kfac, precondition_by_curvature, scale_by_kfac

EPS32 = float(np.finfo(np.float32).eps)
FAST = reference.FAST_COMPILE
HIDDEN, CLASSES = 8, 10


def mlp(p, x):
    h = jnp.tanh(x @ p["w1"] + p["b1"][None, :])
    return h @ p["w2"] + p["b2"][None, :]


def _problem(n, width, seed=0, logit_scale=1.0, input_scale=1.0):
    """float32 numpy params and batch of the MLP (``width`` inputs, ``n`` examples).

    ``input_scale`` scales the inputs up and the first kernel down: the same function, with an
    input-side factor ``A`` ``input_scale²`` times larger (``π`` grows, ``π√c`` relative to
    ``tr A`` shrinks).
    """
    rng = np.random.default_rng(seed)
    params = {
        "w1": rng.normal(size=(width, HIDDEN)) / np.sqrt(width) / input_scale,
        "b1": 0.1 * rng.normal(size=HIDDEN),
        "w2": logit_scale * rng.normal(size=(HIDDEN, CLASSES)) / np.sqrt(HIDDEN),
        "b2": np.zeros(CLASSES),
    }
    params = {k: v.astype(np.float32) for k, v in params.items()}
    x = (input_scale * rng.normal(size=(n, width))).astype(np.float32)
    y = rng.integers(0, CLASSES, n).astype(np.int32)
    return params, (x, y)


def _as(tree, dtype):
    return jax.tree.map(
        lambda a: jnp.asarray(a, dtype) if np.issubdtype(np.asarray(a).dtype, np.floating) else a,
        tree,
    )


def _all_finite(tree) -> bool:
    return all(bool(np.all(np.isfinite(np.asarray(x)))) for x in jax.tree.leaves(tree))


def _dtypes(tree) -> set:
    return {np.asarray(x).dtype for x in jax.tree.leaves(tree)}


def _vdot(a, b) -> float:
    return sum(
        float(np.vdot(np.asarray(u, np.float64), np.asarray(v, np.float64)))
        for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


# ---------------------------------------------------------------------------- one direction


def _direction(name, params, batch, damping):
    """``(grad, direction, kflr blocks)`` of one optimizer on ``batch`` in the current x64 mode.

    ``kfac``'s direction is ``-δ`` (its update has the sign and step size); the others return the
    preconditioned gradient.
    """

    def run(params, batch, damping):
        out = curvjax.extract(mlp, params, batch, ["kflr"])
        grad, curv = out["grad"], out["kflr"]
        if name == "precondition":
            opt = precondition_by_curvature(damping=damping)
            d, _ = opt.update(grad, opt.init(params), params, curvature=curv)
        elif name == "scale_by_kfac":
            opt = scale_by_kfac(mlp, batch[0], damping=damping)
            d, _ = opt.update(grad, opt.init(params), params, curvature=curv)
        elif name == "kfac":
            opt = kfac(mlp, batch[0], damping=1.0, min_damping=1e-8, quantity="kflr")
            state = opt.init(params)._replace(damping=damping)
            step, _ = opt.update(grad, state, params, curvature=curv, batch=batch)
            d = jax.tree.map(jnp.negative, step)
        else:  # noisy_kfac without noise: the damped Fisher solve, then learning rate 1
            opt = noisy_kfac(mlp, batch[0], learning_rate=1.0, rho=0.0, damping=NOISY_DAMPING)
            step, _ = opt.update(grad, opt.init(params), params, curvature=curv)
            d = jax.tree.map(jnp.negative, step)
        return grad, d, curv

    return jax.jit(run, compiler_options=FAST)(params, batch, damping)


NOISY_DAMPING = 1e-3
OPTIMIZERS = ["precondition", "scale_by_kfac", "kfac", "noisy_kfac"]


def _kron_condition(block, damping) -> float:
    """Condition number of ``(A + π√c I) ⊗ (B + √c/π I)`` for a float64 numpy block."""
    a, b = np.asarray(block.a[0], np.float64), np.asarray(block.b[0], np.float64)
    ea, eb = np.linalg.eigvalsh(a), np.linalg.eigvalsh(b)
    pi = np.sqrt(np.mean(ea) / np.mean(eb))
    da, db = ea + pi * np.sqrt(damping), eb + np.sqrt(damping) / pi
    return float(da.max() * db.max() / (da.min() * db.min()))


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_well_conditioned_matches_float64(name):
    """64 examples of 16 inputs (full-rank factors), damping 1e-3: float32 ≈ float64."""
    params, batch = _problem(64, 16)
    damping = NOISY_DAMPING
    with jax.enable_x64(False):
        g32, d32, _ = _direction(name, _as(params, jnp.float32), _as(batch, jnp.float32), damping)
    assert _dtypes(d32) == {np.dtype("float32")}
    g64, d64, curv = _direction(name, _as(params, jnp.float64), _as(batch, jnp.float64), damping)
    kappa = max(_kron_condition(curv[k], damping) for k in ("w1", "w2"))
    # a backward-stable solve has relative error ≲ κ ε per factorisation; the inputs (float32
    # gradient and factors, from float32 sums of 64 terms) carry a few ε more, and kfac's step
    # size α is a ratio of such quantities: 20 κ ε (measured: below 0.3 κ ε, here κ ≈ 1e2)
    for key in d64:
        want = np.asarray(d64[key])
        err = np.max(np.abs(np.asarray(d32[key], np.float64) - want)) / np.max(np.abs(want))
        assert err <= 20 * kappa * EPS32, f"{name} {key}: {err:.2e} > 20 κ ε (κ = {kappa:.1e})"


# ---------------------------------------------------------------------------- ill-conditioned


def _floored_shifts(a, b, damping):
    """The documented damping of each factor: ``max(π√c, ε tr A)``, ``max(√c/π, ε tr B)``."""
    pi = np.sqrt((np.trace(a) / a.shape[0]) / (np.trace(b) / b.shape[0]))
    root = np.sqrt(damping)
    return max(pi * root, EPS32 * np.trace(a)), max(root / pi, EPS32 * np.trace(b))


@pytest.mark.parametrize(
    ("damping", "input_scale", "floored"),
    [(1e-4, 1.0, False), (1e-8, 1.0, False), (1e-8, 300.0, True)],
)
@pytest.mark.parametrize("name", ["precondition", "scale_by_kfac"])
def test_rank_deficient_width_1000_backward_stable(name, damping, input_scale, floored):
    """4 examples of 1,000 inputs: ``A`` has rank 4; the solve's residual is a few ε.

    The forward error is not small here (``κ`` reaches ``10⁸``), so the test checks what a
    correct float32 solve guarantees: ``(A + δ_A I) D (B + δ_B I) = G`` up to
    ``c ε ‖A + δ_A I‖ ‖B + δ_B I‖ ‖D‖``, with the floored shifts ``δ`` of the blocks module, and
    ``⟨G, D⟩ > 0`` (a descent direction). With inputs of scale 300 the input-side shift
    ``π√c`` falls below ``ε tr A`` (the floor acts; a Cholesky factorisation of ``A + π√c I``
    fails there and gave NaN before the floor).
    """
    params, batch = _problem(4, 1000, seed=1, input_scale=input_scale)
    with jax.enable_x64(False):
        grad, d, curv = _direction(name, _as(params, jnp.float32), _as(batch, jnp.float32), damping)
    assert _all_finite(d) and _dtypes(d) == {np.dtype("float32")}
    assert _vdot(grad, d) > 0
    for key in ("w1", "w2"):
        a = np.asarray(curv[key].a[0], np.float64)
        b = np.asarray(curv[key].b[0], np.float64)
        da, db = _floored_shifts(a, b, damping)
        if key == "w1":  # the regime is the intended one
            assert (da == EPS32 * np.trace(a)) == floored
        left, right = a + da * np.eye(a.shape[0]), b + db * np.eye(b.shape[0])
        x = np.asarray(d[key], np.float64)
        residual = np.linalg.norm(left @ x @ right - np.asarray(grad[key], np.float64))
        scale = np.linalg.norm(left, 2) * np.linalg.norm(right, 2) * np.linalg.norm(x)
        # Cholesky / eigh are backward stable with a constant that grows with the dimension:
        # measured below 2.5 ε; 50 ε leaves margin and is still orders of magnitude below what a
        # wrong shift, π or a dropped factor gives (an O(1) relative residual)
        assert residual <= 50 * EPS32 * scale, f"{key}: {residual / scale / EPS32:.1f} ε"


# ---------------------------------------------------------------------------- edge cases


CASES = {
    # name: (examples, logit scale, damping, zero gradient)
    "rank_deficient": (4, 1.0, 1e-3, False),
    "tiny_damping": (4, 1.0, 1e-8, False),
    "zero_gradient": (4, 1.0, 1e-8, True),
    "large_logits": (4, 3e4, 1e-8, False),
}


@pytest.fixture(scope="module")
def steppers():
    """Compiled float32 steps of the three optimizers (width 1,000, damping an argument)."""

    def precondition_step(params, batch, damping, zero):
        out = curvjax.extract(mlp, params, batch, ["kflr"])
        grad = jax.tree.map(lambda g: jnp.where(zero, 0.0, g).astype(g.dtype), out["grad"])
        opt = precondition_by_curvature(damping=damping)
        d, _ = opt.update(grad, opt.init(params), params, curvature=out["kflr"])
        return grad, jax.tree.map(jnp.negative, d), out["loss"]

    def kfac_step(params, batch, damping, zero):
        opt = kfac(mlp, batch[0], damping=1.0, min_damping=1e-8, adaptation_interval=1)
        state = opt.init(params)._replace(damping=damping)
        grads, updates = [], []
        for k in range(2):  # the second step solves the 2×2 system with momentum
            out = curvjax.extract(mlp, params, batch, ["kfac"], key=jax.random.key(k))
            grad = jax.tree.map(lambda g: jnp.where(zero, 0.0, g).astype(g.dtype), out["grad"])
            step, state = opt.update(grad, state, params, curvature=out["kfac"], batch=batch)
            grads.append(grad)
            updates.append(step)
        return grads[-1], updates[-1], state

    def noisy_step(params, batch, zero):
        opt = noisy_kfac(mlp, batch[0], learning_rate=1.0, rho=1e-2, damping=1e-8)
        state = opt.init(params)
        for k in range(2):
            out = curvjax.extract(mlp, params, batch, ["kfac"], key=jax.random.key(k))
            grad = jax.tree.map(lambda g: jnp.where(zero, 0.0, g).astype(g.dtype), out["grad"])
            step, state = opt.update(grad, state, params, curvature=out["kfac"])
        return grad, step, state

    return {
        "precondition": jax.jit(precondition_step, compiler_options=FAST),
        "kfac": jax.jit(kfac_step, compiler_options=FAST),
        "noisy_kfac": jax.jit(noisy_step, compiler_options=FAST),
    }


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("name", ["precondition", "kfac", "noisy_kfac"])
def test_edge_cases_float32(steppers, name, case):
    n, logit_scale, damping, zero = CASES[case]
    params, batch = _problem(n, 1000, seed=2, logit_scale=logit_scale)
    with jax.enable_x64(False):
        p32, b32 = _as(params, jnp.float32), _as(batch, jnp.float32)
        if name == "noisy_kfac":  # damping 1e-8 in every case (a construction argument)
            grad, update, state = steppers[name](p32, b32, zero)
        else:
            grad, update, state = steppers[name](p32, b32, jnp.float32(damping), zero)
        if case == "large_logits":  # the loss itself is of order 1e4 and finite
            loss = float(curvjax.extract(mlp, p32, b32, [])["loss"])
            assert 1e3 < loss < 1e6
    assert _all_finite(update) and _dtypes(update) == {np.dtype("float32")}
    float_state = [x for x in jax.tree.leaves(state) if np.issubdtype(x.dtype, np.floating)]
    if name == "kfac":  # rho is NaN when no adaptation ran; everything else finite
        float_state = [x for x in jax.tree.leaves(state._replace(rho=0.0))]
    assert _all_finite(float_state)
    if zero:  # nothing to do: a zero step, not 0/0
        assert all(not np.any(np.asarray(u)) for u in jax.tree.leaves(update))
    else:  # each update is a descent direction for the gradient it was given
        assert _vdot(grad, update) < 0


# ---------------------------------------------------------------------------- digits run


def test_kfac_digits_300_steps_float32():
    """Adaptive damping on a small MLP: λ falls to ~1e-7 and below, never a NaN, the loss falls."""
    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    y = y.astype(np.int32)
    rng = np.random.default_rng(0)
    steps, n, hidden = 300, 64, 32
    idx = np.stack([rng.choice(len(x), n, replace=False) for _ in range(steps)])
    params = {
        "w1": (rng.normal(size=(64, hidden)) / 8).astype(np.float32),
        "b1": np.zeros(hidden, np.float32),
        "w2": (rng.normal(size=(hidden, 10)) / np.sqrt(hidden)).astype(np.float32),
        "b2": np.zeros(10, np.float32),
    }

    def run(params, x, y, idx):
        opt = kfac(mlp, x[:n], damping=1e-2, min_damping=1e-8, inverse_interval=5)

        def body(carry, i):
            params, state = carry
            batch = (x[idx[i]], y[idx[i]])
            out = curvjax.extract(mlp, params, batch, ["kfac"], key=jax.random.key(i))
            step, state = opt.update(out["grad"], state, params, curvature=out["kfac"], batch=batch)
            params = optax.apply_updates(params, step)
            finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(p)) for p in jax.tree.leaves(params)]))
            return (params, state), (finite, state.damping)

        (params, state), (finite, damping) = jax.lax.scan(
            body, (params, opt.init(params)), jnp.arange(steps)
        )
        return params, finite, damping

    with jax.enable_x64(False):
        p0 = _as(params, jnp.float32)
        data = (jnp.asarray(x), jnp.asarray(y))
        trained, finite, damping = jax.jit(run, compiler_options=FAST)(p0, *data, jnp.asarray(idx))
        loss0 = float(curvjax.extract(mlp, p0, data, [])["loss"])
        loss1 = float(curvjax.extract(mlp, trained, data, [])["loss"])
    assert bool(np.all(finite)), f"first non-finite step {int(np.argmin(finite))}"
    assert _dtypes(trained) == {np.dtype("float32")}
    # the run reaches the regime of the reported failure (λ adapted down towards 1e-8)
    assert float(np.min(damping)) < 1e-6
    # initial loss ≈ log 10; measured after 300 steps: 0.18 (the last steps, with λ near 1e-8,
    # fit each batch of 64 closely); a run that stalls or diverges stays above 0.5
    assert loss0 > 2.0 and loss1 < 0.5, (loss0, loss1)


# ---------------------------------------------------------------------------- refused requests


@pytest.mark.parametrize(
    "make",
    [
        lambda: precondition_by_curvature(damping=-1e-3),
        lambda: precondition_by_curvature(l2=-1.0),
        lambda: scale_by_kfac(mlp, np.zeros((1, 4)), damping=-1.0),
        lambda: kfac(mlp, np.zeros((1, 4)), damping=0.0),
        lambda: kfac(mlp, np.zeros((1, 4)), min_damping=-1e-8),
        lambda: noisy_kfac(mlp, np.zeros((1, 4)), learning_rate=0.1, rho=0.1, damping=-1.0),
    ],
)
def test_negative_damping_is_refused(make):
    with pytest.raises(ValueError, match="damping|l2"):
        make()


# ---------------------------------------------------------------------------- step rejection


def test_reduction_ratio_edge_values():
    from curvjax._src.optim.kfac import reduction_ratio

    assert float(reduction_ratio(0.5, 1.0, -1.0)) == pytest.approx(0.5)
    assert np.isnan(float(reduction_ratio(1.0, 1.0, 0.0)))  # no step: no evidence
    assert float(reduction_ratio(0.5, 1.0, 1e-9)) == -np.inf  # impossible model change
    assert float(reduction_ratio(jnp.inf, 1.0, -1.0)) == -np.inf
    assert float(reduction_ratio(0.5, 1.0, jnp.nan)) == -np.inf


@pytest.mark.parametrize(("curvature_scale", "rejected"), [(0.02, True), (50.0, False)])
def test_reject_failed_steps(curvature_scale, rejected):
    """A declared curvature ``s`` times the true one: ``s ≪ 1`` overshoots so far that ``h``
    grows (ρ < 0, recomputed here in float64 from the true loss): the step is rejected (zero
    update and momentum, λ/ω at once); ``s ≫ 1`` undershoots (ρ > 0): the step is the one without the
    option."""
    rng = np.random.default_rng(5)
    params = {"w": jnp.asarray(rng.standard_normal((4, 3))), "b": jnp.zeros(3)}
    x = jnp.asarray(rng.standard_normal((6, 4)))
    batch = (x, jnp.asarray(rng.standard_normal((6, 3))))
    declared = curvjax.losses.Loss(
        name="scaled_mse",
        value=lambda f, y: jnp.sum((f - y) ** 2),
        hessian_factor=lambda f, y: jnp.sqrt(2.0 * curvature_scale) * jnp.eye(f.shape[0]),
    )
    apply = lambda p, x: x @ p["w"] + p["b"][None, :]  # noqa: E731
    lam, omega = 1e-3, 0.9
    kwargs = dict(damping=lam, inverse_interval=1, adaptation_interval=5, damping_decay=omega)
    kwargs.update(quantity="kflr", loss=declared, momentum=False)

    def loss(p):
        return 0.5 * jnp.mean(jnp.sum((apply(p, x) - batch[1]) ** 2, axis=-1))

    grads = jax.grad(loss)(params)
    steps = {}
    for flag in (False, True):
        opt = kfac(apply, x, reject_failed_steps=flag, **kwargs)
        steps[flag] = jax.jit(lambda s, p, opt=opt: opt.update(grads, s, p, batch=batch))(
            opt.init(params), params
        )
    plain, _ = steps[False]
    update, state = steps[True]
    moved = optax.apply_updates(params, plain)
    grew = float(loss(moved)) > float(loss(params))
    assert grew == rejected
    assert (float(state.rho) < 0) == rejected
    if rejected:
        assert all(not np.any(np.asarray(u)) for u in jax.tree.leaves(update))
        assert all(not np.any(np.asarray(u)) for u in jax.tree.leaves(state.previous_update))
        # ω of the rule is damping_decay ** T₁
        assert float(state.damping) == pytest.approx(lam / omega**5, rel=1e-12)
    else:  # not an adaptation step (T₁ = 5): λ unchanged, the same update
        for u, v in zip(jax.tree.leaves(update), jax.tree.leaves(plain), strict=True):
            np.testing.assert_array_equal(np.asarray(u), np.asarray(v))
        assert float(state.damping) == lam
