"""A dictionary operator known only through forward / adjoint (no Gram), as a
convolutional one is: what the operator-only solvers must work with."""

from skdict.operators import Operator


class MatrixFree(Operator):
    def __init__(self, D):
        self._D = D
        self.n_atoms, self.n_features = D.shape
        self.dtype, self.device = D.dtype, D.device

    def forward(self, a):
        return a @ self._D

    def adjoint(self, x):
        return x @ self._D.T
