"""The one minibatch loop every learning estimator trains through."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Protocol

import torch

from .state import TrainState, _floats

__all__ = ["Learner", "Trainer", "TrainResult"]


class Learner(Protocol):
    """What an estimator hands the :class:`Trainer`.

    ``init_state(source, generator)`` builds a fresh :class:`TrainState` from the
    data; ``step(state, Xb)`` updates the state with one batch and returns that
    step's metrics (a dict with at least ``"loss"``; values are floats or 0-d
    tensors, kept unsynchronised until the end of the run). An optional
    ``end_epoch(state)`` runs after every pass.
    """

    def init_state(self, source, generator) -> TrainState: ...

    def step(self, state: TrainState, Xb: torch.Tensor) -> dict: ...


@dataclass
class TrainResult:
    """What :meth:`Trainer.run` returns: the new state and what this run did."""

    state: TrainState
    n_epochs: int
    n_steps: int
    stopped: str  # "max_iter", "n_steps", "n_rows", "tol", "callback", "exhausted"


class Trainer:
    """Epochs or steps over a :class:`~skdict.data.sources.RowSource`.

    Parameters
    ----------
    max_iter : int, default=1
        Passes over the data when ``n_steps`` is None (the most passes when
        ``n_rows`` is set).
    n_steps : int, default=None
        Exact number of steps (cycling over the data); overrides ``max_iter``
        and ``n_rows``.
    n_rows : int, default=None
        Row budget when ``n_steps`` is None: passes continue until the rows seen
        by this run reach ``n_rows`` (whole passes, at least one, at most
        ``max_iter``), so a small training set is visited more often than a
        large one. A source of unknown length is counted as it is read.
    tol : float, default=0.0
        Stop when the epoch mean loss improves by less than ``tol * |previous|``
        for ``n_iter_no_change`` consecutive epochs; 0 never stops early.
    n_iter_no_change : int, default=1
    callbacks : list of callable, default=None
        Each is called after every step with ``{"step", "epoch", **metrics}``
        (floats); a callback returning ``False`` stops training.
    verbose : int, default=0
        Show a tqdm progress bar.
    desc : str, default=None
        Label of the progress bar.
    batch_size : int, default=256
    shuffle : bool or "blocks", default=True
        See :meth:`RowSource.batches`.

    Notes
    -----
    ``run`` never touches an estimator: it returns the new state, which the
    estimator commits as fitted attributes. An exception leaves the caller's
    objects as they were when the state passed in was a copy.
    """

    def __init__(self, *, max_iter=1, n_steps=None, n_rows=None, tol=0.0, n_iter_no_change=1,
                 callbacks=None, verbose=0, desc=None, batch_size=256, shuffle=True):
        self.max_iter = max_iter
        self.n_steps = n_steps
        self.n_rows = n_rows
        self.tol = tol
        self.n_iter_no_change = n_iter_no_change
        self.callbacks = list(callbacks or [])
        self.verbose = verbose
        self.desc = desc
        self.batch_size = batch_size
        self.shuffle = shuffle

    def n_passes(self, n_samples):
        """Passes over ``n_samples`` rows when ``n_steps`` is None: ``max_iter``,
        or under a row budget the fewest whole passes that reach ``n_rows``
        (between 1 and ``max_iter``)."""
        if self.n_rows is None:
            return int(self.max_iter)
        return int(min(self.max_iter, max(1, -(-int(self.n_rows) // max(1, int(n_samples))))))

    def planned_steps(self, source):
        """Steps a run over ``source`` will take when nothing stops it early
        (``n_steps``, or whole passes over a source of known length); None for a
        source of unknown length."""
        if self.n_steps is not None:
            return int(self.n_steps)
        per_pass = source.n_batches(self.batch_size)
        if per_pass is None or (self.n_rows is not None and source.n_samples is None):
            return None
        return self.n_passes(source.n_samples) * per_pass

    def _bar(self, source):
        if not self.verbose:
            return None
        from tqdm.auto import tqdm

        return tqdm(total=self.planned_steps(source), desc=self.desc, unit="batch")

    def run(self, learner, source, *, state=None, generator=None, device=None, dtype=None):
        """Train ``learner`` on ``source``.

        Parameters
        ----------
        learner : Learner
        source : RowSource
        state : TrainState, default=None
            State to continue from (pass a copy to keep the original); None calls
            ``learner.init_state``.
        generator : torch.Generator, default=None
            CPU generator of the batch order.
        device, dtype : optional
            Where batches go; default the learner's ``device`` / ``dtype``
            attributes (CPU / the source's dtype when absent).

        Returns
        -------
        TrainResult
        """
        device = device if device is not None else getattr(learner, "device", "cpu")
        dtype = dtype if dtype is not None else getattr(learner, "dtype", None)
        if state is None:
            state = learner.init_state(source, generator)
        one_pass = source.is_stream and not source.reiterable
        if self.n_steps is not None:
            max_epochs = 1 if one_pass else math.inf
        else:
            max_epochs = 1 if one_pass else int(self.max_iter)
        end_epoch = getattr(learner, "end_epoch", None)
        bar = self._bar(source)
        steps = epochs = rows = 0
        stopped = "max_iter"
        prev = None
        no_change = 0
        try:
            while epochs < max_epochs and stopped == "max_iter":
                losses = []
                for Xb in source.batches(self.batch_size, device=device, shuffle=self.shuffle,
                                         generator=generator, dtype=dtype):
                    metrics = learner.step(state, Xb)
                    state.n_steps += 1
                    state.n_seen += int(Xb.shape[0])
                    rows += int(Xb.shape[0])
                    steps += 1
                    for k, v in metrics.items():
                        if isinstance(v, torch.Tensor):
                            v = v.detach()
                        state.history.setdefault(k, []).append(v)
                    losses.append(state.history["loss"][-1])
                    if self.callbacks or bar is not None:
                        info = {"step": state.n_steps, "epoch": state.n_epochs,
                                **{k: _scalar(v) for k, v in metrics.items()}}
                        if bar is not None:
                            bar.update(1)
                            bar.set_postfix(loss=f"{info['loss']:.4g}")
                        if any(cb(info) is False for cb in self.callbacks):
                            stopped = "callback"
                            break
                    if self.n_steps is not None and steps >= self.n_steps:
                        stopped = "n_steps"
                        break
                if not losses:
                    if steps == 0:
                        raise ValueError("No rows were given to fit.")
                    warnings.warn(
                        f"The iterable of batches yielded nothing on pass {epochs + 1} "
                        f"(after {steps} steps); training stopped early. Its __iter__ "
                        "must start over on every call (a list or a DataLoader does).",
                        UserWarning, stacklevel=3,
                    )
                    break
                state.n_epochs += 1
                epochs += 1
                cur = float(sum(_floats(losses)) / len(losses))
                state.epoch_loss.append(cur)
                if end_epoch is not None:
                    end_epoch(state)
                if not math.isfinite(cur):
                    raise ValueError(
                        "The training loss became non-finite; check the scale of X and the "
                        "learning rate."
                    )
                if stopped != "max_iter":
                    break
                if prev is not None and self.tol > 0:
                    no_change = no_change + 1 if prev - cur < self.tol * abs(prev) else 0
                    if no_change >= self.n_iter_no_change:
                        stopped = "tol"
                        break
                prev = cur
                if one_pass:
                    stopped = "exhausted"
                elif self.n_steps is None and self.n_rows is not None and rows >= self.n_rows:
                    stopped = "n_rows"
        finally:
            if bar is not None:
                bar.close()
        if one_pass and stopped in ("exhausted", "max_iter"):
            wanted = (f"n_steps={self.n_steps}" if self.n_steps is not None and steps < self.n_steps
                      else f"max_iter={self.max_iter}" if self.n_steps is None
                      and self.max_iter > 1 and self.n_rows is None
                      # a row budget is met by whatever rows the stream holds
                      else None)
            if wanted is not None:
                warnings.warn(
                    f"The one-pass iterator ran out after {steps} steps ({wanted} was asked "
                    "for): a generator can be read only once. Pass a list of batches or a "
                    "re-iterable (e.g. a DataLoader) to train longer.",
                    UserWarning, stacklevel=3,
                )
        for k in state.history:
            state.history[k] = _floats(state.history[k])
        return TrainResult(state=state, n_epochs=epochs, n_steps=steps, stopped=stopped)


def _scalar(v):
    if isinstance(v, torch.Tensor):
        return float(v)
    return v
