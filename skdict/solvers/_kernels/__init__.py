"""Compiled (numba) kernels of the solvers, each tested against a torch reference:
:mod:`.lars` (the lasso homotopy) against :mod:`skdict.solvers.active_set`."""
