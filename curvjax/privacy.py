"""Privacy accounting and Poisson sampling for DP-SGD.

DP-SGD (Abadi et al. 2016) in curvjax has three parts:

* a batch: :func:`poisson_batch` draws each example independently with probability ``q`` into a
  fixed-size padded batch (indices and a 0/1 mask, so that nothing recompiles);
* a private gradient: :func:`curvjax.clipped_grad` gives the clipped sum ``Σ_n clip_c(ĝ_n)`` from
  one backward pass (the mask as per-example weights), and :func:`curvjax.optim.dp_aggregate`
  adds ``N(0, σ² c²)`` noise and divides by ``q N``, in front of any optax optimizer;
* the guarantee: :func:`epsilon` gives ε after ``T`` steps at a given ``δ``, and
  :func:`noise_multiplier` the smallest ``σ`` for a target ε, both through Google's
  ``dp-accounting`` (``pip install "curvjax[privacy]"``).

Example:
  >>> from curvjax import privacy
  >>> sigma = privacy.noise_multiplier(target_epsilon=8.0, sampling_rate=0.05, steps=200,
  ...                                  delta=1e-5, accountant="rdp")
  >>> privacy.epsilon(sigma, sampling_rate=0.05, steps=200, delta=1e-5, accountant="rdp") <= 8.0
  True
"""

from curvjax._src.accounting import PoissonBatch, epsilon, noise_multiplier, poisson_batch

__all__ = ["PoissonBatch", "epsilon", "noise_multiplier", "poisson_batch"]
