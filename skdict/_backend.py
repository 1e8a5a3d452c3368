"""Small torch helpers shared by the estimators (devices, dtypes, generators).

Nothing here imports scikit-learn, so solvers may use it too.
"""

from __future__ import annotations

import numbers

import numpy as np
import torch

__all__ = [
    "resolve_device",
    "torch_dtype",
    "numpy_dtype",
    "make_generator",
    "to_numpy",
    "default_batch_size",
]


def resolve_device(device) -> torch.device:
    """Turn a user ``device`` argument into a :class:`torch.device`.

    Parameters
    ----------
    device : {"auto", "cpu", "cuda", "cuda:N", "mps"} or torch.device or None
        ``"auto"`` (or None) picks CUDA when it is available, else the CPU.

    Returns
    -------
    torch.device

    Raises
    ------
    ValueError
        If the string is not a device torch knows, or the device is not available
        on this machine.
    """
    if device is None or (isinstance(device, str) and device == "auto"):
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    if isinstance(device, torch.device):
        dev = device
    elif isinstance(device, str):
        try:
            dev = torch.device(device)
        except (RuntimeError, ValueError) as exc:
            raise ValueError(
                f"device={device!r} is not a valid device. Use 'auto', 'cpu', "
                "'cuda', 'cuda:N' or a torch.device."
            ) from exc
    else:
        raise ValueError(f"device must be a string or a torch.device, got {type(device).__name__}.")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"device={str(dev)!r} was requested but CUDA is not available on "
                "this machine. Use device='cpu' or device='auto'."
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(
                f"device={str(dev)!r} was requested but only "
                f"{torch.cuda.device_count()} CUDA device(s) are visible."
            )
    elif dev.type == "mps":
        if not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
            raise ValueError("device='mps' was requested but MPS is not available. Use 'cpu'.")
    elif dev.type != "cpu":
        raise ValueError(f"device={str(dev)!r} is not supported; use 'auto', 'cpu' or 'cuda[:N]'.")
    return dev


_NP_TO_TORCH = {np.dtype(np.float32): torch.float32, np.dtype(np.float64): torch.float64}
_TORCH_TO_NP = {v: k for k, v in _NP_TO_TORCH.items()}


def torch_dtype(dtype) -> torch.dtype:
    """numpy or torch float dtype -> torch dtype (float32 or float64)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    return _NP_TO_TORCH[np.dtype(dtype)]


def numpy_dtype(dtype) -> np.dtype:
    """numpy or torch float dtype -> numpy dtype (float32 or float64)."""
    if isinstance(dtype, torch.dtype):
        return _TORCH_TO_NP[dtype]
    return np.dtype(dtype)


def make_generator(random_state, device) -> torch.Generator:
    """A :class:`torch.Generator` on ``device`` seeded from ``random_state``.

    ``random_state`` follows scikit-learn: None, an int or a
    :class:`numpy.random.RandomState`. The same int on the same device always
    gives the same stream.
    """
    device = torch.device(device)
    if isinstance(random_state, numbers.Integral):
        seed = int(random_state) % (2**63)
    else:
        from sklearn.utils import check_random_state

        seed = int(check_random_state(random_state).randint(0, 2**31 - 1))
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return gen


def to_numpy(t: torch.Tensor) -> np.ndarray:
    """Detach, move to the CPU and return a numpy array (no copy on CPU)."""
    return t.detach().cpu().numpy()


def default_batch_size(width, dtype, *, lo=256, hi=65536, target_bytes=64 * 2**20) -> int:
    """Rows per batch when the caller gives none: about ``target_bytes`` of a dense
    ``(rows, width)`` block (the codes, or a score tile), between ``lo`` and ``hi``."""
    itemsize = np.dtype(numpy_dtype(dtype)).itemsize
    return int(max(lo, min(hi, target_bytes // max(1, int(width) * itemsize))))
