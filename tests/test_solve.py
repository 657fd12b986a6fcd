"""Inverse-curvature products: blocks against dense solves, conjugate gradients against dense
GGN / Hessian solves (float64 references that never call curvjax)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import models
import numpy as np
import pytest
import reference

import curvjax

LAMBDA = 0.3
# float64 solves of systems with condition number ≲ 1e3 (λ = 0.3, curvatures of norm ≲ 1e2):
# the two dense-vs-structured routes agree to ~1e-13; 1e-9 leaves a margin and still catches
# any wrong scaling, ordering or damping (those change results at the 1e-2 level).
TOL = 1e-9


@pytest.fixture(scope="module")
def problem():
    """A plain tanh MLP (Kronecker kernels, full bias blocks), a batch and a random vector."""
    case = models.get_case("plain_mlp")
    batch = models.make_batch(case, "cross_entropy")
    flat, unravel = reference.flatten_float(case.params)
    v_flat = jnp.asarray(np.random.default_rng(0).standard_normal(flat.shape))
    return case, batch, v_flat, unravel(v_flat)


@pytest.fixture(scope="module")
def curvatures(problem):
    """Every curvature curvjax builds, from one pass."""
    case, batch, _, _ = problem
    run = jax.jit(lambda p: curvjax.extract(case.apply_fn, p, batch, BLOCKS, key=jax.random.key(1)))
    return run(case.params)


BLOCKS = ("kfac", "kflr", "kfra", "ekfac", "ggn_diag", "hessian_diag")


def _flat(tree):
    return jax.flatten_util.ravel_pytree(jax.tree.leaves(tree))[0]


def _dense_and_damping(name, curvature):
    if name.endswith("diag"):
        dense = jnp.diag(_flat(curvature))
        # the Hessian diagonal may be negative: a damping above its most negative entry
        return dense, LAMBDA + max(0.0, -float(jnp.min(jnp.diag(dense))))
    return curvjax.blocks_to_dense(curvature), LAMBDA


def test_blocks_against_dense_solve(problem, curvatures):
    """Eagerly (where the checks on concrete values run) for the (indefinite) Hessian diagonal;
    every curvature under ``jit`` below."""
    _, _, v_flat, v = problem
    for name in ("hessian_diag",):
        dense, damping = _dense_and_damping(name, curvatures[name])
        expected = np.linalg.solve(dense + damping * np.eye(dense.shape[0]), v_flat)
        got = curvjax.inverse_curvature_product(curvatures[name], v, damping=damping)
        np.testing.assert_allclose(_flat(got), expected, rtol=TOL, atol=TOL, err_msg=name)


def test_under_jit_and_vmap(problem, curvatures):
    """Mapped over several vectors (a batch of two) inside ``jit``, for every curvature at once."""
    _, _, v_flat, v = problem
    damping = {name: _dense_and_damping(name, curvatures[name])[1] for name in BLOCKS}

    @jax.jit
    @functools.partial(jax.vmap, in_axes=(None, 0))
    def solve_all(trees, x):
        return {
            name: curvjax.inverse_curvature_product(trees[name], x, damping=damping[name])
            for name in BLOCKS
        }

    both = solve_all(
        {n: curvatures[n] for n in BLOCKS}, jax.tree.map(lambda x: jnp.stack([x, -2 * x]), v)
    )
    for name in BLOCKS:
        dense, lam = _dense_and_damping(name, curvatures[name])
        expected = np.linalg.solve(dense + lam * np.eye(dense.shape[0]), v_flat)
        got = _flat(jax.tree.map(lambda x: x[1], both[name]))
        np.testing.assert_allclose(got, -2 * expected, rtol=TOL, atol=TOL, err_msg=name)


def test_factored_damping_is_the_kfac_tikhonov_inverse(problem, curvatures):
    """``factored=True``: ``(A + π√λ I)⁻¹ ⊗ (B + √λ/π I)⁻¹`` with the trace-norm ``π``."""
    _, _, _, v = problem
    curvature = curvatures["kflr"]
    solve = jax.jit(
        lambda c, x: curvjax.inverse_curvature_product(c, x, damping=LAMBDA, factored=True)
    )
    got = solve(curvature, v)
    for path, block in jax.tree_util.tree_leaves_with_path(
        curvature, is_leaf=lambda x: isinstance(x, curvjax.KroneckerBlock)
    ):
        if not isinstance(block, curvjax.KroneckerBlock):
            continue
        a, b = np.asarray(block.a[0]), np.asarray(block.b[0])
        pi = np.sqrt((np.trace(a) / len(a)) / (np.trace(b) / len(b)))
        damped = np.kron(
            a + pi * np.sqrt(LAMBDA) * np.eye(len(a)), b + np.sqrt(LAMBDA) / pi * np.eye(len(b))
        )
        leaf_v = _at(v, path)
        expected = np.linalg.solve(damped[block.index][:, block.index], np.ravel(leaf_v))
        np.testing.assert_allclose(np.ravel(_at(got, path)), expected, rtol=TOL, atol=TOL)


def _at(tree, path):
    for key in path:
        tree = tree[key.key]
    return tree


def test_cg_against_dense_solve(problem):
    case, batch, v_flat, v = problem
    denses = {
        "ggn": np.asarray(reference.ggn_matrix(case.apply_fn, case.params, batch)),
        "hessian": np.asarray(reference.hessian_matrix(case.apply_fn, case.params, batch)),
    }
    # positive definite for the (indefinite) Hessian too
    damping = {k: LAMBDA + max(0.0, -float(np.linalg.eigvalsh(d)[0])) for k, d in denses.items()}

    @jax.jit
    def run(x):
        return {
            k: curvjax.cg_solve(
                case.apply_fn,
                case.params,
                batch,
                x,
                damping=damping[k],
                curvature=k,
                maxiter=200,
                tol=1e-12,
            )
            for k in denses
        }

    results = run(v)
    for k, dense in denses.items():
        u, info = results[k]
        expected = np.linalg.solve(dense + damping[k] * np.eye(len(dense)), v_flat)
        assert bool(info.converged) and not bool(info.negative_curvature), k
        # CG converges in at most D steps in exact arithmetic; round-off adds a few
        assert 1 <= int(info.iterations) <= len(dense) + 10, k
        assert float(info.residual_norm) <= 1e-12 * float(np.linalg.norm(v_flat)), k
        # relative residual 1e-12 and condition number ≲ 1e3: error ≲ 1e-9 relative
        scale = np.abs(expected).max()
        np.testing.assert_allclose(_flat(u), expected, rtol=1e-8, atol=1e-8 * scale, err_msg=k)


def test_cg_reports_non_convergence(problem):
    case, batch, _, v = problem
    hessian = np.asarray(reference.hessian_matrix(case.apply_fn, case.params, batch))
    assert np.linalg.eigvalsh(hessian)[0] < -1e-3  # indefinite at these parameters
    zero = jax.tree.map(jnp.zeros_like, v)

    @jax.jit
    def run(x, z):
        def cg(vector, **kwargs):
            return curvjax.cg_solve(case.apply_fn, case.params, batch, vector, **kwargs)

        return (
            # a damping that leaves C + λ I indefinite: CG must not claim a solution
            cg(x, damping=0.0, curvature="hessian", maxiter=500)[1],
            # the budget: one product is not enough for the GGN either
            cg(x, damping=LAMBDA, maxiter=1)[1],
            # a zero right-hand side is solved exactly with no product
            cg(z, damping=LAMBDA),
        )

    indefinite, budget, (u, trivial) = run(v, zero)
    assert not bool(indefinite.converged) and bool(indefinite.negative_curvature)
    assert int(budget.iterations) == 1 and not bool(budget.converged)
    assert not bool(budget.negative_curvature)
    assert bool(trivial.converged) and int(trivial.iterations) == 0
    assert float(jnp.abs(_flat(u)).max()) == 0.0


def test_errors(problem, curvatures):
    case, batch, _, v = problem
    diag = curvatures["ggn_diag"]
    with pytest.raises(ValueError, match="damping"):
        curvjax.inverse_curvature_product(diag, v, damping=-1.0)
    with pytest.raises(ValueError, match="damping"):
        curvjax.cg_solve(case.apply_fn, case.params, batch, v, damping=-1.0)
    bad = jax.tree.map(lambda x: x.at[(0,) * x.ndim].set(jnp.nan), v)
    with pytest.raises(ValueError, match="NaN or Inf"):
        curvjax.inverse_curvature_product(diag, bad, damping=1.0)
    with pytest.raises(ValueError, match="NaN or Inf"):
        curvjax.cg_solve(case.apply_fn, case.params, batch, bad, damping=1.0)
    with pytest.raises(ValueError, match="structure"):
        curvjax.inverse_curvature_product(diag, {"other": 1.0}, damping=1.0)
    with pytest.raises(ValueError, match="curvature='fisher'"):
        curvjax.cg_solve(case.apply_fn, case.params, batch, v, damping=1.0, curvature="fisher")
    with pytest.raises(ValueError, match="maxiter"):
        curvjax.cg_solve(case.apply_fn, case.params, batch, v, damping=1.0, maxiter=0)
    zero_diag = jax.tree.map(jnp.zeros_like, diag)
    with pytest.raises(ValueError, match="singular"):
        curvjax.inverse_curvature_product(zero_diag, v, damping=0.0)
