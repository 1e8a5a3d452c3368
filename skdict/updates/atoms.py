"""Operations on the atoms of a dictionary shared by every learner (pure torch).

* :func:`init_atoms` -- the initial dictionary: data rows plus a little noise,
  Gaussian atoms where rows are missing or zero (or everywhere, ``method="gaussian"``);
* :func:`project_unit_norm` -- atoms (rows) scaled to unit L2 norm;
* :func:`update_since_used` / :func:`dead_atoms` / :func:`resample_dead_atoms` --
  the dead-atom counter and the replacement of dead atoms by badly reconstructed
  directions;
* :func:`forgetting_factor` -- the weight of the old sufficient statistics in online
  dictionary learning (Mairal et al. 2010, Sec. 3.4), the schedule of scikit-learn's
  ``MiniBatchDictionaryLearning``.

Random draws use a ``torch.Generator`` on whatever device it lives (a CPU generator
gives the same draws whatever the device of the dictionary), then move to the
dictionary's device.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "init_atoms",
    "project_unit_norm",
    "update_since_used",
    "dead_atoms",
    "resample_dead_atoms",
    "forgetting_factor",
]


def _gen_device(generator):
    return generator.device if generator is not None else torch.device("cpu")


def init_atoms(n_components, n_features, *, init=None, rows=None, method="data", noise=0.01,
               generator=None, device=None, dtype=torch.float32, name="init"):
    """Initial unit-norm dictionary of shape ``(n_components, n_features)``.

    Parameters
    ----------
    n_components, n_features : int
    init : Tensor or ndarray of shape (n_components, n_features), optional
        A given initial dictionary (e.g. an estimator's ``dict_init``), scaled to
        unit-norm atoms; ``rows`` and ``method`` are then ignored.
    rows : Tensor of shape (m, n_features), optional
        Data rows for ``method="data"`` (e.g. a random sample of the training set):
        atom ``k < m`` is row ``k`` scaled to unit norm plus Gaussian noise of
        norm about ``noise`` (so repeated rows still give distinct atoms).
    method : {"data", "gaussian"}
        ``"gaussian"``: every atom is Gaussian (``rows`` is ignored).
    noise : float
    generator : torch.Generator, optional
    device, dtype : the output's (default: CPU, float32).
    name : str
        How errors call ``init``.

    Atoms with nothing to start from (beyond the ``m`` rows, all-zero rows or
    zero atoms of ``init``) are Gaussian.

    Returns
    -------
    D : Tensor of shape (n_components, n_features)
    """
    if method not in ("data", "gaussian"):
        raise ValueError(f"method must be 'data' or 'gaussian', got {method!r}.")
    K, P = int(n_components), int(n_features)
    device = torch.device("cpu") if device is None else torch.device(device)
    D = torch.randn(K, P, generator=generator, device=_gen_device(generator),
                    dtype=dtype).to(device)
    if init is not None:
        init = torch.as_tensor(init)
        if tuple(init.shape) != (K, P):
            raise ValueError(
                f"{name} has shape {tuple(init.shape)}, expected (n_components, n_features)"
                f" = {(K, P)}."
            )
        start, jitter = init.to(device=device, dtype=dtype), 0.0
    elif method == "data" and rows is not None and rows.shape[0] > 0:
        if rows.shape[1] != P:
            raise ValueError(f"rows have {rows.shape[1]} features, expected {P}.")
        start, jitter = rows[:K].to(device=device, dtype=dtype), noise / math.sqrt(P)
    else:
        return project_unit_norm(D, inplace=True)
    m = start.shape[0]
    tiny = torch.finfo(dtype).tiny
    nrm = start.norm(dim=1, keepdim=True)
    ok = nrm > 1e-12 * nrm.max().clamp_min(tiny)
    D[:m] = torch.where(ok, start / nrm.clamp_min(tiny) + jitter * D[:m], D[:m])
    return project_unit_norm(D, inplace=True)


def project_unit_norm(D, *, inplace=False, fallback=None, eps=1e-10):
    """Scale every atom (row) of ``D`` to unit L2 norm.

    Atoms with norm below ``eps`` take the matching row of ``fallback`` when given
    (e.g. their value before an update) and are otherwise left as they are.

    Parameters
    ----------
    D : Tensor of shape (K, P)
    inplace : bool
        Modify and return ``D`` itself; otherwise ``D`` is left untouched.
    fallback : Tensor of shape (K, P), optional
    eps : float

    Returns
    -------
    Tensor of shape (K, P)
    """
    norms = D.norm(dim=1, keepdim=True)
    small = norms < eps
    scale = torch.where(small, torch.ones_like(norms), norms)
    out = D.div_(scale) if inplace else D / scale
    if fallback is not None:
        out.copy_(torch.where(small, fallback.to(out.dtype), out))
    return out


def update_since_used(since_used, used, n_rows):
    """In place: the rows seen since each atom was last used, after a batch of
    ``n_rows`` rows in which atoms ``used`` (bool mask) had a non-zero code."""
    since_used.add_(int(n_rows)).masked_fill_(used, 0)
    return since_used


def dead_atoms(since_used, window):
    """Atoms unused over the last ``window`` rows (bool mask); none if ``window``
    is 0 or None (resampling disabled)."""
    if not window:
        return torch.zeros_like(since_used, dtype=torch.bool)
    return since_used >= int(window)


def resample_dead_atoms(D, dead, residuals, *, generator=None, stats=None, since_used=None):
    """Replace the ``dead`` atoms by badly reconstructed directions, in place.

    Each replaced atom becomes one of the batch's residual rows with the largest
    norms (the worst-reconstructed rows, as in K-SVD), normalised; rows
    reconstructed exactly are never used. With more dead atoms than usable rows,
    a random subset of the dead atoms is replaced; the others wait for the next
    batch.

    Parameters
    ----------
    D : Tensor of shape (K, P)
        Dictionary, modified in place.
    dead : bool Tensor of shape (K,)
    residuals : Tensor of shape (n, P)
        ``X - codes @ D`` of the current batch.
    generator : torch.Generator, optional
    stats : object with a ``reset_atoms(indices)`` method, optional
        Sufficient statistics whose rows / columns of the replaced atoms are
        forgotten (codes of the old atom say nothing about the new one).
    since_used : LongTensor of shape (K,), optional
        Dead-atom counter, reset to 0 for the replaced atoms.

    Returns
    -------
    LongTensor
        Indices of the replaced atoms (sorted).
    """
    dead_idx = dead.nonzero(as_tuple=True)[0]
    if dead_idx.numel() == 0:
        return dead_idx
    err = (residuals.double() ** 2).sum(1)
    n_valid = int((err > 1e-24 * err.max().clamp_min(1e-300)).sum())
    m = min(dead_idx.numel(), n_valid)
    if m == 0:
        return dead_idx[:0]
    if dead_idx.numel() > m:
        pick = torch.randperm(dead_idx.numel(), generator=generator,
                              device=_gen_device(generator))[:m]
        dead_idx = dead_idx[pick.to(dead_idx.device)].sort().values
    new = residuals[err.topk(m).indices].to(D.dtype)
    D[dead_idx] = new / new.norm(dim=1, keepdim=True)
    if stats is not None:
        stats.reset_atoms(dead_idx)
    if since_used is not None:
        since_used[dead_idx] = 0
    return dead_idx


def forgetting_factor(step, batch_size, window=None):
    """Weight of the old sufficient statistics when minibatch ``step`` arrives.

    The schedule of Mairal et al. (2010), Sec. 3.4, exactly as scikit-learn's
    ``MiniBatchDictionaryLearning``: with ``b = batch_size`` (the rows of this
    batch) and ``step`` counted from 0, ``theta = (step + 1) * b`` while
    ``step < b - 1`` and ``b**2 + step + 1 - b`` after, and the statistics are
    scaled by ``beta = (theta + 1 - b) / (theta + 1)`` before the batch's
    ``a^T a / b`` is added. Early statistics, computed with a poor dictionary,
    are thus forgotten faster than by a running mean.

    ``window`` caps ``theta`` (at least ``b``): the statistics then remember about
    ``window`` rows and keep forgetting at the steady rate ``b / (window + 1)``,
    instead of an ever-growing memory.
    """
    b = max(int(batch_size), 1)
    step = int(step)
    theta = (step + 1) * b if step < b - 1 else b * b + step + 1 - b
    if window is not None:
        theta = min(theta, max(int(window), b))
    return (theta + 1 - b) / (theta + 1)
