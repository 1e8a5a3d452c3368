"""``fit`` / ``partial_fit`` wiring shared by every Trainer-trained estimator."""

from __future__ import annotations

import numpy as np

from .._backend import make_generator
from .._validation import restore_input_attrs_on_error
from ..data.sources import as_source
from .trainer import Trainer

__all__ = ["TrainedEstimatorMixin"]


class TrainedEstimatorMixin:
    """Source -> learner -> :class:`~skdict.training.Trainer` -> fitted attributes.

    An estimator provides:

    * ``_train_dtype(first)``: the compute dtype (None: the input's);
    * ``_make_learner(source, device, first)``: the learner for this call (with a
      ``dtype`` attribute);
    * ``_resume_state(learner, device)``: the training state of the fitted model
      (``partial_fit`` after ``fit``, ``load`` or unpickling), rebuilt from its
      portable copy, raising ``ValueError`` when the parameters no longer match it;
    * ``_commit_state(state, learner)``: its own fitted attributes from a finished
      run.

    A learner with a ``prepare(source, y, generator, single_pass)`` method gets
    the validated source and the ``y`` given to ``fit`` before the run and
    returns the source the trainer reads (e.g. rows joined with their targets).

    optionally ``_resume_params``, the parameters its training state is built for
    (``partial_fit`` refuses to continue when one has changed, as it does for
    ``n_components``); and the parameters ``max_iter``, ``n_steps``,
    ``batch_size``, ``shuffle``, ``callbacks``, ``verbose`` and ``random_state``.
    The mixin sets ``n_steps_``, ``n_iter_``, ``history_`` and ``loss_curve_``.
    Nothing is assigned before the run has returned, and ``n_features_in_`` /
    ``feature_names_in_`` (recorded when ``X`` is validated) are put back when
    it fails, so a failing call leaves the fitted state as it was.
    """

    _epoch_tol_param = None  # name of the parameter that stops on the epoch loss, if any
    # "read": an array is checked for NaN / infinity row batch by row batch as
    # training reads it (see as_source), not whole before the run
    _finite_check = "all"

    # parameters the saved training state depends on (optimizer moments, variant
    # buffers): partial_fit refuses to continue when one of them has changed
    _resume_params = ()

    def _check_resumable(self):
        """``partial_fit`` continues the fitted model: its size, and the parameters
        its training state was built for, cannot change."""
        K = self.components_.shape[0]
        n_components = getattr(self, "n_components", None)
        changed = []
        if n_components is not None and n_components != K:
            changed.append(("n_components", K, n_components))
        trained = getattr(self, "_trained_with", {})
        changed += [(p, trained[p], getattr(self, p)) for p in self._resume_params
                    if p in trained and trained[p] != getattr(self, p)]
        if changed:
            name, old, new = changed[0]
            raise ValueError(
                f"{name} changed from {old!r} to {new!r} since the model was fitted; "
                f"partial_fit continues that model: set {name}={old!r} back, or call fit "
                "to train a new one."
            )

    def _pass_budget(self):
        """``(max_iter, n_rows)`` of ``fit``'s :class:`Trainer`: ``max_iter``
        passes, no row budget (an estimator with a row budget overrides this)."""
        return self.max_iter, None

    # fit data-parallel when a torch.distributed process group is initialised
    _data_parallel = False

    def _shard_source(self, X, comm, first):
        """This rank's source and every rank's row count; a failure on one rank
        (no rows, invalid rows) is raised on all of them."""
        name = type(self).__name__
        src, err = None, None
        n_rows = getattr(X, "shape", (None,))[0]
        if n_rows != 0:
            try:
                src = as_source(X, estimator=self, reset=first, dtype=self._train_dtype(first),
                                finite=self._finite_check)
                if src.is_stream:
                    raise ValueError(
                        f"{name} trains data-parallel on arrays; under torch.distributed "
                        "give each rank its rows as one array (or dask array)."
                    )
            except ValueError as e:
                err = e
        counts = comm.check_shards(0 if src is None else src.n_samples,
                                   0 if src is None else src.n_features, name,
                                   None if err is None else str(err))
        return src, counts

    def _train(self, X, *, first, single_pass, y=None):
        with restore_input_attrs_on_error(self):
            return self._run(X, first=first, single_pass=single_pass, y=y)

    def _run(self, X, *, first, single_pass, y=None):
        if not first:
            # scikit-learn's _fit_context validates partial_fit only until the model
            # is fitted; set_params between calls must not slip through
            self._validate_params()
        self._check_params()
        if not first:
            self._check_resumable()
        device = self._device()
        comm = None
        if self._data_parallel:
            from ..distributed.torch import world_comm

            comm = world_comm()
        if comm is None:
            src = as_source(X, estimator=self, reset=first, dtype=self._train_dtype(first),
                            finite=self._finite_check)
        else:
            src, counts = self._shard_source(X, comm, first)
        if comm is None:
            learner = self._make_learner(src, device, first)
        else:  # a failure on one rank is raised on all of them
            learner = comm.run_together(type(self).__name__, self._make_learner, src, device,
                                        first)
        if comm is not None:  # every rank's rows are its shard of each global batch
            from ..distributed.torch import ShardSource

            learner.use_comm(comm)
            src = ShardSource(src, comm, counts)
        if src.is_dask and hasattr(learner, "apply_statistics"):
            # blocks coded on the workers, statistics tree-reduced there
            from ..distributed.dask import DaskLearner, WaveSource

            learner = DaskLearner(learner, worker_device=getattr(self, "device", "auto"))
            src = WaveSource(src)
        if first:
            state, generator = None, make_generator(self.random_state, "cpu")
            if comm is not None:  # one stream on every rank, even with random_state=None
                comm.broadcast_generator(generator)
        else:
            state = self._resume_state(learner, device)
            generator = state.generator
        prepare = getattr(learner, "prepare", None)
        if prepare is not None:
            src = prepare(src, y, generator, single_pass)
        tol = getattr(self, self._epoch_tol_param) if self._epoch_tol_param else 0.0
        max_iter, n_rows = (1, None) if single_pass else self._pass_budget()
        trainer = Trainer(
            max_iter=max_iter,
            n_steps=None if single_pass else self.n_steps,
            n_rows=n_rows,
            tol=tol,
            callbacks=self.callbacks,
            verbose=self.verbose,
            desc=type(self).__name__,
            batch_size=int(self.batch_size),
            shuffle=self.shuffle,
        )
        plan = getattr(learner, "plan", None)
        if plan is not None:  # the run's length, for learners with a schedule over it
            plan(None if single_pass else trainer.planned_steps(src))
        result = trainer.run(learner, src, state=state, generator=generator, device=device,
                             dtype=learner.dtype)
        state = result.state
        history = state.history_arrays()
        self._commit_state(state, learner)
        self._trained_with = {p: getattr(self, p) for p in self._resume_params}
        self.history_ = history
        self.loss_curve_ = np.asarray(state.epoch_loss, dtype=np.float64)
        self.n_steps_ = int(state.n_steps)
        prev = 0 if first else int(getattr(self, "n_iter_", 0))
        self.n_iter_ = prev + 1 if single_pass else int(result.n_epochs)
        return self
