"""Models that draw random numbers are refused; deterministic ones are unaffected.

curvjax evaluates ``apply_fn`` one example at a time, where a random draw (a dropout mask drawn at
batch size one) is not the draw that example gets in the batch: without the check, the loss and
the per-example gradients silently differ from those of the user's batch function. Every entry
point that traces the model per example raises an error naming the draw and its source line,
whatever framework draws it and however deeply it is nested.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from helpers import assert_tree_close

import curvjax
from curvjax._src import primitives

KEY = jax.random.key(7)
N = 4


def _batch():
    rng = np.random.default_rng(0)
    return jnp.asarray(rng.normal(size=(N, 3))), jnp.asarray(rng.integers(0, 3, N), jnp.int32)


class LinenMLP(nn.Module):
    deterministic: bool = False

    @nn.compact
    def __call__(self, x, rng=None):
        h = nn.relu(nn.Dense(5)(x))
        h = nn.Dropout(0.5, deterministic=self.deterministic)(h, rng=rng)
        return nn.Dense(3)(h)


class NnxMLP(nnx.Module):
    def __init__(self, rngs):
        self.l1 = nnx.Linear(3, 5, rngs=rngs)
        self.drop = nnx.Dropout(0.5, rngs=rngs)
        self.l2 = nnx.Linear(5, 3, rngs=rngs)

    def __call__(self, x):
        return self.l2(self.drop(nnx.relu(self.l1(x))))


def _linen_params():
    x, _ = _batch()
    return jax.tree.map(
        lambda a: a.astype(jnp.float64), LinenMLP(True).init(jax.random.key(0), x[:1])
    )


def _linen_rngs():
    model = LinenMLP()
    return (lambda p, x: model.apply(p, x, rngs={"dropout": KEY})), _linen_params()


def _linen_closed_legacy_key():
    model, key = LinenMLP(), jax.random.PRNGKey(3)  # a raw uint32 key, closed over
    return (lambda p, x: model.apply(p, x, rng=key)), _linen_params()


def _nnx():
    graphdef, state = nnx.split(NnxMLP(nnx.Rngs(0, dropout=1)))
    return (lambda p, x: nnx.merge(graphdef, p)(x)), state


def _plain_params():
    rng = np.random.default_rng(1)
    return {"w": jnp.asarray(rng.normal(size=(3, 5))), "v": jnp.asarray(rng.normal(size=(5, 3)))}


def _bernoulli_mask(h):
    return h * jax.random.bernoulli(KEY, 0.5, h.shape)


def _plain(transform):
    """``tanh(x W) ⊙ mask @ V`` with the mask drawn inside ``transform(_bernoulli_mask)``."""
    masked = transform(_bernoulli_mask)

    def apply_fn(p, x):
        return masked(jnp.tanh(x @ p["w"])) @ p["v"]

    return apply_fn, _plain_params()


def _in_cond(fn):
    return lambda h: jax.lax.cond(jnp.sum(h) > 0, fn, lambda z: z, h)


def _in_scan(fn):
    def body(carry, _):
        return fn(carry), None

    return lambda h: jax.lax.scan(body, h, None, length=2)[0]


def _in_custom_jvp(fn):
    wrapped = jax.custom_jvp(fn)
    wrapped.defjvp(lambda primals, tangents: (fn(*primals), tangents[0]))
    return wrapped


MODELS = {
    "linen_rngs": _linen_rngs,
    "linen_closed_legacy_key": _linen_closed_legacy_key,
    "nnx_rngs": _nnx,
    "bernoulli": lambda: _plain(lambda f: f),
    "nested_jit": lambda: _plain(jax.jit),
    "checkpoint": lambda: _plain(jax.checkpoint),
    "cond": lambda: _plain(_in_cond),
    "scan": lambda: _plain(_in_scan),
    "custom_jvp": lambda: _plain(_in_custom_jvp),
}


@pytest.mark.parametrize("name", MODELS)
def test_models_that_draw_random_numbers_are_refused(name):
    apply_fn, params = MODELS[name]()
    x, y = _batch()
    # the message names the draw and a source line of this file (the model or the Dropout call)
    with pytest.raises(
        ValueError, match=r"(?s)`random_bits` at .*test_randomness\.py.*deterministic"
    ):
        curvjax.extract(apply_fn, params, (x, y), ["variance"])


def test_every_per_example_entry_point_refuses():
    apply_fn, params = MODELS["linen_rngs"]()
    x, y = _batch()
    calls = {
        "per_example_grads": lambda: curvjax.per_example_grads(apply_fn, params, (x, y)),
        "batch_l2": lambda: curvjax.batch_l2(apply_fn, params, (x, y)),
        "clipped_grad": lambda: curvjax.clipped_grad(apply_fn, params, (x, y), clip_norm=1.0),
        "ggn_diag": lambda: curvjax.ggn_diag(apply_fn, params, (x, y)),
        "kfac": lambda: curvjax.kfac(apply_fn, params, (x, y), key=KEY),
        "inspect": lambda: curvjax.inspect(apply_fn, params, x),
        "jit": lambda: jax.jit(lambda p: curvjax.extract(apply_fn, p, (x, y), ["batch_l2"]))(
            params
        ),
    }
    for name, call in calls.items():
        with pytest.raises(ValueError, match="random_bits"):
            call()
            pytest.fail(f"{name} did not refuse")


def test_whole_batch_entry_points_reproduce_the_batch_function():
    # grad and Hessian-vector products evaluate the whole batch, so each example gets the draws
    # of the user's function: they agree with jax.grad / jax.jvp of it, in float64
    apply_fn, params = MODELS["linen_rngs"]()
    x, y = _batch()

    def loss(p):
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(apply_fn(p, x), y))

    assert_tree_close(curvjax.grad(apply_fn, params, (x, y)), jax.grad(loss)(params), params)
    vector = jax.tree.map(jnp.ones_like, params)
    want = jax.jvp(jax.grad(loss), (params,), (vector,))[1]
    got = curvjax.hvp(apply_fn, params, (x, y), vector)
    # float64, a few dozen O(1) products: 1e-10 is ~1e5 times the rounding
    assert_tree_close(got, want, params, rtol=1e-10)


def test_key_operations_without_draws_are_deterministic():
    # flax linen builds a key from a raw PRNGKey in `rngs` even when no dropout is drawn
    model = LinenMLP(deterministic=True)
    params = _linen_params()

    def apply_fn(p, x):
        return model.apply(p, x, rngs={"dropout": jax.random.PRNGKey(3)})

    x, y = _batch()
    closed = jax.make_jaxpr(apply_fn)(params, x)
    names = {eqn.primitive.name for eqn in closed.jaxpr.eqns}
    assert names & {"random_seed", "random_wrap", "random_unwrap"}  # key operations are there
    assert primitives.random_draws(closed.jaxpr) == []
    # and curvjax computes the same loss and per-example gradients as vmap(grad) in float64
    out = curvjax.extract(apply_fn, params, (x, y), ["per_example_grads"], reduction="sum")

    def loss_n(p, x_n, y_n):
        return optax.softmax_cross_entropy_with_integer_labels(apply_fn(p, x_n[None])[0], y_n)

    want = jax.vmap(jax.grad(loss_n), (None, 0, 0))(params, x, y)
    want_loss = jnp.sum(optax.softmax_cross_entropy_with_integer_labels(apply_fn(params, x), y))
    # float64 on both sides, a handful of O(1) products: 1e-10 is ~1e5 times the rounding
    np.testing.assert_allclose(out["loss"], want_loss, rtol=1e-10)
    assert_tree_close(out["per_example_grads"], want, params, rtol=1e-10)


def test_nnx_model_in_eval_mode_works():
    model = NnxMLP(nnx.Rngs(0, dropout=1))
    model.eval()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def apply_fn(p, x):
        return nnx.merge(graphdef, p, rest)(x)

    x, y = _batch()
    x32 = x.astype(jnp.float32)
    out = curvjax.extract(apply_fn, params, (x32, y), ["batch_l2"], reduction="sum")

    def loss_n(p, x_n, y_n):
        return optax.softmax_cross_entropy_with_integer_labels(apply_fn(p, x_n[None])[0], y_n)

    grads = jax.vmap(jax.grad(loss_n), (None, 0, 0))(params, x32, y)
    want = sum(jnp.sum(g.reshape(N, -1) ** 2, axis=1) for g in jax.tree.leaves(grads))
    # float32 model: sums of a few dozen terms, each rounded at eps ≈ 1.2e-7
    np.testing.assert_allclose(sum(jax.tree.leaves(out["batch_l2"])), want, rtol=1e-5)


def _masked_apply(p, inputs):
    x, mask = inputs
    return (jnp.tanh(x @ p["w"]) * mask) @ p["v"]


def test_mask_drawn_outside_and_closed_over_is_refused():
    # a [N, 5] mask closed over broadcasts against one example's [1, 5] activations: evaluated
    # per example the model would return N rows and curvjax would read the wrong numbers
    params = _plain_params()
    x, y = _batch()
    mask = jax.random.bernoulli(KEY, 0.5, (N, 5)).astype(x.dtype)
    with pytest.raises(ValueError, match=r"shape \(4, 3\).*closed over.*inputs"):
        curvjax.extract(lambda p, x: _masked_apply(p, (x, mask)), params, (x, y), ["batch_l2"])


def test_mask_passed_in_inputs_is_exact():
    # the documented way to keep dropout: every quantity is that of the masked batch function
    params = _plain_params()
    x, y = _batch()
    mask = jax.random.bernoulli(KEY, 0.5, (N, 5)).astype(x.dtype)
    out = curvjax.extract(
        _masked_apply, params, ((x, mask), y), ["per_example_grads"], reduction="sum"
    )

    def loss(p, inputs, targets):
        logits = _masked_apply(p, inputs)
        return jnp.sum(optax.softmax_cross_entropy_with_integer_labels(logits, targets))

    def loss_n(p, x_n, m_n, y_n):
        return loss(p, (x_n[None], m_n[None]), y_n[None])

    want = jax.vmap(jax.grad(loss_n), (None, 0, 0, 0))(params, x, mask, y)
    # float64, a handful of O(1) products: 1e-10 is ~1e5 times the rounding
    np.testing.assert_allclose(out["loss"], loss(params, (x, mask), y), rtol=1e-10)
    assert_tree_close(out["per_example_grads"], want, params, rtol=1e-10)
    assert_tree_close(out["grad"], jax.grad(loss)(params, (x, mask), y), params, rtol=1e-10)
