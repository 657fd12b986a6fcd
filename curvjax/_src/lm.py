# ruff: noqa: F722  (jaxtyping shape strings are not forward references)
"""A small decoder-only transformer language model and character-level text that ships with Python.

Used by ``python -m curvjax demo lm``, the language-model notebook, the tests and the transformer
benchmark. Three parts:

* **Data.** :func:`corpus` reads the source code of a few standard-library modules from disk
  (nothing is downloaded), :func:`encode` maps it to token ids over a printable-ASCII vocabulary
  (:data:`VOCAB`, ``V = 97``: newline, the 95 printable characters and one id for anything else)
  and :func:`char_data` cuts ``N`` sequences of ``T`` tokens with their next-character targets.
* **Model.** :class:`Transformer` (flax linen): token and learned position embeddings, ``L``
  pre-norm blocks (causal multi-head self-attention and a GELU MLP, each added to the residual
  stream), a final norm and a **tied** output embedding (``logits = h Eᵀ``). Attention is written
  with plain ``jnp`` (einsum, a causal mask with ``jnp.where``, softmax) and treats every sequence
  on its own, so per-sequence quantities are defined. :func:`init` and :func:`make_apply_fn` give
  ``params`` and ``apply_fn(params, tokens [N, T]) -> logits [N, T, V]``.
* **Training.** :func:`token_mean_loss` (the masked mean of the per-token cross-entropy) and
  :func:`train` (optax AdamW, all steps inside one compiled ``lax.scan``).

Example:
  >>> import jax
  >>> from curvjax._src import lm
  >>> config = lm.Config(width=16, num_heads=2, num_layers=1, seq_len=8)
  >>> tokens, targets = lm.char_data(4, config.seq_len)
  >>> params = lm.init(jax.random.key(0), config)
  >>> lm.make_apply_fn(config)(params, tokens).shape
  (4, 8, 97)
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Array, Float, Int

#: newline, then the printable ASCII characters ``" "`` to ``"~"``; every other character maps to
#: the last id, :data:`UNKNOWN`
VOCAB: str = "\n" + "".join(chr(c) for c in range(32, 127))
#: id of characters outside :data:`VOCAB` (tabs, non-ASCII letters)
UNKNOWN: int = len(VOCAB)
#: vocabulary size of :func:`encode`'s ids: ``len(VOCAB) + 1 = 97``
VOCAB_SIZE: int = len(VOCAB) + 1
#: standard-library modules whose source is the default corpus: pure-Python files present in every
#: CPython 3.10 to 3.13 installation (about 95,000 characters together)
MODULES: tuple[str, ...] = ("textwrap", "string", "heapq", "bisect", "functools")

_LOOKUP = np.full(128, UNKNOWN, dtype=np.int32)
_LOOKUP[[ord(c) for c in VOCAB]] = np.arange(len(VOCAB), dtype=np.int32)


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


def corpus(modules: Sequence[str] = MODULES) -> str:
    """The source code of the standard-library ``modules``, concatenated in the order given.

    Args:
      modules: importable module names whose source file exists (``inspect.getsource`` must
        succeed: pure-Python modules, not built-in or compiled ones).

    Returns:
      One string, the sources joined by a blank line. It depends on the Python version (the files
      differ between releases), not on anything random.
    """
    sources = []
    for name in modules:
        module = importlib.import_module(name)
        try:
            sources.append(inspect.getsource(module))
        except (OSError, TypeError) as error:
            raise ValueError(
                f"modules: cannot read the source of {name!r} ({error}); pass pure-Python "
                f"standard-library modules such as {MODULES}"
            ) from error
    return "\n\n".join(sources)


def encode(text: str) -> Int[np.ndarray, " length"]:
    """Token ids of ``text``: the index in :data:`VOCAB`, or :data:`UNKNOWN` for other characters.

    Example:
      >>> from curvjax._src import lm
      >>> lm.decode(lm.encode("def f():\\n\\treturn é"))
      'def f():\\n?return ?'
    """
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    return _LOOKUP[np.minimum(codes, 127)] if codes.size else np.zeros(0, np.int32)


def decode(ids: Any) -> str:
    """The text of token ids; :data:`UNKNOWN` is shown as ``"?"``."""
    table = VOCAB + "?"
    return "".join(table[int(i)] for i in np.asarray(ids).reshape(-1))


def char_data(
    num_sequences: int,
    seq_len: int,
    *,
    seed: int = 0,
    split: str = "train",
    test_fraction: float = 0.1,
    modules: Sequence[str] = MODULES,
) -> tuple[Int[np.ndarray, "N T"], Int[np.ndarray, "N T"]]:
    """``num_sequences`` windows of ``seq_len`` characters of :func:`corpus` and their next characters.

    The encoded corpus is split once: the first ``1 - test_fraction`` of it is ``"train"``, the
    rest ``"test"`` (windows never cross the boundary). Window starts are drawn uniformly (with
    replacement) from ``numpy.random.default_rng(seed)``, so the data is a deterministic function
    of the arguments and the Python version.

    Args:
      num_sequences: ``N``.
      seq_len: ``T``.
      seed: seed of the window starts.
      split: ``"train"`` or ``"test"``.
      test_fraction: fraction of the corpus held out as ``"test"``.
      modules: the modules of :func:`corpus`.

    Returns:
      ``(tokens, targets)``, int32 ``[N, T]`` each, with ``targets[n, t] = tokens[n, t + 1]`` for
      ``t < T - 1`` (the character after the window for ``t = T - 1``).
    """
    if num_sequences < 1 or seq_len < 1:
        raise ValueError(
            f"num_sequences={num_sequences} and seq_len={seq_len} must both be at least 1"
        )
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction={test_fraction} must lie strictly between 0 and 1")
    ids = encode(corpus(modules))
    boundary = int(round((1.0 - test_fraction) * len(ids)))
    if split == "train":
        ids = ids[:boundary]
    elif split == "test":
        ids = ids[boundary:]
    else:
        raise ValueError(f"split={split!r}; expected 'train' or 'test'")
    if len(ids) < seq_len + 1:
        raise ValueError(
            f"seq_len={seq_len}: the {split!r} split has only {len(ids)} characters; use a "
            "shorter seq_len, more modules or another test_fraction"
        )
    starts = np.random.default_rng(seed).integers(0, len(ids) - seq_len, size=num_sequences)
    windows = starts[:, None] + np.arange(seq_len + 1)[None, :]
    chunks = ids[windows]
    return chunks[:, :-1].astype(np.int32), chunks[:, 1:].astype(np.int32)


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Config:
    """Sizes of :class:`Transformer`.

    Attributes:
      vocab_size: ``V``, number of token ids (and of logits per position).
      width: ``d``, the residual-stream width (a multiple of ``num_heads``).
      num_heads: attention heads per block; each has ``d / num_heads`` features.
      num_layers: number of transformer blocks.
      seq_len: ``T``, the longest sequence (size of the learned position embedding).
      mlp_ratio: the MLP's hidden width is ``mlp_ratio * d``.
      norm: ``"layernorm"`` or ``"rmsnorm"``.
    """

    vocab_size: int = VOCAB_SIZE
    width: int = 32
    num_heads: int = 2
    num_layers: int = 2
    seq_len: int = 32
    mlp_ratio: int = 4
    norm: str = "layernorm"

    def __post_init__(self):
        if self.width % self.num_heads:
            raise ValueError(f"width={self.width} must be a multiple of num_heads={self.num_heads}")
        if self.norm not in ("layernorm", "rmsnorm"):
            raise ValueError(f"norm={self.norm!r}; expected 'layernorm' or 'rmsnorm'")
        for field in ("vocab_size", "width", "num_heads", "num_layers", "seq_len", "mlp_ratio"):
            if getattr(self, field) < 1:
                raise ValueError(f"{field}={getattr(self, field)} must be at least 1")


def causal_attention(
    q: Float[Array, "N T H D"], k: Float[Array, "N T H D"], v: Float[Array, "N T H D"]
) -> Float[Array, "N T H D"]:
    """Causal scaled dot-product attention of each sequence with itself.

    .. math::
        o_{t} = \\sum_{s \\le t} \\operatorname{softmax}_s\\Big(\\frac{q_t \\cdot k_s}{\\sqrt D}
        \\Big) v_s \\quad \\text{(per sequence and head)}.

    Masked scores are replaced by the dtype's most negative finite value before the softmax, so
    their weights are exactly zero.
    """
    scale = 1.0 / np.sqrt(q.shape[-1])
    scores = jnp.einsum("nthd,nshd->nhts", q, k) * scale
    length = q.shape[1]
    causal = jnp.tril(jnp.ones((length, length), dtype=bool))
    scores = jnp.where(causal[None, None], scores, jnp.finfo(scores.dtype).min)
    weights = jax.nn.softmax(scores, axis=-1)
    return jnp.einsum("nhts,nshd->nthd", weights, v)


def _norm(config: Config, name: str) -> nn.Module:
    if config.norm == "rmsnorm":
        return nn.RMSNorm(name=name)
    return nn.LayerNorm(name=name)


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm(x))``, then ``x + mlp(norm(x))``."""

    config: Config

    @nn.compact
    def __call__(self, x: Float[Array, "N T d"]) -> Float[Array, "N T d"]:
        config = self.config
        n, length, width = x.shape
        heads, head_dim = config.num_heads, width // config.num_heads
        h = _norm(config, "norm_attention")(x)
        qkv = nn.Dense(3 * width, name="qkv")(h).reshape(n, length, 3, heads, head_dim)
        attended = causal_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2])
        x = x + nn.Dense(width, name="attention_out")(attended.reshape(n, length, width))
        h = _norm(config, "norm_mlp")(x)
        h = nn.gelu(nn.Dense(config.mlp_ratio * width, name="mlp_in")(h))
        return x + nn.Dense(width, name="mlp_out")(h)


class Transformer(nn.Module):
    """Decoder-only transformer LM with a tied output embedding: ``tokens [N, T] -> logits [N, T, V]``.

    ``x = E[tokens] + P[:T]``, ``L`` :class:`Block` s, a final norm, ``logits = norm(x) Eᵀ``
    (the token embedding ``E`` ``[V, d]`` is also the output projection). No dropout, no biases
    in the output projection.
    """

    config: Config

    @nn.compact
    def __call__(self, tokens: Int[Array, "N T"]) -> Float[Array, "N T V"]:
        config = self.config
        length = tokens.shape[1]
        if length > config.seq_len:
            raise ValueError(
                f"tokens have T={length} positions but config.seq_len={config.seq_len}; build "
                "the model with a larger seq_len"
            )
        embed = nn.Embed(config.vocab_size, config.width, name="embed")
        positions = self.param(
            "positions", nn.initializers.normal(0.02), (config.seq_len, config.width)
        )
        x = embed(tokens) + positions[None, :length]
        for i in range(config.num_layers):
            x = Block(config, name=f"block_{i}")(x)
        return embed.attend(_norm(config, "norm_final")(x))


def init(key: jax.Array, config: Config) -> dict:
    """Parameters of :class:`Transformer` for ``config`` (flax's default initialisers, float32).

    Returns:
      The ``params`` collection (a nested dict), the first argument of :func:`make_apply_fn`'s
      function.
    """
    tokens = jnp.zeros((1, config.seq_len), jnp.int32)
    return Transformer(config).init(key, tokens)["params"]


def make_apply_fn(config: Config) -> Callable[[Any, Any], jax.Array]:
    """``apply_fn(params, tokens [N, T]) -> logits [N, T, V]`` of :class:`Transformer`."""
    model = Transformer(config)

    def apply_fn(params, tokens):
        return model.apply({"params": params}, tokens)

    return apply_fn


def num_params(params: Any) -> int:
    """Number of parameter entries."""
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(params))


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


def per_token_loss(
    apply_fn: Callable, params: Any, tokens: Any, targets: Any
) -> Float[Array, "N T"]:
    """Cross-entropy of every position, ``-log softmax(logits)[target]``, shape ``[N, T]``."""
    logits = apply_fn(params, tokens)
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets)


def token_mean_loss(apply_fn: Callable, params: Any, batch: tuple) -> jax.Array:
    """The loss an LM trainer minimises: ``Σ_{n,t} w_{n,t} ℓ_{n,t} / Σ_{n,t} w_{n,t}``.

    ``batch`` is ``(tokens, targets)`` (``w = 1``) or ``(tokens, targets, mask)`` with ``mask``
    ``[N, T]``; this is curvjax's ``reduction="token_mean"`` with cross-entropy.
    """
    tokens, targets, *rest = batch
    losses = per_token_loss(apply_fn, params, tokens, targets)
    if not rest:
        return losses.mean()
    mask = jnp.asarray(rest[0], losses.dtype)
    return jnp.sum(losses * mask) / jnp.sum(mask)


def batch_indices(num_examples: int, steps: int, batch_size: int, *, seed: int = 0) -> np.ndarray:
    """The mini-batches of :func:`train`: ``[steps, min(batch_size, num_examples)]`` int indices.

    Row ``k`` holds distinct indices drawn by ``numpy.random.default_rng(seed)``; use it to feed
    another optimizer the same sequences in the same order.
    """
    rng = np.random.default_rng(seed)
    size = min(batch_size, num_examples)
    rows = [rng.choice(num_examples, size=size, replace=False) for _ in range(steps)]
    return np.stack(rows) if rows else np.zeros((0, size), np.int64)


def train(
    apply_fn: Callable,
    params: Any,
    data: tuple[Any, Any],
    *,
    steps: int,
    batch_size: int = 32,
    learning_rate: float = 3e-3,
    weight_decay: float = 1e-2,
    seed: int = 0,
) -> tuple[Any, np.ndarray]:
    """Trains ``params`` with optax AdamW on random mini-batches of ``data``.

    All ``steps`` run in one compiled ``jax.lax.scan``; the mini-batches are
    :func:`batch_indices` (drawn up front, without replacement within a step).

    Args:
      apply_fn: ``apply_fn(params, tokens) -> logits [N, T, V]``.
      params: initial parameters.
      data: ``(tokens, targets)``, ``[N, T]`` each (e.g. from :func:`char_data`).
      steps: number of AdamW steps.
      batch_size: sequences per step (at most ``N``).
      learning_rate, weight_decay: AdamW's step size and decoupled weight decay.
      seed: seed of the mini-batch sampler.

    Returns:
      ``(params, losses)``: the trained parameters and the token-mean loss of each step's
      mini-batch before its update, a float array ``[steps]``.
    """
    tokens, targets = jnp.asarray(data[0]), jnp.asarray(data[1])
    index = batch_indices(tokens.shape[0], steps, batch_size, seed=seed)
    optimizer = optax.adamw(learning_rate, weight_decay=weight_decay)

    @jax.jit
    def run(params, index):
        def step(carry, rows):
            params, opt_state = carry
            batch = (tokens[rows], targets[rows])
            loss, grads = jax.value_and_grad(token_mean_loss, argnums=1)(apply_fn, params, batch)
            updates, opt_state = optimizer.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), loss

        (params, _), losses = jax.lax.scan(step, (params, optimizer.init(params)), index)
        return params, losses

    if steps == 0:
        return params, np.zeros(0, np.float32)
    params, losses = run(params, jnp.asarray(index))
    return params, np.asarray(losses)
