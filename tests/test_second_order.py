"""Second-order quantities against dense jax.hessian / jax.jacobian references (float64)."""

import re

import jax
import jax.numpy as jnp
import models
import numpy as np
import pytest
import reference
from helpers import assert_tree_close

import curvjax

FAST = reference.FAST_COMPILE
HESSIAN_CASES = [
    "mlp_tanh",
    "mlp_sigmoid",
    "mlp_softplus",
    "mlp_gelu",
    "mlp_gelu_erf",
    "cnn_tanh",
    "residual_conv",
    "residual_dense",
    "layernorm_mlp",
    "mlp_relu",
    "cnn_stride2_same",
    "equinox_conv",
    "tied_embed",  # the embedding is also the output projection: cross terms between its uses
    "tied_plain",  # one square matrix and bias applied in two layers
]


def _jit(fn):
    return jax.jit(fn, compiler_options=FAST)


@pytest.mark.parametrize("name", HESSIAN_CASES)
def test_exact_hessian_diag_matches_jax_hessian(name):
    case = models.get_case(name)
    loss, reduction = (
        ("mse", "sum") if name in ("mlp_gelu", "layernorm_mlp") else ("cross_entropy", "mean")
    )
    batch = models.make_batch(case, loss)
    fn = lambda p, b: curvjax.extract(
        case.apply_fn,
        p,
        b,
        ["hessian_diag", "ggn_diag"],  # noqa: E731
        loss=loss,
        reduction=reduction,
    )
    got = _jit(fn)(case.params, batch)
    want = reference.hessian_diag(case.apply_fn, case.params, batch, loss, reduction)
    assert_tree_close(got["hessian_diag"], want, case.params, what=f"{name}/hessian_diag")
    if "piecewise_linear" in models.TAGS[name]:  # Hessian diagonal = GGN diagonal for ReLU nets
        assert_tree_close(got["ggn_diag"], want, case.params, what=f"{name}/ggn=hessian")
    else:  # the residual terms matter: the test would catch their omission
        gap = max(
            float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
            for a, b in zip(
                reference.float_leaves(got["ggn_diag"], case.params),
                reference.float_leaves(want, case.params),
                strict=True,
            )
        )
        assert gap > 1e-6


@pytest.mark.parametrize("name", ["scan_mlp"])
def test_exact_hessian_diag_names_unsupported_operations(name):
    case = models.get_case(name)
    batch = models.make_batch(case, "cross_entropy")
    with pytest.raises(ValueError, match="method='hutchinson'") as info:
        curvjax.hessian_diag(case.apply_fn, case.params, batch)
    assert re.search(r"\.py:\d+", str(info.value))  # the offending source line is named


def _stats(samples):
    """Mean and standard error over the leading axis, leaf by leaf."""
    k = jax.tree.leaves(samples)[0].shape[0]
    mean = jax.tree.map(lambda s: s.mean(0), samples)
    stderr = jax.tree.map(lambda s: s.std(0) / np.sqrt(k), samples)
    return mean, stderr


def _assert_within(mean, stderr, exact, params, sigmas=5.0):
    """Every entry of the MC mean within `sigmas` standard errors of the exact value (plus float64
    rounding relative to the largest entry: some entries are zero in exact arithmetic)."""
    leaves = [reference.float_leaves(t, params) for t in (mean, stderr, exact)]
    floor = 1e-12 * max(float(np.abs(np.asarray(e)).max()) for e in leaves[2])
    for m, s, e in zip(*leaves, strict=True):
        m, s, e = np.asarray(m), np.asarray(s), np.asarray(e)
        assert np.all(np.abs(m - e) <= sigmas * s + floor), np.max(np.abs(m - e) / (s + 1e-30))


def test_ggn_diag_mc_and_kfac_are_unbiased():
    case = models.get_case("mlp_tanh")
    batch = models.make_batch(case, "cross_entropy")
    keys = jax.random.split(jax.random.key(0), 2000)

    def sample(key):
        out = curvjax.extract(
            case.apply_fn, case.params, batch, ["ggn_diag_mc", "kfac"], key=key, mc_samples=2
        )
        return out["ggn_diag_mc"], jax.tree.map(lambda blk: blk, out["kfac"])

    diag_samples, kfac_samples = _jit(jax.vmap(sample))(keys)
    exact = curvjax.extract(case.apply_fn, case.params, batch, ["ggn_diag", "kflr"])
    mean, stderr = _stats(diag_samples)
    _assert_within(mean, stderr, exact["ggn_diag"], case.params)
    kernel = exact["kflr"]["params"]["Dense_0"]["kernel"]
    sampled = kfac_samples["params"]["Dense_0"]["kernel"]
    mean_b, stderr_b = _stats(sampled.b)
    assert np.all(np.abs(mean_b - kernel.b) <= 5 * stderr_b + 1e-14)
    np.testing.assert_allclose(sampled.a[0], kernel.a, rtol=1e-12)  # A does not depend on samples


def test_hutchinson_is_unbiased_and_works_for_any_model():
    case = models.get_case("attention")
    batch = models.make_batch(case, "cross_entropy")
    keys = jax.random.split(jax.random.key(1), 1000)
    fn = lambda k: curvjax.hessian_diag(
        case.apply_fn,
        case.params,
        batch,  # noqa: E731
        method="hutchinson",
        key=k,
        mc_samples=2,
    )
    samples = _jit(jax.vmap(fn))(keys)
    mean, stderr = _stats(samples)
    exact = reference.hessian_diag(case.apply_fn, case.params, batch)
    _assert_within(mean, stderr, exact, case.params)


def _dense_block(matrix, params, path):
    """The diagonal block of a [D, D] matrix belonging to one leaf (ravel_pytree order)."""
    names = reference.float_paths(params)
    sl = reference.float_slices(params)[names.index(path)]
    return matrix[sl, sl]


def test_kflr_is_exact_for_one_example_and_deep_linear_mse():
    case = models.get_case("dense_single")
    x, y = models.make_batch(case, "cross_entropy")
    one = (x[:1], y[:1])
    blocks = curvjax.kflr(case.apply_fn, case.params, one)
    ggn = reference.ggn_matrix(case.apply_fn, case.params, one)
    for path, leaf in zip(
        reference.float_paths(case.params), jax.tree.leaves(blocks, is_leaf=_is_block), strict=True
    ):
        np.testing.assert_allclose(
            curvjax.block_to_dense(leaf),
            _dense_block(ggn, case.params, path),
            rtol=1e-10,
            atol=1e-14,
        )
    kfra = curvjax.kfra(case.apply_fn, case.params, (x, y))  # single layer: KFRA = KFLR
    kflr = curvjax.kflr(case.apply_fn, case.params, (x, y))
    for a, b in zip(jax.tree.leaves(kfra), jax.tree.leaves(kflr), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-12)

    deep = models.get_case("linear_chain")
    batch = models.make_batch(deep, "mse")
    ggn = reference.ggn_matrix(deep.apply_fn, deep.params, batch, "mse", "mean")
    for method in (curvjax.kflr, curvjax.kfra):
        blocks = method(deep.apply_fn, deep.params, batch, loss="mse")
        flat = jax.tree.leaves(blocks, is_leaf=_is_block)
        for path, leaf in zip(reference.float_paths(deep.params), flat, strict=True):
            np.testing.assert_allclose(
                curvjax.block_to_dense(leaf),
                _dense_block(ggn, deep.params, path),
                rtol=1e-10,
                atol=1e-13,
            )


def _is_block(x):
    return isinstance(x, curvjax.KroneckerBlock | curvjax.DenseBlock | curvjax.DiagonalBlock)


def test_kronecker_layout_of_a_convolution_kernel():
    """A 2x2 VALID convolution on 2x2 inputs has one output position: for one example KFLR equals
    the GGN block within each feature group, which checks the (kh, kw, c_in, c_out) layout of the
    block. Across groups the block is zero (the approximation drops those correlations)."""
    import flax.linen as nn

    for groups in (1, 2):
        model = nn.Sequential(
            [
                nn.Conv(4, (2, 2), padding="VALID", feature_group_count=groups),
                lambda z: z.reshape(z.shape[0], -1),
            ]
        )
        x = jax.random.normal(jax.random.key(0), (1, 2, 2, 4), dtype=jnp.float64)
        params = models.to_float64(model.init(jax.random.key(1), x))
        params = jax.tree.map(lambda a: a + 0.1, params)
        blocks = curvjax.kflr(model.apply, params, (x, jnp.array([1])))
        kernel = blocks["params"]["layers_0"]["kernel"]
        assert kernel.a.shape == (groups, 16 // groups, 16 // groups)
        assert kernel.b.shape == (groups, 4 // groups, 4 // groups)
        ggn = reference.ggn_matrix(model.apply, params, (x, jnp.array([1])))
        want = _dense_block(ggn, params, "['params']['layers_0']['kernel']")
        mask = (
            curvjax.block_to_dense(jax.tree.map(jnp.ones_like, kernel)._replace(index=kernel.index))
            != 0
        )
        got = curvjax.block_to_dense(kernel)
        np.testing.assert_allclose(got[mask], want[mask], rtol=1e-10, atol=1e-14)
        assert not np.any(got[~mask])
        size = 64 // groups
        assert mask.sum() == size * size // groups


@pytest.mark.parametrize("name", ["cnn_valid", "attention", "embed", "layernorm_mlp"])
def test_kronecker_factors_are_symmetric_psd(name):
    case = models.get_case(name)
    batch = models.make_batch(case, "cross_entropy")
    out = _jit(
        lambda p, b: curvjax.extract(case.apply_fn, p, b, ["kflr", "kfac"], key=jax.random.key(0))
    )(case.params, batch)
    for blocks in (out["kflr"], out["kfac"]):
        kinds = set()
        for leaf in jax.tree.leaves(blocks, is_leaf=_is_block):
            kinds.add(type(leaf).__name__)
            mats = (
                [leaf.a, leaf.b]
                if isinstance(leaf, curvjax.KroneckerBlock)
                else ([leaf.matrix[None]] if isinstance(leaf, curvjax.DenseBlock) else [])
            )
            for m in mats:
                np.testing.assert_allclose(m, jnp.swapaxes(m, -1, -2), atol=1e-14)
                assert np.min(np.linalg.eigvalsh(m)) >= -1e-12 * max(1.0, np.abs(m).max())
        assert "KroneckerBlock" in kinds


@pytest.mark.parametrize("name", ["cnn_valid", "residual_dense", "attention"])
def test_kfra_needs_a_dense_chain(name):
    case = models.get_case(name)
    with pytest.raises(ValueError, match="feed-forward chains of dense layers"):
        curvjax.kfra(case.apply_fn, case.params, models.make_batch(case, "cross_entropy"))


@pytest.mark.parametrize("name", ["cnn_grouped", "attention"])
def test_hvp_ggn_vp_and_dense_matrices(name):
    case = models.get_case(name)
    batch = models.make_batch(case, "cross_entropy")
    flat, unravel = reference.flatten_float(case.params)
    v_flat = jax.random.normal(jax.random.key(3), flat.shape, dtype=flat.dtype)
    vector = unravel(v_flat)
    hess = reference.hessian_matrix(case.apply_fn, case.params, batch)
    ggn = reference.ggn_matrix(case.apply_fn, case.params, batch)
    ours = _jit(
        lambda p, b: (
            curvjax.hessian_matrix(case.apply_fn, p, b),
            curvjax.ggn_matrix(case.apply_fn, p, b),
        )
    )(case.params, batch)
    np.testing.assert_allclose(ours[0], hess, rtol=1e-10, atol=1e-13 * np.abs(hess).max())
    np.testing.assert_allclose(ours[1], ggn, rtol=1e-10, atol=1e-13 * np.abs(ggn).max())
    hv = _jit(lambda p, b, v: curvjax.hvp(case.apply_fn, p, b, v))(case.params, batch, vector)
    gv = _jit(lambda p, b, v: curvjax.ggn_vp(case.apply_fn, p, b, v))(case.params, batch, vector)
    assert_tree_close(hv, unravel(hess @ v_flat), case.params, what="hvp")
    assert_tree_close(gv, unravel(ggn @ v_flat), case.params, what="ggn_vp")
