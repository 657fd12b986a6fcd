"""Hessian spectra: matrix-free operators, Krylov eigensolvers, trace and density estimators."""
