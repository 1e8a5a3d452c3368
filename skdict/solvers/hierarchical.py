"""The free energy of a hierarchical sparse coding model and its inference (pure torch).

Levels ``l = 1..L`` have dictionaries ``D_l`` of shape ``(K_l, K_{l-1})`` (atoms as
rows, ``K_0 = n_features``), codes ``a_l`` and ``a_0 = x``. Per row::

    F = sum_l  0.5 * p_l * ||a_{l-1} - a_l D_l||^2  +  alpha_l * ||a_l||_1

with precisions ``p_l = 1 / sigma_l**2``. ``e_l = a_{l-1} - a_l D_l`` is the
prediction error of level ``l``: each code is pulled by its own error (bottom-up)
and by the error of the level above, which predicts it (top-down). With one level
and ``p_1 = 1``, ``F`` is the lasso objective.

Every quantity of the model is computed here, once: :func:`free_energy_terms`,
:func:`free_energy_grad`, :func:`prediction_errors`, :func:`generate`, and the two
inference rules: :func:`joint_inference` (monotone FISTA on the stacked codes,
stopped on a duality gap) and :func:`bottom_up_inference` (one lasso per level,
ignoring the top-down term). The estimator :class:`skdict.HierarchicalSparseCoder`
and the module :class:`skdict.nn.HierarchicalSparseCoding` both call them. All
functions take lists of tensors (one per level) and are differentiable where
they are plain tensor expressions (the free energy, its terms, the errors).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..operators import DenseOperator, power_iteration
from ..penalties import L1
from .ista import effective_tol

__all__ = [
    "HierarchicalResult",
    "bottom_up_inference",
    "free_energy",
    "free_energy_grad",
    "free_energy_terms",
    "generate",
    "hierarchical_lipschitz",
    "joint_inference",
    "prediction_errors",
    "unrolled_inference",
]


def prediction_errors(X, codes, dicts):
    """``[e_1, ..., e_L]`` with ``e_l = a_{l-1} - a_l D_l`` (``a_0 = X``)."""
    below = [X, *codes[:-1]]
    return [b - a @ D for b, a, D in zip(below, codes, dicts, strict=True)]


def free_energy_terms(X, codes, dicts, alpha, precisions, *, errors=None, normalizer=False):
    """The free energy of each row and level, shape ``(n, L)``.

    Column ``l`` is ``0.5 * p_l * ||e_l||^2 + alpha_l * ||a_l||_1``; the row sums
    are :func:`free_energy`. ``errors`` (from :func:`prediction_errors`) saves
    recomputing them. ``alpha`` and ``precisions`` are sequences of floats or
    1-D tensors (learnable precisions stay in the autograd graph).
    ``normalizer=True`` adds each level's Gaussian log-normaliser
    ``-0.5 * K_{l-1} * log(p_l)``: the negative log-likelihood, whose minimum
    over ``p_l`` is the inverse mean squared error per unit (the objective of
    learned precisions; without it ``F`` would drive them to zero).
    """
    if errors is None:
        errors = prediction_errors(X, codes, dicts)
    cols = []
    for e, a, al, p in zip(errors, codes, alpha, precisions, strict=True):
        col = 0.5 * p * (e * e).sum(-1) + al * a.abs().sum(-1)
        if normalizer:
            col = col - 0.5 * e.shape[-1] * torch.log(torch.as_tensor(p, dtype=e.dtype,
                                                                        device=e.device))
        cols.append(col)
    return torch.stack(cols, dim=-1)


def free_energy(X, codes, dicts, alpha, precisions, *, errors=None):
    """Free energy of each row, shape ``(n,)`` (see :func:`free_energy_terms`)."""
    return free_energy_terms(X, codes, dicts, alpha, precisions, errors=errors).sum(-1)


def free_energy_grad(errors, dicts, precisions):
    """Gradient of the smooth part of ``F`` with respect to each level's codes.

    For level ``l``::

        dF/da_l = -p_l e_l D_l^T + p_{l+1} e_{l+1}      (no second term at l = L)
    """
    L = len(dicts)
    grads = []
    for i in range(L):
        g = -precisions[i] * (errors[i] @ dicts[i].T)
        if i + 1 < L:
            g = g + precisions[i + 1] * errors[i + 1]
        grads.append(g)
    return grads


def generate(top, dicts, *, level=0):
    """Top-down generation: the codes of ``level`` (0: the data) predicted from
    the top level's codes.

    The prediction is ``top @ D_L @ D_{L-1} @ D_{level+1}`` (every dictionary from
    the top down to level ``level + 1``)."""
    out = top
    for D in reversed(dicts[level:]):
        out = out @ D
    return out


def hierarchical_lipschitz(dicts, precisions):
    """Lipschitz constant of ``free_energy_grad`` (largest eigenvalue of the
    Hessian of the smooth part of ``F``, by power iteration on Hessian-vector
    products), slightly over-estimated so that ``1 / L`` is a safe step."""
    sizes = [D.shape[0] for D in dicts]
    D0 = dicts[0]
    zero = torch.zeros(1, D0.shape[1], dtype=D0.dtype, device=D0.device)

    def hvp(v):
        codes = list(torch.split(v.unsqueeze(0), sizes, dim=1))
        grads = free_energy_grad(prediction_errors(zero, codes, dicts), dicts, precisions)
        return torch.cat(grads, dim=1).squeeze(0)

    return power_iteration(hvp, n_iter=100, tol=1e-5, size=sum(sizes), dtype=D0.dtype,
                           device=D0.device)


@dataclass
class HierarchicalResult:
    """What the hierarchical inference returns.

    codes : list of Tensor, one ``(n, K_l)`` per level
    n_iter : int
        Iterations run (0 for :func:`bottom_up_inference`).
    free_energy : Tensor (n,)
        Each row's free energy at ``codes``.
    history : list of float
        ``joint_inference``: the total free energy of the batch (float64) before
        the first iteration and after each one.
    converged : bool
    """

    codes: list
    n_iter: int = 0
    free_energy: torch.Tensor = None
    history: list = field(default_factory=list)
    converged: bool = True


def bottom_up_inference(X, dicts, alpha, precisions, *, positive=False, ops=None):
    """Greedy inference, level by level: ``a_l`` is the exact lasso code of
    ``a_{l-1}`` over ``D_l`` with weight ``alpha_l / p_l``, ignoring the
    prediction of ``a_l`` by the level above (each level minimises its own term of
    ``F``). ``ops``: the levels' :class:`~skdict.operators.DenseOperator` (cached
    Gram matrices), built when None.
    """
    from ..functional import encode_block  # functional imports the solver registry

    ops = [DenseOperator(D) for D in dicts] if ops is None else ops
    codes, below = [], X
    for op, al, p in zip(ops, alpha, precisions, strict=True):
        a = encode_block(below, op, algorithm="exact", alpha=float(al) / float(p),
                         positive=positive).codes
        codes.append(a)
        below = a
    F = free_energy(X, codes, dicts, alpha, precisions)
    return HierarchicalResult(codes=codes, n_iter=0, free_energy=F, converged=True)


def _relative_gap(X, codes, errors, dicts, alpha, precisions, positive, F):
    """Per-row relative duality gap of ``F`` at ``codes`` (float64).

    ``F`` is a lasso in the stacked codes ``a = (a_1, ..., a_L)`` with a weighted
    L1 penalty: ``0.5 ||b - M a||^2`` with ``b = (sqrt(p_1) x, 0, ...)`` and
    residual ``r = (sqrt(p_l) e_l)_l``. ``M^T r`` is minus the gradient, block by
    block; the residual scaled into the dual feasible set
    ``{|(M^T theta)_l| <= alpha_l}`` gives the dual value
    ``0.5 ||b||^2 - 0.5 ||b - theta||^2``.
    """
    corr = [-g.double() for g in free_energy_grad(errors, dicts, precisions)]
    scale = torch.ones(X.shape[0], dtype=torch.float64, device=X.device)
    for c, al in zip(corr, alpha, strict=True):
        scale = torch.minimum(scale, L1(float(al), positive).dual_scale(c))
    X64 = X.double()
    p = [float(v) for v in precisions]
    e1 = errors[0].double()
    # ||b - theta||^2 with theta = scale * r
    rest = p[0] * ((X64 - scale[:, None] * e1) ** 2).sum(1)
    for e, pl in zip(errors[1:], p[1:], strict=True):
        rest = rest + pl * scale**2 * (e.double() ** 2).sum(1)
    dual = 0.5 * p[0] * (X64 * X64).sum(1) - 0.5 * rest
    primal = F.double()
    return (primal - dual).clamp_min(0) / primal.clamp_min(1e-300)


def _mfista_step(X, x, ex, Fx, y, ey, t, dicts, alpha, precisions, pens, L_):
    """One monotone FISTA step on the stacked codes (autograd-friendly: no in-place
    operation). ``x`` is the last accepted point with errors ``ex`` and free
    energy ``Fx``; ``y`` the extrapolated point with errors ``ey``; ``t`` the
    momentum, one per row. Returns the new ``(x, ex, Fx, y, ey, t)``."""
    grads = free_energy_grad(ey, dicts, precisions)
    z = [pen.prox(c - g / L_, 1.0) for pen, c, g in zip(pens, y, grads, strict=True)]
    ez = prediction_errors(X, z, dicts)
    Fz = free_energy(X, z, dicts, alpha, precisions, errors=ez)
    # a step from y = x (after a restart: t = 1) is a plain proximal-gradient step,
    # a descent step in exact arithmetic: always taken, so rounding in the
    # comparison cannot freeze a row at a non-optimal point
    ok = (Fz <= Fx)[:, None] | (t == 1)
    t_new = torch.where(ok, 0.5 * (1 + torch.sqrt(1 + 4 * t * t)), torch.ones_like(t))
    beta = torch.where(ok, (t - 1) / t_new, torch.zeros_like(t))
    # accepted rows: y = z + beta (z - x); rejected rows restart from x
    x_new = [torch.where(ok, c_z, c_x) for c_z, c_x in zip(z, x, strict=True)]
    ex_new = [torch.where(ok, e_z, e_x) for e_z, e_x in zip(ez, ex, strict=True)]
    y = [c_n + beta * (c_n - c_x) for c_n, c_x in zip(x_new, x, strict=True)]
    # errors are affine in the codes: those of y follow without a product
    ey = [e_n + beta * (e_n - e_x) for e_n, e_x in zip(ex_new, ex, strict=True)]
    return x_new, ex_new, torch.where(ok[:, 0], Fz, Fx), y, ey, t_new


def unrolled_inference(X, dicts, alpha, precisions, *, n_iter=50, positive=False,
                       lipschitz=None):
    """``n_iter`` monotone FISTA steps on ``F`` from zero codes, every operation
    tracked by autograd (no stopping rule, no row freezing): codes
    differentiable with respect to ``X``, the dictionaries and the precisions.
    The step size ``1 / lipschitz`` is a constant (computed from detached
    dictionaries when None). Returns the list of codes."""
    if lipschitz is None:
        with torch.no_grad():
            lipschitz = hierarchical_lipschitz([D.detach() for D in dicts],
                                               [float(p) for p in precisions])
    L_ = float(lipschitz)
    pens = [L1(float(a) / L_, positive) for a in alpha]
    x = [X.new_zeros(X.shape[0], D.shape[0]) for D in dicts]
    ex = prediction_errors(X, x, dicts)
    Fx = free_energy(X, x, dicts, alpha, precisions, errors=ex)
    y, ey = x, ex
    t = X.new_ones(X.shape[0], 1)
    for _ in range(int(n_iter)):
        x, ex, Fx, y, ey, t = _mfista_step(X, x, ex, Fx, y, ey, t, dicts, alpha, precisions,
                                           pens, L_)
    return x


def joint_inference(X, dicts, alpha, precisions, *, positive=False, max_iter=1000, tol=1e-4,
                    init="bottom_up", lipschitz=None, check_every=10, ops=None):
    """Minimise ``F`` over the codes of all levels at once.

    Proximal gradient on the stacked codes (the L1 prox is separable by level)
    with Nesterov momentum, made monotone row by row: a momentum step that would
    raise a row's ``F`` is rejected and that row's momentum restarts from its
    last point (Beck & Teboulle's monotone FISTA with function-value restart,
    O'Donoghue & Candes 2015); the step after a restart is a plain
    proximal-gradient step with step ``1 / L``, which cannot raise ``F`` (up to
    rounding). So every row's free energy never increases. A row stops once
    its relative duality gap (:func:`_relative_gap`, checked every
    ``check_every`` iterations) is below ``tol`` (floored at what the dtype can
    certify); the other rows do not change its result.

    Parameters
    ----------
    X : Tensor (n, K_0)
    dicts : list of Tensor, ``(K_l, K_{l-1})``
    alpha, precisions : sequences of L floats
    positive : bool
        Non-negative codes at every level.
    max_iter : int
    tol : float
    init : {"bottom_up", "zeros"} or list of Tensor
        Starting codes: :func:`bottom_up_inference` (so the result's free energy
        is never above the greedy one), zeros, or given codes.
    lipschitz : float, optional
        :func:`hierarchical_lipschitz` of the model (computed when None).
    check_every : int
    ops : list of DenseOperator, optional
        For the bottom-up start.

    Returns
    -------
    HierarchicalResult
    """
    L_ = float(hierarchical_lipschitz(dicts, precisions) if lipschitz is None else lipschitz)
    alpha = [float(a) for a in alpha]
    precisions = [float(p) for p in precisions]
    if isinstance(init, str):
        if init == "bottom_up":
            codes = bottom_up_inference(X, dicts, alpha, precisions, positive=positive,
                                        ops=ops).codes
        elif init == "zeros":
            codes = [X.new_zeros(X.shape[0], D.shape[0]) for D in dicts]
        else:
            raise ValueError(f"init must be 'bottom_up', 'zeros' or a list of codes, got {init!r}.")
    else:
        codes = [c.to(dtype=X.dtype) for c in init]
    pens = [L1(a / L_, positive) for a in alpha]
    tol = effective_tol(tol, X.dtype)
    n = X.shape[0]
    out = [c.clone() for c in codes]
    ia = torch.arange(n, device=X.device)  # rows still iterating
    x = codes
    ex = prediction_errors(X, x, dicts)
    Fx = free_energy(X, x, dicts, alpha, precisions, errors=ex)
    F_all = Fx.double().clone()
    history = [F_all.sum()]  # 0-d tensors: no device sync per iteration
    Xa = X
    it = 0
    if not isinstance(init, str) or init == "bottom_up":  # may already be optimal
        keep = _relative_gap(Xa, x, ex, dicts, alpha, precisions, positive, Fx) > tol
        if not bool(keep.all()):
            ia, Xa, x, ex, Fx = ia[keep], Xa[keep], [c[keep] for c in x], \
                [e[keep] for e in ex], Fx[keep]
    y, ey = x, ex
    t = torch.ones(ia.numel(), 1, dtype=X.dtype, device=X.device)
    for it in range(1, max_iter + 1):
        if ia.numel() == 0:
            it -= 1
            break
        x, ex, Fx, y, ey, t = _mfista_step(Xa, x, ex, Fx, y, ey, t, dicts, alpha, precisions,
                                           pens, L_)
        F_all[ia] = Fx.double()
        history.append(F_all.sum())
        if it % check_every == 0 or it == max_iter:
            for o, c in zip(out, x, strict=True):
                o[ia] = c
            keep = _relative_gap(Xa, x, ex, dicts, alpha, precisions, positive, Fx) > tol
            ia, Xa, t, Fx = ia[keep], Xa[keep], t[keep], Fx[keep]
            x, ex, y, ey = ([c[keep] for c in v] for v in (x, ex, y, ey))
    for o, c in zip(out, x, strict=True):
        o[ia] = c
    return HierarchicalResult(codes=out, n_iter=it, free_energy=F_all.to(X.dtype),
                              history=torch.stack(history).tolist(), converged=ia.numel() == 0)
