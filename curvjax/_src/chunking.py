"""Bounded-memory evaluation over the example axis.

Quantities such as ``Σ_n g_n²`` for weight-shared layers need each example's gradient ``g_n``
(``D`` numbers). Evaluating all ``N`` at once costs ``N × D`` memory; these helpers evaluate a
chunk of examples at a time so that a chunk holds about :data:`BUDGET` numbers.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

BUDGET = 1 << 22  # elements held at once per chunk of examples (16 MiB in float32)
COLUMN_BUDGET = 1 << 25  # elements of cotangents held per chunk of backpropagated vectors
COLUMN_BUDGET_MAX = 1 << 27  # ... at most, when chunks are enlarged to be fewer (512 MiB float32)
FEW_CHUNKS = (
    4  # enlarge column chunks (up to COLUMN_BUDGET_MAX) so that there are at most this many
)
MAX_UNROLLED = 48  # more chunks than this run as a loop even when unrolling is asked for


def chunk_size(num_rows: int, per_row_size: int, budget: int | None = None) -> int:
    """Rows per chunk so that ``chunk × per_row_size ≲ budget`` (default :data:`BUDGET`), balanced
    over the fewest chunks."""
    budget = BUDGET if budget is None else budget
    most = max(1, min(num_rows, budget // max(1, per_row_size)))
    num_chunks = -(-num_rows // most)
    return -(-num_rows // num_chunks)


def column_chunk_size(num_vectors: int, per_vector_size: int) -> int:
    """Backpropagated vectors per chunk: :data:`COLUMN_BUDGET` elements each, but enlarged (up to
    :data:`COLUMN_BUDGET_MAX`) so that there are at most :data:`FEW_CHUNKS` chunks.

    Chunks are unrolled (see :func:`chunked_sum`), and XLA's compile time grows with their number:
    on DeepOBS 3c3d with 100 classes, 15 chunks of 7 columns compile in 15.6 s, 4 chunks of 25 in
    4.3 s, at the same steady-state time (4.57 s vs 4.25 s; load 1.7). With few vectors the small
    chunks stay (at 10 classes, 2 chunks of 5 columns run 10 % faster than one of 10).
    """
    small = chunk_size(num_vectors, per_vector_size, budget=COLUMN_BUDGET)
    if -(-num_vectors // small) <= FEW_CHUNKS:
        return small
    largest = max(1, COLUMN_BUDGET_MAX // max(1, per_vector_size))
    chunk = max(small, min(-(-num_vectors // FEW_CHUNKS), largest))
    num_chunks = -(-num_vectors // chunk)
    return -(-num_vectors // num_chunks)


def _split(xs, chunk: int):
    n = jax.tree.leaves(xs)[0].shape[0]
    num_chunks = -(-n // chunk)
    pad = num_chunks * chunk - n

    def split(x):
        if pad:
            x = jnp.concatenate([x, jnp.zeros((pad, *x.shape[1:]), x.dtype)])
        return x.reshape(num_chunks, chunk, *x.shape[1:])

    return jax.tree.map(split, xs), num_chunks, pad


def chunked_sum(fn, xs, chunk: int, *, unrolled: bool = False):
    """``fn(xs)`` for a function that sums over the leading axis, evaluated ``chunk`` rows at a time.

    ``fn`` must map zero rows to zero (padding rows are zeros). By default the chunks are the steps
    of a ``lax.scan``; ``unrolled=True`` writes one copy of ``fn`` per chunk instead (no padding),
    each made to wait for the previous one so that only one chunk's temporaries are live. XLA's
    CPU backend runs convolutions and matrix products inside loops with slower kernels than
    outside them, so the backpropagation of many vectors is unrolled, at some cost in compile
    time; beyond :data:`MAX_UNROLLED` chunks the loop is kept to bound that cost.
    """
    n = jax.tree.leaves(xs)[0].shape[0]
    if chunk >= n:
        return fn(xs)
    num_chunks = -(-n // chunk)
    if unrolled and num_chunks <= MAX_UNROLLED:
        bounds = [n * c // num_chunks for c in range(num_chunks + 1)]
        total = None
        for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
            rows = jax.tree.map(lambda x, lo=lo, hi=hi: x[lo:hi], xs)
            if total is not None:
                rows = _after(rows, total)
            part = fn(rows)
            total = part if total is None else jax.tree.map(jnp.add, total, part)
        return total
    chunks, _, _ = _split(xs, chunk)
    first = jax.tree.map(lambda x: x[0], chunks)
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(fn, first))

    def body(total, x):
        return jax.tree.map(jnp.add, total, fn(x)), None

    total, _ = jax.lax.scan(body, zeros, chunks)
    return total


def _after(xs, done):
    """``xs`` made to depend on ``done``, so that XLA schedules what uses ``xs`` after ``done``.

    (``optimization_barrier`` does not order independent work on XLA's CPU backend.) Adds
    ``0 × (an element of done)``, which XLA keeps (it is NaN, not 0, when that element is not
    finite -- and then the sum is not finite either).
    """
    leaves = [a for a in jax.tree.leaves(done) if a.size]
    if not leaves:
        return xs
    zero = 0 * min(leaves, key=lambda a: a.size).ravel()[0]
    return jax.tree.map(
        lambda x: x + zero.astype(x.dtype) if jnp.issubdtype(x.dtype, jnp.inexact) else x, xs
    )


def chunked_map(fn, xs, chunk: int):
    """``fn(xs)`` for a function that maps rows to rows, evaluated ``chunk`` rows at a time."""
    n = jax.tree.leaves(xs)[0].shape[0]
    if chunk >= n:
        return fn(xs)
    chunks, _, _ = _split(xs, chunk)
    out = jax.lax.map(fn, chunks)
    return jax.tree.map(lambda y: y.reshape(-1, *y.shape[2:])[:n], out)
