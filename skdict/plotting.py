"""Plots of dictionaries and code statistics (matplotlib, imported lazily).

``pip install skdict[plot]`` installs matplotlib.
"""

from __future__ import annotations

import math

import numpy as np
import scipy.sparse as sp

__all__ = ["plot_dictionary", "plot_activation_density"]

_NORMALIZE = ("per_atom", "global", None)


def _pyplot():
    try:
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ImportError(
            "skdict.plotting needs matplotlib: `pip install skdict[plot]`."
        ) from exc
    return plt


def _as_numpy(a):
    if sp.issparse(a):
        return a
    try:
        import torch

        if isinstance(a, torch.Tensor):
            return a.detach().cpu().numpy()
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    return np.asarray(a)


def _figure_and_axes(ax, figsize):
    plt = _pyplot()
    if ax is None:
        fig = plt.figure(figsize=figsize)
    elif hasattr(ax, "add_subplot") and hasattr(ax, "savefig"):
        fig = ax  # a Figure
    elif hasattr(ax, "figure"):
        fig = ax.figure
        ax.set_axis_off()
        return fig, ax.get_subplotspec()
    else:
        raise ValueError(f"ax must be None, a matplotlib Figure or Axes, got {ax!r}.")
    return fig, None


def plot_dictionary(
    components,
    patch_shape=None,
    *,
    n_cols=None,
    ax=None,
    cmap="gray",
    title=None,
    normalize="per_atom",
    max_atoms=None,
):
    """Show dictionary atoms as a grid of small images.

    Parameters
    ----------
    components : array-like of shape (n_components, n_features)
        The atoms, one per row (``estimator.components_``); numpy, torch or scipy
        sparse. Convolutional filters (``ConvDictionaryLearning.components_``)
        of shape ``(n_filters, kh, kw)`` or ``(n_filters, C, kh, kw)`` are shown
        as they are (3 channels as colour, other channel counts side by side);
        ``patch_shape`` is then ignored.
    patch_shape : tuple of int, optional
        Image shape of one atom, ``prod(patch_shape) == n_features``. Inferred as
        ``(p, p)`` when ``n_features`` is a perfect square ``p ** 2``.
    n_cols : int, optional
        Number of columns of the grid; default ``ceil(sqrt(n_atoms))``.
    ax : matplotlib Figure or Axes, optional
        Where to draw: a new figure by default; a Figure is filled with the grid; an
        Axes is replaced by the grid (placed in its slot of the figure).
    cmap : str, default="gray"
        Colormap.
    title : str, optional
        Figure (super) title.
    normalize : {"per_atom", "global", None}, default="per_atom"
        Colour scale: ``"per_atom"`` gives each atom its own symmetric range
        ``[-max|atom|, max|atom|]`` (zero is the middle grey), ``"global"`` one
        symmetric range for all atoms, ``None`` matplotlib's default per image.
    max_atoms : int, optional
        Show only the first ``max_atoms`` atoms.

    Returns
    -------
    matplotlib.figure.Figure
        The figure; it holds one image Axes per atom.

    Examples
    --------
    >>> import numpy as np
    >>> import matplotlib
    >>> matplotlib.use("Agg")
    >>> from skdict.plotting import plot_dictionary
    >>> fig = plot_dictionary(np.random.default_rng(0).normal(size=(16, 64)))
    >>> len(fig.axes)
    16
    """
    D = _as_numpy(components)
    if sp.issparse(D):
        D = D.toarray()
    rgb = False
    if D.ndim == 4 and D.shape[1] == 1:  # single-channel convolutional filters
        D = D[:, 0]
    if D.ndim == 4:  # (n_filters, C, kh, kw): RGB for 3 channels, else side by side
        rgb = D.shape[1] == 3
        D = D.transpose(0, 2, 3, 1) if rgb else D.transpose(0, 2, 1, 3).reshape(
            D.shape[0], D.shape[2], -1)
        patch_shape = D.shape[1:]
        D = D.reshape(D.shape[0], -1)
    elif D.ndim == 3:  # (n_filters, kh, kw) convolutional filters
        patch_shape = D.shape[1:]
        D = D.reshape(D.shape[0], -1)
    if D.ndim == 1:
        D = D[None, :]
    if D.ndim != 2 or D.shape[0] == 0:
        raise ValueError(
            "components must be a non-empty 2-D array (n_components, n_features), "
            f"got shape {D.shape}."
        )
    if max_atoms is not None:
        if int(max_atoms) < 1:
            raise ValueError(f"max_atoms must be >= 1, got {max_atoms!r}.")
        D = D[: int(max_atoms)]
    n_atoms, n_features = D.shape
    if patch_shape is None:
        side = math.isqrt(n_features)
        if side * side != n_features:
            raise ValueError(
                f"n_features={n_features} is not a perfect square: pass patch_shape "
                "(e.g. (height, width)) with height * width == n_features."
            )
        patch_shape = (side, side)
    patch_shape = tuple(int(s) for s in patch_shape)
    if math.prod(patch_shape) != n_features or len(patch_shape) != 2 + rgb:
        raise ValueError(
            f"patch_shape={patch_shape} does not match n_features={n_features}: "
            "need a (height, width) pair with height * width == n_features."
        )
    if normalize not in _NORMALIZE:
        raise ValueError(
            f"normalize must be 'per_atom', 'global' or None, got {normalize!r}."
        )
    if n_cols is None:
        n_cols = math.ceil(math.sqrt(n_atoms))
    n_cols = int(n_cols)
    if n_cols < 1:
        raise ValueError(f"n_cols must be >= 1, got {n_cols}.")
    n_cols = min(n_cols, n_atoms)
    n_rows = math.ceil(n_atoms / n_cols)

    size = (min(1.0 * n_cols, 12.0), min(1.0 * n_rows, 12.0) + (0.4 if title else 0))
    fig, spec = _figure_and_axes(ax, size)
    if spec is None:
        grid = fig.add_gridspec(n_rows, n_cols, wspace=0.05, hspace=0.05)
    else:
        grid = spec.subgridspec(n_rows, n_cols, wspace=0.05, hspace=0.05)
    gmax = float(np.abs(D).max()) if normalize == "global" else None
    for i in range(n_atoms):
        a = fig.add_subplot(grid[i // n_cols, i % n_cols])
        img = D[i].reshape(patch_shape)
        kw = {}
        if rgb:  # zero is mid-grey, as for one channel
            m = (float(np.abs(img).max()) if normalize == "per_atom" else gmax) or 1.0
            img = np.clip(0.5 + 0.5 * img / m, 0, 1) if normalize else (
                (img - img.min()) / ((img.max() - img.min()) or 1.0))
        elif normalize == "per_atom":
            m = float(np.abs(img).max()) or 1.0
            kw = {"vmin": -m, "vmax": m}
        elif normalize == "global":
            kw = {"vmin": -(gmax or 1.0), "vmax": gmax or 1.0}
        a.imshow(img, cmap=cmap, interpolation="nearest", **kw)
        a.set_xticks([])
        a.set_yticks([])
    if title is not None:
        fig.suptitle(title)
    return fig


def plot_activation_density(codes_or_density, ax=None, *, bins=50, title=None):
    """Histogram of log10 activation frequency per atom.

    The activation frequency of an atom is the fraction of samples whose code uses
    it (non-zero). A healthy sparse dictionary has a unimodal bump well below 0
    (each atom rarely active); dead atoms (never active) are counted separately in
    the legend because ``log10(0)`` is undefined.

    Parameters
    ----------
    codes_or_density : array-like or sparse matrix
        Either codes of shape (n_samples, n_components) (dense, scipy sparse or
        torch), or a 1-D array of per-atom frequencies in ``[0, 1]``.
    ax : matplotlib Axes, optional
        Axes to draw on; a new figure by default.
    bins : int, default=50
        Number of histogram bins.
    title : str, optional
        Axes title.

    Returns
    -------
    matplotlib.figure.Figure

    Examples
    --------
    >>> import numpy as np
    >>> import matplotlib
    >>> matplotlib.use("Agg")
    >>> from skdict.plotting import plot_activation_density
    >>> codes = np.random.default_rng(0).random((1000, 32)) < 0.05
    >>> fig = plot_activation_density(codes)
    """
    c = _as_numpy(codes_or_density)
    if sp.issparse(c):
        c = sp.csr_array(c)
        c.eliminate_zeros()
        if c.shape[0] == 0:
            raise ValueError("codes must have at least one sample.")
        density = np.bincount(c.indices, minlength=c.shape[1]) / c.shape[0]
    else:
        c = np.asarray(c)
        if c.ndim == 2:
            if c.shape[0] == 0:
                raise ValueError("codes must have at least one sample.")
            density = np.count_nonzero(c, axis=0) / c.shape[0]
        elif c.ndim == 1:
            density = c.astype(np.float64)
            if density.size and (np.nanmin(density) < 0 or np.nanmax(density) > 1):
                raise ValueError(
                    "A 1-D input is read as per-atom activation frequencies, which "
                    "must lie in [0, 1]."
                )
        else:
            raise ValueError(
                "codes_or_density must be codes (2-D) or per-atom frequencies (1-D), "
                f"got {c.ndim} dimensions."
            )
    plt = _pyplot()
    if ax is None:
        fig, ax = plt.subplots(figsize=(5, 3.5))
    else:
        fig = ax.figure
    alive = density[density > 0]
    n_dead = int(density.size - alive.size)
    ax.hist(np.log10(alive), bins=bins, color="C0",
            label=f"{alive.size} active atoms, {n_dead} dead")
    ax.set_xlabel("log10(activation frequency)")
    ax.set_ylabel("number of atoms")
    ax.legend(loc="upper left", frameon=False)
    if title is not None:
        ax.set_title(title)
    return fig
