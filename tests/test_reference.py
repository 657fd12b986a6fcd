"""Sanity tests of the model zoo (``models.py``) and of the dense references (``reference.py``).

The references are checked against constructions that share as little with them as possible:
a batch-level Jacobian for per-example gradients, finite differences for gradients and
Hessian-vector products, the Hessian of the linearised model for the GGN, closed forms for the
loss Hessians.  Post-processing is done in numpy so that the tests compile few XLA programs.
"""

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import models  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import reference as ref  # noqa: E402

RTOL = 1e-10
ATOL = 1e-12


def _jit(fun):
    return jax.jit(fun, compiler_options=ref.FAST_COMPILE)


def _np(tree):
    return jax.tree.map(np.asarray, tree)


def _first_example(inputs):
    return jax.tree.map(lambda a: a[:1], inputs)


# ---------------------------------------------------------------------------------------------
# the zoo


@pytest.mark.parametrize("name", list(models.CASES))
def test_case_builds_and_runs_under_jit(name):
    case = models.get_case(name)
    assert case.name == name and case.tags == models.TAGS[name]
    assert models.get_case(name) is case  # cached: the same apply_fn object every time
    n, c = models.N, case.num_classes

    for path, leaf in jax.tree_util.tree_leaves_with_path(case.params):
        if "int_leaf" in case.tags and not ref.is_float(leaf):
            assert leaf.dtype == jnp.int32, path
        else:
            assert leaf.dtype == jnp.float64, (jax.tree_util.keystr(path), leaf.dtype)
    for leaf in jax.tree.leaves(case.inputs):
        assert leaf.shape[0] == n
        expected = jnp.int32 if "int_inputs" in case.tags else jnp.float64
        assert leaf.dtype == expected

    jaxpr = jax.make_jaxpr(case.apply_fn)(case.params, case.inputs)
    assert jaxpr.out_avals[0].shape == (n, c)

    both = _jit(lambda p, x: (case.apply_fn(p, x), case.apply_fn(p, _first_example(x))))
    outputs, first = _np(both(case.params, case.inputs))
    assert outputs.shape == (n, c) and outputs.dtype == np.float64
    assert np.all(np.isfinite(outputs))
    assert np.std(outputs) > 1e-2  # not degenerate
    # "mixes_examples" is exactly the set of models whose outputs depend on the other examples.
    alone = np.allclose(first[0], outputs[0], rtol=RTOL, atol=ATOL)
    assert alone != ("mixes_examples" in case.tags)

    for loss in ref.LOSSES:
        inputs, targets = models.make_batch(case, loss)
        assert inputs is case.inputs
        again = models.make_batch(case, loss)[1]
        np.testing.assert_array_equal(np.asarray(targets), np.asarray(again))
        if loss == "cross_entropy":
            assert targets.shape == (n,) and targets.dtype == jnp.int32
            assert 0 <= np.min(targets) and np.max(targets) < c
        else:
            assert targets.shape == (n, c) and targets.dtype == jnp.float64


def test_case_selection_by_tag():
    chains = models.case_names(include={"chain"}, exclude={"no_forward_mode"})
    assert "mlp_relu" in chains and "custom_vjp_mlp" not in chains and "cnn_valid" not in chains
    assert models.case_names(include={"mixes_examples"}) == ["batchnorm_mlp"]
    # piecewise-linear and smooth exclude each other except for linear models
    both = set(models.case_names(include={"piecewise_linear", "smooth"}))
    assert both == set(models.case_names(include={"linear"}))


# ---------------------------------------------------------------------------------------------
# float / non-float leaves


@pytest.mark.parametrize("name", ["plain_with_int_leaf", "nnx_mlp", "equinox_conv"])
def test_flatten_float_skips_and_restores_non_float_leaves(name):
    case = models.get_case(name)
    flat, unravel = ref.flatten_float(case.params)
    leaves = jax.tree.leaves(case.params)
    floats = [leaf for leaf in leaves if ref.is_float(leaf)]
    assert flat.shape == (sum(leaf.size for leaf in floats),)
    assert len(ref.float_paths(case.params)) == len(floats) == len(ref.float_slices(case.params))

    rebuilt = unravel(flat + 1.0)
    assert jax.tree.structure(rebuilt) == jax.tree.structure(case.params)
    for old, new in zip(leaves, jax.tree.leaves(rebuilt), strict=True):
        delta = 1.0 if ref.is_float(old) else 0.0  # non-float leaves are held fixed
        np.testing.assert_array_equal(np.asarray(new), np.asarray(old) + delta)
        assert new.dtype == old.dtype

    result = ref.unflatten_float(flat, case.params)
    picked = ref.float_leaves(result, case.params)
    assert [p.shape for p in picked] == [f.shape for f in floats]
    if name == "plain_with_int_leaf":
        assert result["perm"] is None and result["offset"] is None
        assert ref.float_paths(case.params) == ["['b1']", "['b2']", "['w1']", "['w2']"]


# ---------------------------------------------------------------------------------------------
# first order


FIRST_ORDER = [
    ("cnn_grouped", "cross_entropy", "mean"),
    ("plain_with_int_leaf", "mse", "sum"),
]


@pytest.mark.parametrize(("name", "loss", "reduction"), FIRST_ORDER)
def test_per_example_grads(name, loss, reduction):
    """vmap-over-single-examples agrees with the Jacobian of the batch's per-example losses,
    sums to ``grad``, and the statistics follow from it."""
    case = models.get_case(name)
    batch = models.make_batch(case, loss)
    kwargs = dict(loss=loss, reduction=reduction)
    params = case.params

    per_example = ref.per_example_grads(case.apply_fn, params, batch, **kwargs)
    rows = np.asarray(ref.per_example_grads_flat(case.apply_fn, params, batch, **kwargs))
    total = ref.float_leaves(_np(ref.grad(case.apply_fn, params, batch, **kwargs)), params)
    l2 = ref.float_leaves(_np(ref.batch_l2(case.apply_fn, params, batch, **kwargs)), params)
    sgs = ref.float_leaves(
        _np(ref.sum_grad_squared(case.apply_fn, params, batch, **kwargs)), params
    )
    var = ref.float_leaves(_np(ref.variance(case.apply_fn, params, batch, **kwargs)), params)
    per_example = ref.float_leaves(_np(per_example), params)

    assert rows.shape == (models.N, sum(g.size for g in total))
    for i, sl in enumerate(ref.float_slices(params)):
        g_n = per_example[i]
        assert g_n.shape == (models.N, *total[i].shape)
        block = rows[:, sl].reshape(g_n.shape)
        np.testing.assert_allclose(g_n, block, rtol=RTOL, atol=ATOL)
        np.testing.assert_allclose(g_n.sum(0), total[i], rtol=RTOL, atol=ATOL)
        np.testing.assert_allclose(l2[i], (block.reshape(models.N, -1) ** 2).sum(1), rtol=1e-9)
        np.testing.assert_allclose(sgs[i], (block**2).sum(0), rtol=1e-9, atol=ATOL)
        mean = block.mean(0)
        np.testing.assert_allclose(var[i], (block**2).mean(0) - mean**2, rtol=1e-9, atol=ATOL)
        assert np.all(var[i] >= -ATOL)
    assert max(np.abs(g).max() for g in total) > 1e-3  # the test has power


# ---------------------------------------------------------------------------------------------
# finite differences and second order


def test_grad_and_hessian_match_finite_differences():
    """Tied weights (second derivatives across the two uses of one matrix) and smooth tanh."""
    case = models.get_case("tied_plain")
    batch = models.make_batch(case, "mse")
    kwargs = dict(loss="mse", reduction="mean")
    flat, unravel = ref.flatten_float(case.params)
    direction = np.random.default_rng(1).standard_normal(flat.shape)
    direction /= np.linalg.norm(direction)
    loss_at = _jit(lambda v: ref.reduced_loss.eager(case.apply_fn, unravel(v), batch, **kwargs))
    grad_at = _jit(
        lambda v: ref.flatten_float(ref.grad.eager(case.apply_fn, unravel(v), batch, **kwargs))[0]
    )
    eps = 1e-5
    plus, minus = flat + eps * direction, flat - eps * direction

    fd_loss = (float(loss_at(plus)) - float(loss_at(minus))) / (2 * eps)
    grad = ref.flatten_float(ref.grad(case.apply_fn, case.params, batch, **kwargs))[0]
    np.testing.assert_allclose(np.asarray(grad), np.asarray(grad_at(flat)), rtol=RTOL)
    np.testing.assert_allclose(np.dot(np.asarray(grad), direction), fd_loss, rtol=1e-7)

    fd_grad = (np.asarray(grad_at(plus)) - np.asarray(grad_at(minus))) / (2 * eps)
    hess = np.asarray(ref.hessian_matrix(case.apply_fn, case.params, batch, **kwargs))
    np.testing.assert_allclose(hess, hess.T, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(hess @ direction, fd_grad, rtol=1e-6, atol=1e-8)
    diag = ref.hessian_diag(case.apply_fn, case.params, batch, **kwargs)
    diag = np.concatenate([np.ravel(d) for d in ref.float_leaves(diag, case.params)])
    np.testing.assert_allclose(diag, np.diag(hess), rtol=RTOL, atol=ATOL)


def test_hessian_through_custom_vjp():
    """Reverse-over-reverse through a ``custom_vjp`` softplus equals forward-over-reverse
    (``jax.hessian``) through ``jax.nn.softplus`` with the same parameters."""
    custom = models.get_case("custom_vjp_mlp")
    plain = models.get_case("mlp_softplus")
    batch = models.make_batch(custom, "cross_entropy")
    with pytest.raises(TypeError, match="forward-mode"):
        jax.jvp(lambda p: custom.apply_fn(p, custom.inputs), (custom.params,), (custom.params,))

    hess = np.asarray(ref.hessian_matrix(custom.apply_fn, custom.params, batch, "cross_entropy"))
    flat, unravel = ref.flatten_float(custom.params)
    expected = _jit(
        jax.hessian(lambda v: ref.reduced_loss.eager(plain.apply_fn, unravel(v), batch))
    )(flat)
    np.testing.assert_allclose(hess, np.asarray(expected), rtol=1e-9, atol=ATOL)


def test_ggn_is_hessian_of_linearised_model():
    """``G`` equals the Hessian of the loss of the model linearised at ``theta``; it is PSD and
    the loss Hessians have their closed forms.  (Tied embedding, C = 7, int inputs.)"""
    case, loss = models.get_case("tied_embed"), "cross_entropy"
    batch = models.make_batch(case, loss)
    kwargs = dict(loss=loss, reduction="sum")
    ggn = np.asarray(ref.ggn_matrix(case.apply_fn, case.params, batch, **kwargs))

    flat, unravel = ref.flatten_float(case.params)

    def linearised_loss(v):
        outputs, jvp = jax.linearize(lambda w: case.apply_fn(unravel(w), batch[0]), flat)
        lin_outputs = outputs + jvp(v - flat)
        return jnp.sum(
            jax.vmap(lambda f, y: ref.per_example_loss(loss, f, y))(lin_outputs, batch[1])
        )

    expected = np.asarray(_jit(jax.hessian(linearised_loss))(flat))
    np.testing.assert_allclose(ggn, expected, rtol=1e-9, atol=ATOL)
    assert np.linalg.eigvalsh(ggn).min() > -1e-10 * np.abs(ggn).max()
    diag = ref.float_leaves(
        _np(ref.ggn_diag(case.apply_fn, case.params, batch, **kwargs)), case.params
    )
    np.testing.assert_allclose(np.concatenate([d.ravel() for d in diag]), np.diag(ggn))

    hess = np.asarray(ref.loss_hessians(case.apply_fn, case.params, batch, loss))
    logits = np.asarray(_jit(case.apply_fn)(case.params, batch[0]))
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    closed = np.einsum("nc,cd->ncd", probs, np.eye(case.num_classes))
    closed -= np.einsum("nc,nd->ncd", probs, probs)
    np.testing.assert_allclose(hess, closed, rtol=1e-10, atol=ATOL)
    mse_batch = models.make_batch(case, "mse")
    hess = np.asarray(ref.loss_hessians(case.apply_fn, case.params, mse_batch, "mse"))
    np.testing.assert_allclose(hess, np.broadcast_to(2 * np.eye(case.num_classes), hess.shape))


def test_ggn_and_hessian_for_piecewise_linear_models():
    """ReLU nets: the Hessian and the GGN agree on every per-leaf diagonal block (each layer
    enters the outputs affinely) but NOT across layers; a single layer agrees everywhere."""
    relu = models.get_case("mlp_relu")
    batch = models.make_batch(relu, "cross_entropy")
    ggn = np.asarray(ref.ggn_matrix(relu.apply_fn, relu.params, batch))
    hess = np.asarray(ref.hessian_matrix(relu.apply_fn, relu.params, batch))
    slices = ref.float_slices(relu.params)
    for sl in slices:
        np.testing.assert_allclose(hess[sl, sl], ggn[sl, sl], rtol=1e-9, atol=ATOL)
    cross = np.abs(hess - ggn).max()
    assert cross > 1e-3, "cross-layer blocks of Hessian and GGN should differ"

    single = models.get_case("dense_single")
    batch = models.make_batch(single, "mse")
    kwargs = dict(loss="mse", reduction="sum")
    ggn = np.asarray(ref.ggn_matrix(single.apply_fn, single.params, batch, **kwargs))
    hess = np.asarray(ref.hessian_matrix(single.apply_fn, single.params, batch, **kwargs))
    np.testing.assert_allclose(hess, ggn, rtol=1e-9, atol=ATOL)
