"""A GPT-style language model: curvjax's quantities against curvlinops on a torch twin.

The model is curvjax's small decoder-only transformer (token and position embeddings, pre-LN
blocks with causal multi-head attention and a GELU MLP, LayerNorm, a tied output embedding) at
CPU scale: 4 layers, width 128, 4 heads, ``T = 128``, ``V = 256``, ``N = 16`` sequences of
character-level standard-library source, token-mean cross-entropy. In one run it times, as
ratios to the jitted ``jax.grad`` of the same loss (and to ``curvjax.grad``), ``batch_l2``,
``per_example_grads``, ``ggn_diag_mc``, ``kfac`` with ``approximation="expand"`` and
``"reduce"``, ``ggn_vp``, ``hvp`` and one ``extract`` of several quantities, with XLA flops and
temporary memory, compile and first-call times.

Side by side, **curvlinops** on a torch twin with the same weights and data: ``KFACLinearOperator``
(Monte-Carlo Fisher, ``KFACType.EXPAND`` and ``REDUCE``; computing the factors), and one
mat-vec of ``GGNLinearOperator`` and ``HessianLinearOperator``, each as a ratio to a torch forward
and backward pass of the same loss.

Checks (exit status 1 if one fails): the twin's loss and gradient against JAX's;
``batch_l2`` and ``per_example_grads`` against ``vmap(grad)``; ``ggn_vp`` and ``hvp`` against
``jax.jvp``/``jax.vjp`` references; and the two libraries' KFAC factors (expand and reduce) on
this model. For that check both sample the same label per position, the most probable one (a
deterministic stand-in for the Monte-Carlo draw: curvjax through a ``Loss`` whose sampler
returns it, curvlinops through ``draw_label``), so the factors must agree to float32 precision;
each factor pair is compared after moving a scalar between the two factors (only their
Kronecker product is defined), and that scalar is recorded.

Usage::

    python benchmarks/transformer.py              # full size, benchmarks/results/transformer-*.json
    python benchmarks/transformer.py --smoke      # tiny model, every code path (CI)
    python benchmarks/transformer.py --repeats 3 --no-torch
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
# The checkout this script lies in comes first (the language model and sequence outputs are
# recent); an installed curvjax is used when the script is copied elsewhere.
sys.path.insert(1, str(HERE.parent))
import harness  # noqa: E402  (sits beside this script)
import report  # noqa: E402

import curvjax  # noqa: E402
from curvjax._src import backprop, leafwise, lm  # noqa: E402

#: JAX rows, in table order.
JAX_ROWS = (
    "batch_l2",
    "per_example_grads",
    "ggn_diag_mc",
    "kfac (expand)",
    "kfac (reduce)",
    "ggn_vp",
    "hvp",
    "extract",
)
#: The quantities of the ``extract`` row.
EXTRACT = ("batch_l2", "sum_grad_squared", "ggn_diag_mc", "kfac")
#: curvlinops' rows, named after the curvjax row they stand beside.
PEER_ROWS = {
    "kfac (expand)": "KFACLinearOperator(EXPAND).compute_kronecker_factors",
    "kfac (reduce)": "KFACLinearOperator(REDUCE).compute_kronecker_factors",
    "ggn_vp": "GGNLinearOperator @ v",
    "hvp": "HessianLinearOperator @ v",
}
#: Targets of the ratio to the gradient (the benchmark's, not tests).
TARGETS = {
    "batch_l2": 1.3,
    "kfac (expand)": 1.4,
    "kfac (reduce)": 1.4,
    "ggn_vp": 2.0,
    "hvp": 2.5,
}
#: Largest relative error of the KFAC factors between the libraries: float32 sums over ``N T``
#: positions in different orders, after float32 forward passes that differ in rounding.
FACTOR_TOLERANCE = 1e-3

FULL = {"num_layers": 4, "width": 128, "num_heads": 4, "seq_len": 128, "vocab": 256, "n": 16}
SMOKE = {"num_layers": 1, "width": 16, "num_heads": 2, "seq_len": 8, "vocab": 32, "n": 4}
KW = {"loss": "cross_entropy", "reduction": "token_mean"}


# --------------------------------------------------------------------------------------------
# The problem
# --------------------------------------------------------------------------------------------


def problem(sizes: dict):
    """``(config, apply_fn, params, (tokens, targets))``, float32."""
    config = lm.Config(
        vocab_size=sizes["vocab"],
        width=sizes["width"],
        num_heads=sizes["num_heads"],
        num_layers=sizes["num_layers"],
        seq_len=sizes["seq_len"],
    )
    tokens, targets = lm.char_data(sizes["n"], sizes["seq_len"])
    tokens, targets = tokens % config.vocab_size, targets % config.vocab_size
    params = lm.init(jax.random.key(0), config)
    return config, lm.make_apply_fn(config), params, (jnp.asarray(tokens), jnp.asarray(targets))


def argmax_cross_entropy() -> curvjax.losses.Loss:
    """Cross-entropy whose "sampled" label is the most probable one (deterministic check)."""
    base = curvjax.losses.cross_entropy

    def sample(key, f, mc_samples):
        del key
        grad = jax.nn.softmax(f) - jax.nn.one_hot(jnp.argmax(f), f.shape[0], dtype=f.dtype)
        return jnp.repeat(grad[:, None], mc_samples, axis=1)

    return curvjax.losses.Loss(
        name="cross_entropy_argmax",
        value=base.value,
        hessian_factor=base.hessian_factor,
        sample_output_grads=sample,
        check_targets=base.check_targets,
    )


def norm_methods(apply_fn, params, batch) -> dict[str, str]:
    """Leaf path -> how ``batch_l2`` computes its norms (``gram``, ``direct``, ``outer`` or
    ``per_example``), found while tracing (nothing is computed)."""
    found = {}

    def probe(p, b):
        traced = backprop.run(apply_fn, p, b, **KW)
        found.update(leafwise.sq_norm_methods(traced))
        found["index"] = traced.model.float_index
        return traced.loss

    jax.eval_shape(probe, params, batch)
    paths = [jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_leaves_with_path(params)]
    return {paths[i]: found[k] for k, i in enumerate(found["index"])}


def jax_functions(apply_fn):
    """Name -> ``f(params, batch, vector)``: the gradients and the rows."""
    key = jax.random.key(1)

    def plain_grad(p, b, v):
        return jax.grad(lambda q: lm.token_mean_loss(apply_fn, q, b))(p)

    return {
        "grad": plain_grad,
        "curvjax.grad": lambda p, b, v: curvjax.grad(apply_fn, p, b, **KW),
        "batch_l2": lambda p, b, v: curvjax.batch_l2(apply_fn, p, b, **KW),
        "per_example_grads": lambda p, b, v: curvjax.per_example_grads(apply_fn, p, b, **KW),
        "ggn_diag_mc": lambda p, b, v: curvjax.ggn_diag_mc(apply_fn, p, b, key=key, **KW),
        "kfac (expand)": lambda p, b, v: curvjax.kfac(
            apply_fn, p, b, key=key, approximation="expand", **KW
        ),
        "kfac (reduce)": lambda p, b, v: curvjax.kfac(
            apply_fn, p, b, key=key, approximation="reduce", **KW
        ),
        "ggn_vp": lambda p, b, v: curvjax.ggn_vp(apply_fn, p, b, v, **KW),
        "hvp": lambda p, b, v: curvjax.hvp(apply_fn, p, b, v, **KW),
        "extract": lambda p, b, v: curvjax.extract(apply_fn, p, b, EXTRACT, key=key, **KW),
    }


# --------------------------------------------------------------------------------------------
# References and checks
# --------------------------------------------------------------------------------------------


def references(apply_fn, params, batch, vector):
    """``vmap(grad)`` per-example gradients, ``G v`` and ``H v`` of the token-mean loss."""
    tokens, targets = batch
    count = tokens.size

    def example_loss(p, x, y):  # κ ℓ_n with κ = 1 / (N T)
        logits = apply_fn(p, x[None])[0]
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).sum() / count

    grads = jax.vmap(jax.grad(example_loss), (None, 0, 0))(params, tokens, targets)

    def loss(p):
        return lm.token_mean_loss(apply_fn, p, batch)

    hvp = jax.jvp(jax.grad(loss), (params,), (vector,))[1]
    logits, jvp = jax.jvp(lambda p: apply_fn(p, tokens), (params,), (vector,))

    def output_loss(f):
        return optax.softmax_cross_entropy_with_integer_labels(f, targets).mean()

    hjv = jax.jvp(jax.grad(output_loss), (logits,), (jvp,))[1]
    ggn = jax.vjp(lambda p: apply_fn(p, tokens), params)[1](hjv)[0]
    return grads, ggn, hvp


def check_jax(outputs: dict, refs, checks: dict) -> None:
    grads, ggn, hvp = refs
    norms = jax.tree.map(lambda g: jnp.sum(g.reshape(g.shape[0], -1) ** 2, axis=1), grads)
    pairs = {
        "batch_l2": (outputs["batch_l2"], norms),
        "per_example_grads": (outputs["per_example_grads"], grads),
        "ggn_vp": (outputs["ggn_vp"], ggn),
        "hvp": (outputs["hvp"], hvp),
        "curvjax.grad": (outputs["curvjax.grad"], outputs["grad"]),
    }
    for name, (value, reference) in pairs.items():
        checks[name] = harness.relative_error(value, reference)


# --------------------------------------------------------------------------------------------
# The torch twin and curvlinops
# --------------------------------------------------------------------------------------------


def torch_twin(config: lm.Config, params):
    """The same model in torch, with the flax weights; returns logits ``[N, V, T]`` (class axis
    second, as ``torch.nn.CrossEntropyLoss`` and curvlinops expect)."""
    import torch
    from torch import nn

    width, heads = config.width, config.num_heads

    def linear(p):
        layer = nn.Linear(*np.asarray(p["kernel"]).shape)
        with torch.no_grad():
            layer.weight.copy_(torch.from_numpy(np.asarray(p["kernel"]).T.copy()))
            layer.bias.copy_(torch.from_numpy(np.asarray(p["bias"]).copy()))
        return layer

    def norm(p):
        layer = nn.LayerNorm(width, eps=1e-6)  # flax's default epsilon
        with torch.no_grad():
            layer.weight.copy_(torch.from_numpy(np.asarray(p["scale"]).copy()))
            layer.bias.copy_(torch.from_numpy(np.asarray(p["bias"]).copy()))
        return layer

    class Block(nn.Module):
        def __init__(self, p):
            super().__init__()
            self.norm_attention, self.norm_mlp = norm(p["norm_attention"]), norm(p["norm_mlp"])
            self.qkv, self.attention_out = linear(p["qkv"]), linear(p["attention_out"])
            self.mlp_in, self.mlp_out = linear(p["mlp_in"]), linear(p["mlp_out"])

        def forward(self, x):
            n, length, _ = x.shape
            qkv = self.qkv(self.norm_attention(x)).reshape(n, length, 3, heads, width // heads)
            q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))  # [N, H, T, D]
            scores = q @ k.transpose(-1, -2) / np.sqrt(width // heads)
            causal = torch.ones(length, length, dtype=torch.bool, device=x.device).tril()
            scores = scores.masked_fill(~causal, torch.finfo(scores.dtype).min)
            attended = (scores.softmax(-1) @ v).transpose(1, 2).reshape(n, length, width)
            x = x + self.attention_out(attended)
            hidden = nn.functional.gelu(self.mlp_in(self.norm_mlp(x)), approximate="tanh")
            return x + self.mlp_out(hidden)

    class GPT(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(config.vocab_size, width)
            with torch.no_grad():
                self.embed.weight.copy_(torch.from_numpy(np.array(params["embed"]["embedding"])))
            self.positions = nn.Parameter(torch.from_numpy(np.asarray(params["positions"]).copy()))
            self.blocks = nn.ModuleList(
                [Block(params[f"block_{i}"]) for i in range(config.num_layers)]
            )
            self.norm_final = norm(params["norm_final"])

        def forward(self, tokens):
            x = self.embed(tokens) + self.positions[None, : tokens.shape[1]]
            for block in self.blocks:
                x = block(x)
            logits = self.norm_final(x) @ self.embed.weight.T  # tied output embedding
            return logits.transpose(1, 2)

    return GPT()


def kernel_names(config: lm.Config) -> list[tuple[str, tuple[str, ...]]]:
    """``(torch module name, flax path)`` of every dense kernel."""
    names = []
    for i in range(config.num_layers):
        for layer in ("qkv", "attention_out", "mlp_in", "mlp_out"):
            names.append((f"blocks.{i}.{layer}", (f"block_{i}", layer, "kernel")))
    return names


def peer_calls(twin, batch, threads: int):
    """curvlinops' calls and the torch gradient, over the same data."""
    import torch
    from curvlinops import GGNLinearOperator, HessianLinearOperator, KFACLinearOperator
    from curvlinops.kfac import KFACType

    torch.set_num_threads(threads)
    device = next(twin.parameters()).device
    x = torch.from_numpy(np.asarray(batch[0], np.int64)).to(device)
    y = torch.from_numpy(np.asarray(batch[1], np.int64)).to(device)
    data = [(x, y)]
    loss_fn = torch.nn.CrossEntropyLoss()
    params = [p for p in twin.parameters() if p.requires_grad]
    linear = [p for m in twin.modules() if isinstance(m, torch.nn.Linear) for p in m.parameters()]
    terms = int(np.prod(y.shape[1:]))

    def kfac(approx, cls=KFACLinearOperator):
        return cls(
            twin,
            loss_fn,
            linear,
            data,
            check_deterministic=False,
            kfac_approx=approx,
            num_per_example_loss_terms=terms,
        )

    operators = {"expand": kfac(KFACType.EXPAND), "reduce": kfac(KFACType.REDUCE)}
    ggn = GGNLinearOperator(twin, loss_fn, params, data, check_deterministic=False)
    hessian = HessianLinearOperator(twin, loss_fn, params, data, check_deterministic=False)
    vector = [torch.randn_like(p) for p in params]

    def backward():
        twin.zero_grad(set_to_none=True)
        loss_fn(twin(x), y).backward()

    def synced(call):  # a CUDA call returns before the GPU is done
        return lambda: (call(), harness.torch_sync())[0]

    calls = {
        "grad": synced(backward),
        "kfac (expand)": synced(operators["expand"].compute_kronecker_factors),
        "kfac (reduce)": synced(operators["reduce"].compute_kronecker_factors),
        "ggn_vp": synced(lambda: ggn @ vector),
        "hvp": synced(lambda: hessian @ vector),
    }
    return calls, (x, y, loss_fn, linear, terms)


def check_twin(twin, batch, jax_loss, jax_grad, checks: dict) -> None:
    """The twin's loss and gradient (embedding, first kernel) against JAX's."""
    import torch

    device = next(twin.parameters()).device
    x = torch.from_numpy(np.asarray(batch[0], np.int64)).to(device)
    y = torch.from_numpy(np.asarray(batch[1], np.int64)).to(device)
    twin.zero_grad(set_to_none=True)
    loss = torch.nn.CrossEntropyLoss()(twin(x), y)
    loss.backward()
    value = float(loss.detach())
    checks["torch loss"] = abs(value - float(jax_loss)) / abs(float(jax_loss))
    pairs = [
        (twin.embed.weight.grad.cpu().numpy(), jax_grad["embed"]["embedding"]),
        (twin.blocks[0].qkv.weight.grad.cpu().numpy().T, jax_grad["block_0"]["qkv"]["kernel"]),
    ]
    checks["torch grad"] = max(harness.relative_error(a, b) for a, b in pairs)


def compare_factors(config, apply_fn, params, batch, twin, peer, checks: dict) -> dict:
    """KFAC factors of both libraries with the most probable label at every position."""
    from curvlinops import KFACLinearOperator
    from curvlinops.kfac import KFACType

    x, y, loss_fn, linear, terms = peer

    class ArgmaxKFAC(KFACLinearOperator):
        def draw_label(self, output):
            return output.argmax(dim=1)

    loss = argmax_cross_entropy()
    found = {}
    for approx, kind in (("expand", KFACType.EXPAND), ("reduce", KFACType.REDUCE)):
        blocks = curvjax.kfac(
            apply_fn,
            params,
            batch,
            key=jax.random.key(0),
            loss=loss,
            reduction="token_mean",
            approximation=approx,
        )
        op = ArgmaxKFAC(
            twin,
            loss_fn,
            linear,
            [(x, y)],
            check_deterministic=False,
            kfac_approx=kind,
            num_per_example_loss_terms=terms,
        )
        op.compute_kronecker_factors()
        errors, scales = [], []
        for module, path in kernel_names(config):
            block = blocks
            for part in path:
                block = block[part]
            a, b = np.asarray(block.a[0], np.float64), np.asarray(block.b[0], np.float64)
            a_peer = op._input_covariances[module].double().cpu().numpy()
            b_peer = op._gradient_covariances[module].double().cpu().numpy()
            scale = np.trace(a_peer) / np.trace(a)  # only A ⊗ B is defined
            scales.append(float(scale))
            errors.append(harness.relative_error(a * scale, a_peer))
            errors.append(harness.relative_error(b / scale, b_peer))
        checks[f"kfac factors ({approx})"] = max(errors)
        found[approx] = {"max_relative_error": max(errors), "scales": scales}
    return found


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------


def run(args) -> dict:
    sizes = SMOKE if args.smoke else FULL
    env = harness.environment(("curvlinops-for-pytorch",))
    config, apply_fn, params, batch = problem(sizes)
    vector = jax.tree.map(
        lambda p, k: jax.random.normal(k, p.shape, p.dtype),
        params,
        jax.tree.unflatten(
            jax.tree.structure(params),
            list(jax.random.split(jax.random.key(2), len(jax.tree.leaves(params)))),
        ),
    )
    functions = jax_functions(apply_fn)
    rows = [r for r in JAX_ROWS if r in args.rows]
    names = ["grad", "curvjax.grad", *rows]
    compiled, outputs = {}, {}
    for name in names:
        compiled[name] = harness.compile_and_first_call(functions[name], params, batch, vector)
        outputs[name] = compiled[name].output
        print(f"compiled {name}: {compiled[name].compile_seconds:.1f} s", flush=True)

    checks: dict[str, float] = {}
    if {"batch_l2", "per_example_grads", "ggn_vp", "hvp"} <= set(rows):
        check_jax(outputs, references(apply_fn, params, batch, vector), checks)

    calls = {
        name: (lambda c=compiled[name]: jax.block_until_ready(c.fn(params, batch, vector)))
        for name in names
    }
    timing = harness.time_round_robin(calls, args.repeats, args.warmup)

    peer = None
    peer_timing = None
    factors = None
    if not args.no_torch and _peers_importable():
        twin = torch_twin(config, params).to(harness.torch_device())
        loss_value = lm.token_mean_loss(apply_fn, params, batch)
        check_twin(twin, batch, loss_value, outputs["grad"], checks)
        torch_calls, peer = peer_calls(twin, batch, args.threads or harness.usable_cores())
        torch_calls = {k: v for k, v in torch_calls.items() if k == "grad" or k in rows}
        peer_timing = harness.time_round_robin(torch_calls, args.repeats, args.warmup)
        if "kfac (expand)" in rows:
            factors = compare_factors(config, apply_fn, params, batch, twin, peer, checks)

    tolerances = {
        name: FACTOR_TOLERANCE if name.startswith("kfac factors") else harness.RELATIVE_TOLERANCE
        for name in checks
    }
    failed = [name for name, error in checks.items() if not error <= tolerances[name]]
    grad_seconds = timing.medians["grad"]
    jax_rows = {}
    for name in names:
        c = compiled[name]
        jax_rows[name] = {
            "seconds": timing.medians[name],
            "ratio": timing.medians[name] / grad_seconds,
            "fastest_ratio": min(timing.samples[name]) / min(timing.samples["grad"]),
            "ratio_to_curvjax_grad": timing.medians[name] / timing.medians["curvjax.grad"],
            "compile_seconds": c.compile_seconds,
            "first_call_seconds": c.first_call_seconds,
            **c.costs,
        }
    peer_rows = {}
    if peer_timing is not None:
        backward = peer_timing.medians["grad"]
        for name, seconds in peer_timing.medians.items():
            peer_rows[name] = {
                "call": PEER_ROWS.get(name, "torch forward + backward"),
                "seconds": seconds,
                "ratio": seconds / backward,
                "fastest_ratio": min(peer_timing.samples[name]) / min(peer_timing.samples["grad"]),
                "first_call_seconds": peer_timing.first[name],
            }
    document = {
        "experiment": "transformer",
        "title": "GPT-style LM: curvjax against curvlinops",
        "command": " ".join(sys.argv),
        "environment": harness.finish_environment(env),
        "settings": {
            **sizes,
            "num_params": lm.num_params(params),
            "loss": "cross_entropy",
            "reduction": "token_mean",
            "repeats": args.repeats,
            "warmup": args.warmup,
            "smoke": args.smoke,
            "extract": list(EXTRACT),
            "batch_l2_methods": norm_methods(apply_fn, params, batch),
            "targets": TARGETS,
        },
        "jax": jax_rows,
        "curvlinops": peer_rows,
        "kfac_factors": factors,
        "checks": checks,
        "tolerances": tolerances,
        "failed_checks": failed,
        "samples": {"jax": timing.samples, "curvlinops": peer_timing and peer_timing.samples},
    }
    return document


def _peers_importable() -> bool:
    try:
        import curvlinops  # noqa: F401
        import torch  # noqa: F401
    except ImportError:
        print("torch or curvlinops not importable: the curvlinops columns are left out")
        return False
    return True


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny model, few repeats (CI)")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls (default 5)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls (default 1)")
    parser.add_argument("--no-torch", action="store_true", help="skip the curvlinops comparison")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: cores)")
    parser.add_argument("--rows", default=",".join(JAX_ROWS), help="comma-separated JAX rows")
    parser.add_argument("--json", type=pathlib.Path, default=None, help="write the JSON here")
    args = parser.parse_args(argv)
    args.rows = [r.strip() for r in args.rows.split(",")]
    unknown = [r for r in args.rows if r not in JAX_ROWS]
    if unknown:
        parser.error(f"unknown rows {unknown}; choose from {list(JAX_ROWS)}")
    if args.repeats is None:
        args.repeats = 2 if args.smoke else 5
    harness.fast_compile_for_smoke(args.smoke)
    begin = time.perf_counter()
    document = run(args)
    return harness.finish(document, report.transformer_table(document), args, begin)


if __name__ == "__main__":
    sys.exit(main())
