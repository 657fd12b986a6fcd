"""Sharded parameters (FSDP-style 2-D mesh) and several processes, against one device.

Each test runs its body in subprocesses with XLA's host-platform devices, so that the device count
of the other tests is not affected. The numbers must not depend on the layout: curvjax's
functions are plain JAX, and JAX's SPMD partitioner inserts the communication.
"""

import os
import socket
import subprocess
import sys
import textwrap

import pytest

COMMON = textwrap.dedent(
    """
    import jax, jax.numpy as jnp, numpy as np
    import curvjax, curvjax.optim
    jax.config.update("jax_enable_x64", True)

    def apply_fn(p, x):
        h = jnp.tanh(x @ p["w1"] + p["b1"][None])
        h = jnp.tanh(h @ p["w2"] + p["b2"][None])
        return h @ p["w3"]

    k = jax.random.split(jax.random.key(0), 5)
    params = {
        "w1": jax.random.normal(k[0], (8, 16)) / 3, "b1": jnp.zeros(16),
        "w2": jax.random.normal(k[1], (16, 16)) / 4, "b2": jnp.zeros(16),
        "w3": jax.random.normal(k[2], (16, 4)) / 4,
    }
    x = jax.random.normal(k[3], (16, 8))
    y = jax.random.randint(k[4], (16,), 0, 4)
    NAMES = ["batch_l2", "ggn_diag", "kfac", "clipped_grad"]
    OPTIONS = {"clipped_grad": {"clip_norm": 0.5}}

    def quantities(p, batch):
        return curvjax.extract(apply_fn, p, batch, NAMES, key=jax.random.key(7), options=OPTIONS)

    tx = curvjax.optim.kfac(apply_fn, x[:1], damping=1e-2, inverse_interval=1)

    def step(p, batch):
        grad = curvjax.extract(apply_fn, p, batch)["grad"]
        return tx.update(grad, tx.init(p), p, batch=batch, key=jax.random.key(3))[0]

    def compare(want, got, what):
        # float64 on both sides; sharding changes only the order of the cross-device sums, so
        # the results agree to a few hundred ulps of their scale
        for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(want), jax.tree.leaves(got)):
            a, b = np.asarray(a), np.asarray(b)
            assert a.shape == b.shape, (what, jax.tree_util.keystr(path), a.shape, b.shape)
            scale = max(float(np.max(np.abs(a))), 1e-300)
            err = float(np.max(np.abs(a - b)))
            assert err <= 1e-12 * scale + 1e-15, (what, jax.tree_util.keystr(path), err, scale)
            assert np.any(a != 0) or scale == 1e-300, (what, jax.tree_util.keystr(path))
    """
)

FSDP = COMMON + textwrap.dedent(
    """
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    assert jax.device_count() == 8, jax.devices()
    single_q = jax.jit(quantities)(params, (x, y))
    single_s = jax.jit(step)(params, (x, y))

    mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "model"))
    spec = {"w1": P(None, "model"), "b1": P(), "w2": P("model", None), "b2": P(),
            "w3": P("model", None)}  # the kernels split over "model", FSDP-style
    p_sh = jax.device_put(params, jax.tree.map(lambda s: NamedSharding(mesh, s), spec))
    b_sh = jax.device_put((x, y), NamedSharding(mesh, P("data")))
    assert len(p_sh["w2"].sharding.device_set) == 8
    assert p_sh["w2"].addressable_shards[0].data.shape == (8, 16)  # really split
    assert b_sh[0].addressable_shards[0].data.shape == (4, 8)
    sharded_q = jax.jit(quantities)(p_sh, b_sh)
    sharded_s = jax.jit(step)(p_sh, b_sh)
    compare(single_q, sharded_q, "extract")
    compare(single_s, sharded_s, "kfac step")
    # the results keep a sharded layout (no silent gather onto one device is required)
    print("kernel w2 of ggn_diag:", sharded_q["ggn_diag"]["w2"].sharding)
    print("FSDP-OK")
    """
)


def _run(script, env_extra, n):
    env = dict(os.environ, JAX_PLATFORMS="cpu", OPENBLAS_NUM_THREADS="1", **env_extra)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={n}"
    return subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
    )


@pytest.mark.skipif(sys.platform == "win32", reason="uses XLA host-platform devices")
def test_parameters_sharded_over_a_2d_mesh_equal_one_device():
    result = _run(FSDP, {}, 8)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "FSDP-OK" in result.stdout


MULTI = (
    textwrap.dedent(
        """
        import os, jax
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        PID = int(os.environ["CURVJAX_TEST_PROCESS"])
        jax.distributed.initialize(
            coordinator_address="127.0.0.1:" + os.environ["CURVJAX_TEST_PORT"],
            num_processes=2, process_id=PID, initialization_timeout=60)
        """
    )
    + COMMON
    + textwrap.dedent(
        """
        from jax.experimental import multihost_utils
        from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
        assert jax.process_count() == 2 and jax.local_device_count() == 4, jax.devices()
        assert jax.device_count() == 8

        mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "model"))
        spec = {"w1": P(None, "model"), "b1": P(), "w2": P("model", None), "b2": P(),
                "w3": P("model", None)}

        def global_array(a, s):  # every process knows the (small) parameters
            a = np.asarray(a)
            return jax.make_array_from_callback(a.shape, NamedSharding(mesh, s), lambda i: a[i])

        p_sh = jax.tree.map(global_array, params, spec)
        # each process holds only its half of the batch
        half = slice(8 * PID, 8 * PID + 8)
        rows = NamedSharding(mesh, P("data"))
        b_sh = tuple(
            jax.make_array_from_process_local_data(rows, np.asarray(a[half]), a.shape)
            for a in (x, y))
        assert not b_sh[0].is_fully_addressable
        sharded_q = multihost_utils.process_allgather(jax.jit(quantities)(p_sh, b_sh), tiled=True)
        sharded_s = multihost_utils.process_allgather(jax.jit(step)(p_sh, b_sh), tiled=True)
        if PID == 0:  # the reference: one process alone, on one of its devices, the whole batch
            compare(jax.jit(quantities)(params, (x, y)), sharded_q, "extract")
            compare(jax.jit(step)(params, (x, y)), sharded_s, "kfac step")
        print("MULTI-OK", PID)
        """
    )
)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(sys.platform == "win32", reason="uses XLA host-platform devices")
def test_two_processes_with_the_batch_split_equal_one_process():
    port = str(_free_port())
    env = dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        OPENBLAS_NUM_THREADS="1",
        XLA_FLAGS="--xla_force_host_platform_device_count=4",
        CURVJAX_TEST_PORT=port,
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", MULTI],
            env=dict(env, CURVJAX_TEST_PROCESS=str(i)),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=300))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    for i, (proc, (out, err)) in enumerate(zip(procs, outputs, strict=True)):
        assert proc.returncode == 0, f"process {i}:\n{err[-3000:]}"
        assert f"MULTI-OK {i}" in out
