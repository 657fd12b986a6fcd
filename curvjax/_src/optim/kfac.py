# ruff: noqa: F722  (jaxtyping shape strings are not forward references)
"""K-FAC (Martens & Grosse 2015) as optax transforms: ``scale_by_kfac`` and the full ``kfac``.

Both keep in their state moving averages of the Kronecker factors and a preconditioner refreshed
every ``T`` steps (``lax.cond`` on the step counter). With ``block="diagonal"`` the factors are
the blocks of :func:`curvjax.kfac` (or ``kflr`` / ``kfra``; biases are their own dense block) and
the preconditioner holds their eigendecompositions, so the current damping enters at every step.
With ``block="tridiagonal"`` (feed-forward chains of dense layers) they are the
:class:`~curvjax.ChainFactors` with the cross-layer factors and the
preconditioner is the block-tridiagonal inverse of §4.3, computed with the damping of the
refresh step.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array, Float, Int, PyTree

from curvjax._src import blocks as blocks_lib
from curvjax._src import chain, kronecker, positions, products
from curvjax._src import extract as extract_lib
from curvjax._src import taps as taps_lib
from curvjax._src.optim import precondition as pre
from curvjax._src.optim import tridiagonal
from curvjax._src.typing import ApplyFn, LossLike

BLOCK_KINDS = ("diagonal", "tridiagonal")


class ScaleByKfacState(NamedTuple):
    """State of :func:`scale_by_kfac`."""

    # [] int32: updates done so far
    count: Int[Array, ""]
    # moving averages, dtype of the params. block="diagonal": a params-shaped tree of
    # KroneckerBlock (a [G, I, I], b [G, O, O]; static index) / DenseBlock ([D, D]) /
    # DiagonalBlock (leaf-shaped) / None (non-float leaves); block="tridiagonal": ChainFactors
    factors: PyTree
    # refreshed every `inverse_interval` steps. block="diagonal": params-shaped eigendecomposed
    # blocks (`block.eigh()`: KroneckerEigh / DenseEigh / DiagonalBlock) / None;
    # block="tridiagonal": TridiagonalInverse
    inverse: PyTree


class KfacState(NamedTuple):
    """State of :func:`kfac`."""

    # [] int32: updates done so far
    count: Int[Array, ""]
    # [] dtype of the params: λ, adapted by the Levenberg-Marquardt rule
    damping: Float[Array, ""]
    # as in ScaleByKfacState
    factors: PyTree
    # as in ScaleByKfacState
    inverse: PyTree
    # params-shaped, dtype of the params: δ of the previous step (zeros at first)
    previous_update: PyTree
    # [] dtype of the params: the last reduction ratio ρ (NaN before the first adaptation; with
    # reject_failed_steps, the ρ of the last step)
    rho: Float[Array, ""]


def _shape_structs(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x)), tree)


def _ema(old, new, decay):
    """``decay · old + (1 - decay) · new`` for the float fields; integer fields from ``new``.

    Curvature blocks average by their own rule (``block.moving_average``: the factors of Kronecker
    blocks, the projection onto the new eigenbasis for eigenvalue-corrected ones).
    """

    def mix(o, n):
        if blocks_lib.is_block(n):
            return n.moving_average(o, decay)
        if jnp.issubdtype(n.dtype, jnp.integer):
            return n
        d = jnp.asarray(decay, o.dtype)
        return d * o + (1 - d) * n

    return jax.tree.map(mix, old, new, is_leaf=blocks_lib.is_block)


class _Core:
    """The parts shared by :func:`scale_by_kfac` and :func:`kfac`."""

    def __init__(
        self,
        apply_fn,
        example_inputs,
        block,
        quantity,
        loss,
        reduction,
        mc_samples,
        approximation="expand",
    ):
        kronecker.check_approximation(approximation)
        if approximation != "expand" and (block != "diagonal" or quantity == "kfra"):
            raise ValueError(
                f"approximation={approximation!r} applies to quantity 'kfac', 'kflr' or 'ekfac' "
                "with block='diagonal' (KFRA and the tridiagonal blocks take chains of dense "
                "layers that share no weight over positions, where expand and reduce coincide)."
            )
        self.approximation = approximation
        if block not in BLOCK_KINDS:
            raise ValueError(f"`block` must be one of {BLOCK_KINDS}, got {block!r}.")
        allowed = ("kfac", "kflr", "kfra", "ekfac") if block == "diagonal" else ("kfac", "kflr")
        if quantity not in allowed:
            raise ValueError(f"`quantity` must be one of {allowed} for block={block!r}.")
        if apply_fn is None or example_inputs is None:
            raise ValueError("K-FAC needs `apply_fn=` and `example_inputs=` to lay out its state.")
        self.apply_fn, self.block, self.quantity = apply_fn, block, quantity
        self.loss, self.reduction, self.mc_samples = loss, reduction, mc_samples
        self.one = jax.tree.map(lambda x: x[:1], example_inputs)

    # --- layout ------------------------------------------------------------------------------
    def layers(self, params):
        model = taps_lib.TracedModel(self.apply_fn, params, self.one)
        return model, chain.chain_layers(model)

    def init(self, params):
        """Zero factors and preconditioner with the model's layout."""
        structs = _shape_structs(params)
        if self.block == "tridiagonal":
            fn = lambda p: chain.chain_factors(  # noqa: E731
                self.apply_fn,
                p,
                positions.placeholder_batch(self.apply_fn, p, self.one),
                quantity="kflr",
            )["chain_factors"]
            factors = jax.eval_shape(fn, structs)
            inverse = jax.eval_shape(tridiagonal.tridiagonal_inverse, factors, 1.0)
            return optax.tree.zeros_like(factors), optax.tree.zeros_like(inverse)
        # the layout of the state: KFLR's blocks (EKFAC's for quantity="ekfac"), no key needed
        name = "ekfac" if self.quantity == "ekfac" else "kflr"
        fn = lambda p: extract_lib.extract(  # noqa: E731
            self.apply_fn,
            p,
            positions.placeholder_batch(self.apply_fn, p, self.one),
            (name,),
            options={"ekfac": {"basis": "kflr"}} if name == "ekfac" else None,
        )[name]
        factors = jax.eval_shape(fn, structs)
        inverse = jax.eval_shape(lambda f: blocks_lib.map_blocks(lambda b: b.eigh(), f), factors)
        return optax.tree.zeros_like(factors), optax.tree.zeros_like(inverse)

    # --- curvature of the current step -------------------------------------------------------
    def current(self, params, state_factors, curvature, batch, key):
        """The current step's factors in the state's layout."""
        if curvature is None:
            if batch is None:
                raise ValueError(
                    "K-FAC's `update` got neither `curvature` nor `batch`: pass `curvature=` "
                    "(from `curvjax.extract` or `chain_factors`) or `batch=` (and `key=`)."
                )
            if self.block == "tridiagonal":
                out = chain.chain_factors(
                    self.apply_fn,
                    params,
                    batch,
                    quantity=self.quantity,
                    key=key,
                    mc_samples=self.mc_samples,
                    loss=self.loss,
                    reduction=self.reduction,
                )
                return out["chain_factors"]
            curvature = pre.compute_curvature(
                self.quantity,
                self.apply_fn,
                params,
                batch,
                key,
                loss=self.loss,
                reduction=self.reduction,
                mc_samples=self.mc_samples,
                options=(
                    {self.quantity: {"approximation": self.approximation}}
                    if self.quantity in ("kfac", "kflr", "ekfac")
                    else None
                ),
            )
        if self.block == "tridiagonal":
            if not isinstance(curvature, chain.ChainFactors):
                raise ValueError(
                    "block='tridiagonal' takes `curvature=` from "
                    "`chain_factors(...)['chain_factors']`, got "
                    f"{type(curvature).__name__}."
                )
            return curvature
        return self._check_blocks(params, state_factors, curvature)

    def _check_blocks(self, params, state_factors, curvature):
        paths_leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
        blocks = pre.curvature_leaves(curvature, params)
        expected = treedef.flatten_up_to(state_factors)
        for (path, _), blk, want in zip(paths_leaves, blocks, expected, strict=True):
            if want is None and blk is None:
                continue
            if want is None or blk is None or not want.same_layout(blk):
                raise ValueError(
                    f"`curvature` for {pre.leaf_name(path)} is {blk!r}, K-FAC keeps {want!r} "
                    "there: pass the output of `curvjax.kfac`, `kflr`, `kfra` or `ekfac` (or "
                    "`extract(...)` of one of them; `ekfac` for `quantity='ekfac'` only) for the "
                    "same `apply_fn`."
                )
        return jax.tree.unflatten(treedef, blocks)

    # --- preconditioner ----------------------------------------------------------------------
    def refresh(self, factors, damping):
        if self.block == "tridiagonal":
            return tridiagonal.tridiagonal_inverse(factors, damping)
        # the factors are covariances: negative eigenvalues are round-off and count as zero
        return blocks_lib.map_blocks(lambda b: b.eigh().nonnegative(), factors)

    def direction(self, inverse, factors, grads, params, damping):
        """``(F̆ + c I)⁻¹ grads`` (factored damping ``c`` for the diagonal blocks)."""
        treedef = jax.tree.structure(params)
        leaves = treedef.flatten_up_to(grads)  # aligned with the leaves of params
        if self.block == "tridiagonal":
            model, layers = self.layers(params)
            floats = [leaves[i] for i in model.float_index]
            mats = tridiagonal.to_layer_matrices(floats, layers, factors)
            solved = tridiagonal.apply_tridiagonal_inverse(inverse, mats)
            floats = tridiagonal.from_layer_matrices(solved, floats, layers, factors)
            for i, value in zip(model.float_index, floats, strict=True):
                leaves[i] = value
            return jax.tree.unflatten(treedef, leaves)
        inverses = treedef.flatten_up_to(inverse)
        out = [
            pre.apply_damped_inverse(inv, g, damping)
            for inv, g in zip(inverses, leaves, strict=True)
        ]
        return jax.tree.unflatten(treedef, out)

    def step(self, state, updates, params, curvature, batch, key, damping, ema_decay, interval):
        """Moving averages, refresh, and the preconditioned direction of ``updates``."""
        if params is None:
            raise ValueError("K-FAC needs `params` in `update(updates, state, params, ...)`.")
        current = self.current(params, state.factors, curvature, batch, key)
        count = state.count
        decay = jnp.minimum(1.0 - 1.0 / (count + 1.0), ema_decay)
        factors = _ema(state.factors, current, decay)
        inverse = jax.lax.cond(
            count % interval == 0, lambda: self.refresh(factors, damping), lambda: state.inverse
        )
        return factors, inverse, self.direction(inverse, factors, updates, params, damping)


def scale_by_kfac(
    apply_fn: ApplyFn,
    example_inputs: PyTree,
    *,
    damping: float | Float[Array, ""] = 1e-3,
    l2: float | Float[Array, ""] = 0.0,
    ema_decay: float = 0.95,
    inverse_interval: int = 10,
    block: str = "diagonal",
    quantity: str = "kfac",
    loss: LossLike = "cross_entropy",
    reduction: str = "mean",
    mc_samples: int = 1,
    approximation: str = "expand",
) -> optax.GradientTransformationExtraArgs:
    """K-FAC preconditioning with moving-averaged factors (fixed damping).

    The update direction (to be followed by ``optax.scale(-α)``, momentum by ``optax.trace``) is

    .. math::
        d = \\breve F^{-1} (∇L + η θ), \\qquad
        \\breve F_{\\text{layer}} = \\big(A + π \\sqrt{λ+η}\\, I\\big) ⊗
        \\big(B + \\tfrac{\\sqrt{λ+η}}{π} I\\big)

    per Kronecker block (``block="diagonal"``; ``π`` as in :func:`precondition_by_curvature`,
    dense blocks ``(M + (λ+η) I)⁻¹``), or the damped block-tridiagonal ``F̂⁻¹`` of §4.3
    (``block="tridiagonal"``), with ``A, B`` the moving averages of the factors.

    **Two ways to call ``update``** (inside the caller's ``jax.jit``): *one pass* —
    ``update(grads, state, params, curvature=c)`` with ``grads, c`` from
    ``curvjax.extract(apply_fn, params, batch, ["kfac"], key=k)`` (``block="diagonal"``) or from
    ``chain_factors(apply_fn, params, batch, key=k)`` (``"tridiagonal"``); *convenience* —
    ``update(grads, state, params, batch=batch, key=k)``: the transform computes ``quantity``.

    Args:
      apply_fn: ``apply_fn(params, inputs) -> outputs [N, C]``; traced at ``init`` to lay out the
        factors, and used by the convenience path.
      example_inputs: inputs with a leading batch axis (only the first example's shape is used).
      damping: ``λ ≥ 0``, fixed (a float or a traced scalar).
      l2: ``η ≥ 0``, strength of the ℓ2 term ``η/2 ||θ||²`` of the objective ``h = L + η/2 ||θ||²``.
      ema_decay: ``ε``: the factors are averaged as ``F ← ε_k F + (1 - ε_k) F_k`` with
        ``ε_k = min(1 - 1/k, ε)`` at step ``k = 1, 2, …`` (§5; no bias from the zero start).
      inverse_interval: ``T``: the preconditioner is recomputed at steps ``0, T, 2T, …``.
      block: ``"diagonal"`` (one block per leaf) or ``"tridiagonal"`` (§4.3, chains of dense
        layers; biases added right after a layer are folded in with a homogeneous coordinate).
      quantity: the curvature of the convenience path: ``"kfac"`` (Monte-Carlo, needs ``key``),
        ``"kflr"`` (exact output factor) or, for ``block="diagonal"``, ``"kfra"`` or ``"ekfac"``
        (:func:`curvjax.ekfac` with its default Monte-Carlo basis, needs ``key``; the state then
        keeps eigenvalue-corrected blocks, averaged by projecting the previous average onto the
        current eigenbasis, and the damping is exact: ``(Q diag(s) Qᵀ + c I)⁻¹``). Curvature
        passed as ``curvature=`` must have the blocks of this quantity.
      loss: ``"cross_entropy"``, ``"mse"`` or a :class:`curvjax.losses.Loss`.
      reduction: ``"mean"``, ``"sum"`` or ``"token_mean"``.
      mc_samples: Monte-Carlo samples per example for ``quantity="kfac"``.
      approximation: ``"expand"`` (default) or ``"reduce"``: the factors of weights shared over
        positions in the convenience path with ``quantity="kfac"`` or ``"kflr"`` (see
        :func:`curvjax.kfac`).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` with state :class:`ScaleByKfacState`.

    Example:
      >>> import jax, jax.numpy as jnp, optax, curvjax
      >>> from curvjax.optim import scale_by_kfac
      >>> apply_fn = lambda p, x: jnp.tanh(x @ p["w1"] + p["b1"][None, :]) @ p["w2"]
      >>> params = {"w1": jnp.ones((4, 5)) / 4, "b1": jnp.zeros(5), "w2": jnp.ones((5, 3)) / 5}
      >>> batch = (jnp.ones((6, 4)), jnp.arange(6) % 3)
      >>> opt = optax.chain(scale_by_kfac(apply_fn, batch[0], damping=1e-2), optax.scale(-0.1))
      >>> @jax.jit
      ... def step(params, state, batch, key):
      ...     out = curvjax.extract(apply_fn, params, batch, ["kfac"], key=key)  # one pass
      ...     updates, state = opt.update(out["grad"], state, params, curvature=out["kfac"])
      ...     return optax.apply_updates(params, updates), state
      >>> params, state = step(params, opt.init(params), batch, jax.random.key(0))
      >>> params["w1"].shape
      (4, 5)

    References:
      Martens & Grosse, "Optimizing neural networks with Kronecker-factored approximate
      curvature", ICML 2015, §4.2-4.3, §5 (moving averages), §6.3 (factored Tikhonov damping).
    """
    pre.check_scalar("damping", damping)
    pre.check_scalar("l2", l2)
    core = _Core(
        apply_fn, example_inputs, block, quantity, loss, reduction, mc_samples, approximation
    )

    def init(params):
        factors, inverse = core.init(params)
        return ScaleByKfacState(jnp.zeros([], jnp.int32), factors, inverse)

    def update(updates, state, params=None, *, curvature=None, batch=None, key=None, **extra):
        del extra
        grads = pre.add_l2(updates, params, l2)
        factors, inverse, direction = core.step(
            state, grads, params, curvature, batch, key, damping + l2, ema_decay, inverse_interval
        )
        return direction, ScaleByKfacState(state.count + 1, factors, inverse)

    return optax.GradientTransformationExtraArgs(init, update)


def _unit(tree):
    """``tree / ‖tree‖`` (zero stays zero), scaled by the largest entry first so nothing overflows."""
    leaves = jax.tree.leaves(tree)
    dtype = jnp.result_type(*leaves)
    top = jnp.max(jnp.stack([jnp.max(jnp.abs(x), initial=0).astype(dtype) for x in leaves]))
    top = jnp.where(top > 0, top, 1)
    norm = jnp.sqrt(sum(jnp.sum(jnp.square(x / top)) for x in leaves))
    norm = jnp.where(norm > 0, norm, 1)
    return jax.tree.map(lambda x: (x / top / norm).astype(x.dtype), tree)


def _ggn_quadratic(apply_fn, params, batch, vectors, loss, reduction):
    """``(Q, h₀, reduced)``: ``Q_ij = v_iᵀ G v_j`` (GGN of ``L`` on ``batch``), ``L(θ)`` and ``L(·)``.

    One linearisation of the model and one JVP per vector (no backward pass).
    """
    w = products.whole_batch(apply_fn, params, batch, loss, reduction)
    floats, reduced, from_tree = w.floats, w.reduced, w.from_tree
    f0, jvp = jax.linearize(w.outputs, floats)
    j_vs = [jvp(from_tree(v)) for v in vectors]  # [N, *P, C] each
    h_j_vs = [w.objective.hessian_times(f0, u) for u in j_vs]  # κ H J v, per position
    q = jnp.stack([jnp.stack([jnp.sum(u * h) for h in h_j_vs]) for u in j_vs])
    value = w.objective.value(f0)

    def loss_at(shifted):
        shift = from_tree(shifted)
        return reduced([f + s for f, s in zip(floats, shift, strict=True)])

    return q, value, loss_at


def quadratic_model_coefficients(q, grad_dots, vector_dots, damping, use_momentum):
    """``(α, μ)`` minimising ``M(αΔ + μδ₀)`` (Martens & Grosse §7), and the 1-D fallback.

    With ``C = G + c I``: ``[[ΔᵀCΔ, ΔᵀCδ₀], [δ₀ᵀCΔ, δ₀ᵀCδ₀]] [α, μ]ᵀ = -[∇hᵀΔ, ∇hᵀδ₀]ᵀ``;
    without momentum (or when the system is singular, e.g. ``δ₀ = 0``) ``μ = 0`` and
    ``α = -∇hᵀΔ / ΔᵀCΔ``.

    Args:
      q: ``[2, 2]`` GGN forms of ``(Δ, δ₀)`` (``[1, 1]`` without momentum).
      grad_dots: ``[∇hᵀΔ, ∇hᵀδ₀]``.
      vector_dots: the ``[2, 2]`` (or ``[1, 1]``) Euclidean Gram matrix of ``(Δ, δ₀)``.
      damping: ``c = λ + η``.
      use_momentum: traced bool, whether to solve the 2-D system.
    """
    m = q + damping * vector_dots
    # ΔᵀCΔ = 0 only for Δ = 0 (a zero gradient): no step, not 0/0
    positive = m[0, 0] > 0
    alpha_1d = jnp.where(positive, -grad_dots[0] / jnp.where(positive, m[0, 0], 1.0), 0.0)
    if q.shape[0] == 1:
        return alpha_1d, jnp.zeros_like(alpha_1d)
    det = m[0, 0] * m[1, 1] - m[0, 1] * m[1, 0]
    # the determinant carries a rounding error of about ε m₀₀ m₁₁: solve the 2×2 system only
    # where it is resolved (float64: the historical 1e-12; float32: 100 ε ≈ 1.2e-5)
    tol = max(1e-12, 100 * float(jnp.finfo(m.dtype).eps))
    ok = use_momentum & (det > tol * jnp.abs(m[0, 0] * m[1, 1]))
    safe = jnp.where(ok, det, 1.0)
    alpha = -(m[1, 1] * grad_dots[0] - m[0, 1] * grad_dots[1]) / safe
    mu = -(m[0, 0] * grad_dots[1] - m[1, 0] * grad_dots[0]) / safe
    return jnp.where(ok, alpha, alpha_1d), jnp.where(ok, mu, 0.0)


def reduction_ratio(h_new, h_old, predicted):
    """``ρ = (h(θ+δ) - h(θ)) / (M(δ) - M(0))``, safe where the quotient means nothing.

    The undamped model change ``M(δ) - M(0)`` of the minimiser of the damped model is ``≤ 0``.
    ``0`` (no step, e.g. a zero gradient) gives ``ρ = NaN`` (no evidence: ``λ`` is kept); a
    positive or non-finite value (round-off or overflow in the model), or a non-finite
    ``h(θ+δ)``, gives ``ρ = -∞`` (the model failed: ``λ`` grows).
    """
    valid = (predicted < 0) & jnp.isfinite(predicted) & jnp.isfinite(h_new)
    ratio = (h_new - h_old) / jnp.where(valid, predicted, -1.0)
    return jnp.where(valid, ratio, jnp.where(predicted == 0, jnp.nan, -jnp.inf))


def levenberg_marquardt(damping, rho, omega, min_damping):
    """``λ ← ωλ`` if ``ρ > 3/4``, ``λ ← λ/ω`` if ``ρ < 1/4`` (NaN ``ρ``: unchanged), ``λ ≥ λ_min``."""
    new = jnp.where(rho > 0.75, damping * omega, jnp.where(rho < 0.25, damping / omega, damping))
    return jnp.maximum(new, min_damping)


def kfac(
    apply_fn: ApplyFn,
    example_inputs: PyTree,
    *,
    damping: float | Float[Array, ""] = 1e-2,
    l2: float | Float[Array, ""] = 0.0,
    ema_decay: float = 0.95,
    inverse_interval: int = 10,
    block: str = "diagonal",
    momentum: bool = True,
    adapt_damping: bool = True,
    adaptation_interval: int = 5,
    damping_decay: float = 0.95,
    min_damping: float = 1e-8,
    reject_failed_steps: bool = False,
    quantity: str = "kfac",
    loss: LossLike = "cross_entropy",
    reduction: str = "mean",
    mc_samples: int = 1,
    approximation: str = "expand",
) -> optax.GradientTransformationExtraArgs:
    """K-FAC with adaptive damping and the quadratic-model step size and momentum.

    Each step (Martens & Grosse 2015, §6-7) with ``h = L + η/2 ||θ||²``:

    .. math::
        Δ = -\\breve F^{-1} ∇h, \\qquad δ = α Δ + μ δ_0, \\qquad
        (α, μ) = \\operatorname*{arg\\,min}_{α, μ} \\; ∇h^⊤ δ + \\tfrac12 δ^⊤ \\big(G + (λ+η) I\\big) δ,

    where ``F̆`` is the damped K-FAC approximation of :func:`scale_by_kfac` with ``c = λ + η``,
    ``δ₀`` the previous update and ``G`` the exact GGN of ``L`` on the current batch, applied
    through two Jacobian-vector products (a 2×2 linear system; ``μ = 0`` at the first step or with
    ``momentum=False``). Every ``T₁ = adaptation_interval`` steps ``λ`` follows the
    Levenberg-Marquardt rule

    .. math::
        ρ = \\frac{h(θ + δ) - h(θ)}{∇h^⊤ δ + \\tfrac12 δ^⊤ (G + η I) δ}, \\qquad
        λ ← \\begin{cases} ω λ & ρ > 3/4 \\\\ λ / ω & ρ < 1/4 \\end{cases}, \\quad
        ω = (\\text{damping\\_decay})^{T_1},

    which costs one forward pass at ``θ + δ`` on the same batch; the denominator leaves out ``λ``
    (the undamped model, as in Hessian-free optimisation). The returned update is ``δ`` itself
    (already with its sign and step size): add it with ``optax.apply_updates``.
    Simplifications: the factored Tikhonov damping uses ``γ = √(λ+η)`` directly (no separate
    greedy search over ``γ``, §6.6), and with ``block="tridiagonal"`` the preconditioner keeps the
    damping of its last refresh.

    **Numerics** (float32 included). The factors' eigendecompositions treat negative
    eigenvalues as round-off (zero) and each factor's damping is at least ``ε tr`` of the factor
    (``ε`` the dtype's machine epsilon; see :func:`precondition_by_curvature`), so ``λ`` down to
    ``min_damping`` gives a finite preconditioner even for rank-deficient float32 factors. A zero
    gradient gives ``α = 0`` (a zero step). ``ρ`` is NaN (``λ`` kept) when the model predicts no
    change and ``-∞`` (``λ`` grows) when the predicted change is positive or non-finite, or
    ``h(θ + δ)`` is not finite. A step with a non-finite entry is rejected: the update and the
    stored ``δ₀`` are zero and ``λ ← λ/ω``; ``reject_failed_steps=True`` also rejects steps that
    increase ``h``.

    **Calling ``update``** (inside the caller's ``jax.jit``): ``batch=`` is always needed (for the
    quadratic model and ``ρ``). *One pass*: ``update(grads, state, params, curvature=c,
    batch=batch)`` with ``grads, c`` from ``curvjax.extract(..., ["kfac"], key=k)``
    (``block="diagonal"``) or ``chain_factors(..., key=k)`` (``"tridiagonal"``). *Convenience*:
    ``update(grads, state, params, batch=batch, key=k)``.

    Args:
      apply_fn: ``apply_fn(params, inputs) -> outputs [N, C]``; traced at ``init`` to lay out the
        factors, and used by the convenience path.
      example_inputs: inputs with a leading batch axis (only the first example's shape is used).
      damping: initial ``λ > 0``.
      l2: ``η ≥ 0``, strength of the ℓ2 term ``η/2 ||θ||²`` of the objective ``h = L + η/2 ||θ||²``.
      ema_decay: ``ε``: the factors are averaged as ``F ← ε_k F + (1 - ε_k) F_k`` with
        ``ε_k = min(1 - 1/k, ε)`` at step ``k = 1, 2, …`` (§5; no bias from the zero start).
      inverse_interval: ``T``: the preconditioner is recomputed at steps ``0, T, 2T, …``.
      block: ``"diagonal"`` (one block per leaf) or ``"tridiagonal"`` (§4.3, chains of dense
        layers; biases added right after a layer are folded in with a homogeneous coordinate).
      quantity: the curvature of the convenience path: ``"kfac"`` (Monte-Carlo, needs ``key``),
        ``"kflr"`` (exact output factor) or, for ``block="diagonal"``, ``"kfra"`` or ``"ekfac"``
        (:func:`curvjax.ekfac` with its default Monte-Carlo basis, needs ``key``; the state then
        keeps eigenvalue-corrected blocks, averaged by projecting the previous average onto the
        current eigenbasis, and the damping is exact: ``(Q diag(s) Qᵀ + c I)⁻¹``). Curvature
        passed as ``curvature=`` must have the blocks of this quantity.
      loss: ``"cross_entropy"``, ``"mse"`` or a :class:`curvjax.losses.Loss`.
      reduction: ``"mean"``, ``"sum"`` or ``"token_mean"``.
      mc_samples: Monte-Carlo samples per example for ``quantity="kfac"``.
      approximation: ``"expand"`` (default) or ``"reduce"``: the factors of weights shared over
        positions in the convenience path with ``quantity="kfac"`` or ``"kflr"`` (see
        :func:`curvjax.kfac`).
      momentum: solve for the momentum ``μ`` as well (else ``μ = 0``).
      adapt_damping: apply the Levenberg-Marquardt rule (else ``λ`` stays fixed).
      adaptation_interval: ``T₁``.
      damping_decay: the per-step factor: ``λ`` is multiplied or divided by
        ``ω = damping_decay^{T₁}`` per adaptation (the paper's ``(19/20)^{T₁}``).
      min_damping: lower bound for ``λ``.
      reject_failed_steps: evaluate ``ρ`` at every step (one more forward pass per step) and
        reject a step with ``ρ < 0`` (``h`` grew on its own batch, or the model failed): zero
        update, ``δ₀ = 0`` and, with ``adapt_damping``, ``λ ← λ/ω`` at once. ``λ`` still follows
        the Levenberg-Marquardt rule every ``T₁`` steps. Without it, once ``λ`` has adapted far
        down (towards ``min_damping``) a few unchecked steps can run away before the next
        adaptation (seen on a small CNN on digits in float32 and float64: the loss grows by
        orders of magnitude per step until it overflows).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` with state :class:`KfacState`.

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> from curvjax.optim import kfac
      >>> from curvjax.optim import chain_factors
      >>> apply_fn = lambda p, x: jnp.tanh(x @ p["w1"] + p["b1"][None, :]) @ p["w2"]
      >>> params = {"w1": jnp.ones((4, 5)) / 4, "b1": jnp.zeros(5), "w2": jnp.ones((5, 3)) / 5}
      >>> batch = (jnp.linspace(-1, 1, 24).reshape(6, 4), jnp.arange(6) % 3)
      >>> opt = kfac(apply_fn, batch[0], damping=1e-1, block="tridiagonal")
      >>> @jax.jit
      ... def step(params, state, batch, key):
      ...     out = chain_factors(apply_fn, params, batch, key=key)  # one pass
      ...     updates, state = opt.update(
      ...         out["grad"], state, params, curvature=out["chain_factors"], batch=batch)
      ...     return optax.apply_updates(params, updates), state
      >>> params, state = step(params, opt.init(params), batch, jax.random.key(0))
      >>> int(state.count)
      1

    References:
      Martens & Grosse, "Optimizing neural networks with Kronecker-factored approximate
      curvature", ICML 2015, §6.3-6.5 (damping), §7 (step size and momentum).
    """
    core = _Core(
        apply_fn, example_inputs, block, quantity, loss, reduction, mc_samples, approximation
    )
    if adaptation_interval < 1:
        raise ValueError(f"`adaptation_interval` must be ≥ 1, got {adaptation_interval}.")
    pre.check_scalar("damping", damping, positive=True)
    pre.check_scalar("l2", l2)
    pre.check_scalar("min_damping", min_damping)
    omega = damping_decay**adaptation_interval

    def init(params):
        factors, inverse = core.init(params)
        dtype = jnp.result_type(*jax.tree.leaves(params))
        return KfacState(
            count=jnp.zeros([], jnp.int32),
            damping=jnp.asarray(damping, dtype),
            factors=factors,
            inverse=inverse,
            previous_update=jax.tree.map(jnp.zeros_like, params),
            rho=jnp.asarray(jnp.nan, dtype),
        )

    def update(updates, state, params=None, *, curvature=None, batch=None, key=None, **extra):
        del extra
        if batch is None:
            raise ValueError(
                "`kfac` needs `batch=` in `update` (for the quadratic model, and the curvature "
                "unless `curvature=` is given)."
            )
        lam = state.damping
        shift = lam + l2
        grads = pre.add_l2(updates, params, l2)
        factors, inverse, precond = core.step(
            state, grads, params, curvature, batch, key, shift, ema_decay, inverse_interval
        )
        proposal = jax.tree.map(jnp.negative, precond)  # Δ = -F̆⁻¹ ∇h
        previous = state.previous_update
        # (α, μ) are solved for the unit vectors Δ/‖Δ‖, δ₀/‖δ₀‖ (the step αΔ + μδ₀ is the same):
        # a long Δ (tiny damping) would overflow ΔᵀGΔ in float32
        vectors = (_unit(proposal), _unit(previous)) if momentum else (_unit(proposal),)
        q, value, loss_at = _ggn_quadratic(apply_fn, params, batch, vectors, loss, reduction)
        dots = jnp.stack([jnp.stack([optax.tree.vdot(u, w) for w in vectors]) for u in vectors])
        grad_dots = jnp.stack([optax.tree.vdot(grads, v) for v in vectors])
        alpha, mu = quadratic_model_coefficients(q, grad_dots, dots, shift, state.count > 0)
        coef = jnp.stack([alpha, mu])[: len(vectors)]
        step = jax.tree.map(
            lambda *vs: sum(c * v for c, v in zip(coef, vs, strict=True)).astype(vs[0].dtype),
            *vectors,
        )
        # M(δ) - M(0) without λ: ∇hᵀδ + ½ δᵀ (G + η I) δ.
        predicted = coef @ grad_dots + 0.5 * coef @ (q + l2 * dots) @ coef

        # a non-finite step (overflow, or a NaN gradient) is rejected: zero update, no momentum
        finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(step)]))

        def measure():
            """ρ of this step (one forward pass at θ + δ on the same batch)."""
            h_old = value + 0.5 * l2 * optax.tree.vdot(params, params)
            safe = jax.tree.map(lambda x: jnp.where(finite, x, jnp.zeros_like(x)), step)
            moved = jax.tree.map(jnp.add, params, safe)
            h_new = loss_at(safe) + 0.5 * l2 * optax.tree.vdot(moved, moved)
            rho = jnp.where(finite, reduction_ratio(h_new, h_old, predicted), -jnp.inf)
            return rho.astype(state.rho.dtype)

        due = (state.count + 1) % adaptation_interval == 0
        if reject_failed_steps:  # ρ at every step; ρ < 0: rejected (NaN: no step to reject)
            rho = measure()
            keep = finite & ~(rho < 0)
        else:
            rho = jax.lax.cond(due, measure, lambda: state.rho) if adapt_damping else state.rho
            keep = finite
        if adapt_damping:
            adapted = jnp.where(due, levenberg_marquardt(lam, rho, omega, min_damping), lam)
            new_lam = jnp.where(keep, adapted, lam / omega).astype(lam.dtype)
        else:
            new_lam = lam
        step = jax.tree.map(lambda x: jnp.where(keep, x, jnp.zeros_like(x)), step)
        new_state = KfacState(state.count + 1, new_lam, factors, inverse, step, rho)
        return step, new_state

    return optax.GradientTransformationExtraArgs(init, update)
