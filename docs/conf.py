"""Sphinx configuration of the curvjax documentation.

Build (warnings fail, as in CI)::

    python -m pip install ".[docs]"
    python -m sphinx -W --keep-going -b html docs docs/_build/html

Pages are MyST markdown. The notebooks of ``notebooks/`` are copied into ``docs/notebooks/`` (not
committed) before the build and executed by myst-nb, so that the site shows their outputs and a
failing cell fails the build. ``docs/_ext/`` holds two small extensions: ``coverage_check`` (every
name in a public module's ``__all__`` has an entry in the API reference) and ``benchmark_results``
(``benchmarks.md``'s tables and plots from ``benchmarks/results/*.json``). Nothing is fetched from
the network: MathJax is served from the build's own ``_static`` folder.
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
sys.path.insert(0, str(DOCS / "_ext"))

# Notebooks executed during the build share the machine with everything else: one BLAS thread,
# and JAX on the CPU (a GPU, if any, is not needed for the notebooks' tiny models).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")


def _copy_notebooks() -> None:
    """Mirror ``notebooks/*.ipynb`` into ``docs/notebooks/`` (only files whose bytes changed).

    Unchanged files keep their modification time, so an incremental build does not execute them
    again; a notebook removed from ``notebooks/`` is removed here too.
    """
    target = DOCS / "notebooks"
    target.mkdir(exist_ok=True)
    sources = {path.name: path for path in sorted((ROOT / "notebooks").glob("*.ipynb"))}
    for stale in target.glob("*.ipynb"):
        if stale.name not in sources:
            stale.unlink()
    for name, source in sources.items():
        copy = target / name
        if not copy.exists() or copy.read_bytes() != source.read_bytes():
            shutil.copyfile(source, copy)


_copy_notebooks()

project = "curvjax"
author = "the curvjax authors"
copyright = "2026, the curvjax authors"  # noqa: A001
# From the installed metadata, without importing curvjax (and jax) in the main process.
try:
    release = importlib.metadata.version("curvjax")
except importlib.metadata.PackageNotFoundError:  # pragma: no cover - the build installs curvjax
    release = ""
version = release

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "mathjax_local",  # MathJax 3 from the sphinx-mathjax-offline package, in _static/mathjax
    "myst_nb",
    "coverage_check",
    "benchmark_results",
]

exclude_patterns = ["_build", "_generated", "Thumbs.db", ".DS_Store", "**.ipynb_checkpoints"]
source_suffix = {".md": "myst-nb", ".ipynb": "myst-nb"}
root_doc = "index"

# -- autodoc / napoleon: Google-style docstrings (Args, Returns, Example, References) --------------
autodoc_member_order = "bysource"
autodoc_typehints = "none"  # the signature and the Args section already say the shapes
autodoc_default_options = {"show-inheritance": False}
autosummary_generate = False
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
napoleon_use_ivar = True
add_module_names = False
python_display_short_literal_types = True

# -- MyST and myst-nb -----------------------------------------------------------------------------
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence", "deflist"]
myst_heading_anchors = 3
# The notebooks are committed without outputs: run every one ("force"). For quick local edits of
# other pages, CURVJAX_DOCS_EXECUTE=off skips them (CI never sets it).
nb_execution_mode = "off" if os.environ.get("CURVJAX_DOCS_EXECUTE") == "off" else "force"
nb_execution_raise_on_error = True  # a failing cell fails the build
nb_execution_timeout = 180  # seconds per cell
nb_merge_streams = True
nb_execution_show_tb = True

# -- HTML -------------------------------------------------------------------------------------------
html_theme = "furo"
html_title = f"curvjax {release}"
html_static_path = ["_static"]
html_favicon = "_static/favicon.svg"
html_show_sourcelink = False
html_last_updated_fmt = None

# The public modules whose ``__all__`` the API reference must cover (docs/_ext/coverage_check.py).
coverage_check_modules = [
    "curvjax",
    "curvjax.losses",
    "curvjax.spectral",
    "curvjax.optim",
    "curvjax.privacy",
    "curvjax.influence",
]
