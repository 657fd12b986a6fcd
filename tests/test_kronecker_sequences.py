"""KFAC-expand / KFAC-reduce for weights shared over positions, and tied weights (float64).

References are dense and never call curvjax: the GGN block of one leaf is
``κ Σ_n J_nᵀ H_n J_n`` with ``J_n`` from ``jax.jacobian`` of the model outputs and ``H_n`` from
``jax.hessian`` of the per-example MSE ``Σ (f - y)²``.

Exactness (Eschenhagen et al., NeurIPS 2023, §3), for a deep linear network ``f = W_L ⋯ W_1 x``
applied to every position ``t`` of ``x_n [T, d]`` and MSE (``H_n = 2 I``):

* per-position terms (outputs ``[N, T, C]``, and the same flattened to ``[N, T·C]``, whose MSE
  is the same sum of the per-position MSEs): the cotangent of layer ``l`` at position ``t`` only reaches output
  position ``t`` through the same ``J = W_L ⋯ W_{l+1}``, so ``G = Σ_{n,t} a aᵀ ⊗ κ Jᵀ H J`` and
  expand's ``(1/(NT) Σ a aᵀ) ⊗ (Σ_{n,t,c} b bᵀ = NT κ JᵀHJ)`` is exact for every kernel;
* positions averaged before the loss (outputs ``[N, C]``): every position's cotangent is the same
  ``β_n = Jᵀ s / T``, so ``g_n = ā_n b̄_nᵀ`` with ``b̄ = Σ_t b = T β`` and reduce's
  ``(1/N Σ ā āᵀ) ⊗ (Σ_{n,c} b̄ b̄ᵀ = N κ JᵀHJ)`` is exact for every kernel.

Swapping the two settings breaks exactness (checked), and for ``T = 1`` the two coincide.
Tolerances: exact identities in float64 on O(1) numbers, checked to 1e-10 relative to the
block's largest entry (observed ~1e-16); "differs" means a relative gap above 5 %.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import curvjax
import curvjax.optim
from curvjax._src import kronecker, quantities

N, T, D, H, C = 3, 4, 3, 5, 2


def _deep_linear_params():
    keys = jax.random.split(jax.random.key(0), 3)
    return {
        "w1": jax.random.normal(keys[0], (D, H)) / np.sqrt(D),
        "b1": jnp.linspace(-0.5, 0.5, H),
        "w2": jax.random.normal(keys[1], (H, H)) / np.sqrt(H),
        "w3": jax.random.normal(keys[2], (H, C)) / np.sqrt(H),
    }


def _deep_linear(p, x):
    """``[N, T, D] -> [N, T, C]``: three dense layers (one bias), no nonlinearity."""
    return ((x @ p["w1"] + p["b1"][None, None]) @ p["w2"]) @ p["w3"]


def per_position(p, x):
    """Per-position outputs ``[N, T, C]``: the loss of an example sums the positions' MSEs."""
    return _deep_linear(p, x)


def per_position_flat(p, x):
    """The same outputs flattened to ``[N, T·C]`` (whose MSE is the same sum)."""
    return _deep_linear(p, x).reshape(x.shape[0], -1)


def pooled(p, x):
    """Positions averaged before the loss: ``[N, C]``."""
    return _deep_linear(p, x).mean(axis=1)


def _inputs(t=T):
    return jax.random.normal(jax.random.key(1), (N, t, D))


def _targets(fn, params, x):
    shape = jax.eval_shape(fn, params, x).shape
    return jax.random.normal(jax.random.key(2), shape)


def ggn_block(fn, params, batch, leaf, reduction):
    """Dense GGN block ``[D, D]`` (row-major leaf order) of ``params[leaf]``, MSE loss."""
    x, y = batch

    def outputs(w):
        return fn(dict(params, **{leaf: w}), x)

    n = x.shape[0]
    jac = jax.jacobian(outputs)(params[leaf])  # [N, *P, C, *leaf.shape]
    jac = jac.reshape(n, -1, np.size(params[leaf]))  # [N, |P|·C, D]
    f, y = outputs(params[leaf]).reshape(n, -1), y.reshape(n, -1)
    hess = jax.vmap(jax.hessian(lambda f, y: jnp.sum((f - y) ** 2)))(f, y)  # [N, C_out, C_out]
    kappa = 1.0 / x.shape[0] if reduction == "mean" else 1.0
    return kappa * jnp.einsum("nci,ncd,ndj->ij", jac, hess, jac)


def _rel_gap(got, want):
    got, want = np.asarray(got), np.asarray(want)
    return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))


KERNELS = ("w1", "w2", "w3")


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize(
    ("fn", "approximation"),
    [(per_position, "expand"), (per_position_flat, "expand"), (pooled, "reduce")],
    ids=["expand", "expand-flat", "reduce"],
)
def test_kflr_is_exact_for_deep_linear_networks(fn, approximation, reduction):
    params, x = _deep_linear_params(), _inputs()
    batch = (x, _targets(fn, params, x))
    blocks = jax.jit(
        lambda p, b: curvjax.kflr(
            fn, p, b, loss="mse", reduction=reduction, approximation=approximation
        )
    )(params, batch)
    for leaf in KERNELS:
        assert isinstance(blocks[leaf], curvjax.KroneckerBlock)
        want = ggn_block(fn, params, batch, leaf, reduction)
        assert _rel_gap(curvjax.block_to_dense(blocks[leaf]), want) < 1e-10, leaf
    # the bias block is the exact (full) GGN block under either approximation
    want = ggn_block(fn, params, batch, "b1", reduction)
    assert _rel_gap(curvjax.block_to_dense(blocks["b1"]), want) < 1e-10


@pytest.mark.parametrize(
    ("fn", "approximation"),
    [(per_position, "reduce"), (pooled, "expand")],
    ids=["reduce", "expand"],
)
def test_the_other_approximation_is_not_exact(fn, approximation):
    params, x = _deep_linear_params(), _inputs()
    batch = (x, _targets(fn, params, x))
    blocks = curvjax.kflr(fn, params, batch, loss="mse", approximation=approximation)
    for leaf in KERNELS:
        want = ggn_block(fn, params, batch, leaf, "mean")
        assert _rel_gap(curvjax.block_to_dense(blocks[leaf]), want) > 0.05, leaf


def _conv(x, w):
    return jax.lax.conv_general_dilated(
        x, w, window_strides=(1, 1), padding="VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )


def _conv_params():
    keys = jax.random.split(jax.random.key(8), 2)
    return {
        "k1": jax.random.normal(keys[0], (3, 3, 2, 3)) / 4,  # 3x3 patches: the weight is shared
        "k2": jax.random.normal(keys[1], (1, 1, 3, C)) / 2,  # 1x1: one position in, one out
    }


def conv_per_pixel(p, x):
    """Two linear convolutions, per-pixel outputs ``[N, H', W', C]`` (a segmentation map)."""
    return _conv(_conv(x, p["k1"]), p["k2"])


def conv_pooled(p, x):
    """The same, averaged over the pixels before the loss: ``[N, C]``."""
    return conv_per_pixel(p, x).mean(axis=(1, 2))


@pytest.mark.parametrize(
    ("fn", "approximation"),
    [(conv_per_pixel, "expand"), (conv_pooled, "reduce")],
    ids=["expand", "reduce"],
)
def test_kflr_is_exact_for_linear_convolutions(fn, approximation):
    """The output at pixel ``t`` depends on the first layer's output at ``t`` alone (the second
    kernel is 1x1), through the same ``J`` everywhere: expand is exact with per-pixel losses,
    reduce with pixels averaged before the loss, for both kernels (patches as inputs)."""
    params = _conv_params()
    x = jax.random.normal(jax.random.key(9), (N, 5, 5, 2))
    batch = (x, _targets(fn, params, x))
    blocks = curvjax.kflr(fn, params, batch, loss="mse", approximation=approximation)
    swapped = "reduce" if approximation == "expand" else "expand"
    other = curvjax.kflr(fn, params, batch, loss="mse", approximation=swapped)
    for leaf in ("k1", "k2"):
        want = ggn_block(fn, params, batch, leaf, "mean")
        assert _rel_gap(curvjax.block_to_dense(blocks[leaf]), want) < 1e-10, leaf
        assert _rel_gap(curvjax.block_to_dense(other[leaf]), want) > 0.05, leaf


def test_expand_and_reduce_coincide_without_shared_positions():
    params, x = _deep_linear_params(), _inputs(t=1)
    batch = (x, _targets(per_position, params, x))
    expand = curvjax.kflr(per_position, params, batch, loss="mse", approximation="expand")
    reduce = curvjax.kflr(per_position, params, batch, loss="mse", approximation="reduce")
    for leaf in KERNELS:
        np.testing.assert_allclose(expand[leaf].a, reduce[leaf].a, rtol=1e-12)
        np.testing.assert_allclose(expand[leaf].b, reduce[leaf].b, rtol=1e-12)


def test_kfac_reduce_is_unbiased_for_kflr_reduce():
    """KFAC samples the columns of ``S_n``: its reduce factors average to KFLR's (5 σ)."""
    params, x = _deep_linear_params(), _inputs()
    batch = (x, _targets(pooled, params, x))
    exact = curvjax.kflr(pooled, params, batch, loss="mse", approximation="reduce")["w2"]

    def sample(key):
        out = curvjax.kfac(
            pooled, params, batch, key=key, mc_samples=4, loss="mse", approximation="reduce"
        )
        return out["w2"].a, out["w2"].b

    a, b = jax.jit(jax.vmap(sample))(jax.random.split(jax.random.key(3), 400))
    np.testing.assert_allclose(a[0], exact.a, rtol=1e-12)  # A does not depend on the samples
    mean, stderr = b.mean(0), b.std(0) / np.sqrt(b.shape[0])
    assert np.all(np.abs(mean - exact.b) <= 5 * stderr + 1e-12)


def test_expand_and_reduce_in_one_extract_do_not_share_parts():
    """Two Kronecker quantities on the same vector set, one expand and one reduce, in one pass.

    With positions pooled before the loss every position gets the same cotangent ``β``, so
    expand's ``B = Σ_t ββᵀ`` and reduce's ``B = (Σ_t β)(Σ_t β)ᵀ`` differ by the factor ``T``.
    """
    name = "kflr_other_approximation"
    quantities.register(
        quantities.Quantity(
            name,
            lambda c, parts: kronecker.assemble(
                c.p, parts, approximation=c.options[name]["approximation"]
            ),
            vectors="exact",
            reduction="kron",
            options={"approximation": "expand"},
            curvature=True,
        )
    )
    try:
        params, x = _deep_linear_params(), _inputs()
        batch = (x, _targets(pooled, params, x))
        out = curvjax.extract(
            pooled,
            params,
            batch,
            ["kflr", name],
            loss="mse",
            options={"kflr": {"approximation": "reduce"}},
        )
    finally:
        del quantities.REGISTRY[name]
    reduce = curvjax.kflr(pooled, params, batch, loss="mse", approximation="reduce")
    expand = curvjax.kflr(pooled, params, batch, loss="mse", approximation="expand")
    for leaf in KERNELS:
        np.testing.assert_allclose(out["kflr"][leaf].b, reduce[leaf].b, rtol=1e-12)
        np.testing.assert_allclose(out[name][leaf].b, expand[leaf].b, rtol=1e-12)
        assert _rel_gap(reduce[leaf].b, expand[leaf].b) > 0.05


def test_unknown_approximation_is_an_error():
    params, x = _deep_linear_params(), _inputs()
    batch = (x, _targets(pooled, params, x))
    with pytest.raises(ValueError, match="'expand'"):
        curvjax.kflr(pooled, params, batch, loss="mse", approximation="mean")


# --- tied weights ----------------------------------------------------------------------------
def _square_params():
    return {"w": jax.random.normal(jax.random.key(4), (D, D)) / np.sqrt(D)}


def halves(p, x):
    """One weight applied by two taps, to the two positions of ``x [N, 2, D]``."""
    return jnp.concatenate([x[:, 0] @ p["w"], x[:, 1] @ p["w"]], axis=-1)


def halves_pooled(p, x):
    return (x[:, 0] @ p["w"] + x[:, 1] @ p["w"]) / 2


def shared(p, x):
    """The same weight as one tap shared over the two positions."""
    return (x @ p["w"]).reshape(x.shape[0], -1)


@pytest.mark.parametrize(
    ("fn", "approximation"),
    [(halves, "expand"), (halves_pooled, "reduce")],
    ids=["halves-expand", "halves_pooled-reduce"],
)
def test_tied_uses_count_as_positions(fn, approximation):
    """Two taps of one weight = one tap shared over two positions: same block, and exact where
    expand / reduce are exact (per-position MSE / positions averaged before the loss)."""
    params, x = _square_params(), _inputs(t=2)
    batch = (x, _targets(fn, params, x))
    tied = curvjax.kflr(fn, params, batch, loss="mse", approximation=approximation)["w"]
    assert isinstance(tied, curvjax.KroneckerBlock)
    want = ggn_block(fn, params, batch, "w", "mean")
    assert _rel_gap(curvjax.block_to_dense(tied), want) < 1e-10
    if fn is halves:
        one_tap = curvjax.kflr(shared, params, batch, loss="mse", approximation=approximation)
        np.testing.assert_allclose(tied.a, one_tap["w"].a, rtol=1e-12)
        np.testing.assert_allclose(tied.b, one_tap["w"].b, rtol=1e-12)


def twice(p, x):
    """One weight applied in two consecutive layers: ``x W W``."""
    return x @ p["w"] @ p["w"]


@pytest.mark.parametrize("approximation", ["expand", "reduce"])
def test_tied_layers_follow_their_definition(approximation):
    """``x W W``: the block is the Kronecker product of the factors summed over the two uses
    (definition computed from dense per-use inputs and output Jacobians), not the exact block."""
    params, x = _square_params(), _inputs(t=1)[:, 0]
    batch = (x, _targets(twice, params, x))
    got = curvjax.kflr(twice, params, batch, loss="mse", approximation=approximation)["w"]
    w = params["w"]
    inputs = [x, x @ w]  # a_u of the two uses, [N, D]

    def perturbed(e1, e2):
        return (x @ w + e1) @ w + e2

    zeros = jnp.zeros((N, D))
    jacs = jax.jacobian(perturbed, argnums=(0, 1))(zeros, zeros)  # [N, C, N, D] each
    rows = jnp.arange(N)
    jacs = [j[rows, :, rows] for j in jacs]  # [N, C, D]: ∂f_n / ∂(output of use u of example n)
    kappa, hess = 1.0 / N, 2.0  # MSE: H_n = 2 I
    if approximation == "expand":  # uses as positions: T' = 2
        a = sum(u.T @ u for u in inputs) / (N * 2)
        b = sum(kappa * hess * jnp.einsum("ncd,nce->de", j, j) for j in jacs)
    else:
        mean = sum(inputs) / 2
        a = mean.T @ mean / N
        total = sum(jacs)  # Σ_u of the per-example cotangent maps
        b = kappa * hess * jnp.einsum("ncd,nce->de", total, total)
    np.testing.assert_allclose(got.a[0], a, rtol=1e-10)
    np.testing.assert_allclose(got.b[0], b, rtol=1e-10)
    exact = ggn_block(twice, params, batch, "w", "mean")
    assert _rel_gap(curvjax.block_to_dense(got), exact) > 0.05  # cross terms are left out


def tied_embedding(p, tokens):
    """Embedding lookup (``take``) tied with the output projection (``h Eᵀ``)."""
    h = jnp.take(p["embed"], tokens, axis=0).mean(axis=1)  # [N, D]
    return h @ p["proj"] @ p["embed"].T  # [N, V]


def test_tied_embedding_gets_the_exact_diagonal():
    """A lookup and a transposed projection do not share one Kronecker layout: the leaf gets the
    diagonal of its exact GGN block (cross terms between the two uses included)."""
    vocab = 6
    keys = jax.random.split(jax.random.key(5), 3)
    params = {
        "embed": jax.random.normal(keys[0], (vocab, D)),
        "proj": jax.random.normal(keys[1], (D, D)) / np.sqrt(D),
    }
    tokens = jax.random.randint(keys[2], (N, T), 0, vocab)
    batch = (tokens, _targets(tied_embedding, params, tokens))
    blocks = curvjax.kflr(tied_embedding, params, batch, loss="mse")
    assert isinstance(blocks["embed"], curvjax.DiagonalBlock)
    want = jnp.diag(ggn_block(tied_embedding, params, batch, "embed", "mean"))
    got = jnp.diag(curvjax.block_to_dense(blocks["embed"]))
    assert _rel_gap(got, want) < 1e-10


# --- weights inside a scan body (RNN cells) --------------------------------------------------
def _rnn_params():
    keys = jax.random.split(jax.random.key(7), 3)
    return {
        "wh": jax.random.normal(keys[0], (H, H)) / np.sqrt(H),
        "wx": jax.random.normal(keys[1], (D, H)) / np.sqrt(D),
        "b": jnp.linspace(-0.3, 0.3, H),
        "wo": jax.random.normal(keys[2], (H, C)) / np.sqrt(H),
    }


def rnn(p, x):
    """``h_s = tanh(h_{s-1} W_h + x_s W_x + b)`` over the ``T`` steps by ``lax.scan``; ``h_T W_o``."""

    def cell(h, x_s):
        h = jnp.tanh(h @ p["wh"] + x_s @ p["wx"] + p["b"][None])
        return h, h

    h, _ = jax.lax.scan(cell, jnp.zeros((x.shape[0], H)), jnp.swapaxes(x, 0, 1))
    return h @ p["wo"]


def _rnn_steps(p, x):
    """Dense per-step references: cell inputs ``[N, T, H]`` and ``∂f_n / ∂(h W_h)_s``
    ``[N, C, T, H]`` (the same for ``x W_x``: both products enter the same pre-activation)."""

    def unrolled(eps):
        h = jnp.zeros((x.shape[0], H))
        for s in range(x.shape[1]):
            h = jnp.tanh(h @ p["wh"] + eps[:, s] + x[:, s] @ p["wx"] + p["b"][None])
        return h @ p["wo"]

    jac = jax.jacobian(unrolled)(jnp.zeros((x.shape[0], x.shape[1], H)))  # [N, C, N, T, H]
    rows = jnp.arange(x.shape[0])
    states, h = [], jnp.zeros((x.shape[0], H))
    for s in range(x.shape[1]):
        states.append(h)
        h = jnp.tanh(h @ p["wh"] + x[:, s] @ p["wx"] + p["b"][None])
    return jnp.stack(states, axis=1), jac[rows, :, rows]


@pytest.mark.parametrize("approximation", ["expand", "reduce"])
def test_rnn_cell_kernels_share_their_weight_over_the_steps(approximation):
    """``W_h`` and ``W_x`` inside the scan body get Kronecker blocks with the steps as positions,
    equal to their definition from dense per-step inputs and output Jacobians."""
    params, x = _rnn_params(), _inputs()
    batch = (x, _targets(rnn, params, x))
    blocks = jax.jit(lambda p, b: curvjax.kflr(rnn, p, b, loss="mse", approximation=approximation))(
        params, batch
    )
    states, jac = _rnn_steps(params, x)
    kappa, hess = 1.0 / N, 2.0  # mean reduction, MSE: H_n = 2 I
    for leaf, inputs in (("wh", states), ("wx", x)):
        assert isinstance(blocks[leaf], curvjax.KroneckerBlock), leaf
        if approximation == "expand":
            a = jnp.einsum("nti,ntj->ij", inputs, inputs) / (N * T)
            b = kappa * hess * jnp.einsum("ncto,nctp->op", jac, jac)
        else:
            mean = inputs.mean(axis=1)
            a = mean.T @ mean / N
            total = jac.sum(axis=2)
            b = kappa * hess * jnp.einsum("nco,ncp->op", total, total)
        np.testing.assert_allclose(blocks[leaf].a[0], a, rtol=1e-10, atol=1e-14)
        np.testing.assert_allclose(blocks[leaf].b[0], b, rtol=1e-10, atol=1e-14)
    want = ggn_block(rnn, params, batch, "b", "mean")  # the bias keeps its exact full block
    assert _rel_gap(curvjax.block_to_dense(blocks["b"]), want) < 1e-10


def test_flax_rnn_cell_gets_the_same_blocks():
    """``flax.linen.RNN(SimpleCell)`` (``nn.scan`` closing over the cell's kernels) gives the
    blocks of the plain ``lax.scan`` model with the same weights."""
    import flax.linen as nn

    class Model(nn.Module):
        @nn.compact
        def __call__(self, x):
            cell = nn.SimpleCell(
                H,
                dtype=jnp.float64,
                param_dtype=jnp.float64,
                carry_init=nn.initializers.zeros_init(),
            )
            return nn.Dense(C, use_bias=False, param_dtype=jnp.float64)(nn.RNN(cell)(x)[:, -1])

    params, x = _rnn_params(), _inputs()
    batch = (x, _targets(rnn, params, x))
    variables = {
        "params": {
            "SimpleCell_0": {
                "h": {"kernel": params["wh"]},
                "i": {"kernel": params["wx"], "bias": params["b"]},
            },
            "Dense_0": {"kernel": params["wo"]},
        }
    }
    model = Model()
    flax_variables = model.init(jax.random.key(0), x)
    assert jax.tree.structure(flax_variables) == jax.tree.structure(variables)
    got = curvjax.kflr(model.apply, variables, batch, loss="mse")["params"]
    want = curvjax.kflr(rnn, params, batch, loss="mse")
    cell = got["SimpleCell_0"]
    for leaf, block in (("wh", cell["h"]["kernel"]), ("wx", cell["i"]["kernel"])):
        assert isinstance(block, curvjax.KroneckerBlock), leaf
        np.testing.assert_allclose(block.a, want[leaf].a, rtol=1e-12)
        np.testing.assert_allclose(block.b, want[leaf].b, rtol=1e-12)


def scanned_positions(p, x):
    """A dense layer applied position by position by ``lax.scan`` (the carry unused)."""
    _, ys = jax.lax.scan(lambda c, x_s: (c, x_s @ p["w"]), jnp.zeros(()), jnp.swapaxes(x, 0, 1))
    return jnp.swapaxes(ys, 0, 1)  # [N, T, D]


def test_scan_over_positions_is_exact_like_weight_sharing():
    """Steps that do not interact are positions: expand is then the exact GGN block and equals
    the block of the same layer applied to ``[N, T, D]`` at once."""
    params, x = _square_params(), _inputs()
    batch = (x, _targets(scanned_positions, params, x))
    got = curvjax.kflr(scanned_positions, params, batch, loss="mse")["w"]
    assert isinstance(got, curvjax.KroneckerBlock)
    want = ggn_block(scanned_positions, params, batch, "w", "mean")
    assert _rel_gap(curvjax.block_to_dense(got), want) < 1e-10
    at_once = curvjax.kflr(lambda p, x: x @ p["w"], params, batch, loss="mse")["w"]
    np.testing.assert_allclose(got.a, at_once.a, rtol=1e-12)
    np.testing.assert_allclose(got.b, at_once.b, rtol=1e-12)


def rnn_transposed(p, x):
    """The recurrent weight transposed inside the body: not a plain product of the weight."""

    def cell(h, x_s):
        h = jnp.tanh(h @ p["wh"].T + x_s @ p["wx"] + p["b"][None])
        return h, h

    h, _ = jax.lax.scan(cell, jnp.zeros((x.shape[0], H)), jnp.swapaxes(x, 0, 1))
    return h @ p["wo"]


def rnn_transformed(p, x):
    """The recurrent weight transformed non-linearly before the scan closes over it."""
    return rnn(dict(p, wh=jnp.tanh(p["wh"])), x)


@pytest.mark.parametrize("fn", [rnn_transposed, rnn_transformed], ids=["transposed", "tanh"])
def test_other_uses_inside_a_scan_keep_the_exact_diagonal(fn):
    params, x = _rnn_params(), _inputs()
    batch = (x, _targets(fn, params, x))
    blocks = jax.jit(lambda p, b: curvjax.kflr(fn, p, b, loss="mse"))(params, batch)
    assert isinstance(blocks["wh"], curvjax.DiagonalBlock)
    assert isinstance(blocks["wx"], curvjax.KroneckerBlock)
    want = jnp.diag(ggn_block(fn, params, batch, "wh", "mean"))
    assert _rel_gap(jnp.diag(curvjax.block_to_dense(blocks["wh"])), want) < 1e-10


# --- optimizers --------------------------------------------------------------------------------
def test_scale_by_kfac_uses_the_approximation():
    """The convenience path computes its factors with the chosen approximation: its direction
    equals the one-pass direction from ``kflr(..., approximation="reduce")``, not expand's."""
    params, x = _deep_linear_params(), _inputs()
    batch = (x, _targets(pooled, params, x))
    grads = jax.grad(lambda p: jnp.mean(jnp.sum((pooled(p, x) - batch[1]) ** 2, -1)))(params)

    def direction(approximation, curvature):
        opt = curvjax.optim.scale_by_kfac(
            pooled,
            x,
            damping=0.1,
            quantity="kflr",
            loss="mse",
            approximation=approximation,
        )
        state = opt.init(params)
        if curvature is None:
            return opt.update(grads, state, params, batch=batch)[0]
        return opt.update(grads, state, params, curvature=curvature)[0]

    convenience = direction("reduce", None)
    for approximation, gap in (("reduce", False), ("expand", True)):
        blocks = curvjax.kflr(pooled, params, batch, loss="mse", approximation=approximation)
        one_pass = direction("expand", blocks)  # the transform's option only acts without curvature
        rel = _rel_gap(convenience["w1"], one_pass["w1"])
        assert (rel > 0.05) if gap else (rel < 1e-10), approximation


def test_noisy_kfac_uses_the_approximation():
    """Without noise (ρ = 0) and one sample, the first step's factors are ``kfac(...)`` with the
    documented key split and the chosen approximation (β₀ = 1: no old factors mixed in)."""
    params, x = _deep_linear_params(), _inputs()
    batch = (x, _targets(pooled, params, x))
    opt = curvjax.optim.scale_by_noisy_kfac(
        pooled, x, rho=0.0, damping=0.1, loss="mse", approximation="reduce"
    )
    key = jax.random.key(6)
    _, state = opt.update(None, opt.init(params), params, batch=batch, key=key)
    _, k_y = jax.random.split(jax.random.split(key, 1)[0])
    for approximation, gap in (("reduce", False), ("expand", True)):
        want = curvjax.kfac(
            pooled, params, batch, key=k_y, loss="mse", approximation=approximation
        )["w2"]
        rel = _rel_gap(state.factors["w2"].b, want.b)
        assert (rel > 0.05) if gap else (rel < 1e-10), approximation


def test_optimizers_reject_an_unknown_approximation():
    x = _inputs()
    with pytest.raises(ValueError, match="'reduce'"):
        curvjax.optim.scale_by_kfac(pooled, x, approximation="sum")
    with pytest.raises(ValueError, match="block='diagonal'"):
        curvjax.optim.kfac(pooled, x, block="tridiagonal", approximation="reduce")
    with pytest.raises(ValueError, match="'reduce'"):
        curvjax.optim.scale_by_noisy_kfac(pooled, x, rho=0.0, damping=0.1, approximation="sum")
