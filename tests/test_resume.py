"""Checkpointing K-FAC and Noisy K-FAC with orbax mid-run and resuming is bit-exact.

Each optimizer runs ``STEPS`` jitted steps uninterrupted, and again with ``(params, state)``
saved by ``orbax.checkpoint`` after ``SPLIT`` steps, dropped, restored into the abstract
structure of a fresh ``init`` and continued: the parameters and every state leaf agree bitwise.
The states consist of arrays only (no Python numbers or objects, which orbax would store as
something else or which would change the tree structure), their structure is the same after
``init``, after an update and after restoring.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
import reference

import curvjax
from curvjax.optim import kfac, noisy_kfac

STEPS, SPLIT = 4, 2


def mlp(p, x):
    h = jnp.tanh(x @ p["w1"] + p["b1"][None, :])
    return h @ p["w2"] + p["b2"][None, :]


def _setup():
    rng = np.random.default_rng(0)
    params = {
        "w1": jnp.asarray(rng.normal(size=(5, 6)) / 2),
        "b1": jnp.zeros(6),
        "w2": jnp.asarray(rng.normal(size=(6, 3)) / 2),
        "b2": jnp.zeros(3),
    }
    batches = [
        (jnp.asarray(rng.normal(size=(8, 5))), jnp.asarray(rng.integers(0, 3, 8), jnp.int32))
        for _ in range(STEPS)
    ]
    return params, batches


def _optimizer(name, inputs):
    """``(opt, step)``: the transform and a jitted ``step(params, state, batch, key)``."""
    if name.startswith("kfac"):
        block = name.split("-")[1]
        # adaptation every step and a refresh every other step, so the resumed part crosses both
        opt = kfac(
            mlp, inputs, damping=1e-1, block=block, inverse_interval=2, adaptation_interval=1
        )

        def step(params, state, batch, key):
            if block == "tridiagonal":
                out = curvjax.chain_factors(mlp, params, batch, key=key)
                curvature = out["chain_factors"]
            else:
                out = curvjax.extract(mlp, params, batch, ["kfac"], key=key)
                curvature = out["kfac"]
            updates, state = opt.update(
                out["grad"], state, params, curvature=curvature, batch=batch
            )
            return optax.apply_updates(params, updates), state

    else:  # the convenience path: weight samples drawn inside the update
        opt = noisy_kfac(
            mlp, inputs, learning_rate=0.1, rho=0.05, damping=1e-2, momentum=0.9, weight_decay=1e-3
        )

        def step(params, state, batch, key):
            updates, state = opt.update(None, state, params, batch=batch, key=key)
            return optax.apply_updates(params, updates), state

    return opt, jax.jit(step, compiler_options=reference.FAST_COMPILE)


def _run(step, params, state, batches, start, stop=STEPS):
    for k in range(start, stop):
        params, state = step(params, state, batches[k], jax.random.key(k))
    return params, state


def _assert_only_arrays(state, name):
    leaves = jax.tree.leaves(state)
    assert leaves, name
    kinds = {type(x).__name__ for x in leaves if not isinstance(x, jax.Array)}
    assert not kinds, f"{name}: state leaves that are not arrays: {kinds}"


@pytest.mark.parametrize("name", ["kfac-diagonal", "kfac-tridiagonal", "noisy_kfac"])
def test_checkpoint_resume_is_bit_exact(tmp_path, name):
    params, batches = _setup()
    opt, step = _optimizer(name, batches[0][0])
    initial = opt.init(params)
    _assert_only_arrays(initial, name)

    want_params, want_state = _run(step, params, initial, batches, 0)
    assert jax.tree.structure(want_state) == jax.tree.structure(initial)

    mid_params, mid_state = _run(step, params, initial, batches, 0, SPLIT)
    checkpointer = ocp.StandardCheckpointer()
    path = tmp_path / "checkpoint"
    checkpointer.save(path, {"params": mid_params, "state": mid_state})
    checkpointer.wait_until_finished()
    del mid_params, mid_state

    # a fresh process would rebuild the structure from `init`; restore into its abstract form
    abstract = jax.tree.map(
        ocp.utils.to_shape_dtype_struct, {"params": params, "state": opt.init(params)}
    )
    restored = checkpointer.restore(path, abstract)
    assert jax.tree.structure(restored) == jax.tree.structure(abstract)
    _assert_only_arrays(restored["state"], name)

    got_params, got_state = _run(step, restored["params"], restored["state"], batches, SPLIT)
    for got, want in zip(jax.tree.leaves(got_params), jax.tree.leaves(want_params), strict=True):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))  # bitwise
    for got, want in zip(jax.tree.leaves(got_state), jax.tree.leaves(want_state), strict=True):
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_resume_differs_without_the_state(tmp_path):
    """The comparison can fail: resuming K-FAC with a fresh state gives other parameters."""
    params, batches = _setup()
    opt, step = _optimizer("kfac-diagonal", batches[0][0])
    want_params, _ = _run(step, params, opt.init(params), batches, 0)
    mid_params, _ = _run(step, params, opt.init(params), batches, 0, SPLIT)
    got_params, _ = _run(step, mid_params, opt.init(params), batches, SPLIT)
    diff = max(
        float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
        for a, b in zip(jax.tree.leaves(got_params), jax.tree.leaves(want_params), strict=True)
    )
    assert diff > 1e-6
