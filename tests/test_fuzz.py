"""Property-based tests: random models from a small grammar, every quantity against float64.

``tests/fuzz_models.py`` draws a model (dense, 1-D / 2-D convolutions with random strides, padding,
dilation and groups, nonlinearities, residual adds, concatenation, reshapes and transposes,
LayerNorm, pooling, attention, embedding gathers, tied weights, nested ``jit`` / ``checkpoint`` /
``custom_jvp``) × loss × reduction, and ``fuzz_models.check`` compares per-example gradients,
``batch_l2``, ``variance``, ``ggn_diag`` and ``clipped_grad`` with ``vmap(grad)`` and the dense
GGN, checks that ``kflr`` / ``kfac`` are finite, symmetric and PSD, and that the exact
``hessian_diag`` equals ``diag(jax.hessian)`` or refuses with its ``ValueError``. Tolerances:
``fuzz_models.RTOL`` (1e-9 relative, float64; justified there).

This is the CI-sized run (derandomized, a few models); ``benchmarks/fuzz.py`` is the long run.
"""

from __future__ import annotations

import collections

import fuzz_models
from hypothesis import HealthCheck, given, settings

#: The CI-sized run: about a minute on a busy 2-core machine (compilation dominates: each model
#: compiles every quantity and its references once).
CI_EXAMPLES = 4


@settings(
    max_examples=CI_EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(fuzz_models.specs(min_layers=2, max_layers=3))
def test_every_quantity_matches_its_reference(spec):
    fuzz_models.check(spec)


def test_the_grammar_produces_every_production():
    """The strategy (not building anything) reaches every production of the grammar."""
    counts: collections.Counter = collections.Counter()

    @settings(max_examples=400, deadline=None, derandomize=True, database=None)
    @given(fuzz_models.specs())
    def draw(spec):
        counts.update(fuzz_models.productions(spec))

    draw()
    expected = {
        *(f"input:{k}" for k in ("vec", "seq", "img", "tokens")),
        *(f"loss:{k}" for k in fuzz_models.LOSSES),
        *(f"reduction:{k}" for k in fuzz_models.REDUCTIONS),
        *(f"activation:{k}" for k in fuzz_models.ACTIVATIONS),
        *(
            f"layer:{k}"
            for k in (
                "dense",
                "act",
                "conv",
                "residual",
                "concat",
                "layernorm",
                "pool",
                "attention",
                "transpose",
                "reshape",
                "tied",
                "custom_jvp_dense",
                "wrap",
            )
        ),
        "conv:1d",
        "conv:2d",
        "conv:strided",
        "conv:dilated",
        "conv:grouped",
        "conv:padding:SAME",
        "conv:padding:VALID",
        "conv:padding:explicit",
        "pool:avg",
        "pool:max",
        "wrap:jit",
        "wrap:remat",
        "head:tied_embed",
        "head:dense:mean",
        "head:dense:flatten",
    }
    assert expected <= set(counts), sorted(expected - set(counts))


@given(fuzz_models.specs())
@settings(max_examples=30, deadline=None, derandomize=True, database=None)
def test_shapes_are_consistent(spec):
    """The shape bookkeeping of the grammar agrees with what the built model computes."""
    import jax

    apply_fn, params, (inputs, targets), num_classes = fuzz_models.build(spec)
    out = jax.eval_shape(apply_fn, params, inputs)
    assert out.shape == (fuzz_models.N, num_classes)
