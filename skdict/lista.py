"""Amortised lasso coding: :class:`LISTAEncoder`."""

from __future__ import annotations

import numbers

import numpy as np
import torch
from sklearn.base import _fit_context
from sklearn.utils._param_validation import HasMethods, Interval, StrOptions
from sklearn.utils.validation import check_is_fitted

from ._backend import default_batch_size, numpy_dtype, torch_dtype
from ._validation import check_dictionary
from .base import BaseSparseCoder, batch_sums
from .data.codes import Codes
from .nn.lista import LISTA, VARIANTS
from .training.estimator import TrainedEstimatorMixin
from .training.lista import LISTALearner, LISTAState

__all__ = ["LISTAEncoder"]

_DEFAULT_LR = {"lista": 0.03, "lista_cp": 0.3, "alista": 0.3, "lfista": 0.03}


def _learn_on_rank0(learner, rows, comm):
    """Under a process group: the dictionary ``learner`` learns from every
    rank's rows in their global order (the single-process data), fitted on rank
    0 and broadcast, so every rank trains the encoder for the same atoms."""
    from .distributed.torch import global_rows

    P = rows.shape[1]
    shards = [s.view(-1, P) for s in comm.gather(rows.reshape(-1))]
    D, err = None, None
    if comm.rank == 0:
        counts = [s.shape[0] for s in shards]
        X = rows.new_empty((sum(counts), P))
        for r, s in enumerate(shards):
            X[global_rows(counts, r)] = s
        try:
            D = learner.fit(X.numpy()).components_
        except Exception as e:  # every rank must learn of it, not wait for atoms
            err = e
    head = torch.tensor([err is None, 0 if D is None else D.shape[0]], dtype=torch.long)
    head = comm.broadcast(head)
    if not int(head[0]):
        if err is not None:
            raise err
        raise ValueError(
            "learning the dictionary (dictionary=None) failed on rank 0; see its error."
        )
    buf = torch.from_numpy(D).double() if D is not None else torch.empty(int(head[1]), P,
                                                                         dtype=torch.float64)
    return comm.broadcast(buf).numpy()


class LISTAEncoder(TrainedEstimatorMixin, BaseSparseCoder):
    """A learned, fixed-depth approximation of the lasso codes of a dictionary.

    LISTA (Gregor & LeCun 2010) unrolls ``n_layers`` iterations of ISTA into a
    network whose weights are trained, so that a few layers reach the accuracy
    ISTA or FISTA need many more iterations for. The network
    (:class:`skdict.nn.LISTA`) starts as ISTA and is trained with Adam on the
    rows of ``X`` to minimise the lasso objective of its output::

        0.5 * ||x - a @ components_||^2 + alpha * ||a||_1

    (``loss="objective"``), or to reproduce target codes (``loss="codes"``: the
    exact minimisers from skdict's exact solver, or codes given as ``y``).
    ``transform`` then costs ``n_layers`` matrix products per row, with exact zeros
    from the last threshold.

    Parameters
    ----------
    dictionary : array-like of shape (n_components, n_features), estimator or None
        Atoms as rows, or a fitted estimator with ``components_`` (an skdict or
        scikit-learn dictionary learner), read at ``fit``. None learns a
        dictionary of ``n_components`` atoms from ``X`` first, with
        :class:`LCASparseCoder` (exact lasso codes in training).
    n_components : int, default=None
        Atoms of the dictionary learned when ``dictionary=None`` (None:
        ``n_features``); must be None when a dictionary is given.
    n_layers : int, default=16
        Depth of the network (ISTA iterations unrolled).
    alpha : float, default=None
        L1 weight of the lasso. None takes the dictionary estimator's ``alpha``
        when it has one (e.g. an :class:`LCASparseCoder`), else 1.0.
    variant : {"auto", "lista", "lista_cp", "alista", "lfista"}, default="auto"
        ``"alista"``: the analytic weight of Liu et al. (2019), computed from the
        dictionary; only a step size and a threshold are learned per layer, so
        it trains fastest and needs the fewest rows, but it can only be as good
        as that fixed weight, which suits incoherent (e.g. random
        compressed-sensing) dictionaries and not dictionaries learned from
        natural data. ``"lista_cp"``: coupled weights, ``a + (x - a D) W_k``
        (Chen et al. 2018), one learned matrix and threshold per layer.
        ``"lista"``: untied weights ``W_k``, ``S_k`` and per-atom thresholds in
        every layer. ``"lfista"``: learned FISTA, ``"lista_cp"`` with a learned
        momentum per layer, per-atom thresholds and a learned weight of a
        per-row (Barzilai-Borwein) step, starting as FISTA; the most
        accurate on coherent dictionaries (learned from natural data), where
        FISTA's momentum is what beats ISTA. ``"auto"`` takes ``"alista"`` when
        its untrained network codes the validation rows at least as well as
        ISTA with the same depth, else ``"lfista"`` (see ``variant_``). See
        :mod:`skdict.nn.lista`.
    support_selection : float or "auto", default="auto"
        Largest fraction of each row's codes passed through a layer unshrunk
        (Chen et al.'s support selection), reached at 70 % of the depth; 0
        disables it. ``"auto"``: with ``loss="codes"``, the fraction of
        non-zeros of the training targets; with ``loss="objective"``, 0 (the
        lasso minimiser is shrunk, so entries passed unshrunk cost accuracy).
    loss : {"objective", "codes"}, default="objective"
        ``"objective"``: the lasso objective of the output, relative to
        ``0.5 ||x||^2`` (unsupervised: exact codes are computed only for the
        validation rows). ``"codes"``: squared error to target codes (the exact
        lasso codes of ``X``, or ``y``), relative to their mean energy. The
        objective reaches smaller objective gaps per layer and sparser codes
        (squared error does not penalise small spurious entries).
    max_iter : int, default=30
        Passes over the training rows in ``fit`` (ignored when ``n_steps`` is
        set).
    n_steps : int, default=None
        Adam steps of ``fit`` (cycling over the data); None runs ``max_iter``
        epochs.
    batch_size : int, default=256
        Rows per training step. ``transform`` and ``score`` run the network on
        larger batches (about 64 MB of codes, at least ``batch_size`` rows):
        small products waste most of the time in per-call overhead.
    lr : float, default=None
        Relative learning rate of Adam: each parameter tensor moves by about
        ``lr`` times its initial root-mean-square per step. None: 0.3 for
        ``"lista_cp"`` and ``"alista"``, 0.03 for ``"lista"`` (whose ``S_k`` are
        near the identity, so the same relative step moves them much further).
        ``"lfista"`` counts in FISTA's step ``1 / L`` instead (default 0.03:
        thresholds move by ``lr / L``, weights by a third of it, momentum and
        the per-row step's weight by ``lr / 10`` per step): its momentum turns
        the iteration unstable when the weights outgrow the step.
        ``fit`` decays it to zero over its steps (cosine); ``partial_fit`` uses
        it as is.
    validation_fraction : float, default=0.1
        Fraction of the rows of ``fit`` held out of training, on which
        ``layer_gap_`` and ``layer_nmse_`` are measured (with no row held out,
        on up to 1024 training rows).
    tol : float, default=0.0
        ``fit`` stops when the epoch mean loss improves by less than ``tol``
        relatively; 0 runs ``max_iter`` epochs.
    shuffle : bool or "blocks", default=True
        Batch order of every pass.
    random_state : int, RandomState or None, default=None
        Validation split and batch order.
    device : str or torch.device, default="auto"
    callbacks : list of callable, default=None
        Called after every step with ``{"step", "epoch", "loss", "l0"}``;
        returning ``False`` stops training.
    verbose : bool or int, default=False
        Show a progress bar over the steps.
    sparse_output : bool, default=True
        ``transform`` returns scipy CSR (dense ndarray if False).

    Attributes
    ----------
    components_ : ndarray of shape (n_components, n_features)
        The dictionary the encoder was trained for.
    weights_ : dict of str to ndarray
        The learned tensors of :class:`skdict.nn.LISTA` (its ``state_dict``);
        see :meth:`to_module`.
    alpha_ : float
        The L1 weight used.
    support_selection_ : float
        The support-selection fraction used (``"auto"`` resolved).
    variant_ : str
        The variant trained (``"auto"`` resolved).
    layer_gap_ : ndarray of shape (n_layers,)
        Relative lasso-objective gap ``(F(a_k) - F(a*)) / F(a*)`` of each layer's
        codes ``a_k`` to the exact codes ``a*``, summed over the validation rows.
    layer_nmse_ : ndarray of shape (n_layers,) or None
        ``||a_k - t||^2 / ||t||^2`` of each layer to the validation targets
        ``t`` (``loss="codes"``; None for ``"objective"``).
    history_ : dict of str to ndarray
        Per step: ``"loss"`` and ``"l0"`` (mean non-zeros per row of the output).
    loss_curve_ : ndarray
        Mean loss of each epoch (``fit``) or call (``partial_fit``).
    validation_loss_curve_ : ndarray
        The same loss of the last layer on the validation rows after each epoch
        of ``fit``. ``fit`` keeps the parameters that were best on the validation
        rows (checked after every epoch, and every 256 steps within a longer
        one); a check that finds more than a quarter of the gain over the
        untrained network lost, or the excess of the best loss over that of the
        exact codes (``loss="objective"``; over 0 for ``"codes"``) grown by more
        than half, restarts from the best parameters at half the learning rate.
    n_iter_ : int
        Epochs run by the last ``fit`` (``partial_fit`` adds 1 per call).
    n_steps_ : int
        Adam steps over all calls.
    n_features_in_ : int
    feature_names_in_ : ndarray of shape (`n_features_in_`,)
        Column names of ``X`` when it had string column names (a DataFrame).

    Notes
    -----
    ``fit`` reads ``X`` once and keeps its rows, joined with their target codes,
    as one dense ``(n_samples, n_features + n_components)`` tensor on the device
    (rows and targets are shuffled together by the trainer), so ``X`` must be one
    array, not an iterable of batches. The exact targets cost one exact lasso
    solve per row, once.

    Under ``torch.distributed`` (a process group of more than one rank, e.g.
    ``torchrun``), ``fit`` and ``partial_fit`` train data-parallel: each rank's
    rows are its shard (rank ``r`` holding ``X[r::world]`` is the layout the
    single-process order is rebuilt from), each rank solves its own rows'
    targets, the validation split is drawn over all rows alike on every rank,
    every step's global batch has ``batch_size`` rows and its gradients are
    all-reduced, so all ranks keep identical weights; with ``shuffle=False`` the
    fit reproduces the single-process fit on ``X`` to float tolerance. With
    ``dictionary=None`` the rows are gathered and the dictionary is learned on
    rank 0 and broadcast.

    See Also
    --------
    skdict.nn.LISTA : the network, for use in a model.
    SparseCoder : the exact codes this encoder approximates.

    Examples
    --------
    >>> import numpy as np
    >>> from skdict import LISTAEncoder
    >>> rng = np.random.default_rng(0)
    >>> D = rng.standard_normal((32, 16))
    >>> D /= np.linalg.norm(D, axis=1, keepdims=True)
    >>> X = rng.standard_normal((300, 16))
    >>> enc = LISTAEncoder(D, n_layers=4, alpha=0.5, max_iter=5, random_state=0,
    ...                    device="cpu").fit(X)
    >>> enc.transform(X[:5]).shape
    (5, 32)
    >>> bool(enc.layer_gap_[-1] < enc.layer_gap_[0])
    True
    """

    _parameter_constraints: dict = {
        **BaseSparseCoder._parameter_constraints,
        "dictionary": ["array-like", torch.Tensor, HasMethods(["fit"]), None],
        "n_components": [Interval(numbers.Integral, 1, None, closed="left"), None],
        "n_layers": [Interval(numbers.Integral, 1, None, closed="left")],
        "alpha": [Interval(numbers.Real, 0, None, closed="left"), None],
        "variant": [StrOptions({"auto", *VARIANTS})],
        "support_selection": [Interval(numbers.Real, 0, 1, closed="both"),
                              StrOptions({"auto"})],
        "loss": [StrOptions({"codes", "objective"})],
        "max_iter": [Interval(numbers.Integral, 1, None, closed="left")],
        "n_steps": [Interval(numbers.Integral, 1, None, closed="left"), None],
        "lr": [Interval(numbers.Real, 0, None, closed="neither"), None],
        "validation_fraction": [Interval(numbers.Real, 0, 1, closed="left")],
        "tol": [Interval(numbers.Real, 0, None, closed="left")],
        "shuffle": ["boolean", StrOptions({"blocks"})],
        "random_state": ["random_state"],
        "callbacks": [list, None],
        "verbose": ["verbose"],
    }
    _parameter_constraints["batch_size"] = [Interval(numbers.Integral, 1, None, closed="left")]

    def __init__(
        self,
        dictionary=None,
        *,
        n_components=None,
        n_layers=16,
        alpha=None,
        variant="auto",
        support_selection="auto",
        loss="objective",
        max_iter=30,
        n_steps=None,
        batch_size=256,
        lr=None,
        validation_fraction=0.1,
        tol=0.0,
        shuffle=True,
        random_state=None,
        device="auto",
        callbacks=None,
        verbose=False,
        sparse_output=True,
    ):
        self.dictionary = dictionary
        self.n_components = n_components
        self.n_layers = n_layers
        self.alpha = alpha
        self.variant = variant
        self.support_selection = support_selection
        self.loss = loss
        self.max_iter = max_iter
        self.n_steps = n_steps
        self.batch_size = batch_size
        self.lr = lr
        self.validation_fraction = validation_fraction
        self.tol = tol
        self.shuffle = shuffle
        self.random_state = random_state
        self.device = device
        self.callbacks = callbacks
        self.verbose = verbose
        self.sparse_output = sparse_output

    # ------------------------------------------------------------------ checks
    def _check_params(self):
        if self.dictionary is not None and self.n_components is not None:
            raise ValueError(
                "n_components sets the size of the dictionary learned when "
                "dictionary=None; with a dictionary given, leave n_components=None "
                "(its number of rows is the number of components)."
            )

    def _lr(self, variant):
        if self.lr is not None:
            return float(self.lr)
        return _DEFAULT_LR[variant]

    def _alpha(self):
        if self.alpha is not None:
            return float(self.alpha)
        a = getattr(self.dictionary, "alpha", None)
        return float(a) if isinstance(a, numbers.Real) and a >= 0 else 1.0

    def _read_dictionary(self, X_source):
        """The dictionary as a numpy array, from the parameter (array or fitted
        estimator) or learned from the rows when it is None."""
        d = self.dictionary
        if d is None:
            from .distributed.torch import world_comm
            from .lca import LCASparseCoder

            learner = LCASparseCoder(
                n_components=self.n_components, alpha=self._alpha(), fit_algorithm="exact",
                transform_algorithm="exact", random_state=self.random_state,
                device=self.device, batch_size=self.batch_size,
            )
            rows = X_source.sample(X_source.n_samples, generator=torch.Generator().manual_seed(0),
                                   device="cpu")
            comm = world_comm()
            if comm is None:
                return learner.fit(rows.numpy()).components_
            return _learn_on_rank0(learner, rows, comm)
        if isinstance(d, (np.ndarray, torch.Tensor, list, tuple)) or hasattr(d, "__array__"):
            return check_dictionary(d)
        if not hasattr(d, "components_"):
            raise ValueError(
                f"dictionary must be an array of shape (n_components, n_features) or a "
                f"fitted estimator with components_; {type(d).__name__} has no components_ "
                "(fit it first)."
            )
        return check_dictionary(d.components_, "dictionary.components_")

    # ------------------------------------------------------------------ training
    _epoch_tol_param = "tol"
    _resume_params = ("variant", "n_layers", "loss", "support_selection", "alpha")
    _data_parallel = True  # see skdict.distributed.torch

    def _train_dtype(self, first):
        return None if first else self.components_.dtype

    def _make_learner(self, source, device, first):
        dtype = source.dtype
        if first:
            D = self._read_dictionary(source)
            if D.shape[1] != source.n_features:
                raise ValueError(
                    f"The dictionary has {D.shape[1]} features (columns) but X has "
                    f"{source.n_features}; give a dictionary of shape (n_components, "
                    f"{source.n_features}) or the data it was learned on."
                )
            alpha = self._alpha()
            support = self.support_selection
            variant = self.variant
        else:
            D = self.components_
            alpha, support = self.alpha_, self.support_selection_
            variant = self.variant_
        Dt = torch.as_tensor(np.ascontiguousarray(D, dtype=dtype)).to(device)
        if not bool((Dt != 0).any()):
            raise ValueError("The dictionary is all zeros; it needs non-zero atoms.")
        return LISTALearner(self, Dt, alpha, support, device, dtype, variant=variant)

    def _resume_state(self, learner, device):
        return LISTAState.from_state_dict(self._train_state, device=device,
                                          dtype=torch_dtype(learner.dtype))

    def _commit_state(self, state, learner):
        learner.finish(state)
        module = learner._module(state) if learner.module is None else learner.module
        self.layer_gap_, self.layer_nmse_ = learner.layer_metrics(module)
        if learner.track_best:
            self.validation_loss_curve_ = np.asarray(learner.val_curve, dtype=np.float64)
        self.components_ = learner.D.detach().cpu().numpy()
        self.weights_ = {k: v.detach().cpu().numpy() for k, v in state.params.items()}
        self.alpha_ = learner.alpha
        self.support_selection_ = float(learner.support)
        self.variant_ = learner.variant
        state.params = {k: v.detach() for k, v in state.params.items()}
        self._train_state = state.state_dict()

    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X, y=None):
        """Train the encoder on the rows of ``X``.

        Parameters
        ----------
        X : {array-like, sparse matrix, torch.Tensor} of shape (n_samples, n_features)
        y : {array-like, sparse matrix} of shape (n_samples, n_components), default=None
            Target codes (dense or CSR) for ``loss="codes"``; None uses the exact
            lasso codes of ``X`` at ``alpha``. Must be None for
            ``loss="objective"``. A 1-D ``y`` (class labels passed
            along a :class:`~sklearn.pipeline.Pipeline`) is not codes and is
            ignored.

        Returns
        -------
        self
        """
        return self._train(X, y=y, first=True, single_pass=False)

    @_fit_context(prefer_skip_nested_validation=True)
    def partial_fit(self, X, y=None):
        """Continue training with one pass over ``X`` (the first call starts from
        the analytic initialisation). A failed call leaves the fitted state intact.

        Parameters
        ----------
        X : {array-like, sparse matrix, torch.Tensor} of shape (n_samples, n_features)
        y : {array-like, sparse matrix} of shape (n_samples, n_components), default=None
            As in :meth:`fit`.

        Returns
        -------
        self
        """
        return self._train(X, y=y, first=not hasattr(self, "_train_state"), single_pass=True)

    # ------------------------------------------------------------------ inference
    def to_module(self, device="cpu", dtype=None):
        """The trained network as a :class:`skdict.nn.LISTA` (a copy).

        Parameters
        ----------
        device : str or torch.device, default="cpu"
        dtype : torch.dtype, default=None
            None: the dtype the encoder was trained in.

        Returns
        -------
        skdict.nn.LISTA
        """
        check_is_fitted(self, "weights_")
        td = torch_dtype(dtype if dtype is not None else self.components_.dtype)
        net = self._trained_with  # the structure the weights were trained for
        module = LISTA(torch.as_tensor(self.components_), net["n_layers"], alpha=self.alpha_,
                       variant=self.variant_, support_selection=self.support_selection_,
                       dtype=td, device=device)
        module.load_state_dict({k: torch.as_tensor(v) for k, v in self.weights_.items()})
        return module.requires_grad_(False)

    def _batch_size_for(self, n_codes, dtype):
        return max(int(self.batch_size), default_batch_size(n_codes, dtype))

    def _transform_state(self, device, dtype):
        return self.to_module(device, numpy_dtype(dtype))

    def _encode(self, Xb, module):
        with torch.no_grad():
            return Codes(dense=module(Xb))

    def score(self, X, y=None):
        """Minus the mean lasso objective ``0.5 ||x - a D||^2 + alpha ||a||_1`` of
        the codes of the rows of ``X`` (higher is better).

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
        y : Ignored

        Returns
        -------
        score : float
        """
        self._check_ready()

        def sums(Xb, codes, module):
            out = batch_sums(Xb, codes, module.D, None, ("rss",))
            out["l1"] = codes.dense.double().abs().sum()
            return out

        totals, n, _ = self._reduce(X, fn=sums)
        return -float(0.5 * totals["rss"] + self.alpha_ * totals["l1"]) / n
