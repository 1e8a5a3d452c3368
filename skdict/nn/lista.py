"""Learned ISTA: ISTA unrolled into ``n_layers`` layers with learned weights.

Row convention throughout (as the rest of skdict): a dictionary ``D`` has the
atoms as rows, shape ``(n_components, n_features)``; a batch ``x`` is
``(n_rows, n_features)`` and its codes ``a`` are ``(n_rows, n_components)``.
The lasso is ``0.5 ||x - a D||^2 + alpha ||a||_1`` and ISTA's step from
``a`` is ``soft(a - (a D - x) D^T / L, alpha / L)`` with ``L`` the largest
eigenvalue of ``D D^T``.

Variants (layer ``k`` maps ``a_k`` to ``a_{k+1}``, ``a_0 = 0``):

``"lista"`` (Gregor & LeCun 2010, untied)
    ``a_{k+1} = eta(x W_k + a_k S_k, theta_k)`` with per-layer ``W_k``
    ``(n_features, n_components)``, ``S_k`` ``(n_components, n_components)`` and
    per-atom thresholds ``theta_k``.
``"lista_cp"`` (Chen, Liu, Wang & Yin 2018, coupled weights)
    ``a_{k+1} = eta(a_k + (x - a_k D) W_k, theta_k)``: the dictionary enters
    every layer, only ``W_k`` and a scalar ``theta_k`` are learned.
``"alista"`` (Liu, Chen, Wang & Yin 2019)
    ``a_{k+1} = eta(a_k + gamma_k (x - a_k D) W, theta_k)`` with the analytic
    weight ``W`` of :func:`alista_weight`; only the scalars ``gamma_k`` and
    ``theta_k`` are learned.

``"lfista"`` (learned FISTA: LISTA-CP with momentum and per-row steps)
    ``z_k = a_k + beta_k (a_k - a_{k-1})``, ``a_{k+1} = eta(z_k + g_k (x - z_k D)
    W_k, g_k theta_k)`` with per-layer ``W_k``, momentum ``beta_k`` and per-atom
    thresholds ``theta_k``. ``g_k = 1 + rho_k (c_k - 1)`` is a per-row gain:
    ``c_k = L ||a_k - a_{k-1}||^2 / ||(a_k - a_{k-1}) D||^2`` is the
    Barzilai-Borwein step along the row's last move in units of ``1 / L``, kept
    in ``[1, 8]``, and the weight ``rho_k`` is learned. Initialised to FISTA
    (``W_k = D^T / L``, ``theta_k = alpha / L``, ``beta_k = (t_k - 1) / t_{k+1}``
    of Beck & Teboulle, ``rho_k = 0``), so layer ``k`` of the untrained network
    is FISTA's ``k``-th iterate. On coherent dictionaries (learned from natural
    data) momentum is what makes FISTA beat ISTA, and the coupled variants
    above start from ISTA and lose it. The gain is what a weight shared by all
    rows cannot learn: ``1 / L`` is the step of the whole dictionary's largest
    curvature, while a row's codes move on a small support whose curvature is
    lower (Ablin et al. 2019 learn steps for the support; the Barzilai-Borwein
    ratio of SpaRSA, Wright, Nowak & Figueiredo 2009, measures it per row at
    the cost of two row sums). It costs no product: ``z_k D`` is formed from the
    layers' ``a_k D``.

``eta`` is the soft threshold; with support selection (Chen et al. 2018) the
largest ``p_k`` fraction of each row's entries (by magnitude) that pass the
threshold are kept unshrunk. ``p_k`` grows linearly from 0 at the first layer to
``support_selection`` at 70 % of the depth, so the first layer never selects.

The analytic initialisation (``W_k = D^T / L``, ``S_k = I - D D^T / L``,
``theta_k = alpha / L``) makes every layer of ``"lista"`` and ``"lista_cp"``
without support selection one ISTA step: the untrained network *is* ISTA (and
the untrained ``"lfista"`` is FISTA without restart).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..penalties import soft_threshold

__all__ = ["LISTA", "VARIANTS", "alista_weight", "fista_momentum", "support_fractions",
           "lipschitz_constant"]

VARIANTS = ("lista", "lista_cp", "alista", "lfista")
# fraction of the depth over which the support-selection fraction ramps up
_SS_RAMP = 0.7
# lfista's per-row step is at most this many times FISTA's 1 / L. Untrained
# (rho = 1), a cap of 8 gave the lowest gap at 16 iterations on 8x8 patches
# (0.023 vs 0.016 at a cap of 3 and 0.045 at 16; FISTA 0.047)
_BB_MAX = 8.0


def lipschitz_constant(D):
    """Largest eigenvalue of ``D D^T`` (the squared spectral norm of ``D``), in
    float64 from the smaller of the two Gram matrices; a float."""
    D = D.detach().double()
    G = D @ D.T if D.shape[0] <= D.shape[1] else D.T @ D
    return float(torch.linalg.eigvalsh(G)[-1])


def alista_weight(D, rcond=None):
    """The analytic weight of ALISTA (Liu et al. 2019), in skdict's row convention.

    With the atoms ``d_i`` as the rows of ``D``, ``W`` (``(n_features,
    n_components)``) solves::

        min_W ||D W||_F^2   subject to   d_i . w_i = 1 for every atom i

    (``w_i`` the columns of ``W``): each column is, independently, the minimum of
    ``w^T (D^T D) w`` on the hyperplane ``d_i . w = 1``, that is
    ``w_i = M d_i / (d_i^T M d_i)`` with ``M`` the (pseudo-)inverse of
    ``D^T D``. ``rcond`` is the relative cut-off of the pseudo-inverse.

    Parameters
    ----------
    D : torch.Tensor of shape (n_components, n_features)
    rcond : float, default=None
        Singular values of ``D^T D`` below ``rcond`` times the largest are
        treated as zero; None uses ``n_features * eps`` of float64.

    Returns
    -------
    W : torch.Tensor of shape (n_features, n_components)
        In ``D``'s dtype; ``(D W)_ii = 1``.
    """
    D64 = D.detach().double()
    M = torch.linalg.pinv(D64.T @ D64, hermitian=True,
                          rtol=rcond if rcond is not None else D64.shape[1] * 2.2e-16)
    MD = M @ D64.T  # columns M d_i
    scale = (D64 * MD.T).sum(1)  # d_i^T M d_i
    if bool((scale <= 0).any()):
        raise ValueError(
            "The ALISTA weight is undefined: some atoms are zero or lie outside the "
            "range kept by the pseudo-inverse; remove zero atoms from the dictionary."
        )
    return (MD / scale).to(D.dtype)


def fista_momentum(n_layers):
    """FISTA's momentum of each layer, ``beta_k = (t_k - 1) / t_{k+1}`` with
    ``t_1 = 1``, ``t_{k+1} = (1 + sqrt(1 + 4 t_k^2)) / 2`` (Beck & Teboulle 2009);
    layer 0 starts from zero, where momentum has nothing to act on (0)."""
    t = [1.0]
    for _ in range(int(n_layers)):
        t.append(0.5 * (1.0 + math.sqrt(1.0 + 4.0 * t[-1] * t[-1])))
    return [0.0] + [(t[k - 1] - 1.0) / t[k] for k in range(1, int(n_layers))]


def support_fractions(n_layers, support_selection):
    """Support-selection fraction of each layer: 0 at the first layer, rising
    linearly to ``support_selection`` at 70 % of the depth."""
    p = float(support_selection or 0.0)
    ramp = max(1.0, _SS_RAMP * (n_layers - 1))
    return [p * min(1.0, k / ramp) for k in range(n_layers)]


def _eta(z, theta, n_keep):
    """Soft threshold; the ``n_keep`` largest entries of each row that pass it are
    kept unshrunk (support selection)."""
    out = soft_threshold(z, theta)
    if n_keep <= 0:
        return out
    idx = torch.topk(z.detach().abs(), n_keep, dim=1, sorted=False).indices
    top = torch.zeros_like(z, dtype=torch.bool).scatter_(1, idx, True)
    return torch.where(top & (z.abs() > theta), z, out)


class LISTA(nn.Module):
    """Learned ISTA (and its coupled and analytic variants) as a torch module.

    ``module(x)`` returns the codes of the last layer; ``module(x,
    all_layers=True)`` the list of every layer's codes. The weights start at the
    analytic initialisation of the module docstring (:mod:`skdict.nn.lista`),
    so that the untrained ``"lista"`` / ``"lista_cp"`` network runs ``n_layers``
    ISTA steps from zero. Train it like any module (e.g. against exact lasso
    codes from :func:`skdict.sparse_encode`), or use
    :class:`skdict.LISTAEncoder`, which does so with skdict's training loop.

    Parameters
    ----------
    dictionary : torch.Tensor or array-like of shape (n_components, n_features)
        Atoms as rows. ``"lista_cp"`` and ``"alista"`` keep it (a buffer) and use
        it in every layer.
    n_layers : int, default=16
    alpha : float, default=1.0
        L1 weight of the lasso the initialisation follows.
    variant : {"lista", "lista_cp", "alista", "lfista"}, default="lista"
    support_selection : float, default=0.0
        Largest fraction of each row's entries kept unshrunk (reached at 70 %
        of the depth); 0 disables support selection.
    dtype, device : optional
        Of the parameters; default the dictionary's (float32 for arrays of
        other dtypes).

    Attributes
    ----------
    W : torch.nn.Parameter or buffer
        ``(n_layers, n_features, n_components)`` (``"lista"``, ``"lista_cp"``,
        ``"lfista"``);
        the analytic ``(n_features, n_components)`` buffer for ``"alista"``.
    S : torch.nn.Parameter
        ``(n_layers, n_components, n_components)`` (``"lista"`` only).
    theta : torch.nn.Parameter
        Thresholds: ``(n_layers, n_components)`` for ``"lista"`` and
        ``"lfista"``, ``(n_layers,)`` otherwise.
    gamma : torch.nn.Parameter
        Step sizes ``(n_layers,)`` (``"alista"`` only).
    beta : torch.nn.Parameter
        Momentum ``(n_layers,)`` (``"lfista"`` only; ``beta[0]`` is unused).
    rho : torch.nn.Parameter
        Weight of the per-row Barzilai-Borwein step ``(n_layers,)`` (``"lfista"``
        only; ``rho[0]`` is unused).

    Examples
    --------
    >>> import torch
    >>> from skdict.nn import LISTA
    >>> D = torch.nn.functional.normalize(torch.randn(32, 16, dtype=torch.float64), dim=1)
    >>> net = LISTA(D, n_layers=4, alpha=0.1, variant="lista_cp")
    >>> codes = net(torch.randn(8, 16, dtype=torch.float64))
    >>> codes.shape
    torch.Size([8, 32])
    """

    def __init__(self, dictionary, n_layers=16, *, alpha=1.0, variant="lista",
                 support_selection=0.0, dtype=None, device=None):
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}.")
        if int(n_layers) < 1:
            raise ValueError(f"n_layers must be >= 1, got {n_layers}.")
        if not 0.0 <= float(support_selection) <= 1.0:
            raise ValueError(
                f"support_selection must be a fraction in [0, 1], got {support_selection}."
            )
        D = torch.as_tensor(dictionary)
        if D.ndim != 2:
            raise ValueError(
                f"dictionary must be 2-D (n_components, n_features), got shape {tuple(D.shape)}."
            )
        if dtype is None:
            dtype = D.dtype if D.dtype in (torch.float32, torch.float64) else torch.float32
        D = D.detach().to(device=device if device is not None else D.device, dtype=dtype)
        K, P = D.shape
        self.variant = variant
        self.n_layers = int(n_layers)
        self.alpha = float(alpha)
        self.support_selection = float(support_selection)
        self.n_components, self.n_features = int(K), int(P)
        L = lipschitz_constant(D)
        if L <= 0:
            raise ValueError("The dictionary is zero; it needs at least one non-zero atom.")
        n = self.n_layers
        self.register_buffer("D", D.clone(), persistent=False)
        self._keep = [int(round(f * K)) for f in support_fractions(n, support_selection)]
        if variant == "alista":
            W = alista_weight(D)
            self.register_buffer("W", W, persistent=False)
            # the step of ISTA in the metric of W: 1 / ||D W||_2
            g = 1.0 / max(float(torch.linalg.matrix_norm((D @ W).double(), ord=2)), 1e-300)
            self.gamma = nn.Parameter(torch.full((n,), g, dtype=dtype, device=D.device))
            self.theta = nn.Parameter(torch.full((n,), self.alpha * g, dtype=dtype,
                                                 device=D.device))
            return
        W = (D.T / L).expand(n, P, K).clone()
        self.W = nn.Parameter(W)
        if variant == "lfista":
            self.beta = nn.Parameter(torch.tensor(fista_momentum(n), dtype=dtype,
                                                  device=D.device))
            # weight of each row's Barzilai-Borwein step; 0 is FISTA's 1 / L
            self.rho = nn.Parameter(torch.zeros(n, dtype=dtype, device=D.device))
            self._lip = L
        if variant in ("lista", "lfista"):
            self.theta = nn.Parameter(torch.full((n, K), self.alpha / L, dtype=dtype,
                                                 device=D.device))
        if variant == "lista":
            eye = torch.eye(K, dtype=dtype, device=D.device)
            self.S = nn.Parameter((eye - D @ D.T / L).expand(n, K, K).clone())
        elif variant == "lista_cp":
            self.theta = nn.Parameter(torch.full((n,), self.alpha / L, dtype=dtype,
                                                 device=D.device))

    def extra_repr(self):
        return (f"n_components={self.n_components}, n_features={self.n_features}, "
                f"n_layers={self.n_layers}, variant={self.variant!r}, "
                f"support_selection={self.support_selection:g}")

    def forward(self, x, all_layers=False):
        """Codes of ``x`` (``(n_rows, n_features)``): the last layer's, or the list
        of every layer's when ``all_layers``."""
        outs = []
        theta = self.theta.clamp_min(0)
        if self.variant == "lista":
            b, n, K = x.shape[0], self.n_layers, self.n_components
            # every layer's input term in one product
            xw = (x @ self.W.permute(1, 0, 2).reshape(self.n_features, n * K)).view(b, n, K)
            a = _eta(xw[:, 0], theta[0], self._keep[0])
            outs.append(a)
            for k in range(1, n):
                a = _eta(torch.addmm(xw[:, k], a, self.S[k]), theta[k], self._keep[k])
                outs.append(a)
        elif self.variant == "lfista":
            D = self.D
            a = _eta(x @ self.W[0], theta[0], self._keep[0])
            prev = prev_d = x.new_zeros(())  # a_0 = 0
            a_d = a @ D
            outs.append(a)
            for k in range(1, self.n_layers):
                b = self.beta[k]
                z = a + b * (a - prev)
                # z D from the layers' own products: one product with D a layer
                zd = a_d + b * (a_d - prev_d)
                g = self._bb_gain(k, a - prev, a_d - prev_d)
                v = z + g * ((x - zd) @ self.W[k])
                prev, prev_d = a, a_d
                a = _eta(v, g * theta[k], self._keep[k])
                a_d = a @ D
                outs.append(a)
        else:
            D = self.D
            a = None
            for k in range(self.n_layers):
                W = self.W[k] if self.variant == "lista_cp" else self.W
                r = x if a is None else x - a @ D
                step = r @ W
                if self.variant == "alista":
                    step = self.gamma[k] * step
                z = step if a is None else a + step
                a = _eta(z, theta[k], self._keep[k])
                outs.append(a)
        return outs if all_layers else outs[-1]

    def _bb_gain(self, k, da, da_d):
        """Per-row factor on layer ``k``'s step and threshold: ``1 + rho_k (c -
        1)`` with ``c`` the Barzilai-Borwein step ``||da||^2 / ||da D||^2`` of the
        last move ``da``, in units of ``1 / L`` and kept in ``[1, _BB_MAX]``
        (1 for a row that did not move)."""
        num = self._lip * (da * da).sum(1, keepdim=True)
        # the cap as a floor on the denominator: the ratio never overflows, so
        # no inf meets a zero gradient in the backward pass
        den = torch.maximum((da_d * da_d).sum(1, keepdim=True), num / _BB_MAX)
        c = (num / den.clamp_min(torch.finfo(da.dtype).tiny)).clamp_min(1.0)
        return 1.0 + self.rho[k] * (c - 1.0)

    def objective(self, x, a):
        """Per-row lasso objective ``0.5 ||x - a D||^2 + alpha ||a||_1``."""
        r = x - a @ self.D
        return 0.5 * (r * r).sum(1) + self.alpha * a.abs().sum(1)

    @property
    def lipschitz(self):
        """Largest eigenvalue of ``D D^T``."""
        return lipschitz_constant(self.D)

