"""Write ``benchmarks/RESULTS.md`` from the JSON files under ``benchmarks/results/``.

Usage::

    python benchmarks/report.py                 # rewrites benchmarks/RESULTS.md
    python benchmarks/report.py --check         # exit 1 if RESULTS.md is not up to date
    python benchmarks/report.py --results DIR --output FILE

For each experiment (``overhead``, ``curvature``, ``spectrum``, ``optimizers``, ``transformer``,
``private``, ``influence``, ``fuzz``) it writes one
current table per machine (``results/<experiment>-<machine>.json``: the newest run on that
machine, CPU or GPU) with the machine described. Older runs are only in the changelog at the end:
the files ``results/history/*.json`` (where ``harness.write_results`` moves a result it replaces),
newest first, then ``results/CHANGELOG.md`` verbatim (tables written by hand before the results
were kept as JSON).

The experiment scripts use :func:`overhead_table`, :func:`curvature_table`,
:func:`transformer_table` and :func:`private_table` to print their tables. This module imports no other benchmark script and needs neither jax nor torch.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent

#: Experiments in the order of RESULTS.md: (name, heading).
EXPERIMENTS = (
    ("overhead", "First-order overhead (`overhead.py`), BackPACK Fig. 6 setting"),
    ("curvature", "Second-order overhead (`curvature.py`), BackPACK Fig. 6 (right) and Fig. 9"),
    ("spectrum", "Hessian spectra against PyHessian (`spectrum.py`)"),
    ("optimizers", "Second-order optimizers against kfac-jax and Adam (`optimizers.py`)"),
    ("transformer", "A GPT-style language model against curvlinops (`transformer.py`)"),
    ("private", "Per-example clipping for DP-SGD against jax-privacy and Opacus (`private.py`)"),
    ("influence", "Influence functions with EK-FAC against kronfluence (`influence.py`)"),
    ("fuzz", "Random models against float64 references (`fuzz.py`)"),
)

MIB = 2.0**20


def _ratio(numerator, denominator) -> float | None:
    if numerator is None or denominator in (None, 0):
        return None
    return numerator / denominator


def _fmt(value, digits: int = 2, suffix: str = "") -> str:
    return "—" if value is None else f"{value:.{digits}f}{suffix}"


def _sci(value) -> str:
    return "—" if value is None else f"{value:.1e}"


def _yes_no(value) -> str:
    return "—" if value is None else ("yes" if value else "**no**")


# --------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------


def overhead_table(summary: dict[str, Any]) -> str:
    """One markdown table of the first-order ratios of one model."""
    backpack = summary.get("backpack")
    lines = [
        f"#### {summary['model']}: {summary['num_params']:,} parameters, "
        f"N = {summary['batch_size']}",
        "",
        f"jax.grad: {summary['jax_grad_seconds'] * 1e3:.2f} ms, "
        f"{_fmt(_ratio(summary['jax_grad_flops'], 1e9), 3)} GFLOP, "
        f"temp {_fmt(_ratio(summary['jax_grad_temp_bytes'], MIB), 1)} MiB"
        + (
            f"; torch backward: {backpack['seconds']['backward'] * 1e3:.2f} ms "
            f"({backpack.get('device', 'cpu')}, {backpack['threads']} threads)"
            if backpack
            else ""
        ),
        "",
    ]
    header = [
        "quantity",
        "curvjax ms",
        "× curvjax.grad",
        "× jax.grad",
        "vmap(grad) × jax.grad",
        "flops × grad (curvjax / vmap)",
        "temp MiB (curvjax / vmap)",
        "compile s",
        "first call s",
    ]
    if backpack:
        header += ["BackPACK × backward", "BackPACK first call s", "first call ≤ BackPACK"]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|")
    labels = {"grad": "grad", "all": "extract (all four)"}
    for name, row in summary["rows"].items():
        seconds = row["curvjax_seconds"]
        cells = [
            labels.get(name, name),
            _fmt(None if seconds is None else seconds * 1e3, 2),
            _fmt(row["curvjax_over_curvjax_grad"]),
            _fmt(row["curvjax_over_jax_grad"]),
            _fmt(row["vmap_over_jax_grad"]),
            f"{_fmt(row['curvjax_flops_over_jax_grad'])} / {_fmt(row['vmap_flops_over_jax_grad'])}",
            f"{_fmt(_ratio(row['curvjax_temp_bytes'], MIB), 1)} / "
            f"{_fmt(_ratio(row['vmap_temp_bytes'], MIB), 1)}",
            _fmt(row.get("curvjax_compile_seconds")),
            _fmt(row.get("curvjax_first_call_seconds")),
        ]
        if backpack:
            cells += [
                _fmt(row.get("backpack_over_backward")),
                _fmt(row.get("backpack_first_call_seconds")),
                _yes_no(row.get("first_call_at_most_backpack")),
            ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


#: Speed targets, as ratios to the gradient (absolute) or to BackPACK's ratio (relative).
TARGETS = {
    "ggn_diag_mc": ("abs", 1.5),
    "kfac": ("abs", 1.5),
    "hvp": ("abs", 3.0),
    "ggn_diag": ("backpack", 0.5),
    "kflr": ("backpack", 0.5),
}


def _target_text(q, ratio, bp_ratio) -> str:
    kind, value = TARGETS.get(q, (None, None))
    if kind == "abs":
        return f"≤ {value:g}× grad: {'met' if ratio <= value else 'MISSED'}"
    if kind == "backpack" and bp_ratio is not None:
        bound = value * bp_ratio
        return f"≤ {bound:.2f}× (half BackPACK's): {'met' if ratio <= bound else 'MISSED'}"
    return ""


def curvature_table(results: list[dict[str, Any]]) -> str:
    """One markdown table of the second-order ratios of the given problems."""
    lines = [
        "| model | quantity | curvjax ms | × jax.grad | × curvjax.grad | GFLOP | temp MiB | "
        "compile s | first call s | BackPACK ms | BackPACK × its backward | "
        "BackPACK first call s | first call ≤ BackPACK | target |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for r in results:
        grad_seconds = r["jax"]["grad"]["seconds"]
        own_seconds = r["jax"]["curvjax.grad"]["seconds"]
        for q, v in r["jax"].items():
            bp = r.get("backpack", {}).get(q)
            flops, mem = v.get("flops"), v.get("temp_bytes")
            ratio = v["seconds"] / grad_seconds
            first, bp_first = (
                v.get("first_call_seconds"),
                None if bp is None else bp.get("first_call_seconds"),
            )
            cells = [
                r["model"],
                q,
                f"{1e3 * v['seconds']:.1f}",
                f"{ratio:.2f}",
                f"{v['seconds'] / own_seconds:.2f}",
                "" if flops is None else f"{flops / 1e9:.2f}",
                "" if mem is None else f"{mem / MIB:.0f}",
                _fmt(v.get("compile_seconds")),
                _fmt(first),
                "" if bp is None else f"{1e3 * bp['seconds']:.1f}",
                "" if bp is None else f"{bp['ratio']:.2f}",
                _fmt(bp_first),
                "" if bp_first is None or first is None else _yes_no(first <= bp_first),
                _target_text(q, ratio, None if bp is None else bp["ratio"]),
            ]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def transformer_table(document: dict[str, Any]) -> str:
    """The table of the language-model experiment: curvjax and curvlinops, ratios to the gradient."""
    s = document["settings"]
    jax_rows, peer = document["jax"], document.get("curvlinops") or {}
    grad = jax_rows["grad"]
    lines = [
        f"#### GPT-style LM: {s['num_layers']} layers, width {s['width']}, {s['num_heads']} heads, "
        f"T = {s['seq_len']}, V = {s['vocab']}, N = {s['n']}; {s['num_params']:,} parameters, "
        f"{s['reduction']} cross-entropy",
        "",
        f"jax.grad: {grad['seconds'] * 1e3:.1f} ms, {_fmt(_ratio(grad['flops'], 1e9), 3)} GFLOP, "
        f"temp {_fmt(_ratio(grad['temp_bytes'], MIB), 1)} MiB"
        + (f"; torch forward + backward: {peer['grad']['seconds'] * 1e3:.1f} ms" if peer else "")
        + f"; `extract` computes {', '.join(s['extract'])}.",
        "",
        "| quantity | curvjax ms | × jax.grad | × curvjax.grad | flops × grad | temp MiB "
        "| compile s | curvlinops × backward | target | met |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, row in jax_rows.items():
        if name == "grad":
            continue
        peer_ratio = peer.get(name, {}).get("ratio")
        target = s.get("targets", {}).get(name)
        met = None
        if name != "curvjax.grad" and (target is not None or peer_ratio is not None):
            met = (target is None or row["ratio"] <= target) and (
                peer_ratio is None or row["ratio"] <= peer_ratio
            )
        lines.append(
            f"| {name} | {row['seconds'] * 1e3:.1f} | {row['ratio']:.2f} "
            f"| {_fmt(row.get('ratio_to_curvjax_grad'))} "
            f"| {_fmt(_ratio(row.get('flops'), grad.get('flops')))} "
            f"| {_fmt(_ratio(row.get('temp_bytes'), MIB), 1)} | {_fmt(row['compile_seconds'], 1)} "
            f"| {_fmt(peer_ratio)} | {_fmt(target)} | {_yes_no(met)} |"
        )
    methods = s.get("batch_l2_methods")
    if methods:
        counts: dict[str, int] = {}
        for method in methods.values():
            counts[method] = counts.get(method, 0) + 1
        lines += [
            "",
            "`batch_l2` per leaf: "
            + ", ".join(f"{method} {count}" for method, count in sorted(counts.items()))
            + " (gram / direct: the cheaper ghost-norm form; outer: one position; per_example: "
            "per-example gradients a chunk of examples at a time).",
        ]
    factors = document.get("kfac_factors")
    if factors:
        parts = [
            f"{approx}: max relative error {v['max_relative_error']:.1e} "
            f"(scalar moved between the factors: {min(v['scales']):.4g} to {max(v['scales']):.4g})"
            for approx, v in factors.items()
        ]
        lines += [
            "",
            "KFAC factors, curvjax against curvlinops (most probable label): "
            + "; ".join(parts)
            + ".",
        ]
    if document.get("failed_checks"):
        lines += ["", f"**Failed checks**: {', '.join(document['failed_checks'])}."]
    return "\n".join(lines)


def private_table(document: dict[str, Any]) -> str:
    """The tables of the clipping experiment: one per model, every row over its own gradient."""
    targets = document["settings"].get("targets", {"time": 1.25, "temp": 1.2})
    checks = document.get("checks", {})
    blocks = []
    for r in document["results"]:
        grad = r["jax"]["grad"]
        torch_rows = r.get("torch") or {}
        shape = f"N = {r['batch_size']}" + (f", T = {r['seq_len']}" if r.get("seq_len") else "")
        lines = [
            f"#### {r['model']}: {r['num_params']:,} parameters, {shape}",
            "",
            f"jax.grad (summed loss): {grad['seconds'] * 1e3:.1f} ms, "
            f"{_fmt(_ratio(grad.get('flops'), 1e9), 3)} GFLOP, "
            f"temp {_fmt(_ratio(grad.get('temp_bytes'), MIB), 1)} MiB"
            + (
                f"; torch forward + backward: {torch_rows['backward']['seconds'] * 1e3:.1f} ms "
                f"({r.get('torch_device', 'cpu')})"
                if "backward" in torch_rows
                else ""
            )
            + f". Clipping norm c = {r['clip_norm']:.4g} (the median per-example norm; "
            f"{r['clipped_fraction']:.0%} of the examples clipped).",
            "",
            "| row | ms | × its gradient | fastest × | temp MiB | temp × grad | flops × grad "
            "| compile s | first call s | rel. error | target |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
        ]
        others = [
            v["ratio"] for k, v in r["jax"].items() if k not in ("grad", "curvjax.clipped_grad")
        ]
        others += [v["ratio"] for k, v in torch_rows.items() if k != "backward"]
        for name, row in r["jax"].items():
            if name == "grad":
                continue
            target = ""
            if name == "curvjax.clipped_grad":
                fastest = all(row["ratio"] < other for other in others)
                met = (
                    row["ratio"] <= targets["time"]
                    and row.get("temp_ratio") is not None
                    and row["temp_ratio"] <= targets["temp"]
                    and fastest
                )
                target = f"≤ {targets['time']:g}× time, ≤ {targets['temp']:g}× temp, fastest: " + (
                    "met" if met else "**MISSED**"
                )
            error = checks.get(f"{r['model']}: {name}")
            lines.append(
                f"| {name} | {row['seconds'] * 1e3:.1f} | {row['ratio']:.2f} "
                f"| {row['fastest_ratio']:.2f} | {_fmt(_ratio(row.get('temp_bytes'), MIB), 1)} "
                f"| {_fmt(row.get('temp_ratio'))} | {_fmt(row.get('flops_ratio'))} "
                f"| {_fmt(row['compile_seconds'], 1)} | {_fmt(row['first_call_seconds'], 1)} "
                f"| {'reference' if name.startswith('vmap') else _sci(error)} "
                f"| {target} |"
            )
        for name, row in torch_rows.items():
            if name == "backward":
                continue
            error = checks.get(f"{r['model']}: {name}")
            lines.append(
                f"| {name} | {row['seconds'] * 1e3:.1f} | {row['ratio']:.2f} "
                f"| {row['fastest_ratio']:.2f} | — | — | — | — | {_fmt(row['first_call_seconds'], 1)} "
                f"| {'not checked' if error is None else _sci(error)} | |"
            )
        for name, why in r.get("unavailable", {}).items():
            lines.append(f"| {name} | — | — | — | — | — | — | — | — | — | does not run: {why} |")
        blocks.append("\n".join(lines))
    notes = [
        "JAX rows over the jitted `jax.grad` of the summed loss, torch rows over the twin's own "
        "forward and backward pass, both in the same run. rel. error: the clipped sum against "
        "`vmap(grad) + clip` (Opacus: against curvjax), `max |Δ| / max |ref|` per leaf.",
    ]
    if document.get("failed_checks"):
        notes.append(f"**Failed checks**: {', '.join(document['failed_checks'])}.")
    return "\n\n".join(blocks + notes)


def _met(value: bool) -> str:
    return "met" if value else "**MISSED**"


def influence_table(document: dict[str, Any]) -> str:
    """The influence experiment: EK-FAC factors over the gradient, scoring throughput, and the
    agreement of the two libraries' scores, one table per model."""
    targets = document["settings"].get("targets", {})
    blocks = []
    for r in document["results"]:
        jax_rows, scores = r["jax"], r.get("scores") or {}
        torch_rows, peer = r.get("torch") or {}, r.get("kronfluence_scores") or {}
        ekfac, grad = jax_rows["curvjax.ekfac"], jax_rows["grad"]
        shape = f"N = {r['batch_size']}" + (f", T = {r['seq_len']}" if r.get("seq_len") else "")
        lines = [
            f"#### {r['model']}: {r['num_params']:,} parameters, {shape}, {r['reduction']} "
            f"cross-entropy; {scores.get('num_queries', r.get('queries'))} queries against "
            f"{r['train_batches']} training batches",
            "",
            f"Damping λ = {r['damping']:.3g} (0.1 × curvjax's mean corrected eigenvalue over the "
            f"kernels); kronfluence gets β λ with β = {r['beta']:g}"
            + (
                " (its own heuristic would be "
                + f"{min(r['kronfluence_heuristic_damping'].values()):.3g} to "
                + f"{max(r['kronfluence_heuristic_damping'].values()):.3g} per module)"
                if r.get("kronfluence_heuristic_damping")
                else ""
            )
            + ".",
            "",
            "| library | gradient ms | EK-FAC factors ms | × its gradient | fastest × | "
            "first call s | scored examples / s | scoring s | first call s | GFLOP | temp MiB |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
            f"| curvjax | {grad['seconds'] * 1e3:.1f} | {ekfac['seconds'] * 1e3:.1f} "
            f"| {ekfac['ratio']:.2f} | {ekfac['fastest_ratio']:.2f} "
            f"| {_fmt(ekfac['first_call_seconds'], 1)} "
            f"| {_fmt(scores.get('examples_per_second'), 1)} | {_fmt(scores.get('seconds'), 2)} "
            f"| {_fmt(scores.get('first_call_seconds'), 1)} "
            f"| {_fmt(_ratio(ekfac.get('flops'), 1e9), 2)} "
            f"| {_fmt(_ratio(ekfac.get('temp_bytes'), MIB), 1)} |",
        ]
        loose = jax_rows.get("curvjax.ekfac, LAPACK threads unpinned")
        if loose:
            lines.append(
                f"| curvjax, LAPACK threads unpinned | | {loose['seconds'] * 1e3:.1f} "
                f"| {loose['ratio']:.2f} | {loose['fastest_ratio']:.2f} | | | | | | |"
            )
        if "influence.scores" not in r.get("unavailable", {}) and scores:
            lines.append(
                f"| curvjax, one `influence.scores` call | | | | | "
                f"| {_fmt(scores.get('call_examples_per_second'), 1)} "
                f"| {_fmt(scores.get('call_seconds'), 2)} | | | |"
            )
        if torch_rows:
            fit = torch_rows["kronfluence ekfac"]
            lines.append(
                f"| kronfluence | {torch_rows['backward']['seconds'] * 1e3:.1f} "
                f"| {fit['seconds'] * 1e3:.1f} | {fit['ratio']:.2f} | {fit['fastest_ratio']:.2f} "
                f"| {_fmt(fit['first_call_seconds'], 1)} "
                f"| {_fmt(peer.get('examples_per_second'), 1)} | {_fmt(peer.get('seconds'), 2)} "
                f"| {_fmt(peer.get('first_call_seconds'), 1)} | — | — |"
            )
        notes = [
            "curvjax's GFLOP and temp are XLA's for the EK-FAC call (scores: "
            f"{_fmt(_ratio(scores.get('batch_flops'), 1e9), 2)} GFLOP and "
            f"{_fmt(_ratio(scores.get('batch_temp_bytes'), MIB), 1)} MiB temp per training "
            f"batch, {_fmt(scores.get('batch_flops_over_grad'))} × the gradient's flops). "
            f"Scoring: {scores.get('num_queries')} queries against every training example, "
            "query gradients and their preconditioning included; curvjax's first row streams the batches through its "
            "compiled batch step, the second is one whole `influence.scores` call."
        ]
        pinned = (document.get("environment", {}).get("lapack_threads") or {}).get("pinned")
        if pinned:
            notes.append(
                f"curvjax's rows ran with SciPy's OpenBLAS (JAX's CPU LAPACK: the "
                f"eigendecompositions) pinned to {pinned} thread(s), as the documentation "
                "recommends on CPU; the unpinned row is the same call with its default threads, "
                "which compete with XLA's."
            )
        agreement = r.get("agreement") or {}
        if "spearman_mean" in agreement:
            notes.append(
                "Same factors (most probable label in both): Spearman "
                f"{agreement['spearman_mean']:.4f} mean over queries "
                f"(min {agreement['spearman_min']:.4f}, all pairs "
                f"{agreement['spearman_all_pairs']:.4f}); curvjax = β × kronfluence to "
                f"{_sci(agreement.get('relative_error_after_predicted_scale'))} "
                f"(fitted scale {agreement['fitted_scale']:.5g}); β Σ s = Σ Λ per kernel to "
                f"{_sci(agreement.get('trace_relative_error'))}."
            )
        mc = r.get("agreement_mc")
        if mc:
            notes.append(
                "Each with its own Monte-Carlo labels (the timed runs): Spearman "
                f"{mc['spearman_mean']:.3f} mean (min {mc['spearman_min']:.3f})."
            )
        checks = []
        if r["kind"] == "3c3d":
            bound = targets.get("ekfac_3c3d", 3.0)
            check = f"EK-FAC ≤ {bound:g}× the gradient: {_met(ekfac['ratio'] <= bound)}"
            if loose:
                check += (
                    f" with LAPACK pinned, {_met(loose['ratio'] <= bound)} with its threads "
                    "unpinned"
                )
            checks.append(check)
        if scores and peer:
            faster = scores["examples_per_second"] >= peer["examples_per_second"]
            checks.append(f"throughput ≥ kronfluence's: {_met(faster)}")
        if checks:
            notes.append("Targets: " + "; ".join(checks) + ".")
        for name, why in r.get("unavailable", {}).items():
            notes.append(f"{name}: {why}.")
        blocks.append("\n".join(lines) + "\n\n" + " ".join(notes))
    text = "\n\n".join(blocks)
    if document.get("failed_checks"):
        text += f"\n\n**Failed checks**: {', '.join(document['failed_checks'])}."
    return text


def fuzz_table(document: dict[str, Any]) -> str:
    """The fuzzing run: models checked, time, failures, Hessian outcomes and the grammar used."""
    seconds = document.get("seconds_per_model", {})
    hessian = document.get("hessian_diag", {})
    lines = [
        "| models checked | finished | time s | median s / model | failures | exact hessian_diag "
        "| refused hessian_diag |",
        "|---:|---|---:|---:|---:|---:|---:|",
        f"| {document['models_checked']} | {_yes_no(document.get('finished'))} "
        f"| {_fmt(document.get('seconds_total'), 0)} | {_fmt(seconds.get('median'), 1)} "
        f"| {len(document.get('failures', []))} | {hessian.get('exact', 0)} "
        f"| {hessian.get('refused', 0)} |",
        "",
        "Largest relative error per quantity: "
        + ", ".join(f"{k} {_sci(v)}" for k, v in document.get("worst_relative_error", {}).items())
        + f" (tolerance {_sci(document.get('settings', {}).get('rtol'))}; kflr / kfac: asymmetry).",
        "",
        "Productions of the grammar used (count over all models): "
        + ", ".join(f"{k} {v}" for k, v in document.get("productions", {}).items())
        + ".",
    ]
    for failure in document.get("failures", []):
        lines += ["", f"- **{failure['error']}** `{failure['spec']}`"]
    return "\n".join(lines)


def fuzz_total(documents) -> str:
    """One line over several fuzzing runs (different hypothesis seeds draw different models)."""
    documents = list(documents)
    seeds = ", ".join(str(d.get("settings", {}).get("seed")) for d in documents)
    checked = sum(d["models_checked"] for d in documents)
    failures = sum(len(d.get("failures", [])) for d in documents)
    return (
        f"In all: **{checked:,} models** checked in {len(documents)} runs (hypothesis seeds "
        f"{seeds}: each draws its own models), {failures} failures."
    )


def machine_text(document: dict[str, Any]) -> str:
    """The machine, the versions, the load and the date of one run, as a paragraph."""
    env = document.get("environment", {})
    backend = env.get("jax_backend")
    accelerator = (
        f"{env.get('device_kind')} ({backend})" if backend not in (None, "cpu") else "none (CPU)"
    )
    versions = ", ".join(
        f"{name} {env[key]}"
        for name, key in (
            ("Python", "python"),
            ("jax", "jax"),
            ("jaxlib", "jaxlib"),
            ("flax", "flax"),
            ("optax", "optax"),
            ("numpy", "numpy"),
            ("curvjax", "curvjax"),
            ("torch", "torch"),
            ("BackPACK", "backpack-for-pytorch"),
            ("PyHessian", "pyhessian"),
            ("kfac-jax", "kfac-jax"),
            ("curvlinops", "curvlinops-for-pytorch"),
            ("Opacus", "opacus"),
            ("jax-privacy", "jax-privacy"),
            ("kronfluence", "kronfluence"),
        )
        if env.get(key)
    )
    settings = document.get("settings", {})
    parts = [
        f"Run {env.get('date', 'undated')}"
        + (f" with `{document['command']}`" if document.get("command") else "")
        + ".",
        f"CPU: {env.get('cpu_model')}, {env.get('usable_cores')} usable of "
        f"{env.get('cpu_count')} cores; accelerator: {accelerator}"
        + (f"; torch on {env['torch_cuda']}" if env.get("torch_cuda") else "")
        + ".",
        f"Load average (1, 5, 15 min) {env.get('load_average_at_start')} at the start, "
        f"{env.get('load_average_at_end')} at the end.",
        f"{versions}.",
    ]
    if settings:
        shown = {k: v for k, v in settings.items() if k in ("repeats", "warmup", "batch_size")}
        if shown:
            parts.append("Settings: " + ", ".join(f"{k} {v}" for k, v in shown.items()) + ".")
    if document.get("failed_checks"):
        parts.append("**Failed checks:** " + "; ".join(document["failed_checks"]) + ".")
    return " ".join(parts)


def document_tables(document: dict[str, Any]) -> str:
    """The tables of one JSON document."""
    experiment = document.get("experiment")
    if experiment == "overhead":
        return "\n\n".join(overhead_table(summary) for summary in document["results"])
    if experiment == "curvature":
        return curvature_table(document["results"])
    if experiment == "transformer":
        return transformer_table(document)
    if experiment == "private":
        return private_table(document)
    if experiment == "influence":
        return influence_table(document)
    if experiment == "fuzz":
        return fuzz_table(document)
    # spectrum.py and optimizers.py store their tables as printed (they have several shapes).
    return document.get("markdown", "(no tables in this file)")


def _load(path: Path) -> dict[str, Any] | None:
    try:
        document = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(document, dict) or "experiment" not in document:
        return None
    return document


def render(results: Path, include_smoke: bool = False) -> str:
    """The whole of RESULTS.md."""
    lines = [
        "# Benchmark results",
        "",
        "Generated by `python benchmarks/report.py` from `benchmarks/results/*.json`; do not edit "
        "by hand. How each table is made is in [README.md](README.md); each JSON file holds all "
        "samples, compile and first-call times, check errors, settings and the environment. "
        "Times on a machine with a load average well above 0 were distorted by other processes.",
        "",
    ]
    current = [(p, d) for p in sorted(results.glob("*.json")) if (d := _load(p)) is not None]
    for experiment, heading in EXPERIMENTS:
        lines += [f"## {heading}", ""]
        documents = [(p, d) for p, d in current if d["experiment"] == experiment]
        if not include_smoke:
            documents = [(p, d) for p, d in documents if not d.get("settings", {}).get("smoke")]
        if not documents:
            lines += [
                f"No JSON result yet (run `python benchmarks/{experiment}.py`); the last tables "
                "written by hand are in the changelog.",
                "",
            ]
        if experiment == "fuzz" and len(documents) > 1:
            lines += [fuzz_total(d for _, d in documents), ""]
        for path, document in documents:
            lines += [
                f"### {path.stem.removeprefix(experiment + '-')}",
                "",
                machine_text(document),
                "",
                document_tables(document),
                "",
            ]
    lines += ["## Changelog", "", "Older runs, newest first.", ""]
    history = [
        (d.get("environment", {}).get("date", ""), p, d)
        for p in (results / "history").glob("*.json")
        if (d := _load(p)) is not None
    ]
    for date, path, document in sorted(history, key=lambda item: item[0], reverse=True):
        lines += [
            f"### {date}: {document['experiment']} on {path.stem.removeprefix(document['experiment'] + '-')}",
            "",
            machine_text(document),
            "",
            document_tables(document),
            "",
        ]
    changelog = results / "CHANGELOG.md"
    if changelog.exists():
        lines.append(changelog.read_text().rstrip())
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    """Write (or with ``--check`` compare) RESULTS.md."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=HERE / "results")
    parser.add_argument("--output", type=Path, default=HERE / "RESULTS.md")
    parser.add_argument("--check", action="store_true", help="exit 1 if the output is stale")
    parser.add_argument(
        "--include-smoke", action="store_true", help="also list --smoke runs (for testing)"
    )
    args = parser.parse_args(argv)
    text = render(args.results, args.include_smoke)
    if args.check:
        if not args.output.exists() or args.output.read_text() != text:
            print(f"{args.output} is not up to date: run python benchmarks/report.py")
            return 1
        return 0
    args.output.write_text(text)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
