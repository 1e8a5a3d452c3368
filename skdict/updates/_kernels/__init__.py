"""Compiled (numba) CPU kernels of the dictionary updates, each tested against the
torch reference beside its caller (:mod:`skdict.updates.online`)."""
