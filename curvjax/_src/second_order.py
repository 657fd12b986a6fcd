"""Public second-order quantities: GGN / Hessian diagonals and Kronecker factors."""

from __future__ import annotations

from jaxtyping import PRNGKeyArray, PyTree

from curvjax._src import diagonals, quantities
from curvjax._src.typing import ApplyFn, Batch, LossLike


def _one(name, apply_fn, params, batch, **kwargs):
    return quantities.compute_one(name, apply_fn, params, batch, **kwargs)


def ggn_diag(
    apply_fn: ApplyFn,
    params: PyTree,
    batch: Batch,
    *,
    loss: LossLike = "cross_entropy",
    reduction: str = "mean",
) -> PyTree:
    """Exact diagonal of the generalised Gauss-Newton matrix (``DiagGGNExact``).

    .. math::
        \\operatorname{diag}(G), \\qquad G = κ \\sum_n J_n^⊤ S_n S_n^⊤ J_n ,

    computed by backpropagating the ``C`` columns of ``√κ S_n`` through the parameter taps (one
    backward pass vmapped over the columns) and summing the squared per-column gradients.

    Args:
      apply_fn: ``apply_fn(params, inputs) -> outputs [N, C]``, any pure JAX function that treats
        examples independently.
      params: parameter pytree; non-floating-point leaves are held fixed and get ``None``.
      batch: ``(inputs, targets)`` or ``(inputs, targets, weights)``; ``inputs`` has a leading
        batch axis ``N``, targets ``[N, *P]`` (labels) or ``[N, *P, ...]``, weights ``[N]`` or
        ``[N, *P]`` (a padding mask or non-negative weights ``w_{n,p}``; default 1).
      loss: ``"cross_entropy"``, ``"mse"`` or a :class:`curvjax.losses.Loss`.
      reduction: ``"mean"`` (``κ = 1/N``), ``"sum"`` (``κ = 1``) or ``"token_mean"``
        (``κ = 1 / Σ_{n,p} w_{n,p}``).

    Returns:
      A pytree like ``params``.

    Example:
      >>> import jax.numpy as jnp, curvjax
      >>> apply_fn = lambda p, x: x @ p["w"]
      >>> batch = (jnp.ones((5, 4)), jnp.array([0, 1, 2, 0, 1]))
      >>> curvjax.ggn_diag(apply_fn, {"w": jnp.ones((4, 3))}, batch)["w"].shape
      (4, 3)

    References:
      Dangel, Kunstner & Hennig, "BackPACK: Packing more into backprop", ICLR 2020, eq. 6.
    """
    return _one("ggn_diag", apply_fn, params, batch, loss=loss, reduction=reduction)


def ggn_diag_mc(
    apply_fn: ApplyFn,
    params: PyTree,
    batch: Batch,
    *,
    key: PRNGKeyArray,
    mc_samples: int = 1,
    loss: LossLike = "cross_entropy",
    reduction: str = "mean",
) -> PyTree:
    """Monte-Carlo estimate of the GGN diagonal (``DiagGGNMC``), unbiased.

    .. math::
        \\operatorname{diag}\\Big(κ \\sum_n J_n^⊤ \\tilde S_n \\tilde S_n^⊤ J_n\\Big), \\qquad
        \\tilde S_n = \\tfrac{1}{\\sqrt M} [∇_f ℓ(f_n, ŷ_1), …, ∇_f ℓ(f_n, ŷ_M)], \\;
        ŷ_m \\sim p(y | f_n).

    Args:
      apply_fn: ``apply_fn(params, inputs) -> outputs [N, C]``, any pure JAX function that treats
        examples independently.
      params: parameter pytree; non-floating-point leaves are held fixed and get ``None``.
      batch: ``(inputs, targets)`` or ``(inputs, targets, weights)``; ``inputs`` has a leading
        batch axis ``N``, targets ``[N, *P]`` (labels) or ``[N, *P, ...]``, weights ``[N]`` or
        ``[N, *P]`` (a padding mask or non-negative weights ``w_{n,p}``; default 1).
      loss: ``"cross_entropy"``, ``"mse"`` or a :class:`curvjax.losses.Loss`.
      reduction: ``"mean"`` (``κ = 1/N``), ``"sum"`` (``κ = 1``) or ``"token_mean"``
        (``κ = 1 / Σ_{n,p} w_{n,p}``).
      key: PRNG key for sampling ``ŷ ~ p(y | f_n)``.
      mc_samples: number ``M`` of sampled columns per example.

    Returns:
      A pytree like ``params``.

    Example:
      >>> import jax, jax.numpy as jnp, curvjax
      >>> apply_fn = lambda p, x: x @ p["w"]
      >>> batch = (jnp.ones((5, 4)), jnp.array([0, 1, 2, 0, 1]))
      >>> out = curvjax.ggn_diag_mc(apply_fn, {"w": jnp.ones((4, 3))}, batch, key=jax.random.key(0))
      >>> out["w"].shape
      (4, 3)
    """
    return _one(
        "ggn_diag_mc",
        apply_fn,
        params,
        batch,
        loss=loss,
        reduction=reduction,
        key=key,
        mc_samples=mc_samples,
    )


def hessian_diag(
    apply_fn: ApplyFn,
    params: PyTree,
    batch: Batch,
    *,
    loss: LossLike = "cross_entropy",
    reduction: str = "mean",
    method: str = "exact",
    key: PRNGKeyArray | None = None,
    mc_samples: int = 1,
):
    """Diagonal of the Hessian of the reduced loss (``DiagHessian``).

    .. math::
        \\operatorname{diag}(∇^2 L) = \\operatorname{diag}(G) + \\sum_{\\text{nodes } z = σ(u)}
        \\operatorname{diag}\\big(J_u^⊤ (δ_z ⊙ σ''(u)) J_u\\big) .

    ``method: str = "exact"`` adds to the GGN columns, at every elementwise operation with a non-zero
    second derivative between activations (``tanh``, ``logistic``, ``exp``, softplus, GELU, the
    products and reciprocal square roots of LayerNorm, …), the residual ``δ ⊙ ∇²σ`` split into
    positive and negative parts, whose square-root columns are backpropagated like those of
    ``S_n`` and enter with their sign (BackPACK, appendix A.3). A product of two activations
    (``dot_general`` in attention: ``q kᵀ``, ``softmax · v``) adds the ``±``-weighted columns of
    its cross-Hessian, ``2 min(|x|, |y|)`` per example. A tied parameter ``θ`` (an embedding
    also used as the output projection, one kernel applied in several layers, ``W`` and ``Wᵀ``)
    gets the cross terms between its uses: at each use ``z = B(x, θ)`` whose input ``x`` depends
    on ``θ``, the same columns in the pair ``(x, θ)``, the ``θ`` half added to the per-column
    gradient of ``θ`` before squaring. So the result is exact for MLPs, CNNs, residual blocks,
    LayerNorm / RMSNorm, softmax attention (GPT blocks) and tied weights. Models with an operation
    it cannot treat (a parameter transformed non-linearly before use, ``scan``, a primitive
    without a known second derivative), or whose residual columns would hold more than ``2²⁸``
    numbers (``N`` times the columns per example times what one column spans), raise a
    ``ValueError`` that names the cause and points to ``method="hutchinson"``.
    ``method="hutchinson"`` returns ``(1/S) Σ_s v_s ⊙ ∇²L v_s`` with Rademacher ``v_s``, an
    unbiased estimate for any model (Bekas et al. 2007; AdaHessian, Sophia).

    Args:
      apply_fn: ``apply_fn(params, inputs) -> outputs [N, C]``, any pure JAX function that treats
        examples independently.
      params: parameter pytree; non-floating-point leaves are held fixed and get ``None``.
      batch: ``(inputs, targets)`` or ``(inputs, targets, weights)``; ``inputs`` has a leading
        batch axis ``N``, targets ``[N, *P]`` (labels) or ``[N, *P, ...]``, weights ``[N]`` or
        ``[N, *P]`` (a padding mask or non-negative weights ``w_{n,p}``; default 1).
      loss: ``"cross_entropy"``, ``"mse"`` or a :class:`curvjax.losses.Loss`.
      reduction: ``"mean"`` (``κ = 1/N``), ``"sum"`` (``κ = 1``) or ``"token_mean"``
        (``κ = 1 / Σ_{n,p} w_{n,p}``).
      method: ``"exact"`` or ``"hutchinson"``.
      key: PRNG key for the Rademacher probes (hutchinson).
      mc_samples: number ``M`` of probes (hutchinson).

    Returns:
      A pytree like ``params``.

    Example:
      >>> import jax.numpy as jnp, curvjax
      >>> apply_fn = lambda p, x: jnp.tanh(x @ p["w"])
      >>> batch = (jnp.ones((5, 4)), jnp.array([0, 1, 2, 0, 1]))
      >>> curvjax.hessian_diag(apply_fn, {"w": jnp.ones((4, 3))}, batch)["w"].shape
      (4, 3)
    """
    if method == "exact":
        return _one("hessian_diag", apply_fn, params, batch, loss=loss, reduction=reduction)
    if method == "hutchinson":
        return diagonals.hutchinson_diag(
            apply_fn, params, batch, loss=loss, reduction=reduction, key=key, mc_samples=mc_samples
        )
    raise ValueError(f"unknown method {method!r}: use 'exact' or 'hutchinson'.")


def kfac(
    apply_fn: ApplyFn,
    params: PyTree,
    batch: Batch,
    *,
    key: PRNGKeyArray,
    mc_samples: int = 1,
    loss: LossLike = "cross_entropy",
    reduction: str = "mean",
    approximation: str = "expand",
) -> PyTree:
    """Kronecker-factored GGN blocks with Monte-Carlo output factors (K-FAC).

    .. math::
        G_{\\text{layer}} ≈ A ⊗ B, \\quad A = \\frac{1}{N T} \\sum_{n,t} a a^⊤, \\quad
        B = \\sum_{n,m,t} b b^⊤, \\quad b = J_z^⊤ \\sqrt{κ} \\tilde S_n e_m ,

    with ``a`` the layer input (patches for convolutions), ``T`` the positions sharing the weight
    and ``S̃_n`` sampled as in :func:`ggn_diag_mc`. For mean reduction
    ``A ⊗ B = (1/(NT) Σ aaᵀ) ⊗ (1/N Σ b̂ b̂ᵀ)``. This is the ``"expand"`` approximation (the
    default; positions treated like examples, exact for deep linear networks with per-position
    MSE terms). ``approximation="reduce"`` pools each example's positions first:
    ``A = (1/N) Σ_n ā_n ā_nᵀ`` with ``ā_n = (1/T) Σ_t a_{n,t}`` and ``B = Σ_{n,m} b̄ b̄ᵀ`` with
    ``b̄ = Σ_t b_{n,m,t}`` (exact for deep linear networks whose positions are pooled before an
    MSE loss). A kernel used by several dense/convolution taps (tied weights) gets one block in
    which its uses count as further positions, and a kernel multiplied once inside a
    ``lax.scan`` body (an RNN cell) one block in which the steps are the positions.

    Args:
      apply_fn: ``apply_fn(params, inputs) -> outputs [N, C]``, any pure JAX function that treats
        examples independently.
      params: parameter pytree; non-floating-point leaves are held fixed and get ``None``.
      batch: ``(inputs, targets)`` or ``(inputs, targets, weights)``; ``inputs`` has a leading
        batch axis ``N``, targets ``[N, *P]`` (labels) or ``[N, *P, ...]``, weights ``[N]`` or
        ``[N, *P]`` (a padding mask or non-negative weights ``w_{n,p}``; default 1).
      loss: ``"cross_entropy"``, ``"mse"`` or a :class:`curvjax.losses.Loss`.
      reduction: ``"mean"`` (``κ = 1/N``), ``"sum"`` (``κ = 1``) or ``"token_mean"``
        (``κ = 1 / Σ_{n,p} w_{n,p}``).
      key: PRNG key for sampling ``ŷ ~ p(y | f_n)``.
      mc_samples: number ``M`` of sampled columns per example.
      approximation: ``"expand"`` (default) or ``"reduce"``: how positions sharing a weight enter.

    Returns:
      A pytree like ``params`` of blocks: :class:`curvjax.KroneckerBlock` ``(a [G, I, I],
      b [G, O, O], index)`` for the kernel of a dense or convolution layer, :class:`curvjax.DenseBlock`
      for 1-D leaves (biases, normalisation scales; biases are not folded into the kernel's block),
      :class:`curvjax.DiagonalBlock` for other leaves. :func:`curvjax.block_to_dense` gives the
      ``[D, D]`` matrix of a block.

    Example:
      >>> import jax, jax.numpy as jnp, curvjax
      >>> apply_fn = lambda p, x: x @ p["w"]
      >>> batch = (jnp.ones((5, 4)), jnp.array([0, 1, 2, 0, 1]))
      >>> blocks = curvjax.kfac(apply_fn, {"w": jnp.ones((4, 3))}, batch, key=jax.random.key(0))
      >>> blocks["w"].a.shape, blocks["w"].b.shape
      ((1, 4, 4), (1, 3, 3))

    References:
      Martens & Grosse, "Optimizing neural networks with Kronecker-factored approximate
      curvature", ICML 2015; Grosse & Martens, "A Kronecker-factored approximate Fisher matrix for
      convolution layers", ICML 2016; Eschenhagen et al., "Kronecker-factored approximate
      curvature for modern neural network architectures", NeurIPS 2023, §3.
    """
    return _one(
        "kfac",
        apply_fn,
        params,
        batch,
        loss=loss,
        reduction=reduction,
        key=key,
        mc_samples=mc_samples,
        options={"kfac": {"approximation": approximation}},
    )


def kflr(
    apply_fn: ApplyFn,
    params: PyTree,
    batch: Batch,
    *,
    loss: LossLike = "cross_entropy",
    reduction: str = "mean",
    approximation: str = "expand",
) -> PyTree:
    """Kronecker-factored GGN blocks with the exact output factor (KFLR).

    As :func:`kfac`, with ``B = Σ_{n,c,t} b bᵀ`` from the ``C`` exact columns of ``√κ S_n``
    (``approximation="expand"``, the default) or ``B = Σ_{n,c} b̄ b̄ᵀ``, ``b̄ = Σ_t b``
    (``"reduce"``). Exact for a single dense layer seeing one example, and for every kernel of a
    deep linear network with MSE: with per-position terms under ``"expand"``, with positions
    pooled before the loss under ``"reduce"``.

    Args:
      apply_fn: ``apply_fn(params, inputs) -> outputs [N, C]``, any pure JAX function that treats
        examples independently.
      params: parameter pytree; non-floating-point leaves are held fixed and get ``None``.
      batch: ``(inputs, targets)`` or ``(inputs, targets, weights)``; ``inputs`` has a leading
        batch axis ``N``, targets ``[N, *P]`` (labels) or ``[N, *P, ...]``, weights ``[N]`` or
        ``[N, *P]`` (a padding mask or non-negative weights ``w_{n,p}``; default 1).
      loss: ``"cross_entropy"``, ``"mse"`` or a :class:`curvjax.losses.Loss`.
      reduction: ``"mean"`` (``κ = 1/N``), ``"sum"`` (``κ = 1``) or ``"token_mean"``
        (``κ = 1 / Σ_{n,p} w_{n,p}``).
      approximation: ``"expand"`` (default) or ``"reduce"``: how positions sharing a weight enter.

    Returns:
      A pytree like ``params`` of blocks: :class:`curvjax.KroneckerBlock` ``(a [G, I, I],
      b [G, O, O], index)`` for the kernel of a dense or convolution layer, :class:`curvjax.DenseBlock`
      for 1-D leaves (biases, normalisation scales; biases are not folded into the kernel's block),
      :class:`curvjax.DiagonalBlock` for other leaves. :func:`curvjax.block_to_dense` gives the
      ``[D, D]`` matrix of a block.

    Example:
      >>> import jax.numpy as jnp, curvjax
      >>> apply_fn = lambda p, x: x @ p["w"]
      >>> batch = (jnp.ones((5, 4)), jnp.array([0, 1, 2, 0, 1]))
      >>> curvjax.kflr(apply_fn, {"w": jnp.ones((4, 3))}, batch)["w"].b.shape
      (1, 3, 3)

    References:
      Botev, Ritter & Barber, "Practical Gauss-Newton optimisation for deep learning", ICML 2017;
      Eschenhagen et al., "Kronecker-factored approximate curvature for modern neural network
      architectures", NeurIPS 2023, §3.
    """
    return _one(
        "kflr",
        apply_fn,
        params,
        batch,
        loss=loss,
        reduction=reduction,
        options={"kflr": {"approximation": approximation}},
    )


def kfra(
    apply_fn: ApplyFn,
    params: PyTree,
    batch: Batch,
    *,
    loss: LossLike = "cross_entropy",
    reduction: str = "mean",
) -> PyTree:
    """Kronecker-factored blocks with the batch-averaged recursion for ``B`` (KFRA).

    For a feed-forward chain of dense layers ``z_i = W_i a_i`` (elementwise operations between
    them), the last layer's ``B`` is KFLR's; below it
    ``B_{i-1} = (1/N) Σ_n J_nᵀ B_i J_n`` with ``J_n = ∂z_i / ∂z_{i-1}`` for example ``n``
    (computed by backpropagating the columns of ``B_i^{1/2}``). Models that are not such a chain
    (convolutions, residual connections, attention) raise a ``ValueError``.

    Args:
      apply_fn: ``apply_fn(params, inputs) -> outputs [N, C]``, any pure JAX function that treats
        examples independently.
      params: parameter pytree; non-floating-point leaves are held fixed and get ``None``.
      batch: ``(inputs, targets)`` or ``(inputs, targets, weights)``; ``inputs`` has a leading
        batch axis ``N``, targets ``[N, *P]`` (labels) or ``[N, *P, ...]``, weights ``[N]`` or
        ``[N, *P]`` (a padding mask or non-negative weights ``w_{n,p}``; default 1).
      loss: ``"cross_entropy"``, ``"mse"`` or a :class:`curvjax.losses.Loss`.
      reduction: ``"mean"`` (``κ = 1/N``), ``"sum"`` (``κ = 1``) or ``"token_mean"``
        (``κ = 1 / Σ_{n,p} w_{n,p}``).

    Returns:
      A pytree like ``params`` of blocks: :class:`curvjax.KroneckerBlock` ``(a [G, I, I],
      b [G, O, O], index)`` for the kernel of a dense or convolution layer, :class:`curvjax.DenseBlock`
      for 1-D leaves (biases, normalisation scales; biases are not folded into the kernel's block),
      :class:`curvjax.DiagonalBlock` for other leaves. :func:`curvjax.block_to_dense` gives the
      ``[D, D]`` matrix of a block.

    Example:
      >>> import jax.numpy as jnp, curvjax
      >>> apply_fn = lambda p, x: jnp.tanh(x @ p["w1"]) @ p["w2"]
      >>> params = {"w1": jnp.ones((4, 6)) / 4, "w2": jnp.ones((6, 3)) / 6}
      >>> batch = (jnp.ones((5, 4)), jnp.array([0, 1, 2, 0, 1]))
      >>> curvjax.kfra(apply_fn, params, batch)["w1"].b.shape
      (1, 6, 6)

    References:
      Botev, Ritter & Barber, "Practical Gauss-Newton optimisation for deep learning", ICML 2017.
    """
    return _one("kfra", apply_fn, params, batch, loss=loss, reduction=reduction)


def ekfac(
    apply_fn: ApplyFn,
    params: PyTree,
    batch: Batch,
    *,
    loss: LossLike = "cross_entropy",
    reduction: str = "mean",
    key: PRNGKeyArray | None = None,
    mc_samples: int = 1,
    basis: str = "kfac",
    approximation: str = "expand",
) -> PyTree:
    """Eigenvalue-corrected Kronecker-factored curvature (EKFAC).

    Per Kronecker-factored kernel, the eigenbases ``Q_A``, ``Q_B`` of the factors of
    :func:`kfac` (``basis="kfac"``) or :func:`kflr` (``basis="kflr"``) and, in place of the
    eigenvalues ``a_i b_o``, the second moments of the gradients in that basis:

    .. math::
        C = (Q_A ⊗ Q_B) \\operatorname{diag}(s) (Q_A ⊗ Q_B)^⊤, \\qquad
        s = \\sum_{n,c} \\big((Q_A ⊗ Q_B)^⊤ g_{n,c}\\big)^2, \\qquad
        g_{n,c} = \\operatorname{vec} \\sum_t a_{n,t} b_{n,c,t}^⊤ ,

    with ``b_{n,c}`` the cotangents of the vectors that define ``B`` (the ``M`` Monte-Carlo
    columns, each carrying ``1/√M``, for ``"kfac"``; the ``C`` columns of ``√κ S_n`` for
    ``"kflr"``), so that ``Σ_{n,c} g gᵀ`` is the Monte-Carlo Fisher block (``"kfac"``) or the
    exact GGN block (``"kflr"``). ``C`` is the Frobenius projection of that block onto the
    matrices diagonal in ``Q_A ⊗ Q_B``, so it is never farther from it (in Frobenius norm) than
    ``A ⊗ B``; it equals the exact GGN block for one dense layer seeing one example
    (``basis="kflr"``). Weight sharing over positions (convolutions, sequences ``[N, T, V]``),
    tied kernels and padding masks enter as in :func:`kfac`; the damped inverse of a block is
    exact: ``(C + λ I)⁻¹ = (Q_A ⊗ Q_B) diag(1/(s + λ)) (Q_A ⊗ Q_B)ᵀ``.

    Args:
      apply_fn: ``apply_fn(params, inputs) -> outputs [N, C]``, any pure JAX function that treats
        examples independently.
      params: parameter pytree; non-floating-point leaves are held fixed and get ``None``.
      batch: ``(inputs, targets)`` or ``(inputs, targets, weights)``; ``inputs`` has a leading
        batch axis ``N``, targets ``[N, *P]`` (labels) or ``[N, *P, ...]``, weights ``[N]`` or
        ``[N, *P]`` (a padding mask or non-negative weights ``w_{n,p}``; default 1).
      loss: ``"cross_entropy"``, ``"mse"`` or a :class:`curvjax.losses.Loss`.
      reduction: ``"mean"`` (``κ = 1/N``), ``"sum"`` (``κ = 1``) or ``"token_mean"``
        (``κ = 1 / Σ_{n,p} w_{n,p}``).
      key: PRNG key for sampling ``ŷ ~ p(y | f_n)`` (``basis="kfac"``).
      mc_samples: number ``M`` of sampled columns per example (``basis="kfac"``).
      basis: ``"kfac"`` (Monte-Carlo output factors, the default) or ``"kflr"`` (exact ones).
      approximation: ``"expand"`` (default) or ``"reduce"``: the factors whose eigenbases are
        taken, for weights shared over positions (see :func:`kfac`).

    Returns:
      A pytree like ``params`` of blocks: :class:`curvjax.EigenKroneckerBlock`
      ``(a_vectors [G, I, I], b_vectors [G, O, O], scaling [G, I, O], index)`` for the kernel of
      a dense or convolution layer, and the block :func:`kfac` returns for every other leaf
      (:class:`curvjax.DenseBlock` for 1-D leaves, :class:`curvjax.DiagonalBlock` otherwise).

    Example:
      >>> import jax, jax.numpy as jnp, curvjax
      >>> apply_fn = lambda p, x: x @ p["w"]
      >>> batch = (jnp.ones((5, 4)), jnp.array([0, 1, 2, 0, 1]))
      >>> params = {"w": jnp.ones((4, 3))}
      >>> blocks = curvjax.ekfac(apply_fn, params, batch, basis="kflr")
      >>> blocks["w"].scaling.shape
      (1, 4, 3)
      >>> diagonal = curvjax.ggn_diag(apply_fn, params, batch)["w"]  # same trace: tr G
      >>> bool(jnp.isclose(blocks["w"].trace(), diagonal.sum()))
      True

    References:
      George, Laurent, Bouthillier, Ballas & Vincent, "Fast approximate natural gradient descent
      in a Kronecker-factored eigenbasis", NeurIPS 2018.
    """
    return _one(
        "ekfac",
        apply_fn,
        params,
        batch,
        loss=loss,
        reduction=reduction,
        key=key,
        mc_samples=mc_samples,
        options={"ekfac": {"basis": basis, "approximation": approximation}},
    )
