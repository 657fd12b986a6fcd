"""The benchmark scripts run at a smoke size (so they never rot); timings are not checked."""

import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).parent.parent


@pytest.mark.parametrize("script", ["overhead.py", "curvature.py"])
def test_benchmark_smoke(script, tmp_path):
    out = tmp_path / "result.json"
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / script),
            "--smoke",
            "--no-torch",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| " in result.stdout and out.exists()
