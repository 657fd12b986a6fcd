"""Test session settings: float64 for reference comparisons and strict numpy semantics."""

import jax

jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_rank_promotion", "raise")
