"""Outputs with positions ``[N, T, C]``, position weights (masks) and the three reductions.

Every quantity is compared with float64 references written here from the definitions: the loss
of example ``n`` is ``ℓ_n = Σ_t w_{n,t} ℓ(f_{n,t}, y_{n,t})`` and ``L = κ Σ_n ℓ_n``, differentiated
with ``jax.grad`` / ``vmap(grad)`` / ``jax.hessian`` / ``jax.jacobian``; none uses curvjax's loss
factors or its lifting over positions.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import curvjax
import curvjax.optim
import curvjax.spectral

N, T, D, H, C = 3, 4, 3, 5, 4
TOL = dict(rtol=1e-9, atol=1e-11)  # float64: agreement to round-off of sums of ~100 terms


def _params():
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    return {
        "w1": jax.random.normal(k1, (D, H)) / np.sqrt(D),
        "b1": 0.1 * jax.random.normal(k2, (H,)),
        "w2": jax.random.normal(k3, (H, C)) / np.sqrt(H),
    }


# causal mixing of the positions within an example (a constant lower-triangular matrix)
_CAUSAL = np.tril(np.ones((T, T))) / np.arange(1, T + 1)[:, None]


def apply_fn(p, x):  # [N, T, D] -> [N, T, C]
    h = jnp.tanh(x @ p["w1"] + p["b1"][None, None])
    h = h + jnp.einsum("ts,nsh->nth", _CAUSAL, h)
    return h @ p["w2"]


def _data(loss):
    kx, ky = jax.random.split(jax.random.key(1))
    x = jax.random.normal(kx, (N, T, D))
    if loss == "cross_entropy":
        y = jax.random.randint(ky, (N, T), 0, C)
    else:
        y = jax.random.normal(ky, (N, T, C))
    mask = np.ones((N, T))
    mask[0, -1] = mask[2, -2:] = 0.0  # padding at the ends of two sequences
    return x, y, jnp.asarray(mask)


def _position_loss(loss, f, y):
    if loss == "cross_entropy":
        return -jax.nn.log_softmax(f)[y]
    return jnp.sum((f - y) ** 2)


def _example_loss(loss, p, x, y, w):  # ℓ_n for one example, written from the definition
    f = apply_fn(p, x[None])[0]
    return jnp.sum(w * jax.vmap(lambda fp, yp: _position_loss(loss, fp, yp))(f, y))


def _kappa(reduction, w):
    return {"sum": 1.0, "mean": 1.0 / N, "token_mean": 1.0 / jnp.sum(w)}[reduction]


def _total(loss, reduction, p, x, y, w):
    per = jax.vmap(lambda xx, yy, ww: _example_loss(loss, p, xx, yy, ww))(x, y, w)
    return _kappa(reduction, w) * jnp.sum(per)


CASES = [
    ("cross_entropy", "token_mean", True),
    ("cross_entropy", "sum", True),
    ("mse", "mean", True),
    ("cross_entropy", "mean", False),
]


def _batch(loss, masked):
    x, y, mask = _data(loss)
    return (x, y, mask) if masked else (x, y), (x, y, mask if masked else jnp.ones((N, T)))


def _flat(tree):
    return ravel_pytree(tree)[0]


@pytest.mark.parametrize("loss,reduction,masked", CASES)
def test_first_order_matches_vmap_grad(loss, reduction, masked):
    params = _params()
    batch, (x, y, w) = _batch(loss, masked)
    kappa = _kappa(reduction, w)
    ref_per = jax.vmap(
        lambda xx, yy, ww: jax.grad(lambda p: kappa * _example_loss(loss, p, xx, yy, ww))(params)
    )(x, y, w)
    out = curvjax.extract(
        apply_fn,
        params,
        batch,
        ["per_example_grads", "batch_l2", "variance"],
        loss=loss,
        reduction=reduction,
    )
    np.testing.assert_allclose(out["loss"], _total(loss, reduction, params, x, y, w), **TOL)
    ref_grad = jax.grad(lambda p: _total(loss, reduction, p, x, y, w))(params)
    for name in params:
        np.testing.assert_allclose(out["per_example_grads"][name], ref_per[name], **TOL)
        np.testing.assert_allclose(out["grad"][name], ref_grad[name], **TOL)
        np.testing.assert_allclose(out["per_example_grads"][name].sum(0), ref_grad[name], **TOL)
        sq = jnp.sum(ref_per[name] ** 2, axis=tuple(range(1, ref_per[name].ndim)))
        np.testing.assert_allclose(out["batch_l2"][name], sq, **TOL)


def _dense_ggn_and_hessian(loss, reduction, params, x, y, w):
    flat, unravel = ravel_pytree(params)
    kappa = _kappa(reduction, w)

    def outputs(v):
        return apply_fn(unravel(v), x)

    jac = jax.jacobian(outputs)(flat)  # [N, T, C, D]
    f = outputs(flat)
    h_out = jax.vmap(jax.vmap(jax.hessian(lambda fp, yp: _position_loss(loss, fp, yp))))(f, y)
    ggn = kappa * jnp.einsum("ntcd,nt,ntce,ntef->df", jac, w, h_out, jac)
    hess = jax.hessian(lambda v: _total(loss, reduction, unravel(v), x, y, w))(flat)
    return ggn, hess


@pytest.mark.parametrize("loss,reduction,masked", CASES)
def test_second_order_matches_dense(loss, reduction, masked):
    params = _params()
    batch, (x, y, w) = _batch(loss, masked)
    ggn, hess = _dense_ggn_and_hessian(loss, reduction, params, x, y, w)
    out = curvjax.extract(
        apply_fn, params, batch, ["ggn_diag", "hessian_diag"], loss=loss, reduction=reduction
    )
    np.testing.assert_allclose(_flat(out["ggn_diag"]), jnp.diag(ggn), **TOL)
    np.testing.assert_allclose(_flat(out["hessian_diag"]), jnp.diag(hess), **TOL)
    v = jax.tree.map(lambda a: jnp.cos(jnp.arange(a.size, dtype=a.dtype).reshape(a.shape)), params)
    kw = dict(loss=loss, reduction=reduction)
    gv = curvjax.ggn_vp(apply_fn, params, batch, v, **kw)
    hv = curvjax.hvp(apply_fn, params, batch, v, **kw)
    np.testing.assert_allclose(_flat(gv), ggn @ _flat(v), **TOL)
    np.testing.assert_allclose(_flat(hv), hess @ _flat(v), **TOL)
    np.testing.assert_allclose(curvjax.ggn_matrix(apply_fn, params, batch, **kw), ggn, **TOL)
    op = curvjax.spectral.ggn_operator(apply_fn, params, batch, **kw)
    np.testing.assert_allclose(op.matvec(_flat(v)), ggn @ _flat(v), **TOL)


def test_mc_ggn_diag_is_unbiased_with_positions():
    """``E[ggn_diag_mc] = ggn_diag`` (one label drawn per position): the mean of R independent
    estimates lies within 5 standard errors of the exact diagonal, elementwise."""
    params = _params()
    batch, (x, y, w) = _batch("cross_entropy", True)
    ggn, _ = _dense_ggn_and_hessian("cross_entropy", "token_mean", params, x, y, w)
    fn = jax.jit(
        lambda k: _flat(
            curvjax.ggn_diag_mc(
                apply_fn, params, batch, key=k, mc_samples=8, reduction="token_mean"
            )
        )
    )
    samples = jnp.stack([fn(k) for k in jax.random.split(jax.random.key(2), 200)])
    mean, se = samples.mean(0), samples.std(0, ddof=1) / np.sqrt(samples.shape[0])
    assert np.all(np.abs(mean - jnp.diag(ggn)) <= 5 * se + 1e-12)


def test_masked_position_contributes_nothing():
    """Changing the input and the target of a masked (last) position changes no quantity (the
    model mixes positions causally, so the last position only reaches its own output)."""
    params = _params()
    x, y, mask = _data("cross_entropy")
    x2 = x.at[0, -1].set(7.0)
    y2 = y.at[0, -1].set((y[0, -1] + 1) % C)
    names = ["per_example_grads", "ggn_diag", "hessian_diag"]
    kw = dict(reduction="token_mean")
    a = curvjax.extract(apply_fn, params, (x, y, mask), names, **kw)
    b = curvjax.extract(apply_fn, params, (x2, y2, mask), names, **kw)
    names += ["loss", "grad"]
    assert not np.allclose(apply_fn(params, x)[0, -1], apply_fn(params, x2)[0, -1])
    for name in names:
        for u, v in zip(jax.tree.leaves(a[name]), jax.tree.leaves(b[name]), strict=True):
            np.testing.assert_allclose(u, v, **TOL)
    # the mask does matter for an unmasked position
    c = curvjax.extract(apply_fn, params, (x2, y2, jnp.ones((N, T))), [], **kw)
    assert not np.allclose(a["loss"], c["loss"])


def test_per_example_weights_of_shape_n():
    """Weights ``[N]`` weigh whole examples: ``ℓ_n`` scaled by ``w_n``."""
    params = _params()
    x, y, _ = _data("cross_entropy")
    w_n = jnp.array([1.0, 0.0, 2.5])
    w = jnp.broadcast_to(w_n[:, None], (N, T))
    out = curvjax.extract(apply_fn, params, (x, y, w_n), [], reduction="sum")
    np.testing.assert_allclose(out["loss"], _total("cross_entropy", "sum", params, x, y, w), **TOL)


def test_errors_name_the_problem():
    params = _params()
    x, y, mask = _data("cross_entropy")
    with pytest.raises(ValueError, match=r"weights \(batch\[2\]\) must have shape"):
        curvjax.grad(apply_fn, params, (x, y, mask[:, :2]))
    with pytest.raises(ValueError, match="every position is masked"):
        curvjax.batch_l2(apply_fn, params, (x, y, 0 * mask), reduction="token_mean")
    with pytest.raises(ValueError, match="non-negative"):
        curvjax.grad(apply_fn, params, (x, y, -mask))
    with pytest.raises(ValueError, match=r"targets' leading axes must be \[N, \*P\]"):
        curvjax.batch_l2(apply_fn, params, (x, y[:, :2]))
    with pytest.raises(ValueError, match="unsupported reduction"):
        curvjax.hvp(apply_fn, params, (x, y), params, reduction="tokens")
    with pytest.raises(ValueError, match=r"\[N, \*positions, C\]"):
        curvjax.batch_l2(lambda p, xx: jnp.sum(apply_fn(p, xx), axis=(1, 2)), params, (x, y))
    # a label out of range at a masked position is fine, at a counted one it is an error
    y_bad = y.at[0, -1].set(C + 3)
    curvjax.batch_l2(apply_fn, params, (x, y_bad, mask))
    with pytest.raises(ValueError, match="labels must lie in"):
        curvjax.batch_l2(apply_fn, params, (x, y_bad))


def test_hessian_diag_uses_the_exact_output_hessian_of_gaussian_nll():
    """``gaussian_nll``'s factor is its (PSD) Fisher; the exact Hessian diagonal must use the
    signed exact output Hessian instead (reference: ``jax.hessian`` of the loss written here)."""
    params = _params()
    x, _, mask = _data("mse")
    y = jax.random.normal(jax.random.key(3), (N, T, C // 2))

    def nll(f, yp):  # -log N(y; μ, e^s) with mean μ = f[:C/2], log-variance s = f[C/2:]
        mu, s = f[: C // 2], f[C // 2 :]
        return 0.5 * jnp.sum(jnp.log(2 * jnp.pi) + s + (yp - mu) ** 2 * jnp.exp(-s))

    def total(p):
        f = apply_fn(p, x)
        return jnp.sum(mask * jax.vmap(jax.vmap(nll))(f, y)) / jnp.sum(mask)

    flat, unravel = ravel_pytree(params)
    hess = jax.hessian(lambda v: total(unravel(v)))(flat)
    kw = dict(loss="gaussian_nll", reduction="token_mean")
    out = curvjax.extract(apply_fn, params, (x, y, mask), ["hessian_diag"], **kw)
    np.testing.assert_allclose(out["loss"], total(params), **TOL)
    np.testing.assert_allclose(_flat(out["hessian_diag"]), jnp.diag(hess), **TOL)


@pytest.mark.parametrize("max_unrolled", [48, 2])
def test_exact_columns_made_in_chunks(monkeypatch, max_unrolled):
    """The exact columns with positions are made a chunk at a time (unrolled, or in a loop whose
    last chunk is padded with index 0): ``ggn_diag`` still equals the dense GGN's diagonal."""
    from curvjax._src import chunking

    # 16 columns (4 positions x 4 classes) in chunks of 3: the sixth chunk is padded
    monkeypatch.setattr(chunking, "column_chunk_size", lambda num, size: 3)
    monkeypatch.setattr(chunking, "MAX_UNROLLED", max_unrolled)
    params = _params()
    batch, (x, y, w) = _batch("cross_entropy", True)
    ggn, _ = _dense_ggn_and_hessian("cross_entropy", "sum", params, x, y, w)
    out = curvjax.ggn_diag(apply_fn, params, batch, reduction="sum")
    np.testing.assert_allclose(_flat(out), jnp.diag(ggn), **TOL)


def test_kfac_quadratic_model_with_positions():
    """K-FAC's quadratic model ``Q_ij = v_iᵀ G v_j`` on a masked token-mean batch equals the
    dense GGN's form; the optimizers run one step on ``[N, T, C]`` outputs."""
    import optax

    from curvjax._src.optim import kfac as kfac_lib

    params = _params()
    batch, (x, y, w) = _batch("cross_entropy", True)
    ggn, _ = _dense_ggn_and_hessian("cross_entropy", "token_mean", params, x, y, w)
    vs = [
        jax.tree.map(lambda a, s=s: jnp.sin(s + jnp.arange(a.size).reshape(a.shape)), params)
        for s in (0.0, 1.0)
    ]
    q, value, _ = kfac_lib._ggn_quadratic(
        apply_fn, params, batch, vs, "cross_entropy", "token_mean"
    )
    flat = jnp.stack([_flat(v) for v in vs])
    np.testing.assert_allclose(q, flat @ ggn @ flat.T, **TOL)
    np.testing.assert_allclose(value, _total("cross_entropy", "token_mean", params, x, y, w), **TOL)

    key = jax.random.key(4)
    for opt in (
        curvjax.optim.kfac(apply_fn, x, damping=1e-2, reduction="token_mean"),
        curvjax.optim.noisy_kfac(apply_fn, x, learning_rate=0.1, rho=0.1, damping=1e-2),
        curvjax.optim.precondition_by_curvature(
            1e-2, quantity="kflr", apply_fn=apply_fn, reduction="token_mean"
        ),
    ):
        grads = curvjax.grad(apply_fn, params, batch, reduction="token_mean")
        d, _ = opt.update(grads, opt.init(params), params, batch=batch, key=key)
        assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree.leaves(d))
        assert optax.tree.norm(d) > 0


def test_kfra_refuses_weights_shared_over_positions():
    with pytest.raises(ValueError, match="use `kflr` or `kfac`"):
        curvjax.kfra(apply_fn, _params(), _batch("cross_entropy", True)[0])
