"""Smoke tests of ``python -m curvjax`` and its ``demo`` command (run in subprocesses)."""

import os
import pathlib
import subprocess
import sys

import curvjax
from curvjax._src import demo

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def _run_module(*args: str) -> subprocess.CompletedProcess:
    """Runs ``python -m curvjax *args`` from the repository root, in float32."""
    env = dict(os.environ)
    env.pop("JAX_ENABLE_X64", None)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, "-m", "curvjax", *args],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_demo_prints_accuracy_and_every_available_row():
    result = _run_module("demo", "--steps", "20", "--batch-size", "32", "--seed", "1")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert any("train accuracy" in line and "test accuracy" in line for line in lines)
    rows = [line for line in lines if line.startswith("| ")]
    present, missing = demo.available_quantities()
    assert present, "curvjax provides none of the demo's quantities"
    for quantity in present:
        matching = [row for row in rows if row.startswith(f"| {quantity.name} ")]
        assert len(matching) == 1, f"no table row for {quantity.name!r}:\n{result.stdout}"
        cells = [cell.strip() for cell in matching[0].strip("|").split("|")]
        assert float(cells[2]) > 0.0  # ratio to the gradient
    for quantity in missing:
        assert quantity.name in result.stdout  # listed as skipped


def test_registry_skips_names_missing_from_curvjax():
    class Partial:
        grad = curvjax.grad

    present, missing = demo.available_quantities(module=Partial)
    assert [q.name for q in present] == ["grad"]
    assert len(missing) == len(demo.QUANTITIES) - 1


def test_format_table_aligns_columns():
    table = demo.format_table(["name", "value"], [["a", "1.5"], ["longer", "10.25"]])
    lines = table.splitlines()
    assert len({len(line) for line in lines}) == 1
    assert lines[1].endswith(":|")  # numeric column right-aligned


def test_without_command_prints_help():
    result = _run_module()
    assert result.returncode == 0, result.stderr
    assert "demo" in result.stdout and "usage" in result.stdout


def test_demo_writes_density_plot(tmp_path):
    path = tmp_path / "density.png"
    result = _run_module("demo", "--steps", "5", "--batch-size", "16", "--plot", str(path))
    assert result.returncode == 0, result.stderr
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
