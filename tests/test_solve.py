"""Inverse-curvature products: blocks against dense solves, conjugate gradients against dense
GGN / Hessian solves (float64 references that never call curvjax)."""

from __future__ import annotations

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
    """A tanh MLP (Kronecker kernels, full bias blocks), a batch and a random vector."""
    case = models.get_case("mlp_tanh")
    batch = models.make_batch(case, "cross_entropy")
    flat, unravel = reference.flatten_float(case.params)
    v_flat = jnp.asarray(np.random.default_rng(0).standard_normal(flat.shape))
    return case, batch, v_flat, unravel(v_flat)


def _flat(tree):
    return jax.flatten_util.ravel_pytree(jax.tree.leaves(tree))[0]


@pytest.mark.parametrize("name", ["kfac", "kflr", "kfra", "ekfac", "ggn_diag", "hessian_diag"])
def test_blocks_against_dense_solve(problem, name):
    case, batch, v_flat, v = problem
    kwargs = {"key": jax.random.key(1)} if name in ("kfac", "ekfac") else {}
    curvature = getattr(curvjax, name)(case.apply_fn, case.params, batch, **kwargs)
    if name.endswith("diag"):
        dense = jnp.diag(_flat(curvature))
        # the Hessian diagonal may be negative: a damping above its most negative entry
        damping = LAMBDA + max(0.0, -float(jnp.min(jnp.diag(dense))))
    else:
        dense = curvjax.blocks_to_dense(curvature)
        damping = LAMBDA
    expected = np.linalg.solve(dense + damping * np.eye(dense.shape[0]), v_flat)
    got = curvjax.inverse_curvature_product(curvature, v, damping=damping)
    np.testing.assert_allclose(_flat(got), expected, rtol=TOL, atol=TOL)
    # the same under jit and mapped over several vectors (a batch of two)
    both = jax.jit(
        jax.vmap(
            lambda c, x: curvjax.inverse_curvature_product(c, x, damping=damping),
            in_axes=(None, 0),
        )
    )(curvature, jax.tree.map(lambda x: jnp.stack([x, -2 * x]), v))
    np.testing.assert_allclose(_flat(jax.tree.map(lambda x: x[1], both)), -2 * expected, atol=TOL)


def test_factored_damping_is_the_kfac_tikhonov_inverse(problem):
    """``factored=True``: ``(A + π√λ I)⁻¹ ⊗ (B + √λ/π I)⁻¹`` with the trace-norm ``π``."""
    case, batch, _, v = problem
    curvature = curvjax.kflr(case.apply_fn, case.params, batch)
    got = curvjax.inverse_curvature_product(curvature, v, damping=LAMBDA, factored=True)
    for path, block in jax.tree_util.tree_leaves_with_path(
        curvature, is_leaf=lambda x: isinstance(x, curvjax.KroneckerBlock)
    ):
        if not isinstance(block, curvjax.KroneckerBlock):
            continue
        a, b = np.asarray(block.a[0]), np.asarray(block.b[0])
        pi = np.sqrt((np.trace(a) / len(a)) / (np.trace(b) / len(b)))
        damped = np.kron(a + pi * np.sqrt(LAMBDA) * np.eye(len(a)), b + np.sqrt(LAMBDA) / pi * np.eye(len(b)))
        leaf_v = _at(v, path)
        expected = np.linalg.solve(damped[block.index][:, block.index], np.ravel(leaf_v))
        np.testing.assert_allclose(np.ravel(_at(got, path)), expected, rtol=TOL, atol=TOL)


def _at(tree, path):
    for key in path:
        tree = tree[key.key]
    return tree


@pytest.mark.parametrize("curvature", ["ggn", "hessian"])
def test_cg_against_dense_solve(problem, curvature):
    case, batch, v_flat, v = problem
    build = reference.ggn_matrix if curvature == "ggn" else reference.hessian_matrix
    dense = np.asarray(build(case.apply_fn, case.params, batch))
    lowest = float(np.linalg.eigvalsh(dense)[0])
    damping = LAMBDA + max(0.0, -lowest)  # positive definite for the Hessian too
    expected = np.linalg.solve(dense + damping * np.eye(len(dense)), v_flat)

    @jax.jit
    def run(x):
        return curvjax.cg_solve(
            case.apply_fn, case.params, batch, x, damping=damping, curvature=curvature,
            maxiter=200, tol=1e-12,
        )

    u, info = run(v)
    assert bool(info.converged) and not bool(info.negative_curvature)
    # CG converges in at most D steps in exact arithmetic; round-off adds a few
    assert 1 <= int(info.iterations) <= len(dense) + 10
    assert float(info.residual_norm) <= 1e-12 * float(np.linalg.norm(v_flat))
    # relative residual 1e-12 and condition number ≲ 1e3: error ≲ 1e-9 relative
    np.testing.assert_allclose(_flat(u), expected, rtol=1e-8, atol=1e-8 * np.abs(expected).max())


def test_cg_reports_non_convergence(problem):
    case, batch, _, v = problem
    hessian = np.asarray(reference.hessian_matrix(case.apply_fn, case.params, batch))
    lowest = float(np.linalg.eigvalsh(hessian)[0])
    assert lowest < -1e-3  # the tanh MLP's Hessian is indefinite at these parameters
    # a damping that leaves C + λ I indefinite: CG must not claim a solution
    _, info = curvjax.cg_solve(
        case.apply_fn, case.params, batch, v, damping=0.0, curvature="hessian", maxiter=500
    )
    assert not bool(info.converged)
    # the budget: one product, not enough for the GGN either
    _, info = curvjax.cg_solve(case.apply_fn, case.params, batch, v, damping=LAMBDA, maxiter=1)
    assert int(info.iterations) == 1 and not bool(info.converged)
    assert not bool(info.negative_curvature)
    # a zero right-hand side is solved exactly with no product
    zero = jax.tree.map(jnp.zeros_like, v)
    u, info = curvjax.cg_solve(case.apply_fn, case.params, batch, zero, damping=LAMBDA)
    assert bool(info.converged) and int(info.iterations) == 0
    assert float(jnp.abs(_flat(u)).max()) == 0.0


def test_errors(problem):
    case, batch, _, v = problem
    diag = curvjax.ggn_diag(case.apply_fn, case.params, batch)
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
