"""Bad input, one table: every public function that takes ``(apply_fn, params, batch)`` against
every kind of malformed input raises a ``ValueError`` / ``TypeError`` whose message names the
argument and says what to do (checked by a regex on the message).

All errors are raised while checking shapes, dtypes and concrete values, before anything is
compiled, so the whole table runs on one tiny 2-layer MLP in a few seconds. The last tests check
what must *work*: batches of one example (against ``vmap(grad)`` and dense float64 references),
non-float parameter leaves (``None`` in the result), and a ``checkify`` recipe that catches a NaN
under ``jax.jit``, where values are not concrete and curvjax checks only shapes and dtypes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference
from jax.experimental import checkify

import curvjax
from curvjax import spectral

N, D, H, C = 4, 3, 5, 4
KEY = jax.random.key(0)
_K1, _K2, _K3 = jax.random.split(jax.random.key(1), 3)
PARAMS = {
    "w1": jax.random.normal(_K1, (D, H)) / np.sqrt(D),
    "b1": jnp.full((H,), 0.1),
    "w2": jax.random.normal(_K2, (H, C)) / np.sqrt(H),
    "b2": jnp.zeros(C),
}
X = jax.random.normal(_K3, (N, D))
Y = jnp.array([0, 1, 2, 3])


def mlp(p, x):
    return jnp.tanh(x @ p["w1"] + p["b1"][None]) @ p["w2"] + p["b2"][None]


def _drop(kw, *names):
    return {k: v for k, v in kw.items() if k not in names}


# every public entry point, called as f(apply_fn, params, batch, **kw)
FUNCTIONS = {
    "grad": curvjax.grad,
    "per_example_grads": curvjax.per_example_grads,
    "batch_l2": curvjax.batch_l2,
    "sum_grad_squared": curvjax.sum_grad_squared,
    "variance": curvjax.variance,
    "clipped_grad": lambda a, p, b, **kw: curvjax.clipped_grad(
        a, p, b, clip_norm=1.0, **_drop(kw, "reduction")
    ),
    "gradient_noise_scale": lambda a, p, b, **kw: curvjax.gradient_noise_scale(
        a, p, b, **_drop(kw, "reduction")
    ),
    "ggn_diag": curvjax.ggn_diag,
    "ggn_diag_mc": lambda a, p, b, **kw: curvjax.ggn_diag_mc(a, p, b, key=KEY, **kw),
    "hessian_diag": curvjax.hessian_diag,
    "hessian_diag_hutchinson": lambda a, p, b, **kw: curvjax.hessian_diag(
        a, p, b, method="hutchinson", key=KEY, **kw
    ),
    "kfac": lambda a, p, b, **kw: curvjax.kfac(a, p, b, key=KEY, **kw),
    "kflr": curvjax.kflr,
    "kfra": curvjax.kfra,
    "chain_factors": lambda a, p, b, **kw: curvjax.chain_factors(a, p, b, key=KEY, **kw),
    "ggn_vp": lambda a, p, b, **kw: curvjax.ggn_vp(a, p, b, p, **kw),
    "hvp": lambda a, p, b, **kw: curvjax.hvp(a, p, b, p, **kw),
    "ggn_matrix": curvjax.ggn_matrix,
    "hessian_matrix": curvjax.hessian_matrix,
    "extract": lambda a, p, b, **kw: curvjax.extract(
        a, p, b, ["variance", "ggn_diag", "ggn_diag_mc", "kflr"], key=KEY, **kw
    ),
    "hessian_operator": spectral.hessian_operator,
    "ggn_operator": spectral.ggn_operator,
    "fisher_operator": lambda a, p, b, **kw: spectral.fisher_operator(a, p, b, key=KEY, **kw),
    "empirical_fisher_operator": spectral.empirical_fisher_operator,
}
NO_REDUCTION = {"clipped_grad", "gradient_noise_scale"}  # they take no `reduction` argument
# the functions that need only the inputs: curvjax.inspect(apply_fn, params, inputs)
INSPECT_CASES = {"input_leaves_N", "N0", "out_rank", "out_tuple", "scalar_input_leaf"}


def _pair(p, xs):
    return mlp(p, xs["a"] + xs["b"])


_NAN_X = X.at[1, 1].set(jnp.nan)
_INF_PARAMS = {**PARAMS, "w1": PARAMS["w1"].at[0, 0].set(jnp.inf)}
_NAN_Y = jnp.zeros((N, C)).at[0, 0].set(jnp.nan)
_BATCH = (
    r"`batch` must be \(inputs, targets\) or \(inputs, targets, weights\), got {}; pass a tuple"
)
_OUTPUTS = (
    r"must (return one array of shape|be) \[N, C\] or \[N, \*positions, C\].*"
    r"(`out\[:, None\]`|`lambda p, x: model\(p, x\)\[0\]`)"
)

# case -> (apply_fn, params, batch, kwargs, exception, regex); each message names the argument
# (batch, inputs, targets, weights, params, loss, reduction, apply_fn's outputs) and the fix
CASES = {
    "not_tuple": (mlp, PARAMS, X, {}, ValueError, _BATCH.format("ArrayImpl")),
    "list_len1": (mlp, PARAMS, [X], {}, ValueError, _BATCH.format("list of length 1")),
    "len4": (
        mlp,
        PARAMS,
        (X, Y, jnp.ones(N), jnp.ones(N)),
        {},
        ValueError,
        _BATCH.format("tuple of length 4"),
    ),
    "targets_N": (
        mlp,
        PARAMS,
        (X, Y[:3]),
        {},
        ValueError,
        r"targets' leading axes must be \[N, \*P\] = \(4,\).*one target per example",
    ),
    "input_leaves_N": (
        _pair,
        PARAMS,
        ({"a": X, "b": X[:3]}, Y),
        {},
        ValueError,
        r"leaves of `inputs` \(batch\[0\]\) disagree on the batch size N: shapes "
        r"\[\(4, 3\), \(3, 3\)\]; give every leaf one row per example",
    ),
    "scalar_input_leaf": (
        lambda p, xs: mlp(p, xs["a"] * xs["s"]),
        PARAMS,
        ({"a": X, "s": jnp.float64(2.0)}, Y),
        {},
        ValueError,
        r"every leaf of `inputs` \(batch\[0\]\) needs a leading batch axis N.*into `params`",
    ),
    "weights_N": (
        mlp,
        PARAMS,
        (X, Y, jnp.ones(3)),
        {},
        ValueError,
        r"weights \(batch\[2\]\) must have shape \[N\]",
    ),
    "target_dtype": (
        mlp,
        PARAMS,
        (X, Y.astype(jnp.float64)),
        {},
        ValueError,
        r"'cross_entropy' takes integer class labels .*got targets of dtype float64; convert "
        r"one-hot targets with `targets.argmax\(-1\)`",
    ),
    "target_shape": (
        mlp,
        PARAMS,
        (X, Y[:, None]),
        {},
        ValueError,
        r"'cross_entropy' takes labels of shape \[N, \*P\] = \(4,\) .*got targets of shape \(4, 1\)",
    ),
    "mse_target_shape": (
        mlp,
        PARAMS,
        (X, jnp.zeros((N, C + 1))),
        {"loss": "mse"},
        ValueError,
        r"'mse' takes targets \[N, \*P, C\] of shape \(4, 4\) .*got targets of shape \(4, 5\)",
    ),
    "labels_too_large": (
        mlp,
        PARAMS,
        (X, jnp.array([0, 1, 2, 4])),
        {},
        ValueError,
        r"labels must lie in \[0, 4\) .*got labels in \[0, 4\]; give padded positions weight 0",
    ),
    "labels_negative": (
        mlp,
        PARAMS,
        (X, jnp.array([0, -1, 2, 3])),
        {},
        ValueError,
        r"labels must lie in \[0, 4\) .*got labels in \[-1, 3\]",
    ),
    "N0": (mlp, PARAMS, (X[:0], Y[:0]), {}, ValueError, r"batch is empty \(N = 0\).*at least one"),
    "out_rank": (lambda p, x: mlp(p, x)[:, 0], PARAMS, (X, Y), {}, ValueError, _OUTPUTS),
    "out_tuple": (lambda p, x: (mlp(p, x), x), PARAMS, (X, Y), {}, ValueError, _OUTPUTS),
    "nan_inputs": (
        mlp,
        PARAMS,
        (_NAN_X, Y),
        {},
        ValueError,
        r"^inputs contains NaN or Inf.*drop or impute",
    ),
    "inf_params": (
        mlp,
        _INF_PARAMS,
        (X, Y),
        {},
        ValueError,
        r"^params\['w1'\] contains NaN or Inf",
    ),
    "nan_targets": (
        mlp,
        PARAMS,
        (X, _NAN_Y),
        {"loss": "mse"},
        ValueError,
        r"^targets contains NaN or Inf",
    ),
    "unknown_loss": (
        mlp,
        PARAMS,
        (X, Y),
        {"loss": "crossentropy"},
        ValueError,
        r"unsupported loss 'crossentropy': use one of \['cross_entropy'",
    ),
    "unknown_reduction": (
        mlp,
        PARAMS,
        (X, Y),
        {"reduction": "avg"},
        ValueError,
        r"unsupported reduction 'avg': use 'mean'",
    ),
}
# where a function's message differs from the case's (and says the same thing its own way)
OVERRIDES = {
    ("gradient_noise_scale", "N0"): r"batch has 0 example\(s\).*needs at least 2",
}


def _table():
    for case in CASES:
        for name in FUNCTIONS:
            if case == "unknown_reduction" and name in NO_REDUCTION:
                continue
            yield pytest.param(name, case, id=f"{name}-{case}")
        if case in INSPECT_CASES:
            yield pytest.param("inspect", case, id=f"inspect-{case}")


@pytest.mark.parametrize(("name", "case"), list(_table()))
def test_bad_input_raises_a_clear_error(name, case):
    apply_fn, params, batch, kwargs, error, pattern = CASES[case]
    pattern = OVERRIDES.get((name, case), pattern)
    if name == "inspect":
        with pytest.raises(error, match=pattern):
            curvjax.inspect(apply_fn, params, batch[0])
        return
    with pytest.raises(error, match=pattern):
        FUNCTIONS[name](apply_fn, params, batch, **kwargs)


def test_output_messages_say_what_to_do():
    """The wrong-rank and tuple outputs: the message says how to fix ``apply_fn``."""
    with pytest.raises(ValueError, match=r"`out\[:, None\]`"):
        curvjax.grad(lambda p, x: mlp(p, x)[:, 0], PARAMS, (X, Y))
    with pytest.raises(ValueError, match=r"`lambda p, x: model\(p, x\)\[0\]`"):
        curvjax.hvp(lambda p, x: (mlp(p, x), x), PARAMS, (X, Y), PARAMS)


# -- names and keys ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("call", "pattern"),
    [
        (
            lambda: curvjax.extract(mlp, PARAMS, (X, Y), ["ggn_diagonal"]),
            r"unknown quantities \['ggn_diagonal'\]; available: \[.*'ggn_diag'",
        ),
        (
            lambda: curvjax.extract(mlp, PARAMS, (X, Y), ["variance"], options={"ggn": {}}),
            r"options for unknown quantities \['ggn'\]; available",
        ),
        (
            lambda: curvjax.chain_factors(mlp, PARAMS, (X, Y), quantity="kfc", key=KEY),
            r"`quantity` must be 'kfac' or 'kflr'.*got 'kfc'",
        ),
        (
            lambda: curvjax.hessian_diag(mlp, PARAMS, (X, Y), method="exactly"),
            r"unknown method 'exactly': use 'exact' or 'hutchinson'",
        ),
        (
            lambda: curvjax.kflr(mlp, PARAMS, (X, Y), approximation="sum"),
            r"approximation='sum' is not one of \('expand', 'reduce'\)",
        ),
        (
            lambda: curvjax.ggn_diag_mc(mlp, PARAMS, (X, Y), key=KEY, mc_samples=0),
            r"`mc_samples` must be a positive integer, got 0",
        ),
    ],
    ids=["extract", "extract_options", "chain_factors", "hessian_method", "approx", "mc_samples"],
)
def test_unknown_names(call, pattern):
    with pytest.raises(ValueError, match=pattern):
        jax.jit(call)()  # raised while tracing, before anything is compiled


MC_CALLS = {
    "ggn_diag_mc": lambda **kw: curvjax.ggn_diag_mc(mlp, PARAMS, (X, Y), **kw),
    "kfac": lambda **kw: curvjax.kfac(mlp, PARAMS, (X, Y), **kw),
    "chain_factors": lambda **kw: curvjax.chain_factors(mlp, PARAMS, (X, Y), **kw),
    "extract_ggn_diag_mc": lambda **kw: curvjax.extract(mlp, PARAMS, (X, Y), ["ggn_diag_mc"], **kw),
    "extract_kfac": lambda **kw: curvjax.extract(mlp, PARAMS, (X, Y), ["kfac"], **kw),
    "hessian_diag_hutchinson": lambda **kw: curvjax.hessian_diag(
        mlp, PARAMS, (X, Y), method="hutchinson", **kw
    ),
    "fisher_operator": lambda **kw: spectral.fisher_operator(mlp, PARAMS, (X, Y), **kw),
}


@pytest.mark.parametrize("name", sorted(MC_CALLS))
def test_missing_key(name):
    """A Monte-Carlo quantity without its key: an error that says `key=jax.random.key(...)`."""
    with pytest.raises(ValueError, match=r"`key=jax\.random\.key\(\.\.\.\)`"):
        MC_CALLS[name](key=None)
    if name in ("ggn_diag_mc", "kfac", "fisher_operator"):  # key is a required keyword
        with pytest.raises(TypeError, match="key"):
            MC_CALLS[name]()
    else:
        with pytest.raises(ValueError, match=r"`key=jax\.random\.key\(\.\.\.\)`"):
            MC_CALLS[name]()


@pytest.mark.parametrize(
    "name", ["ggn_diag_mc", "kfac", "chain_factors", "fisher_operator", "hessian_diag_hutchinson"]
)
@pytest.mark.parametrize(
    "key", [0, jax.random.split(jax.random.key(0), 2)], ids=["int_seed", "batch_of_keys"]
)
def test_key_that_is_not_one_key(name, key):
    """A seed or a batch of keys where one key is expected: a TypeError naming `key`."""
    with pytest.raises(TypeError, match=r"`key` must be a PRNG key from `jax.random.key\(seed\)`"):
        MC_CALLS[name](key=key)
    with pytest.raises(TypeError, match=r"`key` must be a PRNG key"):  # traced: the same check
        jax.jit(lambda k: MC_CALLS[name](key=k))(key)


# -- what must work: one example, non-float leaves --------------------------------------------


def _jit_call(fn, apply_fn, params, batch):
    """``fn(apply_fn, params, batch)`` under ``jax.jit`` (compiling once is faster than the
    first eager call's op-by-op dispatch)."""
    return jax.jit(lambda p, b: fn(apply_fn, p, b))(params, batch)


def _close(actual, expected, tol=1e-10):
    # float64 throughout: the references differ from curvjax only by rounding (~1e-15 relative)
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(e), rtol=tol, atol=tol)


REFERENCES = {  # the float64 references of the quantities that have one (tests/reference.py)
    "grad": reference.grad,
    "per_example_grads": reference.per_example_grads,
    "batch_l2": reference.batch_l2,
    "sum_grad_squared": reference.sum_grad_squared,
    "variance": reference.variance,
    "ggn_diag": reference.ggn_diag,
    "hessian_diag": reference.hessian_diag,
    "ggn_matrix": reference.ggn_matrix,
    "hessian_matrix": reference.hessian_matrix,
}


ONE = (X[:1], Y[:1])


@pytest.mark.parametrize("name", sorted(REFERENCES))
def test_one_example(name):
    """N = 1 works (variance is 0: one example has no spread) and equals the float64 reference
    (``vmap(grad)``, dense ``jax.hessian`` / Jacobian GGN)."""
    out = _jit_call(FUNCTIONS[name], mlp, PARAMS, ONE)
    _close(out, REFERENCES[name](mlp, PARAMS, ONE))
    if name == "variance":
        _close(out, jax.tree.map(jnp.zeros_like, PARAMS))


def test_one_example_clipping_products_kronecker():
    """N = 1: the clipped sum is the one clipped gradient; products equal the dense matrices
    times the vector; KFLR with one example and one position is exact for a layer:
    ``A ⊗ B`` = its GGN block. The gradient noise scale needs two examples and says so."""
    g = reference.per_example_grads(mlp, PARAMS, ONE)
    norm = np.sqrt(sum(float(jnp.sum(a**2)) for a in jax.tree.leaves(g)))
    clipped = jax.jit(curvjax.clipped_grad, static_argnums=0)(
        mlp, PARAMS, ONE, clip_norm=0.5 * norm
    )
    _close(clipped.grad, jax.tree.map(lambda a: 0.5 * a[0], g))
    assert float(clipped.clipped_fraction) == 1.0
    with pytest.raises(ValueError, match=r"needs at least 2"):  # a covariance of one: undefined
        curvjax.gradient_noise_scale(mlp, PARAMS, ONE)
    flat, _ = reference.flatten_float(PARAMS)
    dense_ggn = reference.ggn_matrix(mlp, PARAMS, ONE)
    dense_h = reference.hessian_matrix(mlp, PARAMS, ONE)
    ggn_vp = _jit_call(FUNCTIONS["ggn_vp"], mlp, PARAMS, ONE)
    hvp = _jit_call(FUNCTIONS["hvp"], mlp, PARAMS, ONE)
    _close(reference.flatten_float(ggn_vp)[0], dense_ggn @ flat)
    _close(reference.flatten_float(hvp)[0], dense_h @ flat)
    kflr = _jit_call(FUNCTIONS["kflr"], mlp, PARAMS, ONE)
    sl = reference.float_slices(PARAMS)[sorted(PARAMS).index("w2")]
    _close(curvjax.block_to_dense(kflr["w2"]), dense_ggn[sl, sl])


def _with_step(p, x):
    """The MLP with an integer leaf used in the forward pass (a step count, a layer index)."""
    scale = 1.0 + 0.0 * p["step"].astype(x.dtype)
    return mlp({k: v for k, v in p.items() if k != "step"}, x) * scale


@pytest.mark.parametrize("name", [n for n in FUNCTIONS if not n.endswith("operator")])
def test_non_float_leaves(name):
    """An integer leaf in ``params`` is held fixed: the result is ``None`` there (matrices and
    chain factors cover the float leaves only), and the float leaves equal the reference of the
    model without it, or are finite where there is no dense reference."""
    params = {**PARAMS, "step": jnp.array(7)}
    out = _jit_call(FUNCTIONS[name], _with_step, params, (X, Y))
    if name == "clipped_grad":
        out = out.grad
    elif name == "gradient_noise_scale":
        out = out.trace_cov_per_leaf
    elif name == "extract":
        assert all(out[q]["step"] is None for q in ("variance", "ggn_diag", "ggn_diag_mc", "kflr"))
        out = {q: _drop(v, "step") for q, v in out.items() if isinstance(v, dict)}
    if name not in ("ggn_matrix", "hessian_matrix", "chain_factors", "extract"):
        assert out["step"] is None, name
        out = _drop(out, "step")
    if name in REFERENCES:
        _close(out, REFERENCES[name](mlp, PARAMS, (X, Y)))
    else:
        assert all(np.all(np.isfinite(np.asarray(a))) for a in jax.tree.leaves(out))


# -- under jit: shapes and dtypes are checked, values are not; checkify catches NaN ------------


def test_under_jit_shapes_are_checked_values_are_not():
    jitted = jax.jit(lambda x, y: curvjax.ggn_diag(mlp, PARAMS, (x, y)))
    with pytest.raises(ValueError, match=r"targets' leading axes"):
        jitted(X, Y[:3])
    with pytest.raises(ValueError, match=r"integer class labels"):
        jitted(X, Y.astype(jnp.float64))
    # values are tracers under jit: a NaN input gives NaN, silently (use checkify, below)
    assert np.isnan(np.asarray(jitted(_NAN_X, Y)["w1"])).any()
    # ... and an out-of-range label is clamped to the nearest class by JAX's gather (a known
    # limitation, pinned here: the result equals that of the clamped labels; use checkify)
    _close(jitted(X, Y.at[0].set(C + 3)), jitted(X, Y.at[0].set(C - 1)))


def test_checkify_recipe_catches_nan_under_jit():
    """``checkify.checkify(jax.jit(f), errors=checkify.float_checks)`` around a curvjax call
    reports the first NaN produced inside the computation, with the operation that produced it."""
    fn = jax.jit(lambda x, y: curvjax.ggn_diag(mlp, PARAMS, (x, y)))
    checked = checkify.checkify(fn, errors=checkify.float_checks)
    err, out = checked(X, Y)
    err.throw()  # finite inputs: no error
    _close(out, reference.ggn_diag(mlp, PARAMS, (X, Y)))
    err, _ = checked(_NAN_X, Y)
    with pytest.raises(checkify.JaxRuntimeError, match="nan generated by primitive"):
        err.throw()

    # an out-of-range label under jit: checkify.user_checks with an explicit check
    def checked_labels(x, y):
        checkify.check(jnp.all((y >= 0) & (y < C)), "labels out of range [0, C)")
        return curvjax.ggn_diag(mlp, PARAMS, (x, y))

    err, _ = jax.jit(checkify.checkify(checked_labels))(X, Y.at[0].set(C))
    with pytest.raises(checkify.JaxRuntimeError, match="labels out of range"):
        err.throw()
