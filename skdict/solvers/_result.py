"""The result type every solver returns."""

from __future__ import annotations

from typing import NamedTuple

import torch


class SolverResult(NamedTuple):
    """Codes with their convergence record.

    Attributes
    ----------
    codes : torch.Tensor of shape (n_samples, n_components)
        The solution (dense; zeros where inactive).
    n_iter : int
        Iterations run.
    history : list of float
        The convergence criterion (e.g. the largest relative duality gap of the
        batch) each time it was evaluated.
    converged : bool
        Whether the stopping tolerance was met before ``max_iter``.
    state : torch.Tensor or None
        Solver-specific internal state worth warm-starting from (LCA membrane
        potentials ``u``); None for the others.
    objective : torch.Tensor or None
        Each row's lasso objective, when the solver computes it as a by-product
        (the exact solver, given ``xnorm2``); None otherwise.
    """

    codes: torch.Tensor
    n_iter: int
    history: list
    converged: bool
    state: torch.Tensor | None = None
    objective: torch.Tensor | None = None
