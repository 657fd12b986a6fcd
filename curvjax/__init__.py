"""curvjax: per-example gradients, curvature and Hessian spectra for any pure JAX function."""

from curvjax import losses
from curvjax._src.extract import extract
from curvjax._src.first_order import (
    batch_l2,
    grad,
    per_example_grads,
    sum_grad_squared,
    variance,
)

__version__ = "0.1.0"

__all__ = [
    "batch_l2",
    "extract",
    "grad",
    "losses",
    "per_example_grads",
    "sum_grad_squared",
    "variance",
]
