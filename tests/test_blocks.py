"""Curvature blocks as operators, against dense numpy matrices built independently (float64).

Kronecker references are ``np.kron`` of the factors, block-diagonal over the groups, rows and
columns permuted by ``index``; dense references are the matrix itself, diagonal ones ``np.diag``.
Damped inverses are checked against ``np.linalg.solve``, powers against the eigendecomposition of
the dense damped matrix, square roots by ``R Rᵀ = scale² (C + c I)⁻¹``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import curvjax
from curvjax._src import blocks as blocks_lib

G, N_IN, N_OUT = 2, 3, 4
LEAF_SHAPE = (N_OUT, G * N_IN)  # a leaf whose entries are a permutation of the canonical (g, i, o)
DAMPING = 0.3


def _spd(rng, n):
    m = rng.normal(size=(n, n))
    return m @ m.T / n + 0.1 * np.eye(n)


def _kronecker_case(rng):
    a = np.stack([_spd(rng, N_IN) for _ in range(G)])
    b = np.stack([3.0 * _spd(rng, N_OUT) for _ in range(G)])
    index = rng.permutation(G * N_IN * N_OUT).astype(np.int32)
    return a, b, index


def _kron_dense(a, b, index, shift_a=None, shift_b=None):
    """``P (⊕_g (A_g + s_a N_IN) ⊗ (B_g + s_b N_IN)) Pᵀ`` in numpy."""
    size = G * N_IN * N_OUT
    canon = np.zeros((size, size))
    step = N_IN * N_OUT
    for g in range(G):
        ag = a[g] + (0.0 if shift_a is None else shift_a[g] * np.eye(N_IN))
        bg = b[g] + (0.0 if shift_b is None else shift_b[g] * np.eye(N_OUT))
        canon[g * step : (g + 1) * step, g * step : (g + 1) * step] = np.kron(ag, bg)
    return canon[np.ix_(index, index)]


def _pi(a, b):
    return np.sqrt((np.trace(a, axis1=1, axis2=2) / N_IN) / (np.trace(b, axis1=1, axis2=2) / N_OUT))


def _cases():
    """``(name, block, dense reference, factored-damped dense reference, leaf shape)``."""
    rng = np.random.default_rng(0)
    a, b, index = _kronecker_case(rng)
    root = np.sqrt(DAMPING)
    pi = _pi(a, b)
    kron = curvjax.KroneckerBlock(jnp.asarray(a), jnp.asarray(b), index)
    kron_ref = _kron_dense(a, b, index)
    kron_factored = _kron_dense(a, b, index, shift_a=pi * root, shift_b=root / pi)
    matrix = _spd(rng, 6)
    dense = curvjax.DenseBlock(jnp.asarray(matrix))
    diagonal = rng.uniform(0.5, 2.0, size=(2, 3))
    diag = curvjax.DiagonalBlock(jnp.asarray(diagonal))
    shift = DAMPING * np.eye(6)
    return [
        ("kronecker", kron, kron_ref, kron_factored, LEAF_SHAPE),
        ("dense", dense, matrix, matrix + shift, (2, 3)),
        ("diagonal", diag, np.diag(diagonal.ravel()), np.diag(diagonal.ravel()) + shift, (2, 3)),
    ]


CASES = _cases()
IDS = [c[0] for c in CASES]


def _matrix_power(matrix, power):
    w, v = np.linalg.eigh(matrix)
    return (v * w**power) @ v.T


@pytest.mark.parametrize("case", CASES, ids=IDS)
@pytest.mark.parametrize("form", ["block", "eigh"])
def test_operator_against_dense(case, form):
    _, block, ref, _, shape = case
    block = block.eigh() if form == "eigh" else block
    np.testing.assert_allclose(block.to_dense(), ref, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(curvjax.block_to_dense(block), ref, rtol=1e-12, atol=1e-12)
    v = np.random.default_rng(1).normal(size=shape)
    got = block.matvec(jnp.asarray(v))
    assert got.shape == shape
    np.testing.assert_allclose(got.ravel(), ref @ v.ravel(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(
        np.sort(block.eigenvalues()), np.linalg.eigvalsh(ref), rtol=1e-10, atol=1e-12
    )
    np.testing.assert_allclose(block.trace(), np.trace(ref), rtol=1e-12)
    assert block.size == ref.shape[0]


@pytest.mark.parametrize("case", CASES, ids=IDS)
@pytest.mark.parametrize("form", ["block", "eigh"])
def test_damped_inverse_and_power(case, form):
    name, block, ref, factored_ref, shape = case
    block = block.eigh() if form == "eigh" else block
    v = np.random.default_rng(2).normal(size=shape)
    exact = ref + DAMPING * np.eye(ref.shape[0])
    for factored, damped in ((True, factored_ref), (False, exact)):
        want = np.linalg.solve(damped, v.ravel())
        for got in (
            block.damped_solve(jnp.asarray(v), DAMPING, factored=factored),
            block.damped_power(jnp.asarray(v), DAMPING, -1.0, factored=factored),
        ):
            assert got.shape == shape
            np.testing.assert_allclose(got.ravel(), want, rtol=1e-10, atol=1e-12)
        for power in (-0.5, 2.0):
            got = block.damped_power(jnp.asarray(v), DAMPING, power, factored=factored)
            want = _matrix_power(damped, power) @ v.ravel()
            np.testing.assert_allclose(got.ravel(), want, rtol=1e-10, atol=1e-12)
    if name == "kronecker":  # the factored damping is not A ⊗ B + c N_IN
        assert not np.allclose(factored_ref, exact)


@pytest.mark.parametrize("case", CASES, ids=IDS)
@pytest.mark.parametrize("factored", [True, False])
def test_inverse_square_root(case, factored):
    _, block, ref, factored_ref, _ = case
    damped = factored_ref if factored else ref + DAMPING * np.eye(ref.shape[0])
    scale = 0.7
    root = block.damped_inverse_sqrt(DAMPING, factored=factored, scale=scale)
    r = np.asarray(root.to_dense())
    np.testing.assert_allclose(r @ r.T, scale**2 * np.linalg.inv(damped), rtol=1e-10, atol=1e-12)
    draw = root.sample(jax.random.key(0))
    assert draw.size == ref.shape[0]
    prior = np.asarray(block.prior_root(scale).to_dense())
    np.testing.assert_allclose(prior @ prior.T, scale**2 * np.eye(ref.shape[0]), atol=1e-12)


def test_nonnegative_clips_negative_eigenvalues():
    matrix = np.diag([2.0, -1.0, 0.5])
    got = curvjax.DenseBlock(jnp.asarray(matrix)).nonnegative().to_dense()
    np.testing.assert_allclose(got, np.diag([2.0, 0.0, 0.5]), atol=1e-12)
    diag = curvjax.DiagonalBlock(jnp.asarray([1.0, -2.0])).nonnegative()
    np.testing.assert_allclose(diag.to_dense(), np.diag([1.0, 0.0]))


def test_blocks_to_dense_is_block_diagonal():
    _, kron, kron_ref, _, _ = CASES[0]
    _, dense, dense_ref, _, _ = CASES[1]
    got = curvjax.blocks_to_dense({"a": kron, "b": None, "c": dense})
    want = np.zeros((30, 30))
    want[:24, :24], want[24:, 24:] = kron_ref, dense_ref
    np.testing.assert_allclose(got, want, atol=1e-12)
    with pytest.raises(TypeError, match="not a curvature block"):
        curvjax.block_to_dense(jnp.eye(2))


def test_index_is_static_aux_data():
    _, kron, _, _, _ = CASES[0]
    leaves = jax.tree.leaves(kron)
    assert len(leaves) == 2 and all(x.dtype == jnp.float64 for x in leaves)
    # A moving average over a tree of blocks touches a and b, never index.
    ema = jax.tree.map(lambda old, new: 0.9 * old + 0.1 * new, {"w": kron}, {"w": kron})
    np.testing.assert_array_equal(ema["w"].index, kron.index)
    np.testing.assert_allclose(ema["w"].a, kron.a, rtol=1e-15)
    # Treedefs compare the index by value.
    copy = curvjax.KroneckerBlock(kron.a, kron.b, np.array(kron.index))
    assert jax.tree.structure(copy) == jax.tree.structure(kron)
    other = curvjax.KroneckerBlock(kron.a, kron.b, np.arange(kron.index.size))
    assert jax.tree.structure(other) != jax.tree.structure(kron)


def test_block_through_jit_as_argument_and_result():
    _, kron, _, _, _ = CASES[0]
    traces = []

    @jax.jit
    def double(block):
        traces.append(None)
        return block._replace(a=2 * block.a)

    out = double(kron)
    assert blocks_lib.is_block(out)
    np.testing.assert_array_equal(out.index, kron.index)
    np.testing.assert_allclose(out.a, 2 * kron.a)
    double(jax.tree.map(lambda x: x + 1, kron))  # same layout: no retrace
    assert len(traces) == 1
    eig = jax.jit(lambda blk: blk.eigh())(kron)
    np.testing.assert_allclose(eig.to_dense(), kron.to_dense(), rtol=1e-10, atol=1e-12)


def test_traced_index_is_rejected():
    _, kron, _, _, _ = CASES[0]
    with pytest.raises(ValueError, match="static layout data"):
        jax.jit(lambda idx: curvjax.KroneckerBlock(kron.a, kron.b, idx).a)(jnp.asarray(kron.index))
