"""Chunked evaluation (curvjax._src.chunking) with budgets small enough to force many chunks.

The zoo's models are small enough that every quantity is normally computed in one chunk; here the
budgets are set to one element, so that the columns of the loss-Hessian factor are backpropagated
one per chunk (unrolled, or as a loop past ``MAX_UNROLLED`` chunks) and the rules form per-example
gradients one example at a time. The results must still equal the dense float64 references
(``jax.jacobian`` GGN; ``vmap(grad)``).
"""

import jax
import models
import numpy as np
import pytest
import reference
from helpers import assert_tree_close

import curvjax
from curvjax._src import chunking

#: max-pool, stride-2 SAME convolution, bias: every column-chunked path of the rules is used
CASE = "cnn_stride2_same"


def test_column_chunks_are_few_and_bounded(monkeypatch):
    monkeypatch.setattr(chunking, "COLUMN_BUDGET", 10)
    monkeypatch.setattr(chunking, "COLUMN_BUDGET_MAX", 40)
    monkeypatch.setattr(chunking, "FEW_CHUNKS", 4)
    assert chunking.column_chunk_size(8, 5) == 2  # 4 chunks of the small budget: kept
    assert chunking.column_chunk_size(16, 5) == 4  # 8 small chunks -> 4 larger ones
    assert chunking.column_chunk_size(100, 5) == 8  # capped by the largest budget (13 chunks)
    assert chunking.column_chunk_size(3, 50) == 1  # a vector larger than any budget: one each


@pytest.mark.parametrize("mode", ["unrolled", "loop"])
def test_chunked_columns_and_examples_match_references(monkeypatch, mode):
    case = models.get_case(CASE)
    batch = models.make_batch(case, "cross_entropy")
    monkeypatch.setattr(chunking, "COLUMN_BUDGET", 1)
    monkeypatch.setattr(chunking, "COLUMN_BUDGET_MAX", 1)
    monkeypatch.setattr(chunking, "BUDGET", 1)
    if mode == "loop":
        monkeypatch.setattr(chunking, "MAX_UNROLLED", 1)

    def ours(params, batch):
        return curvjax.extract(
            case.apply_fn, params, batch, ["ggn_diag", "sum_grad_squared", "kflr"]
        )

    got = jax.jit(ours, compiler_options=reference.FAST_COMPILE)(case.params, batch)
    assert_tree_close(
        got["ggn_diag"],
        reference.ggn_diag(case.apply_fn, case.params, batch),
        case.params,
        what="ggn_diag",
    )
    per_example = reference.per_example_grads(case.apply_fn, case.params, batch)
    assert_tree_close(
        got["sum_grad_squared"],
        jax.tree.map(lambda g: np.sum(np.asarray(g) ** 2, axis=0), per_example),
        case.params,
        what="sum_grad_squared",
    )
    # KFLR's output factor of the last (dense) layer, whose output cotangents are the columns
    # themselves: B = κ Σ_n S_n S_nᵀ = κ Σ_n ∇²_f ℓ_n, from the loss Hessians of the outputs
    last = got["kflr"]["params"]["Dense_0"]["kernel"]
    hessians = reference.loss_hessians(case.apply_fn, case.params, batch)
    expected = np.sum(np.asarray(hessians), axis=0) / hessians.shape[0]  # mean reduction
    np.testing.assert_allclose(last.b[0], expected, rtol=1e-10, atol=1e-14)
