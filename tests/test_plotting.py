"""Dictionary grids and activation-density histograms (Agg backend)."""

import sys

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import scipy.sparse as sp  # noqa: E402
import torch  # noqa: E402

from skdict.plotting import plot_activation_density, plot_dictionary  # noqa: E402


@pytest.fixture(autouse=True)
def _close():
    yield
    plt.close("all")


def _images(fig):
    return [im for a in fig.axes for im in a.get_images()]


def test_plot_dictionary_square_atoms(rng):
    D = rng.normal(size=(10, 16))
    fig = plot_dictionary(D, title="atoms")
    assert isinstance(fig, matplotlib.figure.Figure)
    ims = _images(fig)
    assert len(fig.axes) == 10 and len(ims) == 10
    for i, im in enumerate(ims):
        np.testing.assert_array_equal(im.get_array(), D[i].reshape(4, 4))
        vmin, vmax = im.get_clim()
        assert vmin == -vmax == -np.abs(D[i]).max()  # per-atom symmetric range
    assert fig._suptitle.get_text() == "atoms"
    # 10 atoms -> ceil(sqrt(10)) = 4 columns, 3 rows
    gs = fig.axes[0].get_subplotspec().get_gridspec()
    assert gs.get_geometry() == (3, 4)
    fig.canvas.draw()


def test_plot_dictionary_shapes_inputs_and_options(rng):
    D = rng.normal(size=(6, 24))
    fig = plot_dictionary(torch.as_tensor(D), (4, 6), n_cols=2, normalize="global")
    ims = _images(fig)
    assert len(ims) == 6 and ims[0].get_array().shape == (4, 6)
    assert fig.axes[0].get_subplotspec().get_gridspec().get_geometry() == (3, 2)
    assert all(im.get_clim() == (-np.abs(D).max(), np.abs(D).max()) for im in ims)
    fig = plot_dictionary(sp.csr_array(D[:, :16]), max_atoms=4, normalize=None)
    assert len(_images(fig)) == 4
    # drawing into an existing Axes puts the grid in its slot
    fig, (a0, a1) = plt.subplots(1, 2)
    out = plot_dictionary(D[:, :16], ax=a1)
    assert out is fig and len(fig.axes) == 2 + 6
    # drawing into a given Figure
    fig = plt.figure()
    assert plot_dictionary(D[:, :16], ax=fig) is fig and len(fig.axes) == 6


@pytest.mark.parametrize(
    "args, kwargs, match",
    [
        ((np.zeros((3, 10)),), {}, "not a perfect square"),
        ((np.zeros((3, 10)), (3, 3)), {}, "does not match n_features=10"),
        ((np.zeros((3, 9)),), {"normalize": "minmax"}, "normalize must be"),
        ((np.zeros((0, 9)),), {}, "non-empty 2-D"),
        ((np.zeros((3, 9)),), {"n_cols": 0}, "n_cols must be >= 1"),
        ((np.zeros((3, 9)),), {"ax": "here"}, "ax must be None"),
    ],
)
def test_plot_dictionary_errors(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        plot_dictionary(*args, **kwargs)


def test_missing_matplotlib_message(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    with pytest.raises(ImportError, match=r"pip install skdict\[plot\]"):
        plot_dictionary(np.ones((4, 9)))


def test_plot_activation_density(rng):
    codes = (rng.random((2000, 40)) < np.linspace(0.001, 0.5, 40)) * 1.0
    codes[:, :3] = 0.0  # three dead atoms
    fig = plot_activation_density(codes, title="density")
    (ax,) = fig.axes
    counts = [p.get_height() for p in ax.patches]
    assert sum(counts) == 37  # one entry per live atom
    assert "37 active atoms, 3 dead" in ax.get_legend().get_texts()[0].get_text()
    assert ax.get_title() == "density"
    # CSR codes (with an explicit zero) and precomputed densities give the same bars
    csr = sp.csr_array(codes)
    csr.data[0] = 0.0
    ref = np.count_nonzero(codes, axis=0) / 2000
    if csr.indices[0] < 40:
        ref[csr.indices[0]] -= 1 / 2000
    for inp in (csr, ref):
        _, ax2 = plt.subplots()
        plot_activation_density(inp, ax=ax2)
        assert sum(p.get_height() for p in ax2.patches) == np.count_nonzero(ref)
    with pytest.raises(ValueError, match=r"must lie in \[0, 1\]"):
        plot_activation_density(np.array([0.5, 2.0]))
    with pytest.raises(ValueError, match="got 3 dimensions"):
        plot_activation_density(np.zeros((2, 2, 2)))
