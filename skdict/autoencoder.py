"""Sparse autoencoders: :class:`KSparseAutoencoder`.

The model is ``pre = W_enc (x - b_dec) + b_enc``, ``z = f(pre)``,
``x_hat = z W_dec + b_dec`` with unit-norm decoder rows; the variant ``f`` (TopK,
BatchTopK, JumpReLU, Matryoshka BatchTopK, ReLU + L1, ReLU + KL, lifetime
sparsity) is one file of :mod:`skdict.encoders`. Training runs through
:class:`skdict.training.Trainer`; selecting variants use the sparse kernels of
:mod:`skdict.solvers.topk`, so the encoder pre-activation is the only dense
matrix product of a step.
"""

from __future__ import annotations

import json
import math
import numbers
from dataclasses import fields
from pathlib import Path

import numpy as np
import torch
from sklearn.base import BaseEstimator, _fit_context
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.validation import check_is_fitted

from . import __version__
from ._backend import make_generator, numpy_dtype, torch_dtype
from ._io import (
    LoadError,
    check_count,
    check_model_arrays,
    check_positive_finite,
    check_resume,
    read_json,
    read_safetensors,
)
from ._validation import DEVICE_CONSTRAINT, SHUFFLE_CONSTRAINT
from .base import SparseCodingMixin
from .encoders import encoder_options, get_encoder
from .encoders.base import preactivations
from .encoders.saelens import CFG_FILE, read_saelens, write_saelens
from .losses import AdaptiveSparsityScheduler
from .training.estimator import TrainedEstimatorMixin
from .training.optim import OPTIMIZERS
from .training.sae import AUTOCAST, PARAMS, SAELearner, SAEState, effective_params
from .training.state import to_portable

__all__ = ["KSparseAutoencoder"]


# Fitted arrays: attribute -> key in model.safetensors (and the training
# parameter they hold, where they are one). save / load / from_saelens /
# to_saelens and the training state all go through this table.
_FITTED_ARRAYS = {
    "components_": "W_dec",
    "encoder_weight_": "W_enc",
    "encoder_bias_": "b_enc",
    "decoder_bias_": "b_dec",
    "threshold_": "threshold",
    "tokens_since_fired_": "tokens_since_fired",
}
# config.json's "format" and "version": load refuses other formats and versions
_FORMAT = "skdict.KSparseAutoencoder"
_FORMAT_VERSION = 2
# fitted scalars, written to config.json
_FITTED_SCALARS = {
    "n_features_in_": int,
    "n_components_": int,
    "input_scale_": float,
    "dead_fraction_": float,
    "n_steps_": int,
    "n_iter_": int,
}


class KSparseAutoencoder(TrainedEstimatorMixin, SparseCodingMixin, BaseEstimator):
    """Sparse autoencoder (TopK, BatchTopK, JumpReLU, Matryoshka, ReLU + L1 / KL,
    lifetime sparsity) with a scikit-learn API and sparse kernels.

    ``pre = W_enc (x - b_dec) + b_enc``, ``z = f(pre)`` and
    ``x_hat = z W_dec + b_dec``, trained with Adam on the fraction of variance
    unexplained of each batch (plus the variant's penalty and the AuxK loss).
    Decoder rows (``components_``) have unit norm: training parametrises each
    row by a free vector whose direction is the row and whose norm is folded
    into the encoder (SAELens' ``rescale_acts_by_decoder_norm``). These vectors
    start at norm 0.2, so an Adam step turns the rows by a large angle early in
    training and by smaller ones as their norms grow. ``W_enc`` starts as
    ``0.04 * W_dec.T`` (``W_dec.T`` for ``"jumprelu"``, whose ``bandwidth`` is in
    units of those pre-activations) and ``b_dec`` at the data mean (or geometric
    median).

    For the selecting variants only the encoder pre-activation is a dense
    matrix product: the selection feeds an embedding-bag decoder, and the
    backward pass touches only the active latents of each row.

    Parameters
    ----------
    n_components : int, default=256
        Number of latents (dictionary size ``d_sae``).
    k : int, default=32
        Active latents per row (``"topk"``); on average per row
        (``"batchtopk"``, ``"matryoshka"``, ``"lifetime"``); initial average for
        ``"jumprelu"``. Must not exceed ``n_components`` (unused by ``"l1"`` /
        ``"kl"``).
    sparsity : {"topk", "batchtopk", "matryoshka", "jumprelu", "l1", "kl", \
"lifetime"}, default="topk"
        The variant (:mod:`skdict.encoders`).
        ``"topk"``: the ``k`` largest pre-activations of each row.
        ``"batchtopk"``: the ``k * B`` largest of a batch of ``B`` rows in
        training; at inference a learned global threshold (running average of
        the smallest selected activation), so rows may have more or fewer than
        ``k`` latents.
        ``"matryoshka"``: BatchTopK whose loss sums the FVUs of the nested
        reconstructions from the latent prefixes ``prefix_sizes`` (Bussmann et
        al. 2025).
        ``"jumprelu"``: ``z = pre * (pre > theta)`` with one learned threshold
        per latent (straight-through estimator, rectangle kernel of width
        ``bandwidth``) and an L0 penalty of weight ``alpha`` (Rajamanoharan et
        al. 2024).
        ``"l1"``: ReLU codes with the penalty ``alpha * sum_j z_j ||W_dec_j||``.
        ``"kl"``: ReLU codes with ``alpha`` times the KL divergence between the
        target ``rho`` and each latent's mean ``tanh(z)`` over the batch.
        ``"lifetime"``: winner-take-all lifetime sparsity, each latent keeps its
        top ``k / n_components`` fraction of the batch (Makhzani & Frey 2015);
        inference keeps the top ``k`` of each row.
    alpha : float, default=1e-3
        Weight of the sparsity penalty: L1 (``"l1"``), KL (``"kl"``) or L0
        (``"jumprelu"``).
    rho : float, default=0.05
        Target mean activation of the ``"kl"`` penalty, in ``(0, 1)``.
    bandwidth : float, default=0.05
        Width of the ``"jumprelu"`` straight-through rectangle kernel, in units
        of the (normalised) pre-activations.
    prefix_sizes : sequence of int, default=None
        Nested latent prefixes of ``"matryoshka"``, strictly increasing;
        ``n_components`` is appended when missing. None means
        ``n_components // 16, // 8, // 4, // 2`` and ``n_components``.
    k_aux : int, default=None
        Latents of the AuxK loss; None means ``n_features // 2`` (at least 1).
    aux_coef : float, default=1/32
        Weight of the AuxK loss (Gao et al. 2024): latents that have not fired
        for ``dead_window`` tokens reconstruct the residual with their top
        ``k_aux`` pre-activations; the loss is that reconstruction's FVU
        (selecting variants other than ``"jumprelu"``).
    dead_window : int, default=10_000_000
        A latent is dead when it has not fired on the last ``dead_window``
        training rows (tokens); 0 disables dead-latent tracking and AuxK.
    k_schedule : AdaptiveSparsityScheduler, default=None
        Anneals ``k`` during training (e.g. from ``4 * k`` down to ``k``);
        transform always uses ``k``. The scheduler is copied at fit.
    lr : float, default=None
        Learning rate; None means ``min(1e-2, 3.7e-3 / sqrt(n_components / 2**14))``
        (Gao et al.'s scaling with ``n_components``, at a rate that trained well
        on MiniLM activations from 12 to 300 steps: ``6e-3`` for 6144 latents).
    lr_decay : float, default=0.2
        Fraction of the steps of ``fit``, at its end, over which the learning
        rate falls linearly towards 0 (a constant rate, then a linear decay),
        when ``fit`` knows how many steps it will take: ``n_steps``, or
        ``max_iter`` passes over an array. 0 keeps the rate constant.
        ``partial_fit`` and iterables of batches (unknown length) train at
        the constant rate ``lr``, also after a ``fit`` that decayed it.
    batch_size : int, default=4096
        Rows per training step and per transform batch.
    n_steps : int, default=None
        Training steps of ``fit`` (cycling over the data); None means
        ``max_iter`` passes.
    max_iter : int, default=10
        Passes over the data when ``n_steps`` is None.
    shuffle : bool or "blocks", default=True
        Batch order: True draws a permutation of the rows each pass,
        ``"blocks"`` visits contiguous blocks of ``batch_size`` rows in random
        order with rows permuted within each (contiguous reads of a memory map
        larger than memory), False keeps the row order. The same seed gives the
        same batches for every kind of input array.
    optimizer : {"adam", "sgd"}, default="adam"
        ``torch.optim`` Adam (fused where torch offers it) or SGD. Adam steps
        on each tensor's gradient divided by its norm, so that the steps keep
        their length as the gradients shrink (as SAELens' clipped gradients do).
    normalize_input : bool, default=True
        Divide inputs by a scalar so that the training rows have mean squared
        norm ``n_features`` (estimated once, stored as ``input_scale_``);
        ``inverse_transform`` undoes it.
    b_dec_init : {"mean", "geometric_median", "zeros"}, default="mean"
        Initial decoder bias, from (up to) 65536 random training rows.
    dtype : {"float32", "float64"}, default=None
        Training dtype; None means the dtype of the input.
    autocast : {"bfloat16", "float16"}, default=None
        Run the encoder matrix product of training in this reduced precision.
    callbacks : list of callable, default=None
        Each is called after every training step with a dict of the step's
        metrics (``"step"``, ``"epoch"``, ``"loss"``, ``"fvu"``, ...); returning
        False stops training.
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
    threshold_ : ndarray of shape (n_components,)
        Per-latent inference thresholds of the threshold variants
        (``"batchtopk"`` and ``"matryoshka"``: one learned value repeated;
        ``"jumprelu"``: the learned thresholds; ``"l1"`` / ``"kl"``: zeros);
        zeros and unused for the top-k variants.
    input_scale_ : float
        Scalar the inputs are divided by.
    tokens_since_fired_ : ndarray of shape (n_components,)
    dead_fraction_ : float
        Fraction of latents dead (not fired for ``dead_window`` tokens).
    history_ : dict of str to ndarray
        Per training step: ``"loss"``, ``"fvu"`` (of the batch), ``"l0"``,
        ``"dead_fraction"``, ``"aux_loss"``, ``"k"``, ``"lr"`` (and ``"threshold"``, the
        mean threshold, for ``"jumprelu"``).
    loss_curve_ : ndarray
        Mean training loss of each epoch.
    n_steps_ : int
        Training steps taken over all calls.
    n_iter_ : int
        Epochs run by the last ``fit`` (``partial_fit`` adds 1 per call).
    n_components_ : int
        Number of latents of the fitted model.
    n_features_in_ : int
        Number of features seen during ``fit``.
    feature_names_in_ : ndarray of shape (`n_features_in_`,)
        Column names of ``X`` when it had string column names (a DataFrame).

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

    _data_parallel = True  # see skdict.distributed.torch
    # a fit of a few steps reads a small part of a large array: check what it reads
    _finite_check = "read"

    _parameter_constraints: dict = {
        "n_components": [Interval(numbers.Integral, 1, None, closed="left")],
        "k": [Interval(numbers.Integral, 1, None, closed="left")],
        "sparsity": [StrOptions(encoder_options())],
        "alpha": [Interval(numbers.Real, 0, None, closed="left")],
        "rho": [Interval(numbers.Real, 0, 1, closed="neither")],
        "bandwidth": [Interval(numbers.Real, 0, None, closed="neither")],
        "prefix_sizes": ["array-like", None],
        "k_aux": [Interval(numbers.Integral, 1, None, closed="left"), None],
        "aux_coef": [Interval(numbers.Real, 0, None, closed="left")],
        "dead_window": [Interval(numbers.Integral, 0, None, closed="left")],
        "k_schedule": [AdaptiveSparsityScheduler, None],
        "lr": [Interval(numbers.Real, 0, None, closed="neither"), None],
        "lr_decay": [Interval(numbers.Real, 0, 1, closed="both")],
        "batch_size": [Interval(numbers.Integral, 1, None, closed="left")],
        "n_steps": [Interval(numbers.Integral, 1, None, closed="left"), None],
        "max_iter": [Interval(numbers.Integral, 1, None, closed="left")],
        "shuffle": SHUFFLE_CONSTRAINT,
        "optimizer": [StrOptions(set(OPTIMIZERS))],
        "normalize_input": ["boolean"],
        "b_dec_init": [StrOptions({"mean", "geometric_median", "zeros"})],
        "dtype": [StrOptions({"float32", "float64"}), None],
        "autocast": [StrOptions(set(AUTOCAST)), None],
        "callbacks": [list, None],
        "random_state": ["random_state"],
        "device": DEVICE_CONSTRAINT,
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
        bandwidth=0.05,
        prefix_sizes=None,
        k_aux=None,
        aux_coef=1 / 32,
        dead_window=10_000_000,
        k_schedule=None,
        lr=None,
        lr_decay=0.2,
        batch_size=4096,
        n_steps=None,
        max_iter=10,
        shuffle=True,
        optimizer="adam",
        normalize_input=True,
        b_dec_init="mean",
        dtype=None,
        autocast=None,
        callbacks=None,
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
        self.bandwidth = bandwidth
        self.prefix_sizes = prefix_sizes
        self.k_aux = k_aux
        self.aux_coef = aux_coef
        self.dead_window = dead_window
        self.k_schedule = k_schedule
        self.lr = lr
        self.lr_decay = lr_decay
        self.batch_size = batch_size
        self.n_steps = n_steps
        self.max_iter = max_iter
        self.shuffle = shuffle
        self.optimizer = optimizer
        self.normalize_input = normalize_input
        self.b_dec_init = b_dec_init
        self.dtype = dtype
        self.autocast = autocast
        self.callbacks = callbacks
        self.random_state = random_state
        self.device = device
        self.verbose = verbose
        self.sparse_output = sparse_output

    # ------------------------------------------------------------------ checks
    def _variant(self):
        return get_encoder(self.sparsity).from_estimator(self)

    _resume_params = ("sparsity", "optimizer")

    def _check_params(self):
        self._variant().check_params()
        sched = self.k_schedule
        if sched is not None:  # the schedule's k values obey the rule for k
            for name in ("initial", "final"):
                v = getattr(sched, name)
                if not 1 <= v <= self.n_components:
                    raise ValueError(
                        f"k_schedule.{name}={v!r} is outside [1, n_components="
                        f"{self.n_components}]; every scheduled k must be a valid k."
                    )

    def _lr(self):
        if self.lr is not None:
            return float(self.lr)
        return min(1e-2, 3.7e-3 / math.sqrt(self.n_components / 2**14))

    # ------------------------------------------------------------------ fit
    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X, y=None):
        """Train the autoencoder from scratch.

        Parameters
        ----------
        X : {array-like, sparse matrix, np.memmap, torch.Tensor} or iterable
            Training rows of shape (n_samples, n_features), or an iterable of
            such 2-D batches (a generator, a DataLoader, a list of arrays). A
            ``np.memmap`` is read batch by batch and never loaded whole (see
            ``shuffle``); a torch tensor stays on its device.
        y : Ignored

        Returns
        -------
        self
        """
        return self._train(X, first=True, single_pass=False)

    @_fit_context(prefer_skip_nested_validation=True)
    def partial_fit(self, X, y=None):
        """Continue training with one (shuffled) pass over ``X``.

        On the first call the model is initialised from ``X``. Training resumes
        from the optimizer state, ``k`` schedule and batch order of the previous
        calls (also after :meth:`save` / :meth:`load`); a model imported with
        :meth:`from_saelens` starts a fresh optimizer. A failed call leaves the
        fitted state intact.

        Parameters
        ----------
        X : {array-like, sparse matrix, np.memmap, torch.Tensor} or iterable
        y : Ignored

        Returns
        -------
        self
        """
        return self._train(X, first=not hasattr(self, "components_"), single_pass=True)

    # ------------------------------------------------------------------ training
    def _train_dtype(self, first):
        if self.dtype is not None:
            return np.dtype(self.dtype)
        return None if first else self.components_.dtype

    def _make_learner(self, source, device, first):
        return SAELearner(self, self._variant(), device, torch_dtype(source.dtype))

    # ------------------------------------------------------------------ state
    def _commit_state(self, state, learner):
        """Fitted attributes from a finished run's state (nothing is touched
        before the run succeeded)."""
        learner.finish(state)
        variant = learner.variant
        raw = state.params
        P = effective_params(raw)
        np_dt = numpy_dtype(P["W_dec"].dtype)
        with torch.no_grad():
            # views where possible: the run's tensors are not used again
            arrays = {key: P[key].detach().cpu().numpy().astype(np_dt, copy=False)
                      for key in PARAMS}
            arrays["threshold"] = (
                variant.inference_threshold(P, state.buffers).cpu().numpy().astype(np_dt)
            )
            arrays["tokens_since_fired"] = state.tokens_since_fired.cpu().numpy()
        for attr, key in _FITTED_ARRAYS.items():
            setattr(self, attr, arrays[key])
        self.n_components_ = int(P["W_dec"].shape[0])
        self.input_scale_ = float(state.scale)
        window = self.dead_window
        self.dead_fraction_ = (
            float((self.tokens_since_fired_ >= window).mean()) if window else 0.0
        )
        # what resuming needs beyond the fitted arrays: the variant's extra
        # parameters and the trained (raw) encoder / decoder, whose row norms
        # the fitted arrays fold away
        state.params = {k: v for k, v in raw.items() if k != "b_dec"}
        self._resume = {f.name: _export(getattr(state, f.name)) for f in fields(state)
                        if f.name not in ("history", "epoch_loss")}

    def _resume_state(self, learner, device):
        """The training state of a fitted model: the saved training state when
        there is one, else rebuilt from the fitted arrays (fresh optimizer)."""
        variant, td = learner.variant, learner.dtype
        # copies: training updates its tensors in place
        P = {key: torch.tensor(np.asarray(getattr(self, attr)), dtype=td, device=device)
             for attr, key in _FITTED_ARRAYS.items() if key in PARAMS}
        resume = getattr(self, "_resume", None)
        history = {k: list(v) for k, v in getattr(self, "history_", {}).items()}
        epoch_loss = list(getattr(self, "loss_curve_", []))
        if resume is not None:
            state = SAEState.from_state_dict(
                {**resume, "history": {}, "epoch_loss": []}, device=device, dtype=td
            )
            state.params = {**P, **state.params}
            state.tokens_since_fired = state.tokens_since_fired.long()
        else:
            thr = torch.tensor(np.asarray(self.threshold_), dtype=td, device=device)
            extra, buffers = variant.from_threshold(P, thr)
            state = SAEState(
                params={**P, **extra},
                buffers=buffers,
                tokens_since_fired=torch.tensor(
                    np.asarray(self.tokens_since_fired_), dtype=torch.long, device=device),
                scale=float(self.input_scale_),
                n_steps=int(self.n_steps_),
                generator=make_generator(self.random_state, "cpu"),
            )
        state.history = history
        state.epoch_loss = epoch_loss
        return state

    # ------------------------------------------------------------------ inference
    def _n_codes(self):
        return self.components_.shape[0]

    def _transform_state(self, device, dtype):
        td = torch_dtype(dtype)
        state = {key: torch.as_tensor(np.asarray(getattr(self, attr)), dtype=td).to(device)
                 for attr, key in _FITTED_ARRAYS.items() if key in PARAMS + ("threshold",)}
        state["variant"] = self._variant()
        return state

    def _encode(self, Xb, state):
        x = Xb / self.input_scale_ if self.input_scale_ != 1.0 else Xb
        pre = preactivations(x, state)
        return state["variant"].encode(pre, state["threshold"], self.k)

    def _decoder(self, device, dtype):
        td = torch_dtype(dtype)
        s = self.input_scale_
        D = torch.as_tensor(self.components_).to(device=device, dtype=td) * s
        off = torch.as_tensor(self.decoder_bias_).to(device=device, dtype=td) * s
        return D, off

    def _check_ready(self):
        check_is_fitted(self, "components_")
        self._check_current_params()

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
        return super().score(X, y)

    def _score_from(self, sums, n, p):
        s1 = np.asarray(sums["s1"], dtype=np.float64)
        s2, rss = float(sums["s2"]), float(sums["rss"])
        tv = s2 - float(s1 @ s1) / n
        if tv <= 1e-12 * max(s2, 1e-300):
            return 1.0 if rss <= 1e-12 * max(s2, 1e-300) else 0.0
        return 1.0 - rss / tv

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.non_deterministic = False
        return tags

    # ------------------------------------------------------------------ io
    def save(self, path):
        """Save the fitted model to directory ``path``: ``config.json`` (parameters,
        fitted scalars, the ``k`` schedule) and ``model.safetensors`` (fitted
        arrays, history and the training state: optimizer moments, running
        buffers, batch-order generator), so that :meth:`load` followed by
        :meth:`partial_fit` continues exactly where training stopped.

        Parameters
        ----------
        path : str or os.PathLike
            Directory (created if needed).

        Returns
        -------
        pathlib.Path
        """
        from safetensors.numpy import save_file

        self._check_ready()
        path = Path(path)
        from .distributed.torch import is_writer

        if not is_writer():  # under torch.distributed only rank 0 writes
            return path
        path.mkdir(parents=True, exist_ok=True)
        # callables are not saved; the k schedule is written below
        params = {p: v for p, v in self.get_params().items()
                  if p not in ("callbacks", "k_schedule")}
        if params["prefix_sizes"] is not None:
            params["prefix_sizes"] = [int(m) for m in params["prefix_sizes"]]
        rs = self.random_state
        params["random_state"] = rs if isinstance(rs, numbers.Integral) or rs is None else None
        dev = self.device
        params["device"] = dev if isinstance(dev, str) or dev is None else str(dev)
        sched = self.k_schedule
        cfg = {
            "format": _FORMAT,
            "version": _FORMAT_VERSION,
            "skdict_version": __version__,
            "params": params,
            "k_schedule": None if sched is None else {**vars(sched)},
            "fitted": {a: getattr(self, a) for a in _FITTED_SCALARS},
        }
        if hasattr(self, "feature_names_in_"):
            cfg["feature_names_in"] = [str(f) for f in self.feature_names_in_]
        tensors = {key: np.ascontiguousarray(getattr(self, attr))
                   for attr, key in _FITTED_ARRAYS.items()}
        for name, arr in self.history_.items():
            tensors[f"history.{name}"] = np.ascontiguousarray(arr, dtype=np.float64)
        tensors["loss_curve"] = np.ascontiguousarray(self.loss_curve_, dtype=np.float64)
        resume = getattr(self, "_resume", None)
        if resume is not None:
            flat, meta = _flatten(resume, "resume")
            tensors.update(flat)
            cfg["resume"] = meta
            cfg["trained_with"] = dict(getattr(self, "_trained_with", {}))
        with open(path / "config.json", "w") as f:
            json.dump(cfg, f, indent=2)
        save_file(tensors, str(path / "model.safetensors"))
        return path

    @classmethod
    def load(cls, path, **overrides):
        """Load a model written by :meth:`save`.

        Everything read is validated as strictly as a fitted model: the format
        version, the parameters (as by ``set_params``), the fitted scalars, the
        shapes, dtypes and finiteness of every array and of the saved training
        state (optimizer moments, buffers, batch-order generator). A truncated,
        corrupted or inconsistent file raises a ``ValueError`` naming the file
        and the field.

        Parameters
        ----------
        path : str or os.PathLike
        **overrides
            Parameters to set (e.g. ``device="cpu"``).

        Returns
        -------
        KSparseAutoencoder
        """
        path = Path(path)
        cfg_file, weights_file = path / "config.json", path / "model.safetensors"
        if not cfg_file.exists():
            raise ValueError(f"{cfg_file} not found; pass the directory written by save().")
        cfg = read_json(cfg_file)
        if cfg.get("format") != _FORMAT:
            raise LoadError(f"{cfg_file} is not a KSparseAutoencoder config (its 'format' is "
                            f"{cfg.get('format')!r}, expected {_FORMAT!r}).")
        version = cfg.get("version")
        if version != _FORMAT_VERSION:
            newer = isinstance(version, int) and version > _FORMAT_VERSION
            raise LoadError(
                f"{cfg_file} has format version {version!r}; this skdict reads version "
                f"{_FORMAT_VERSION}" + (": upgrade skdict to load it." if newer else ".")
            )
        for name, kind in (("params", dict), ("fitted", dict)):
            if not isinstance(cfg.get(name), kind):
                raise LoadError(f"{cfg_file} lacks the {name!r} mapping.")
        params = dict(cfg["params"])
        valid = cls().get_params()
        unknown = sorted(set(params) - set(valid))
        if unknown:
            raise LoadError(f"{cfg_file}: 'params' has unknown parameters {unknown}.")
        if params.get("prefix_sizes") is not None:
            params["prefix_sizes"] = tuple(params["prefix_sizes"])
        if cfg.get("k_schedule") is not None:
            params["k_schedule"] = _read_schedule(cfg["k_schedule"], cfg_file)
        est = cls(**params)
        try:
            est._validate_params()
        except ValueError as exc:
            raise LoadError(f"{cfg_file}: 'params': {exc}") from None
        est.set_params(**overrides)  # unknown names: ValueError listing the valid ones
        est._validate_params()
        t = check_model_arrays(read_safetensors(weights_file), weights_file,
                               required=tuple(_FITTED_ARRAYS.values()))
        K, d = t["W_dec"].shape
        fitted = {}
        for attr, kind in _FITTED_SCALARS.items():
            if attr not in cfg["fitted"]:
                raise LoadError(f"{cfg_file}: 'fitted' lacks {attr!r}.")
            where = f"{cfg_file}: 'fitted.{attr}'"
            v = cfg["fitted"][attr]
            fitted[attr] = (check_count(v, where) if kind is int else
                            check_positive_finite(v, where) if attr == "input_scale_" else
                            check_fraction(v, where))
        for attr, expected in (("n_features_in_", d), ("n_components_", K)):
            if fitted[attr] != expected:
                raise LoadError(f"{cfg_file}: 'fitted.{attr}' is {fitted[attr]}, but the tensors "
                                f"of {weights_file.name} have {expected}.")
        if params.get("n_components", K) != K:
            raise LoadError(f"{cfg_file}: 'params.n_components' is {params['n_components']}, "
                            f"but W_dec in {weights_file.name} has {K} rows.")
        try:
            est._check_params()
        except ValueError as exc:
            raise LoadError(f"{cfg_file}: {exc}") from None
        for attr, key in _FITTED_ARRAYS.items():
            setattr(est, attr, t[key])
        for attr, value in fitted.items():
            setattr(est, attr, value)
        est.history_ = {}
        for n, v in t.items():
            if n.startswith("history.") or n == "loss_curve":
                if v.ndim != 1:
                    raise LoadError(f"{weights_file}: tensor {n!r} must be 1-D, got shape "
                                    f"{v.shape}.")
                v = v.astype(np.float64, copy=False)
                if n == "loss_curve":
                    est.loss_curve_ = v
                else:
                    est.history_[n.split(".", 1)[1]] = v
        if not hasattr(est, "loss_curve_"):
            raise LoadError(f"{weights_file} lacks tensors ['loss_curve'].")
        if "feature_names_in" in cfg:
            names = cfg["feature_names_in"]
            if not isinstance(names, list) or len(names) != d or not all(
                isinstance(n, str) for n in names
            ):
                raise LoadError(f"{cfg_file}: 'feature_names_in' must be {d} strings.")
            est.feature_names_in_ = np.asarray(names, dtype=object)
        if "resume" in cfg:
            try:
                resume = _unflatten(cfg["resume"], t, "resume")
            except (KeyError, TypeError, ValueError, AttributeError) as exc:
                raise LoadError(f"{cfg_file}: 'resume' does not match the tensors of "
                                f"{weights_file.name} ({exc!r}).") from None
            extra = sorted(k for k in (resume.get("params") or {}) if k not in PARAMS)
            shapes = [t[k].shape for k in PARAMS] + [
                np.shape(resume["params"][k]) for k in extra]
            check_resume(resume, cfg_file, param_shapes=shapes, K=K)
            est._resume = resume
            # what the saved training state was built for (a load override may differ)
            trained = cfg.get("trained_with", {p: params.get(p) for p in cls._resume_params})
            if not isinstance(trained, dict):
                raise LoadError(f"{cfg_file}: 'trained_with' must be a mapping.")
            est._trained_with = trained
        return est

    # ------------------------------------------------------------------ SAELens
    @classmethod
    def from_saelens(cls, path, **params):
        """Build a fitted estimator from an SAE saved in SAELens' format.

        Reads ``cfg.json`` and ``sae_weights.safetensors`` (``W_enc`` of shape
        ``(d_in, d_sae)``, ``W_dec`` ``(d_sae, d_in)``, ``b_enc``, ``b_dec`` and
        the architecture's own tensors, e.g. JumpReLU's ``threshold``).
        Architectures: ``"topk"``, ``"batchtopk"``, ``"matryoshka_batchtopk"``,
        ``"jumprelu"`` and ``"standard"`` (ReLU codes, as ``sparsity="l1"``).
        When the config says ``apply_b_dec_to_input: false`` the encoder bias
        absorbs ``b_dec``, and with ``rescale_acts_by_decoder_norm: true`` the
        decoder row norms are folded into the encoder (as SAELens does when it
        saves an inference model), so that codes and reconstructions match
        SAELens'. Decoder rows are otherwise used as saved (not renormalised).
        The model can be fine-tuned with :meth:`partial_fit` (fresh optimizer).

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
        _, init, arrays = read_saelens(path)
        d_sae, d_in = arrays["W_dec"].shape
        init.setdefault("k", min(32, d_sae))
        est = cls(**init)
        cfg_file = Path(path) / CFG_FILE
        try:  # what the config says, checked before the caller's overrides
            est._validate_params()
            est._check_params()
        except ValueError as exc:
            raise LoadError(f"{cfg_file}: {exc}") from None
        est.set_params(**params)  # unknown names: ValueError listing the valid ones
        est._validate_params()
        est._check_params()
        arrays["tokens_since_fired"] = np.zeros(d_sae, dtype=np.int64)
        for attr, key in _FITTED_ARRAYS.items():
            setattr(est, attr, arrays[key])
        fitted = {"n_features_in_": d_in, "n_components_": d_sae, "input_scale_": 1.0,
                  "dead_fraction_": 0.0, "n_steps_": 0, "n_iter_": 0}
        for attr, value in fitted.items():
            setattr(est, attr, value)
        est.history_ = {}
        est.loss_curve_ = np.zeros(0)
        return est

    def to_saelens(self, path):
        """Write the model in SAELens' format (``cfg.json`` and
        ``sae_weights.safetensors``), loadable with SAELens'
        ``SAE.load_from_disk(path)`` and with :meth:`from_saelens`.

        The architecture is the variant's inference rule: ``"topk"`` (``"topk"``,
        ``"lifetime"``), ``"jumprelu"`` (``"jumprelu"``, and ``"batchtopk"`` /
        ``"matryoshka"`` with their global threshold on every latent, as
        SAELens saves BatchTopK SAEs) or ``"standard"`` (``"l1"``, ``"kl"``).
        ``input_scale_`` is folded into the weights (``W_enc / s``, ``W_dec * s``,
        ``b_dec * s``), so SAELens reads raw inputs.

        Parameters
        ----------
        path : str or os.PathLike
            Directory (created if needed).

        Returns
        -------
        pathlib.Path
        """
        self._check_ready()
        arrays = {key: getattr(self, attr) for attr, key in _FITTED_ARRAYS.items()}
        return write_saelens(path, self._variant(), arrays, self.input_scale_)


def check_fraction(value, where):
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 <= value <= 1:
        raise LoadError(f"{where} must be a number in [0, 1], got {value!r}.")
    return float(value)


def _read_schedule(s, cfg_file):
    """The saved ``k`` schedule (with its progress), validated like a new one."""
    names = ("initial", "final", "warmup_steps", "schedule", "accuracy_threshold", "n_steps",
             "integer", "progress_")
    if not isinstance(s, dict) or any(n not in s for n in names):
        raise LoadError(f"{cfg_file}: 'k_schedule' must be a mapping with {list(names)}.")
    try:
        sched = AdaptiveSparsityScheduler(
            s["initial"], s["final"], s["warmup_steps"], schedule=s["schedule"],
            accuracy_threshold=s["accuracy_threshold"], n_steps=s["n_steps"],
            integer=s["integer"],
        )
    except (TypeError, ValueError) as exc:
        raise LoadError(f"{cfg_file}: 'k_schedule': {exc}") from None
    sched.progress_ = check_count(s["progress_"], f"{cfg_file}: 'k_schedule.progress_'")
    return sched


def _export(value):
    """:func:`~skdict.training.state.to_portable` without copying tensors (views on
    the CPU): for the state of a finished run, whose tensors are not used again."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    if isinstance(value, dict):
        return {k: _export(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_export(v) for v in value)
    return to_portable(value)


def _flatten(tree, prefix):
    """Nested dicts of numpy arrays / python values -> ``({key: array}, meta)``:
    arrays go to safetensors under dotted keys, everything else into ``meta``."""
    flat, meta = {}, {}
    for k, v in tree.items():
        key = f"{prefix}.{k}"
        if isinstance(v, np.ndarray):
            flat[key] = np.ascontiguousarray(v)
            meta[str(k)] = {"array": key, "int_key": isinstance(k, int)}
        elif isinstance(v, dict):
            sub_flat, sub_meta = _flatten(v, key)
            flat.update(sub_flat)
            meta[str(k)] = {"dict": sub_meta, "int_key": isinstance(k, int)}
        else:
            meta[str(k)] = {"value": v, "int_key": isinstance(k, int)}
    return flat, meta


def _unflatten(meta, tensors, prefix):
    out = {}
    for k, m in meta.items():
        key = int(k) if m["int_key"] else k
        if "array" in m:
            out[key] = np.array(tensors[m["array"]])
        elif "dict" in m:
            out[key] = _unflatten(m["dict"], tensors, f"{prefix}.{k}")
        else:
            out[key] = m["value"]
    return out

