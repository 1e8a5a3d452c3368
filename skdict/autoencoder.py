"""Top-k sparse autoencoders: :class:`KSparseAutoencoder`.

The model is ``z = TopK(ReLU(W_enc (x - b_dec) + b_enc))``,
``x_hat = z W_dec + b_dec`` with unit-norm decoder rows (Makhzani & Frey 2013;
Gao et al. 2024). A training step does one dense matrix product (the encoder
pre-activations); the selection, the decoder forward and backward and the
encoder weight gradient are sparse in the selected latents
(:mod:`skdict.solvers.topk`).
"""

from __future__ import annotations

import copy
import json
import math
import numbers
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch
from sklearn.base import BaseEstimator, _fit_context
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.validation import check_is_fitted

from ._backend import make_generator, numpy_dtype, torch_dtype
from .base import _DEVICE_CONSTRAINT, SparseCodingMixin, _shape_error, check_input
from .losses import AdaptiveSparsityScheduler, sparsity_loss
from .solvers.topk import (
    select_batch_topk,
    select_lifetime,
    select_topk,
    sparse_decode_pairs,
    sparse_encode,
)

__all__ = ["KSparseAutoencoder"]

_SPARSITY = ("topk", "batchtopk", "l1", "kl", "wta", "lifetime")
_SELECTING = ("topk", "batchtopk", "wta", "lifetime")
_AUTOCAST = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def _is_batch_iterable(X):
    """True when ``X`` is an iterable of 2-D batches rather than one array-like."""
    if isinstance(X, (np.ndarray, torch.Tensor, str, bytes)) or sp.issparse(X):
        return False
    if hasattr(X, "__array__") or hasattr(X, "shape"):
        return False
    if isinstance(X, (list, tuple)):
        return len(X) > 0 and all(getattr(b, "ndim", None) == 2 for b in X)
    return hasattr(X, "__iter__")


def _to_tensor(arr, device, tdtype):
    """numpy block -> tensor on ``device`` (copying read-only blocks first)."""
    arr = np.ascontiguousarray(arr)
    if not arr.flags.writeable:
        arr = arr.copy()
    return torch.from_numpy(arr).to(device=device, dtype=tdtype)


def _geometric_median(X, n_iter=50, eps=1e-8):
    """Weiszfeld iterations for the geometric median of the rows of ``X``."""
    y = X.mean(0)
    for _ in range(n_iter):
        d = torch.linalg.vector_norm(X - y, dim=1).clamp_min(eps)
        w = 1.0 / d
        y_new = (w[:, None] * X).sum(0) / w.sum()
        if float(torch.linalg.vector_norm(y_new - y)) < eps * (1 + float(y.norm())):
            y = y_new
            break
        y = y_new
    return y


class KSparseAutoencoder(SparseCodingMixin, BaseEstimator):
    """Top-k sparse autoencoder with a scikit-learn API and sparse kernels.

    ``z = TopK(ReLU(W_enc (x - b_dec) + b_enc))`` and
    ``x_hat = z W_dec + b_dec``, trained with Adam on the fraction of variance
    unexplained of each batch. Decoder rows (``components_``) are kept at unit
    norm: the gradient component parallel to each row is removed before a step
    and the rows are renormalised after it. ``W_enc`` starts as ``W_dec.T``
    and ``b_dec`` at the data mean (or geometric median).

    Only the encoder pre-activation ``(x - b_dec) @ W_enc.T`` is a dense matrix
    product; the top-k selection feeds an embedding-bag decoder, and the
    backward pass (decoder gradient, gradient of the selected
    pre-activations, encoder weight gradient) touches only the ``k`` active
    latents of each row.

    Parameters
    ----------
    n_components : int, default=256
        Number of latents (dictionary size ``d_sae``).
    k : int, default=32
        Active latents per row (``"topk"``), on average per row (``"batchtopk"``,
        ``"wta"``/``"lifetime"``). Must not exceed ``n_components``.
    sparsity : {"topk", "batchtopk", "l1", "kl", "wta", "lifetime"}, default="topk"
        ``"topk"``: the ``k`` largest pre-activations of each row.
        ``"batchtopk"``: the ``k * B`` largest of the batch in training, a
        learned global threshold (EMA of the smallest selected activation) at
        inference, so rows may have more or fewer than ``k`` latents.
        ``"l1"``: ReLU codes with an L1 penalty ``alpha * sum_j z_j ||W_dec_j||``.
        ``"kl"``: ReLU codes with ``alpha`` times the KL divergence between the
        target ``rho`` and each latent's mean ``tanh(z)`` over the batch (Ng's
        sparse autoencoder). ``"wta"`` / ``"lifetime"``: winner-take-all
        lifetime sparsity, each latent keeps its top ``k / n_components``
        fraction of the batch (Makhzani & Frey 2015); inference keeps the top
        ``k`` of each row. ``"l1"`` / ``"kl"`` codes are not capped at ``k``.
    alpha : float, default=1e-3
        Weight of the ``"l1"`` and ``"kl"`` penalties.
    rho : float, default=0.05
        Target mean activation of the ``"kl"`` penalty, in ``(0, 1)``.
    k_aux : int, default=None
        Latents of the AuxK loss; None means ``n_features // 2`` (at least 1).
    aux_coef : float, default=1/32
        Weight of the AuxK loss (Gao et al. 2024): latents that have not fired
        for ``dead_window`` tokens reconstruct the residual with their top
        ``k_aux`` pre-activations; the loss is that reconstruction's FVU.
    dead_window : int, default=10_000_000
        A latent is dead when it has not fired on the last ``dead_window``
        training rows (tokens).
    k_schedule : AdaptiveSparsityScheduler, default=None
        Anneals ``k`` during training (e.g. from ``4 * k`` down to ``k``);
        transform always uses ``k``. The scheduler is copied at fit.
    lr : float, default=None
        Learning rate; None means ``2e-4 / sqrt(n_components / 2**14)`` (Gao et
        al.'s scaling).
    batch_size : int, default=4096
        Rows per training step and per transform batch.
    n_steps : int, default=None
        Training steps of ``fit`` (cycling over the data); None means
        ``max_epochs`` passes.
    max_epochs : int, default=10
        Passes over the data when ``n_steps`` is None.
    optimizer : {"adam", "sgd"}, default="adam"
    normalize_input : bool, default=True
        Divide inputs by a scalar so that the training rows have mean squared
        norm ``n_features`` (estimated once, stored as ``input_scale_``);
        ``inverse_transform`` undoes it.
    b_dec_init : {"mean", "geometric_median", "zeros"}, default="mean"
        Initial decoder bias, from (up to) the first 65536 training rows.
    dtype : {"float32", "float64"}, default=None
        Training dtype; None means the dtype of the input.
    autocast : {"bfloat16", "float16"}, default=None
        Run the encoder matrix product in this reduced precision.
    random_state : int, RandomState instance or None, default=None
    device : str or torch.device, default="auto"
    verbose : int, default=0
        Show a progress bar over the training steps.
    sparse_output : bool, default=True
        ``transform`` returns scipy CSR (otherwise a dense array).

    Attributes
    ----------
    components_ : ndarray of shape (n_components, n_features)
        Decoder rows ``W_dec`` (unit norm), in normalised input units.
    encoder_weight_ : ndarray of shape (n_components, n_features)
    encoder_bias_ : ndarray of shape (n_components,)
    decoder_bias_ : ndarray of shape (n_features,)
    input_scale_ : float
        Scalar the inputs are divided by.
    threshold_ : float
        Inference threshold of ``"batchtopk"`` (0 otherwise).
    tokens_since_fired_ : ndarray of shape (n_components,)
    dead_fraction_ : float
        Fraction of latents dead (not fired for ``dead_window`` tokens).
    history_ : dict of str to ndarray
        Per training step: ``"loss"``, ``"fvu"`` (of the batch), ``"l0"``,
        ``"dead_fraction"``, ``"aux_loss"`` and ``"k"``.
    n_steps_ : int
        Training steps taken over all calls.
    n_iter_ : int
        Passes over the data of the last ``fit`` (steps of the last
        ``partial_fit``).
    n_features_in_ : int

    Examples
    --------
    >>> import numpy as np
    >>> from skdict import KSparseAutoencoder
    >>> X = np.random.default_rng(0).normal(size=(512, 16)).astype(np.float32)
    >>> sae = KSparseAutoencoder(n_components=32, k=4, n_steps=50, batch_size=128,
    ...                          random_state=0, device="cpu").fit(X)
    >>> codes = sae.transform(X)
    >>> codes.shape, int(codes.getnnz(axis=1).max()) <= 4
    ((512, 32), True)
    >>> 0 < sae.score(X) < 1
    True
    """

    _parameter_constraints: dict = {
        "n_components": [Interval(numbers.Integral, 1, None, closed="left")],
        "k": [Interval(numbers.Integral, 1, None, closed="left")],
        "sparsity": [StrOptions(set(_SPARSITY))],
        "alpha": [Interval(numbers.Real, 0, None, closed="left")],
        "rho": [Interval(numbers.Real, 0, 1, closed="neither")],
        "k_aux": [Interval(numbers.Integral, 1, None, closed="left"), None],
        "aux_coef": [Interval(numbers.Real, 0, None, closed="left")],
        "dead_window": [Interval(numbers.Integral, 1, None, closed="left")],
        "k_schedule": [AdaptiveSparsityScheduler, None],
        "lr": [Interval(numbers.Real, 0, None, closed="neither"), None],
        "batch_size": [Interval(numbers.Integral, 1, None, closed="left")],
        "n_steps": [Interval(numbers.Integral, 1, None, closed="left"), None],
        "max_epochs": [Interval(numbers.Integral, 1, None, closed="left")],
        "optimizer": [StrOptions({"adam", "sgd"})],
        "normalize_input": ["boolean"],
        "b_dec_init": [StrOptions({"mean", "geometric_median", "zeros"})],
        "dtype": [StrOptions({"float32", "float64"}), None],
        "autocast": [StrOptions(set(_AUTOCAST)), None],
        "random_state": ["random_state"],
        "device": _DEVICE_CONSTRAINT,
        "verbose": ["verbose"],
        "sparse_output": ["boolean"],
    }

    def __init__(
        self,
        n_components=256,
        *,
        k=32,
        sparsity="topk",
        alpha=1e-3,
        rho=0.05,
        k_aux=None,
        aux_coef=1 / 32,
        dead_window=10_000_000,
        k_schedule=None,
        lr=None,
        batch_size=4096,
        n_steps=None,
        max_epochs=10,
        optimizer="adam",
        normalize_input=True,
        b_dec_init="mean",
        dtype=None,
        autocast=None,
        random_state=None,
        device="auto",
        verbose=0,
        sparse_output=True,
    ):
        self.n_components = n_components
        self.k = k
        self.sparsity = sparsity
        self.alpha = alpha
        self.rho = rho
        self.k_aux = k_aux
        self.aux_coef = aux_coef
        self.dead_window = dead_window
        self.k_schedule = k_schedule
        self.lr = lr
        self.batch_size = batch_size
        self.n_steps = n_steps
        self.max_epochs = max_epochs
        self.optimizer = optimizer
        self.normalize_input = normalize_input
        self.b_dec_init = b_dec_init
        self.dtype = dtype
        self.autocast = autocast
        self.random_state = random_state
        self.device = device
        self.verbose = verbose
        self.sparse_output = sparse_output

    # ------------------------------------------------------------------ checks
    def _check_params(self):
        if self.k > self.n_components:
            raise ValueError(
                f"k={self.k} exceeds n_components={self.n_components}; choose "
                "k <= n_components."
            )

    def _lr(self):
        if self.lr is not None:
            return float(self.lr)
        return 2e-4 / math.sqrt(self.n_components / 2**14)

    # ------------------------------------------------------------------ data
    def _validate(self, X, reset):
        """Return ``(kind, X, dtype)``: kind in {"array", "memmap", "iterable"}."""
        if _is_batch_iterable(X):
            return "iterable", X, None
        if isinstance(X, np.memmap):
            # larger than memory: validate shape and dtype here, finiteness per batch
            if X.ndim != 2:
                raise _shape_error(X.ndim, X.shape, type(self).__name__)
            if X.shape[0] < 1 or X.shape[1] < 1:
                raise ValueError(
                    f"Found array with shape {X.shape}; {type(self).__name__} needs "
                    "at least 1 sample and 1 feature."
                )
            if reset:
                self.n_features_in_ = X.shape[1]
            elif X.shape[1] != self.n_features_in_:
                raise ValueError(
                    f"X has {X.shape[1]} features, but {type(self).__name__} is "
                    f"expecting {self.n_features_in_} features as input."
                )
            dtype = X.dtype if X.dtype in (np.float32, np.float64) else np.dtype(np.float64)
            return "memmap", X, np.dtype(dtype)
        X, dtype = check_input(self, X, reset=reset)
        return "array", X, np.dtype(dtype)

    def _rows(self, X, idx, device, tdtype):
        """Rows ``idx`` (sorted numpy or torch indices) of ``X`` as a tensor."""
        if isinstance(X, torch.Tensor):
            return X[idx].to(device=device, dtype=tdtype)
        if sp.issparse(X):
            blk = X[np.asarray(idx)].toarray()
        else:
            blk = np.asarray(X[np.asarray(idx)])
        return _to_tensor(blk, device, tdtype)

    def _array_batches(self, kind, X, n_steps, bs, device, tdtype, np_rng, gen):
        """Yield training batches from an array, memmap, sparse matrix or tensor."""
        n = X.shape[0]
        bs = min(bs, n)
        n_per_epoch = -(-n // bs)
        produced = 0
        while produced < n_steps:
            if kind == "memmap":
                # contiguous chunks in shuffled order, rows shuffled within each
                for c in np_rng.permutation(n_per_epoch):
                    if produced >= n_steps:
                        break
                    blk = np.asarray(X[c * bs : min(n, (c + 1) * bs)])
                    if not np.all(np.isfinite(blk)):
                        raise ValueError(
                            "Input X contains NaN or infinity. Remove or impute "
                            f"non-finite values before calling {type(self).__name__}."
                        )
                    Xb = _to_tensor(blk, device, tdtype)
                    yield Xb[torch.randperm(Xb.shape[0], generator=gen, device=device)]
                    produced += 1
            elif isinstance(X, torch.Tensor):
                perm = torch.randperm(n, generator=gen, device=device).to(X.device)
                for s in range(0, n, bs):
                    if produced >= n_steps:
                        break
                    yield X[perm[s : s + bs]].to(device=device, dtype=tdtype)
                    produced += 1
            else:
                perm = np_rng.permutation(n)
                for s in range(0, n, bs):
                    if produced >= n_steps:
                        break
                    yield self._rows(X, np.sort(perm[s : s + bs]), device, tdtype)
                    produced += 1

    def _iterable_batches(
        self, X, first_reset, n_steps, bs, device, tdtype_fn, single_pass=False
    ):
        """Yield validated batches from an iterable of 2-D batches."""
        produced = 0
        reset = first_reset
        epochs = 1 if single_pass else (self.max_epochs if self.n_steps is None else None)
        reiterable = iter(X) is not X
        epoch = 0
        while True:
            any_batch = False
            for batch in X:
                Xb, dtype = check_input(self, batch, reset=reset)
                reset = False
                any_batch = True
                if sp.issparse(Xb):
                    Xb = Xb.toarray()
                tdtype = tdtype_fn(dtype)
                if isinstance(Xb, torch.Tensor):
                    Xb = Xb.to(device=device, dtype=tdtype)
                else:
                    Xb = _to_tensor(Xb, device, tdtype)
                for s in range(0, Xb.shape[0], bs):
                    if n_steps is not None and produced >= n_steps:
                        return
                    yield Xb[s : s + bs]
                    produced += 1
            epoch += 1
            if not any_batch:
                raise ValueError("The iterable of batches given to fit is empty.")
            if not reiterable or (epochs is not None and epoch >= epochs):
                return

    # ------------------------------------------------------------------ state
    def _tdtype(self, data_dtype):
        if self.dtype is not None:
            return torch_dtype(np.dtype(self.dtype))
        return torch_dtype(data_dtype if data_dtype is not None else np.float32)

    def _init_state(self, X0, device, tdtype, gen):
        """Fresh parameters from a sample of training rows ``X0`` (tensor)."""
        K, d = self.n_components, X0.shape[1]
        X0 = X0.to(device=device, dtype=tdtype)
        if self.normalize_input:
            ms = float((X0.double() ** 2).sum(1).mean())
            scale = math.sqrt(ms / d) if ms > 0 else 1.0
        else:
            scale = 1.0
        X0 = X0 / scale
        W = torch.randn(K, d, generator=gen, device=device, dtype=tdtype)
        W = W / torch.linalg.vector_norm(W, dim=1, keepdim=True).clamp_min(1e-12)
        if self.b_dec_init == "mean":
            b_dec = X0.mean(0)
        elif self.b_dec_init == "geometric_median":
            b_dec = _geometric_median(X0)
        else:
            b_dec = torch.zeros(d, device=device, dtype=tdtype)
        state = {
            "W_enc": W.clone(),
            "b_enc": torch.zeros(K, device=device, dtype=tdtype),
            "W_dec": W,
            "b_dec": b_dec.to(tdtype),
        }
        return state, scale

    def _params_to_device(self, device, tdtype):
        P = {
            "W_enc": self.encoder_weight_,
            "b_enc": self.encoder_bias_,
            "W_dec": self.components_,
            "b_dec": self.decoder_bias_,
        }
        return {
            n: torch.tensor(np.asarray(v), dtype=tdtype, device=device) for n, v in P.items()
        }

    # ------------------------------------------------------------------ fit
    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X, y=None):
        """Train the autoencoder from scratch.

        Parameters
        ----------
        X : {array-like, sparse matrix, np.memmap, torch.Tensor} or iterable
            Training rows of shape (n_samples, n_features), or an iterable of
            such 2-D batches (a generator, a DataLoader, a list of arrays). A
            ``np.memmap`` is read batch by batch (contiguous chunks in shuffled
            order) and never loaded whole; a torch tensor stays on its device.
        y : Ignored

        Returns
        -------
        self
        """
        self._check_params()
        for attr in ("components_", "_opt", "_k_sched"):
            if hasattr(self, attr):
                delattr(self, attr)
        self._train(X, fresh=True)
        return self

    def partial_fit(self, X, y=None):
        """Continue training with one pass over ``X`` (one step per batch).

        On the first call the model is initialised from ``X``. A failed call
        (invalid input) leaves the previous fitted state intact.

        Parameters
        ----------
        X : {array-like, sparse matrix, np.memmap, torch.Tensor} or iterable
        y : Ignored

        Returns
        -------
        self
        """
        fresh = not hasattr(self, "components_")
        if fresh:
            self._validate_params()
            self._check_params()
        self._train(X, fresh=fresh, single_pass=True)
        return self

    def _train(self, X, *, fresh, single_pass=False):
        device = self._device()
        kind, X, data_dtype = self._validate(X, reset=fresh)
        bs = int(self.batch_size)
        gen = make_generator(self.random_state, device)
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=gen, device=device))
        np_rng = np.random.default_rng(seed)

        if kind == "iterable":
            batches = self._iterable_batches(
                X, fresh, None if single_pass else self.n_steps, bs, device, self._tdtype,
                single_pass=single_pass,
            )
            try:
                Xb0 = next(batches)
            except StopIteration as exc:
                raise ValueError("The iterable of batches given to fit is empty.") from exc
            tdtype = Xb0.dtype
            n_steps_total = None

            def all_batches():
                yield Xb0
                yield from batches

            stream = all_batches()
            init_rows = Xb0
            n_passes = 1
        else:
            n = X.shape[0]
            bsz = min(bs, n)
            per_epoch = -(-n // bsz)
            tdtype = self._tdtype(data_dtype)
            if single_pass:
                n_steps_total = per_epoch
                stream = (
                    self._rows_chunk(kind, X, s, min(n, s + bsz), device, tdtype)
                    for s in range(0, n, bsz)
                )
            else:
                n_steps_total = (
                    int(self.n_steps) if self.n_steps is not None else self.max_epochs * per_epoch
                )
                stream = self._array_batches(
                    kind, X, n_steps_total, bs, device, tdtype, np_rng, gen
                )
            n_passes = -(-n_steps_total // per_epoch)
            init_rows = None
            if fresh:
                m = min(n, 65536)
                if kind == "memmap":
                    init_rows = self._rows_chunk(kind, X, 0, m, device, tdtype)
                else:
                    idx = np.arange(n)
                    if m < n:
                        idx = np.sort(np_rng.choice(n, size=m, replace=False))
                    if isinstance(X, torch.Tensor):
                        idx = torch.from_numpy(idx).to(X.device)
                    init_rows = self._rows(X, idx, device, tdtype)

        if fresh:
            params, scale = self._init_state(init_rows, device, tdtype, gen)
            opt_state = None
            tsf = torch.zeros(self.n_components, dtype=torch.long, device=device)
            threshold = None
            n_steps_done = 0
            k_sched = copy.deepcopy(self.k_schedule) if self.k_schedule is not None else None
            history = {n: [] for n in ("loss", "fvu", "l0", "dead_fraction", "aux_loss", "k")}
        else:
            params = self._params_to_device(device, tdtype)
            scale = float(self.input_scale_)
            opt_state = getattr(self, "_opt", None)
            tsf = torch.as_tensor(self.tokens_since_fired_, device=device).long().clone()
            threshold = self.threshold_ if self.sparsity == "batchtopk" and self.n_steps_ else None
            n_steps_done = int(self.n_steps_)
            k_sched = copy.deepcopy(getattr(self, "_k_sched", None))
            history = {n: list(v) for n, v in self.history_.items()}

        for p in params.values():
            p.requires_grad_(True)
        opt = _Optimizer(self.optimizer, self._lr(), params, opt_state, device, tdtype)
        k_aux = self.k_aux if self.k_aux is not None else max(1, params["W_dec"].shape[1] // 2)

        buf = {}
        bar = None
        if self.verbose:
            from tqdm.auto import tqdm

            bar = tqdm(total=n_steps_total, desc=type(self).__name__)
        logs = []
        steps = 0
        for Xb in stream:
            k_cur = self.k
            if k_sched is not None:
                k_cur = int(min(self.n_components, max(1, round(k_sched.value))))
            out = self._step(Xb, params, opt, tsf, threshold, k_cur, k_aux, scale, tdtype, buf)
            threshold = out["threshold"]
            if k_sched is not None:
                k_sched.step(accuracy=1.0 - float(out["fvu"]))
            logs.append(
                torch.stack(
                    [out["loss"], out["fvu"], out["l0"], out["dead"], out["aux"]]
                ).double()
            )
            history["k"].append(k_cur)
            steps += 1
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        if steps == 0:
            raise ValueError("No training batch was produced from X.")
        L = torch.stack(logs).cpu().numpy()
        for j, name in enumerate(("loss", "fvu", "l0", "dead_fraction", "aux_loss")):
            history[name].extend(L[:, j].tolist())
        if not np.all(np.isfinite(L[:, 0])):
            raise ValueError(
                "Training diverged (non-finite loss); lower lr or check the input scale."
            )

        # ---- commit the fitted state (only after everything succeeded)
        np_dt = numpy_dtype(tdtype)
        with torch.no_grad():
            self.encoder_weight_ = params["W_enc"].detach().cpu().numpy().astype(np_dt)
            self.encoder_bias_ = params["b_enc"].detach().cpu().numpy().astype(np_dt)
            self.components_ = params["W_dec"].detach().cpu().numpy().astype(np_dt)
            self.decoder_bias_ = params["b_dec"].detach().cpu().numpy().astype(np_dt)
        self.input_scale_ = float(scale)
        self.threshold_ = float(threshold) if threshold is not None else 0.0
        self.tokens_since_fired_ = tsf.cpu().numpy()
        self.dead_fraction_ = float(
            (self.tokens_since_fired_ >= self.dead_window).mean()
        )
        self.history_ = {n: np.asarray(v, dtype=np.float64) for n, v in history.items()}
        self.n_steps_ = n_steps_done + steps
        self.n_iter_ = steps if single_pass else n_passes
        self._opt = opt.state_numpy()
        self._k_sched = k_sched
        self.n_components_ = self.n_components

    def _rows_chunk(self, kind, X, start, stop, device, tdtype):
        if isinstance(X, torch.Tensor):
            return X[start:stop].to(device=device, dtype=tdtype)
        blk = X[start:stop]
        blk = blk.toarray() if sp.issparse(blk) else np.asarray(blk)
        if kind == "memmap" and not np.all(np.isfinite(blk)):
            raise ValueError(
                "Input X contains NaN or infinity. Remove or impute non-finite values "
                f"before calling {type(self).__name__}."
            )
        return _to_tensor(blk, device, tdtype)

    # ------------------------------------------------------------------ one step
    def _pre(self, xc, W_enc, b_enc, buf=None):
        if self.autocast is not None:
            ac = _AUTOCAST[self.autocast]
            return (xc.to(ac) @ W_enc.to(ac).T).to(xc.dtype) + b_enc
        if buf is not None:
            # reuse one (batch, n_components) buffer across steps (no page faults)
            key = (xc.shape[0], W_enc.shape[0], xc.dtype, xc.device)
            if buf.get("key") != key:
                buf["key"] = key
                buf["pre"] = torch.empty(key[0], key[1], dtype=key[2], device=key[3])
            return torch.addmm(b_enc, xc, W_enc.T, out=buf["pre"])
        return torch.addmm(b_enc, xc, W_enc.T)

    def _step(self, Xb, P, opt, tsf, threshold, k_cur, k_aux, scale, tdtype, buf=None):
        B, K = Xb.shape[0], self.n_components
        x = Xb / scale if scale != 1.0 else Xb
        W_enc, b_enc, W_dec, b_dec = P["W_enc"], P["b_enc"], P["W_dec"], P["b_dec"]
        mode = self.sparsity
        aux = x.new_zeros(())
        penalty = x.new_zeros(())
        if mode in _SELECTING:
            with torch.no_grad():
                pre = self._pre(x - b_dec, W_enc, b_enc, buf)
                if mode == "topk":
                    pairs = select_topk(pre, k_cur)
                elif mode == "batchtopk":
                    pairs = select_batch_topk(pre, k_cur)
                else:
                    pairs = select_lifetime(pre, k_cur / K)
            vals = sparse_encode(x, W_enc, b_enc, pairs, pre, b_dec=b_dec)
            x_hat = sparse_decode_pairs(vals, W_dec, pairs) + b_dec
            with torch.no_grad():
                active = vals.detach() > 0
                fired = torch.zeros(K, dtype=torch.bool, device=x.device)
                fired[pairs.col[active]] = True
                l0 = active.sum().to(tdtype) / B
                if mode == "batchtopk":
                    pos = vals.detach()[active]
                    if pos.numel():
                        tmin = pos.min()
                        threshold = (
                            float(tmin) if threshold is None
                            else 0.99 * float(threshold) + 0.01 * float(tmin)
                        )
        else:
            pre = torch.addmm(b_enc, x - b_dec, W_enc.T)
            z = torch.relu(pre)
            x_hat = z @ W_dec + b_dec
            if mode == "l1":
                dn = torch.linalg.vector_norm(W_dec, dim=1)
                penalty = self.alpha * (z * dn).sum(1).mean()
            else:
                rho_hat = torch.tanh(z).mean(0)
                penalty = self.alpha * sparsity_loss(rho_hat, self.rho, kind="kl", reduction="sum")
            with torch.no_grad():
                active = z.detach() > 0
                fired = active.any(0)
                l0 = active.sum().to(tdtype) / B
            pre = pre.detach()
        resid = x - x_hat
        denom = ((x - x.mean(0)) ** 2).sum().detach()
        denom = torch.clamp(denom, min=1e-12 * float((x * x).sum()) + 1e-30)
        fvu = (resid**2).sum() / denom

        # dead latents and AuxK
        with torch.no_grad():
            tsf += B
            tsf[fired] = 0
            dead = tsf >= self.dead_window
            n_dead = int(dead.sum())
        if mode in _SELECTING and n_dead > 0 and self.aux_coef > 0:
            with torch.no_grad():
                masked = pre.masked_fill(~dead[None, :], float("-inf"))
                apairs = select_topk(masked, min(k_aux, n_dead))
            avals = sparse_encode(x, W_enc, b_enc, apairs, pre, b_dec=b_dec)
            e = resid.detach()
            e_hat = sparse_decode_pairs(avals, W_dec, apairs)
            e_den = ((e - e.mean(0)) ** 2).sum().clamp_min(1e-30)
            aux = ((e - e_hat) ** 2).sum() / e_den
        loss = fvu + penalty + self.aux_coef * aux
        opt.zero_grad()
        loss.backward()
        with torch.no_grad():
            W, g = W_dec, W_dec.grad
            if g is not None:
                g -= (g * W).sum(1, keepdim=True) * W
        opt.step()
        with torch.no_grad():
            W_dec /= torch.linalg.vector_norm(W_dec, dim=1, keepdim=True).clamp_min(1e-12)
        return {
            "loss": loss.detach(),
            "fvu": fvu.detach(),
            "l0": l0,
            "dead": dead.to(tdtype).mean(),
            "aux": aux.detach(),
            "threshold": threshold,
        }

    # ------------------------------------------------------------------ inference
    def _n_codes(self):
        return self.components_.shape[0]

    def _transform_state(self, device, dtype):
        td = torch_dtype(dtype)
        return {
            "W_enc": torch.as_tensor(self.encoder_weight_).to(device=device, dtype=td),
            "b_enc": torch.as_tensor(self.encoder_bias_).to(device=device, dtype=td),
            "b_dec": torch.as_tensor(self.decoder_bias_).to(device=device, dtype=td),
        }

    def _encode(self, Xb, state):
        x = Xb / self.input_scale_ if self.input_scale_ != 1.0 else Xb
        pre = torch.addmm(state["b_enc"], x - state["b_dec"], state["W_enc"].T)
        if self.sparsity in ("topk", "wta", "lifetime"):
            k = min(self.k, pre.shape[1])
            vals, idx = torch.topk(pre, k, dim=1, sorted=False)
            return idx, torch.relu(vals)
        if self.sparsity == "batchtopk":
            return pre * (pre > max(self.threshold_, 0.0))
        return torch.relu(pre)

    def _decoder(self, device, dtype):
        td = torch_dtype(dtype)
        s = self.input_scale_
        D = torch.as_tensor(self.components_).to(device=device, dtype=td) * s
        off = torch.as_tensor(self.decoder_bias_).to(device=device, dtype=td) * s
        return D, off

    def _check_ready(self):
        check_is_fitted(self, "components_")

    def score(self, X, y=None):
        """Explained variance ``1 - FVU`` of the reconstruction (higher is better).

        ``FVU = sum ||x - x_hat||^2 / sum ||x - mean||^2`` with the mean over all
        rows of ``X`` (not per batch).

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
        y : Ignored

        Returns
        -------
        score : float
        """
        self._check_ready()
        from .base import iter_batches

        X, dtype = check_input(self, X, reset=False)
        device = self._device()
        state = self._transform_state(device, dtype)
        D, off = self._decoder(device, dtype)
        bs = int(self.batch_size)
        rss = 0.0
        s1 = torch.zeros(X.shape[1], dtype=torch.float64, device=device)
        s2 = 0.0
        from .solvers.decode import topk_decode

        for _, _, Xb in iter_batches(X, bs, device, dtype):
            codes = self._encode(Xb, state)
            if isinstance(codes, tuple):
                Xh = topk_decode(codes[0], codes[1], D) + off
            else:
                Xh = codes @ D + off
            rss += float(((Xb - Xh).double() ** 2).sum())
            s1 += Xb.double().sum(0)
            s2 += float((Xb.double() ** 2).sum())
        n = X.shape[0]
        tv = s2 - float((s1 * s1).sum()) / n
        if tv <= 1e-12 * max(s2, 1e-300):
            return 1.0 if rss <= 1e-12 * max(s2, 1e-300) else 0.0
        return 1.0 - rss / tv

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.non_deterministic = False
        return tags

    # ------------------------------------------------------------------ io
    _SAVE_PARAMS = (
        "n_components", "k", "sparsity", "alpha", "rho", "k_aux", "aux_coef",
        "dead_window", "lr", "batch_size", "n_steps", "max_epochs", "optimizer",
        "normalize_input", "b_dec_init", "dtype", "autocast", "sparse_output",
    )

    def save(self, path):
        """Save the fitted model to directory ``path``: ``config.json`` (parameters
        and scalars) and ``model.safetensors`` (weights and training state).

        Parameters
        ----------
        path : str or os.PathLike
            Directory (created if needed).
        """
        from safetensors.numpy import save_file

        self._check_ready()
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        params = {p: getattr(self, p) for p in self._SAVE_PARAMS}
        rs = self.random_state
        params["random_state"] = rs if isinstance(rs, numbers.Integral) or rs is None else None
        dev = self.device
        params["device"] = dev if isinstance(dev, str) or dev is None else str(dev)
        cfg = {
            "format": "skdict.KSparseAutoencoder",
            "version": 1,
            "params": params,
            "n_features_in": int(self.n_features_in_),
            "input_scale": float(self.input_scale_),
            "threshold": float(self.threshold_),
            "n_steps": int(self.n_steps_),
            "n_iter": int(self.n_iter_),
            "dead_fraction": float(self.dead_fraction_),
        }
        if hasattr(self, "feature_names_in_"):
            cfg["feature_names_in"] = [str(f) for f in self.feature_names_in_]
        tensors = {
            "W_enc": np.ascontiguousarray(self.encoder_weight_),
            "b_enc": np.ascontiguousarray(self.encoder_bias_),
            "W_dec": np.ascontiguousarray(self.components_),
            "b_dec": np.ascontiguousarray(self.decoder_bias_),
            "tokens_since_fired": np.ascontiguousarray(self.tokens_since_fired_),
        }
        for name, arr in self.history_.items():
            tensors[f"history.{name}"] = np.ascontiguousarray(arr)
        for name, arr in (getattr(self, "_opt", None) or {}).items():
            tensors[f"opt.{name}"] = np.ascontiguousarray(arr)
        with open(path / "config.json", "w") as f:
            json.dump(cfg, f, indent=2)
        save_file(tensors, str(path / "model.safetensors"))
        return path

    @classmethod
    def load(cls, path, **overrides):
        """Load a model written by :meth:`save`. ``overrides`` set parameters
        (e.g. ``device="cpu"``)."""
        from safetensors.numpy import load_file

        path = Path(path)
        cfg_file = path / "config.json"
        if not cfg_file.exists():
            raise ValueError(f"{cfg_file} not found; pass the directory written by save().")
        with open(cfg_file) as f:
            cfg = json.load(f)
        if cfg.get("format") != "skdict.KSparseAutoencoder":
            raise ValueError(f"{cfg_file} is not a KSparseAutoencoder config.")
        params = dict(cfg["params"])
        params.update(overrides)
        est = cls(**params)
        t = load_file(str(path / "model.safetensors"))
        est.encoder_weight_ = t["W_enc"]
        est.encoder_bias_ = t["b_enc"]
        est.components_ = t["W_dec"]
        est.decoder_bias_ = t["b_dec"]
        est.tokens_since_fired_ = t["tokens_since_fired"]
        est.history_ = {
            n.split(".", 1)[1]: v for n, v in t.items() if n.startswith("history.")
        }
        opt = {n.split(".", 1)[1]: v for n, v in t.items() if n.startswith("opt.")}
        est._opt = opt or None
        est._k_sched = None
        est.n_features_in_ = int(cfg["n_features_in"])
        if "feature_names_in" in cfg:
            est.feature_names_in_ = np.asarray(cfg["feature_names_in"], dtype=object)
        est.input_scale_ = float(cfg["input_scale"])
        est.threshold_ = float(cfg["threshold"])
        est.n_steps_ = int(cfg["n_steps"])
        est.n_iter_ = int(cfg["n_iter"])
        est.dead_fraction_ = float(cfg["dead_fraction"])
        est.n_components_ = est.components_.shape[0]
        return est

    @classmethod
    def from_saelens(cls, path, **params):
        """Build a fitted estimator from an SAE saved in SAELens' format.

        Reads ``cfg.json`` and ``sae_weights.safetensors`` (``W_enc`` of shape
        ``(d_in, d_sae)``, ``W_dec`` ``(d_sae, d_in)``, ``b_enc``, ``b_dec``).
        Supported architectures: ``"topk"`` (``k`` from the config),
        ``"standard"`` (ReLU codes, mapped to ``sparsity="l1"``) and
        ``"batchtopk"`` with a ``threshold`` entry. When the config says
        ``apply_b_dec_to_input: false`` the encoder bias absorbs ``b_dec`` so
        that codes match SAELens'. Decoder rows are used as saved (not
        renormalised).

        Parameters
        ----------
        path : str or os.PathLike
            The SAE's directory.
        **params
            Estimator parameters to set (e.g. ``device``).

        Returns
        -------
        KSparseAutoencoder
            Fitted; ready for ``transform`` / ``inverse_transform`` / ``score``.
        """
        from safetensors.numpy import load_file

        path = Path(path)
        cfg_path = path / "cfg.json"
        w_path = path / "sae_weights.safetensors"
        for p in (cfg_path, w_path):
            if not p.exists():
                raise ValueError(
                    f"{p} not found: an SAELens directory holds cfg.json and "
                    "sae_weights.safetensors."
                )
        with open(cfg_path) as f:
            cfg = json.load(f)
        t = load_file(str(w_path))
        missing = {"W_enc", "W_dec", "b_enc", "b_dec"} - set(t)
        if missing:
            raise ValueError(f"{w_path} lacks tensors {sorted(missing)}.")
        W_enc = np.asarray(t["W_enc"])
        W_dec = np.asarray(t["W_dec"])
        d_in, d_sae = W_enc.shape
        if W_dec.shape != (d_sae, d_in):
            raise ValueError(
                f"W_dec has shape {W_dec.shape}, expected (d_sae, d_in) = {(d_sae, d_in)}."
            )
        arch = str(cfg.get("architecture", "standard")).lower()
        kw = cfg.get("activation_fn_kwargs") or {}
        k = cfg.get("k", kw.get("k"))
        threshold = 0.0
        if arch == "topk":
            if k is None:
                raise ValueError("cfg.json of a topk SAE has no 'k'.")
            sparsity = "topk"
        elif arch == "batchtopk":
            sparsity = "batchtopk"
            k = k if k is not None else 1
            thr = t.get("threshold")
            threshold = float(np.asarray(thr).reshape(-1)[0]) if thr is not None else 0.0
        elif arch == "standard":
            sparsity = "l1"
            k = 1
        else:
            raise ValueError(
                f"architecture {arch!r} is not supported; use a 'topk', 'batchtopk' "
                "or 'standard' SAE."
            )
        dt = W_enc.dtype if W_enc.dtype in (np.float32, np.float64) else np.dtype(np.float32)
        b_enc = np.asarray(t["b_enc"], dtype=dt)
        b_dec = np.asarray(t["b_dec"], dtype=dt)
        if not cfg.get("apply_b_dec_to_input", True):
            b_enc = b_enc + b_dec @ W_enc.astype(dt)
        init = {"n_components": d_sae, "k": int(k), "sparsity": sparsity}
        init.update(params)
        est = cls(**init)
        est.encoder_weight_ = np.ascontiguousarray(W_enc.T.astype(dt))
        est.encoder_bias_ = b_enc
        est.components_ = np.ascontiguousarray(W_dec.astype(dt))
        est.decoder_bias_ = b_dec
        est.input_scale_ = 1.0
        est.threshold_ = threshold
        est.tokens_since_fired_ = np.zeros(d_sae, dtype=np.int64)
        est.dead_fraction_ = 0.0
        est.history_ = {}
        est.n_steps_ = 0
        est.n_iter_ = 0
        est.n_features_in_ = d_in
        est.n_components_ = d_sae
        est._opt = None
        est._k_sched = None
        return est


class _Optimizer:
    """Adam (or SGD) over a dict of parameters; state exportable as numpy."""

    def __init__(self, kind, lr, params, state, device, tdtype, betas=(0.9, 0.999), eps=1e-8):
        self.kind = kind
        self.lr = lr
        self.params = params
        self.b1, self.b2 = betas
        self.eps = eps
        self.t = 0
        self.m, self.v = {}, {}
        if kind == "adam":
            if state and all(f"m.{n}" in state for n in params):
                self.t = int(np.asarray(state["t"]).reshape(-1)[0])
                for n in params:
                    self.m[n] = torch.tensor(state[f"m.{n}"], device=device, dtype=tdtype)
                    self.v[n] = torch.tensor(state[f"v.{n}"], device=device, dtype=tdtype)
            else:
                for n, p in params.items():
                    self.m[n] = torch.zeros_like(p)
                    self.v[n] = torch.zeros_like(p)

    def zero_grad(self):
        for p in self.params.values():
            p.grad = None

    @torch.no_grad()
    def step(self):
        self.t += 1
        if self.kind == "sgd":
            for p in self.params.values():
                if p.grad is not None:
                    p.add_(p.grad, alpha=-self.lr)
            return
        names = [n for n, p in self.params.items() if p.grad is not None]
        fused = getattr(torch, "_fused_adam_", None)
        if fused is not None and names:
            try:  # one fused kernel over all parameters (torch.optim's fused Adam)
                steps = [
                    torch.tensor(float(self.t), device=self.params[n].device) for n in names
                ]
                fused(
                    [self.params[n] for n in names], [self.params[n].grad for n in names],
                    [self.m[n] for n in names], [self.v[n] for n in names], [], steps,
                    lr=self.lr, beta1=self.b1, beta2=self.b2, weight_decay=0.0,
                    eps=self.eps, amsgrad=False, maximize=False,
                )
                return
            except (RuntimeError, TypeError):  # pragma: no cover - old torch / device
                pass
        bc1 = 1 - self.b1**self.t
        bc2 = 1 - self.b2**self.t
        step = self.lr * math.sqrt(bc2) / bc1
        for n, p in self.params.items():
            g = p.grad
            if g is None:
                continue
            m, v = self.m[n], self.v[n]
            m.mul_(self.b1).add_(g, alpha=1 - self.b1)
            v.mul_(self.b2).addcmul_(g, g, value=1 - self.b2)
            p.addcdiv_(m, v.sqrt().add_(self.eps * math.sqrt(bc2)), value=-step)

    def state_numpy(self):
        if self.kind != "adam":
            return None
        out = {"t": np.asarray([self.t], dtype=np.int64)}
        for n in self.params:
            out[f"m.{n}"] = self.m[n].cpu().numpy()
            out[f"v.{n}"] = self.v[n].cpu().numpy()
        return out

