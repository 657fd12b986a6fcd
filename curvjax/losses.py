"""Losses with output-Hessian factors: ``cross_entropy``, ``mse`` and :class:`Loss` for your own."""

from curvjax._src.losses import Loss, cross_entropy, mse, resolve

__all__ = ["Loss", "cross_entropy", "mse", "resolve"]
