"""Curvature-preconditioned optimizers as optax transforms (public names in ``curvjax.optim``)."""
