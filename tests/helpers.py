"""Comparison helpers shared by the exactness tests."""

import jax
import numpy as np
import reference

#: Relative tolerance for float64 comparisons against the dense references: a few hundred ulps
#: (2.2e-16) of accumulated rounding in sums over examples, positions and columns.
RTOL = 1e-10
#: Entries that are exactly zero in exact arithmetic (e.g. the gradient of an attention key bias)
#: come out as rounding noise; they are compared against this fraction of the largest entry.
FLOOR = 1e-13


def assert_tree_close(actual, expected, params, *, rtol=RTOL, floor=FLOOR, what=""):
    """Compare the float-leaf entries of two params-shaped trees, leaf by leaf."""
    got = reference.float_leaves(actual, params)
    want = reference.float_leaves(expected, params)
    assert len(got) == len(want)
    scale = max(float(np.max(np.abs(w))) if np.size(w) else 0.0 for w in want)
    names = reference.float_paths(params)
    for name, g, w in zip(names, got, want, strict=True):
        g, w = np.asarray(g), np.asarray(w)
        assert g.shape == w.shape, f"{what} {name}: shape {g.shape} != {w.shape}"
        leaf_scale = float(np.max(np.abs(w))) if w.size else 0.0
        tol = rtol * leaf_scale + floor * scale
        err = float(np.max(np.abs(g - w))) if w.size else 0.0
        assert err <= tol, (
            f"{what} {name}: max error {err:.3e} > {tol:.3e} (scale {leaf_scale:.3e})"
        )


def jit(fn):
    """``jax.jit`` with the model (first argument) static."""
    return jax.jit(fn, static_argnums=0)


def run_on_host_devices(code: str, count: int) -> None:
    """Run ``code`` in a fresh Python on ``count`` XLA host-platform CPU devices (the device count
    is fixed when JAX starts, so it cannot change inside this process); it must print
    ``SHARDED-OK``."""
    import os
    import subprocess
    import sys

    env = dict(
        os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={count}", JAX_PLATFORMS="cpu"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "SHARDED-OK" in result.stdout
