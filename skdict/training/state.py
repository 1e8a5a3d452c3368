"""Training state: a dataclass of tensors and counters that can be copied,
exported as portable numpy (fitted attributes never hold device tensors) and
rebuilt on any device."""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field

import numpy as np
import torch

__all__ = ["TrainState", "to_portable", "from_portable"]

_GEN = "__torch_generator__"


def to_portable(value, copy_arrays=True):
    """Tensors -> numpy arrays, generators -> their state, recursively (dicts, lists).
    ``copy_arrays=False``: CPU tensors are exported as views of their memory (for a state
    that is dropped afterwards)."""
    if isinstance(value, torch.Tensor):
        out = value.detach().cpu().numpy()
        return out.copy() if copy_arrays or value.device.type != "cpu" else out
    if isinstance(value, torch.Generator):
        return {_GEN: value.get_state().numpy().copy(), "device": str(value.device)}
    if isinstance(value, dict):
        return {k: to_portable(v, copy_arrays) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(to_portable(v, copy_arrays) for v in value)
    return copy.deepcopy(value)


def from_portable(value, *, device=None, dtype=None):
    """Inverse of :func:`to_portable`: numpy arrays -> tensors on ``device``
    (floating arrays cast to ``dtype`` when given), generator states -> generators
    (on the CPU unless they were on ``device``'s type)."""
    if isinstance(value, np.ndarray):
        t = torch.from_numpy(np.array(value, copy=True))
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        return t.to(device) if device is not None else t
    if isinstance(value, dict):
        if _GEN in value:
            gen_device = torch.device(value["device"])
            if gen_device.type != "cpu" and device is not None:
                gen_device = torch.device(device)
            if gen_device.type != "cpu" and not torch.cuda.is_available():
                gen_device = torch.device("cpu")
            gen = torch.Generator(device=gen_device)
            gen.set_state(torch.from_numpy(np.array(value[_GEN], copy=True)))
            return gen
        return {k: from_portable(v, device=device, dtype=dtype) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(from_portable(v, device=device, dtype=dtype) for v in value)
    return copy.deepcopy(value)


def _clone(value):
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, torch.Generator):
        gen = torch.Generator(device=value.device)
        gen.set_state(value.get_state())
        return gen
    if isinstance(value, dict):
        return {k: _clone(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_clone(v) for v in value)
    return copy.deepcopy(value)


@dataclass
class TrainState:
    """Base of every learner's state.

    Subclasses add their tensors as dataclass fields. The counters are kept
    by :class:`~skdict.training.Trainer`: ``n_steps`` (minibatches), ``n_epochs``
    (passes, partial ones included), ``n_seen`` (rows); ``history`` maps a
    metric name to one value per step and ``epoch_loss`` holds each epoch's
    mean loss.
    """

    n_steps: int = 0
    n_epochs: int = 0
    n_seen: int = 0
    history: dict = field(default_factory=dict)
    epoch_loss: list = field(default_factory=list)

    def clone(self):
        """A deep copy: tensors cloned (same device), generators copied."""
        return type(self)(**{f.name: _clone(getattr(self, f.name))
                             for f in dataclasses.fields(self)})

    def state_dict(self, copy_arrays=True) -> dict:
        """Portable contents: numpy arrays and python values only (``copy_arrays=False``:
        views of the CPU tensors, for a state not used afterwards)."""
        out = {f.name: to_portable(getattr(self, f.name), copy_arrays)
               for f in dataclasses.fields(self)}
        out["history"] = {k: np.asarray(v, dtype=np.float64)
                          for k, v in self.history_arrays().items()}
        out["epoch_loss"] = np.asarray(self.epoch_loss, dtype=np.float64)
        return out

    @classmethod
    def from_state_dict(cls, d: dict, *, device=None, dtype=None):
        """Rebuild from :meth:`state_dict` with tensors on ``device`` (floating
        tensors in ``dtype`` when given)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"{cls.__name__} has no fields {sorted(unknown)}.")
        kw = {}
        for name, value in d.items():
            if name == "history":
                kw[name] = {k: [float(x) for x in np.asarray(v).ravel()]
                            for k, v in value.items()}
            elif name == "epoch_loss":
                kw[name] = [float(x) for x in np.asarray(value).ravel()]
            else:
                kw[name] = from_portable(value, device=device, dtype=dtype)
        return cls(**kw)

    def history_arrays(self) -> dict:
        """``history`` as float64 numpy arrays (tensors converted in one go per metric)."""
        out = {}
        for k, values in self.history.items():
            self.history[k] = values = _floats(values)
            out[k] = np.asarray(values, dtype=np.float64)
        return out


def _floats(values):
    """A list of python floats from floats and 0-d tensors, with one device sync
    per device rather than one per element."""
    if not any(isinstance(v, torch.Tensor) for v in values):
        return list(values)
    out = list(values)
    pos = [i for i, v in enumerate(values) if isinstance(v, torch.Tensor)]
    by_device = {}
    for i in pos:
        by_device.setdefault(values[i].device, []).append(i)
    for idx in by_device.values():
        stacked = torch.stack([values[i].detach().double().reshape(()) for i in idx]).cpu()
        for i, v in zip(idx, stacked.tolist(), strict=True):
            out[i] = v
    return out
