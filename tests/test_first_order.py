"""First-order API: the public functions, retracing and input validation.

Exactness on every model of the zoo is in test_exactness.py."""

import chex
import jax
import jax.numpy as jnp
import models
import numpy as np
import pytest
import reference
from helpers import assert_tree_close

import curvjax

FIRST_ORDER = ["per_example_grads", "batch_l2", "sum_grad_squared", "variance"]


def _extract(case, batch, loss, reduction):
    fn = jax.jit(
        lambda p, b: curvjax.extract(
            case.apply_fn, p, b, FIRST_ORDER, loss=loss, reduction=reduction
        ),
        compiler_options=reference.FAST_COMPILE,
    )
    return fn(case.params, batch)


def test_public_functions_equal_extract_and_do_not_retrace():
    case = models.get_case("cnn_grouped")
    batch = models.make_batch(case, "cross_entropy")
    want = _extract(case, batch, "cross_entropy", "sum")
    for name in ["grad", *FIRST_ORDER]:
        fn = getattr(curvjax, name)
        chex.clear_trace_counter()  # the counter is keyed by code: `call` is redefined per name

        @jax.jit
        @chex.assert_max_traces(n=1)
        def call(p, b, fn=fn):
            return fn(case.apply_fn, p, b, reduction="sum")

        first = call(case.params, batch)
        shifted = jax.tree.map(
            lambda a: a + 0.5 if jnp.issubdtype(a.dtype, jnp.floating) else a, batch[0]
        )
        call(case.params, (shifted, batch[1]))  # same shapes: no second trace
        assert_tree_close(first, want[name], case.params, what=name)


def test_non_float_leaves_are_skipped():
    case = models.get_case("plain_with_int_leaf")
    batch = models.make_batch(case, "mse")
    out = curvjax.extract(case.apply_fn, case.params, batch, FIRST_ORDER, loss="mse")
    leaves, _ = jax.tree_util.tree_flatten(case.params)
    flags = reference.float_mask(case.params)
    assert not all(flags)
    for key in ["grad", *FIRST_ORDER]:
        flat = jax.tree_util.tree_structure(case.params).flatten_up_to(out[key])
        for value, is_float in zip(flat, flags, strict=True):
            assert (value is None) == (not is_float), key


def test_unused_leaf_gets_zeros():
    apply_fn = lambda p, x: x @ p["w"]
    params = {"w": jnp.ones((3, 2)), "unused": jnp.ones((4,))}
    batch = (jnp.ones((5, 3)), jnp.array([0, 1, 0, 1, 1]))
    out = curvjax.extract(apply_fn, params, batch, FIRST_ORDER)
    for key in ["grad", *FIRST_ORDER]:
        assert not np.any(out[key]["unused"]), key
    assert out["per_example_grads"]["unused"].shape == (5, 4)


def test_bad_input_gets_clear_errors():
    case = models.get_case("mlp_tanh")
    x, y = models.make_batch(case, "cross_entropy")
    fn = curvjax.batch_l2
    with pytest.raises(ValueError, match="per-example"):
        bn = models.get_case("batchnorm_mlp")
        fn(bn.apply_fn, bn.params, models.make_batch(bn, "cross_entropy"))
    with pytest.raises(ValueError, match="batch size"):
        fn(case.apply_fn, case.params, (x, y[:3]))
    with pytest.raises(ValueError, match="unsupported loss 'hinge'"):
        fn(case.apply_fn, case.params, (x, y), loss="hinge")
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        fn(case.apply_fn, case.params, (x, y + 3))
    with pytest.raises(ValueError, match="integer class labels"):
        fn(case.apply_fn, case.params, (x, y.astype(jnp.float64)))
    with pytest.raises(ValueError, match="NaN or Inf"):
        fn(case.apply_fn, case.params, (x.at[0, 0].set(jnp.nan), y))
    with pytest.raises(ValueError, match=r"\(inputs, targets\) or \(inputs, targets, weights\)"):
        fn(case.apply_fn, case.params, x)
    with pytest.raises(ValueError, match="unknown quantities"):
        curvjax.extract(case.apply_fn, case.params, (x, y), ["batch_l3"])
    with pytest.raises(ValueError, match="disagree on the batch size"):
        fn(lambda p, xs: case.apply_fn(p, xs[0]) + xs[1][:, :1], case.params, ((x, x[:2]), y))
