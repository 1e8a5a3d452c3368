"""Convolutional basis pursuit denoising (CBPDN) by ADMM in the DFT domain.

The splitting ``min 0.5 ||D x - s||^2 + alpha ||y||_1  s.t.  x = y`` with the
scaled dual ``u`` (Boyd et al. 2011), the x-update solved per frequency
(Wohlberg 2016, "Efficient algorithms for convolutional sparse
representations"), over-relaxation and residual balancing of ``rho``. This
is :func:`skdict.solvers.admm` specialised to a circular
:class:`~skdict.operators.ConvOperator`, written to make as few passes over
memory per iteration as possible, since at image sizes every pass costs:

* the x-update needs only the DFT of ``z = y - u``: with ``r = s - D z``
  (per frequency; ``D D^H = P``, a scalar for one channel),
  ``x = z + D^H (P + rho I)^{-1} r``, the Sherman-Morrison solve as one
  reduction over the filters and one multiply-add, in place on the spectrum;
* the state is ``v = u + y`` rather than ``u``, so that the relaxation, the
  dual update and the input of the next transform are four fused passes
  (``v += relax (x - y)`` in two, the soft threshold ``y = S(v)`` in one,
  ``v - 2 y = -(y - u)`` in one), with the sign and the ``1 / (H W)`` of the
  unnormalised transforms folded into their scalar weights;
* one forward and one inverse real FFT per iteration on fixed buffers
  (:class:`~skdict.operators._fft.RealFFT2`: FFTW when pyFFTW is installed).

Float64 input runs float32 iterations first (``mixed``): down to residuals of
1e-3 the rounding of float32 is irrelevant and its iterations cost about half.

Each row (image) stops when its scaled primal and dual residuals
``||x - y|| / max(||x||, ||y||)`` and ``||y_k - y_{k-1}|| / ||u||`` are both
below ``tol`` (Wohlberg's relative stopping rule, sporco's ``RelStopTol``),
checked every ``check_every`` iterations, where ``rho`` is also rebalanced.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from ..operators._fft import RealFFT2
from ._kernels import cbpdn as _k

__all__ = ["CBPDNResult", "cbpdn", "default_rho", "default_rsdl_target"]


@dataclass
class CBPDNResult:
    """What :func:`cbpdn` returns.

    Attributes
    ----------
    codes : Tensor (n, K)
        The sparse split variable ``y`` (flat maps).
    n_iter : int
        Iterations run (by the slowest row).
    history : list of float
        The largest scaled residual of the batch at each check.
    converged : bool
        Every row met ``tol``.
    rho : Tensor (n,)
        Each row's final penalty.
    dual : Tensor (n, K) or None
        The scaled dual ``u`` at ``rho`` (with ``return_dual=True``): with
        ``codes`` and ``rho`` it warm-starts a later call.
    n_iters : Tensor (n,)
        Iterations each row ran.
    """

    codes: torch.Tensor
    n_iter: int
    history: list = field(default_factory=list)
    converged: bool = False
    rho: torch.Tensor | None = None
    dual: torch.Tensor | None = None
    n_iters: torch.Tensor | None = None


def default_rho(alpha):
    """The initial penalty ``50 alpha + 1`` (as sporco's ``ConvBPDN`` for
    images in [0, 1])."""
    return 50.0 * float(alpha) + 1.0


def default_rsdl_target(alpha):
    """The residual ratio ``r / s`` balancing aims at: ``1 + 18.3 **
    (log10(alpha) + 1)`` (Wohlberg 2015, "ADMM penalty parameter selection by
    residual balancing", his fit for CBPDN on images in [0, 1]); on the coding
    benchmark it saves ~15% of the iterations over a target of 1."""
    if alpha <= 0:
        return 1.0
    return min(2.0, 1.0 + 18.3 ** (math.log10(float(alpha)) + 1.0))


def _rowsq(t):
    """Per-row squared norm (one pass, no temporary)."""
    return torch.linalg.vector_norm(t.reshape(t.shape[0], -1), dim=1).double() ** 2


def cbpdn(op, X, alpha, *, rho=None, Y0=None, U0=None, positive=False, max_iter=500,
          tol=1e-3, relax=1.8, check_every=10, balance=True, rsdl_target=None,
          rsdl_ratio=1.2, return_dual=False, backend="auto", kernels="auto",
          callback=None, mixed=True, switch_tol=1e-3):
    """ADMM for ``min_z 0.5 ||sum_m d_m * z_m - x||^2 + alpha ||z||_1`` per image.

    Parameters
    ----------
    op : ConvOperator
        A circular convolutional operator (the x-update is exact per frequency).
    X : Tensor (n, n_features)
        Flat images on ``op``'s device and dtype.
    alpha : float
    rho : float or Tensor (n,), optional
        Initial penalty per row; default :func:`default_rho`.
    Y0, U0 : Tensor (n, K), optional
        Warm start: the split variable and the scaled dual (at ``rho``), as
        returned in ``codes`` / ``dual``. Missing ones start at zero.
    positive : bool
        Non-negative codes.
    max_iter : int
    tol : float
        Each row stops once both scaled residuals are below ``tol``; 0 runs
        ``max_iter`` iterations.
    relax : float, default=1.8
        Over-relaxation ``x_r = relax x + (1 - relax) y``.
    check_every : int, default=10
        Iterations between residual evaluations (each costs about two
        iterations' worth of passes over the real arrays, no transform).
    balance : bool, default=True
        At each check, scale a row's ``rho`` by ``sqrt(r / (s * rsdl_target))``
        (capped to [0.1, 10]) when its residual ratio ``r / s`` is off
        ``rsdl_target`` by more than ``rsdl_ratio`` (the dual is rescaled
        with it).
    rsdl_target : float, optional
        Default :func:`default_rsdl_target`.
    rsdl_ratio : float, default=1.2
    return_dual : bool, default=False
        Also return the scaled dual (one more array).
    backend : {"auto", "fftw", "torch"}
        FFT backend (:class:`~skdict.operators._fft.RealFFT2`).
    kernels : {"auto", "numba", "torch"}
        The elementwise steps: fused numba kernels
        (:mod:`skdict.solvers._kernels.cbpdn`; "auto": on the CPU) or torch ops.
    callback : callable, optional
        Called at every check as ``callback(it, rows, Y)``: the iteration, the
        original indices of the rows still running and their maps ``Y``
        ``(rows, M, Hm, Wm)`` (read only).
    mixed : bool, default=True
        float64 input: iterate in float32 until both scaled residuals are
        below ``max(tol, switch_tol)``, then, if ``tol < switch_tol``, go on in
        float64 from there (warm start) to ``tol``. At residuals of 1e-3 the
        rounding of float32 (1e-7) does not matter, and its iterations cost
        about half. False: float64 throughout (e.g. to warm-start a tight
        solve from a solution already near ``tol``).
    switch_tol : float, default=1e-3

    Returns
    -------
    CBPDNResult
    """
    if op.boundary != "circular":
        raise ValueError("cbpdn needs a circular operator; use skdict.solvers.admm")
    kw = dict(positive=positive, relax=relax, check_every=check_every, balance=balance,
              rsdl_target=rsdl_target, rsdl_ratio=rsdl_ratio, backend=backend,
              kernels=kernels)
    if mixed and X.dtype == torch.float64 and max_iter > 0:
        return _mixed(op, X, alpha, rho, Y0, U0, max_iter, tol, switch_tol, return_dual,
                      callback, kw)
    n = X.shape[0]
    dtype, device = X.dtype, X.device
    M, Cn = op.n_filters, op.n_channels
    Hm, Wm = op.map_shape
    K = op.n_atoms
    codes = torch.zeros((n, K), dtype=dtype, device=device)
    rho_out = torch.empty(n, dtype=dtype, device=device)
    iters = torch.zeros(n, dtype=torch.long, device=device)
    dual = torch.zeros((n, K), dtype=dtype, device=device) if return_dual else None
    if rho is None:
        rho = default_rho(alpha)
    if rsdl_target is None:
        rsdl_target = default_rsdl_target(alpha)
    r = torch.as_tensor(rho, dtype=torch.float64, device=device).reshape(-1).expand(n).clone()
    if n == 0:
        return CBPDNResult(codes, 0, [], True, rho_out, dual, iters)

    Dh = op.Dhat.detach()  # (M, C, Hm, Wf)
    Dhc = Dh.conj().resolve_conj()
    shat = torch.fft.rfft2(op.images(X))  # (n, C, Hm, Wf)
    P = op.gram_hat()
    scale = -float(Hm * Wm)  # the real buffer holds scale * x after the inverse

    ia = torch.arange(n, device=device)
    fft = RealFFT2((n, M, Hm, Wm), dtype, device, backend)
    Y = torch.zeros((n, M, Hm, Wm), dtype=dtype, device=device)
    if Y0 is not None:
        Y.copy_(Y0.reshape(n, M, Hm, Wm))
    V = Y.clone()
    if U0 is not None:
        V.add_(U0.reshape(n, M, Hm, Wm))
    a = fft.real
    torch.sub(V, Y, alpha=2, out=a)  # -(y - u)
    fused = _use_kernels(kernels, device)
    if fused:
        Dh1 = Dh.reshape(M, -1).numpy() if Cn == 1 else None
        _set_threads()

    def factors(r):
        """Per-row solve factors and thresholds for penalties ``r``."""
        rr = r.to(dtype)
        if Cn == 1:
            inv = (rr.reshape(-1, 1, 1) + P).reciprocal_().contiguous()  # (n, Hm, Wf)
        else:
            eye = torch.eye(Cn, dtype=P.dtype, device=device)
            inv = torch.linalg.inv(P + rr.reshape(-1, 1, 1, 1, 1) * eye)  # (n, Hm, Wf, C, C)
        return inv, (float(alpha) / r).tolist()

    inv, thr = factors(r)

    def finish(fin, it):
        idx = ia[fin]
        codes[idx] = Y[fin].reshape(-1, K)
        rho_out[idx] = r[fin].to(dtype)
        iters[idx] = it
        if dual is not None:
            dual[idx] = (V[fin] - Y[fin]).reshape(-1, K)

    conv = torch.zeros(n, dtype=torch.bool, device=device)
    history = []
    stats = torch.empty((n, 5), dtype=torch.float64)
    it = 0
    for it in range(1, max_iter + 1):
        nb = Y.shape[0]
        fft.forward()  # spec = -DFT(y - u)
        if fused and Cn == 1:
            _k.freq_step(fft.spec.numpy().reshape(nb, M, -1), Dh1,
                         shat.numpy().reshape(nb, -1), inv.numpy().reshape(nb, -1))
        else:
            _freq_step_torch(fft.spec, Dh, Dhc, shat, inv)
        fft.backward()  # a = scale * x
        check = bool(tol > 0 or balance) and (it % check_every == 0 or it == max_iter)
        # v += relax (x - y); y = S(v); a = v - 2 y = -(y - u)
        if fused:
            args = (a.numpy().reshape(nb, -1), Y.numpy().reshape(nb, -1),
                    V.numpy().reshape(nb, -1), np.asarray(thr, dtype=np.float64),
                    relax / scale, -relax, bool(positive))
            if check:
                _k.real_step_stats(*args, 1.0 / scale, stats.numpy()[:nb])
            else:
                _k.real_step(*args)
        else:
            _real_step_torch(a, Y, V, thr, relax, scale, positive,
                             stats[:nb] if check else None)
        if not check:
            continue
        xn2, yn2, rp2, sd2, un2 = stats[:nb].to(device).unbind(1)
        tiny = 1e-300
        rs = (rp2 / torch.maximum(xn2, yn2).clamp_min(tiny)).sqrt()
        ss = (sd2 / un2.clamp_min(tiny)).sqrt()
        worst = torch.maximum(rs, ss)
        history.append(float(worst.max()))
        if callback is not None:
            callback(it, ia, Y)
        done = (worst < tol) if tol > 0 else torch.zeros(nb, dtype=torch.bool, device=device)
        if balance and it < max_iter:
            ratio = rs / (ss * rsdl_target).clamp_min(tiny)
            f = torch.where((ratio > rsdl_ratio) | (ratio < 1 / rsdl_ratio),
                            ratio.sqrt().clamp(0.1, 10.0), torch.ones_like(ratio))
            f = torch.where(torch.isfinite(f) & (ss > 0) & ~done, f, torch.ones_like(f))
            if bool((f != 1).any()):
                for i in torch.nonzero(f != 1).flatten().tolist():
                    fi = float(f[i])
                    # u -> u / f at rho -> rho f:  v = (v - y) / f + y
                    V[i].sub_(Y[i]).div_(fi).add_(Y[i])
                    torch.sub(V[i], Y[i], alpha=2, out=a[i])
                r = r * f
                inv, thr = factors(r)
        if bool(done.any()):
            finish(done, it)
            conv[ia[done]] = True
            keep = ~done
            if not bool(keep.any()):
                ia = ia[keep]
                break
            # carry on with the remaining rows only (fresh buffers of their size)
            ia, Y, V = ia[keep], Y[keep], V[keep]
            shat, r = shat[keep].contiguous(), r[keep]
            a_keep = a[keep]
            fft = RealFFT2(tuple(Y.shape), dtype, device, backend)
            a = fft.real
            a.copy_(a_keep)
            del a_keep
            inv, thr = factors(r)
    if ia.numel():  # rows that ran out of iterations
        finish(torch.ones(ia.numel(), dtype=torch.bool, device=device), it)
    return CBPDNResult(codes, it, history, bool(conv.all()), rho_out, dual, iters)



def _use_kernels(kernels, device):
    if kernels not in ("auto", "numba", "torch"):
        raise ValueError(f"kernels must be 'auto', 'numba' or 'torch', got {kernels!r}")
    if kernels == "torch":
        return False
    if torch.device(device).type != "cpu":
        if kernels == "numba":
            raise ValueError("the numba kernels run on CPU tensors only")
        return False
    return True


def _set_threads():
    """numba's parallel kernels use as many threads as torch."""
    import numba

    numba.set_num_threads(max(1, min(torch.get_num_threads(),
                                     numba.config.NUMBA_NUM_THREADS)))


def _freq_step_torch(Wt, Dh, Dhc, shat, inv):
    """Torch reference of :func:`~skdict.solvers._kernels.cbpdn.freq_step`, any
    number of channels: ``Wt <- Wt - D^H (P + rho I)^{-1} (s + D Wt)``."""
    Cn = Dh.shape[1]
    g = shat.clone()  # s - D z, with Wt = -DFT(z)
    for c in range(Cn):
        g[:, c].add_((Wt * Dh[:, c]).sum(1))
    if Cn == 1:
        g[:, 0].mul_(inv)
    else:
        g = (inv @ g.permute(0, 2, 3, 1).unsqueeze(-1)).squeeze(-1).permute(0, 3, 1, 2)
    for c in range(Cn):
        Wt.addcmul_(g[:, c:c + 1], Dhc[:, c], value=-1)


def _real_step_torch(a, Y, V, thr, relax, scale, positive, stats):
    """Torch reference of :func:`~skdict.solvers._kernels.cbpdn.real_step`
    (``stats``: None, or ``(n, 5)`` float64 filled as ``real_step_stats``)."""
    if stats is not None:
        X = a / scale
        stats[:, 0] = _rowsq(X).cpu()
        stats[:, 1] = _rowsq(Y).cpu()
        stats[:, 2] = _rowsq(X - Y).cpu()
        Yold = Y.clone()
    V.add_(a, alpha=relax / scale).add_(Y, alpha=-relax)
    for i in range(Y.shape[0]):
        if positive:
            torch.sub(V[i], thr[i], out=Y[i]).clamp_min_(0)
        else:
            torch.ops.aten.softshrink.out(V[i], thr[i], out=Y[i])
    torch.sub(V, Y, alpha=2, out=a)
    if stats is not None:
        stats[:, 3] = _rowsq(Y - Yold).cpu()
        stats[:, 4] = _rowsq(V - Y).cpu()


def _mixed(op, X, alpha, rho, Y0, U0, max_iter, tol, switch_tol, return_dual, callback, kw):
    """:func:`cbpdn` in float32 to ``max(tol, switch_tol)``, then float64."""
    from ..operators.conv import ConvOperator

    op32 = ConvOperator(op.filters.detach().float(), op.image_shape, op.boundary)

    def f32(t):
        return None if t is None else t.float()

    first = cbpdn(op32, X.float(), alpha, rho=rho, Y0=f32(Y0), U0=f32(U0), max_iter=max_iter,
                  tol=max(tol, switch_tol), return_dual=True, callback=callback, mixed=False,
                  **kw)
    left = max_iter - first.n_iter
    if left <= 0 or tol >= switch_tol:  # done: float32 met tol (or ran out)
        dual = first.dual.double() if return_dual else None
        return CBPDNResult(first.codes.double(), first.n_iter, first.history,
                           first.converged, first.rho.double(), dual, first.n_iters)
    off = first.n_iter
    cb = None if callback is None else (lambda it, rows, Y: callback(it + off, rows, Y))
    second = cbpdn(op, X, alpha, rho=first.rho.double(), Y0=first.codes.double(),
                   U0=first.dual.double(), max_iter=left, tol=tol, return_dual=return_dual,
                   callback=cb, mixed=False, **kw)
    return CBPDNResult(second.codes, off + second.n_iter, first.history + second.history,
                       second.converged, second.rho, second.dual, first.n_iters + second.n_iters)
