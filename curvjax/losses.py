"""Losses with output-Hessian factors, and :class:`Loss` for your own.

Built in: ``cross_entropy`` (integer labels), ``soft_cross_entropy`` (probability targets),
``cross_entropy_with_label_smoothing(alpha)``, ``sigmoid_binary_cross_entropy`` (multi-label),
``gaussian_nll`` (predicted mean and log-variance) and ``mse``. ``LOSSES`` maps the names that
``loss=`` accepts to these; ``resolve`` looks one up.
"""

from curvjax._src.losses import (
    LOSSES,
    Loss,
    cross_entropy,
    cross_entropy_with_label_smoothing,
    gaussian_nll,
    mse,
    resolve,
    sigmoid_binary_cross_entropy,
    soft_cross_entropy,
)

__all__ = [
    "LOSSES",
    "Loss",
    "cross_entropy",
    "cross_entropy_with_label_smoothing",
    "gaussian_nll",
    "mse",
    "resolve",
    "sigmoid_binary_cross_entropy",
    "soft_cross_entropy",
]
