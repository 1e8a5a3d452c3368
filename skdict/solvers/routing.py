"""Routing: pick the ``s`` best atoms of a large dictionary for each row.

Exact routing (:func:`route_topk`) scores a batch against the dictionary one
K-tile at a time and merges each tile's best ``s`` atoms into a running top-s,
so the ``(batch, K)`` score matrix never exists beyond one ``(batch, tile)``
block. Inside a tile the selection is itself two-staged and exact: the tile is
split into strided groups of ``group`` atoms, a group's maximum is taken with
one vectorised pass, only the best ``s`` groups are searched for the best ``s``
atoms (the ``s`` best atoms always lie in the ``s`` groups with the largest
maxima). This keeps the selection cost a small fraction of the GEMM.

On CPUs with native bfloat16 arithmetic (AVX512-BF16, AMX), float32 routing
of 4,096 atoms or more screens in bfloat16 first: the bfloat16 GEMM runs about
twice as fast, a shortlist of ``2 s + 16`` atoms per row is rescored in float32,
and a bound on the bfloat16 error certifies that the shortlist holds the exact
top-``s``; the rare rows it cannot certify (near-ties) are routed again in
float32. The result is the float32 path's, up to ties at the cut.

Approximate routing (:class:`ClusterIndex`, :func:`route_approx`) first scores
a row against the centroids of a coarse spherical k-means index over the atoms
and then scores only the atoms of its ``n_probes`` nearest clusters. On CPU,
when ``faiss`` is installed (``pip install skdict[faiss]``), the same index is
searched by a FAISS inverted file (:class:`FaissRouter`): it scans the probed
lists in compiled code, where the torch path pays one small matmul per cluster.

The score of atom ``k`` for row ``x`` is ``|<x, d_k>|`` (or ``<x, d_k>`` when
``positive=True``, for non-negative codes).
"""

from __future__ import annotations

import functools
import math
import os

import numpy as np
import torch

__all__ = ["route_topk", "route_dense", "bf16_native", "ClusterIndex", "FaissRouter",
           "route_approx", "faiss_available"]


def faiss_available():
    """Whether the optional ``faiss`` package can be imported."""
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def route_dense(X: torch.Tensor, D: torch.Tensor, s: int, *, positive: bool = False):
    """Naive reference for :func:`route_topk`: full ``(n, K)`` scores then top-k.

    Returns ``(scores, indices)`` of shape ``(n, s)``, sorted by decreasing score.
    """
    S = X @ D.T
    if not positive:
        S = S.abs()
    return S.topk(s, dim=1)


def _tile_topk(S: torch.Tensor, s: int, group: int):
    """Exact top-``s`` (values, column indices) of each row of ``S`` (unsorted)."""
    b, t = S.shape
    if group <= 1 or t % group != 0 or t // group < s or t <= 4 * s:
        k = min(s, t)
        return S.topk(k, dim=1, sorted=False)
    n_groups = t // group
    V = S.view(b, group, n_groups)  # group j = columns {j, j + n_groups, ...}
    gmax = V.amax(1)
    _, gi = gmax.topk(s, dim=1, sorted=False)  # (b, s) best groups
    cand = V.gather(2, gi[:, None, :].expand(b, group, s))  # (b, group, s)
    vals, loc = cand.reshape(b, group * s).topk(s, dim=1, sorted=False)
    r = torch.div(loc, s, rounding_mode="floor")
    j = gi.gather(1, loc - r * s)
    return vals, r * n_groups + j


def route_topk(
    X: torch.Tensor,
    D: torch.Tensor,
    s: int,
    *,
    tile_size: int = 4096,
    positive: bool = False,
    group: int = 16,
    screen: bool | None = None,
):
    """Exact top-``s`` atoms per row by a tiled scan with a running merge.

    Parameters
    ----------
    X : Tensor of shape (n, P)
    D : Tensor of shape (K, P)
        Atoms as rows.
    s : int
        Atoms kept per row (``s <= K``).
    tile_size : int
        Atoms scored at a time; the only score block is ``(n, tile_size)``.
    positive : bool
        Score by ``<x, d>`` instead of ``|<x, d>|``.
    group : int
        Group size of the two-stage selection inside a tile (1 disables it).
    screen : bool, optional
        Score in bfloat16 first and rescore a shortlist in float32, with a
        certificate that the result is the exact top-``s`` (rows that fail it
        are routed again in float32). None: on float32 CPU input without
        autograd, for 4,096 atoms or more, on CPUs with native bfloat16
        (:func:`bf16_native`), where it halves the GEMM's time.

    Returns
    -------
    scores, indices : Tensors of shape (n, s)
        Routing scores and atom indices, sorted by decreasing score.
    """
    n, _ = X.shape
    K = D.shape[0]
    s = int(s)
    if not 1 <= s <= K:
        raise ValueError(f"s={s} must be between 1 and the number of atoms {K}.")
    tile_size = max(int(tile_size), 1)
    if X.device.type == "cpu" and X.dtype in (torch.float32, torch.float64):
        if screen is None:
            screen = _screen_pays(X, D, s)
        if screen and X.dtype == D.dtype == torch.float32:
            return _route_topk_screened(X, D, s, positive, tile_size)
        return _route_topk_cpu(X, D, s, tile_size, positive)
    return _route_topk_torch(X, D, s, tile_size, positive, group)


@functools.lru_cache(maxsize=1)
def bf16_native():
    """Whether this CPU multiplies bfloat16 natively (AVX512-BF16 or AMX), where
    torch's bfloat16 GEMM runs about twice as fast as its float32 one.
    ``SKDICT_BF16_SCREEN=0`` / ``1`` overrides the detection."""
    env = os.environ.get("SKDICT_BF16_SCREEN")
    if env in ("0", "1"):
        return env == "1"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16"})
    except OSError:
        pass
    return False


def _screen_pays(X, D, s):
    """bfloat16 screening where it is certified and faster: float32 CPU input
    without autograd, a dictionary large enough that the GEMM dominates, and a
    shortlist that is a small share of the atoms."""
    K = D.shape[0]
    return (X.dtype == torch.float32 and D.dtype == torch.float32
            and not (X.requires_grad or D.requires_grad)
            and K >= 4096 and _shortlist(s, K) * 8 <= K and bf16_native())


def _shortlist(s, K):
    return min(K, 2 * s + 16)


# inputs rounded to bfloat16 (u = 2**-8 each, u**2 included) and the float32
# accumulation (P 2**-24, P <= 2**12), relative to |x| |d|
_BF16_IN = 2 * 2.0**-8 + 2.0**-16 + 2.0**-12


def _route_topk_screened(X, D, s, positive, tile_size, row_chunk=256, tile=4096):
    """:func:`route_topk` by certified bfloat16 screening: a bfloat16 GEMM per
    ``(row_chunk, tile)`` block merged into per-row buffers cut back to a
    shortlist of ``m = 2 s + 16`` atoms, the shortlist rescored in float32 and
    certified (:mod:`skdict.solvers._kernels.screen`); uncertified rows are
    routed again by the float32 path (tiles of ``tile_size`` atoms), so the
    result is the exact top-``s``."""
    from ._kernels.screen import finish, key_values, rescore_certify, screen_block

    n, K = X.shape[0], D.shape[0]
    m = _shortlist(s, K)
    absval = not positive
    X = X.detach().contiguous()
    D = D.detach().contiguous()
    Xb, Db = X.to(torch.bfloat16), D.to(torch.bfloat16)
    bk = np.zeros((n, 4 * m), dtype=np.uint16)
    bi = np.full((n, 4 * m), -1, dtype=np.int64)
    cnt = np.zeros(n, dtype=np.int64)
    fk = np.zeros(n, dtype=np.uint16)
    buf = None
    # q: 1.5x the tile's share of the m best. A fresh row's floor then lists
    # ~2 m atoms in all (the certificate needs s), and a visited 64-column block
    # is scanned key by key, the screen's main cost: at K=32k, m=144, q 36 -> 27
    # lists 420 -> 280 atoms per row and screens 62 -> 47 ms per 2048 rows
    for r0 in range(0, n, row_chunk):
        r1 = min(n, r0 + row_chunk)
        for k0 in range(0, K, tile):
            k1 = min(K, k0 + tile)
            if buf is None or buf.shape != (r1 - r0, k1 - k0):
                buf = torch.empty((r1 - r0, k1 - k0), dtype=torch.bfloat16)
            torch.matmul(Xb[r0:r1], Db[k0:k1].T, out=buf)
            screen_block(buf.view(torch.int16).numpy().view(np.uint16), k0, bk[r0:r1],
                         bi[r0:r1], cnt[r0:r1], fk[r0:r1], m, absval=absval,
                         q=max(1, math.ceil(1.5 * m * (k1 - k0) / K)))
    finish(bk, bi, cnt, fk, m)
    bk, bi = bk[:, :m], bi[:, :m]
    hv = np.where(bi >= 0, key_values(bk, absval=absval), np.float32(-np.inf))
    floor = key_values(fk, absval=absval)
    dmax = float(D.norm(dim=1).max())
    xin = _BF16_IN * dmax * X.norm(dim=1).numpy()
    # |bf16 score - exact| <= (2 u + P 2**-24) |x| |d| from the inputs and the
    # accumulation, plus the output rounding relative to the score itself
    # (2**-7, truncation included): at most the row's largest listed score
    top = np.maximum(np.abs(np.where(bi >= 0, hv, 0)).max(axis=1), np.abs(floor))
    eps = 1.02 * (xin + 2.0**-7 * (top + xin))
    v, i, ok = rescore_certify(X.numpy(), D.numpy(), bi, floor, eps, s, absval=absval)
    v, i = torch.from_numpy(v), torch.from_numpy(i)
    bad = torch.from_numpy(~ok)
    if bool(bad.any()):
        vb, ib = _route_topk_cpu(X[bad], D, s, tile_size, positive)
        v[bad], i[bad] = vb, ib
    return v, i


def _route_topk_torch(X, D, s, tile_size, positive, group):
    """Device-agnostic path of :func:`route_topk`: per tile, the two-stage exact
    selection, merged into the running top-s."""
    n, K = X.shape[0], D.shape[0]
    best_v = torch.full((n, 0), -math.inf, dtype=X.dtype, device=X.device)
    best_i = torch.zeros((n, 0), dtype=torch.long, device=X.device)
    buf = None
    for k0 in range(0, K, tile_size):
        k1 = min(K, k0 + tile_size)
        t = k1 - k0
        if buf is None or buf.shape[1] != t:
            buf = torch.empty((n, t), dtype=X.dtype, device=X.device)
        torch.matmul(X, D[k0:k1].T, out=buf)
        if not positive:
            buf.abs_()
        v, i = _tile_topk(buf, s, group)
        i = i + k0
        if best_v.shape[1] == 0:
            best_v, best_i = v, i
            continue
        v = torch.cat([best_v, v], dim=1)
        i = torch.cat([best_i, i], dim=1)
        best_v, loc = v.topk(min(s, v.shape[1]), dim=1, sorted=False)
        best_i = i.gather(1, loc)
    best_v, order = best_v.sort(dim=1, descending=True)
    return best_v, best_i.gather(1, order)


def _route_topk_cpu(X, D, s, tile_size, positive):
    """CPU path of :func:`route_topk`: each GEMM tile is merged into per-row heaps
    by one compiled pass (:func:`~skdict.solvers._kernels.select.running_topk`)."""
    from ._kernels.select import running_topk

    n, K = X.shape[0], D.shape[0]
    hv = torch.full((n, s), -math.inf, dtype=X.dtype)
    hi = torch.zeros((n, s), dtype=torch.long)
    hvn, hin = hv.numpy(), hi.numpy()
    X = X.detach().contiguous()
    buf = None
    for k0 in range(0, K, tile_size):
        k1 = min(K, k0 + tile_size)
        if buf is None or buf.shape[1] != k1 - k0:
            buf = torch.empty((n, k1 - k0), dtype=X.dtype)
        torch.matmul(X, D[k0:k1].detach().T, out=buf)
        running_topk(buf.numpy(), k0, hvn, hin, absval=not positive)
    best_v, order = hv.sort(dim=1, descending=True)
    return best_v, hi.gather(1, order)


class ClusterIndex:
    """A coarse index over the atoms: spherical k-means on ``+-d`` directions.

    Atoms ``d`` and ``-d`` give the same routing score ``|<x, d>|``, so the
    similarity used for clustering is ``|<d, c>|`` and each centroid is the
    normalised sign-aligned mean of its atoms (or the plain cosine when
    ``positive=True``).

    Parameters
    ----------
    D : Tensor of shape (K, P)
    n_clusters : int
    n_iter : int
        Lloyd iterations.
    generator : torch.Generator, optional
    positive : bool
    chunk : int
        Atoms scored against the centroids at a time (the largest block is
        ``(chunk, n_clusters)``).

    Attributes
    ----------
    centroids : Tensor (n_clusters, P)
    labels : LongTensor (K,)
    order : LongTensor (K,)
        Atom ids sorted by cluster.
    offsets : LongTensor (n_clusters + 1,)
        Cluster ``c`` holds ``order[offsets[c]:offsets[c + 1]]``.
    """

    faiss = None  # a FaissRouter over this index, when attached (CPU)

    def __init__(self, D, n_clusters, *, n_iter=8, generator=None, positive=False,
                 chunk=8192, centroids=None):
        K = D.shape[0]
        C = max(1, min(int(n_clusters), K))
        self.positive = positive
        if centroids is None:
            perm = torch.randperm(K, generator=generator, device="cpu")[:C].to(D.device)
            cent = D[perm].clone()
            n_iter = int(n_iter)
        else:
            cent = centroids.to(D)
            n_iter = 0
        labels = self._assign(D, cent, chunk)[0]
        for _ in range(n_iter):
            labels, sign = self._assign(D, cent, chunk)
            new = torch.zeros_like(cent)
            new.index_put_((labels,), D * sign[:, None], accumulate=True)
            norms = new.norm(dim=1)
            empty = norms == 0
            if bool(empty.any()):  # re-seed empty clusters with random atoms
                pick = torch.randint(K, (int(empty.sum()),), generator=generator,
                                     device="cpu").to(D.device)
                new[empty] = D[pick]
                norms = new.norm(dim=1)
            cent = new / norms.clamp_min(1e-12)[:, None]
        if n_iter:
            labels = self._assign(D, cent, chunk)[0]
        self.centroids = cent
        self.set_labels(labels, C)

    def set_labels(self, labels, n_clusters):
        self.labels = labels
        self.order = torch.argsort(labels, stable=True)
        counts = torch.bincount(labels, minlength=n_clusters)
        self.offsets = torch.zeros(n_clusters + 1, dtype=torch.long, device=labels.device)
        self.offsets[1:] = torch.cumsum(counts, 0)
        self._offsets_list = self.offsets.tolist()

    def _assign(self, D, cent, chunk):
        labels = torch.empty(D.shape[0], dtype=torch.long, device=D.device)
        sign = torch.ones(D.shape[0], dtype=D.dtype, device=D.device)
        for k0 in range(0, D.shape[0], chunk):
            S = D[k0:k0 + chunk] @ cent.T
            if self.positive:
                labels[k0:k0 + chunk] = S.argmax(1)
            else:
                lab = S.abs().argmax(1)
                labels[k0:k0 + chunk] = lab
                sign[k0:k0 + chunk] = torch.sign(S.gather(1, lab[:, None])[:, 0]) + (
                    S.gather(1, lab[:, None])[:, 0] == 0
                ).to(D.dtype)
        return labels, sign

    def attach_faiss(self, D):
        """Search this index with FAISS from now on (CPU; ``faiss`` installed)."""
        self.faiss = FaissRouter(self, D)
        return self

    @property
    def n_clusters(self):
        return self.centroids.shape[0]

    def sizes(self):
        return self.offsets[1:] - self.offsets[:-1]


class FaissRouter:
    """A FAISS inner-product inverted file over the atoms of a :class:`ClusterIndex`.

    The lists are the index's clusters (its centroids are the coarse quantizer,
    no FAISS training); each atom is stored sign-aligned with its centroid, so
    that ``|<x, d>|`` routing is two inner-product searches, of ``x`` and of
    ``-x``, each probing the ``n_probes`` clusters of largest ``<+-x, c>``.
    The stored atoms are those of the build; the caller rebuilds the index as
    the dictionary moves (the candidates' codes always use the current atoms).

    Parameters
    ----------
    index : ClusterIndex
    D : Tensor (K, P)
        The atoms the index was built over.
    """

    def __init__(self, index, D):
        import faiss

        self._faiss = faiss
        cent = np.ascontiguousarray(index.centroids.detach().cpu().numpy(), dtype=np.float32)
        C, P = cent.shape
        Dn = np.ascontiguousarray(D.detach().cpu().numpy(), dtype=np.float32)
        lab = index.labels.cpu().numpy()
        if not index.positive:
            sign = np.where(np.einsum("kp,kp->k", Dn, cent[lab]) < 0, -1.0, 1.0)
            Dn = Dn * sign[:, None].astype(np.float32)
        self.quantizer = faiss.IndexFlatIP(P)
        self.quantizer.add(cent)
        self.ivf = faiss.IndexIVFFlat(self.quantizer, P, C, faiss.METRIC_INNER_PRODUCT)
        self.ivf.is_trained = True
        # FAISS assigns each sign-aligned atom to its largest <d, c>: the index's
        # own label (up to ties)
        self.ivf.add(Dn)
        self.positive = index.positive
        self.K = D.shape[0]

    def search(self, X, m, n_probes):
        """Top-``m`` atom ids of each row and their (build-time) scores, as tensors;
        ``-1`` where fewer than ``m`` atoms were probed."""
        faiss = self._faiss
        faiss.omp_set_num_threads(torch.get_num_threads())
        self.ivf.nprobe = int(n_probes)
        Xn = np.ascontiguousarray(X.detach().cpu().numpy(), dtype=np.float32)
        n = Xn.shape[0]
        Q = Xn if self.positive else np.concatenate([Xn, -Xn])
        V, ids = self.ivf.search(Q, int(m))
        if not self.positive:  # |<x, d>|: the better of the two signs
            V = np.concatenate([V[:n], V[n:]], axis=1)
            ids = np.concatenate([ids[:n], ids[n:]], axis=1)
            V = np.where(ids < 0, -np.inf, V)
            top = np.argpartition(-V, int(m) - 1, axis=1)[:, :m]
            V = np.take_along_axis(V, top, 1)
            ids = np.take_along_axis(ids, top, 1)
        return torch.from_numpy(np.ascontiguousarray(V)), torch.from_numpy(
            np.ascontiguousarray(ids))


def _route_faiss(X, D, s, index, n_probes, positive, tile_size):
    V, ids = index.faiss.search(X, s, n_probes)
    srt = ids.sort(dim=1).values
    bad = (ids < 0).any(1) | (srt[:, 1:] == srt[:, :-1]).any(1)
    V = V.to(X.dtype)
    if bool(bad.any()):  # too few atoms probed (or one atom twice): exact routing
        rows = bad.nonzero(as_tuple=True)[0]
        v, i = route_topk(X[rows], D, s, tile_size=tile_size, positive=positive)
        V[rows] = v.cpu()
        ids[rows] = i.cpu()
    V, order = V.sort(dim=1, descending=True)
    return V.to(X.device), ids.gather(1, order).to(X.device)


def route_approx(
    X: torch.Tensor,
    D: torch.Tensor,
    s: int,
    index: ClusterIndex,
    *,
    n_probes: int = 8,
    positive: bool = False,
    tile_size: int = 4096,
    Dsorted: torch.Tensor | None = None,
):
    """Approximate top-``s`` atoms: score only the atoms of the nearest clusters.

    Each row is scored against the ``n_clusters`` centroids, its ``n_probes``
    best clusters are searched exhaustively and the best ``s`` atoms found are
    returned. Rows whose probed clusters hold fewer than ``s`` atoms fall back
    to exact routing. With ``n_probes >= n_clusters`` the result equals
    :func:`route_topk`. With a :class:`FaissRouter` attached
    (:meth:`ClusterIndex.attach_faiss`) and CPU rows, FAISS does the search
    (scores from the atoms of the index's build). ``Dsorted``
    (``D[index.order]``) may be passed when it is reused across calls.

    Returns
    -------
    scores, indices : Tensors of shape (n, s), sorted by decreasing score.
    """
    n = X.shape[0]
    C = index.n_clusters
    n_probes = max(1, min(int(n_probes), C))
    if index.faiss is not None and X.device.type == "cpu":
        return _route_faiss(X, D, s, index, n_probes, positive, tile_size)
    Q = X @ index.centroids.T
    if not positive:
        Q = Q.abs()
    _, probes = Q.topk(n_probes, dim=1, sorted=False)  # (n, n_probes)
    V = torch.full((n, n_probes, s), -math.inf, dtype=X.dtype, device=X.device)
    I = torch.zeros((n, n_probes, s), dtype=torch.long, device=X.device)
    flat = probes.reshape(-1)
    sort_idx = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=C).tolist()
    offs = index._offsets_list
    if Dsorted is None:
        Dsorted = D[index.order]
    pos = 0
    for c in range(C):
        cnt = counts[c]
        if cnt == 0:
            continue
        a0, a1 = offs[c], offs[c + 1]
        sel = sort_idx[pos:pos + cnt]
        pos += cnt
        if a1 == a0:
            continue
        rows = torch.div(sel, n_probes, rounding_mode="floor")
        slot = sel - rows * n_probes
        S = X[rows] @ Dsorted[a0:a1].T
        if not positive:
            S.abs_()
        k = min(s, a1 - a0)
        v, loc = S.topk(k, dim=1, sorted=False)
        V[rows, slot, :k] = v
        I[rows, slot, :k] = index.order[a0 + loc]
    best_v, loc = V.reshape(n, -1).topk(s, dim=1)
    best_i = I.reshape(n, -1).gather(1, loc)
    short = torch.isinf(best_v[:, -1]) & (best_v[:, -1] < 0)
    if bool(short.any()):
        rows = short.nonzero(as_tuple=True)[0]
        v, i = route_topk(X[rows], D, s, tile_size=tile_size, positive=positive)
        best_v[rows] = v
        best_i[rows] = i
    return best_v, best_i
