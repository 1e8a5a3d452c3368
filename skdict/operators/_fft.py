"""Batched 2-D real FFTs on fixed buffers, for the convolutional ADMM.

On the CPU, ``torch.fft.irfft2`` runs 3-7x slower than FFTW's c2r transform
(measured on (2, 64, 256, 256) arrays: float64 ~290 ms vs ~40 ms, 2 threads),
and every out-of-place transform of a large array pays for fresh pages. So a
:class:`RealFFT2` owns one real and one complex buffer and transforms between
them in place: with pyFFTW installed (the ``fftw`` extra) through FFTW plans
on those buffers (``FFTW_ESTIMATE``: planning is free, the transforms within
~20% of ``FFTW_MEASURE``), else with ``torch.fft`` writing into the buffers
(the only choice on CUDA).

Both directions are unnormalised: ``backward(forward(x)) = H * W * x``.
"""

from __future__ import annotations

import torch

__all__ = ["RealFFT2", "fftw_available"]

try:  # optional: the ``fftw`` extra
    import pyfftw as _pyfftw
except ImportError:  # pragma: no cover - depends on the environment
    _pyfftw = None

_NP_DTYPES = {torch.float32: ("float32", "complex64"), torch.float64: ("float64", "complex128")}


def fftw_available():
    """Whether pyFFTW can be imported (CPU transforms go through FFTW)."""
    return _pyfftw is not None


class RealFFT2:
    """``rfft2`` / unnormalised ``irfft2`` over the last two axes of a fixed
    ``(..., H, W)`` real buffer and its ``(..., H, W // 2 + 1)`` spectrum.

    Parameters
    ----------
    shape : tuple
        Shape of the real buffer.
    dtype : torch.dtype
        ``float32`` or ``float64``.
    device : torch.device
    backend : {"auto", "fftw", "torch"}, default="auto"
        ``"auto"``: FFTW on the CPU when pyFFTW is installed, else torch.

    Attributes
    ----------
    real : Tensor
        The real buffer (input of :meth:`forward`, output of :meth:`backward`).
    spec : Tensor
        The complex buffer (output of :meth:`forward`; :meth:`backward`
        overwrites it).
    """

    def __init__(self, shape, dtype, device, backend="auto"):
        shape = tuple(int(s) for s in shape)
        device = torch.device(device)
        self.shape = shape
        self.spec_shape = (*shape[:-1], shape[-1] // 2 + 1)
        if backend == "auto":
            backend = "fftw" if (_pyfftw is not None and device.type == "cpu") else "torch"
        if backend == "fftw" and (_pyfftw is None or device.type != "cpu"):
            raise ValueError("the FFTW backend needs pyFFTW and a CPU tensor")
        self.backend = backend
        if backend == "fftw":
            rdt, cdt = _NP_DTYPES[dtype]
            r = _pyfftw.empty_aligned(shape, dtype=rdt)
            c = _pyfftw.empty_aligned(self.spec_shape, dtype=cdt)
            threads = max(1, torch.get_num_threads())
            # c2r transforms always may overwrite their input: spec is scratch
            self._fwd = _pyfftw.FFTW(r, c, axes=(-2, -1), threads=threads,
                                     flags=("FFTW_ESTIMATE",))
            self._bwd = _pyfftw.FFTW(c, r, axes=(-2, -1), direction="FFTW_BACKWARD",
                                     threads=threads,
                                     flags=("FFTW_ESTIMATE", "FFTW_DESTROY_INPUT"))
            self.real = torch.from_numpy(r)
            self.spec = torch.from_numpy(c)
        else:
            self.real = torch.empty(shape, dtype=dtype, device=device)
            self.spec = torch.empty(self.spec_shape, dtype=torch.complex64
                                    if dtype == torch.float32 else torch.complex128,
                                    device=device)

    def forward(self):
        """``spec <- rfft2(real)``."""
        if self.backend == "fftw":
            self._fwd.execute()
        else:
            torch.fft.rfft2(self.real, out=self.spec)

    def backward(self):
        """``real <- H * W * irfft2(spec)`` (``spec`` is destroyed)."""
        if self.backend == "fftw":
            self._bwd.execute()
        else:
            torch.fft.irfft2(self.spec, s=self.shape[-2:], norm="forward", out=self.real)
