"""RowSource: every input kind yields the same batches, errors and checks."""

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from sklearn.base import BaseEstimator

from skdict.data.sources import ArraySource, StreamSource, as_source, is_stream

pytestmark = pytest.mark.usefixtures("one_thread")


class _Est(BaseEstimator):
    pass


def _kinds(X, tmp_path):
    mm = np.memmap(tmp_path / "x.dat", dtype=X.dtype, mode="w+", shape=X.shape)
    mm[:] = X
    mm.flush()
    ro = np.memmap(tmp_path / "x.dat", dtype=X.dtype, mode="r", shape=X.shape)
    return {
        "numpy": X,
        "fortran": np.asfortranarray(X),
        "memmap": ro,
        "csr": sp.csr_matrix(X),
        "csc": sp.csc_matrix(X),
        "torch": torch.from_numpy(X.copy()),
        "torch_coo": torch.from_numpy(X.copy()).to_sparse(),
        "torch_csr": torch.from_numpy(X.copy()).to_sparse_csr(),
        "torch_requires_grad": torch.from_numpy(X.copy()).requires_grad_(True),
        "list": X.tolist(),
    }


@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")
@pytest.mark.parametrize("shuffle", [False, True, "blocks"])
def test_every_array_kind_yields_the_same_batches(tmp_path, rng, shuffle):
    X = rng.standard_normal((103, 7))
    X[rng.random(X.shape) < 0.5] = 0.0  # sparse matrices keep the same values
    ref = None
    for name, Xk in _kinds(X, tmp_path).items():
        src = as_source(Xk, estimator=_Est(), reset=True)
        assert isinstance(src, ArraySource), name
        assert (src.n_samples, src.n_features, src.dtype) == (103, 7, np.float64)
        gen = torch.Generator().manual_seed(3)
        got = [b.numpy().copy() for b in
               src.batches(16, device="cpu", shuffle=shuffle, generator=gen)]
        if ref is None:
            ref = got
            continue
        assert len(got) == len(ref), name
        for a, b in zip(got, ref, strict=True):
            np.testing.assert_array_equal(a, b, err_msg=name)
    # every row exactly once per epoch, whatever the shuffle
    rows = np.concatenate(ref)
    np.testing.assert_array_equal(np.sort(rows, axis=0), np.sort(X, axis=0))
    if shuffle:
        assert not np.array_equal(rows, X)
    else:
        np.testing.assert_array_equal(rows, X)


def test_shuffled_batches_depend_only_on_the_seed(rng):
    X = rng.standard_normal((50, 3))
    src = as_source(X, estimator=_Est(), reset=True)

    def epoch(seed):
        gen = torch.Generator().manual_seed(seed)
        return np.concatenate([b.numpy() for b in src.batches(8, device="cpu", shuffle=True,
                                                             generator=gen)])

    np.testing.assert_array_equal(epoch(1), epoch(1))
    assert not np.array_equal(epoch(1), epoch(2))


def test_blocks_shuffle_keeps_contiguous_blocks(rng):
    X = np.arange(40, dtype=np.float64).reshape(20, 2)
    src = as_source(X, estimator=_Est(), reset=True)
    gen = torch.Generator().manual_seed(0)
    for b in src.batches(6, device="cpu", shuffle="blocks", generator=gen):
        first = np.sort(b[:, 0].numpy()) // 2
        assert first.min() % 6 == 0 and np.array_equal(first, np.arange(first[0],
                                                                        first[0] + len(first)))


def test_dtype_policy(rng):
    X32 = rng.standard_normal((5, 3)).astype(np.float32)
    assert as_source(X32, estimator=_Est(), reset=True).dtype == np.float32
    assert as_source(X32.astype(np.int64), estimator=_Est(), reset=True).dtype == np.float64
    src = as_source(X32, estimator=_Est(), reset=True, dtype=torch.float64)
    b = next(src.batches(5, device="cpu"))
    assert b.dtype == torch.float64
    b = next(src.batches(5, device="cpu", dtype=np.float32))
    assert b.dtype == torch.float32


def test_feature_count_is_recorded_and_checked(rng):
    est = _Est()
    as_source(rng.standard_normal((4, 3)), estimator=est, reset=True)
    assert est.n_features_in_ == 3
    with pytest.raises(ValueError, match="X has 5 features, but _Est is expecting 3"):
        as_source(rng.standard_normal((4, 5)), estimator=est, reset=False)


@pytest.mark.parametrize("bad, match", [
    (np.zeros((0, 3)), "0 sample"),
    (np.zeros((3, 0)), "0 feature"),
    (np.zeros(3), "2-D array"),
    (np.zeros((2, 2, 2)), "2-D array"),
    (np.array([[1.0, np.nan]]), "NaN"),
    (torch.tensor([[1.0, float("inf")]]), "NaN or infinity"),
    (np.ones((2, 2), dtype=np.complex64), "Complex data not supported"),
    (torch.ones(2, 2, dtype=torch.complex64), "Complex data not supported"),  # was cast to real
])
def test_bad_arrays_are_clear_errors(bad, match):
    with pytest.raises(ValueError, match=match):
        as_source(bad, estimator=_Est(), reset=True)


def test_memmap_is_checked_per_batch_not_loaded(tmp_path):
    X = np.ones((40, 3))
    X[33, 1] = np.nan
    mm = np.memmap(tmp_path / "bad.dat", dtype=np.float64, mode="w+", shape=X.shape)
    mm[:] = X
    src = as_source(mm, estimator=_Est(), reset=True)  # no full scan at the boundary
    it = src.batches(10, device="cpu")
    for _ in range(3):
        assert bool(torch.isfinite(next(it)).all())
    with pytest.raises(ValueError, match="NaN or infinity"):
        next(it)


def test_torch_tensor_stays_a_view_on_its_device(rng):
    T = torch.from_numpy(rng.standard_normal((9, 2)))
    src = as_source(T, estimator=_Est(), reset=True)
    b = next(src.batches(4, device="cpu"))
    assert b.data_ptr() == T.data_ptr()


def test_is_stream():
    X = np.zeros((3, 2))
    assert not is_stream(X)
    assert not is_stream([[1.0, 2.0], [3.0, 4.0]])  # nested numbers: one array
    assert is_stream([X, X])
    assert is_stream(iter([X]))
    assert is_stream(b for b in [X])
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.zeros(6, 2)),
                                         batch_size=4)
    assert is_stream(loader)
    assert not is_stream(sp.csr_matrix(X))


def test_a_1d_batch_in_a_list_is_a_shape_error(rng):
    X = rng.standard_normal((10, 4))
    src = as_source([X[:5], X[5]], estimator=_Est(), reset=True)
    with pytest.raises(ValueError, match="got a 1-D array of shape \\(4,\\)"):
        list(src.batches(4, device="cpu"))


def test_streams_yield_their_blocks_split_to_batch_size(rng):
    blocks = [rng.standard_normal((n, 4)) for n in (5, 12, 0, 3)]
    est = _Est()
    src = as_source(blocks, estimator=est, reset=True)
    assert isinstance(src, StreamSource) and src.reiterable and est.n_features_in_ == 4
    for _ in range(2):  # a list can be read again
        got = [b.shape[0] for b in src.batches(5, device="cpu")]
        assert got == [5, 5, 5, 2, 3]
    rows = np.concatenate([b.numpy() for b in src.batches(5, device="cpu")])
    np.testing.assert_array_equal(rows, np.concatenate(blocks))


def test_one_pass_generator_loses_nothing_and_cannot_be_reread(rng):
    blocks = [rng.standard_normal((6, 2)) for _ in range(3)]
    src = as_source((b for b in blocks), estimator=_Est(), reset=True)
    assert not src.reiterable
    sample = src.sample(4, generator=torch.Generator().manual_seed(0), device="cpu")
    assert sample.shape == (4, 2)
    rows = np.concatenate([b.numpy() for b in src.batches(100, device="cpu")])
    np.testing.assert_array_equal(rows, np.concatenate(blocks))
    with pytest.raises(ValueError, match="one-pass iterator"):
        next(src.batches(100, device="cpu"))


def test_dataloader_batches_are_unwrapped():
    data = torch.arange(24, dtype=torch.float32).reshape(12, 2)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(data), batch_size=5)
    src = as_source(loader, estimator=_Est(), reset=True)
    assert src.dtype == np.float32
    rows = torch.cat(list(src.batches(100, device="cpu")))
    torch.testing.assert_close(rows, data)


def test_stream_errors(rng):
    with pytest.raises(ValueError, match="empty"):
        as_source(iter([]), estimator=_Est(), reset=True)
    for empty in ([], ()):  # was scikit-learn's "Expected 2D array, got 1D array"
        with pytest.raises(ValueError, match="_Est was given an empty"):
            as_source(empty, estimator=_Est(), reset=True)
    blocks = [rng.standard_normal((3, 4)), rng.standard_normal((3, 5))]
    src = as_source(blocks, estimator=_Est(), reset=True)
    with pytest.raises(ValueError, match="A batch has 5 features.*expecting 4"):
        list(src.batches(10, device="cpu"))
    blocks = [rng.standard_normal((3, 2)), np.array([[np.inf, 0.0]])]
    src = as_source(blocks, estimator=_Est(), reset=True)
    with pytest.raises(ValueError, match="NaN or infinity"):
        list(src.batches(10, device="cpu"))
    with pytest.raises(ValueError, match="call it on each batch"):
        as_source([np.zeros((2, 2))], estimator=_Est(), reset=True, allow_stream=False)


@pytest.mark.parametrize("bad", [np.ones((2, 4), dtype=np.complex64),
                                 torch.ones(2, 4, dtype=torch.complex64),
                                 np.array([["a"] * 4] * 2)])
def test_a_later_batch_of_complex_or_strings_is_refused(rng, bad):
    src = as_source([rng.standard_normal((3, 4)), bad], estimator=_Est(), reset=True)
    with pytest.raises(ValueError, match="needs real numbers in every batch"):
        list(src.batches(10, device="cpu"))
    src = as_source([rng.standard_normal((3, 4)), np.ones((2, 4), dtype=object)],
                    estimator=_Est(), reset=True)
    assert sum(b.shape[0] for b in src.batches(10, device="cpu")) == 5


def test_sample_draws_distinct_rows(rng):
    X = np.arange(30, dtype=np.float64).reshape(15, 2)
    src = as_source(X, estimator=_Est(), reset=True)
    s = src.sample(8, generator=torch.Generator().manual_seed(0), device="cpu").numpy()
    assert len(np.unique(s[:, 0])) == 8 and set(s[:, 0]) <= set(X[:, 0])
    assert src.sample(50, generator=torch.Generator(), device="cpu").shape == (15, 2)


def test_ordered_covers_rows_in_order(rng):
    X = rng.standard_normal((11, 2))
    src = as_source(sp.csr_matrix(X), estimator=_Est(), reset=True)
    spans = [(a, b) for a, b, _ in src.ordered(4, device="cpu")]
    assert spans == [(0, 4), (4, 8), (8, 11)]


def test_empty_batches_of_a_stream_are_skipped_even_first(rng):
    X = rng.standard_normal((7, 3))
    src = as_source(iter([X[:0], X[:4], X[4:4], X[4:]]), estimator=_Est(), reset=True)
    assert src.n_features == 3
    got = torch.cat(list(src.batches(3, device="cpu"))).numpy()
    np.testing.assert_array_equal(got, X)
    with pytest.raises(ValueError, match="empty"):
        as_source(iter([X[:0], X[:0]]), estimator=_Est(), reset=True)


def test_stream_of_dataframes_checks_every_batch_columns(rng):
    pd = pytest.importorskip("pandas")
    df = pd.DataFrame(rng.standard_normal((6, 3)), columns=["a", "b", "c"])
    est = _Est()
    src = as_source([df[:3], df[3:][["b", "a", "c"]]], estimator=est, reset=True)
    assert list(est.feature_names_in_) == ["a", "b", "c"]
    with pytest.raises(ValueError, match="column 0 is 'b', but _Est is expecting 'a'"):
        list(src.batches(4, device="cpu"))
    src = as_source([df[:3], df[3:], df[3:].to_numpy()], estimator=_Est(), reset=True)
    assert sum(b.shape[0] for b in src.batches(4, device="cpu")) == 9


def test_dict_batches_say_to_yield_the_array(rng):
    X = rng.standard_normal((4, 3))
    with pytest.raises(ValueError, match=r"is a dict \(keys \['x'\]\); yield the 2-D array"):
        as_source(iter([{"x": X}]), estimator=_Est(), reset=True)
    src = as_source([X, {"x": X}], estimator=_Est(), reset=True)
    with pytest.raises(ValueError, match="is a dict"):
        list(src.batches(4, device="cpu"))


def test_a_stream_of_torch_sparse_batches(rng):
    X = rng.standard_normal((8, 3))
    X[X < 0] = 0.0
    blocks = [torch.from_numpy(X[:4]).to_sparse(), torch.from_numpy(X[4:]).to_sparse()]
    src = as_source(blocks, estimator=_Est(), reset=True)
    for _ in range(2):  # the first pass replays the validated first block
        got = torch.cat(list(src.batches(3, device="cpu"))).numpy()
        np.testing.assert_array_equal(got, X)


@pytest.mark.parametrize("drop_last", [False, True])
@pytest.mark.parametrize("loader_bs, bs", [(16, 16), (16, 5), (7, 32)])
def test_dataloader_stream_knows_its_batches(drop_last, loader_bs, bs):
    """A DataLoader over a sized dataset has a known number of training batches
    (the learning-rate schedule needs it): exactly the batches a pass yields."""
    from torch.utils.data import DataLoader, TensorDataset

    X = torch.randn(50, 3)
    loader = DataLoader(TensorDataset(X), batch_size=loader_bs, drop_last=drop_last)
    src = StreamSource(loader, estimator=_Est(), reset=True, dtype=None)
    read = sum(1 for _ in src.batches(bs, device="cpu"))
    assert src.n_batches(bs) == read
    assert StreamSource((x for x in [X.numpy()]), estimator=_Est(), reset=True,
                        dtype=None).n_batches(bs) is None
