"""Dictionary learning with Locally Competitive Algorithm inference."""

from __future__ import annotations

import numbers

import numpy as np
import torch
from sklearn.base import _fit_context
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.validation import check_is_fitted

from ._backend import make_generator, torch_dtype
from .base import BaseSparseCoder, check_input, iter_batches, n_samples_of
from .dictionary.online import (
    bcd_update,
    forgetting_factor,
    init_dictionary,
    normalize_atoms,
    online_statistics_update,
    resample_atoms,
    sgd_update,
)
from .functional import encode_block, encode_codes
from .operators import as_operator
from .solvers.registry import solver_names

__all__ = ["LCASparseCoder"]


def _batch_objective(X, codes, D, alpha, threshold):
    R = X - codes @ D
    rss = 0.5 * (R * R).sum(1)
    if threshold == "hard":
        return rss + 0.5 * alpha**2 * (codes != 0).sum(1).to(X.dtype)
    return rss + alpha * codes.abs().sum(1)


class LCASparseCoder(BaseSparseCoder):
    """Sparse coding with a learned dictionary and LCA inference.

    ``fit`` alternates, over minibatches, LCA inference of the codes (Rozell et
    al. 2008) with a dictionary update: the online block-coordinate update of
    Mairal et al. (2010) on the sufficient statistics ``A = sum a^T a``,
    ``B = sum a^T x`` (``dict_update="online"``, default), or the Hebbian
    gradient step of Olshausen & Field (1996) (``dict_update="sgd"``). Atoms are
    kept at unit norm and atoms unused for ``resample_window`` rows are
    re-initialised from badly reconstructed rows.

    With the soft threshold the codes solve, per row::

        argmin_a  0.5 * ||x - a @ components_||^2 + alpha * ||a||_1

    Parameters
    ----------
    n_components : int, default=None
        Number of atoms; None means ``n_features`` (a complete dictionary).
    alpha : float, default=1.0
        Threshold of the LCA (the L1 weight for ``threshold="soft"``; for
        ``"hard"`` the L0 penalty ``alpha**2 / 2`` per non-zero).
    tau : float, default=None
        LCA time constant in units of the step; None uses the largest eigenvalue
        of the Gram matrix, the fastest stable value.
    max_iter : int, default=100
        LCA iterations per minibatch during ``fit`` (iterations of
        ``fit_algorithm`` when it is iterative).
    tol : float, default=1e-5
        LCA stopping tolerance (relative duality gap for the soft threshold,
        relative change of the potentials for the hard one), in fit and
        transform.
    threshold : {"soft", "hard"}, default="soft"
    positive_code : bool, default=False
        Non-negative codes (rectified LCA).
    fit_algorithm : {"lca", "exact", "fista"}, default="lca"
        Inference used on each minibatch during ``fit`` / ``partial_fit``.
        ``"exact"`` (soft threshold only) gives the exact lasso codes with the
        active-set solver, which on natural images is much faster than running
        LCA to convergence (see ``benchmarks/fit.py``).
    transform_algorithm : {"lca", "exact", "fista", "ista", "omp"}, default="lca"
        Encoder used by ``transform`` and ``score``.
    transform_max_iter : int, default=1000
        Iterations of the iterative transform algorithms.
    transform_n_nonzero_coefs : int, default=None
        Atoms per row for ``transform_algorithm="omp"``.
    dict_init : array-like of shape (n_components, n_features), default=None
        Initial dictionary (rows are normalised). None draws atoms from the data.
    dict_update : {"online", "sgd"}, default="online"
        Dictionary update rule (see above).
    learning_rate : float, default=0.1
        Step size of ``dict_update="sgd"``.
    batch_size : int, default=256
        Minibatch size for learning and transform.
    forget_window : int or None, default=None
        ``dict_update="online"`` only: the most rows the sufficient statistics
        remember. None follows Mairal et al. (2010): the memory grows without
        bound (``b**2 + t`` rows after ``t`` minibatches of ``b``), so codes
        computed with early dictionaries linger. A cap forgets them at a steady
        rate ``b / (forget_window + 1)`` per minibatch; on a finite training
        set a window below one epoch converges much faster (e.g. 10000 rows on
        20000 training patches: the issue-3 fit benchmark).
    n_epochs : int, default=10
        Passes over the data in ``fit``.
    resample_window : int or None, default=10000
        Atoms with no non-zero code over this many consecutive rows are
        re-initialised; None disables resampling.
    shuffle : bool, default=True
        Shuffle rows at each epoch.
    random_state : int, RandomState or None, default=None
    device : str or torch.device, default="auto"
    verbose : bool or int, default=False
        Show a progress bar over minibatches.
    sparse_output : bool, default=True
        ``transform`` returns scipy CSR (dense ndarray if False).

    Attributes
    ----------
    components_ : ndarray of shape (n_components, n_features)
        Unit-norm atoms.
    n_iter_ : int
        Epochs run by ``fit`` (or 1 after ``partial_fit`` only).
    n_steps_ : int
        Minibatches processed, over all ``fit`` / ``partial_fit`` calls.
    objective_curve_ : ndarray
        Mean per-row objective of each epoch (``fit``) or call (``partial_fit``),
        evaluated on the minibatch codes before each dictionary update.
    inference_iter_ : ndarray
        LCA iterations used by each minibatch.
    n_resampled_ : int
        Atoms re-initialised so far.

    Examples
    --------
    >>> import numpy as np
    >>> from skdict import LCASparseCoder
    >>> X = np.random.default_rng(0).standard_normal((200, 16))
    >>> lca = LCASparseCoder(n_components=32, alpha=0.5, n_epochs=2,
    ...                      random_state=0, device="cpu").fit(X)
    >>> lca.components_.shape
    (32, 16)
    >>> lca.transform(X[:5]).shape
    (5, 32)
    """

    _parameter_constraints: dict = {
        **BaseSparseCoder._parameter_constraints,
        "n_components": [Interval(numbers.Integral, 1, None, closed="left"), None],
        "alpha": [Interval(numbers.Real, 0, None, closed="left")],
        "tau": [Interval(numbers.Real, 0, None, closed="neither"), None],
        "max_iter": [Interval(numbers.Integral, 1, None, closed="left")],
        "tol": [Interval(numbers.Real, 0, None, closed="left")],
        "threshold": [StrOptions({"soft", "hard"})],
        "positive_code": ["boolean"],
        "fit_algorithm": [StrOptions(set(solver_names(problem="lasso")))],
        "transform_algorithm": [StrOptions(set(solver_names()))],
        "transform_max_iter": [Interval(numbers.Integral, 1, None, closed="left")],
        "transform_n_nonzero_coefs": [
            Interval(numbers.Integral, 1, None, closed="left"),
            None,
        ],
        "dict_init": ["array-like", torch.Tensor, None],
        "dict_update": [StrOptions({"online", "sgd"})],
        "learning_rate": [Interval(numbers.Real, 0, None, closed="neither")],
        "n_epochs": [Interval(numbers.Integral, 1, None, closed="left")],
        "forget_window": [Interval(numbers.Integral, 1, None, closed="left"), None],
        "resample_window": [Interval(numbers.Integral, 1, None, closed="left"), None],
        "shuffle": ["boolean"],
        "random_state": ["random_state"],
        "verbose": ["verbose"],
    }
    _parameter_constraints["batch_size"] = [Interval(numbers.Integral, 1, None, closed="left")]

    def __init__(
        self,
        n_components=None,
        *,
        alpha=1.0,
        tau=None,
        max_iter=100,
        tol=1e-5,
        threshold="soft",
        positive_code=False,
        fit_algorithm="lca",
        transform_algorithm="lca",
        transform_max_iter=1000,
        transform_n_nonzero_coefs=None,
        dict_init=None,
        dict_update="online",
        learning_rate=0.1,
        batch_size=256,
        forget_window=None,
        n_epochs=10,
        resample_window=10000,
        shuffle=True,
        random_state=None,
        device="auto",
        verbose=False,
        sparse_output=True,
    ):
        self.n_components = n_components
        self.alpha = alpha
        self.tau = tau
        self.max_iter = max_iter
        self.tol = tol
        self.threshold = threshold
        self.positive_code = positive_code
        self.fit_algorithm = fit_algorithm
        self.transform_algorithm = transform_algorithm
        self.transform_max_iter = transform_max_iter
        self.transform_n_nonzero_coefs = transform_n_nonzero_coefs
        self.dict_init = dict_init
        self.dict_update = dict_update
        self.learning_rate = learning_rate
        self.batch_size = batch_size
        self.forget_window = forget_window
        self.n_epochs = n_epochs
        self.resample_window = resample_window
        self.shuffle = shuffle
        self.random_state = random_state
        self.device = device
        self.verbose = verbose
        self.sparse_output = sparse_output

    # ------------------------------------------------------------------ helpers
    def _check_params_extra(self):
        if self.threshold == "hard" and self.transform_algorithm not in ("lca", "omp"):
            raise ValueError(
                "threshold='hard' codes are L0-type and only transform_algorithm='lca' "
                f"or 'omp' can reproduce them; got {self.transform_algorithm!r}."
            )
        if self.threshold == "hard" and self.fit_algorithm != "lca":
            raise ValueError(
                "threshold='hard' is only supported by fit_algorithm='lca'; got "
                f"{self.fit_algorithm!r}."
            )

    def _initial_state(self, X, device, dtype, generator, np_rng):
        n_features = X.shape[1]
        K = self.n_components if self.n_components is not None else n_features
        tdtype = torch_dtype(dtype)
        if self.dict_init is not None:
            D0 = self.dict_init
            if isinstance(D0, torch.Tensor):
                D0 = D0.detach().cpu().numpy()
            D0 = np.asarray(D0, dtype=dtype)
            if D0.shape != (K, n_features):
                raise ValueError(
                    f"dict_init has shape {D0.shape}, expected (n_components, "
                    f"n_features) = {(K, n_features)}."
                )
            if not np.all(np.isfinite(D0)):
                raise ValueError("dict_init contains NaN or infinity.")
            D = normalize_atoms(torch.as_tensor(D0, dtype=tdtype).to(device))
        else:
            n = n_samples_of(X)
            m = min(n, max(4 * K, 1024))
            rows = np.sort(np_rng.permutation(n)[:m])
            Xs = _rows(X, rows, device, tdtype)
            D = init_dictionary(Xs, K, generator)
        return {
            "D": D,
            "A": torch.zeros(K, K, dtype=tdtype, device=device),
            "B": torch.zeros(K, n_features, dtype=tdtype, device=device),
            "since_used": torch.zeros(K, dtype=torch.long, device=device),
            "n_seen": 0,
            "n_steps": 0,
            "n_resampled": 0,
        }

    def _step(self, st, Xb, generator):
        """One minibatch: infer codes (``fit_algorithm``), update the dictionary in
        ``st``."""
        D = st["D"]
        fit_alg = getattr(self, "fit_algorithm", "lca")
        enc_state = as_operator(D)
        res = encode_block(
            Xb,
            enc_state,
            algorithm=fit_alg,
            alpha=self.alpha,
            positive=self.positive_code,
            max_iter=self.max_iter,
            tol=self.tol,
            tau=self.tau,
            threshold=self.threshold,
            objective=self.threshold == "soft",
        )
        codes = res.codes
        if res.objective is not None:
            obj = float(res.objective.mean())  # the exact solver's by-product
        else:
            obj = float(_batch_objective(Xb, codes, D, self.alpha, self.threshold).mean())
        b = Xb.shape[0]
        if self.dict_update == "online":
            beta = forgetting_factor(st["n_seen"], b, self.forget_window)
            online_statistics_update(st["A"], st["B"], codes, Xb, beta)
            bcd_update(D, st["A"], st["B"])
        else:
            D = sgd_update(D, Xb, codes, self.learning_rate)
        used = (codes != 0).any(0)
        st["since_used"] = torch.where(
            used, torch.zeros_like(st["since_used"]), st["since_used"] + b
        )
        if self.resample_window is not None:
            dead = st["since_used"] >= self.resample_window
            if bool(dead.any()):
                D, idx = resample_atoms(D, dead, Xb, codes, generator)
                st["A"][idx, :] = 0
                st["A"][:, idx] = 0
                st["B"][idx] = 0
                st["since_used"][idx] = 0
                st["n_resampled"] += int(idx.numel())
        st["D"] = D
        st["n_seen"] += b
        st["n_steps"] += 1
        return obj, res.n_iter

    def _pass(self, st, batches, generator, iters, bar=None):
        """Run :meth:`_step` over ``batches``; append each step's inference
        iterations to ``iters`` and return the row-weighted mean objective."""
        total, count = 0.0, 0
        for Xb in batches:
            obj, it = self._step(st, Xb, generator)
            total += obj * Xb.shape[0]
            count += Xb.shape[0]
            iters.append(it)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(objective=f"{obj:.4g}")
        return total / count

    def _store(self, st, curve, iters, n_iter):
        """Commit fitted state (numpy, portable) only after a successful pass."""
        self.components_ = st["D"].detach().cpu().numpy()
        self._stats = {
            "A": st["A"].detach().cpu().numpy(),
            "B": st["B"].detach().cpu().numpy(),
            "since_used": st["since_used"].cpu().numpy(),
            "n_seen": st["n_seen"],
        }
        self.n_steps_ = st["n_steps"]
        self.n_resampled_ = st["n_resampled"]
        self.objective_curve_ = np.asarray(curve, dtype=np.float64)
        self.inference_iter_ = np.asarray(iters, dtype=np.int64)
        self.n_iter_ = n_iter

    def _progress(self, total):
        if not self.verbose:
            return None
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=type(self).__name__, unit="batch")

    # ------------------------------------------------------------------ fit
    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X, y=None):
        """Learn the dictionary from ``X``.

        Parameters
        ----------
        X : {array-like, sparse matrix, torch.Tensor} of shape (n_samples, n_features)
        y : Ignored

        Returns
        -------
        self
        """
        self._check_params_extra()
        X, dtype = check_input(self, X, reset=True)
        device = self._device()
        seed = _seed_from(self.random_state)
        generator = make_generator(seed, device)
        np_rng = np.random.default_rng(seed)
        st = self._initial_state(X, device, dtype, generator, np_rng)
        self._seed = seed
        n = n_samples_of(X)
        curve, iters = [], []
        n_batches = -(-n // self.batch_size)
        bar = self._progress(self.n_epochs * n_batches)
        tdtype = torch_dtype(dtype)
        for _ in range(self.n_epochs):
            order = np_rng.permutation(n) if self.shuffle else np.arange(n)
            batches = (
                _rows(X, np.sort(order[start : start + self.batch_size]), device, tdtype)
                for start in range(0, n, self.batch_size)
            )
            curve.append(self._pass(st, batches, generator, iters, bar))
        if bar is not None:
            bar.close()
        self._store(st, curve, iters, self.n_epochs)
        return self

    def partial_fit(self, X, y=None):
        """Update the dictionary with one pass over ``X`` in minibatches.

        On failure (invalid input) the previous fitted state is left unchanged.

        Parameters
        ----------
        X : {array-like, sparse matrix, torch.Tensor} of shape (n_samples, n_features)
        y : Ignored

        Returns
        -------
        self
        """
        first = not hasattr(self, "components_")
        if first:
            self._validate_params()
        self._check_params_extra()
        X, dtype = check_input(self, X, reset=first)
        device = self._device()
        seed = _seed_from(self.random_state) if first else self._seed
        step_seed = (seed + 7919 * getattr(self, "n_steps_", 0)) % (2**31 - 1)
        generator = make_generator(step_seed, device)
        tdtype = torch_dtype(dtype)
        if first:
            st = self._initial_state(X, device, dtype, generator, np.random.default_rng(step_seed))
            curve, iters = [], []
        else:
            K, P = self.components_.shape
            st = {
                "D": torch.as_tensor(self.components_, dtype=tdtype).to(device).clone(),
                "A": torch.as_tensor(self._stats["A"], dtype=tdtype).to(device).clone(),
                "B": torch.as_tensor(self._stats["B"], dtype=tdtype).to(device).clone(),
                "since_used": torch.as_tensor(self._stats["since_used"]).to(device).clone(),
                "n_seen": self._stats["n_seen"],
                "n_steps": self.n_steps_,
                "n_resampled": self.n_resampled_,
            }
            curve = list(self.objective_curve_)
            iters = list(self.inference_iter_)
        batches = (Xb for _, _, Xb in iter_batches(X, self.batch_size, device, dtype))
        curve.append(self._pass(st, batches, generator, iters))
        self._store(st, curve, iters, getattr(self, "n_iter_", 0) if not first else 1)
        self._seed = seed
        return self

    # ------------------------------------------------------------------ transform
    def _transform_state(self, device, dtype):
        return as_operator(self.components_, device, dtype)

    def _encode(self, Xb, state):
        return encode_codes(
            Xb,
            state,
            algorithm=self.transform_algorithm,
            alpha=self.alpha,
            n_nonzero_coefs=self.transform_n_nonzero_coefs,
            positive=self.positive_code,
            max_iter=self.transform_max_iter,
            tol=self.tol,
            tau=self.tau,
            threshold=self.threshold,
        )

    def _check_ready(self):
        check_is_fitted(self)


def _seed_from(random_state):
    from sklearn.utils import check_random_state

    return int(check_random_state(random_state).randint(0, 2**31 - 1))


def _rows(X, rows, device, tdtype):
    """Dense tensor of the given (sorted) rows of X on ``device``."""
    if isinstance(X, torch.Tensor):
        idx = torch.as_tensor(rows, device=X.device)
        return X.index_select(0, idx).to(device=device, dtype=tdtype)
    import scipy.sparse as sp

    if sp.issparse(X):
        block = X[rows].toarray()
    else:
        block = np.asarray(X[rows])
    return torch.from_numpy(np.ascontiguousarray(block)).to(device=device, dtype=tdtype)
