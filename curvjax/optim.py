"""Second-order optimizers as optax transforms.

* :func:`precondition_by_curvature` -- ``(G + (λ+η) I)⁻¹ (∇L + η θ)`` for any curvature curvjax
  computes (diagonals, Kronecker / dense / diagonal blocks); Dangel et al. (2020), eq. 27-29.
* :func:`scale_by_kfac` and :func:`kfac` -- K-FAC (Martens & Grosse 2015): factor moving averages,
  periodic inverses, factored Tikhonov damping, Levenberg-Marquardt adaptation, the quadratic-model
  learning rate and momentum; block-diagonal or block-tridiagonal inverse (``chain_factors``).
* :func:`scale_by_noisy_kfac` and :func:`noisy_kfac` -- Noisy K-FAC / KFAC-VI (Zhang et al. 2018),
  the transform and its chain with weight decay, momentum and learning rate, with
  :func:`noisy_kfac_sample`, :func:`noisy_kfac_predict` and the :func:`warmup_polynomial_decay`
  schedule.
* :func:`dp_aggregate` and :func:`dpsgd` -- DP-SGD (Abadi et al. 2016): Gaussian noise on the
  clipped sum of per-example gradients (:func:`curvjax.clipped_grad`), divided by the expected
  batch size, in front of any optax optimizer (plain ``optax.GradientTransformation``s, the
  clipped sum as ``updates``); privacy accounting in :mod:`curvjax.privacy`.

Every transform is an ``optax.GradientTransformationExtraArgs`` with a NamedTuple state; curvature
computed by :func:`curvjax.extract` in the same pass as the gradient comes in as the extra argument
``curvature=``, or the transform computes it from ``batch=`` (and ``key=``).
"""

from curvjax._src.chain import ChainFactors, chain_factors
from curvjax._src.optim.kfac import KfacState, ScaleByKfacState, kfac, scale_by_kfac
from curvjax._src.optim.noisy_kfac import (
    NoisyKfacState,
    noisy_kfac,
    noisy_kfac_predict,
    noisy_kfac_sample,
    scale_by_noisy_kfac,
)
from curvjax._src.optim.precondition import precondition_by_curvature
from curvjax._src.optim.private import DpAggregateState, dp_aggregate, dpsgd
from curvjax._src.optim.schedules import proportional_momentum, warmup_polynomial_decay

__all__ = [
    "ChainFactors",
    "DpAggregateState",
    "KfacState",
    "NoisyKfacState",
    "ScaleByKfacState",
    "chain_factors",
    "dp_aggregate",
    "dpsgd",
    "kfac",
    "noisy_kfac",
    "noisy_kfac_predict",
    "noisy_kfac_sample",
    "precondition_by_curvature",
    "proportional_momentum",
    "scale_by_kfac",
    "scale_by_noisy_kfac",
    "warmup_polynomial_decay",
]
