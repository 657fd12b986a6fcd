"""curvjax: per-example gradients, curvature and Hessian spectra for any pure JAX function."""

from curvjax import influence, losses
from curvjax._src.blocks import (
    DenseBlock,
    DiagonalBlock,
    EigenKroneckerBlock,
    KroneckerBlock,
    block_to_dense,
    blocks_to_dense,
)
from curvjax._src.chain import ChainFactors, chain_factors
from curvjax._src.clipping import ClippedGrad
from curvjax._src.diagnostics import (
    GradientNoiseScale,
    gradient_noise_scale,
    gradient_noise_scale_from_sums,
)
from curvjax._src.extract import extract
from curvjax._src.first_order import (
    batch_l2,
    clipped_grad,
    grad,
    per_example_grads,
    sum_grad_squared,
    variance,
)
from curvjax._src.inspection import LeafReport, ModelReport, TapReport, inspect
from curvjax._src.mixing import assume_independent_examples
from curvjax._src.primitives import Registration, register_rule
from curvjax._src.products import ggn_matrix, ggn_vp, hessian_matrix, hvp
from curvjax._src.rules.bilinear import Form as BilinearForm
from curvjax._src.second_order import (
    ekfac,
    ggn_diag,
    ggn_diag_mc,
    hessian_diag,
    kfac,
    kflr,
    kfra,
)
from curvjax._src.solve import CGInfo, cg_solve, inverse_curvature_product

__version__ = "0.1.0"

__all__ = [
    "BilinearForm",
    "CGInfo",
    "ChainFactors",
    "ClippedGrad",
    "DenseBlock",
    "DiagonalBlock",
    "EigenKroneckerBlock",
    "GradientNoiseScale",
    "KroneckerBlock",
    "LeafReport",
    "ModelReport",
    "Registration",
    "TapReport",
    "assume_independent_examples",
    "batch_l2",
    "block_to_dense",
    "blocks_to_dense",
    "cg_solve",
    "chain_factors",
    "clipped_grad",
    "ekfac",
    "extract",
    "ggn_diag",
    "ggn_diag_mc",
    "ggn_matrix",
    "ggn_vp",
    "gradient_noise_scale",
    "gradient_noise_scale_from_sums",
    "grad",
    "hessian_diag",
    "hessian_matrix",
    "hvp",
    "influence",
    "inspect",
    "inverse_curvature_product",
    "kfac",
    "kflr",
    "kfra",
    "losses",
    "per_example_grads",
    "register_rule",
    "sum_grad_squared",
    "variance",
]
