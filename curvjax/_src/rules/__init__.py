"""Per-tap rules, dispatched on the tap's primitive.

Each rule module turns a tap's activation inputs ``a`` and output cotangents ``b`` into the
per-example quantities of its parameter input. ``dense`` and ``conv`` give the canonical bilinear
form of :mod:`curvjax._src.rules.bilinear` (fast norms and second moments without forming
``g_n``); every other primitive uses :mod:`curvjax._src.rules.generic` (its own VJP per example).
Adding a layer kind means adding a module with ``applies`` and ``form`` and one entry in
:data:`BILINEAR`.
"""

from __future__ import annotations

from curvjax._src.rules import bilinear, conv, dense, generic

BILINEAR = {"dot_general": dense, "conv_general_dilated": conv}


def has_bilinear_form(tap) -> bool:
    rule = BILINEAR.get(tap.primitive)
    return rule is not None and rule.applies(tap)


def bilinear_form(tap, acts, cots) -> bilinear.Form:
    """The tap's bilinear form; ``cots`` carry a column axis: ``[N, M, ...]``."""
    return BILINEAR[tap.primitive].form(tap, acts, cots)


def param_grads(tap, statics, acts, cots) -> tuple:
    """Per-example gradients ``[N, *θ̃.shape]`` of each parameter input (one vector per example)."""
    if has_bilinear_form(tap):
        cols = tuple(None if c is None else c[:, None] for c in cots)
        return (bilinear.per_example_grads(bilinear_form(tap, acts, cols)),)
    return generic.param_grads(tap, statics, acts, cots)
