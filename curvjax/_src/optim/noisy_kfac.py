# ruff: noqa: F722  (jaxtyping shape strings are not forward references)
"""Noisy K-FAC / KFAC-VI: natural-gradient variational inference with Kronecker-factored posteriors.

The variational posterior over the weights is ``q = N(μ, Σ)``; the mean ``μ`` is the parameter
pytree the optimizer updates, the covariance is block-diagonal over parameter leaves with

.. math::
    Σ_l = ρ^2 (\\hat F_l + γ I)^{-1}, \\qquad \\hat F_l ≈ A_l ⊗ B_l

for every dense / convolution kernel (the damped Kronecker factors of :func:`curvjax.kfac`,
moving-averaged) and a diagonal ``F̂_l`` for every other floating-point leaf (biases, normalisation
scales). Each step draws ``M`` weight samples ``θ_m ~ q``, averages the gradient and the Fisher
factors over the samples and the batch (eq. 7-8), moving-averages the factors (eq. 9) and takes
a preconditioned step with weight decay and momentum (eq. 10-11).

Layout: a :class:`curvjax.KroneckerBlock` ``(a [G, I, I], b [G, O, O], index [D])`` describes the
block ``P (⊕_g A_g ⊗ B_g) Pᵀ`` of a leaf, where entry ``j`` of the leaf (row-major) sits at
canonical position ``index[j] = (g·I + i)·O + o``. A leaf is moved to the canonical ``[G, I, O]``
layout by scattering its entries to ``index``, where ``(A ⊗ B) vec(X) = vec(A X Bᵀ)`` for the
row-major ``vec`` of each ``X_g [I, O]``; results go back by gathering at ``index``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array, Float, Int, PRNGKeyArray, PyTree

from curvjax._src import blocks as blocks_lib
from curvjax._src import extract as extract_lib
from curvjax._src import kronecker, positions
from curvjax._src.blocks import DiagonalBlock
from curvjax._src.optim import precondition as pre
from curvjax._src.typing import ApplyFn, LossLike


class NoisyKfacState(NamedTuple):
    """State of :func:`scale_by_noisy_kfac`; the posterior mean ``μ`` is ``params`` itself."""

    # [] int32: the number of updates done (t of eq. 6-14)
    count: Int[Array, ""]
    # params-shaped, dtype of the parameters: per dense/conv kernel a KroneckerBlock (a [G, I, I],
    # b [G, O, O]; static index) holding the moving averages of eq. 9; per other float leaf a
    # DiagonalBlock (diagonal shaped like the leaf); None for non-float leaves
    factors: PyTree
    # params-shaped: Σ^{1/2} (eq. 12) from `factors`: a KroneckerRoot (a_vectors [G, I, I],
    # b_vectors [G, O, O], std [G, I, O]) per kernel, a DiagonalRoot (std shaped like the leaf) per
    # other float leaf, None for non-float leaves
    posterior: PyTree


def _is_float(x) -> bool:
    return jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating)


def _is_node(x) -> bool:
    return x is None or blocks_lib.is_block(x)


def find_state(state) -> NoisyKfacState:
    """The :class:`NoisyKfacState` in ``state`` (itself, or inside an ``optax.chain`` state)."""
    if isinstance(state, NoisyKfacState):
        return state
    found = [
        s
        for s in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, NoisyKfacState))
        if isinstance(s, NoisyKfacState)
    ]
    if len(found) != 1:
        raise ValueError(
            f"`state` must be the state of `noisy_kfac` or contain exactly one, found {len(found)}."
        )
    return found[0]


# ---------------------------------------------------------------------------- per-leaf algebra


def _posterior_and_direction(factor, grad, rho, damping, factored):
    """``(Σ^{1/2}, (F̂ + γ I)⁻¹ g)`` of one leaf from its moving-averaged factor.

    Negative eigenvalues of the factors (round-off) are set to zero first.
    """
    eig = factor.nonnegative()
    root = eig.damped_inverse_sqrt(damping, factored=factored, scale=rho)
    return root, eig.damped_power(grad, damping, -1.0, factored=factored)


def _initial_posterior(factor, rho, damping):
    """``Σ^{1/2}`` for zero factors: ``ρ/√γ I`` under either damping split (π = 1)."""
    if factor is None:
        return None
    return factor.prior_root(rho / damping**0.5)


# ---------------------------------------------------------------------------- curvature inputs


def _structure(apply_fn, params, example_inputs):
    """Zero factors with the layout of ``apply_fn``'s kernels (KFLR on one example gives it).

    The computation is compiled (``jax.jit``) even when ``init`` is called eagerly: it runs once,
    and op-by-op it takes seconds; inside the caller's ``jit`` it is inlined.
    """
    one = jax.tree.map(lambda x: x[:1], example_inputs)

    @jax.jit
    def kflr_blocks(params, one):
        batch = positions.placeholder_batch(apply_fn, params, one)
        return extract_lib.extract(apply_fn, params, batch, ("kflr",))["kflr"]

    blocks = kflr_blocks(params, one)

    def zero(leaf, block):
        if not _is_float(leaf):
            return None
        if block.kind == "kronecker":
            return jax.tree.map(jnp.zeros_like, block)
        return DiagonalBlock(jnp.zeros_like(leaf))

    return jax.tree.map(zero, params, blocks, is_leaf=_is_node)


def _mean_sample_axis(x, leaf_ndim: int):
    return jnp.mean(x, axis=0) if x.ndim == leaf_ndim + 1 else x


def _incoming_factor(path, leaf, factor, block):
    """The incoming curvature of one leaf in the layout of its factor, averaged over samples."""
    name = pre.leaf_name(path)
    if factor is None:
        return None
    if block is None:
        raise ValueError(f"`curvature` has no block for the float leaf {name}.")
    if not blocks_lib.is_block(block):
        raise ValueError(
            f"`curvature` holds a {type(block).__name__} for {name}; expected a curvjax block "
            "(the output of `curvjax.kfac`)."
        )
    try:
        return factor.conform(block, leaf.shape)
    except ValueError as err:
        raise ValueError(
            f"`curvature` for {name} {err}: pass the output of `curvjax.kfac` (or "
            "`extract(..., ['kfac'])`) for the same `apply_fn`."
        ) from None


def _map_samples(fn, keys, sample_batch_size):
    """``fn`` over the sample keys: all at once (``vmap``) or ``sample_batch_size`` at a time."""
    if sample_batch_size is None or sample_batch_size >= keys.shape[0]:
        return jax.vmap(fn)(keys)
    return jax.lax.map(fn, keys, batch_size=sample_batch_size)


# ---------------------------------------------------------------------------- public functions


def noisy_kfac_sample(
    params: PyTree, state: PyTree, key: PRNGKeyArray, *, num_samples: int | None = None
) -> PyTree:
    """Weight samples ``θ ~ N(μ, Σ)`` from the Noisy K-FAC posterior.

    For a kernel with factors ``A ⊗ B`` (eigendecompositions ``A = Q_A diag(a) Q_Aᵀ``,
    ``B = Q_B diag(b) Q_Bᵀ``) this is matrix-normal sampling in the canonical layout:

    .. math::
        θ = μ + Q_A \\big(E ⊙ ρ\\, s^{-1/2}\\big) Q_B^⊤, \\quad E_{ij} \\sim N(0, 1), \\quad
        s_{ij} = (a_i + π\\sqrt{γ})(b_j + \\sqrt{γ}/π),

    i.e. ``θ = μ + ρ (A + π√γ I)^{-1/2} E (B + √γ/π I)^{-1/2}`` and
    ``Cov(vec θ) = ρ² [(A + π√γ I) ⊗ (B + √γ/π I)]⁻¹`` (with ``factored_damping=False``,
    ``s_ij = a_i b_j + γ`` and the covariance is exactly ``ρ² (A ⊗ B + γ I)⁻¹``). Other float
    leaves get ``μ + ρ (d + γ)^{-1/2} ε`` with their diagonal Fisher ``d``; non-float leaves are
    copied.

    Args:
      params: the posterior mean ``μ`` (the parameters the optimizer updates).
      state: the state of :func:`noisy_kfac` (or an ``optax.chain`` state that contains it).
      key: PRNG key.
      num_samples: ``None`` for one sample shaped like ``params``; an int ``S`` for ``S`` samples
        stacked on a leading axis, sample ``s`` drawn with ``jax.random.split(key, S)[s]``.

    Returns:
      A pytree like ``params`` (leaves ``[S, *shape]`` when ``num_samples`` is given).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from curvjax._src.optim.noisy_kfac import noisy_kfac, noisy_kfac_sample
      >>> apply_fn = lambda p, x: x @ p["w"] + p["b"][None, :]
      >>> params = {"w": jnp.zeros((4, 3)), "b": jnp.zeros(3)}
      >>> opt = noisy_kfac(apply_fn, jnp.ones((1, 4)), learning_rate=0.1, rho=0.1,
      ...                  damping=1e-2)
      >>> sample = jax.jit(noisy_kfac_sample, static_argnames="num_samples")
      >>> samples = sample(params, opt.init(params), jax.random.key(0), num_samples=5)
      >>> samples["w"].shape
      (5, 4, 3)

    References:
      Zhang, Sun, Duvenaud & Grosse, "Noisy natural gradient as variational inference", ICML 2018,
      §3.2 (matrix-variate Gaussian posterior).
    """
    st = find_state(state)
    if num_samples is not None:
        keys = jax.random.split(key, num_samples)
        return jax.vmap(lambda k: noisy_kfac_sample(params, st, k))(keys)
    leaves, treedef = jax.tree.flatten(params)
    keys = iter(jax.random.split(key, len(leaves)))

    def one(leaf, factor, root):
        k = next(keys)
        if factor is None:
            return leaf
        return leaf + root.sample(k).reshape(leaf.shape).astype(leaf.dtype)

    factors = treedef.flatten_up_to(st.factors)
    roots = treedef.flatten_up_to(st.posterior)
    return treedef.unflatten([one(*args) for args in zip(leaves, factors, roots, strict=True)])


def noisy_kfac_predict(
    apply_fn: ApplyFn,
    params: PyTree,
    state: PyTree,
    inputs: PyTree,
    key: PRNGKeyArray,
    *,
    num_samples: int,
    link: Callable = jax.nn.softmax,
    sample_batch_size: int | None = None,
) -> Float[Array, "N C"]:
    """Monte-Carlo predictive: the mean of ``link(apply_fn(θ_s, inputs))`` over ``S`` samples.

    .. math::
        p(y | x) ≈ \\frac{1}{S} \\sum_{s=1}^S \\operatorname{softmax}(f(x; θ_s)), \\qquad
        θ_s \\sim q = N(μ, Σ) ,

    the Monte-Carlo estimate of the posterior predictive (KFAC-VI eq. 1). Sample ``s`` is
    ``noisy_kfac_sample(params, state, jax.random.split(key, S)[s])``. All samples are drawn and
    evaluated at once (``jax.vmap``) unless ``sample_batch_size`` bounds how many are in memory
    together (``jax.lax.map``).

    Args:
      apply_fn: ``apply_fn(params, inputs) -> outputs [N, C]``.
      params: the posterior mean ``μ``.
      state: the state of :func:`noisy_kfac` (or a chain state containing it).
      inputs: model inputs with a leading batch axis.
      key: PRNG key.
      num_samples: ``S``.
      link: applied to each sample's outputs before averaging (``jax.nn.softmax`` for
        classification; ``lambda f: f`` averages the raw outputs).
      sample_batch_size: how many samples to evaluate together (``None``: all).

    Returns:
      ``[N, C]``: the averaged ``link`` outputs (class probabilities for the default).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from curvjax._src.optim.noisy_kfac import noisy_kfac, noisy_kfac_predict
      >>> apply_fn = lambda p, x: x @ p["w"]
      >>> params = {"w": jnp.zeros((4, 3))}
      >>> opt = noisy_kfac(apply_fn, jnp.ones((1, 4)), learning_rate=0.1, rho=0.1,
      ...                  damping=1e-2)
      >>> predict = jax.jit(noisy_kfac_predict, static_argnums=0, static_argnames="num_samples")
      >>> probs = predict(apply_fn, params, opt.init(params), jnp.ones((2, 4)),
      ...                 jax.random.key(0), num_samples=10)
      >>> probs.shape
      (2, 3)

    References:
      Nakata, Osawa & Yokota, "Variational deep learning based on natural gradient" (KFAC-VI), §4.1
      (test accuracy from the average output of several weight samples).
    """
    st = find_state(state)
    keys = jax.random.split(key, num_samples)

    def one(k):
        return link(apply_fn(noisy_kfac_sample(params, st, k), inputs))

    return jnp.mean(_map_samples(one, keys, sample_batch_size), axis=0)


def scale_by_noisy_kfac(
    apply_fn: ApplyFn,
    example_inputs: PyTree,
    *,
    rho: float,
    damping: float,
    num_samples: int = 1,
    ema_decay: float = 0.95,
    factored_damping: bool = True,
    loss: LossLike = "cross_entropy",
    sample_batch_size: int | None = None,
    approximation: str = "expand",
) -> optax.GradientTransformationExtraArgs:
    """Noisy K-FAC preconditioning: moving-averaged Kronecker factors and the posterior they define.

    The posterior is ``N(μ, Σ)`` with ``μ = params`` and ``Σ_l = ρ² (F̂_l + γ I)⁻¹`` per leaf. One
    update at step ``t`` (KFAC-VI eq. 7-9, 12), for every leaf ``l``:

    .. math::
        θ_m &\\sim N(μ, Σ), \\quad m = 1..M, \\qquad
        \\bar g_l = \\frac{1}{M} \\sum_m ∇_{θ_l} L(θ_m), \\qquad
        \\bar F_l = \\frac{1}{M} \\sum_m A_l(θ_m) ⊗ \\frac{1}{M} \\sum_m B_l(θ_m), \\\\
        \\hat F_l &← (1 - β_t) \\hat F_l + β_t \\bar F_l \\quad \\text{(per factor)}, \\qquad
        β_t = \\max(1 - \\text{ema\\_decay}, 1/(t+1)), \\\\
        d_l &= (\\hat F_l + γ I)^{-1} \\bar g_l, \\qquad Σ_l ← ρ^2 (\\hat F_l + γ I)^{-1} .

    The returned updates are the directions ``d`` (zeros for non-float leaves); follow with weight
    decay, momentum and the learning rate, as :func:`noisy_kfac` does. ``L`` is the mean loss over
    the batch, so ``ḡ`` and ``F̄`` are averages over samples and batch; ``A ⊗ B`` are the K-FAC
    factors of :func:`curvjax.kfac` (Fisher with labels sampled from the model), averaged over the
    samples factor by factor. KFAC-VI's ``β`` is ``1 - ema_decay`` (its Table 1:
    ``β = 0.333``); ``β_t`` weighs the first ``1/β`` estimates equally, so that the zero initial
    factors do not bias ``F̂`` (Martens & Grosse 2015, §5).

    **Damping.** With ``factored_damping=True`` (default, Martens & Grosse §6.3, Zhang et al.)
    ``F̂ + γ I`` means ``(A + π√γ I) ⊗ (B + √γ/π I)`` with
    ``π = √((tr A / dim A) / (tr B / dim B))`` (``π = 1`` while a factor is zero), per feature
    group; with ``False``, exactly ``A ⊗ B + γ I`` (in the factors' eigenbasis; same cost).
    Both are applied through eigendecompositions of ``A`` and ``B`` recomputed every step
    (negative eigenvalues from round-off are set to zero).

    **Other leaves.** Biases, normalisation scales and every leaf that is not the kernel of one
    dense or convolution layer get a *diagonal* Fisher ``F̂ = diag(d)``: the diagonal of their
    :func:`curvjax.kfac` block, moving-averaged the same way. Their posterior is
    ``N(μ, ρ² diag(d + γ)⁻¹)``.

    **Two ways to call ``update``** (both under the caller's ``jax.jit``):

    * *one pass* — ``update(grads, state, params, curvature=blocks)``: ``grads`` and ``blocks``
      (a params-shaped tree of curvjax blocks, e.g. ``extract(apply_fn, θ, batch, ["kfac"],
      key=k)["kfac"]``) computed by the caller at samples drawn with
      :func:`noisy_kfac_sample`; leaves that carry a leading sample axis (as ``jax.vmap`` over
      samples gives) are averaged over it.
    * *convenience* — ``update(None, state, params, batch=batch, key=key)``: draws the ``M``
      samples itself; sample ``m`` uses ``k_m = jax.random.split(key, M)[m]``,
      ``(k_θ, k_y) = jax.random.split(k_m)``, ``θ_m = noisy_kfac_sample(params, state, k_θ)`` and
      ``extract(apply_fn, θ_m, batch, ["kfac"], key=k_y)``, all samples at once (``jax.vmap``;
      ``sample_batch_size`` bounds how many are in memory together). The ``updates`` argument is
      ignored.

    Args:
      apply_fn: ``apply_fn(params, inputs) -> outputs [N, C]``; traced at ``init`` to find the
        dense / convolution kernels and their layout, and used by the convenience path.
      example_inputs: inputs with a leading batch axis (only the first example's shape is used).
      rho: ``ρ``, the scale of the posterior covariance (``0`` for no noise).
      damping: ``γ > 0``.
      num_samples: ``M``, weight samples per step in the convenience path.
      ema_decay: ``1 - β``, the weight of the old factors in the moving average (eq. 9).
      factored_damping: the damping split described above.
      loss: ``"cross_entropy"``, ``"mse"`` or a :class:`curvjax.losses.Loss`, for the
        convenience path.
      sample_batch_size: in the convenience path, how many weight samples to evaluate together
        (``None``: all ``M``, fastest; memory grows with ``M`` times one pass).
      approximation: ``"expand"`` (default) or ``"reduce"``, the K-FAC factors of weights shared
        over positions in the convenience path (see :func:`curvjax.kfac`).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` with state :class:`NoisyKfacState`.

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> from curvjax.optim import scale_by_noisy_kfac
      >>> apply_fn = lambda p, x: x @ p["w"] + p["b"][None, :]
      >>> params = {"w": jnp.zeros((4, 3)), "b": jnp.zeros(3)}
      >>> batch = (jnp.ones((8, 4)), jnp.arange(8) % 3)
      >>> opt = optax.chain(scale_by_noisy_kfac(apply_fn, batch[0], rho=0.01, damping=1e-2),
      ...                   optax.scale(-0.1))
      >>> state = opt.init(params)
      >>> updates, state = jax.jit(opt.update)(None, state, params, batch=batch,
      ...                                      key=jax.random.key(0))
      >>> int(state[0].count), state[0].factors["w"].a.shape
      (1, (1, 4, 4))

    References:
      Zhang, Sun, Duvenaud & Grosse, "Noisy natural gradient as variational inference", ICML 2018;
      Nakata, Osawa & Yokota, "Variational deep learning based on natural gradient" (KFAC-VI),
      eq. 5-12; Martens & Grosse, "Optimizing neural networks with Kronecker-factored
      approximate curvature", ICML 2015, §5 (moving averages), §6.3 (factored Tikhonov damping).
    """
    if not damping > 0:
        raise ValueError(f"`damping` must be positive, got {damping}.")
    if not 0 <= ema_decay < 1:
        raise ValueError(f"`ema_decay` must lie in [0, 1), got {ema_decay}.")
    if rho < 0:
        raise ValueError(f"`rho` must be non-negative, got {rho}.")
    if num_samples < 1:
        raise ValueError(f"`num_samples` must be at least 1, got {num_samples}.")
    if sample_batch_size is not None and sample_batch_size < 1:
        raise ValueError(f"`sample_batch_size` must be None or positive, got {sample_batch_size}.")

    def init(params):
        factors = _structure(apply_fn, params, example_inputs)
        posterior = jax.tree.map(
            lambda f: _initial_posterior(f, rho, damping), factors, is_leaf=_is_node
        )
        return NoisyKfacState(jnp.zeros([], jnp.int32), factors, posterior)

    options = {"kfac": {"approximation": kronecker.check_approximation(approximation)}}

    def estimate(params, state, batch, key):
        def one(k):
            k_theta, k_y = jax.random.split(k)
            theta = noisy_kfac_sample(params, state, k_theta)
            out = extract_lib.extract(
                apply_fn, theta, batch, ["kfac"], loss=loss, key=k_y, options=options
            )
            return out["grad"], out["kfac"]

        return _map_samples(one, jax.random.split(key, num_samples), sample_batch_size)

    def update(updates, state, params=None, *, curvature=None, batch=None, key=None, **extra):
        del extra
        if params is None:
            raise ValueError("`noisy_kfac` needs `params` (the posterior mean) in `update`.")
        if curvature is None:
            if batch is None or key is None:
                missing = [n for n, v in (("batch", batch), ("key", key)) if v is None]
                raise ValueError(
                    f"`noisy_kfac.update` got no `curvature` and no {' and no '.join(missing)}: "
                    "pass `curvature=` (with the gradient as `updates`) or `batch=` and `key=`."
                )
            grads, curvature = estimate(params, state, batch, key)
        else:
            if updates is None:
                raise ValueError(
                    "`noisy_kfac.update` got `curvature` but no gradient: pass the gradient "
                    "averaged over the weight samples as `updates`."
                )
            grads = updates

        count = state.count
        beta = jnp.maximum(1.0 - ema_decay, 1.0 / (count + 1.0))
        paths_leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
        factors = treedef.flatten_up_to(state.factors)
        blocks = treedef.flatten_up_to(curvature)
        grad_leaves = treedef.flatten_up_to(grads)
        new_factors, new_roots, directions = [], [], []
        for (path, leaf), factor, block, g in zip(
            paths_leaves, factors, blocks, grad_leaves, strict=True
        ):
            if factor is None:
                new_factors.append(None)
                new_roots.append(None)
                directions.append(jnp.zeros_like(leaf))
                continue
            if g is None:
                raise ValueError(
                    f"the gradient has no entry for the float leaf {pre.leaf_name(path)}."
                )
            incoming = _incoming_factor(path, leaf, factor, block)
            g = _mean_sample_axis(g, leaf.ndim).astype(leaf.dtype)
            b = beta.astype(leaf.dtype)
            factor = jax.tree.map(
                lambda old, new, b=b: (1 - b) * old + b * new.astype(old.dtype), factor, incoming
            )
            root, direction = _posterior_and_direction(factor, g, rho, damping, factored_damping)
            new_factors.append(factor)
            new_roots.append(root)
            directions.append(direction)

        state = NoisyKfacState(
            count + 1, treedef.unflatten(new_factors), treedef.unflatten(new_roots)
        )
        return treedef.unflatten(directions), state

    return optax.GradientTransformationExtraArgs(init, update)


def _float_mask(tree):
    return jax.tree.map(_is_float, tree)


def noisy_kfac(
    apply_fn: ApplyFn,
    example_inputs: PyTree,
    *,
    learning_rate: optax.ScalarOrSchedule,
    rho: float,
    damping: float,
    num_samples: int = 1,
    ema_decay: float = 0.95,
    momentum: optax.ScalarOrSchedule = 0.0,
    weight_decay: float = 0.0,
    factored_damping: bool = True,
    loss: LossLike = "cross_entropy",
    sample_batch_size: int | None = None,
    approximation: str = "expand",
) -> optax.GradientTransformationExtraArgs:
    """Noisy K-FAC with ``M`` weight samples per step (KFAC-VI), chained from optax pieces.

    :func:`scale_by_noisy_kfac` gives the direction ``d_l = (F̂_l + γ I)⁻¹ ḡ_l`` and updates the
    posterior ``N(μ, ρ² (F̂ + γ I)⁻¹)``; then, on the floating-point leaves (KFAC-VI eq. 10-11),

    .. math::
        v_l ← d_l + \\frac{λ}{α_t} μ_l + m_t v_l, \\qquad μ_l ← μ_l - α_t v_l ,

    as ``optax.add_decayed_weights(λ/α_t)``, ``optax.trace(m_t)`` and
    ``optax.scale_by_learning_rate(α_t)``: ``noisy_kfac(...)`` is

    .. code-block:: python

        optax.chain(
            scale_by_noisy_kfac(apply_fn, example_inputs, rho=..., damping=..., ...),
            optax.masked(optax.chain(
                optax.add_decayed_weights(λ / α_t),
                optax.trace(m_t),  # optax.inject_hyperparams(optax.trace) for a schedule
                optax.scale_by_learning_rate(α_t),
            ), <float leaves>),
        )

    The weight decay enters after the preconditioner, divided by ``α_t`` so that the step on
    ``μ`` carries ``-λ μ`` (KFAC-VI eq. 10); it is therefore not part of the direction whose
    damping defines the posterior. The update returned is ``-α_t v``; add it with
    ``optax.apply_updates``. Non-float leaves are left unchanged.

    **Relation to Zhang et al.** ``ρ² = λ_KL / N`` (KL weight over dataset size) and ``γ`` plays
    the role of the intrinsic damping ``λ_KL / (N η)`` of a prior ``N(0, η I)``: before the first
    update ``Σ = ρ²/γ I``, the prior. ``rho=0`` gives K-FAC with this update rule (no noise).

    ``update`` is called as for :func:`scale_by_noisy_kfac` (one pass with ``curvature=``, or
    ``update(None, state, params, batch=batch, key=key)``). The state is the ``optax.chain`` state;
    its first entry is the :class:`NoisyKfacState`, which :func:`noisy_kfac_sample` and
    :func:`noisy_kfac_predict` find by themselves.

    Args:
      apply_fn: as for :func:`scale_by_noisy_kfac`.
      example_inputs: as for :func:`scale_by_noisy_kfac`.
      learning_rate: ``α_t`` (float or optax schedule, e.g. :func:`warmup_polynomial_decay`).
      rho: ``ρ``, the scale of the posterior covariance (``0`` for no noise).
      damping: ``γ > 0``.
      num_samples: ``M``, weight samples per step in the convenience path.
      ema_decay: ``1 - β``, the weight of the old factors in the moving average (eq. 9).
      momentum: ``m_t`` (float or schedule; :func:`proportional_momentum` gives eq. 6).
      weight_decay: ``λ`` (the prior's weight decay, eq. 10).
      factored_damping: as for :func:`scale_by_noisy_kfac`.
      loss: as for :func:`scale_by_noisy_kfac`.
      sample_batch_size: as for :func:`scale_by_noisy_kfac`.
      approximation: as for :func:`scale_by_noisy_kfac`.

    Returns:
      An ``optax.GradientTransformationExtraArgs``; its state is a tuple whose first entry is the
      :class:`NoisyKfacState`.

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> from curvjax.optim import noisy_kfac
      >>> apply_fn = lambda p, x: x @ p["w"] + p["b"][None, :]
      >>> params = {"w": jnp.zeros((4, 3)), "b": jnp.zeros(3)}
      >>> batch = (jnp.ones((8, 4)), jnp.arange(8) % 3)
      >>> opt = noisy_kfac(apply_fn, batch[0], learning_rate=0.1, rho=0.01, damping=1e-2,
      ...                  num_samples=4, momentum=0.9)
      >>> state = opt.init(params)
      >>> update = jax.jit(opt.update)
      >>> updates, state = update(None, state, params, batch=batch, key=jax.random.key(0))
      >>> params = optax.apply_updates(params, updates)
      >>> int(state[0].count), state[0].factors["w"].a.shape
      (1, (1, 4, 4))

    References:
      Zhang, Sun, Duvenaud & Grosse, "Noisy natural gradient as variational inference", ICML 2018;
      Nakata, Osawa & Yokota, "Variational deep learning based on natural gradient" (KFAC-VI),
      eq. 5-12; Martens & Grosse, "Optimizing neural networks with Kronecker-factored
      approximate curvature", ICML 2015, §6.3 (factored Tikhonov damping).
    """
    if callable(learning_rate):

        def decay(count):
            alpha = jnp.asarray(learning_rate(count))
            return jnp.where(alpha > 0, weight_decay / jnp.where(alpha > 0, alpha, 1.0), 0.0)

    else:
        decay = weight_decay / learning_rate if learning_rate > 0 else 0.0
    if weight_decay == 0:
        decay = 0.0
    if callable(momentum):
        trace = optax.inject_hyperparams(optax.trace)(decay=momentum)
    else:
        trace = optax.trace(decay=momentum)
    tail = optax.chain(
        optax.add_decayed_weights(decay), trace, optax.scale_by_learning_rate(learning_rate)
    )
    return optax.chain(
        scale_by_noisy_kfac(
            apply_fn,
            example_inputs,
            rho=rho,
            damping=damping,
            num_samples=num_samples,
            ema_decay=ema_decay,
            factored_damping=factored_damping,
            loss=loss,
            sample_batch_size=sample_batch_size,
            approximation=approximation,
        ),
        optax.masked(tail, _float_mask),
    )
