"""EKFAC: eigenvalue-corrected Kronecker blocks (George et al. 2018), float64.

References never go through curvjax's taps: GGN blocks are ``κ Σ_n J_nᵀ H_n J_n`` with ``J_n``
from ``jax.jacrev`` of the model outputs and ``H_n`` from ``jax.hessian`` of the per-example loss
(:mod:`reference`); Monte-Carlo Fisher blocks and the rotated per-example gradients come from
``jax.vmap(jax.grad)`` of the sampled pseudo-losses ``Σ_c u_{n,m,c} f_{n,c}`` (the sampled output
cotangents ``u`` are curvjax's, drawn with the same key: the draw is the input, everything after
it is recomputed). Dense matrices of blocks are assembled in numpy from the blocks' fields
(``np.kron`` per group, rows and columns permuted by ``index``).

Tolerances: identities that hold exactly in float64 on O(1) numbers are checked to 1e-9 relative
to the largest entry (observed ~1e-15); Frobenius inequalities get 1e-10 ‖G‖ of slack for
round-off.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import models
import numpy as np
import optax
import pytest
import reference

import curvjax
from curvjax._src import backprop, kronecker, lm, positions
from curvjax._src import blocks as blocks_lib
from curvjax._src import ekfac as ekfac_lib
from curvjax.optim import precondition_by_curvature, scale_by_kfac

RTOL = 1e-9


def _close(actual, expected, rtol=RTOL, what=""):
    actual, expected = np.asarray(actual), np.asarray(expected)
    scale = max(np.max(np.abs(expected)), 1e-300)
    err = np.max(np.abs(actual - expected)) / scale
    assert err <= rtol, f"{what}: relative error {err:.2e} > {rtol:.0e}"


# ---------------------------------------------------------------------------- numpy references


def _basis(block):
    """``[D, D]`` numpy: column ``(g, i, o)`` is ``q_{A,g,i} ⊗ q_{B,g,o}``, rows in leaf order."""
    qa, qb = np.asarray(block.a_vectors), np.asarray(block.b_vectors)
    canon = _block_diag([np.kron(qa[g], qb[g]) for g in range(qa.shape[0])])
    return canon[np.asarray(block.index)]


def _block_diag(mats):
    size = sum(m.shape[0] for m in mats)
    out, start = np.zeros((size, size)), 0
    for m in mats:
        out[start : start + m.shape[0], start : start + m.shape[0]] = m
        start += m.shape[0]
    return out


def _ekfac_dense(block):
    q = _basis(block)
    return q @ np.diag(np.asarray(block.scaling).ravel()) @ q.T


def _kron_dense(block):
    a, b = np.asarray(block.a), np.asarray(block.b)
    canon = _block_diag([np.kron(a[g], b[g]) for g in range(a.shape[0])])
    index = np.asarray(block.index)
    return canon[index][:, index]


def _rotated_squares(block, grads):
    """``Σ_r (Q_Aᵀ X_r Q_B)²`` for per-example gradients ``grads [R, D]`` in leaf order."""
    index = np.asarray(block.index)
    g, i, o = block.scaling.shape
    canon = np.zeros_like(grads)
    canon[:, index] = grads  # leaf entry j sits at canonical position index[j]
    canon = canon.reshape(-1, g, i, o)
    qa, qb = np.asarray(block.a_vectors), np.asarray(block.b_vectors)
    rotated = np.einsum("gji,rgjk,gkl->rgil", qa, canon, qb)
    return np.sum(rotated**2, axis=0)


def _blocks(tree):
    return jax.tree.leaves(tree, is_leaf=blocks_lib.is_block)


def _mc_columns(apply_fn, params, batch, key, mc_samples, loss, reduction):
    """The sampled output cotangents ``[N, M, *P, C]`` curvjax backpropagates for this key."""
    inputs, targets, weights = positions.split_batch(batch)
    outputs = apply_fn(params, inputs)
    objective = positions.objective(loss, reduction, outputs, targets, weights)
    return objective.mc_columns(key, outputs, mc_samples)


def _pseudo_loss_grads(apply_fn, params, inputs, columns):
    """``[N·M, D]``: ``∇_θ Σ u_{n,m} · f_n`` per example and sample (``vmap(grad)``)."""
    flat, unravel = reference.flatten_float(params)

    def one(x_n, cols_n):
        def pseudo(v, u):
            out = apply_fn(unravel(v), jax.tree.map(lambda a: a[None], x_n))[0]
            return jnp.sum(out * u)

        return jax.vmap(jax.grad(pseudo), in_axes=(None, 0))(flat, cols_n)

    return jax.vmap(one)(inputs, columns).reshape(-1, flat.size)


# ---------------------------------------------------------------------------- (a), (b) exactness


def test_one_dense_layer_one_example_equals_the_exact_ggn():
    """For one example, the GGN block of a dense kernel is ``a aᵀ ⊗ Bₙ``: Kronecker, so its
    eigenbasis is that of the factors and EKFAC (basis KFLR) reproduces it exactly."""
    case = models.get_case("dense_single")
    x, y = models.make_batch(case, "cross_entropy")
    one = (x[:1], y[:1])
    ggn = np.asarray(reference.ggn_matrix(case.apply_fn, case.params, one))
    run = jax.jit(lambda p, b: curvjax.ekfac(case.apply_fn, p, b, basis="kflr"))
    blocks = _blocks(run(case.params, one))
    for block, where in zip(blocks, reference.float_slices(case.params), strict=True):
        expected = ggn[where, where]
        if block.kind == "eigen_kronecker":
            _close(_ekfac_dense(block), expected, what="kernel")
            _close(block.to_dense(), expected, what="kernel to_dense")
        else:
            _close(block.to_dense(), expected, what="bias")
    assert {b.kind for b in blocks} == {"eigen_kronecker", "dense"}


MIX = np.array([[1.0, 0.4], [-0.3, 0.8]])


def _mixed_linear(p, x):
    return x @ p["w"] @ jnp.asarray(MIX)


def test_ggn_diagonal_in_the_kronecker_eigenbasis_is_recovered():
    """``f_n = c_n e_nᵀ W M`` with MSE and example weights ``w_n``: the GGN block is
    ``Σ_n w_n c_n² e_n e_nᵀ ⊗ M H Mᵀ``, diagonal in ``{e_n} ⊗ eig(M Mᵀ)``, the eigenbasis of the
    KFLR factors ``A ∝ diag(c²)``, ``B ∝ M Mᵀ``. EKFAC equals it; KFLR, which spreads the average
    weight over every input direction, does not (the weights differ)."""
    c = np.array([1.0, 2.0, 3.0])
    x = jnp.asarray(np.diag(c))
    w = np.array([0.5, 1.0, 2.5])
    params = {"w": jnp.asarray(np.random.default_rng(0).normal(size=(3, 2)))}
    targets = jnp.asarray(np.random.default_rng(1).normal(size=(3, 2)))
    batch = (x, targets, jnp.asarray(w))
    # ℓ = Σ_n w_n ‖x_nᵀ W M − y_n‖², linear in W: G = ∇²ℓ = Σ_n 2 w_n (x_n x_nᵀ) ⊗ (M Mᵀ)
    # over the row-major vec(W) (∂f_{n,c}/∂W_{io} = x_{n,i} M_{o,c})
    xs = np.asarray(x)
    ggn = sum(2 * w[n] * np.kron(np.outer(xs[n], xs[n]), MIX @ MIX.T) for n in range(3))

    @jax.jit
    def run(params, batch):
        kwargs = {"loss": "mse", "reduction": "sum"}
        e = curvjax.ekfac(_mixed_linear, params, batch, basis="kflr", **kwargs)
        return e, curvjax.kflr(_mixed_linear, params, batch, **kwargs)

    e, k = run(params, batch)
    _close(_ekfac_dense(e["w"]), ggn, what="EKFAC")
    gap = np.linalg.norm(_kron_dense(k["w"]) - ggn) / np.linalg.norm(ggn)
    assert gap > 0.05, f"KFLR is exact here ({gap:.1e}): the construction tests nothing"


# ---------------------------------------------------------------------------- (c), (d) the zoo

# One case per structure that changes how the factors and ``s`` are formed: a convolution with
# feature groups (G > 1, positions T > 1), a kernel tied over two uses, a kernel inside a ``scan``
# (steps as positions); dense chains and attention (dense kernels over T > 1 positions) are in the
# language-model and MLP tests below. (All 33 zoo cases without batch mixing passed these checks
# once; the CI budget keeps one per structure.)
ZOO = ("cnn_grouped", "tied_plain", "scan_mlp")
MC_SAMPLES = 2


@functools.cache
def _zoo(name):
    case = models.get_case(name)
    batch = models.make_batch(case, "cross_entropy")
    key = jax.random.key(7)

    @jax.jit
    def run(params, batch):
        exact = curvjax.extract(
            case.apply_fn, params, batch, ["ekfac", "kflr"], options={"ekfac": {"basis": "kflr"}}
        )
        sampled = curvjax.extract(
            case.apply_fn, params, batch, ["ekfac", "kfac"], key=key, mc_samples=MC_SAMPLES
        )
        cols = _mc_columns(case.apply_fn, params, batch, key, MC_SAMPLES, "cross_entropy", "mean")
        grads = _pseudo_loss_grads(case.apply_fn, params, batch[0], cols)
        return exact, sampled, grads, reference.ggn_matrix(case.apply_fn, params, batch)

    exact, sampled, grads, ggn = run(case.params, batch)
    return case, batch, exact, sampled, np.asarray(grads), np.asarray(ggn)


@pytest.mark.parametrize("name", ZOO)
def test_ekfac_is_the_projection_and_no_farther_than_kfac(name):
    """Per Kronecker leaf, with ``Q`` the eigenbasis of the KFLR (KFAC) factors and ``G`` the exact
    GGN block (``F`` the Monte-Carlo Fisher block of the same samples, ``Σ_{n,m} g gᵀ`` of the
    ``vmap(grad)`` pseudo-loss gradients):

    * ``s = diag(Qᵀ G Q)`` (``diag(Qᵀ F Q)``), i.e. EKFAC is the Frobenius projection of ``G``
      onto the matrices diagonal in ``Q``;
    * hence ``‖EKFAC − G‖_F ≤ ‖KFLR − G‖_F``: KFLR ``= Q diag(λ_A ⊗ λ_B) Qᵀ`` is diagonal in the
      same basis, and the projection is the nearest such matrix (Pythagoras: the squared error of
      any ``Q diag(d) Qᵀ`` is ``‖G‖² − ‖diag(QᵀGQ)‖² + ‖diag(QᵀGQ) − d‖²``). Same for KFAC vs ``F``.

    Other leaves keep the block KFLR (KFAC) gives them."""
    case, batch, exact, sampled, grads, ggn = _zoo(name)
    fisher = grads.T @ grads
    slices = reference.float_slices(case.params)
    pairs = [(exact["ekfac"], exact["kflr"], ggn), (sampled["ekfac"], sampled["kfac"], fisher)]
    kron = 0
    for ekfac_tree, kfac_tree, full in pairs:
        for e, k, where in zip(_blocks(ekfac_tree), _blocks(kfac_tree), slices, strict=True):
            target = full[where, where]
            if e.kind != "eigen_kronecker":
                _close(e.to_dense(), k.to_dense(), rtol=0.0, what=f"{name}: non-Kronecker leaf")
                continue
            kron += 1
            q = _basis(e)
            _close(e.scaling.ravel(), np.diagonal(q.T @ target @ q), what=f"{name}: s")
            # Q is the eigenbasis of the factors returned alongside
            rotated = q.T @ _kron_dense(k) @ q
            _close(rotated, np.diag(np.diagonal(rotated)), what=f"{name}: basis")
            err_e = np.linalg.norm(_ekfac_dense(e) - target)
            err_k = np.linalg.norm(_kron_dense(k) - target)
            assert err_e <= err_k + 1e-10 * np.linalg.norm(target), (name, err_e, err_k)
    assert kron >= 2


def test_scaling_from_rotated_per_example_gradients_conv():
    """``s`` of a grouped convolution (G > 1, T > 1 positions) against ``Σ (Q_Aᵀ g Q_B)²`` of the
    ``vmap(grad)`` gradients of the sampled pseudo-losses."""
    case, _, _, sampled, grads, _ = _zoo("cnn_grouped")
    groups = []
    for e, where in zip(
        _blocks(sampled["ekfac"]), reference.float_slices(case.params), strict=True
    ):
        if e.kind == "eigen_kronecker":
            groups.append(e.scaling.shape[0])
            _close(e.scaling, _rotated_squares(e, grads[:, where]), what="conv s")
    assert max(groups) > 1


LM_CONFIG = lm.Config(vocab_size=7, width=8, num_heads=2, num_layers=1, seq_len=4, mlp_ratio=2)


def test_scaling_of_a_language_model_with_padding():
    """``[N, T, V]`` outputs, token-mean loss, a padding mask, exact basis: ``s`` against the
    rotated per-(example, position, column) gradients ``g = J_{n,t}ᵀ √(κ w_{n,t}) S_{n,t} e_k``,
    ``Σ (Qᵀ g)² = diag(Qᵀ G Q)`` with the masked GGN block ``κ Σ_{n,t} w_{n,t} J_{n,t}ᵀ H_{n,t}
    J_{n,t}`` from ``jax.jacrev`` / ``jax.hessian`` (padded positions contribute nothing). The
    Monte-Carlo basis over positions is checked on the convolution above."""
    # the structure from flax (traced only), values from numpy: eager flax init takes seconds
    shapes = jax.eval_shape(functools.partial(lm.init, config=LM_CONFIG), jax.random.key(0))
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: jnp.asarray(0.5 * rng.normal(size=s.shape)), shapes)
    apply_fn = lm.make_apply_fn(LM_CONFIG)
    n, t, v = 3, LM_CONFIG.seq_len, LM_CONFIG.vocab_size
    tokens = jax.random.randint(jax.random.key(1), (n, t), 0, v)
    targets = jax.random.randint(jax.random.key(2), (n, t), 0, v)
    mask = jnp.asarray([[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    batch = (tokens, targets, mask)
    run = jax.jit(
        lambda p, b: curvjax.ekfac(
            apply_fn, p, b, loss="cross_entropy", reduction="token_mean", basis="kflr"
        )
    )
    exact = run(params, batch)
    flat, unravel = reference.flatten_float(params)

    @jax.jit
    def jacobian_and_hessians(flat):
        outputs = apply_fn(unravel(flat), tokens)
        jac = jax.jacrev(lambda p: apply_fn(unravel(p), tokens))(flat)  # [N, T, V, D]
        one = jax.hessian(lambda f, y: reference.per_example_loss("cross_entropy", f, y))
        return jac, jax.vmap(jax.vmap(one))(outputs, targets)  # [N, T, V, V]

    jac, hess = (np.asarray(x) for x in jacobian_and_hessians(flat))
    weights = np.asarray(mask) / np.sum(mask)  # κ w_{n,t}
    checked = 0
    for e, where in zip(_blocks(exact), reference.float_slices(params), strict=True):
        if e.kind != "eigen_kronecker":
            continue
        checked += 1
        j = jac[..., where] @ _basis(e)  # rotated Jacobian
        expected = np.einsum("nt,ntvi,ntvw,ntwi->i", weights, j, hess, j)
        _close(e.scaling.ravel(), expected, what="LM s")
    assert checked == 4  # the qkv, attention-output and two MLP kernels


# ---------------------------------------------------------------------------- (e) operators


G_, I_, O_ = 2, 3, 4
LEAF = (O_, G_ * I_)


def _orthogonal(rng, n):
    return np.linalg.qr(rng.normal(size=(n, n)))[0]


def _random_block(seed, scale=1.0):
    rng = np.random.default_rng(seed)
    qa = np.stack([_orthogonal(rng, I_) for _ in range(G_)])
    qb = np.stack([_orthogonal(rng, O_) for _ in range(G_)])
    s = scale * rng.uniform(0.1, 2.0, size=(G_, I_, O_))
    index = rng.permutation(G_ * I_ * O_)
    return curvjax.EigenKroneckerBlock(jnp.asarray(qa), jnp.asarray(qb), jnp.asarray(s), index)


def test_block_operations_against_a_dense_reference():
    block = _random_block(0)
    dense = _ekfac_dense(block)
    damping = 0.3
    damped = dense + damping * np.eye(dense.shape[0])
    values, vectors = np.linalg.eigh(damped)
    v = np.random.default_rng(1).normal(size=LEAF)
    flat = v.ravel()

    @jax.jit
    def ops(block, v):
        negative = block._replace(scaling=block.scaling - 1.0)
        return {
            "to_dense": block.to_dense(),
            "block_to_dense": curvjax.block_to_dense(block),
            "matvec": block.matvec(v),
            "eigenvalues": jnp.sort(block.eigenvalues()),
            "trace": block.trace(),
            "solve": block.damped_solve(v, damping),
            # no factored damping for EKFAC: the flag is ignored
            "power": block.damped_power(v, damping, -0.5),
            "power_unfactored": block.damped_power(v, damping, -0.5, factored=False),
            "root": block.damped_inverse_sqrt(damping, scale=2.0).to_dense(),
            "sample": block.damped_inverse_sqrt(damping).sample(jax.random.key(0)),
            "prior": block.prior_root(0.5).to_dense(),
            "nonnegative": negative.nonnegative().scaling,
            "same": block.eigh().scaling,
        }

    out = ops(block, jnp.asarray(v))
    _close(out["to_dense"], dense, what="to_dense")
    _close(out["block_to_dense"], dense, what="block_to_dense")
    _close(out["matvec"], (dense @ flat).reshape(LEAF), what="matvec")
    _close(out["eigenvalues"], np.linalg.eigvalsh(dense), what="eigenvalues")
    _close(out["trace"], np.trace(dense), what="trace")
    _close(out["solve"], np.linalg.solve(damped, flat).reshape(LEAF), what="solve")
    power = ((vectors * values**-0.5) @ vectors.T @ flat).reshape(LEAF)
    _close(out["power"], power, what="power")
    _close(out["power_unfactored"], power, what="power (factored=False)")
    _close(out["root"] @ out["root"].T, 4.0 * np.linalg.inv(damped), what="inverse sqrt")
    assert out["sample"].shape == (dense.shape[0],)
    _close(out["prior"] @ out["prior"].T, 0.25 * np.eye(dense.shape[0]), what="prior root")
    _close(out["nonnegative"], np.clip(np.asarray(block.scaling) - 1.0, 0.0, None))
    _close(out["same"], block.scaling, rtol=0.0, what="eigh is the block itself")
    # a pytree of the three float arrays, ``index`` static
    leaves, treedef = jax.tree.flatten(block)
    assert len(leaves) == 3 and jax.tree.unflatten(treedef, leaves).same_layout(block)


def test_moving_average_projects_onto_the_new_basis():
    """``decay · old + (1 − decay) · new`` kept in the new block's eigenbasis ``Q``: the
    Frobenius projection ``Q diag(diag(Qᵀ (decay C_old + (1 − decay) C_new) Q)) Qᵀ``."""
    old, new = _random_block(2), _random_block(3)
    new = new._replace(index=old.index)
    avg = new.moving_average(old, 0.3)
    q = _basis(new)
    mixed = 0.3 * _ekfac_dense(old) + 0.7 * _ekfac_dense(new)
    _close(_ekfac_dense(avg), q @ np.diag(np.diagonal(q.T @ mixed @ q)) @ q.T, what="average")
    assert new.conform(avg, LEAF) is avg
    with pytest.raises(ValueError, match="eigenvalue-corrected"):
        new.conform(curvjax.DiagonalBlock(jnp.ones(LEAF)), LEAF)


# ---------------------------------------------------------------------------- (f) extract


def _mlp(p, x):
    return jnp.tanh(x @ p["w1"] + p["b1"][None, :]) @ p["w2"]


def _mlp_problem(seed=0, n=7):
    rng = np.random.default_rng(seed)
    params = {
        "w1": jnp.asarray(rng.normal(size=(4, 5)) / 2),
        "b1": jnp.asarray(rng.normal(size=5) / 4),
        "w2": jnp.asarray(rng.normal(size=(5, 3)) / 2),
    }
    batch = (jnp.asarray(rng.normal(size=(n, 4))), jnp.asarray(rng.integers(0, 3, n)))
    return params, batch


def test_extract_shares_the_kfac_factors_and_matches_the_public_functions(monkeypatch):
    params, batch = _mlp_problem()
    key = jax.random.key(0)
    calls = []
    original = backprop.Pass.reduce_columns

    def counting(self, fn, columns, **kwargs):
        calls.append(columns.shape)
        return original(self, fn, columns, **kwargs)

    monkeypatch.setattr(backprop.Pass, "reduce_columns", counting)

    def both(p, b):
        return curvjax.extract(_mlp, p, b, ["ekfac", "kfac"], key=key, mc_samples=2)

    jax.eval_shape(both, params, batch)  # traces once: counts the backpropagations
    # the factors' backpropagation serves both; EKFAC adds one more of the same vectors for s
    assert calls == [(7, 2, 3), (7, 2, 3)]
    monkeypatch.undo()

    @jax.jit
    def run(p, b):
        alone = curvjax.ekfac(_mlp, p, b, key=key, mc_samples=2)
        return both(p, b), alone, curvjax.kfac(_mlp, p, b, key=key, mc_samples=2)

    out, alone, kfac = run(params, batch)
    for name in params:
        _close(out["ekfac"][name].to_dense(), alone[name].to_dense(), what=name)
        _close(out["kfac"][name].to_dense(), kfac[name].to_dense(), what=name)
    assert isinstance(out["ekfac"]["w1"], curvjax.EigenKroneckerBlock)
    assert isinstance(out["ekfac"]["b1"], curvjax.DenseBlock)
    with pytest.raises(ValueError, match="basis='fisher' is not one of"):
        curvjax.ekfac(_mlp, params, batch, basis="fisher")
    with pytest.raises(ValueError, match="key"):
        curvjax.ekfac(_mlp, params, batch)  # the Monte-Carlo basis needs a key


def _pooled(p, x):
    """``[N, T, D] -> [N, C]``: ``w1`` shared over ``T = 4`` positions, ``w2`` over one."""
    return jnp.tanh(x @ p["w1"]).mean(axis=1) @ p["w2"]


def test_per_example_quadratic_form_of_the_damped_inverse():
    """``vec(g_n)ᵀ (C + λ I)⁻¹ vec(g_n)`` from the taps (the self-influence of an EKFAC block),
    against dense numpy with the ``vmap(grad)`` per-example gradients of ``κ ℓ_n``, for a kernel
    shared over positions (``T = 4``) and one that is not (``T = 1``, no ``g_n`` formed)."""
    rng = np.random.default_rng(5)
    params = {
        "w1": jnp.asarray(rng.normal(size=(3, 4))),
        "w2": jnp.asarray(rng.normal(size=(4, 3))),
    }
    batch = (jnp.asarray(rng.normal(size=(5, 4, 3))), jnp.asarray(rng.integers(0, 3, 5)))
    damping = 0.1

    @jax.jit
    def run(params, batch):
        # positions pooled before the loss: the eigenbases of KFLR-reduce (s does not depend on it)
        blocks = _blocks(
            curvjax.ekfac(_pooled, params, batch, basis="kflr", approximation="reduce")
        )
        factors = _blocks(curvjax.kflr(_pooled, params, batch, approximation="reduce"))
        p = backprop.run(_pooled, params, batch)
        cols = p.columns_of_gradient()
        return (
            blocks,
            factors,
            {
                k: ekfac_lib.per_example_quadratic(
                    blocks[k],
                    kronecker.forms_of(p, uses, cols),
                    1.0 / blocks[k].damped_scaling(damping),
                )
                for k, uses in kronecker.kernel_uses(p).items()
            },
        )

    blocks, factors, quadratic = run(params, batch)
    grads = reference.per_example_grads(_pooled, params, batch)
    assert sorted(quadratic) == [0, 1]
    for k, name in enumerate(sorted(params)):
        rotated = _basis(blocks[k]).T @ _kron_dense(factors[k]) @ _basis(blocks[k])
        _close(rotated, np.diag(np.diagonal(rotated)), what=f"{name}: basis of KFLR-reduce")
        g = np.asarray(grads[name]).reshape(5, -1)
        damped = _ekfac_dense(blocks[k]) + damping * np.eye(g.shape[1])
        expected = np.einsum("ni,ni->n", g, np.linalg.solve(damped, g.T).T)
        _close(quadratic[k][:, 0], expected, what=name)


# ---------------------------------------------------------------------------- (g) optimizers


def _ekfac_dense_tree(blocks):
    return {
        name: _ekfac_dense(b) if b.kind == "eigen_kronecker" else np.asarray(b.to_dense())
        for name, b in blocks.items()
    }


def test_preconditioner_and_kfac_optimizer_with_ekfac_equal_dense_steps():
    """``precondition_by_curvature`` with EKFAC blocks solves ``(C + λ + η) d = ∇L + ηθ`` per
    leaf; ``scale_by_kfac(quantity="ekfac")`` does the same with the moving average, which for
    EKFAC blocks is the projection of ``½ C₁ + ½ C₂`` onto ``C₂``'s eigenbasis at step 2."""
    params, _ = _mlp_problem(1)
    batches = [_mlp_problem(1 + k)[1] for k in range(2)]
    lam, eta = 0.05, 0.01
    pre = precondition_by_curvature(lam, eta)
    opt = scale_by_kfac(
        _mlp, batches[0][0], damping=lam, l2=eta, inverse_interval=1, quantity="ekfac"
    )

    @jax.jit
    def step(state, batch, key):
        out = curvjax.extract(_mlp, params, batch, ["ekfac"], key=key)
        d_pre, _ = pre.update(out["grad"], pre.init(params), params, curvature=out["ekfac"])
        d_kfac, state = opt.update(out["grad"], state, params, curvature=out["ekfac"])
        return out, d_pre, d_kfac, state

    state = opt.init(params)
    previous = None
    for k, batch in enumerate(batches):
        out, d_pre, d_kfac, state = step(state, batch, jax.random.key(k))
        current = _ekfac_dense_tree(out["ekfac"])
        if previous is None:
            averaged = current
        else:  # in the new basis Q: diag(Qᵀ (½ C₁ + ½ C₂) Q); dense blocks averaged as they are
            averaged = {}
            for name, block in out["ekfac"].items():
                mixed = 0.5 * previous[name] + 0.5 * current[name]
                if block.kind == "eigen_kronecker":
                    q = _basis(block)
                    mixed = q @ np.diag(np.diagonal(q.T @ mixed @ q)) @ q.T
                averaged[name] = mixed
        for name in params:
            rhs = np.asarray(out["grad"][name] + eta * params[name]).ravel()
            shift = (lam + eta) * np.eye(rhs.size)
            expected = np.linalg.solve(current[name] + shift, rhs)
            _close(np.ravel(d_pre[name]), expected, what=f"precondition {name}")
            expected = np.linalg.solve(averaged[name] + shift, rhs)
            _close(np.ravel(d_kfac[name]), expected, what=f"scale_by_kfac step {k} {name}")
        previous = averaged
    assert int(state.count) == 2
    updates = optax.apply_updates(params, d_kfac)
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(updates))


@pytest.mark.parametrize(
    "t, i, o, m",
    [
        (1, 5, 3, 2),
        (2, 6, 2, 3),
        (9, 4, 3, 1),
    ],  # T = 1; rotate first (I O (I+O) ≥ T(I²/M+O²)); form first
)
def test_rotated_sum_sq_both_orders_equal_the_rotated_per_example_gradients(t, i, o, m):
    rng = np.random.default_rng(0)
    n, g = 3, 2
    a, b = rng.normal(size=(n, g, t, i)), rng.normal(size=(n, m, g, t, o))
    w = rng.normal(size=(n, m))  # signed column weights, as exact columns may carry
    q_a = np.linalg.qr(rng.normal(size=(g, i, i)))[0]
    q_b = np.linalg.qr(rng.normal(size=(g, o, o)))[0]
    form = ekfac_lib.bilinear.Form(jnp.asarray(a), jnp.asarray(b), lambda x: x)
    ours = ekfac_lib.rotated_sum_sq([form], jnp.asarray(q_a), jnp.asarray(q_b), jnp.asarray(w))
    grads = np.einsum("ngti,nmgto->nmgio", a, b)  # per-example, per-vector gradients
    rotated = np.einsum("gij,nmgio,gop->nmgjp", q_a, grads, q_b)
    _close(ours, np.einsum("nm,nmgjp->gjp", w, rotated**2), what=f"T={t}")


@pytest.mark.parametrize(
    "g, r, d, repeated",
    [(1, 3, 10, False), (2, 4, 9, True), (1, 12, 10, False), (2, 5, 6, True)],
)
def test_eigh_of_rows_is_an_eigendecomposition_of_the_factor(g, r, d, repeated):
    """``A = rowsᵀ rows / c``: few rows (``R ≤ D/2``) take the SVD of the rows completed by a QR,
    many an eigendecomposition of ``A``; either way an orthonormal basis that diagonalises ``A``
    with its eigenvalues (numpy's ``eigvalsh`` as the reference), also for rank-deficient rows
    (a repeated row)."""
    rows = np.random.default_rng(r + d).normal(size=(g, r, d))
    if repeated:
        rows[:, -1] = rows[:, 0]
    denominator = 7.0
    factor = np.einsum("grd,gre->gde", rows, rows) / denominator
    values, vectors = kronecker.eigh_of_rows(jnp.asarray(rows), denominator, jnp.asarray(factor))
    values, vectors = np.asarray(values), np.asarray(vectors)
    assert vectors.shape == (g, d, d) and values.shape == (g, d)
    for k in range(g):
        _close(vectors[k].T @ vectors[k], np.eye(d), what="orthonormal")
        _close(vectors[k].T @ factor[k] @ vectors[k], np.diag(values[k]), what="diagonalised")
        _close(np.sort(values[k]), np.linalg.eigvalsh(factor[k]), what="eigenvalues")
