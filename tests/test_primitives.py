"""The primitive registry, the one interpreter and user rules (curvjax.register_rule)."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference
from helpers import assert_tree_close
from jax import lax
from jax.extend.core import Primitive

import curvjax
from curvjax._src import mixing, primitives
from curvjax._src import taps as taps_lib


def test_every_entry_is_keyed_by_a_primitive_object():
    assert primitives._TABLE
    for key, info in primitives._TABLE.items():
        assert isinstance(key, Primitive)
        assert info.name == key.name
        assert info.hessian in (*primitives.HESSIAN_CLASSES, None)
        if info.call is not None:  # entered by tap analysis and by the mixing check alike
            assert info.mixing is not None


def _calls():
    dense = lambda h, w: jnp.tanh(h @ w)  # noqa: E731

    @jax.custom_jvp
    def custom_jvp_dense(h, w):
        return dense(h, w)

    custom_jvp_dense.defjvp(lambda p, t: jax.jvp(dense, p, t))

    @jax.custom_vjp
    def custom_vjp_dense(h, w):
        return dense(h, w)

    custom_vjp_dense.defvjp(lambda h, w: jax.vjp(dense, h, w), lambda vjp, g: vjp(g))
    return {
        "jit": jax.jit(dense),
        "remat": jax.checkpoint(dense),
        "custom_jvp": custom_jvp_dense,
        "custom_vjp": custom_vjp_dense,
    }


@pytest.mark.parametrize("call", sorted(_calls()))
def test_taps_and_mixing_enter_the_same_calls(call):
    layer = _calls()[call]
    params = {"w": jnp.ones((4, 3)) / 4}
    x = jnp.arange(20.0).reshape(5, 4) / 20
    model = taps_lib.TracedModel(lambda p, h: layer(h, p["w"]), params, x)
    assert [t.primitive for t in model.taps] == ["dot_general"]  # found inside the call
    mixed = lambda p, h: layer(h - h.mean(axis=0, keepdims=True), p["w"])  # noqa: E731
    plain = lambda p, h: layer(h, p["w"]) - layer(h, p["w"]).mean(axis=0, keepdims=True)  # noqa: E731
    for fn in (mixed, plain):
        closed, axes, n = mixing._trace(fn, params, x)
        reports = mixing.find_batch_mixing(closed, axes, n)
        assert reports and "reduce_sum" in reports[0]


def _unknown_primitive():
    prim = Primitive("curvjax_test_unknown")
    prim.def_impl(lambda x: x * 2.0)
    prim.def_abstract_eval(lambda x: x)
    return prim


def test_mixing_check_warns_of_a_primitive_without_a_rule():
    prim = _unknown_primitive()
    fn = lambda p, x: prim.bind(x) @ p  # noqa: E731
    with pytest.warns(mixing.UnknownPrimitiveWarning, match="curvjax_test_unknown"):
        mixing.check_no_batch_mixing(fn, jnp.ones((3, 2)), jnp.ones((4, 3)))
    report = curvjax.inspect(fn, jnp.ones((3, 2)), jnp.ones((4, 3)))
    assert any("curvjax_test_unknown" in line for line in report.unknown_primitives)
    # A known primitive does not warn.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mixing.check_no_batch_mixing(lambda p, x: x @ p, jnp.ones((3, 2)), jnp.ones((4, 3)))


@pytest.mark.parametrize(
    ("fn", "mixes"),
    [
        (lambda x: jnp.stack([x, 2 * x], axis=1).reshape(5, -1), False),
        (lambda x: jnp.stack([x, x.T], axis=0).sum(0), True),  # pairs example n with feature n
        (lambda x: jnp.tile(x, (1, 3)), False),
        (lambda x: jnp.tile(x, (2, 1))[3:8], True),  # row n of the output holds example n + 3
        (lambda x: jnp.concatenate(jnp.split(x, 5, axis=1)[::-1], axis=1), False),
    ],
)
def test_stack_tile_split_rules(fn, mixes):
    x = jnp.ones((5, 5))
    closed = jax.make_jaxpr(fn)(x)
    reports = mixing.find_batch_mixing(closed, [0], 5)
    if mixes:
        assert reports
    else:
        assert reports == []
        strides, _ = mixing._analyse(closed.jaxpr, [5], 5)
        assert strides == [int(np.prod(closed.out_avals[0].shape[1:]))]


# --- user rules -------------------------------------------------------------------------------


@jax.custom_vjp
def fused_dense(x, w):
    """A user's fused layer: ``x @ w`` with a hand-written VJP."""
    return x @ w


fused_dense.defvjp(lambda x, w: (x @ w, (x, w)), lambda res, g: (g @ res[1].T, res[0].T @ g))


def fused_form(tap, acts, cots):
    (a,), (b,) = acts, cots  # a [N, 1, I] (batch-one axis = one position), b [N, M, 1, O]
    return curvjax.BilinearForm(a[:, None], b[:, :, None], lambda g: g[..., 0, :, :])


def _fused_model(p, x):
    h = jnp.tanh(fused_dense(x, p["w1"]) + p["b1"][None])
    return fused_dense(h, p["w2"])


def _fused_problem():
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    params = {
        "w1": jax.random.normal(k1, (4, 6), jnp.float64) / 2,
        "b1": jnp.linspace(-0.5, 0.5, 6, dtype=jnp.float64),
        "w2": jax.random.normal(k2, (6, 3), jnp.float64) / 2,
    }
    x = jax.random.normal(k3, (7, 4), jnp.float64)
    return params, (x, jnp.arange(7) % 3)


def _quantities(params, batch):
    names = ["per_example_grads", "batch_l2", "ggn_diag", "kflr"]
    return curvjax.extract(_fused_model, params, batch, names)


def test_registered_rule_matches_generic_rule_and_references():
    params, batch = _fused_problem()
    with curvjax.register_rule(fused_dense, form=fused_form):
        report = curvjax.inspect(_fused_model, params, batch[0])
        fast = _quantities(params, batch)
    assert {leaf.name: leaf.rules for leaf in report.leaves} == {
        "params['b1']": ("generic",),
        "params['w1']": ("fused_dense (user rule)",),
        "params['w2']": ("fused_dense (user rule)",),
    }
    with curvjax.register_rule(fused_dense, form=fused_form, applies=lambda tap: False):
        report = curvjax.inspect(_fused_model, params, batch[0])
        generic = _quantities(params, batch)
    assert {leaf.rules for leaf in report.leaves} == {("generic",)}
    entered = _quantities(params, batch)  # not registered: the call is entered (dense rule)
    assert curvjax.inspect(_fused_model, params, batch[0]).leaves[1].rules == ("dense",)

    want_g = reference.per_example_grads(_fused_model, params, batch)
    want_l2 = jax.tree.map(lambda g: jnp.sum(g.reshape(g.shape[0], -1) ** 2, axis=1), want_g)
    want_diag = reference.ggn_diag(_fused_model, params, batch)
    for out in (fast, generic, entered):
        assert_tree_close(out["per_example_grads"], want_g, params, what="per_example_grads")
        assert_tree_close(out["batch_l2"], want_l2, params, what="batch_l2")
        assert_tree_close(out["ggn_diag"], want_diag, params, what="ggn_diag")
    # The user rule gives the kernels Kronecker blocks, equal to those of the entered dense rule.
    for name in ("w1", "w2"):
        ours, dense = fast["kflr"][name], entered["kflr"][name]
        assert isinstance(ours, curvjax.KroneckerBlock)
        np.testing.assert_allclose(
            curvjax.block_to_dense(ours), curvjax.block_to_dense(dense), rtol=1e-12, atol=1e-14
        )
    assert not isinstance(generic["kflr"]["w1"], curvjax.KroneckerBlock)


def test_registration_is_undone():
    before = dict(primitives._USER)
    registration = curvjax.register_rule(fused_dense, form=fused_form)
    assert len(primitives._USER) == len(before) + 1
    registration.remove()
    registration.remove()  # idempotent
    assert primitives._USER == before
    with curvjax.register_rule(lax.tanh_p, hessian="piecewise"):
        assert primitives.lookup(lax.tanh_p).hessian == "piecewise"
        assert primitives.lookup(lax.tanh_p).mixing is not None  # other facts kept
    assert primitives.lookup(lax.tanh_p).hessian == "elementwise"


def test_register_rule_rejects_bad_arguments():
    with pytest.raises(ValueError, match="hessian="):
        curvjax.register_rule(lax.tanh_p, hessian="quadratic")
    with pytest.raises(ValueError, match="form="):
        curvjax.register_rule(lax.tanh_p)
    with pytest.raises(TypeError, match="custom_vjp"):
        curvjax.register_rule(3, hessian="linear")


def test_registered_hessian_class_is_used():
    # Declaring tanh piecewise linear drops its residual: the "exact" diagonal becomes the GGN's.
    params, batch = _fused_problem()
    fn = lambda p, x: jnp.tanh(x @ p["w1"] + p["b1"][None]) @ p["w2"]  # noqa: E731
    exact = curvjax.hessian_diag(fn, params, batch)
    assert_tree_close(exact, reference.hessian_diag(fn, params, batch), params, what="hessian")
    with curvjax.register_rule(lax.tanh_p, hessian="piecewise"):
        declared = curvjax.hessian_diag(fn, params, batch)
    assert_tree_close(declared, reference.ggn_diag(fn, params, batch), params, what="ggn")
