"""Type aliases of the public signatures (jaxtyping shapes: ``N`` examples, ``P`` positions, ``C``
outputs per position)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeAlias

from jaxtyping import Array, Float, PyTree

from curvjax._src.losses import Loss

#: ``apply_fn(params, inputs) -> outputs [N, *P, C]``
ApplyFn: TypeAlias = Callable[[PyTree, PyTree], Float[Array, "N *P C"]]  # noqa: F722, F821
#: ``(inputs, targets)`` or ``(inputs, targets, weights)``: arrays or pytrees of arrays with a
#: leading batch axis ``N``; weights ``[N]`` or ``[N, *P]``
Batch: TypeAlias = tuple[PyTree, PyTree] | tuple[PyTree, PyTree, Float[Array, "N *P"]]  # noqa: F722, F821
#: ``"cross_entropy"``, ``"mse"`` or a :class:`curvjax.losses.Loss`
LossLike: TypeAlias = str | Loss
#: a pytree like ``params`` (``None`` at non-floating-point leaves)
ParamsLike: TypeAlias = PyTree[Float[Array, "..."]]  # noqa: F722
