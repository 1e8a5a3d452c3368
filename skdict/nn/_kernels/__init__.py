"""Compiled (numba) CPU kernels of :mod:`skdict.nn`, each tested against a torch
reference: :mod:`.topk_softmax` against :func:`skdict.nn.sparse_weights`."""
