"""Type aliases of the public signatures (jaxtyping shapes: ``N`` examples, ``C`` outputs)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeAlias

from jaxtyping import Array, Float, PyTree

from curvjax._src.losses import Loss

#: ``apply_fn(params, inputs) -> outputs [N, C]``
ApplyFn: TypeAlias = Callable[[PyTree, PyTree], Float[Array, "N C"]]  # noqa: F722
#: ``(inputs, targets)``, each an array or pytree of arrays with a leading batch axis ``N``
Batch: TypeAlias = tuple[PyTree, PyTree]
#: ``"cross_entropy"``, ``"mse"`` or a :class:`curvjax.losses.Loss`
LossLike: TypeAlias = str | Loss
#: a pytree like ``params`` (``None`` at non-floating-point leaves)
ParamsLike: TypeAlias = PyTree[Float[Array, "..."]]  # noqa: F722
