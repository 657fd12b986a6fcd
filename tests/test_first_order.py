"""First-order quantities on every model of the zoo against vmap(grad) references (float64)."""

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
PER_EXAMPLE_CASES = [name for name, tags in models.TAGS.items() if "mixes_examples" not in tags]
# Both losses and both reductions on every case would double the compile time (the suite runs on
# 2 cores in CI): every case runs with one pairing, a varied subset with the other too.
PAIRINGS = [("cross_entropy", "mean"), ("mse", "sum")]
SECOND_PAIRING = {
    "mlp_tanh",
    "cnn_grouped",
    "conv1d",
    "attention",
    "tied_embed",
    "equinox_conv",
    "plain_with_int_leaf",
    "scan_mlp",
    "layernorm_mlp",
    "nnx_mlp",
}
CASE_PAIRINGS = [
    (name, loss, reduction)
    for name in PER_EXAMPLE_CASES
    for loss, reduction in PAIRINGS[: 2 if name in SECOND_PAIRING else 1]
]


def _extract(case, batch, loss, reduction):
    fn = jax.jit(
        lambda p, b: curvjax.extract(
            case.apply_fn, p, b, FIRST_ORDER, loss=loss, reduction=reduction
        ),
        compiler_options=reference.FAST_COMPILE,
    )
    return fn(case.params, batch)


def _references(case, batch, loss, reduction):
    pe = reference.per_example_grads(case.apply_fn, case.params, batch, loss, reduction)
    return {
        "loss": reference.reduced_loss(case.apply_fn, case.params, batch, loss, reduction),
        "grad": reference.grad(case.apply_fn, case.params, batch, loss, reduction),
        "per_example_grads": pe,
        "batch_l2": jax.tree.map(lambda a: jnp.sum(a.reshape(a.shape[0], -1) ** 2, 1), pe),
        "sum_grad_squared": jax.tree.map(lambda a: jnp.sum(a**2, 0), pe),
        "variance": jax.tree.map(lambda a: jnp.mean(a**2, 0) - jnp.mean(a, 0) ** 2, pe),
    }


@pytest.mark.parametrize("name,loss,reduction", CASE_PAIRINGS)
def test_extract_matches_vmap_grad(name, loss, reduction):
    case = models.get_case(name)
    batch = models.make_batch(case, loss)
    got = _extract(case, batch, loss, reduction)
    want = _references(case, batch, loss, reduction)
    np.testing.assert_allclose(got["loss"], want["loss"], rtol=1e-12)
    for key in ["grad", *FIRST_ORDER]:
        assert_tree_close(got[key], want[key], case.params, what=f"{name}/{key}")


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
    with pytest.raises(ValueError, match="pair"):
        fn(case.apply_fn, case.params, x)
    with pytest.raises(ValueError, match="unknown quantities"):
        curvjax.extract(case.apply_fn, case.params, (x, y), ["batch_l3"])
    with pytest.raises(ValueError, match="disagree on the batch size"):
        fn(lambda p, xs: case.apply_fn(p, xs[0]) + xs[1][:, :1], case.params, ((x, x[:2]), y))
