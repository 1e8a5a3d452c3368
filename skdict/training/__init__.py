"""The one training loop (:class:`Trainer`), its state (:class:`TrainState`) and
optimisers (:func:`make_optimizer`)."""

from .optim import make_optimizer
from .state import TrainState
from .trainer import Learner, Trainer, TrainResult

__all__ = ["Learner", "TrainResult", "TrainState", "Trainer", "make_optimizer"]
