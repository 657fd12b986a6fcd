"""Spectra: operators against dense matrices, Krylov invariants, estimators in expectation."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import reference
from sklearn.datasets import load_digits

import curvjax
from curvjax import spectral

FAST = reference.FAST_COMPILE


@pytest.fixture(scope="module")
def digits_mlp():
    """A 64-32-10 tanh MLP (2,410 parameters) trained 150 Adam steps on digits, float64."""
    data = load_digits()
    x = jnp.asarray(data.data[:256] / 16.0, jnp.float64)
    y = jnp.asarray(data.target[:256], jnp.int32)
    model = nn.Sequential([nn.Dense(32), nn.tanh, nn.Dense(10)])
    params = jax.tree.map(
        lambda a: a.astype(jnp.float64), model.init(jax.random.key(0, impl="rbg"), x[:1])
    )
    opt = optax.adam(1e-2)

    @jax.jit
    def train(params):
        def step(carry, _):
            p, s = carry
            g = jax.grad(lambda q: reference.reduced_loss(model.apply, q, (x, y)))(p)
            u, s = opt.update(g, s)
            return (optax.apply_updates(p, u), s), None

        return jax.lax.scan(step, (params, opt.init(params)), None, length=150)[0][0]

    params = train(params)
    hess = np.asarray(reference.hessian_matrix(model.apply, params, (x, y)))
    return model.apply, params, (x, y), hess


def test_hessian_operator_and_lanczos_top_10(digits_mlp):
    apply_fn, params, batch, hess = digits_mlp
    assert hess.shape == (2410, 2410)
    exact = np.linalg.eigvalsh(hess)[::-1][:10]

    @jax.jit
    def run(params, batch, key):
        op = spectral.hessian_operator(apply_fn, params, batch)
        top = spectral.top_eigenpairs(op, 10, key=key, max_matvecs=300, tol=1e-8)
        return top, op.matvec(top.eigenvectors[0])

    top, hv = run(params, batch, jax.random.key(0))
    np.testing.assert_allclose(top.eigenvalues, exact, rtol=1e-6)
    assert int(top.num_matvecs) < 300
    np.testing.assert_allclose(hv, top.eigenvalues[0] * top.eigenvectors[0], atol=1e-6 * exact[0])
    pw = jax.jit(
        lambda p, b, k: spectral.top_eigenpairs(
            spectral.hessian_operator(apply_fn, p, b), 3, key=k, method="power"
        )
    )(params, batch, jax.random.key(1))
    magnitudes = np.sort(np.abs(np.linalg.eigvalsh(hess)))[::-1][:3]
    np.testing.assert_allclose(np.abs(pw.eigenvalues[0]), magnitudes[0], rtol=1e-2)
    assert int(pw.num_matvecs) > int(top.num_matvecs) / 10  # sanity: counts are counted


def test_lanczos_invariants():
    rng = np.random.default_rng(0)
    u, _ = np.linalg.qr(rng.normal(size=(60, 60)))
    a = jnp.asarray(u @ np.diag(np.linspace(-1.0, 5.0, 60) ** 3) @ u.T)
    tri = jax.jit(lambda s: spectral.lanczos_tridiagonal(lambda v: a @ v, s, 25))(
        jnp.asarray(rng.normal(size=60))
    )
    q = np.asarray(tri.basis)
    eps = np.finfo(np.float64).eps
    np.testing.assert_allclose(q @ q.T, np.eye(25), atol=100 * eps * 60)
    t = np.asarray(tri.matrix())
    residual = np.asarray(a) @ q.T - q.T @ t  # = β_m q_{m+1} e_mᵀ: only the last column
    np.testing.assert_allclose(residual[:, :-1], 0.0, atol=1e3 * eps * np.abs(t).max())
    np.testing.assert_allclose(np.linalg.norm(residual[:, -1]), tri.offdiag[-1], rtol=1e-8)


def test_curvature_operators_match_dense_matrices():
    import models

    case = models.get_case("cnn_tanh")
    batch = models.make_batch(case, "cross_entropy")
    hess = reference.hessian_matrix(case.apply_fn, case.params, batch)
    ggn = reference.ggn_matrix(case.apply_fn, case.params, batch)
    pe = reference.per_example_grads_flat(case.apply_fn, case.params, batch)  # g_n rows, κ = 1/N
    n = pe.shape[0]
    emp = n * pe.T @ pe  # κ Σ ∇ℓ ∇ℓᵀ = (1/κ) Σ g gᵀ

    @jax.jit
    def dense(params, batch):
        return [
            op.dense()
            for op in (
                spectral.hessian_operator(case.apply_fn, params, batch),
                spectral.ggn_operator(case.apply_fn, params, batch),
                spectral.empirical_fisher_operator(case.apply_fn, params, batch),
            )
        ]

    for got, want in zip(dense(case.params, batch), (hess, ggn, emp), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12 * np.abs(want).max())
    # Monte-Carlo Fisher: unbiased for the GGN (mean over keys within 5 standard errors).
    keys = jax.random.split(jax.random.key(2), 400)
    fishers = jax.jit(
        jax.vmap(
            lambda k: spectral.fisher_operator(case.apply_fn, case.params, batch, key=k).dense()
        ),
        compiler_options=FAST,
    )(keys)
    mean, stderr = fishers.mean(0), fishers.std(0) / np.sqrt(400)
    assert np.all(np.abs(mean - ggn) <= 5 * stderr + 1e-12 * np.abs(ggn).max())


def test_structured_operators_exact_spectrum_and_trace():
    import models

    case = models.get_case("cnn_valid")
    batch = models.make_batch(case, "cross_entropy")
    kflr = curvjax.kflr(case.apply_fn, case.params, batch)
    diag = curvjax.ggn_diag(case.apply_fn, case.params, batch)
    pairs = [
        (spectral.blocks_operator(kflr, case.params), np.asarray(curvjax.blocks_to_dense(kflr))),
        (spectral.diagonal_operator(diag, case.params), np.diag(reference.flatten_float(diag)[0])),
    ]
    for op, dense in pairs:
        np.testing.assert_allclose(op.dense(), dense, atol=1e-13 * np.abs(dense).max())
        np.testing.assert_allclose(
            op.eigenvalues(), np.linalg.eigvalsh(dense), atol=1e-10 * np.abs(dense).max()
        )
        np.testing.assert_allclose(spectral.trace(op, method="exact"), np.trace(dense), rtol=1e-10)


def test_trace_estimators_are_unbiased_and_hutchpp_beats_hutchinson(digits_mlp):
    apply_fn, params, batch, hess = digits_mlp
    exact = np.trace(hess)

    @jax.jit
    def estimates(keys):
        op = spectral.ggn_operator(apply_fn, params, batch)  # PSD with a decaying spectrum
        one = lambda k, m: spectral.trace(op, key=k, method=m, num_matvecs=30)  # noqa: E731
        return (
            jax.vmap(lambda k: one(k, "hutchinson"))(keys),
            jax.vmap(lambda k: one(k, "hutchpp"))(keys),
            jnp.trace(op.dense()),
        )

    hutch, hpp, ggn_trace = estimates(jax.random.split(jax.random.key(4), 200))
    for est in (hutch, hpp):
        assert abs(est.mean() - ggn_trace) <= 5 * est.std() / np.sqrt(len(est))
    assert np.mean(np.abs(hpp - ggn_trace)) < np.mean(np.abs(hutch - ggn_trace))
    assert exact > 0


def test_density_integrates_to_one_and_covers_the_spectrum(digits_mlp, capsys):
    apply_fn, params, batch, hess = digits_mlp
    eig = np.linalg.eigvalsh(hess)
    operator = spectral.hessian_operator(apply_fn, params, batch)
    grid, dens = spectral.density(
        operator,
        key=jax.random.key(5),
        num_probes=4,
        num_steps=60,
        probes_per_call=2,
        progress=True,
    )
    assert np.isclose(np.trapezoid(dens, grid), 1.0, atol=1e-6)
    assert np.all(dens >= 0)
    assert grid[0] <= eig[0] and grid[-1] >= eig[-1]
    assert "4/4 probes" in capsys.readouterr().err


def _counting(matrix):
    """``v -> matrix @ v`` that appends to a list each time it runs (also inside ``lax`` loops)."""
    calls = []

    def matvec(v):
        jax.debug.callback(lambda: calls.append(1))
        return matrix @ v

    return matvec, calls


def test_lanczos_cost_follows_steps_and_reports_convergence():
    rng = np.random.default_rng(7)
    u, _ = np.linalg.qr(rng.normal(size=(400, 400)))
    # Three well-separated top eigenvalues above a cluster: an easy problem for k = 3.
    values = np.concatenate([[100.0, 50.0, 25.0], rng.uniform(-1.0, 1.0, 397)])
    a = jnp.asarray(u @ np.diag(values) @ u.T)
    exact = np.sort(values)[::-1][:3]
    start = jnp.asarray(rng.normal(size=400))

    matvec, calls = _counting(a)
    top = jax.jit(
        lambda s: spectral.lanczos_top_k(matvec, s, 3, max_steps=400, tol=1e-8, check_every=2)
    )(start)
    jax.effects_barrier()
    assert int(top.num_matvecs) == len(calls)  # the count reported is the products made
    assert len(calls) <= 40  # far below max_steps = 400: the loop stopped at convergence
    assert top.converged.shape == (3,) and bool(top.converged.all())
    np.testing.assert_allclose(top.eigenvalues, exact, rtol=1e-10)
    np.testing.assert_allclose(
        np.abs(np.asarray(top.eigenvectors) @ u[:, :3]), np.eye(3), atol=1e-6
    )

    # A budget too small for a uniform spectrum: every product used, not converged.
    flat = jnp.asarray(u @ np.diag(np.linspace(1.0, 2.0, 400)) @ u.T)
    matvec, calls = _counting(flat)
    top = jax.jit(lambda s: spectral.lanczos_top_k(matvec, s, 3, max_steps=6, tol=1e-8))(start)
    jax.effects_barrier()
    assert int(top.num_matvecs) == len(calls) == 6
    assert not bool(top.converged.all())
    with pytest.raises(ValueError, match="max_steps=2"):
        spectral.lanczos_top_k(matvec, start, 3, max_steps=2)

    # An invariant subspace (four distinct eigenvalues) ends the tridiagonalisation early.
    four = jnp.asarray(u @ np.diag(np.repeat([1.0, 2.0, 3.0, 4.0], 100)) @ u.T)
    matvec, calls = _counting(four)
    tri = jax.jit(lambda s: spectral.lanczos_tridiagonal(matvec, s, 50))(start)
    jax.effects_barrier()
    assert int(tri.steps) == len(calls) == 4
    np.testing.assert_allclose(np.linalg.eigvalsh(np.asarray(tri.matrix()))[-4:], [1, 2, 3, 4])


def test_power_iteration_counts_products_and_reports_convergence():
    a = jnp.diag(jnp.asarray([10.0, -5.0, 1.0, 0.5, 0.1]))
    start = jnp.ones(5)
    matvec, calls = _counting(a)
    top = jax.jit(lambda s: spectral.power_iteration_top_k(matvec, s, 2, tol=1e-8))(start)
    jax.effects_barrier()
    assert int(top.num_matvecs) == len(calls) < 200
    np.testing.assert_allclose(top.eigenvalues, [10.0, -5.0], rtol=1e-6)
    assert bool(top.converged.all())
    matvec, calls = _counting(a)
    top = jax.jit(lambda s: spectral.power_iteration_top_k(matvec, s, 2, max_iters=3))(start)
    jax.effects_barrier()
    assert int(top.num_matvecs) == len(calls) == 6
    assert not bool(top.converged.any())


def test_density_compiles_once_for_new_parameter_values(digits_mlp, monkeypatch):
    from curvjax._src.spectral import estimators

    apply_fn, params, batch, hess = digits_mlp
    traces = []
    slq_nodes = estimators.slq_nodes

    def counted(*args, **kwargs):  # runs once per trace of the compiled batch
        traces.append(1)
        return slq_nodes(*args, **kwargs)

    monkeypatch.setattr(estimators, "slq_nodes", counted)
    options = dict(key=jax.random.key(6), num_probes=4, num_steps=30, probes_per_call=2)
    first = spectral.density(spectral.hessian_operator(apply_fn, params, batch), **options)
    assert len(traces) <= 1
    traced = len(traces)
    scaled = jax.tree.map(lambda p: 1.5 * p, params)
    second = spectral.density(spectral.hessian_operator(apply_fn, scaled, batch), **options)
    assert len(traces) == traced  # same structure, new values: no new trace
    # ... and the new values are used: the grid covers the new Hessian's extreme eigenvalues.
    eig = np.linalg.eigvalsh(np.asarray(reference.hessian_matrix(apply_fn, scaled, batch)))
    assert second[0][0] <= eig[0] and second[0][-1] >= eig[-1]
    assert not np.allclose(first[0], second[0])
