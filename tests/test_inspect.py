"""curvjax.inspect: what curvjax makes of a model, checked against what the quantities do."""

import flax.linen as nn
import jax
import jax.numpy as jnp

import curvjax


class _Net(nn.Module):
    @nn.compact
    def __call__(self, tokens):
        embed = nn.Embed(11, 4)
        h = embed(tokens)  # [N, T, 4]
        h = nn.Conv(5, (3,), padding="SAME")(h)
        h = nn.LayerNorm()(jnp.tanh(h))
        h = nn.Dense(4)(h.mean(axis=1))
        return embed.attend(h)  # tied with the embedding


def _problem():
    tokens = jnp.arange(24).reshape(4, 6) % 11
    model = _Net()
    return model.apply, model.init(jax.random.key(0), tokens), tokens


def test_inspect_lists_taps_rules_and_blocks():
    apply_fn, params, tokens = _problem()
    report = curvjax.inspect(apply_fn, params, tokens)
    leaves = {leaf.name.split("params']")[-1]: leaf for leaf in report.leaves}
    conv, dense = leaves["['Conv_0']['kernel']"], leaves["['Dense_0']['kernel']"]
    assert conv.rules == ("conv",) and conv.block == "kronecker"
    assert dense.rules == ("dense",) and dense.block == "kronecker"
    assert leaves["['LayerNorm_0']['scale']"].block == "dense"
    embedding = leaves["['Embed_0']['embedding']"]
    assert len(embedding.taps) == 2 and embedding.block == "diagonal"  # gather and tied `attend`
    assert {t.primitive for t in embedding.taps} == {"gather", "dot_general"}
    assert all(t.where and t.where != "unknown location" for t in embedding.taps)
    assert report.batch_mixing == () and report.unknown_primitives == ()
    # The blocks curvjax returns are the ones announced.
    kflr = curvjax.kflr(apply_fn, params, (tokens, jnp.arange(4) % 11))
    kinds = {
        curvjax.KroneckerBlock: "kronecker",
        curvjax.DenseBlock: "dense",
        curvjax.DiagonalBlock: "diagonal",
    }
    got = jax.tree.leaves(kflr, is_leaf=lambda b: type(b) in kinds)
    assert [kinds[type(b)] for b in got] == [leaf.block for leaf in report.leaves]
    text = str(report)
    assert "Conv_0" in text and "kronecker" in text and "conv" in text


def test_inspect_names_what_prevents_the_exact_hessian_diagonal():
    apply_fn, params, tokens = _problem()
    report = curvjax.inspect(apply_fn, params, tokens)
    assert report.hessian_issues == ()  # the tied embedding is treated exactly
    transformed = lambda p, x: jnp.tanh(x @ jnp.exp(p["w"])) @ p["v"]  # noqa: E731
    params = {"w": jnp.ones((3, 4)), "v": jnp.ones((4, 2))}
    report = curvjax.inspect(transformed, params, jnp.ones((5, 3)))
    assert report.hessian_issues  # a parameter transformed non-linearly before use
    assert any("non-linearly" in issue for issue in report.hessian_issues)
    assert all(leaf.hessian_diag is not None for leaf in report.leaves)
    try:
        curvjax.hessian_diag(transformed, params, (jnp.ones((5, 3)), jnp.arange(5) % 2))
    except ValueError as err:
        assert report.hessian_issues[0].split(" (")[0] in str(err)
    else:
        raise AssertionError("the exact Hessian diagonal should refuse this model")
    mlp = lambda p, x: jnp.tanh(x @ p["w"]) @ p["v"]  # noqa: E731
    params = {"w": jnp.ones((3, 4)), "v": jnp.ones((4, 2))}
    ok = curvjax.inspect(mlp, params, jnp.ones((5, 3)))
    assert ok.hessian_issues == () and all(leaf.hessian_diag is None for leaf in ok.leaves)
    assert "exact" in str(ok)


def test_inspect_reports_batch_mixing():
    class WithBatchNorm(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(2)(nn.BatchNorm(use_running_average=False)(x))

    model, x = WithBatchNorm(), jnp.ones((6, 3))
    variables = model.init(jax.random.key(0), x)
    apply_fn = lambda p, x: model.apply(p, x, mutable=["batch_stats"])[0]  # noqa: E731
    report = curvjax.inspect(apply_fn, variables, x)
    assert report.batch_mixing and "example axis" in report.batch_mixing[0]
    assert "batch mixing" in str(report)
    non_float = [leaf for leaf in report.leaves if leaf.block is None]
    assert non_float == []  # batch statistics are float leaves here: listed with their taps


def test_inspect_reports_too_many_residual_columns(monkeypatch):
    """The exact method's size guard shows in the report, as the refusal it causes."""
    from curvjax._src import diagonals

    mlp = lambda p, x: jnp.tanh(x @ p["w"]) @ p["v"]  # noqa: E731
    params = {"w": jnp.ones((3, 4)), "v": jnp.ones((4, 2))}
    monkeypatch.setattr(diagonals, "MAX_RESIDUAL_ELEMENTS", 1)
    report = curvjax.inspect(mlp, params, jnp.ones((5, 3)))
    assert len(report.hessian_issues) == 1 and "residual nodes" in report.hessian_issues[0]
    try:
        curvjax.hessian_diag(mlp, params, (jnp.ones((5, 3)), jnp.arange(5) % 2))
    except ValueError as err:
        assert "residual nodes" in str(err)
    else:
        raise AssertionError("the exact Hessian diagonal should refuse this model")


def test_inspect_announces_kronecker_blocks_of_tied_and_scanned_kernels():
    """A kernel applied in two layers, and an RNN cell's kernel inside ``lax.scan``, get one
    Kronecker block each in ``kflr``; ``inspect`` says so (and agrees with ``kflr``)."""

    def tied(p, x):
        return jnp.tanh(jnp.tanh(x @ p["w"]) @ p["w"]) @ p["v"]

    def rnn(p, x):  # x [N, T, 3]
        def step(h, xt):
            h = jnp.tanh(xt @ p["u"] + h @ p["w"])
            return h, h

        _, hs = jax.lax.scan(step, jnp.zeros((x.shape[0], 3)), jnp.swapaxes(x, 0, 1))
        return hs[-1] @ p["v"]

    cases = [
        (tied, {"w": jnp.eye(3) + 0.1, "v": jnp.ones((3, 2))}, jnp.ones((5, 3))),
        (rnn, {"u": jnp.eye(3), "w": 0.5 * jnp.eye(3), "v": jnp.ones((3, 2))}, jnp.ones((5, 4, 3))),
    ]
    for apply_fn, params, x in cases:
        report = curvjax.inspect(apply_fn, params, x)
        blocks = curvjax.kflr(apply_fn, params, (x, jnp.arange(5) % 2))
        for leaf in report.leaves:
            name = leaf.name.split("'")[1]
            assert leaf.block == "kronecker", (apply_fn.__name__, name)
            assert type(blocks[name]).__name__ == "KroneckerBlock"
