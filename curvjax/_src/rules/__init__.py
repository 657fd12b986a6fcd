"""Per-tap rules, dispatched through the primitive registry.

Each rule module turns a tap's activation inputs ``a`` and output cotangents ``b`` into the
per-example quantities of its parameter input. ``dense`` and ``conv`` give the canonical bilinear
form of :mod:`curvjax._src.rules.bilinear` (fast norms and second moments without forming
``g_n``); every other primitive uses :mod:`curvjax._src.rules.generic` (its own VJP per example).
A primitive's fast rule is its ``rule`` entry in :mod:`curvjax._src.primitives`; users add one
with :func:`curvjax.register_rule`.
"""

from __future__ import annotations

import jax.numpy as jnp

from curvjax._src import primitives
from curvjax._src.rules import bilinear, generic


def fast_rule(tap):
    """The tap's fast rule if its primitive has one that applies to it, else ``None``."""
    rule = primitives.lookup(tap.eqn).rule
    return rule if rule is not None and rule.applies(tap) else None


def has_bilinear_form(tap) -> bool:
    return fast_rule(tap) is not None


def bilinear_form(tap, acts, cots) -> bilinear.Form:
    """The tap's bilinear form; ``cots`` carry a column axis: ``[N, M, ...]``."""
    a, b, to_param = fast_rule(tap).form(tap, acts, cots)
    # sums over examples and positions accumulate in at least float32 (bfloat16 models)
    wide = jnp.promote_types(jnp.promote_types(a.dtype, b.dtype), jnp.float32)
    return bilinear.Form(a.astype(wide), b.astype(wide), to_param)


def param_grads(tap, statics, acts, cots) -> tuple:
    """Per-example gradients ``[N, *θ̃.shape]`` of each parameter input (one vector per example)."""
    if has_bilinear_form(tap):
        cols = tuple(None if c is None else c[:, None] for c in cots)
        return (bilinear.per_example_grads(bilinear_form(tap, acts, cols)),)
    return generic.param_grads(tap, statics, acts, cots)
