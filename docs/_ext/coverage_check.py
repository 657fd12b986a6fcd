"""Fails the build when a public name of curvjax has no entry in the API reference.

The public modules are ``curvjax`` and each of its submodules whose name does not start with an
underscore (found on disk, so a new public module is checked without editing anything). Every
name in a module's ``__all__`` must be documented under that module's path (``curvjax.optim.kfac``
is not ``curvjax.kfac``): by ``autofunction``/``autoclass``/``autodata``, a ``py:`` directive, or
``automodule`` for a submodule listed in ``__all__``. A missing one is reported as a warning, which
``sphinx -W`` turns into a failed build.
"""

from __future__ import annotations

import importlib
import pkgutil

from sphinx.util import logging

logger = logging.getLogger(__name__)


def public_modules(package: str = "curvjax") -> list[str]:
    """``package`` and its public submodules, by name."""
    root = importlib.import_module(package)
    names = [package]
    for info in pkgutil.iter_modules(root.__path__):
        if not info.name.startswith("_"):
            names.append(f"{package}.{info.name}")
    return names


def undocumented(documented: set[str], modules: list[str]) -> list[str]:
    """The ``module.name`` of every name in a module's ``__all__`` that is not in ``documented``."""
    missing = []
    for module_name in modules:
        module = importlib.import_module(module_name)
        for name in getattr(module, "__all__", ()):
            if f"{module_name}.{name}" not in documented:
                missing.append(f"{module_name}.{name}")
    return missing


def _check(app, env) -> None:
    domain = env.get_domain("py")
    documented = {name for name, *_ in domain.get_objects()}
    modules = public_modules()
    for module_name in modules:
        if module_name not in documented:
            logger.warning(
                "coverage_check: public module %s has no page (add docs/api/<name>.md with "
                "an automodule directive)",
                module_name,
                type="coverage_check",
            )
    for full_name in undocumented(documented, modules):
        logger.warning(
            "coverage_check: %s is in __all__ but has no entry in the API reference "
            "(add it to docs/api/%s.md)",
            full_name,
            full_name.rsplit(".", 1)[0].removeprefix("curvjax."),
            type="coverage_check",
        )


def setup(app):
    app.connect("env-check-consistency", _check)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
