"""Natural image patches and the planted sparse data generator."""

import numpy as np
import pytest
import scipy.sparse as sp

from skdict.datasets import (
    load_natural_images,
    load_natural_patches,
    make_sparse_data,
    olshausen_whitening_filter,
)


def _radial_power(X, patch_size):
    """Mean power of the patches' 2-D spectrum at low and mid radial frequency."""
    P = np.abs(np.fft.fft2(X.reshape(-1, patch_size, patch_size))) ** 2
    P = P.mean(axis=0)
    f = np.fft.fftfreq(patch_size)
    rho = np.sqrt(f[:, None] ** 2 + f[None, :] ** 2)
    low = P[(rho > 0) & (rho <= 1.5 / patch_size)].mean()
    mid = P[(rho > 0.2) & (rho <= 0.35)].mean()
    return low, mid


def test_images():
    ims = load_natural_images()
    assert [im.shape for im in ims] == [(427, 640), (427, 640)]
    assert all(0 <= im.min() and im.max() <= 1 for im in ims)
    (small,) = load_natural_images("china", downsample=3)
    assert small.shape == (142, 213)
    # block averaging: the mean is preserved up to the cropped border
    np.testing.assert_allclose(small.mean(), ims[0][:426, :639].mean(), rtol=1e-12)


@pytest.mark.parametrize("whiten", [None, "olshausen", "zca"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_patches_shape_dtype_mean_scale(whiten, dtype):
    X = load_natural_patches(6, 500, whiten=whiten, random_state=0, dtype=dtype)
    assert X.shape == (500, 36) and X.dtype == dtype
    np.testing.assert_allclose(X.mean(axis=1), 0, atol=1e-5)  # DC removed
    np.testing.assert_allclose(np.mean(X.astype(np.float64) ** 2), 1.0, rtol=1e-5)
    X2 = load_natural_patches(6, 500, whiten=whiten, random_state=0, dtype=dtype)
    np.testing.assert_array_equal(X, X2)
    X3 = load_natural_patches(6, 500, whiten=whiten, random_state=1, dtype=dtype)
    assert not np.allclose(X, X3)


def test_patches_are_image_crops():
    """Raw patches are mean-removed crops of the grayscale images (up to one scale)."""
    X = load_natural_patches(5, 50, images="flower", random_state=3)
    (img,) = load_natural_images("flower")
    crops = np.lib.stride_tricks.sliding_window_view(img, (5, 5)).reshape(-1, 25)
    crops_raw = crops - crops.mean(axis=1, keepdims=True)
    norms = np.linalg.norm(crops_raw, axis=1, keepdims=True)
    crops = np.divide(crops_raw, norms, out=np.zeros_like(crops_raw), where=norms > 0)
    ratios = []
    for x in X[:10]:
        j = np.argmax(crops @ x)
        np.testing.assert_allclose(crops[j] @ x, np.linalg.norm(x), rtol=1e-10)
        ratios.append(np.linalg.norm(x) / np.linalg.norm(crops_raw[j]))
    np.testing.assert_allclose(ratios, ratios[0], rtol=1e-10)  # one global scale


def test_zca_covariance_is_identity():
    X = load_natural_patches(4, 20000, whiten="zca", zca_eps=1e-9, random_state=0)
    C = X.T @ X / len(X)
    # whitened on the subspace orthogonal to the removed DC direction
    P = np.eye(16) - np.full((16, 16), 1 / 16)
    np.testing.assert_allclose(C / C.trace() * 15, P, atol=1e-6)
    # the default eps only shrinks the weakest directions
    ev = np.linalg.eigvalsh(np.cov(load_natural_patches(4, 20000, whiten="zca").T))
    assert ev[1:].max() / ev[1:].min() < 2.0


def test_olshausen_flattens_spectrum():
    raw = _radial_power(load_natural_patches(16, 4000, random_state=0), 16)
    wht = _radial_power(load_natural_patches(16, 4000, whiten="olshausen",
                                             random_state=0), 16)
    # natural images: low frequencies dominate (power ~ 1/f^2)
    assert raw[0] / raw[1] > 10
    # whitened: the spectrum is flat between low and mid frequencies (ramp filter)
    assert 0.5 < wht[0] / wht[1] < 2.0


def test_olshausen_filter():
    filt = olshausen_whitening_filter((64, 64), f0=0.4)
    assert filt[0, 0] == 0.0  # DC removed
    f = np.fft.fftfreq(64)
    np.testing.assert_allclose(filt[0, 8], f[8] * np.exp(-((f[8] / 0.4) ** 4)))
    np.testing.assert_allclose(filt, filt[::-1, ::-1][np.r_[-1, :63]][:, np.r_[-1, :63]])


def test_patches_normalize_and_downsample():
    X = load_natural_patches(8, 200, normalize=True, downsample=2)
    np.testing.assert_allclose(np.linalg.norm(X, axis=1), 1.0)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"patch_size": 500}, "patch_size=500 is larger than the image"),
        ({"patch_size": 100, "downsample": 5}, "after downsample=5"),
        ({"patch_size": 0}, "patch_size must be an integer >= 1"),
        ({"n_patches": 0}, "n_patches must be an integer >= 1"),
        ({"whiten": "pca"}, "whiten must be None, 'olshausen' or 'zca'"),
        ({"downsample": 0}, "downsample must be an integer >= 1"),
        ({"images": ("lena",)}, "Unknown image 'lena'"),
        ({"images": ()}, "at least one image"),
        ({"dtype": np.int32}, "dtype must be float32 or float64"),
        ({"f0": -1.0}, "f0 must be a positive number"),
        ({"zca_eps": -1.0}, "zca_eps must be a non-negative"),
    ],
)
def test_patches_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        load_natural_patches(**{"n_patches": 10, **kwargs})


@pytest.mark.parametrize("positive", [False, True])
def test_make_sparse_data_structure(positive):
    X, D, A = make_sparse_data(300, 20, 50, 4, positive=positive, random_state=0)
    assert X.shape == (300, 20) and D.shape == (50, 20) and A.shape == (300, 50)
    np.testing.assert_allclose(np.linalg.norm(D, axis=1), 1.0)
    np.testing.assert_array_equal(np.count_nonzero(A, axis=1), 4)
    np.testing.assert_allclose(X, A @ D, rtol=1e-12, atol=1e-12)
    nz = A[A != 0]
    assert np.all(np.abs(nz) >= 1) and np.all(np.abs(nz) <= 2)
    assert np.all(nz > 0) if positive else (nz < 0).any() and (nz > 0).any()
    # supports are spread over all atoms
    assert np.count_nonzero(A.any(axis=0)) == 50


def test_make_sparse_data_noise_dtype_sparse_and_seed():
    X, D, A = make_sparse_data(2000, 10, 15, 2, noise=0.1, random_state=1,
                               dtype=np.float32, sparse_codes=True)
    assert sp.issparse(A) and A.format == "csr"
    assert X.dtype == D.dtype == A.dtype == np.float32
    np.testing.assert_array_equal(np.diff(A.indptr), 2)
    resid = X - A @ D
    np.testing.assert_allclose(resid.std(), 0.1, rtol=0.05)
    X2, D2, A2 = make_sparse_data(2000, 10, 15, 2, noise=0.1, random_state=1,
                                  dtype=np.float32, sparse_codes=True)
    np.testing.assert_array_equal(X, X2)
    np.testing.assert_array_equal(A.toarray(), A2.toarray())


@pytest.mark.parametrize(
    "args, kwargs, match",
    [
        ((10, 5, 4, 5), {}, "n_nonzero_coefs=5 must be <= n_components=4"),
        ((0, 5, 4, 2), {}, "n_samples must be an integer >= 1"),
        ((10, 5, 4, 0), {}, "n_nonzero_coefs must be an integer >= 1"),
        ((10, 5, 4, 2), {"noise": -1}, "noise must be a non-negative"),
    ],
)
def test_make_sparse_data_errors(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_sparse_data(*args, **kwargs)
