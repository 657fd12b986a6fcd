"""Every model of the zoo, both losses, both reductions, under jax.jit: the first-order quantities
and the exact GGN diagonal equal independent float64 references (vmap(grad), jax.jacobian).

One compiled program per case computes all four (loss, reduction) pairings, and one computes the
references: compilation dominates the cost of these tiny models on CI's 2 cores.
"""

import jax
import jax.numpy as jnp
import models
import numpy as np
import pytest
import reference
from helpers import assert_tree_close

import curvjax

QUANTITIES = ["per_example_grads", "batch_l2", "sum_grad_squared", "variance", "ggn_diag"]
PAIRINGS = [(loss, reduction) for loss in models.LOSSES for reduction in models.REDUCTIONS]
CASES = [name for name, tags in models.TAGS.items() if "mixes_examples" not in tags]


def _ours(case, batches):
    def fn(params, batches):
        return [
            curvjax.extract(
                case.apply_fn, params, batches[loss], QUANTITIES, loss=loss, reduction=reduction
            )
            for loss, reduction in PAIRINGS
        ]

    return jax.jit(fn, compiler_options=reference.FAST_COMPILE)(case.params, batches)


def _references(case, batches):
    def fn(params, batches):
        out = []
        for loss, reduction in PAIRINGS:
            args = (case.apply_fn, params, batches[loss], loss, reduction)
            pe = reference.per_example_grads(*args)
            out.append(
                {
                    "loss": reference.reduced_loss(*args),
                    "grad": reference.grad(*args),
                    "per_example_grads": pe,
                    "batch_l2": jax.tree.map(
                        lambda a: jnp.sum(a.reshape(a.shape[0], -1) ** 2, 1), pe
                    ),
                    "sum_grad_squared": jax.tree.map(lambda a: jnp.sum(a**2, 0), pe),
                    "variance": jax.tree.map(lambda a: jnp.mean(a**2, 0) - jnp.mean(a, 0) ** 2, pe),
                    "ggn_diag": reference.ggn_diag(*args),
                }
            )
        return out

    return jax.jit(fn, compiler_options=reference.FAST_COMPILE)(case.params, batches)


@pytest.mark.parametrize("name", CASES)
def test_quantities_match_references(name):
    case = models.get_case(name)
    batches = {loss: models.make_batch(case, loss) for loss in models.LOSSES}
    for (loss, reduction), got, want in zip(
        PAIRINGS, _ours(case, batches), _references(case, batches), strict=True
    ):
        np.testing.assert_allclose(got["loss"], want["loss"], rtol=1e-12)
        for key in ["grad", *QUANTITIES]:
            assert_tree_close(
                got[key], want[key], case.params, what=f"{name}/{loss}/{reduction}/{key}"
            )
