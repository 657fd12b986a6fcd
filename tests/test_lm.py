"""The transformer language model and its character data (``curvjax._src.lm``), and curvjax's
per-sequence quantities on it (flax linen and the equinox twin of ``models.equinox_lm``)."""

import equinox as eqx
import jax
import jax.numpy as jnp
import models
import numpy as np
import pytest

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
