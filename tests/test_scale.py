"""Deterministic XLA memory figures and data-parallel execution."""

import sys
import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
from helpers import run_on_host_devices

import curvjax


def test_first_order_statistics_do_not_materialise_per_example_gradients():
    """batch_l2 / sum_grad_squared / variance: ≤ 3× the gradient's XLA temporaries (1.18M params,
    N = 256). Forming N × D per-example gradients would need 256 × 1.18M × 4 B ≈ 1.2 GB, hundreds of
    times the gradient's few MB."""
    model = nn.Sequential(
        [nn.Dense(1024), nn.relu, nn.Dense(512), nn.relu, nn.Dense(256), nn.relu, nn.Dense(10)]
    )
    x = jax.ShapeDtypeStruct((256, 512), jnp.float32)
    y = jax.ShapeDtypeStruct((256,), jnp.int32)
    params = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 512))))
    assert sum(p.size for p in jax.tree.leaves(params)) >= 1_000_000

    def temp_bytes(name):
        fn = getattr(curvjax, name)
        compiled = jax.jit(lambda p, b: fn(model.apply, p, b)).lower(params, (x, y)).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    grad_bytes = temp_bytes("grad")
    vmap_bytes = 256 * sum(p.size for p in jax.tree.leaves(params)) * 4
    for name in ["batch_l2", "sum_grad_squared", "variance"]:
        assert temp_bytes(name) <= 3 * grad_bytes, name
    assert 3 * grad_bytes < vmap_bytes / 50  # the bound is far below materialisation


SHARDED = textwrap.dedent(
    """
    import jax, jax.numpy as jnp, numpy as np
    import flax.linen as nn
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    import curvjax
    jax.config.update("jax_enable_x64", True)
    assert jax.device_count() == 8, jax.devices()
    model = nn.Sequential([nn.Conv(4, (3, 3)), nn.relu, lambda z: z.reshape(z.shape[0], -1),
                           nn.Dense(3)])
    x = jax.random.normal(jax.random.key(0), (16, 6, 6, 2), dtype=jnp.float64)
    y = jnp.arange(16) % 3
    params = jax.tree.map(lambda a: a.astype(jnp.float64),
                          model.init(jax.random.key(1), x[:1]))
    names = ["per_example_grads", "batch_l2", "sum_grad_squared", "variance"]
    fn = jax.jit(lambda p, b: curvjax.extract(model.apply, p, b, names))
    single = fn(params, (x, y))
    mesh = Mesh(np.array(jax.devices()), ("data",))
    shard = NamedSharding(mesh, P("data"))
    xs, ys = jax.device_put(x, shard), jax.device_put(y, shard)
    assert len(xs.sharding.device_set) == 8
    sharded = fn(params, (xs, ys))
    for a, b in zip(jax.tree.leaves(single), jax.tree.leaves(sharded)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-10, atol=1e-14)
    from curvjax import spectral
    top = jax.jit(lambda p, b: spectral.top_eigenpairs(
        spectral.hessian_operator(model.apply, p, b), 2, key=jax.random.key(0)).eigenvalues)
    np.testing.assert_allclose(top(params, (x, y)), top(params, (xs, ys)), rtol=1e-8)
    print("SHARDED-OK")
    """
)


@pytest.mark.skipif(sys.platform == "win32", reason="uses XLA host-platform devices")
def test_extract_with_batch_sharded_over_8_devices():
    run_on_host_devices(SHARDED, 8)
