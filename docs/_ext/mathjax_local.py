"""Serves MathJax 3 from the site itself: no request leaves the reader's machine.

MathJax comes from the PyPI package ``sphinx-mathjax-offline`` (its ``static/mathjax`` folder);
this extension points ``mathjax_path`` at the copy in ``_static/mathjax`` and copies the folder
there after a successful build. It does what that package's own extension does, and declares
itself safe for parallel builds (the package does not, which would make ``sphinx -j`` read
serially).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from sphinx.util.fileutil import copy_asset


def mathjax_folder() -> Path:
    """The MathJax distribution shipped in ``sphinx-mathjax-offline``."""
    spec = importlib.util.find_spec("sphinx-mathjax-offline")
    if spec is None or spec.origin is None:
        raise RuntimeError(
            "MathJax is served from the package sphinx-mathjax-offline: "
            'pip install ".[docs]" installs it'
        )
    return Path(spec.origin).parent / "static" / "mathjax"


def _set_path(app, config) -> None:
    mathjax_folder()  # fail early, not after the whole build, when the package is missing
    config.mathjax_path = "mathjax/tex-chtml.js"


def _copy(app, exception) -> None:
    if exception is None and app.builder.format == "html":
        copy_asset(mathjax_folder(), Path(app.outdir) / "_static" / "mathjax")


def setup(app):
    app.setup_extension("sphinx.ext.mathjax")
    app.connect("config-inited", _set_path)
    app.connect("build-finished", _copy)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
