"""Max-pooling with the selection-based derivative (curvjax._src.pooling) against JAX's own rule.

References: the Jacobian of ``lax.reduce_window_max`` built by ``jax.jacfwd`` (JAX's JVP rule;
its VJP rule does not support window dilation), float64. Inputs are rounded and clipped at zero
so that windows contain ties (as after a ReLU), where the choice of the selected element matters.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import curvjax
from curvjax._src import pooling

CASES = [
    # shape, window, strides, padding, window dilation
    ((2, 9, 9, 3), (1, 3, 3, 1), (1, 2, 2, 1), "SAME", None),  # DeepOBS 3c3d pooling
    ((2, 8, 7, 3), (1, 2, 2, 1), (1, 1, 1, 1), "VALID", None),
    ((2, 10, 3), (1, 3, 1), (1, 2, 1), "SAME", (1, 2, 1)),  # 1-D, dilated window
    ((1, 6, 5, 4, 2), (1, 2, 3, 2, 1), (1, 2, 1, 2, 1), "SAME", None),  # 3-D, mixed strides
    ((3, 7), (2, 3), (1, 3), ((1, 0), (2, 1)), None),  # pooling over the batch axis too
]


def _params(shape, window, strides, padding, dilation):
    dilation = dilation or (1,) * len(shape)
    if isinstance(padding, str):
        span = [(w - 1) * d + 1 for w, d in zip(window, dilation, strict=True)]
        padding = lax.padtype_to_pads(shape, span, strides, padding)
    return dict(
        window_dimensions=window,
        window_strides=strides,
        padding=tuple(tuple(p) for p in padding),
        base_dilation=(1,) * len(shape),
        window_dilation=dilation,
    )


@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c[0])))
def test_derivatives_match_reduce_window_max(case):
    params = _params(*case)
    shape = case[0]
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    x = jnp.maximum(jnp.round(2 * jax.random.normal(k1, shape, jnp.float64)), 0.0)
    ref = lambda v: lax.reduce_window_max_p.bind(v, **params)  # noqa: E731
    ours = lambda v: pooling.reduce_window_max(v, params)  # noqa: E731
    y = ref(x)
    assert jnp.any(x == 0), "the input should contain ties"
    np.testing.assert_array_equal(ours(x), y)
    jac = jax.jacfwd(ref)(x).reshape(y.size, x.size)
    ct = jax.random.normal(k2, y.shape, jnp.float64)
    tangent = jax.random.normal(k3, shape, jnp.float64)
    (vjp,) = jax.vjp(ours, x)[1](ct)
    np.testing.assert_allclose(vjp.ravel(), ct.ravel() @ jac, rtol=1e-14, atol=1e-14)
    jvp = jax.jvp(ours, (x,), (tangent,))[1]
    np.testing.assert_allclose(jvp.ravel(), jac @ tangent.ravel(), rtol=1e-14, atol=1e-14)


class _ConvPool(nn.Module):
    jit_pool: bool = False

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(4, (3, 3), padding="VALID")(x))
        pool = lambda v: nn.max_pool(v, (3, 3), strides=(2, 2), padding="SAME")  # noqa: E731
        x = jax.jit(pool)(x) if self.jit_pool else pool(x)
        return nn.Dense(3)(x.reshape(x.shape[0], -1))


@pytest.mark.parametrize("jit_pool", [False, True], ids=["pool", "pool_in_jit"])
def test_per_example_gradients_through_strided_max_pool(jit_pool):
    """ReLU conv net with 3x3/2 SAME pooling (ties at the ReLU zeros), the pooling also inside a
    nested ``jax.jit``: curvjax equals vmap(grad), and its program has no select-and-scatter."""
    model = _ConvPool(jit_pool=jit_pool)
    x = jax.random.normal(jax.random.key(1), (5, 9, 9, 2), jnp.float64)
    y = jnp.array([0, 1, 2, 0, 1])
    params = jax.tree.map(lambda a: a.astype(jnp.float64), model.init(jax.random.key(2), x[:1]))

    def loss(p, xn, yn):
        logits = model.apply(p, xn[None])[0]
        return jax.nn.logsumexp(logits) - logits[yn]

    expected = jax.vmap(jax.grad(loss), in_axes=(None, 0, 0))(params, x, y)
    ours = lambda p: curvjax.per_example_grads(model.apply, p, (x, y), reduction="sum")  # noqa: E731
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14),
        ours(params),
        expected,
    )
    program = str(jax.make_jaxpr(ours)(params))
    assert "select_and_scatter" not in program and "select_and_gather" not in program
    # (the control: JAX's own rule is there in a plain gradient of the same model)
    assert "select_and_scatter" in str(jax.make_jaxpr(jax.grad(loss))(params, x[0], y[0]))
