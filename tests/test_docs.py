"""The documentation site: the strict Sphinx build, which executes every notebook, and the built
site checked in headless Chromium as a reader sees it (``scripts/check_site.py``).

One test, scheduled first under pytest-xdist (``tests/conftest.py``): the build runs the notebooks
one after another on one core while the other core runs the rest of the suite, so CI pays for the
notebooks once and in parallel (as it did when nbmake ran them).
"""

import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HTML = ROOT / "docs" / "_build" / "html"
BUILD = [
    sys.executable,
    "-m",
    "sphinx",
    "-E",  # a fresh build: no saved environment, so every page is read and every notebook runs
    "-W",
    "--keep-going",
    "-q",
    "-b",
    "html",
    "docs",
    str(HTML),
]


def _run(command: list[str]) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if k != "CURVJAX_DOCS_EXECUTE"}
    environment["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p]
    )
    return subprocess.run(command, cwd=ROOT, env=environment, capture_output=True, text=True)


def test_documentation_builds_strictly_and_renders():
    build = _run(BUILD)
    assert build.returncode == 0, (
        "the documentation build failed (a warning, a broken reference, an undocumented public "
        f"name or a failing notebook cell):\n{build.stdout[-6000:]}\n{build.stderr[-6000:]}"
    )
    if shutil.which("chromedriver") is None:
        message = (
            "site built, but not checked in a browser: install Debian's chromium and "
            "chromium-driver to run scripts/check_site.py (.ci/run does)"
        )
        assert not os.environ.get("CURVJAX_CHECK_SITE"), message
        warnings.warn(message, stacklevel=1)
        return
    check = _run([sys.executable, "scripts/check_site.py", "--html", str(HTML)])
    assert check.returncode == 0, f"check_site.py:\n{check.stdout}\n{check.stderr}"
