"""Every benchmark script runs at its smoke size (so none rots); timings are not checked.

Each script runs in a subprocess without torch comparisons (``--no-torch``; ``optimizers.py``
leaves kfac-jax out under ``--smoke``), writes its JSON file, and ``report.py`` renders it.
"""

import json
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).parent.parent
BENCHMARKS = ROOT / "benchmarks"


def run_script(name, *args, timeout=300):
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / name), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result


def render(results_dir):
    output = results_dir / "RESULTS.md"
    run_script("report.py", "--include-smoke", "--results", results_dir, "--output", output)
    return output.read_text()


def test_overhead_smoke_runs_first_and_second_order(tmp_path):
    out = tmp_path / "overhead-smoke.json"
    result = run_script(
        "overhead.py", "--smoke", "--no-torch", "--part", "all", "--models", "mlp", "--json", out
    )
    assert "| per_example_grads |" in result.stdout
    second = json.loads(out.with_suffix(".curvature.json").read_text())
    assert second["experiment"] == "curvature" and not second["failed_checks"]
    assert {"ggn_diag", "hessian_diag"} <= {q for r in second["results"] for q in r["jax"]}
    document = json.loads(out.read_text())
    assert document["experiment"] == "overhead" and not document["failed_checks"]
    assert document["environment"]["device_kind"] and document["environment"]["cpu_model"]
    assert document["environment"]["load_average_at_end"] is not None
    for summary in document["results"]:
        assert set(summary["rows"]) == {
            "grad",
            "per_example_grads",
            "batch_l2",
            "sum_grad_squared",
            "variance",
            "all",
        }
        for row in summary["rows"].values():
            assert 0 < row["curvjax_compile_seconds"] <= row["curvjax_first_call_seconds"]
            assert row["curvjax_relative_error"] is None or row["curvjax_relative_error"] < 1e-4
    text = render(tmp_path)
    assert "first call s" in text and "wide MLP (smoke)" in text


def test_curvature_smoke(tmp_path):
    out = tmp_path / "curvature-smoke.json"
    result = run_script("curvature.py", "--smoke", "--no-torch", "--json", out)
    assert "| ggn_diag |" in result.stdout
    document = json.loads(out.read_text())
    assert document["experiment"] == "curvature"
    rows = {q for r in document["results"] for q in r["jax"]}
    assert {"ggn_diag", "ggn_diag_mc", "kfac", "kflr", "hvp", "hessian_diag"} <= rows
    for r in document["results"]:
        for v in r["jax"].values():
            assert 0 < v["compile_seconds"] <= v["first_call_seconds"]
    assert "| hessian_diag |" in render(tmp_path)


def test_spectrum_smoke(tmp_path):
    out = tmp_path / "spectrum-smoke.json"
    run_script("spectrum.py", "--smoke", "--no-torch", "--json", out)
    document = json.loads(out.read_text())
    assert document["experiment"] == "spectrum" and not document["failed_checks"]
    assert "Top-10" in render(tmp_path)


def test_optimizers_smoke(tmp_path):
    out = tmp_path / "optimizers-smoke.json"
    run_script("optimizers.py", "--smoke", "--json", out)
    document = json.loads(out.read_text())
    assert document["experiment"] == "optimizers" and "steps" in document
    assert "| optax SGD (momentum) |" in render(tmp_path)


def test_results_replaced_move_to_the_changelog(tmp_path):
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import harness
        import report
    finally:
        sys.path.remove(str(BENCHMARKS))
    env = {"jax_backend": "cpu", "cpu_model": "Test CPU", "usable_cores": 2}
    table = "| a | b |\n|---|---|\n| 1 | 2 |"
    for date in ("2026-01-01 10:00 UTC", "2026-02-01 10:00 UTC"):
        document = {
            "experiment": "optimizers",
            "environment": {**env, "date": date},
            "markdown": f"{table} {date}",
        }
        harness.write_results(document, results=tmp_path)
    (tmp_path / "CHANGELOG.md").write_text("### hand-written\n\nold table\n")
    assert [p.name for p in tmp_path.glob("*.json")] == ["optimizers-test-2cores.json"]
    assert len(list((tmp_path / "history").glob("*.json"))) == 1
    text = report.render(tmp_path)
    current, changelog = text.split("## Changelog")
    assert "2026-02-01" in current and "2026-01-01" not in current
    assert "2026-01-01" in changelog and changelog.rstrip().endswith("old table")


@pytest.mark.parametrize(
    ("cpu", "cores", "backend", "kind", "expected"),
    [
        ("AMD EPYC 7B13", 2, "cpu", "cpu", "amd-epyc-7b13-2cores"),
        ("Intel(R) Xeon(R) CPU @ 2.20GHz", 16, "gpu", "NVIDIA H200", "nvidia-h200"),
    ],
)
def test_machine_id(cpu, cores, backend, kind, expected):
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import harness
    finally:
        sys.path.remove(str(BENCHMARKS))
    env = {"cpu_model": cpu, "usable_cores": cores, "jax_backend": backend, "device_kind": kind}
    assert harness.machine_id(env) == expected


def test_transformer_smoke(tmp_path):
    """The language-model experiment at its smoke size, without curvlinops (its checks of
    batch_l2, per_example_grads, ggn_vp and hvp against JAX references still run)."""
    out = tmp_path / "transformer-smoke.json"
    result = run_script("transformer.py", "--smoke", "--no-torch", "--json", out)
    assert "| kfac (reduce) |" in result.stdout
    document = json.loads(out.read_text())
    assert document["experiment"] == "transformer" and not document["failed_checks"]
    assert {"batch_l2", "per_example_grads", "ggn_vp", "hvp"} <= set(document["checks"])
    assert set(document["jax"]) == {
        "grad",
        "curvjax.grad",
        "batch_l2",
        "per_example_grads",
        "ggn_diag_mc",
        "kfac (expand)",
        "kfac (reduce)",
        "ggn_vp",
        "hvp",
        "extract",
    }
    for row in document["jax"].values():
        assert 0 < row["compile_seconds"] <= row["first_call_seconds"]
    assert "GPT-style LM" in render(tmp_path)


def test_private_smoke(tmp_path):
    """The clipping experiment at its smoke size, without Opacus: curvjax's and jax-privacy's
    clipped sums and norms against vmap(grad) + clip on both models (checked by the script)."""
    out = tmp_path / "private-smoke.json"
    result = run_script("private.py", "--smoke", "--no-torch", "--json", out)
    assert "| curvjax.clipped_grad |" in result.stdout
    document = json.loads(out.read_text())
    assert document["experiment"] == "private" and not document["failed_checks"]
    assert [r["kind"] for r in document["results"]] == ["3c3d", "lm"]
    for r in document["results"]:
        assert {"grad", "curvjax.clipped_grad", "vmap(grad) + clip"} <= set(r["jax"])
        assert f"{r['model']}: curvjax.clipped_grad" in document["checks"]
        assert 0 < r["clipped_fraction"] < 1
        for row in r["jax"].values():
            assert 0 < row["compile_seconds"] <= row["first_call_seconds"]
    assert "Per-example clipping" in render(tmp_path)


def test_influence_smoke(tmp_path):
    """The influence experiment at its smoke size on the LM (the cheaper of the two models),
    without kronfluence: curvjax's EK-FAC timed, its scores checked by the script against
    vmap(grad) inner products with the same blocks and against the compiled stream."""
    out = tmp_path / "influence-smoke.json"
    run_script("influence.py", "--smoke", "--no-torch", "--models", "lm", "--json", out)
    document = json.loads(out.read_text())
    assert document["experiment"] == "influence" and not document["failed_checks"]
    (result,) = document["results"]
    # with threadpoolctl the script pins LAPACK's threads and times EK-FAC unpinned as well
    pinned = document["environment"]["lapack_threads"].get("pinned")
    unpinned = {"curvjax.ekfac, LAPACK threads unpinned"} if pinned else set()
    assert set(result["jax"]) == {"grad", "curvjax.ekfac"} | unpinned
    assert result["scores"]["num_train"] == result["batch_size"] * result["train_batches"]
    assert any("against vmap(grad)" in name for name in document["checks"])
    assert "| curvjax |" in render(tmp_path)
