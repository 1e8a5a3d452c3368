"""Scale-out: dask arrays in and out on a 2-process LocalCluster, and a 2-rank
gloo process group reproducing single-process training."""

import os
import socket
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
import torch

da = pytest.importorskip("dask.array")
distributed = pytest.importorskip("distributed")

from skdict import (  # noqa: E402
    CollapsedDictionaryLearner,
    KSparseAutoencoder,
    LCASparseCoder,
    SparseCoder,
)

ROOT = str(Path(__file__).resolve().parents[1])


@pytest.fixture(scope="module")
def client():
    # worker processes import the skdict under test (CI: the installed one)
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = ROOT + (os.pathsep + old if old else "")
    cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                       dashboard_address=":0")
    c = distributed.Client(cluster)
    c.run(lambda: __import__("skdict.lca"))  # warm the workers once
    try:
        yield c
    finally:
        c.close()
        cluster.close()
        if old is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = old


@pytest.fixture(scope="module")
def planted():
    rng = np.random.default_rng(0)
    K, P, n = 24, 16, 3072
    D = rng.standard_normal((K, P))
    D /= np.linalg.norm(D, axis=1, keepdims=True)
    A = rng.standard_normal((n, K)) * (rng.random((n, K)) < 0.15)
    X = (A @ D + 0.05 * rng.standard_normal((n, P))).astype(np.float32)
    return X[:2048], X[2048:]


def _objective(est, X, alpha):
    C = SparseCoder(est.components_, alpha=alpha, device="cpu").transform(X).toarray()
    R = X - C @ est.components_
    return float(0.5 * (R * R).sum(1).mean() + alpha * np.abs(C).sum(1).mean())


# ------------------------------------------------------------------ dask: transform
def test_transform_is_lazy_blockwise_and_equals_in_memory(client, planted):
    X = planted[0][:1024]
    Xd = da.from_array(X, chunks=(256, -1))
    est = LCASparseCoder(n_components=24, alpha=0.2, max_iter=1, fit_algorithm="exact",
                         transform_algorithm="exact", random_state=0, device="cpu").fit(X)
    with distributed.get_task_stream(client) as ts:
        codes = est.transform(Xd)
    assert ts.data == []  # nothing ran: lazy until computed
    # the fitted twin was sent once to each worker, not embedded in every task
    held = [w for k, w in client.who_has().items() if str(k).startswith("BlockTransformer")]
    assert len(held) == 1 and len(held[0]) == 2
    assert isinstance(codes, da.Array)
    assert sp.issparse(codes._meta) and codes._meta.format == "csr"
    assert codes.chunks == (Xd.chunks[0], (24,))
    with distributed.get_task_stream(client) as ts:
        C = codes.compute()
    assert {t["worker"] for t in ts.data} == set(client.scheduler_info()["workers"])
    ref = est.transform(X)
    assert sp.issparse(C) and C.dtype == np.float32
    np.testing.assert_array_equal(C.toarray(), ref.toarray())

    est.set_params(sparse_output=False)
    dense = est.transform(Xd)
    assert type(dense._meta) is np.ndarray
    np.testing.assert_array_equal(dense.compute(), ref.toarray())
    est.set_params(sparse_output=True)

    Xh = est.inverse_transform(codes)
    assert isinstance(Xh, da.Array)
    np.testing.assert_allclose(Xh.compute(), est.inverse_transform(ref), rtol=1e-6, atol=1e-6)
    assert est.score(Xd) == pytest.approx(est.score(X), rel=1e-9)


def test_every_kind_of_estimator_transforms_dask_blocks(client, planted):
    X, _ = planted
    Xd = da.from_array(X[:600], chunks=(200, -1))
    for est in (
        KSparseAutoencoder(n_components=32, k=4, n_steps=5, batch_size=128, random_state=0,
                           device="cpu"),
        CollapsedDictionaryLearner(n_components=48, n_nonzero_coefs=3, max_iter=1,
                                   batch_size=128, random_state=0, device="cpu"),
    ):
        est.fit(X)
        np.testing.assert_allclose(est.transform(Xd).compute().toarray(),
                                   est.transform(X[:600]).toarray(), rtol=1e-5, atol=1e-6)
        assert est.score(Xd) == pytest.approx(est.score(X[:600]), rel=1e-6)


# ------------------------------------------------------------------ dask: fit
def test_lca_fit_on_dask_reduces_statistics_and_matches_in_memory(client, planted):
    X, X_test = planted
    params = dict(n_components=24, alpha=0.2, max_iter=3, batch_size=256,
                  fit_algorithm="exact", random_state=0, device="cpu")
    # two workers, 128-row blocks: each step sums the statistics of 2 blocks = one
    # 256-row minibatch, so with shuffle=False the steps are the in-memory ones
    Xd = da.from_array(X, chunks=(128, -1))
    mem = LCASparseCoder(shuffle=False, **params).fit(X)
    dsk = LCASparseCoder(shuffle=False, **params).fit(Xd)
    assert dsk.n_steps_ == mem.n_steps_ == 3 * 2048 // 256
    np.testing.assert_allclose(dsk.loss_curve_, mem.loss_curve_, rtol=1e-3)
    assert _objective(dsk, X_test, 0.2) == pytest.approx(_objective(mem, X_test, 0.2),
                                                         rel=0.01)
    part = LCASparseCoder(shuffle=False, **params).partial_fit(Xd)
    assert part.n_steps_ == 2048 // 256 and part.n_iter_ == 1
    # shuffled: blocks visited in random order (rows within a step differ)
    dsk = LCASparseCoder(**params).fit(Xd)
    mem = LCASparseCoder(**params).fit(X)
    assert _objective(dsk, X_test, 0.2) == pytest.approx(_objective(mem, X_test, 0.2),
                                                         rel=0.03)


def test_collapsed_fit_on_dask_sums_sparse_statistics(client, planted):
    X, X_test = planted
    params = dict(n_components=48, n_nonzero_coefs=3, max_iter=2, batch_size=256,
                  random_state=0, device="cpu", shuffle=False)
    mem = CollapsedDictionaryLearner(**params).fit(X)
    dsk = CollapsedDictionaryLearner(**params).fit(da.from_array(X, chunks=(128, -1)))
    assert dsk.n_steps_ == mem.n_steps_
    assert dsk.score(X_test) == pytest.approx(mem.score(X_test), rel=0.02)


def test_gradient_trained_estimators_stream_dask_blocks(client, planted):
    X, _ = planted
    params = dict(n_components=32, k=4, max_iter=2, batch_size=128, random_state=0,
                  device="cpu", shuffle=False)
    mem = KSparseAutoencoder(**params).fit(X)
    # 200-row blocks: batches of 128 rows span block boundaries, as in memory
    dsk = KSparseAutoencoder(**params).fit(da.from_array(X, chunks=(200, -1)))
    np.testing.assert_array_equal(dsk.components_, mem.components_)


def test_sparse_statistics_add_up():
    from skdict.updates import SparseStats

    rng = torch.Generator().manual_seed(0)
    X = torch.randn(40, 6, generator=rng)
    idx = torch.randint(0, 10, (40, 3), generator=rng)
    vals = torch.randn(40, 3, generator=rng)
    whole = SparseStats(10, 6, max_nnz=1000)
    whole.update(X, idx, vals, 1.0)
    parts = [SparseStats(10, 6, max_nnz=1000) for _ in range(2)]
    parts[0].update(X[:25], idx[:25], vals[:25], 1.0)
    parts[1].update(X[25:], idx[25:], vals[25:], 1.0)
    total = parts[0] + parts[1]
    D = torch.randn(10, 6, generator=rng)
    torch.testing.assert_close(total.B, whole.B)
    torch.testing.assert_close(total.diag, whole.diag)
    torch.testing.assert_close(total.offdiag_matmul(D), whole.offdiag_matmul(D))


# ------------------------------------------------------------------ dask: bad input
def test_bad_dask_input_is_refused_clearly(client, planted):
    X, _ = planted
    est = LCASparseCoder(n_components=8, alpha=0.2, max_iter=1, random_state=0,
                         device="cpu").fit(X[:256])
    with pytest.raises(ValueError, match=r"chunked along its columns.*rechunk"):
        est.transform(da.from_array(X, chunks=(256, 8)))
    unknown = da.from_array(X, chunks=(256, -1))
    unknown = unknown[unknown[:, 0] > -10]  # boolean mask: row counts unknown
    with pytest.raises(ValueError, match="unknown chunk sizes.*compute_chunk_sizes"):
        est.transform(unknown)
    with pytest.raises(ValueError, match="unknown chunk sizes"):
        LCASparseCoder(n_components=8).fit(unknown)
    bad = X.copy()
    bad[700, 3] = np.nan
    Xd = da.from_array(bad, chunks=(256, -1))
    codes = est.transform(Xd)  # lazy: the block is checked when computed
    with pytest.raises(ValueError, match=r"NaN or infinity in block 2 \(rows 512 to 768\)"):
        codes.compute()
    with pytest.raises(ValueError, match=r"block 2 \(rows 512 to 768\)"):
        LCASparseCoder(n_components=8, max_iter=1, device="cpu").fit(Xd)
    with pytest.raises(ValueError, match=r"block 2 \(rows 512 to 768\)"):
        KSparseAutoencoder(n_components=8, k=2, max_iter=1, device="cpu").fit(Xd)


# ------------------------------------------------------------------ torch.distributed
def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank, world, port, X, out):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    try:
        from skdict import KSparseAutoencoder

        res = {}
        for sparsity in ("topk", "batchtopk"):
            est = KSparseAutoencoder(**_sae_params(sparsity)).fit(X[rank::world])
            res[sparsity] = (est.components_, est.decoder_bias_, est.threshold_, est.loss_curve_,
                             est.tokens_since_fired_)
            est.save(os.path.join(out, f"{sparsity}-rank{rank}"))
        # 9 rows, global batches of 4: rank 1's shard runs out first and it takes
        # part in the last step with no rows
        small = dict(_sae_params("batchtopk"), n_components=8, k=2, batch_size=4)
        est = KSparseAutoencoder(**small).fit(X[:9][rank::world])
        res["small"] = (est.components_, est.loss_curve_)
        try:  # a rank with no rows: a clear error on every rank, no hang
            KSparseAutoencoder(**_sae_params("topk")).fit(X[:0] if rank == 1 else X)
        except ValueError as e:
            res["empty"] = str(e)
        torch.save(res, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
    # the results are on disk: skip the interpreter's teardown, where a C++
    # thread still alive at exit ("terminate called without an active
    # exception") has aborted a rank after a successful run
    os._exit(0)


def _sae_params(sparsity):
    return dict(n_components=32, k=4, max_iter=2, batch_size=128, random_state=0,
                device="cpu", shuffle=False, sparsity=sparsity, dead_window=200)


def test_two_gloo_ranks_reproduce_the_single_process_fit(tmp_path, planted):
    import torch.multiprocessing as mp

    X = planted[0][:1000]  # 1000 rows: the last batch is split 52 / 52 ... unevenly
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = ROOT + (os.pathsep + old if old else "")
    try:
        mp.spawn(_rank_main, args=(2, _free_port(), X, str(tmp_path)), nprocs=2)
    finally:
        if old is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = old
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    for sparsity in ("topk", "batchtopk"):
        ref = KSparseAutoencoder(**_sae_params(sparsity)).fit(X)
        for r in range(2):
            W, b, thr, curve, tsf = ranks[r][sparsity]
            np.testing.assert_array_equal(W, ranks[0][sparsity][0])  # identical ranks
            np.testing.assert_allclose(W, ref.components_, atol=2e-5)
            np.testing.assert_allclose(b, ref.decoder_bias_, atol=2e-5)
            np.testing.assert_allclose(thr, ref.threshold_, atol=2e-5)
            np.testing.assert_allclose(curve, ref.loss_curve_, rtol=1e-5)
            np.testing.assert_array_equal(tsf, ref.tokens_since_fired_)
        assert (tmp_path / f"{sparsity}-rank0").is_dir()
        assert not (tmp_path / f"{sparsity}-rank1").exists()  # only rank 0 writes
    ref = KSparseAutoencoder(**dict(_sae_params("batchtopk"), n_components=8, k=2,
                                    batch_size=4)).fit(X[:9])
    for r in range(2):
        np.testing.assert_allclose(ranks[r]["small"][0], ref.components_, atol=2e-5)
        np.testing.assert_allclose(ranks[r]["small"][1], ref.loss_curve_, rtol=1e-5)
        assert "rank(s) [1]" in ranks[r]["empty"] and "no rows" in ranks[r]["empty"]
    assert sys.modules.get("torch.distributed") is not None


def _lista_params():
    """LISTAEncoder fits the 2-rank test compares: the unsupervised objective
    with a validation split; exact targets with coupled weights (a
    non-contiguous parameter); a shuffled untied fit with no rows held out;
    and the dictionary learned from the rows."""
    base = dict(n_layers=3, alpha=0.2, max_iter=2, batch_size=50, random_state=0,
                device="cpu", shuffle=False)
    return {
        "objective": dict(base),
        "codes": dict(base, loss="codes", variant="lista_cp"),
        "shuffled": dict(base, variant="lista", shuffle=True, validation_fraction=0.0),
        # overcomplete: with n_components <= n_features the ALISTA layers before the
        # last get gradients of ~1e-8, at Adam's eps, where any summation order
        # changes the step (one process with another thread count too)
        "learned": dict(base, max_iter=1, n_components=24),
    }


def _lista_rank_main(rank, world, port, D, X, out):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    try:
        from skdict import LISTAEncoder

        res = {}
        for name, params in _lista_params().items():
            est = LISTAEncoder(None if name == "learned" else D, **params)
            est.fit(X[rank::world])
            res[name] = (est.weights_, est.components_, est.loss_curve_, est.layer_gap_,
                         est.support_selection_)
        # partial_fit continues on every rank's shard alike
        est = LISTAEncoder(D, **_lista_params()["objective"]).fit(X[rank::world])
        res["partial"] = est.partial_fit(X[rank::world]).weights_
        # random_state=None: the ranks still draw one split and one batch order
        est = LISTAEncoder(D, n_layers=2, max_iter=1, batch_size=40, device="cpu")
        res["unseeded"] = est.fit(X[rank::world]).weights_
        # a failure on one rank is raised on both, none waits forever
        small = dict(n_layers=2, max_iter=1, device="cpu")
        errors = {}
        try:
            LISTAEncoder(D if rank == 0 else D[::-1], **small).fit(X[rank::world])
        except ValueError as e:
            errors["dictionary"] = str(e)
        y = np.zeros((len(X[rank::world]) - rank, D.shape[0]))  # rank 1: one row short
        try:
            LISTAEncoder(D, loss="codes", **small).fit(X[rank::world], y)
        except ValueError as e:
            errors["targets"] = str(e)
        res["errors"] = errors
        torch.save(res, os.path.join(out, f"lista{rank}.pt"))
    finally:
        dist.destroy_process_group()
    # the results are on disk: skip the interpreter's teardown, where a C++
    # thread still alive at exit ("terminate called without an active
    # exception") has aborted a rank after a successful run
    os._exit(0)


def test_two_gloo_ranks_reproduce_the_single_process_lista_fit(tmp_path, planted):
    import torch.multiprocessing as mp

    from skdict import LISTAEncoder

    rng = np.random.default_rng(3)
    D = rng.standard_normal((24, 16)).astype(np.float32)
    D /= np.linalg.norm(D, axis=1, keepdims=True)
    X = planted[0][:301]  # odd: the ranks' shards and the last global batch are uneven
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = ROOT + (os.pathsep + old if old else "")
    try:
        mp.spawn(_lista_rank_main, args=(2, _free_port(), D, X, str(tmp_path)), nprocs=2)
    finally:
        if old is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = old
    ranks = [torch.load(tmp_path / f"lista{r}.pt", weights_only=False) for r in range(2)]
    for name, params in _lista_params().items():
        ref = LISTAEncoder(None if name == "learned" else D, **params).fit(X)
        for r in range(2):
            W, comp, curve, gap, support = ranks[r][name]
            for k in ref.weights_:
                np.testing.assert_array_equal(W[k], ranks[0][name][0][k])  # identical ranks
                np.testing.assert_allclose(W[k], ref.weights_[k], rtol=1e-5,
                                           atol=1e-5 * np.abs(ref.weights_[k]).max())
            np.testing.assert_array_equal(comp, ref.components_)
            np.testing.assert_allclose(curve, ref.loss_curve_, rtol=1e-5)
            np.testing.assert_allclose(gap, ref.layer_gap_, rtol=1e-4, atol=1e-6)
            assert support == ref.support_selection_
    ref = LISTAEncoder(D, **_lista_params()["objective"]).fit(X).partial_fit(X)
    for r in range(2):
        for k, w in ref.weights_.items():
            np.testing.assert_allclose(ranks[r]["partial"][k], w, rtol=1e-5, atol=1e-7)
    for k, w in ranks[0]["unseeded"].items():
        np.testing.assert_array_equal(ranks[1]["unseeded"][k], w)
    assert "rank(s) [1]" in ranks[0]["errors"]["dictionary"]
    assert "other dictionaries (or alphas) than rank 0" in ranks[1]["errors"]["dictionary"]
    assert "rank(s) [1]" in ranks[0]["errors"]["targets"]
    assert "y must hold target codes of shape" in ranks[1]["errors"]["targets"]


def test_token_selector_over_dask_tokens_merges_tile_topk(client):
    from skdict import SparseTokenSelector

    rng = np.random.default_rng(1)
    T = rng.standard_normal((3000, 8)).astype(np.float32)
    Q = rng.standard_normal((40, 8)).astype(np.float32)
    Td = da.from_array(T, chunks=(700, -1))
    for method in ("topk", "threshold", "sparsemax"):
        params = dict(method=method, keep_ratio=0.01, alpha=0.5, device="cpu")
        ref = SparseTokenSelector(**params).fit(T).transform(Q)
        with distributed.get_task_stream(client) as ts:
            W = SparseTokenSelector(**params).fit(Td).transform(Q)
        assert len({t["worker"] for t in ts.data}) == 2
        np.testing.assert_allclose(W.toarray(), ref.toarray(), atol=1e-6)
    with pytest.raises(ValueError, match="method='topk'.*needs every token"):
        SparseTokenSelector(method="topk").fit(Td).transform(Q)


@pytest.mark.parametrize("params", [
    dict(alpha=0.3),
    dict(alpha=0.1, keep_ratio=0.002, normalize=False),
    dict(alpha=50.0, empty="zero"),  # alpha above every |<q, t>|: empty rows
])
def test_lasso_selection_over_dask_tokens_is_the_exact_lasso(client, params, monkeypatch):
    """Working sets started and KKT-checked blockwise on the workers: the same
    supports and weights as the in-memory selector. Small working sets force
    several rounds of violators."""
    from skdict import SparseTokenSelector, selection
    from skdict.distributed import dask as skdask

    monkeypatch.setattr(selection, "_LASSO_INIT", 2)
    monkeypatch.setattr(selection, "_LASSO_ADD", 3)
    rounds = []
    real = skdask.DaskTokens.violators

    def counted(self, R, *args):
        out = real(self, R, *args)
        rounds.append(sum(c is not None for c in out))
        return out

    monkeypatch.setattr(skdask.DaskTokens, "violators", counted)
    rng = np.random.default_rng(2)
    T = rng.standard_normal((2000, 12))
    Q = rng.standard_normal((30, 12))
    p = dict(method="lasso", device="cpu", **params)
    ref = SparseTokenSelector(**p).fit(T).transform(Q)
    with distributed.get_task_stream(client) as ts:
        W = SparseTokenSelector(**p).fit(da.from_array(T, chunks=(450, -1))).transform(Q)
    assert len({t["worker"] for t in ts.data}) == 2
    np.testing.assert_array_equal(W.indptr, ref.indptr)
    np.testing.assert_array_equal(W.indices, ref.indices)
    np.testing.assert_allclose(W.data, ref.data, rtol=1e-12, atol=1e-14)
    if params["alpha"] < 1:
        assert len(rounds) > 2 and max(rounds) > 0  # violators were found and added
        assert W.nnz > 2 * Q.shape[0]
    else:
        assert W.nnz == 0


@pytest.mark.parametrize("params", [
    dict(dict_update="sgd", learning_rate=0.5),
    dict(threshold="hard", dead_window=64),
    dict(fit_algorithm="exact", positive_code=True, transform_algorithm="exact"),
])
def test_statistics_steps_equal_the_in_memory_steps(planted, params):
    """Without a client (synchronous scheduler): blocks of 64 rows, waves of two
    blocks = the in-memory minibatches of 128 rows, for every update rule."""
    import dask

    X = planted[0][:768]
    est = dict(n_components=12, alpha=0.2, max_iter=2, batch_size=128, fit_max_iter=50,
               shuffle=False, random_state=0, device="cpu", **params)
    mem = LCASparseCoder(**est).fit(X)
    with dask.config.set(scheduler="synchronous"):
        dsk = LCASparseCoder(**est).fit(da.from_array(X, chunks=(64, -1)))
    assert dsk.n_steps_ == mem.n_steps_
    np.testing.assert_allclose(dsk.components_, mem.components_, atol=1e-4)
    np.testing.assert_allclose(dsk.loss_curve_, mem.loss_curve_, rtol=1e-4)
    assert dsk.n_resampled_ == mem.n_resampled_
