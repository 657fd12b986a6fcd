"""Quantities of taps whose per-example gradient is bilinear in (activation, cotangent).

Dense and convolution taps (after patch extraction) share one canonical form: per example
``A_n`` of shape ``[G, T, I]`` and ``B_{n,m}`` of shape ``[G, T, O]`` for ``M`` backpropagated
vectors ``m``, with the gradient ``g_{n,m}[g, i, o] = Σ_t A_n[g, t, i] B_{n,m}[g, t, o]``.
``T`` counts the positions over which the weight is shared (1 for a plain dense layer).

* ``T = 1``: ``||g_n||² = ||a_n||² ||b_n||²`` and ``Σ_n g_n² = (a²)ᵀ (b²)`` without forming ``g_n``.
* ``T > 1``: the squared norm by the Gram ("ghost norm") identity
  ``||g_n||² = Σ_{t,s} (a_t·a_s)(b_t·b_s)`` or by forming ``g_n``, whichever costs fewer flops;
  ``Σ_n g_n²`` by forming ``g_n`` a chunk of examples at a time.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from curvjax._src import chunking


class Form(NamedTuple):
    """A tap's per-example gradient as a bilinear form (``curvjax.BilinearForm``).

    For ``N`` examples, ``G`` feature groups, ``T`` positions sharing the weight, ``I`` input and
    ``O`` output features, and ``M`` backpropagated vectors per example:

    .. math::
        g_{n,m}[g, i, o] = \\sum_t a[n, g, t, i] \\, b[n, m, g, t, o] .

    Attributes:
      a: ``[N, G, T, I]`` activations (patches for convolutions).
      b: ``[N, M, G, T, O]`` output cotangents.
      to_param: maps an array ``[..., G, I, O]`` in canonical order to ``[..., *param.shape]``.
    """

    a: jax.Array  # [N, G, T, I] activations
    b: jax.Array  # [N, M, G, T, O] output cotangents, M backpropagated vectors per example
    to_param: Callable[[jax.Array], jax.Array]  # [..., G, I, O] -> [..., *param.shape]

    @property
    def shared_positions(self) -> int:
        return self.a.shape[2]


def per_example_grads(form: Form) -> jax.Array:
    """``g_n`` for the first backpropagated vector: ``[N, *param.shape]``."""
    g = jnp.einsum("ngti,ngto->ngio", form.a, form.b[:, 0])
    return form.to_param(g)


def sum_sq(form: Form, weights: jax.Array | None = None) -> jax.Array:
    """``Σ_n Σ_m w_{n,m} g_{n,m}²`` elementwise (``w = 1`` by default): ``param.shape``."""
    a, b = form.a, form.b
    n, g, t, i = a.shape
    m, o = b.shape[1], b.shape[-1]
    if weights is None:
        weights = jnp.ones((n, m), b.dtype)
    if t == 1:
        b2 = jnp.einsum("nm,nmgo->ngo", weights, b[:, :, :, 0] ** 2)
        return form.to_param(jnp.einsum("ngi,ngo->gio", a[:, :, 0] ** 2, b2))

    def direct(abw):
        a, b, w = abw
        rows = a.shape[0]
        # g_{n,m} √|w_{n,m}| = A_nᵀ (B_{n,m} √|w_{n,m}|): the weight's root rides on B, its sign is
        # applied to the squares; operands laid out [N·G, T, ...] so that the CPU dot needs no
        # transposing copy of the contraction axis T
        b = b * jnp.sqrt(jnp.abs(w)).astype(b.dtype)[:, :, None, None, None]
        b = b.transpose(0, 2, 3, 1, 4).reshape(rows * g, t, m * o)
        grads = jax.lax.dot_general(a.reshape(rows * g, t, i), b, (((1,), (1,)), ((0,), (0,))))
        squares = grads.reshape(rows, g, i, m, o) ** 2  # [N, G, I, M, O]
        return jnp.einsum("nm,ngimo->gio", jnp.sign(w).astype(b.dtype), squares)

    chunk = chunking.chunk_size(n, m * g * i * o)
    return form.to_param(chunking.chunked_sum(direct, (a, b, weights), chunk))
