"""Test session settings: float64 for reference comparisons and strict numpy semantics."""

import os

# jaxlib's LAPACK runs on OpenBLAS, whose threads thrash on a busy 2-core machine (small eigh 100x
# slower); one thread is what the tests' tiny matrices want. Set before jax loads the library.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_rank_promotion", "raise")

# The longest single tests (the documentation build with its notebooks, one hypothesis run, subprocesses with 8 devices or two processes, a
# 300-step training run) are scheduled first: pytest-xdist hands tests out in collection order, and
# one of these starting last would run alone on one core while the other core idles.
_LONG_FIRST = (
    "test_docs.py::",
    "test_fuzz.py::test_every_quantity_matches_its_reference",
    "test_sharding_params.py::",
    "test_optim_float32.py::test_kfac_digits_300_steps_float32",
    "test_scale.py::test_extract_with_batch_sharded_over_8_devices",
    "test_clipping_edge.py::",
    "test_resume.py::",
)


def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: not any(part in item.nodeid for part in _LONG_FIRST))
