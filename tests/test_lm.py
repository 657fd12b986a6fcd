"""The transformer language model and its character data (``curvjax._src.lm``), and curvjax's
per-sequence quantities on it (flax linen and the equinox twin of ``models.equinox_lm``)."""

import functools

import equinox as eqx
import jax
import jax.flatten_util
import jax.numpy as jnp
import models
import numpy as np
import optax
import pytest
import reference
from helpers import assert_tree_close

import curvjax
from curvjax._src import lm

TINY = lm.Config(vocab_size=16, width=16, num_heads=2, num_layers=2, seq_len=8)


def _tokens(shape, vocab, salt):
    rng = np.random.default_rng(sum(map(ord, salt)))
    return jnp.asarray(rng.integers(0, vocab, shape), jnp.int32)


@pytest.fixture(scope="module")
def linen_model():
    """``(apply_fn, params)`` of the tiny flax LM in float64, weights moved away from init."""
    shapes = jax.eval_shape(lambda key: lm.init(key, TINY), jax.random.key(0))
    params = models.fill("linen_lm", shapes)  # nonzero biases, norm scales away from 1
    return jax.jit(lm.make_apply_fn(TINY)), params


# --------------------------------------------------------------------------------------------
# data


def test_encode_decode_round_trip_and_unknown():
    text = "def f(x):\n    return x  # ok ~"
    ids = lm.encode(text)
    assert ids.dtype == np.int32 and ids.max() < lm.VOCAB_SIZE
    assert lm.decode(ids) == text
    assert list(lm.encode("\t\x7fé")) == [lm.UNKNOWN] * 3
    assert lm.VOCAB_SIZE == 97


def test_char_data_is_deterministic_shifted_and_split():
    tokens, targets = lm.char_data(6, 12, seed=3)
    again, _ = lm.char_data(6, 12, seed=3)
    other, _ = lm.char_data(6, 12, seed=4)
    assert tokens.shape == targets.shape == (6, 12) and tokens.dtype == np.int32
    np.testing.assert_array_equal(tokens, again)
    assert not np.array_equal(tokens, other)
    np.testing.assert_array_equal(tokens[:, 1:], targets[:, :-1])
    # every window is a substring of the corpus (train part: the first 90 %)
    text = lm.decode(lm.encode(lm.corpus()))
    boundary = int(round(0.9 * len(text)))
    for row, target in zip(tokens, targets, strict=True):
        window = lm.decode(row) + lm.decode(target[-1:])
        assert window in text[:boundary]
    test_tokens, _ = lm.char_data(4, 12, split="test")
    for row in test_tokens:
        assert lm.decode(row) in text[boundary:]
    with pytest.raises(ValueError, match="split"):
        lm.char_data(2, 4, split="validation")
    with pytest.raises(ValueError, match="sequences"):
        lm.char_data(0, 4)


# --------------------------------------------------------------------------------------------
# the model


def test_linen_lm_is_causal_and_per_sequence(linen_model):
    apply_fn, params = linen_model
    tokens = _tokens((3, 8), TINY.vocab_size, "causal")
    logits = apply_fn(params, tokens)
    assert logits.shape == (3, 8, TINY.vocab_size)
    # changing token 5 of sequence 1 changes logits of that sequence at positions >= 5 only
    changed = tokens.at[1, 5].set((tokens[1, 5] + 1) % TINY.vocab_size)
    new = apply_fn(params, changed)
    np.testing.assert_array_equal(new[0], logits[0])
    np.testing.assert_array_equal(new[2], logits[2])
    np.testing.assert_allclose(new[1, :5], logits[1, :5], rtol=1e-13, atol=1e-13)
    assert np.all(np.abs(new[1, 5:] - logits[1, 5:]).max(axis=-1) > 1e-6)
    # shorter sequences use the first positions of the embedding
    np.testing.assert_allclose(apply_fn(params, tokens[:, :4]), logits[:, :4], rtol=1e-12)


def test_output_embedding_is_tied(linen_model):
    apply_fn, params = linen_model
    assert set(params) == {"embed", "positions", "block_0", "block_1", "norm_final"}
    tokens = _tokens((2, 8), TINY.vocab_size, "tied")
    # the logits are linear in the embedding through the output projection: scaling the rows
    # used by neither input token scales their logits (up to the normalised hidden state)
    unused = np.setdiff1d(np.arange(TINY.vocab_size), np.asarray(tokens))
    scaled = jax.tree.map(lambda a: a, params)
    scaled["embed"] = {"embedding": params["embed"]["embedding"].at[unused].multiply(3.0)}
    np.testing.assert_allclose(
        apply_fn(scaled, tokens)[..., unused], 3.0 * apply_fn(params, tokens)[..., unused]
    )


def _equinox_from_linen(linen_params, eqx_params):
    """The equinox twin's params carrying the linen model's weights (kernels transposed)."""

    def dense(layer, p):
        return eqx.tree_at(lambda m: (m.weight, m.bias), layer, (p["kernel"].T, p["bias"]))

    def norm(layer, p):
        return eqx.tree_at(lambda m: (m.weight, m.bias), layer, (p["scale"], p["bias"]))

    blocks = []
    for i, block in enumerate(eqx_params.blocks):
        p = linen_params[f"block_{i}"]
        for field in ("qkv", "attention_out", "mlp_in", "mlp_out"):
            block = eqx.tree_at(
                lambda m, f=field: getattr(m, f), block, dense(getattr(block, field), p[field])
            )
        for field in ("norm_attention", "norm_mlp"):
            block = eqx.tree_at(
                lambda m, f=field: getattr(m, f), block, norm(getattr(block, field), p[field])
            )
        blocks.append(block)
    return eqx.tree_at(
        lambda m: (m.embed.weight, m.positions, m.blocks, m.norm_final),
        eqx_params,
        (
            linen_params["embed"]["embedding"],
            linen_params["positions"],
            blocks,
            norm(eqx_params.norm_final, linen_params["norm_final"]),
        ),
    )


def test_equinox_twin_equals_linen_model(linen_model):
    apply_fn, params = linen_model
    eqx_apply, eqx_params = models.equinox_lm(
        vocab_size=TINY.vocab_size,
        width=TINY.width,
        num_heads=TINY.num_heads,
        num_layers=TINY.num_layers,
        max_len=TINY.seq_len,
    )
    eqx_apply = jax.jit(eqx_apply)
    twin = _equinox_from_linen(params, eqx_params)
    tokens = _tokens((3, 8), TINY.vocab_size, "twin")
    np.testing.assert_allclose(
        eqx_apply(twin, tokens), apply_fn(params, tokens), rtol=1e-12, atol=1e-12
    )


def test_training_on_stdlib_text_lowers_held_out_loss():
    config = lm.Config(width=16, num_heads=2, num_layers=1, seq_len=16)
    apply_fn = lm.make_apply_fn(config)
    params = jax.jit(lambda key: lm.init(key, config))(jax.random.key(0))
    held_out_loss = jax.jit(
        lambda p: lm.token_mean_loss(apply_fn, p, lm.char_data(64, 16, split="test"))
    )
    before = float(held_out_loss(params))
    params, losses = lm.train(
        apply_fn, params, lm.char_data(512, 16), steps=100, batch_size=16, seed=0
    )
    after = float(held_out_loss(params))
    assert losses.shape == (100,)
    # uniform guessing costs log(97) = 4.57 nats; 100 AdamW steps reach about 2.7 on held-out
    # source text (character frequencies and common bigrams), far from the initial loss
    assert before > 4.0 and after < before - 1.0, (before, after)


# --------------------------------------------------------------------------------------------
# curvjax on the language model: per-sequence quantities against dense float64 references
#
# The loss of sequence n is l_n = sum_t w_nt CE(f_nt, y_nt) and L = kappa sum_n l_n with
# kappa = 1 (sum), 1/N (mean) or 1/sum_nt w_nt (token_mean). The references below never call
# curvjax: vmap(grad) of l_n evaluated on one sequence at a time, and the GGN
# kappa sum_nt w_nt J_ntᵀ (diag p_nt - p_nt p_ntᵀ) J_nt from jax.jacobian.

SMALL = lm.Config(vocab_size=16, width=16, num_heads=2, num_layers=1, seq_len=8, mlp_ratio=2)
N_SEQ = 3


def _model(framework, config):
    """``(apply_fn, params)`` in float64 with weights away from init; jitted ``apply_fn``."""
    if framework == "linen":
        shapes = jax.eval_shape(lambda key: lm.init(key, config), jax.random.key(0))
        return lm.make_apply_fn(config), models.fill(f"lm/{config}", shapes)
    return models.equinox_lm(
        vocab_size=config.vocab_size,
        width=config.width,
        num_heads=config.num_heads,
        num_layers=config.num_layers,
        max_len=config.seq_len,
        mlp_ratio=config.mlp_ratio,
    )


def _batch(config, salt, masked=True):
    """``(tokens, targets[, mask])``: sequence 0 full, 1 and 2 padded after 5 and 2 positions."""
    tokens = _tokens((N_SEQ, config.seq_len), config.vocab_size, "tokens/" + salt)
    targets = _tokens((N_SEQ, config.seq_len), config.vocab_size, "targets/" + salt)
    if not masked:
        return tokens, targets
    lengths = np.array([config.seq_len, 5, 2])
    mask = jnp.asarray(np.arange(config.seq_len)[None, :] < lengths[:, None], jnp.float64)
    return tokens, targets, mask


def _weights(batch):
    tokens = batch[0]
    return batch[2] if len(batch) == 3 else jnp.ones(tokens.shape, jnp.float64)


def _kappa(reduction, weights):
    return {"sum": 1.0, "mean": 1.0 / weights.shape[0], "token_mean": 1.0 / weights.sum()}[
        reduction
    ]


def _sequence_loss(apply_fn, params, tokens_n, targets_n, weights_n):
    """``l_n``: the model sees sequence n alone (a batch of one)."""
    logits = apply_fn(params, tokens_n[None])[0]
    log_p = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(log_p, targets_n[:, None], axis=-1)[:, 0]
    return jnp.sum(weights_n * nll)


def _reduced_loss(apply_fn, params, batch, reduction):
    """``L = kappa sum_nt w_nt CE(f_nt, y_nt)`` with the whole batch in one forward pass."""
    weights = _weights(batch)
    logits = apply_fn(params, batch[0])
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, batch[1])
    return _kappa(reduction, weights) * jnp.sum(weights * nll)


def _reference_per_sequence_grads(apply_fn, params, batch, reduction):
    weights = _weights(batch)
    grads = _jit(
        jax.vmap(jax.grad(functools.partial(_sequence_loss, apply_fn)), in_axes=(None, 0, 0, 0))
    )(params, batch[0], batch[1], weights)
    return jax.tree.map(lambda g: _kappa(reduction, weights) * g, grads)


def _reference_ggn(apply_fn, params, batch, reduction):
    """Dense ``[D, D]`` GGN over ``ravel_pytree(params)`` of the reduced per-sequence loss."""
    tokens, _, *_ = batch
    weights = _weights(batch)
    flat, unravel = jax.flatten_util.ravel_pytree(params)

    @_jit
    def ggn(flat):
        outputs = lambda v: apply_fn(unravel(v), tokens)  # noqa: E731
        jac = jax.jacobian(outputs)(flat)  # [N, T, V, D]
        p = jax.nn.softmax(outputs(flat), axis=-1)  # [N, T, V]
        hess_jac = (
            p[..., None] * jac - p[..., None] * jnp.sum(p[..., None] * jac, axis=2)[:, :, None]
        )
        return _kappa(reduction, weights) * jnp.einsum(
            "ntvd,ntve->de", weights[:, :, None, None] * jac, hess_jac
        )

    return ggn(flat), unravel


FRAMEWORKS = ["linen", "equinox"]
REDUCTIONS = ["sum", "mean", "token_mean"]


def _jit(fun):
    return jax.jit(fun, compiler_options=reference.FAST_COMPILE)


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_per_sequence_grads_equal_vmap_grad(framework):
    config = lm.Config(vocab_size=16, width=16, num_heads=2, num_layers=2, seq_len=8, mlp_ratio=2)
    apply_fn, params = _model(framework, config)
    masked = _batch(config, "grads")
    unmasked = masked[:2]

    @_jit
    def per_sequence(p, masked, unmasked):
        got = {r: curvjax.per_example_grads(apply_fn, p, masked, reduction=r) for r in REDUCTIONS}
        got["unmasked"] = curvjax.per_example_grads(apply_fn, p, unmasked, reduction="sum")
        return got

    got = per_sequence(params, masked, unmasked)
    unscaled = _reference_per_sequence_grads(apply_fn, params, masked, "sum")
    grad_sum = _jit(jax.grad(lambda p: _reduced_loss(apply_fn, p, masked, "sum")))(params)
    weights = masked[2]
    for reduction in REDUCTIONS:
        kappa = _kappa(reduction, weights)
        want = jax.tree.map(lambda g, kappa=kappa: kappa * g, unscaled)
        # a few hundred float64 roundings in the sums over positions, heads and tokens
        assert_tree_close(got[reduction], want, params, what=f"{framework} {reduction}")
        # they add up to the gradient of the reduced loss, evaluated on the whole batch
        total = jax.tree.map(lambda g: g.sum(axis=0), got[reduction])
        want_total = jax.tree.map(lambda g, kappa=kappa: kappa * g, grad_sum)
        assert_tree_close(total, want_total, params, what=f"{framework} {reduction}: sum_n g_n")
    want = _reference_per_sequence_grads(apply_fn, params, unmasked, "sum")
    assert_tree_close(got["unmasked"], want, params, what=f"{framework} without mask")


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_ggn_diag_and_ggn_vp_equal_dense_ggn(framework):
    apply_fn, params = _model(framework, SMALL)
    batch = _batch(SMALL, "ggn")
    ggn, unravel = _reference_ggn(apply_fn, params, batch, "token_mean")
    vector = unravel(
        jnp.asarray(np.random.default_rng(0).standard_normal(ggn.shape[0]), jnp.float64)
    )

    @_jit
    def quantities(p, b, v):
        return (
            curvjax.ggn_diag(apply_fn, p, b, reduction="token_mean"),
            curvjax.ggn_vp(apply_fn, p, b, v, reduction="token_mean"),
        )

    diag, product = quantities(params, batch, vector)
    flat_vector = jax.flatten_util.ravel_pytree(vector)[0]
    # float64 sums over T * V = 128 columns per sequence and over D ~ 2,600 parameters
    assert_tree_close(diag, unravel(jnp.diag(ggn)), params, what=f"{framework} ggn_diag")
    assert_tree_close(product, unravel(ggn @ flat_vector), params, what=f"{framework} ggn_vp")


def test_masked_positions_contribute_nothing():
    """Changing the target of a padded position, or its logits (their values and their
    dependence on the parameters), changes no quantity."""
    apply_fn, params = _model("linen", SMALL)
    tokens, targets, mask = _batch(SMALL, "mask")
    padded = np.asarray(mask) == 0
    new_targets = jnp.where(padded, (targets + 7) % SMALL.vocab_size, targets)
    assert int(jnp.sum(new_targets != targets)) == int(padded.sum()) > 0

    def perturbed(p, inputs):  # padded logits moved and made to depend on the parameters
        x, m = inputs  # the mask travels with each example (a closed-over [N, T] mask would not)
        logits = apply_fn(p, x)
        return logits + (1.0 - m)[:, :, None] * (3.0 * jnp.tanh(logits) ** 2 + 1.0)

    names = ["per_example_grads", "batch_l2", "ggn_diag", "ggn_diag_mc", "kfac", "kflr"]

    def quantities(f, p, b):
        out = curvjax.extract(
            f, p, b, names, reduction="token_mean", key=jax.random.key(1), mc_samples=2
        )
        out["hvp"] = curvjax.hvp(f, p, b, p, reduction="token_mean")
        out["ggn_vp"] = curvjax.ggn_vp(f, p, b, p, reduction="token_mean")
        return out

    base = _jit(functools.partial(quantities, apply_fn))(params, (tokens, targets, mask))
    changed = _jit(functools.partial(quantities, apply_fn))(params, (tokens, new_targets, mask))
    moved = _jit(functools.partial(quantities, perturbed))(params, ((tokens, mask), targets, mask))
    assert (
        float(jnp.max(jnp.abs(perturbed(params, (tokens, mask)) - apply_fn(params, tokens)))) > 0.5
    )
    for other, what in [(changed, "new targets"), (moved, "new logits")]:
        for name in ["loss", "grad", *names, "hvp", "ggn_vp"]:
            want, got = jax.tree.leaves(base[name]), jax.tree.leaves(other[name])
            assert len(want) == len(got) > 0
            for w, g in zip(want, got, strict=True):
                # equal up to float64 rounding of the (possibly reordered) sums
                np.testing.assert_allclose(
                    g,
                    w,
                    rtol=1e-12,
                    atol=1e-12 * float(np.max(np.abs(w))),
                    err_msg=f"{what} {name}",
                )


def test_demo_lm_command_prints_losses_and_table(monkeypatch, capsys):
    """``python -m curvjax demo lm`` wiring, in process, with two of its rows (the full table
    compiles every quantity: a minute on two cores)."""
    from curvjax import __main__ as cli
    from curvjax._src import demo

    rows = [q for q in demo.LM_QUANTITIES if q.name in ("batch_l2", "kfac (reduce)")]
    assert len(rows) == 2
    monkeypatch.setattr(demo, "LM_QUANTITIES", rows)
    argv = ["demo", "lm", "--steps", "3", "--batch-size", "4", "--seq-len", "8", "--seed", "1"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "trained 3 AdamW steps" in out and "held-out loss" in out
    table = [line for line in out.splitlines() if line.startswith("| ")]
    for name in ("jax.grad (baseline)", "batch_l2", "kfac (reduce)"):
        (row,) = [line for line in table if line.startswith(f"| {name} ")]
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        assert float(cells[2]) > 0.0, row  # a ratio, not an error message
    assert "raised" not in out


def test_quantity_table_shows_a_failing_row_with_its_error():
    from curvjax._src import demo

    def fails(apply_fn, params, batch, **options):
        raise ValueError("cannot treat this model\nsecond line")

    rows = [demo.QUANTITIES[0], demo.Quantity("failing", "grad", fails, str)]
    batch = (jnp.ones((4, 3)), jnp.zeros(4, jnp.int32))
    args = (lambda p, x: x @ p, jnp.ones((3, 2)), batch, rows)
    table, _ = demo.quantity_table(*args, catch_errors=True, repeats=1, number=1)
    lines = table.splitlines()
    assert any(line.startswith("| failing ") and "raised ValueError [1]" in line for line in lines)
    assert lines[-1] == "[1] failing: ValueError: cannot treat this model"
    with pytest.raises(ValueError, match="cannot treat"):
        demo.quantity_table(*args, repeats=1, number=1)
