"""``python -m curvjax demo [digits|lm]``: train a small model, then time every curvjax quantity.

``demo`` (or ``demo digits``) loads scikit-learn's bundled 8x8 digits (no download), trains a small
flax linen CNN with optax Adam, prints train and test accuracy, and then prints one table row per
quantity that curvjax can compute: a one-line summary of its value and its wall time as a ratio to
a plain jitted ``jax.grad`` of the same loss, measured in the same run.

``demo lm`` trains a small decoder-only transformer (tied embeddings, causal attention) on the
source code of a few standard-library modules, character by character, with AdamW, prints the
held-out loss by position, and prints the same table for the per-sequence quantities of the
token-mean cross-entropy (``reduction="token_mean"``, logits ``[N, T, V]``).

The rows come from one registry, :data:`QUANTITIES`. To add a row (``ggn_diag``, ``kfac``,
Hessian spectra, ...) append one :class:`Quantity` to it. A row whose ``attr`` is not (yet) an
attribute of :mod:`curvjax` is skipped, so the demo runs against any version of the library.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import curvjax
import curvjax.spectral  # noqa: E402,F401  (``import curvjax`` does not import the submodule)
from curvjax._src import blocks as blocks_lib

# A quantity's compute function receives ``(apply_fn, params, batch, **options)`` (options: the
# ``loss`` / ``reduction`` keywords of every curvjax quantity); it is jitted by the demo.
ComputeFn = Callable[..., Any]
# A summary function receives the computed value (a pytree of arrays) and returns one line.
SummaryFn = Callable[[Any], str]

# Quantities that ``curvjax.extract`` computes from first-order information only.
FIRST_ORDER = ("per_example_grads", "batch_l2", "sum_grad_squared", "variance")


# --------------------------------------------------------------------------------------------
# Data and model
# --------------------------------------------------------------------------------------------


def load_digits_split(
    seed: int, test_fraction: float = 0.25
) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """Loads scikit-learn's digits as float32 images in [0, 1] and splits them.

    Args:
      seed: seed of the random permutation that assigns examples to the two splits.
      test_fraction: fraction of the 1,797 examples held out for testing.

    Returns:
      ``((x_train, y_train), (x_test, y_test))`` with images ``[N, 8, 8, 1]`` float32 and
      integer labels ``[N]`` in ``0..9``.
    """
    from sklearn.datasets import load_digits  # imported lazily: an optional dependency

    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)[..., None]  # pixel values are 0..16
    labels = digits.target.astype(np.int32)
    order = np.random.default_rng(seed).permutation(len(labels))
    n_test = int(round(test_fraction * len(labels)))
    test, train = order[:n_test], order[n_test:]
    return (images[train], labels[train]), (images[test], labels[test])


class SmallCNN(nn.Module):
    """Conv(8, 3x3) - relu - Conv(16, 3x3, stride 2) - relu - Dense(32) - relu - Dense(10)."""

    num_classes: int = 10

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.relu(nn.Conv(8, kernel_size=(3, 3))(x))
        x = nn.relu(nn.Conv(16, kernel_size=(3, 3), strides=(2, 2))(x))
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(nn.Dense(32)(x))
        return nn.Dense(self.num_classes)(x)


def make_apply_fn(model: nn.Module) -> Callable[[Any, jax.Array], jax.Array]:
    """Returns ``apply_fn(params, inputs) -> logits [N, C]`` for a flax linen ``model``."""

    def apply_fn(params, inputs):
        return model.apply({"params": params}, inputs)

    return apply_fn


def mean_cross_entropy(apply_fn: Callable, params: Any, batch: tuple) -> jax.Array:
    """Mean softmax cross-entropy of ``apply_fn(params, inputs)`` against integer labels."""
    inputs, labels = batch
    logits = apply_fn(params, inputs)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def accuracy(apply_fn: Callable, params: Any, inputs: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of ``inputs`` whose arg-max logit equals the label."""
    logits = jax.jit(apply_fn)(params, inputs)
    return float(jnp.mean(jnp.argmax(logits, axis=-1) == labels))


def train(
    apply_fn: Callable,
    params: Any,
    train_data: tuple[np.ndarray, np.ndarray],
    *,
    steps: int,
    batch_size: int,
    seed: int,
    learning_rate: float = 3e-3,
) -> tuple[Any, float]:
    """Trains ``params`` with optax Adam on random mini-batches of ``train_data``.

    Args:
      apply_fn: ``apply_fn(params, inputs) -> logits``.
      params: initial parameters.
      train_data: ``(images, labels)``.
      steps: number of Adam steps.
      batch_size: examples per mini-batch (sampled with replacement across steps, without
        replacement within one).
      seed: seed of the mini-batch sampler.
      learning_rate: Adam step size.

    Returns:
      ``(params, last_loss)``: the trained parameters and the loss of the last mini-batch.
    """
    optimizer = optax.adam(learning_rate)
    opt_state = optimizer.init(params)

    @jax.jit
    def step(params, opt_state, batch):
        loss, grads = jax.value_and_grad(mean_cross_entropy, argnums=1)(apply_fn, params, batch)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    images, labels = train_data
    rng = np.random.default_rng(seed)
    loss = jnp.nan
    for _ in range(steps):
        index = rng.choice(len(labels), size=min(batch_size, len(labels)), replace=False)
        params, opt_state, loss = step(params, opt_state, (images[index], labels[index]))
    return params, float(loss)


# --------------------------------------------------------------------------------------------
# Summaries (one line each)
# --------------------------------------------------------------------------------------------


def _total(tree: Any) -> jax.Array:
    """Sum of all entries of all leaves of ``tree``."""
    return sum(jnp.sum(leaf) for leaf in jax.tree.leaves(tree))


def _norm_stats(squared_norms: jax.Array) -> str:
    """Mean and max of ``norm(g_n)`` from per-example squared norms ``[N]``."""
    norms = jnp.sqrt(squared_norms)
    return f"N={norms.shape[0]}: mean norm(g_n) = {norms.mean():.3e}, max = {norms.max():.3e}"


def summarize_grad(grad: Any) -> str:
    """Global norm of the gradient."""
    return f"norm(grad) = {optax.tree.norm(grad):.4e}"


def summarize_per_example_grads(per_example: Any) -> str:
    """Mean and max per-example gradient norm, computed from the ``[N, ...]`` leaves."""
    squared = sum(
        jnp.sum(leaf.reshape(leaf.shape[0], -1) ** 2, axis=1)
        for leaf in jax.tree.leaves(per_example)
    )
    return _norm_stats(squared)


def summarize_batch_l2(batch_l2: Any) -> str:
    """Mean and max per-example gradient norm: ``sqrt`` of ``batch_l2`` summed over leaves."""
    return _norm_stats(sum(jax.tree.leaves(batch_l2)))


def summarize_sum_grad_squared(sum_grad_squared: Any) -> str:
    """Total over entries, which equals ``sum_n ||g_n||^2``."""
    return f"sum over entries = {_total(sum_grad_squared):.4e}"


def summarize_variance(variance: Any) -> str:
    """Total variance, summed over all parameter entries."""
    return f"total variance = {_total(variance):.4e}"


def summarize_extract(result: dict) -> str:
    """Loss and the keys ``extract`` returned."""
    keys = ", ".join(k for k in result if k != "loss")
    return f"loss = {float(result['loss']):.4f}; keys: {keys}"


def summarize_trace(diagonal: Any) -> str:
    """Trace of a curvature diagonal (sum over every parameter entry)."""
    return f"trace = {_total(diagonal):.4e}"


def summarize_blocks(blocks: Any) -> str:
    """Trace of the block-diagonal approximation (``tr A · tr B`` for each Kronecker block)."""
    leaves = jax.tree.leaves(blocks, is_leaf=blocks_lib.is_block)
    kron = sum(block.kind == "kronecker" for block in leaves)
    total = sum(float(block.trace()) for block in leaves)
    return f"{kron} Kronecker blocks, trace = {total:.4e}"


def summarize_spectrum(top: Any) -> str:
    """Largest Hessian eigenvalue, the 10th, and the Hessian-vector products Lanczos used."""
    values = np.asarray(top.eigenvalues)
    return (
        f"lambda_max = {values[0]:.4e}, lambda_10 = {values[-1]:.4e} "
        f"({int(top.num_matvecs)} Hessian-vector products, Lanczos)"
    )


def top_hessian_eigenpairs(apply_fn: Callable, params: Any, batch: tuple, **options: Any) -> Any:
    """Top-10 Hessian eigenpairs by Lanczos (float32-sized tolerance, at most 60 products)."""
    operator = curvjax.spectral.hessian_operator(apply_fn, params, batch, **options)
    return curvjax.spectral.top_eigenpairs(
        operator, 10, key=jax.random.key(0), method="lanczos", max_matvecs=60, tol=1e-3
    )


def save_density_plot(
    apply_fn: Callable,
    params: Any,
    batch: tuple,
    path: str,
    *,
    seed: int = 0,
    options: dict[str, Any] | None = None,
) -> str:
    """Writes the Hessian's spectral density (SLQ, 8 probes x 60 steps) to ``path`` (a PNG).

    ``options`` are the ``loss`` / ``reduction`` keywords of the Hessian. Returns a one-line
    description of what was written.
    """
    import matplotlib

    matplotlib.use("Agg")  # headless: only writes the file
    import matplotlib.pyplot as plt

    operator = curvjax.spectral.hessian_operator(apply_fn, params, batch, **(options or {}))
    grid, density = curvjax.spectral.density(
        operator, key=jax.random.key(seed), num_probes=8, num_steps=60, progress=True
    )
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.semilogy(grid, np.maximum(density, 1e-12))
    ax.set(
        xlabel="eigenvalue",
        ylabel="density",
        ylim=(max(float(density.max()) * 1e-7, 1e-12), None),
        title=f"Hessian spectral density (SLQ, {len(batch[1])} examples)",
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return f"wrote the spectral density to {path} (eigenvalues in [{grid[0]:.3g}, {grid[-1]:.3g}])"


def summarize_hvp(product: Any) -> str:
    """``θᵀ ∇²L θ`` is not available from the product alone; print its norm."""
    return f"norm(H theta) = {optax.tree.norm(product):.4e}"


# --------------------------------------------------------------------------------------------
# The registry
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Quantity:
    """One row of the demo's table.

    Attributes:
      name: label printed in the table's first column.
      attr: the :mod:`curvjax` attribute the row needs; the row is skipped when
        ``hasattr(curvjax, attr)`` is false.
      compute: ``compute(apply_fn, params, batch, **options)`` returning the quantity; jitted by
        the demo (``options`` are the ``loss`` / ``reduction`` keywords of the table).
      summarize: ``summarize(value)`` returning a one-line description of the value.
    """

    name: str
    attr: str
    compute: ComputeFn
    summarize: SummaryFn


def _extract_first_order(apply_fn: Callable, params: Any, batch: tuple, **options: Any) -> dict:
    """``curvjax.extract`` of every first-order quantity this curvjax version provides."""
    quantities = tuple(q for q in FIRST_ORDER if hasattr(curvjax, q))
    return curvjax.extract(apply_fn, params, batch, quantities=quantities, **options)


QUANTITIES: list[Quantity] = [
    Quantity("grad", "grad", lambda f, p, b, **o: curvjax.grad(f, p, b, **o), summarize_grad),
    Quantity(
        "per_example_grads",
        "per_example_grads",
        lambda f, p, b, **o: curvjax.per_example_grads(f, p, b, **o),
        summarize_per_example_grads,
    ),
    Quantity(
        "batch_l2",
        "batch_l2",
        lambda f, p, b, **o: curvjax.batch_l2(f, p, b, **o),
        summarize_batch_l2,
    ),
    Quantity(
        "sum_grad_squared",
        "sum_grad_squared",
        lambda f, p, b, **o: curvjax.sum_grad_squared(f, p, b, **o),
        summarize_sum_grad_squared,
    ),
    Quantity(
        "variance",
        "variance",
        lambda f, p, b, **o: curvjax.variance(f, p, b, **o),
        summarize_variance,
    ),
    Quantity("extract (all first-order)", "extract", _extract_first_order, summarize_extract),
    Quantity(
        "ggn_diag", "ggn_diag", lambda f, p, b, **o: curvjax.ggn_diag(f, p, b, **o), summarize_trace
    ),
    Quantity(
        "ggn_diag_mc",
        "ggn_diag_mc",
        lambda f, p, b, **o: curvjax.ggn_diag_mc(f, p, b, key=jax.random.key(0), **o),
        summarize_trace,
    ),
    Quantity(
        "hessian_diag",
        "hessian_diag",
        lambda f, p, b, **o: curvjax.hessian_diag(f, p, b, **o),
        summarize_trace,
    ),
    Quantity(
        "kfac",
        "kfac",
        lambda f, p, b, **o: curvjax.kfac(f, p, b, key=jax.random.key(0), **o),
        summarize_blocks,
    ),
    Quantity("kflr", "kflr", lambda f, p, b, **o: curvjax.kflr(f, p, b, **o), summarize_blocks),
    Quantity("hvp", "hvp", lambda f, p, b, **o: curvjax.hvp(f, p, b, p, **o), summarize_hvp),
    Quantity("spectrum (top-10, Lanczos)", "spectral", top_hessian_eigenpairs, summarize_spectrum),
]
"""Every row of the demo's table, in order. Append a :class:`Quantity` to add one."""


def available_quantities(
    quantities: Sequence[Quantity] = tuple(QUANTITIES), module: Any = curvjax
) -> tuple[list[Quantity], list[Quantity]]:
    """Splits ``quantities`` into those ``module`` provides and those it does not."""
    present = [q for q in quantities if hasattr(module, q.attr)]
    missing = [q for q in quantities if not hasattr(module, q.attr)]
    return present, missing


# --------------------------------------------------------------------------------------------
# Timing and the table
# --------------------------------------------------------------------------------------------


def time_jitted(
    fn: Callable,
    *args: Any,
    repeats: int = 5,
    number: int = 10,
    max_seconds: float | None = None,
) -> tuple[Any, float]:
    """Median wall time of ``fn(*args)`` in seconds, after one warm-up (compilation) call.

    Each of ``repeats`` measurements times ``number`` back-to-back calls, ending with
    ``jax.block_until_ready``, and divides by ``number``. With ``max_seconds``, one call is timed
    first and ``repeats`` / ``number`` are lowered (to no less than one) so that the measurements
    take about ``max_seconds`` at most.

    Returns:
      ``(value, seconds)``: the value of the warm-up call and the median time per call.
    """
    value = jax.block_until_ready(fn(*args))
    if max_seconds is not None:
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        single = time.perf_counter() - start
        repeats = max(1, min(repeats, int(max_seconds / single)))
        number = max(1, min(number, int(max_seconds / (repeats * single))))
        if single * repeats * number > max_seconds:
            return value, single
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(number):
            out = fn(*args)
        jax.block_until_ready(out)
        samples.append((time.perf_counter() - start) / number)
    return value, statistics.median(samples)


def format_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Formats ``rows`` as an aligned markdown table (numeric-looking columns right-aligned)."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    numeric = [bool(rows) and all(_is_number(r[i]) for r in rows) for i in range(len(header))]

    def line(cells):
        parts = [
            str(c).rjust(w) if num else str(c).ljust(w)
            for c, w, num in zip(cells, widths, numeric, strict=True)
        ]
        return "| " + " | ".join(parts) + " |"

    dashes = [
        "-" * (w + 1) + ":" if num else "-" * (w + 2)
        for w, num in zip(widths, numeric, strict=True)
    ]
    rule = "|" + "|".join(dashes) + "|"
    return "\n".join([line(header), rule, *(line(r) for r in rows)])


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def quantity_table(
    apply_fn: Callable,
    params: Any,
    batch: tuple,
    quantities: Sequence[Quantity] = tuple(QUANTITIES),
    *,
    options: dict[str, Any] | None = None,
    baseline_loss: Callable[[Callable, Any, tuple], jax.Array] = mean_cross_entropy,
    catch_errors: bool = False,
    repeats: int = 5,
    number: int = 10,
    max_seconds: float | None = None,
) -> tuple[str, list[Quantity]]:
    """Times every available quantity against a jitted ``jax.grad`` baseline.

    Args:
      apply_fn: ``apply_fn(params, inputs) -> logits [N, C]`` (or ``[N, T, V]``).
      params: parameters at which to evaluate.
      batch: ``(inputs, labels)`` or ``(inputs, labels, weights)``.
      quantities: the registry rows to evaluate.
      options: keywords passed to every row's ``compute`` (e.g. ``{"reduction": "token_mean"}``).
      baseline_loss: ``baseline_loss(apply_fn, params, batch)``, the loss whose ``jax.grad`` is
        the time unit; it must be the loss the rows compute curvature of.
      catch_errors: if true, a row whose computation raises shows the error's type and a
        footnote number instead of a value (its time columns read ``-``), and the table ends with
        the footnotes (each error's first line); if false the error propagates.
      repeats, number, max_seconds: see :func:`time_jitted` (per row).

    Returns:
      ``(table, skipped)``: the formatted table and the rows skipped because curvjax lacks them.
    """
    present, skipped = available_quantities(quantities)
    options = dict(options or {})

    baseline = jax.jit(lambda p, b: jax.grad(baseline_loss, argnums=1)(apply_fn, p, b))
    timing = {"repeats": repeats, "number": number, "max_seconds": max_seconds}
    _, base_seconds = time_jitted(baseline, params, batch, **timing)

    rows = [["jax.grad (baseline)", f"{1e3 * base_seconds:.3f}", "1.00", "reference"]]
    notes = []
    for quantity in present:
        fn = jax.jit(lambda p, b, q=quantity: q.compute(apply_fn, p, b, **options))
        try:
            value, seconds = time_jitted(fn, params, batch, **timing)
        except Exception as error:  # noqa: BLE001  (shown in the table when asked to)
            if not catch_errors:
                raise
            message = (str(error).strip().splitlines() or [""])[0]
            notes.append(f"[{len(notes) + 1}] {quantity.name}: {type(error).__name__}: {message}")
            rows.append([quantity.name, "-", "-", f"raised {type(error).__name__} [{len(notes)}]"])
            continue
        rows.append(
            [
                quantity.name,
                f"{1e3 * seconds:.3f}",
                f"{seconds / base_seconds:.2f}",
                quantity.summarize(value),
            ]
        )
    header = ["quantity", "time [ms]", "ratio to grad", "summary"]
    return "\n".join([format_table(header, rows), *notes]), skipped


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------


def run_demo(
    *, steps: int = 300, batch_size: int = 128, seed: int = 0, plot: str | None = None
) -> None:
    """Trains the CNN on digits, prints accuracies and the table of quantities.

    Args:
      steps: Adam steps.
      batch_size: mini-batch size for training and for the quantity table.
      seed: seed for the data split, the initialisation and the mini-batch sampler.
      plot: if given, a path where the Hessian's spectral density is written as a PNG.
    """
    (x_train, y_train), (x_test, y_test) = load_digits_split(seed)
    model = SmallCNN()
    apply_fn = make_apply_fn(model)
    # An "rbg" key: on CPU, XLA compiles its random-number kernels in a fraction of the time it
    # takes for the default threefry ones, which dominate start-up for a model this small.
    key = jax.random.key(seed, impl="rbg")
    params = jax.jit(model.init)(key, x_train[:1])["params"]
    num_params = sum(leaf.size for leaf in jax.tree.leaves(params))
    print(
        f"digits: {len(y_train)} train / {len(y_test)} test images 8x8x1; "
        f"SmallCNN with {num_params} parameters; backend {jax.default_backend()}"
    )

    start = time.perf_counter()
    params, last_loss = train(
        apply_fn, params, (x_train, y_train), steps=steps, batch_size=batch_size, seed=seed
    )
    print(
        f"trained {steps} Adam steps (batch {batch_size}) in {time.perf_counter() - start:.1f} s; "
        f"last loss {last_loss:.4f}"
    )
    print(
        f"train accuracy {accuracy(apply_fn, params, x_train, y_train):.4f}, "
        f"test accuracy {accuracy(apply_fn, params, x_test, y_test):.4f}"
    )

    n = min(batch_size, len(y_train))
    batch = (jnp.asarray(x_train[:n]), jnp.asarray(y_train[:n]))
    print()
    print(
        f"curvjax quantities on a batch of N={n} (loss cross_entropy, reduction mean; "
        "g_n = grad loss_n / N); median time per call, jitted, after warm-up:"
    )
    table, skipped = quantity_table(apply_fn, params, batch)
    print(table)
    if skipped:
        names = ", ".join(q.name for q in skipped)
        print(f"skipped (not in this curvjax version): {names}")
    if plot is not None:
        if hasattr(curvjax, "spectral"):
            print(save_density_plot(apply_fn, params, batch, plot, seed=seed))
        else:
            print("--plot skipped: this curvjax has no curvjax.spectral")


# --------------------------------------------------------------------------------------------
# ``demo lm``: a transformer language model on standard-library source code
# --------------------------------------------------------------------------------------------


def _row(name: str) -> Quantity:
    return next(q for q in QUANTITIES if q.name == name)


LM_QUANTITIES: list[Quantity] = [
    *(
        _row(name)
        for name in (
            "grad",
            "per_example_grads",
            "batch_l2",
            "sum_grad_squared",
            "variance",
            "extract (all first-order)",
            "ggn_diag_mc",
        )
    ),
    Quantity(
        "hessian_diag (Hutchinson, 10 probes)",
        "hessian_diag",
        lambda f, p, b, **o: curvjax.hessian_diag(
            f, p, b, method="hutchinson", key=jax.random.key(0), mc_samples=10, **o
        ),
        summarize_trace,
    ),
    Quantity(
        "kfac (expand)",
        "kfac",
        lambda f, p, b, **o: curvjax.kfac(
            f, p, b, key=jax.random.key(0), approximation="expand", **o
        ),
        summarize_blocks,
    ),
    Quantity(
        "kfac (reduce)",
        "kfac",
        lambda f, p, b, **o: curvjax.kfac(
            f, p, b, key=jax.random.key(0), approximation="reduce", **o
        ),
        summarize_blocks,
    ),
    _row("hvp"),
    Quantity(
        "ggn_vp", "ggn_vp", lambda f, p, b, **o: curvjax.ggn_vp(f, p, b, p, **o), summarize_hvp
    ),
    _row("spectrum (top-10, Lanczos)"),
]
"""The rows of ``demo lm``: first-order quantities, Monte-Carlo and Hutchinson diagonals, K-FAC's
expand and reduce approximations, curvature-vector products and the top of the spectrum."""

LM_EXACT_QUANTITIES: list[Quantity] = [
    _row("ggn_diag"),
    Quantity(
        "kflr (expand)",
        "kflr",
        lambda f, p, b, **o: curvjax.kflr(f, p, b, approximation="expand", **o),
        summarize_blocks,
    ),
    _row("hessian_diag"),
]
"""The rows ``demo lm --exact`` adds: exact GGN quantities backpropagate ``T · V`` output columns
per sequence, the exact Hessian diagonal those and its residual columns besides."""


def padded_batch(
    tokens: np.ndarray, targets: np.ndarray, *, seed: int
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(tokens, targets, mask)``: sequence ``n`` keeps its first ``length_n`` positions.

    Lengths are drawn uniformly from ``T/2 .. T`` (``numpy.random.default_rng(seed)``); the mask
    ``[N, T]`` is 1 on kept positions and 0 on padding, whose targets are set to 0 (any target
    would do: masked positions contribute nothing).
    """
    n, length = tokens.shape
    lengths = np.random.default_rng(seed).integers(length // 2, length + 1, size=n)
    mask = (np.arange(length)[None, :] < lengths[:, None]).astype(np.float32)
    targets = np.where(mask > 0, targets, 0)
    return jnp.asarray(tokens), jnp.asarray(targets), jnp.asarray(mask)


def run_lm_demo(
    *,
    steps: int = 300,
    batch_size: int = 32,
    seq_len: int = 32,
    seed: int = 0,
    plot: str | None = None,
    exact: bool = False,
) -> None:
    """Trains a small transformer LM on standard-library source, prints losses and the table.

    Args:
      steps: AdamW steps.
      batch_size: sequences per training step and in the quantity table.
      seq_len: ``T``, characters per sequence.
      seed: seed for the data, the initialisation, the mini-batches and the padding lengths.
      plot: if given, a path where the Hessian's spectral density is written as a PNG.
      exact: also time the exact GGN diagonal, KFLR and the exact Hessian diagonal
        (:data:`LM_EXACT_QUANTITIES`; slow: ``T · V`` backpropagated columns per sequence).
    """
    from curvjax._src import lm  # imported here: reads the standard-library sources

    config = lm.Config(width=32, num_heads=2, num_layers=2, seq_len=seq_len)
    apply_fn = lm.make_apply_fn(config)
    train_data = lm.char_data(4096, seq_len, seed=seed)
    test_tokens, test_targets = lm.char_data(256, seq_len, seed=seed, split="test")
    key = jax.random.key(seed, impl="rbg")  # fast to compile on CPU (see run_demo)
    params = jax.jit(lambda k: lm.init(k, config))(key)
    print(
        f"lm: {len(lm.corpus())} characters of Python source ({', '.join(lm.MODULES)}), "
        f"vocabulary V={config.vocab_size}; transformer with {config.num_layers} pre-LN blocks, "
        f"width {config.width}, {config.num_heads} heads, T={seq_len}, tied embedding, "
        f"{lm.num_params(params)} parameters; backend {jax.default_backend()}"
    )

    start = time.perf_counter()
    params, losses = lm.train(
        apply_fn, params, train_data, steps=steps, batch_size=batch_size, seed=seed
    )
    if steps:
        print(
            f"trained {steps} AdamW steps (batch {batch_size}) in "
            f"{time.perf_counter() - start:.1f} s; loss {losses[0]:.3f} -> {losses[-1]:.3f} "
            f"(uniform: log V = {np.log(config.vocab_size):.3f})"
        )
    per_token = np.asarray(
        jax.jit(lm.per_token_loss, static_argnums=0)(apply_fn, params, test_tokens, test_targets)
    )
    by_position = per_token.mean(axis=0)
    shown = sorted({0, 1, 3, 7, 15, seq_len - 1} & set(range(seq_len)))
    print(
        f"held-out loss {per_token.mean():.3f} nats/char; by position (context length): "
        + ", ".join(f"t={t}: {by_position[t]:.2f}" for t in shown)
    )

    batch = padded_batch(train_data[0][:batch_size], train_data[1][:batch_size], seed=seed)
    print()
    print(
        f"curvjax quantities on N={batch_size} sequences of at most T={seq_len} characters, "
        f"{int(batch[2].sum())} unpadded (logits [N, T, V], cross_entropy, "
        "reduction token_mean: g_n = grad loss_n / number of unpadded tokens); median time per "
        "call, jitted, after warm-up:"
    )
    options = {"reduction": "token_mean"}
    rows = LM_QUANTITIES + (LM_EXACT_QUANTITIES if exact else [])
    table, skipped = quantity_table(
        apply_fn,
        params,
        batch,
        rows,
        options=options,
        baseline_loss=lm.token_mean_loss,
        catch_errors=True,
        repeats=3,
        number=5,
        max_seconds=1.0,
    )
    print(table)
    if not exact:
        print(
            f"not timed: ggn_diag, kflr and the exact hessian_diag (exact GGN quantities "
            f"backpropagate T*V = {seq_len * config.vocab_size} columns per sequence; "
            "add --exact to time them)"
        )
    if skipped:
        print(f"skipped (not in this curvjax version): {', '.join(q.name for q in skipped)}")
    if plot is not None:
        print(save_density_plot(apply_fn, params, batch, plot, seed=seed, options=options))
