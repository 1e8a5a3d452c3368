"""Solvers by name, with what each needs of the dictionary operator.

Every algorithm file registers one entry::

    @register("ista", requires=("operator",), kind="iterative")
    def _encode(C, op, *, alpha, xnorm2, positive, max_iter, tol, init): ...

The entry takes the correlations ``C = op.adjoint(X)`` and the operator, plus
any of the keyword arguments ``alpha``, ``xnorm2``, ``positive``,
``n_nonzero_coefs``, ``max_iter``, ``tol``, ``tau``, ``threshold``, ``init``,
``objective`` it declares (the others are not passed), and returns a
:class:`~skdict.solvers.SolverResult`.

``requires``: ``("operator",)`` (``normal`` / ``lipschitz`` only: works for any
operator, e.g. convolutional) or ``("gram",)`` (indexes the explicit Gram
matrix). ``kind``: ``"exact"`` (certified optimum), ``"iterative"`` (stops on a
tolerance) or ``"greedy"``. ``problem``: ``"lasso"`` (the L1 objective with
``alpha``) or ``"l0"`` (a number of non-zeros, ``n_nonzero_coefs``).
Estimators build their ``StrOptions`` from :func:`solver_names`. A new algorithm
is one file with its entry, imported in ``skdict/solvers/__init__.py`` (importing
the package registers every built-in solver).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field

__all__ = ["SolverSpec", "register", "get_solver", "solver_names"]

_REQUIRES = ("operator", "gram")
_KINDS = ("exact", "iterative", "greedy")
_PROBLEMS = ("lasso", "l0")


@dataclass(frozen=True)
class SolverSpec:
    """A registered solver: ``spec(C, op, **params)`` runs it."""

    name: str
    fn: object
    requires: tuple
    kind: str
    problem: str
    params: frozenset = field(default=frozenset())

    def check(self, op):
        """Raise ValueError when ``op`` lacks what this solver needs."""
        if "gram" in self.requires and not getattr(op, "has_gram", False):
            raise ValueError(
                f"algorithm={self.name!r} needs an explicit Gram matrix, which "
                f"{type(op).__name__} does not provide; use one of "
                f"{solver_names(requires='operator')}."
            )

    def __call__(self, C, op, **params):
        return self.fn(C, op, **{k: v for k, v in params.items() if k in self.params})


_SOLVERS: dict[str, SolverSpec] = {}


def register(name, *, requires=("operator",), kind="iterative", problem="lasso"):
    """Decorator registering ``fn(C, op, **params) -> SolverResult`` as ``name``."""
    requires = tuple(requires)
    if not requires or any(r not in _REQUIRES for r in requires):
        raise ValueError(f"requires must be a tuple drawn from {_REQUIRES}, got {requires!r}.")
    if kind not in _KINDS:
        raise ValueError(f"kind must be one of {_KINDS}, got {kind!r}.")
    if problem not in _PROBLEMS:
        raise ValueError(f"problem must be one of {_PROBLEMS}, got {problem!r}.")

    def deco(fn):
        if name in _SOLVERS:
            raise ValueError(f"a solver named {name!r} is already registered.")
        params = frozenset(list(inspect.signature(fn).parameters)[2:])
        _SOLVERS[name] = SolverSpec(name, fn, requires, kind, problem, params)
        return fn

    return deco


def get_solver(name) -> SolverSpec:
    """The registered solver ``name``; ValueError naming the choices otherwise."""
    try:
        return _SOLVERS[name]
    except (KeyError, TypeError):
        raise ValueError(f"Unknown algorithm {name!r}; use one of {solver_names()}.") from None


def solver_names(*, problem=None, kind=None, requires=None) -> tuple:
    """Sorted names of the registered solvers, optionally only those of a
    ``problem`` ("lasso" / "l0"), a ``kind`` or that need only ``requires``
    ("operator": usable with any operator)."""
    out = []
    for name, s in _SOLVERS.items():
        if problem is not None and s.problem != problem:
            continue
        if kind is not None and s.kind != kind:
            continue
        if requires == "operator" and "gram" in s.requires:
            continue
        if requires == "gram" and "gram" not in s.requires:
            continue
        out.append(name)
    return tuple(sorted(out))
