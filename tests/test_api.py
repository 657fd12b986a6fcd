"""The public surface: every name documented, every docstring example runs."""

import doctest
import importlib

import pytest

import curvjax
import curvjax.optim
import curvjax.privacy
import curvjax.spectral

MODULES = [
    "curvjax._src.first_order",
    "curvjax._src.second_order",
    "curvjax._src.extract",
    "curvjax._src.products",
    "curvjax._src.primitives",
    "curvjax._src.inspection",
    "curvjax._src.blocks",
    "curvjax._src.losses",
    "curvjax.spectral",
    "curvjax._src.optim.precondition",
    "curvjax._src.optim.kfac",
    "curvjax._src.chain",
    "curvjax._src.solve",
    "curvjax._src.influence",
    "curvjax._src.diagnostics",
    "curvjax._src.mixing",
    "curvjax._src.optim.schedules",
    "curvjax._src.optim.private",
    "curvjax._src.accounting",
    "curvjax.privacy",
]


def test_every_public_name_has_a_docstring():
    for name in curvjax.__all__:
        obj = getattr(curvjax, name)
        assert obj.__doc__ and len(obj.__doc__.strip()) > 20, name
    for module in (curvjax.losses, curvjax.spectral, curvjax.optim, curvjax.privacy):
        for name in module.__all__:
            assert getattr(module, name).__doc__, f"{module.__name__}.{name}"


@pytest.mark.parametrize("module", MODULES)
def test_docstring_examples(module):
    result = doctest.testmod(importlib.import_module(module), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0
    assert result.attempted > 0


def test_readme_quickstart_runs():
    import pathlib
    import re

    readme = (pathlib.Path(__file__).parent.parent / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
    assert blocks
    for block in blocks:
        exec(compile(block, "README.md", "exec"), {})
