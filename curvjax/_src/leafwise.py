"""From tap-level quantities to quantities per parameter leaf.

A leaf is *fast* when exactly one tap consumes it, through a pure relayout (reshape, transpose,
dtype conversion), and that tap has a bilinear rule (dense, convolution): its squared norms and
second moments come from the rule without forming per-example gradients. Every other leaf
(biases and scales seen by elementwise taps, embeddings, tied weights used by several taps,
parameters transformed before use) is *slow*: its per-example gradients are formed exactly -- the
VJP of each tap's own equation, pushed back through the parameter-side computation -- a chunk of
examples at a time. Squared norms (:func:`sq_norms`) go further: a leaf that several bilinear taps
consume, each through a relayout of it alone (tied weights), needs no per-example gradients either.

``cols`` arguments map tap ids to output cotangents with a column axis ``[N, M, *shape]``: the
``M`` backpropagated vectors of each example (``M = 1`` for the loss gradient, ``M = C`` for the
columns of the loss-Hessian factor).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from curvjax._src import chunking, rules
from curvjax._src.backprop import Pass
from curvjax._src.rules import bilinear, generic


def fast_tap_of(model, k: int):
    """The single tap with a fast rule that consumes float leaf ``k`` through a relayout, or None."""
    taps = model.taps_of_leaf[k]
    if len(taps) == 1 and taps[0].chain_leaf == k and rules.has_bilinear_form(taps[0]):
        return taps[0]
    return None


def fast_taps_of(model) -> dict:
    """Float leaf index -> the single tap with a fast rule that consumes it through a relayout."""
    fast = {k: fast_tap_of(model, k) for k in range(len(model.float_index))}
    return {k: tap for k, tap in fast.items() if tap is not None}


def _split_leaves(p: Pass) -> tuple[dict, list[int]]:
    fast = fast_taps_of(p.model)
    slow = [k for k in range(len(p.model.float_index)) if k not in fast and p.model.taps_of_leaf[k]]
    return fast, slow


def block_layout(model, leaf_ndims) -> tuple[dict, list[int], list[int]]:
    """Which float leaves get Kronecker, full and diagonal curvature blocks.

    Kronecker: the kernel of a single tap with a fast rule (``{leaf: tap}``); full: other leaves of
    at most one dimension that some tap consumes (biases, normalisation scales); diagonal: the
    rest (embeddings, tied or transformed weights, leaves no tap consumes).
    """
    fast = fast_taps_of(model)
    rest = [k for k in range(len(model.float_index)) if k not in fast]
    full = [k for k in rest if leaf_ndims[k] <= 1 and model.taps_of_leaf[k]]
    diag = [k for k in rest if k not in full]
    return fast, full, diag


def _param_side(p: Pass, taps, leaf_ids):
    """``(values, vjp)`` of the parameter inputs of ``taps`` as a function of leaves ``leaf_ids``."""
    base = p.model.float_leaves(p.params)

    def fn(chosen):
        leaves = list(base)
        for k, value in zip(leaf_ids, chosen, strict=True):
            leaves[k] = value
        statics = p.model.static_values(p.model.merge(p.params, leaves))
        return {
            t.id: tuple(
                statics[("tap", t.id)][t.static_positions.index(q)] for q in t.param_positions
            )
            for t in taps
        }

    values, vjp = jax.vjp(fn, [base[k] for k in leaf_ids])

    def pull_back(cotangents):
        # quantities are accumulated in at least float32; a parameter input of lower precision
        # (a leaf cast to bfloat16 inside the model) receives them rounded to its own dtype
        return vjp(jax.tree.map(lambda c, v: c.astype(v.dtype), cotangents, values))

    return values, pull_back


def exact_digits(size: int, dtypes) -> tuple[list[np.ndarray], int]:
    """``(digits, base)`` of the positions ``0 … size-1``, each digit exactly representable in
    every dtype of ``dtypes`` (``position = Σ_j digits[j] base^j``).

    Pulling positions back through a relayout of a parameter tells where each entry goes; the
    positions travel as floats of the parameter's dtype, so they are split into digits small
    enough for it (4096 for float32 and wider, 256 for bfloat16).
    """
    bits = min(int(jnp.finfo(d).nmant) + 1 for d in dtypes)
    base = 2 ** min(bits, 12)
    positions = np.arange(size)
    digits = [positions % base]
    rest = positions // base
    while np.any(rest):
        digits.append(rest % base)
        rest = rest // base
    return digits, base


def layout_dtypes(p: Pass, tap, k: int, values) -> list:
    """Every dtype that positions pulled back from ``tap``'s parameter inputs to leaf ``k`` pass
    through: the outputs', the parameter inputs' and the leaf's own."""
    leaf = p.model.float_leaves(p.params)[k]
    return [p.outputs.dtype, *(v.dtype for v in values[tap.id]), jnp.result_type(leaf)]


def from_digits(parts: list[np.ndarray], base: int) -> np.ndarray:
    """The positions whose digits (see :func:`exact_digits`) are ``parts`` (floats, rounded)."""
    total = np.zeros(np.shape(parts[0]), np.int64)
    for j, part in enumerate(parts):
        total = total + np.round(part).astype(np.int64) * base**j
    return total


def _to_leaf(p: Pass, tap, k: int, value, batched: bool):
    """Map a quantity in the layout of ``tap``'s parameter input back to leaf ``k``'s layout."""
    _, vjp = _param_side(p, [tap], [k])

    def one(v):
        return vjp({tap.id: (v,)})[0][0]

    return jax.vmap(one)(value) if batched else one(value)


def _slow_grads_fn(p: Pass, slow: list[int]):
    """Per-example gradients of the slow leaves, for one example and ``M`` vectors."""
    taps = sorted({t.id: t for k in slow for t in p.model.taps_of_leaf[k]}.values(), key=_tap_id)
    _, vjp = _param_side(p, taps, slow)

    def one(acts_n, cols_n, direct_n=None):  # cols_n: tap id -> [M, *shape]
        def one_column(cots_nm, direct_nm):
            tap_grads = {
                t.id: generic.param_grad_one(t, p.statics[t.id], acts_n[t.id], cots_nm[t.id])
                for t in taps
            }
            for tap_id, extra in direct_nm.items():  # tied taps: (grad of θ̃,) + direct part
                tap_grads[tap_id] = (tap_grads[tap_id][0] + extra,)
            return vjp(tap_grads)[0]

        cols_n = {t.id: cols_n[t.id] for t in taps}
        # list over slow leaves of [M, *leaf.shape]
        return jax.vmap(one_column)(cols_n, {} if direct_n is None else direct_n)

    acts = {t.id: p.acts[t.id] for t in taps}
    return one, acts


def _wide(x: jax.Array) -> jax.Array:
    """``x`` in at least float32, so that squares and sums over examples of a bfloat16 model's
    per-example gradients accumulate in float32."""
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _tap_id(tap) -> int:
    return tap.id


def _slow_size(p: Pass, slow: list[int], m: int) -> int:
    leaves = p.model.float_leaves(p.params)
    return m * sum(int(np.prod(jnp.shape(leaves[k]))) for k in slow)


def per_example_grads(p: Pass) -> list:
    """``g_n`` for every float leaf: ``[N, *leaf.shape]``."""
    leaf_ids = list(range(len(p.model.float_index)))
    _, vjp = _param_side(p, p.model.taps, leaf_ids)
    tap_grads = {
        t.id: rules.param_grads(t, p.statics[t.id], p.acts[t.id], p.cots[t.id])
        for t in p.model.taps
    }
    return jax.vmap(lambda g: vjp(g)[0])(tap_grads)


def weighted_grad_sums(p: Pass, scales: list, group_of_leaf: list[int], skip=()) -> list:
    """``Σ_n s_{n,γ(k)} g_{n,k}`` for every float leaf ``k``, without forming ``g_n``.

    Each tap contracts its stored activations and scaled cotangents over the examples once per
    group among its leaves (:func:`~curvjax._src.rules.generic.weighted_param_grad_sum`); the
    parameter-side computation, linear in the taps' parameter gradients and shared by all
    examples, is then pulled back once per group.

    Args:
      scales: one ``[N]`` array ``s_{n,γ}`` per group ``γ``.
      group_of_leaf: the group of each float leaf.
      skip: float leaves the caller sums otherwise (they get zeros); taps that consume only
        those leaves are not contracted.
    """
    leaves = p.model.float_leaves(p.params)
    result = [jnp.zeros_like(leaf) for leaf in leaves]
    taps = [t for t in p.model.taps if t.leaves and not t.leaves <= set(skip)]
    if not taps:
        return result
    _, vjp = _param_side(p, taps, list(range(len(leaves))))
    for group in sorted({group_of_leaf[k] for t in taps for k in t.leaves}):
        members = {t.id for t in taps if any(group_of_leaf[k] == group for k in t.leaves)}
        tap_grads = {}
        for t in taps:
            if t.id in members:
                tap_grads[t.id] = generic.weighted_param_grad_sum(
                    t, p.statics[t.id], p.acts[t.id], p.cots[t.id], scales[group]
                )
            else:
                tap_grads[t.id] = tuple(
                    jnp.zeros_like(p.statics[t.id][t.static_positions.index(q)])
                    for q in t.param_positions
                )
        pulled = vjp(tap_grads)[0]
        for k in range(len(leaves)):
            if group_of_leaf[k] == group and k not in skip:
                result[k] = pulled[k]
    return result


def norm_method(t: int, i: int, o: int) -> str:
    """How :func:`sq_norms` evaluates ``||Σ_t a_t b_tᵀ||²`` for ``a_t [I]``, ``b_t [O]``, ``T`` terms.

    ``"outer"`` for ``T = 1`` (``||a||² ||b||²``); otherwise the cheaper in flops, per example, of
    ``"gram"`` (``Σ_{t,s} (a_t·a_s)(b_t·b_s)``: ``T²(I + O)``) and ``"direct"`` (form the
    ``I × O`` gradient and square it: ``T I O + I O``), the mixed ghost norm of Bu et al. (2022).
    """
    if t == 1:
        return "outer"
    return "gram" if t * t * (i + o) <= t * i * o + i * o else "direct"


def _norm_forms(p: Pass, cols: dict) -> tuple[dict, list[int]]:
    """Leaves whose per-example gradient is one bilinear form, and the others.

    Returns ``({leaf: (a [N, G, T, I], b [N, G, T, O])}, slow leaves)`` with
    ``g_n = Σ_t a[n, :, t] ⊗ b[n, :, t]`` in a fixed relayout of the leaf. A leaf consumed by
    several bilinear taps (tied weights), each through a relayout of that leaf alone, gets the
    positions of all its uses concatenated (``g_n`` is the sum over uses); a use that reads the
    leaf transposed (``x W`` and ``h Wᵀ``) enters with ``a`` and ``b`` swapped. Any other use
    makes the leaf slow (per-example gradients formed a chunk of examples at a time).
    """
    forms, slow = {}, []
    for k, taps in enumerate(p.model.taps_of_leaf):
        if not taps:
            continue
        if not all(t.chain_leaf == k and rules.has_bilinear_form(t) for t in taps):
            slow.append(k)
            continue
        parts = [rules.bilinear_form(t, p.acts[t.id], cols[t.id]) for t in taps]
        if len(parts) == 1:
            forms[k] = (parts[0].a, parts[0].b[:, 0])
            continue
        combined = _tied_parts(p, k, taps, parts)
        if combined is None:
            slow.append(k)
        else:
            forms[k] = combined
    return forms, slow


def _tied_parts(p: Pass, k: int, taps, parts):
    """``(a, b)`` concatenated over the uses of tied leaf ``k``, or None if their layouts differ."""
    first = parts[0]
    g, i, o = first.a.shape[1], first.a.shape[3], first.b.shape[-1]
    reference = canonical_index(p, taps[0], k, first)
    # a transposed use's canonical position (g, o', i') -> the first use's position (g, i', o')
    swapped = np.arange(g * i * o).reshape(g, i, o).transpose(0, 2, 1).ravel()
    a_parts, b_parts = [], []
    for tap, form in zip(taps, parts, strict=True):
        a, b = form.a, form.b[:, 0]
        shape = (a.shape[1], a.shape[3], b.shape[-1])
        index = canonical_index(p, tap, k, form)
        if shape == (g, i, o) and np.array_equal(index, reference):
            pass
        elif shape == (g, o, i) and np.array_equal(swapped[index], reference):
            a, b = b, a  # this use reads the leaf transposed: g = Σ_t b_t a_tᵀ
        else:
            return None
        a_parts.append(a)
        b_parts.append(b)
    return jnp.concatenate(a_parts, axis=2), jnp.concatenate(b_parts, axis=2)


def _form_sq_norms(a, b) -> jax.Array:
    """``||Σ_t a[n, g, t] ⊗ b[n, g, t]||²`` summed over ``g``: ``[N]`` (see :func:`norm_method`)."""
    n, g, t, i = a.shape
    o = b.shape[-1]
    method = norm_method(t, i, o)
    if method == "outer":
        return jnp.sum(jnp.sum(a[:, :, 0] ** 2, -1) * jnp.sum(b[:, :, 0] ** 2, -1), axis=1)
    if method == "gram":

        def gram(ab):
            gram_a = jnp.einsum("ngti,ngsi->ngts", ab[0], ab[0])
            gram_b = jnp.einsum("ngto,ngso->ngts", ab[1], ab[1])
            return jnp.sum(gram_a * gram_b, axis=(1, 2, 3))

        return chunking.chunked_map(gram, (a, b), chunking.chunk_size(n, 2 * g * t * t))

    def direct(ab):
        grads = jnp.einsum("ngti,ngto->ngio", *ab)
        return jnp.sum(grads**2, axis=(1, 2, 3))

    return chunking.chunked_map(direct, (a, b), chunking.chunk_size(n, g * i * o))


def sq_norm_methods(p: Pass) -> dict:
    """Float leaf index -> how :func:`sq_norms` computes its norms: ``"outer"``, ``"gram"``,
    ``"direct"`` (one bilinear form, see :func:`norm_method`) or ``"per_example"`` (per-example
    gradients formed a chunk of examples at a time)."""
    forms, slow = _norm_forms(p, p.columns_of_gradient())
    methods = {k: norm_method(a.shape[2], a.shape[3], b.shape[-1]) for k, (a, b) in forms.items()}
    return methods | {k: "per_example" for k in slow}


def sq_norms(p: Pass) -> list:
    """``||g_n||²`` for every float leaf: ``[N]``.

    Leaves used by bilinear taps only (dense, convolution; tied uses included) never form ``g_n``
    for all examples at once: per leaf the cheaper of the Gram identity and a chunked
    materialisation (:func:`norm_method`). Other leaves form ``g_n`` a chunk of examples at a time.
    """
    return _sq_norms(p, keep=False)[0]


def sq_norms_keeping(p: Pass) -> tuple[list, dict]:
    """:func:`sq_norms`, keeping the per-example gradients it forms where they are small.

    A leaf of one bilinear tap whose norms are computed by forming ``g_n`` (``"direct"``) keeps
    them when they take no more memory than the tap's stored activations and cotangents
    (``I O ≤ T (I + O)`` per group): a weighted sum of them then costs ``N I O`` instead of the
    ``N T I O`` of contracting ``a`` and ``b`` again (Bu et al.'s mixed book-keeping).

    Returns:
      ``(norms, kept)``, ``kept`` mapping a float leaf index to ``(tap, to_param, g [N, G, I, O])``
      with ``g`` in the tap's canonical layout.
    """
    return _sq_norms(p, keep=True)


def kept_weighted_sum(p: Pass, k: int, kept, scale) -> jax.Array:
    """``Σ_n s_n g_{n,k}`` in leaf ``k``'s layout, from :func:`sq_norms_keeping`'s ``kept[k]``."""
    tap, to_param, grads = kept
    total = jnp.einsum("n,ngio->gio", scale.astype(grads.dtype), grads)
    return _to_leaf(p, tap, k, to_param(total), batched=False)


def _sq_norms(p: Pass, keep: bool) -> tuple[list, dict]:
    n = p.model.num_examples
    dtype = p.outputs.dtype
    result = [jnp.zeros((n,), dtype) for _ in p.model.float_index]
    kept = {}
    cols = p.columns_of_gradient()
    forms, slow = _norm_forms(p, cols)
    for k, (a, b) in forms.items():
        _, g, t, i = a.shape
        o = b.shape[-1]
        taps = p.model.taps_of_leaf[k]
        if keep and len(taps) == 1 and norm_method(t, i, o) == "direct" and i * o <= t * (i + o):
            grads = jnp.einsum("ngti,ngto->ngio", a, b)
            result[k] = jnp.sum(grads**2, axis=(1, 2, 3))
            form = rules.bilinear_form(taps[0], p.acts[taps[0].id], cols[taps[0].id])
            kept[k] = (taps[0], form.to_param, grads)
        else:
            result[k] = _form_sq_norms(a, b)
    if slow:
        one, acts = _slow_grads_fn(p, slow)

        def norms(xs):
            grads = [_wide(g) for g in jax.vmap(one)(*xs)]
            return [jnp.sum(g**2, axis=tuple(range(1, g.ndim))) for g in grads]

        chunk = chunking.chunk_size(n, _slow_size(p, slow, 1))
        slow_cols = {t: c for t, c in cols.items() if t in acts}
        values = chunking.chunked_map(norms, (acts, slow_cols), chunk)
        for k, value in zip(slow, values, strict=True):
            result[k] = value
    return result, kept


def sum_sq(p: Pass, cols: dict, weights=None, direct=None, leaf_ids=None) -> list:
    """``Σ_n Σ_m w_{n,m} g_{n,m}²`` elementwise for every float leaf, for the vectors ``cols``.

    ``weights`` ``[N, M]`` (default all ones) carries the signs of Hessian residual columns.
    ``direct`` (optional) maps the id of a tap with one parameter input ``θ̃`` to cotangents
    ``[N, M, *θ̃.shape]`` added to that tap's per-vector gradient with respect to ``θ̃`` before it
    is pulled back to the leaves and squared (the parameter half of a tied tap's residual
    columns); the leaves of those taps form their per-vector gradients. ``leaf_ids`` (optional)
    restricts the work to those float leaves (the others get zeros).
    """
    direct = {} if direct is None else direct
    fast, slow = _split_leaves(p)
    if direct:
        tied = {k for tap_id in direct for k in p.model.taps[tap_id].leaves}
        fast = {k: tap for k, tap in fast.items() if k not in tied}
        slow = sorted(set(slow) | tied)
    if leaf_ids is not None:
        fast = {k: tap for k, tap in fast.items() if k in leaf_ids}
        slow = [k for k in slow if k in leaf_ids]
    direct = {t: d for t, d in direct.items() if p.model.taps[t].leaves & set(slow)}
    leaves = p.model.float_leaves(p.params)
    n = p.model.num_examples
    m = jax.tree.leaves(cols)[0].shape[1]
    if weights is None:
        weights = jnp.ones((n, m), p.outputs.dtype)
    result = [jnp.zeros_like(leaf) for leaf in leaves]
    for k, tap in fast.items():
        form = rules.bilinear_form(tap, p.acts[tap.id], cols[tap.id])
        result[k] = _to_leaf(p, tap, k, bilinear.sum_sq(form, weights), batched=False)
    if slow:
        one, acts = _slow_grads_fn(p, slow)

        def squares(xs):
            acts, cols, w, extra = xs
            grads = [_wide(g) for g in jax.vmap(one)(acts, cols, extra)]
            return [jnp.tensordot(w, g**2, axes=([0, 1], [0, 1])) for g in grads]

        chunk = chunking.chunk_size(n, _slow_size(p, slow, m))
        slow_cols = {t: c for t, c in cols.items() if t in acts}
        values = chunking.chunked_sum(squares, (acts, slow_cols, weights, direct), chunk)
        for k, value in zip(slow, values, strict=True):
            result[k] = value
    return result


def outer_sum(p: Pass, cols: dict, leaf_ids: list[int]) -> list:
    """``Σ_n Σ_m g_{n,m} g_{n,m}ᵀ`` ``[D, D]`` (flattened row-major) for each leaf in ``leaf_ids``."""
    if not leaf_ids:
        return []
    one, acts = _slow_grads_fn(p, leaf_ids)
    n = p.model.num_examples
    m = jax.tree.leaves(cols)[0].shape[1]

    def outers(xs):
        grads = [_wide(g) for g in jax.vmap(one)(*xs)]
        flat = [g.reshape(-1, int(np.prod(g.shape[2:]))) for g in grads]
        return [f.T @ f for f in flat]

    chunk = chunking.chunk_size(n, _slow_size(p, leaf_ids, m))
    slow_cols = {t: c for t, c in cols.items() if t in acts}
    return chunking.chunked_sum(outers, (acts, slow_cols), chunk)


def canonical_index(p: Pass, tap, k: int, form) -> np.ndarray:
    """For each entry of leaf ``k`` (row-major), its position in the tap's canonical ``(G, I, O)``
    (the tap reads the leaf through a relayout, see :func:`pulled_positions`)."""
    g, i, o = form.a.shape[1], form.a.shape[3], form.b.shape[-1]
    return pulled_positions(p, tap, k, (g, i, o), form.to_param)


def pulled_positions(p: Pass, tap, k: int, shape, to_param, slot: int = 0) -> np.ndarray | None:
    """For each entry of leaf ``k`` (row-major), its position in the canonical ``shape`` of
    ``tap``'s parameter operand ``slot``, or ``None`` if the map from leaf to operand is not a
    permutation (a transformed weight).

    The positions themselves are pulled back through ``to_param`` (canonical -> operand layout)
    and the parameter side, split into digits that every dtype on the way represents exactly
    (:func:`exact_digits`). It depends on static shapes only and is evaluated at trace time: the
    result is a numpy array (static layout data).
    """
    size = int(np.prod(shape))
    values, vjp = _param_side(p, [tap], [k])
    dtype = p.outputs.dtype
    digits, base = exact_digits(size, layout_dtypes(p, tap, k, values))
    parts = []
    with jax.ensure_compile_time_eval():
        for part in digits:
            canon = to_param(jnp.asarray(part.reshape(shape), dtype))
            cot = tuple(
                canon.astype(v.dtype) if j == slot else jnp.zeros_like(v)
                for j, v in enumerate(values[tap.id])
            )
            parts.append(np.asarray(vjp({tap.id: cot})[0][0]))
    if parts[0].size != size or not all(np.array_equal(np.round(q), q) for q in parts):
        return None
    index = from_digits(parts, base).ravel()
    if not np.array_equal(np.sort(index), np.arange(size)):
        return None
    return index.astype(np.int32)


def _tap_inner_products(p: Pass, tap, tangents: tuple) -> jax.Array:
    """``⟨u_q, vjp(θ̃ ↦ eqn(θ̃, a_n))(b_n)⟩`` ``[Q, N]`` for tangents ``[Q, *θ̃]`` of the tap's
    parameter inputs ``θ̃``.

    Parameter inputs smaller than the tap's output per example (a bias or a normalisation scale
    broadcast over positions) form their per-example gradients (``N |θ̃|`` numbers) and contract
    them with the tangents in one matrix product; larger ones (a dense kernel) take the
    forward-mode product :func:`~curvjax._src.rules.generic.tangent_inner`, which forms none.
    """
    statics, acts, cots = p.statics[tap.id], p.acts[tap.id], p.cots[tap.id]
    size = sum(int(np.prod(u.shape[1:])) for u in tangents)
    out_size = sum(int(np.prod(c.shape[1:])) for c in cots if c is not None)
    if size >= out_size:
        return jax.vmap(lambda u: generic.tangent_inner(tap, statics, acts, cots, u))(tangents)
    grads = rules.param_grads(tap, statics, acts, cots)  # ([N, *θ̃],)
    n, q = p.model.num_examples, tangents[0].shape[0]
    return sum(
        jnp.einsum("qd,nd->qn", _wide(u).reshape(q, -1), _wide(g).reshape(n, -1))
        for u, g in zip(tangents, grads, strict=True)
    )


def direction_inner_products(p: Pass, directions: list, per_leaf: bool = False):
    """``⟨u_{q,k}, g_{n,k}⟩`` for ``Q`` directions ``u_q`` and every example, without ``[N, D]``.

    ``directions`` holds, per float leaf ``k``, ``[Q, *leaf.shape]`` (or ``None``: zero). The
    directions are pushed forward through the parameter-side computation to the taps' parameter
    inputs (the transpose of its pull-back), and each tap contracts its output tangent in that
    direction with the stored cotangents
    (:func:`~curvjax._src.rules.generic.tangent_inner`; for a dense tap
    ``Σ_t a_{n,t}ᵀ U_q b_{n,t}``): a sum over taps of forward-mode products, ``Q T I O`` per
    example and no gradient formed. A leaf of one bilinear tap whose weight is shared over
    ``T > 1`` positions (convolutions, sequences) with ``(T - 1)(Q - 1) > 1`` instead forms its
    per-example gradient ``G_n = Σ_t a_{n,t} b_{n,t}ᵀ`` a chunk of examples at a time and
    contracts it with the ``U_q`` (``T I O + Q I O`` per example), as :func:`sq_norms` does; so
    do parameter inputs smaller than their tap's output (biases broadcast over positions, see
    :func:`_tap_inner_products`: on 3c3d, 16 directions, the first convolution's bias took 140
    of the 280 ms per batch of 64 as a broadcast product; the batch takes 180 ms without it).

    Returns:
      ``[Q, N]`` (summed over leaves), or with ``per_leaf`` a list over the float leaves of
      ``[Q, N]`` (zeros for leaves without a direction or a tap).
    """
    leaves = p.model.float_leaves(p.params)
    n = p.model.num_examples
    given = [k for k, d in enumerate(directions) if d is not None and p.model.taps_of_leaf[k]]
    q = next(d.shape[0] for d in directions if d is not None)
    dtype = jnp.promote_types(p.outputs.dtype, jnp.float32)
    parts = {}
    cols = p.columns_of_gradient()
    for k in list(given):
        tap = fast_tap_of(p.model, k)
        if tap is None:
            continue
        form = rules.bilinear_form(tap, p.acts[tap.id], cols[tap.id])
        _, g, t, i = form.a.shape
        o = form.b.shape[-1]
        if (t - 1) * (q - 1) <= 1:
            continue
        index = canonical_index(p, tap, k, form)
        flat = directions[k].reshape(q, -1).astype(form.a.dtype)
        canon = jnp.zeros((q, g * i * o), flat.dtype).at[:, index].set(flat).reshape(q, g, i, o)

        def contract(ab, canon=canon):
            grads = jnp.einsum("ngti,ngto->ngio", *ab)
            return jnp.einsum("ngio,qgio->nq", grads, canon)

        chunk = chunking.chunk_size(n, g * i * o + q)
        parts[(k,)] = chunking.chunked_map(contract, (form.a, form.b[:, 0]), chunk).T.astype(dtype)
        given.remove(k)
    groups = [[k] for k in given] if per_leaf else ([given] if given else [])
    for group in groups:
        taps = [t for t in p.model.taps if t.leaves & set(group)]
        values, pull_back = _param_side(p, taps, group)
        spec = jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype), values)
        push_forward = jax.linear_transpose(pull_back, spec)

        def forward(chosen, group=group, push_forward=push_forward):
            cast = [
                c.astype(jnp.result_type(leaves[k])) for k, c in zip(group, chosen, strict=True)
            ]
            (tangents,) = push_forward((cast,))
            return tangents

        tangents = jax.vmap(forward)([directions[k] for k in group])  # tap id -> ([Q, *θ̃],)
        total = jnp.zeros((q, n), dtype)
        for t in taps:
            total = total + _tap_inner_products(p, t, tangents[t.id]).astype(dtype)
        parts[tuple(group)] = total
    if not per_leaf:
        return sum(parts.values(), jnp.zeros((q, n), dtype))
    return [parts.get((k,), jnp.zeros((q, n), dtype)) for k in range(len(leaves))]
