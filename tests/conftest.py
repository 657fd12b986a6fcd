"""Test session settings: float64 for reference comparisons and strict numpy semantics."""

import os

# jaxlib's LAPACK runs on OpenBLAS, whose threads thrash on a busy 2-core machine (small eigh 100x
# slower); one thread is what the tests' tiny matrices want. Set before jax loads the library.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_rank_promotion", "raise")
