"""The benchmark script runs at a smoke size (so it never rots); timings are not checked."""

import json
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).parent.parent


def test_overhead_smoke_has_first_and_second_order_rows(tmp_path):
    out = tmp_path / "result.json"
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "overhead.py"),
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
    document = json.loads(out.read_text())
    rows = {q for r in document["second_order"] for q in r["jax"]}
    assert {"ggn_diag", "ggn_diag_mc", "kfac", "kflr", "hvp", "hessian_diag"} <= rows
