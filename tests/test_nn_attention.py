"""Tests of skdict.nn: sparse weights, SparseAttention, hierarchical_select."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from skdict.nn import (
    SparseAttention,
    hierarchical_select,
    mean_pool_levels,
    sparse_attention,
    sparse_weights,
)
from skdict.solvers.simplex import sparsemax, threshold_weights, topk_softmax

D64 = torch.float64


def _simplex_oracle(z):
    """Projection onto the simplex by bisection (independent of the sort)."""
    z = np.asarray(z, dtype=np.float64)
    fin = np.isfinite(z)
    zf = z[fin]
    lo, hi = zf.max() - 1.0, zf.max()
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if np.maximum(zf - mid, 0).sum() > 1:
            lo = mid
        else:
            hi = mid
    out = np.zeros_like(z)
    out[fin] = np.maximum(zf - 0.5 * (lo + hi), 0)
    return out


def test_sparsemax_matches_bisection_oracle():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(50, 17, generator=g, dtype=D64) * 2
    z[3, 5:] = float("-inf")
    p = sparsemax(z)
    ref = np.array([_simplex_oracle(r) for r in z.numpy()])
    np.testing.assert_allclose(p.numpy(), ref, atol=1e-6)
    assert torch.allclose(p.sum(1), torch.ones(50, dtype=D64))
    # dim argument, one-hot when the gap is >= 1, masked rows are zero
    np.testing.assert_allclose(sparsemax(z.T, dim=0).T.numpy(), ref, atol=1e-12)
    assert sparsemax(torch.tensor([3.0, 1.0, 0.5])).tolist() == [1.0, 0.0, 0.0]
    masked = torch.full((1, 4), float("-inf"))
    assert sparsemax(masked).abs().sum() == 0
    assert topk_softmax(masked).abs().sum() == 0
    assert threshold_weights(masked).abs().sum() == 0


def test_sparsemax_jacobian():
    z = torch.randn(6, 9, dtype=D64, requires_grad=True)
    assert torch.autograd.gradcheck(sparsemax, (z,))
    p = sparsemax(z)[0]
    J = torch.autograd.functional.jacobian(lambda x: sparsemax(x[None])[0], z[0].detach())
    s = (p > 0).to(D64)
    ref = torch.diag(s) - torch.outer(s, s) / s.sum()
    assert torch.allclose(J, ref, atol=1e-12)


@pytest.mark.parametrize("method", ["topk", "threshold", "sparsemax"])
def test_sparse_weights_budget_and_rows(method):
    s = torch.randn(4, 3, 20, dtype=D64)
    s[..., :4] = float("-inf")
    w = sparse_weights(s, method, alpha=0.2, k=5)
    assert ((w != 0).sum(-1) <= 5).all()
    assert torch.allclose(w.sum(-1), torch.ones(4, 3, dtype=D64))
    assert (w[..., :4] == 0).all() and (w >= 0).all()


def _qkv(B=2, H=3, L=7, S=9, E=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, H, L, E, generator=g, dtype=D64),
            torch.randn(B, H, S, E, generator=g, dtype=D64),
            torch.randn(B, H, S, 4, generator=g, dtype=D64))


def test_topk_full_budget_equals_sdpa():
    q, k, v = _qkv()
    ref = F.scaled_dot_product_attention(q, k, v)
    out, info = sparse_attention(q, k, v, method="topk")
    torch.testing.assert_close(out, ref)
    out, _ = sparse_attention(q, k, v, method="topk", max_tokens=9, chunk_size=2)
    torch.testing.assert_close(out, ref)
    assert info["density"] == 1.0 and info["budget"] is None
    # causal
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    out, _ = sparse_attention(q, k, v, method="topk", is_causal=True, chunk_size=3)
    torch.testing.assert_close(out, ref)
    # boolean and float masks
    m = torch.rand(2, 1, 7, 9) > 0.3
    m[..., 0] = True
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=m)
    torch.testing.assert_close(sparse_attention(q, k, v, m)[0], ref)
    fm = torch.randn(7, 9, dtype=D64)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=fm, scale=0.3)
    torch.testing.assert_close(sparse_attention(q, k, v, fm, scale=0.3)[0], ref)


def test_drop_in_for_multihead_attention():
    torch.manual_seed(0)
    mha = torch.nn.MultiheadAttention(8, 2, batch_first=True, dtype=D64)
    sa = SparseAttention(8, 2, method="topk", dtype=D64)
    sa.load_state_dict(mha.state_dict())
    x = torch.randn(3, 6, 8, dtype=D64)
    y = torch.randn(3, 5, 8, dtype=D64)
    kpm = torch.zeros(3, 5, dtype=torch.bool)
    kpm[1, 3:] = True
    a, _ = mha(x, y, y, key_padding_mask=kpm)
    b, info = sa(x, y, y, key_padding_mask=kpm)
    torch.testing.assert_close(a, b)
    causal = torch.triu(torch.ones(6, 6, dtype=torch.bool), 1)
    a, aw = mha(x, x, x, attn_mask=causal)
    b, info = sa(x, attn_mask=causal, need_weights=True)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(aw, info["weights"])
    b2, _ = sa(x, is_causal=True)
    torch.testing.assert_close(a, b2)
    # sequence-first layout
    mha_sf = torch.nn.MultiheadAttention(8, 2, dtype=D64)
    sa_sf = SparseAttention(8, 2, batch_first=False, dtype=D64)
    sa_sf.load_state_dict(mha_sf.state_dict())
    xs = x.transpose(0, 1)
    torch.testing.assert_close(mha_sf(xs, xs, xs)[0], sa_sf(xs)[0])


@pytest.mark.parametrize("method", ["topk", "threshold", "sparsemax"])
def test_gradcheck_float64(method):
    torch.manual_seed(1)
    sa = SparseAttention(6, 2, method=method, keep_ratio=0.5, alpha=0.3, dtype=D64)
    x = torch.randn(2, 5, 6, dtype=D64, requires_grad=True)
    kpm = torch.zeros(2, 5, dtype=torch.bool)
    kpm[0, 4] = True
    assert torch.autograd.gradcheck(
        lambda x: sa(x, key_padding_mask=kpm, is_causal=True)[0], (x,)
    )
    w = sa.in_proj_weight
    out = sa(x, key_padding_mask=kpm)[0].sum()
    (gw,) = torch.autograd.grad(out, w)
    assert torch.isfinite(gw).all() and gw.abs().sum() > 0


@pytest.mark.parametrize("method", ["topk", "threshold", "sparsemax"])
def test_sparsity_budget_masks_and_info(method):
    torch.manual_seed(0)
    sa = SparseAttention(16, 4, method=method, keep_ratio=0.25, alpha=0.5)
    x = torch.randn(2, 12, 16)
    kpm = torch.zeros(2, 12, dtype=torch.bool)
    kpm[1, 8:] = True
    out, info = sa(x, key_padding_mask=kpm, is_causal=True, need_weights=True)
    W = info["weights"]  # head-averaged
    assert info["budget"] == 3 and info["nnz_max"] <= 3
    assert 0 < info["density"] <= 1 and info["sparsity"] == pytest.approx(1 - info["density"])
    assert (torch.triu(W, 1) == 0).all()  # causal
    assert (W[1, :, 8:] == 0).all()  # padding
    torch.testing.assert_close(W.sum(-1), torch.ones(2, 12))
    # chunking does not change the result
    out2, _ = sa(x, key_padding_mask=kpm, is_causal=True)
    sa.chunk_size = 1
    torch.testing.assert_close(sa(x, key_padding_mask=kpm, is_causal=True)[0], out2)


def test_fully_masked_rows_are_zero_and_finite():
    sa = SparseAttention(4, 1, method="sparsemax", dtype=D64)
    x = torch.randn(1, 3, 4, dtype=D64, requires_grad=True)
    kpm = torch.ones(1, 3, dtype=torch.bool)
    out, _ = sa(x, key_padding_mask=kpm)
    torch.testing.assert_close(out, sa.out_proj.bias.expand_as(out))
    out.sum().backward()
    assert torch.isfinite(x.grad).all()


def test_module_errors():
    with pytest.raises(ValueError, match="divisible"):
        SparseAttention(10, 3)
    with pytest.raises(ValueError, match="method"):
        SparseAttention(8, 2, method="lasso")
    with pytest.raises(ValueError, match="keep_ratio"):
        SparseAttention(8, 2, keep_ratio=1.5)
    sa = SparseAttention(8, 2)
    with pytest.raises(ValueError, match="key_padding_mask"):
        sa(torch.randn(1, 3, 8), key_padding_mask=torch.zeros(1, 3))


def _flat_topk(q, leaves, k):
    return torch.topk(q @ leaves.T, k, dim=-1).indices


def test_hierarchical_equals_flat_topk_with_unit_ratios():
    g = torch.Generator().manual_seed(0)
    leaves = torch.randn(96, 8, generator=g, dtype=D64)
    levels, parents = mean_pool_levels(leaves, (4, 3))
    assert [lv.shape[0] for lv in levels] == [8, 24, 96]
    q = torch.randn(5, 8, generator=g, dtype=D64)
    res = hierarchical_select(q, levels, (1, 1, 0.1), parents=parents)
    k = math.ceil(0.1 * 96)
    torch.testing.assert_close(res.indices, _flat_topk(q, leaves, k))
    torch.testing.assert_close(res.scores, torch.topk(q @ leaves.T / math.sqrt(8), k).values)
    full = hierarchical_select(q, levels, (1, 1, 1))
    torch.testing.assert_close(full.indices, _flat_topk(q, leaves, 96))
    one = hierarchical_select(q[0], levels, (1, 1, 0.1))
    torch.testing.assert_close(one.indices, res.indices[0])


def test_hierarchical_scores_only_children_of_selected_parents():
    g = torch.Generator().manual_seed(1)
    leaves = torch.randn(64, 6, generator=g, dtype=D64)
    levels, parents = mean_pool_levels(leaves, (4, 4))
    q = torch.randn(3, 6, generator=g, dtype=D64)
    res = hierarchical_select(q, levels, (0.25, 0.5, 0.5), parents=parents)
    assert [p.shape[1] for p in res.path] == [1, 2, 4]
    for lvl in (1, 2):
        for r in range(3):
            scored = res.scored[lvl][r]
            scored = scored[scored >= 0]
            kids = torch.isin(parents[lvl - 1][scored], res.path[lvl - 1][r])
            assert kids.all()
            assert scored.numel() == 4 * res.path[lvl - 1][r].numel()
            sel = res.path[lvl][r]
            assert torch.isin(sel, scored).all()
    # poison every node outside the selected subtrees: the result is unchanged
    poisoned = [lv.clone() for lv in levels]
    for lvl in (1, 2):
        allowed = torch.zeros(levels[lvl].shape[0], dtype=torch.bool)
        for r in range(3):
            allowed |= torch.isin(parents[lvl - 1], res.path[lvl - 1][r])
        poisoned[lvl][~allowed] = float("nan")
    res2 = hierarchical_select(q, poisoned, (0.25, 0.5, 0.5), parents=parents)
    torch.testing.assert_close(res2.indices, res.indices)
    assert torch.isfinite(res2.scores).all()


def test_hierarchical_general_parents_and_errors():
    g = torch.Generator().manual_seed(2)
    leaves = torch.randn(30, 4, generator=g, dtype=D64)
    coarse = torch.randn(5, 4, generator=g, dtype=D64)
    parent = torch.randint(0, 5, (30,), generator=g)
    parent[:5] = torch.arange(5)
    q = torch.randn(2, 4, generator=g, dtype=D64)
    res = hierarchical_select(q, [coarse, leaves], (0.4, 0.5), parents=[parent])
    for r in range(2):
        chosen = res.path[0][r]
        pool = torch.nonzero(torch.isin(parent, chosen)).squeeze(1)
        k = math.ceil(0.5 * pool.numel())
        ref = pool[torch.topk(q[r] @ leaves[pool].T, k).indices]
        got = res.indices[r][res.indices[r] >= 0]
        torch.testing.assert_close(got, ref)
    with pytest.raises(ValueError, match="one keep ratio per level"):
        hierarchical_select(q, [coarse, leaves], (0.5,))
    with pytest.raises(ValueError, match="keep_ratios"):
        hierarchical_select(q, [coarse, leaves], (0.5, 0.0))


# --------------------------------------------------------------------------------------
# block-sparse attention
# --------------------------------------------------------------------------------------


def _bqkv(B=2, H=3, L=37, S=None, E=8, dtype=D64, seed=0):
    g = torch.Generator().manual_seed(seed)
    S = L if S is None else S
    return (torch.randn(B, H, L, E, generator=g, dtype=dtype),
            torch.randn(B, H, S, E, generator=g, dtype=dtype),
            torch.randn(B, H, S, E, generator=g, dtype=dtype))


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("block_size", [1, 8, 64])
def test_block_all_blocks_kept_equals_dense(causal, block_size):
    q, k, v = _bqkv()
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    out, info = sparse_attention(q, k, v, method="block", block_size=block_size,
                                 is_causal=causal, chunk_size=16)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-12)
    assert info["density"] == pytest.approx(1.0) and info["budget"] is None


def test_block_masks_equal_dense_sdpa():
    q, k, v = _bqkv(L=29, S=41)
    g = torch.Generator().manual_seed(1)
    kpm = torch.ones(2, 1, 1, 41, dtype=torch.bool)
    kpm[1, ..., 30:] = False
    full = torch.rand(2, 3, 29, 41, generator=g) > 0.4
    full[..., 0] = True
    add = torch.randn(29, 41, generator=g, dtype=D64)
    add[:, 35:] = float("-inf")
    for m in (kpm, full, add, kpm.to(D64).log()):
        ref = F.scaled_dot_product_attention(q, k, v, attn_mask=m)
        out, _ = sparse_attention(q, k, v, m, method="block", block_size=8, keep_ratio=1.0)
        torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-12)


def _dense_block_reference(q, k, v, blocks, ok, bs, causal):
    """Dense attention restricted to the listed key blocks (the oracle)."""
    L, S = q.shape[-2], k.shape[-2]
    allowed = torch.zeros(q.shape[0], L, S, dtype=torch.bool)
    for b in range(q.shape[0]):
        for i in range(blocks.shape[1]):
            for j, o in zip(blocks[b, i].tolist(), ok[b, i].tolist(), strict=True):
                if o:
                    allowed[b, i * bs:(i + 1) * bs, j * bs:(j + 1) * bs] = True
    if causal:
        allowed &= torch.ones(L, S, dtype=torch.bool).tril()
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed), allowed


@pytest.mark.parametrize("causal", [False, True])
def test_block_budget_selection_and_exact_inside(causal):
    from skdict.nn.attention import block_select

    q, k, v = _bqkv(B=1, H=4, L=64, E=8)
    q, k, v = q[0], k[0], v[0]  # batch of 4 heads, flattened
    out, info = sparse_attention(q, k, v, method="block", block_size=8, max_tokens=35,
                                 is_causal=causal, need_weights=True)
    budget = 35
    assert info["budget"] == budget and info["nnz_max"] <= 32  # 4 blocks of 8 <= 35
    W = info["weights"]
    assert int((W != 0).sum(-1).max()) <= budget
    torch.testing.assert_close(W.sum(-1), torch.ones(4, 64, dtype=D64))
    blocks, ok, scores = block_select(q, k, 4, 8, is_causal=causal)
    ref, allowed = _dense_block_reference(q, k, v, blocks, ok, 8, causal)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-12)
    assert not (W[~allowed] != 0).any()
    # the kept blocks are the best mean-pooled ones (oracle: explicit means)
    qbar = q.view(4, 8, 8, 8).mean(2)
    kbar = k.view(4, 8, 8, 8).mean(2)
    sc = qbar @ kbar.transpose(1, 2)
    if causal:
        sc = sc.masked_fill(~torch.ones(8, 8, dtype=torch.bool).tril(), float("-inf"))
        sc = sc.masked_fill(torch.eye(8, dtype=torch.bool), float("inf"))
        assert (blocks == torch.arange(8)[None, :, None]).any(-1).all()  # diagonal kept
    torch.testing.assert_close(sc.topk(4, -1).values, scores.gather(-1, blocks))


def test_block_budget_below_block_size_and_ragged_lengths():
    q, k, v = _bqkv(B=1, H=2, L=23, S=50)
    for kw in ({"max_tokens": 5}, {"keep_ratio": 0.5}, {"max_tokens": 1}, {"max_tokens": 40}):
        out, info = sparse_attention(q, k, v, method="block", block_size=16,
                                     need_weights=True, **kw)
        W = info["weights"]
        assert int((W != 0).sum(-1).max()) <= info["budget"]
        assert info["nnz_max"] <= info["budget"]
        torch.testing.assert_close(W.sum(-1), torch.ones(1, 2, 23, dtype=D64))
        torch.testing.assert_close(out, W @ v)


def test_block_key_padding_and_fully_masked_rows_in_module():
    torch.manual_seed(0)
    sa = SparseAttention(16, 4, method="block", keep_ratio=0.5, block_size=4, dtype=D64)
    x = torch.randn(2, 24, 16, dtype=D64, requires_grad=True)
    kpm = torch.zeros(2, 24, dtype=torch.bool)
    kpm[1, 10:] = True
    out, info = sa(x, key_padding_mask=kpm, is_causal=True, need_weights=True)
    W = info["weights"]
    assert (W[1, :, 10:] == 0).all() and (torch.triu(W, 1) == 0).all()
    assert info["nnz_max"] <= 12
    out.sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    allpad = torch.ones(1, 24, dtype=torch.bool)
    out, _ = sa(x[:1].detach(), key_padding_mask=allpad)
    torch.testing.assert_close(out, sa.out_proj.bias.expand_as(out))
    # the module's block attention equals the functional one on its projections
    sa2 = SparseAttention(16, 4, method="block", dtype=D64)  # no budget: dense MHA
    mha = torch.nn.MultiheadAttention(16, 4, batch_first=True, dtype=D64)
    mha.load_state_dict(sa2.state_dict())
    y = torch.randn(2, 24, 16, dtype=D64)
    torch.testing.assert_close(sa2(y)[0], mha(y, y, y, need_weights=False)[0])


def test_block_gradcheck():
    q, k, v = (t.requires_grad_() for t in _bqkv(B=1, H=1, L=12, E=3))

    def f(q, k, v):
        return sparse_attention(q, k, v, method="block", block_size=4, keep_ratio=0.5,
                                is_causal=True)[0]

    assert torch.autograd.gradcheck(f, (q, k, v))


def test_kth_largest_kernel_matches_topk():
    from skdict.solvers._kernels.select import kth_largest

    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 97, generator=g)
    x[3, 40:] = float("-inf")
    x[5] = 1.0
    for k in (1, 10, 57, 97):
        thr, ties = kth_largest(x.numpy(), k)
        np.testing.assert_array_equal(thr, x.topk(k, dim=1).values[:, -1].numpy())
        counts = (x >= torch.from_numpy(thr)[:, None]).sum(1)
        np.testing.assert_array_equal(ties, (counts > k).numpy() & np.isfinite(thr))


@pytest.mark.parametrize("causal", [False, True])
def test_topk_preselection(causal):
    q, k, v = _bqkv(B=1, H=2, L=48, E=8, dtype=torch.float32)
    exact, _ = sparse_attention(q, k, v, method="topk", keep_ratio=0.25, preselect=None,
                                is_causal=causal)
    # every block a candidate: the exact per-query top-k
    full, info = sparse_attention(q, k, v, method="topk", keep_ratio=0.25, preselect=4,
                                  block_size=4, is_causal=causal, need_weights=True)
    torch.testing.assert_close(full, exact)
    # fewer candidates: top-k of the preselected blocks (oracle: masked dense top-k)
    out, info = sparse_attention(q, k, v, method="topk", keep_ratio=0.25, preselect=2,
                                 block_size=4, is_causal=causal, need_weights=True)
    W = info["weights"]
    assert int((W != 0).sum(-1).max()) <= 12 and info["nnz_max"] <= 12
    torch.testing.assert_close(out, W @ v)
    from skdict.nn.attention import block_select

    blocks, ok, _ = block_select(q[0], k[0], 6, 4, is_causal=causal)
    _, allowed = _dense_block_reference(q[0], k[0], v[0], blocks, ok, 4, causal)
    s = (q[0] @ k[0].transpose(1, 2)) / math.sqrt(8)
    ref = sparse_weights(s.masked_fill(~allowed, float("-inf")), "topk", k=12)
    torch.testing.assert_close(W[0], ref)
    with pytest.raises(ValueError, match="preselect"):
        sparse_attention(q, k, v, method="topk", keep_ratio=0.25, preselect=0.5)


def _hard_rows(dtype, m=97, seed=0):
    """Rows that exercise every branch of the compiled top-k softmax: masked
    entries, fully masked rows, ties at and away from the threshold, NaN and
    +inf, near-equal values a few ulps apart, wide and narrow ranges."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(300, m, generator=g, dtype=dtype)
    x[:40] *= 30.0  # wide range: the exp underflows for most entries
    x[40:60] = 1.0 + x[40:60] * torch.finfo(dtype).eps * 4  # a few ulps apart
    x[60, m // 3:] = float("-inf")
    x[61] = float("-inf")  # fully masked
    x[62, :5] = float("-inf")
    x[63, ::3] = float("-inf")
    x[64] = 1.0  # all tied
    x[65, ::2] = 0.5  # ties at the threshold for mid-sized k
    x[66, :3] = 7.0  # ties above every threshold but k < 3
    x[67, 10] = float("nan")
    x[68, 3] = float("inf")
    x[69, :] = torch.arange(m, dtype=dtype) // 2  # pairs of equal values
    return x


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_topk_softmax_kernel_matches_reference(dtype):
    from skdict.nn._kernels.topk_softmax import topk_softmax_rows

    x = _hard_rows(dtype)
    tol = {"atol": 1e-6, "rtol": 1e-6} if dtype == torch.float32 else \
        {"atol": 1e-13, "rtol": 1e-13}
    for k in (1, 2, 3, 10, 48, 57, 96, 97):
        w, thr, flag = topk_softmax_rows(x.numpy(), k)
        vals = x.topk(k, dim=1).values
        kth = vals[:, -1:]
        finite = torch.isfinite(x)
        bad = torch.isnan(x).any(1) | (x == float("inf")).any(1)
        ties = ((x >= kth) & finite).sum(1) > k
        # flagged: exactly the rows the reference decides (ties, NaN, +inf)
        expect = bad | (ties & (finite.sum(1) > k))
        np.testing.assert_array_equal(flag, expect.numpy())
        ok = ~torch.from_numpy(flag)
        ref = sparse_weights(x, "topk", k=k)
        torch.testing.assert_close(torch.from_numpy(w)[ok], ref[ok], **tol)
        # the threshold is the k-th largest value itself (rows with > k finite)
        many = ok & (finite.sum(1) > k)
        np.testing.assert_array_equal(thr[many.numpy()], kth[many, 0].numpy())
        assert ((torch.from_numpy(w)[ok] != 0).sum(1) <= k).all()
        # in place over the scores, and through _topk_weights (flagged rows by
        # the reference): every row equal to sparse_weights
        from skdict.nn.attention import _topk_weights

        w2 = _topk_weights(x.clone(), k, inplace=True)
        torch.testing.assert_close(w2, ref, equal_nan=True, **tol)
        torch.testing.assert_close(_topk_weights(x, k), ref, equal_nan=True, **tol)
    assert (torch.from_numpy(topk_softmax_rows(x.numpy(), 5)[0])[61] == 0).all()
    with pytest.raises(ValueError, match="k=0"):
        topk_softmax_rows(x.numpy(), 0)
    with pytest.raises(ValueError, match="C-contiguous"):
        topk_softmax_rows(x.numpy()[:, ::2], 3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_topk_softmax_kernel_long_rows(dtype):
    """Rows of preselected-attention length: scores with structure (a shared
    offset per row, heavy tails, a masked causal part), every k regime."""
    from skdict.nn._kernels.topk_softmax import topk_softmax_rows

    g = torch.Generator().manual_seed(1)
    n, m = 64, 3264
    x = torch.randn(n, m, generator=g, dtype=dtype) * torch.rand(n, 1, generator=g,
                                                                  dtype=dtype) * 4
    x = x + torch.randn(n, 1, generator=g, dtype=dtype) * 10
    x[: n // 2] = x[: n // 2] ** 3 / 10  # heavy tails
    x[::7, -200:] = float("-inf")
    for k in (1, 17, 1600, 1632, 3000, 3264):
        w, thr, flag = topk_softmax_rows(x.numpy(), k)
        assert not flag.any()
        # against the reference in float64 on the same scores: on rows this long
        # torch's own float32 softmax is 2e-6 off it, the kernel 2e-7
        ref = sparse_weights(x.double(), "topk", k=k)
        tol = 1e-6 if dtype == torch.float32 else 1e-13
        torch.testing.assert_close(torch.from_numpy(w).double(), ref, atol=tol, rtol=tol)
        assert ((torch.from_numpy(w) != 0).sum(1) <= k).all()


def test_topk_weights_autograd_matches_reference():
    from skdict.nn.attention import _topk_weights

    x = _hard_rows(D64, m=13, seed=2)
    keep = ~(torch.isnan(x).any(1) | (x == float("inf")).any(1))
    x = x[keep][:60].clone().requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    cot = torch.randn(x.shape, dtype=D64, generator=torch.Generator().manual_seed(3))
    for k in (1, 4, 9):
        w = _topk_weights(x, k)
        ref = sparse_weights(x2, "topk", k=k)
        torch.testing.assert_close(w, ref, atol=1e-13, rtol=1e-13)
        (g1,) = torch.autograd.grad((w * cot).sum(), x)
        (g2,) = torch.autograd.grad((ref * cot).sum(), x2)
        torch.testing.assert_close(g1, g2, atol=1e-12, rtol=1e-12)
    y = torch.randn(6, 11, dtype=D64, generator=torch.Generator().manual_seed(4))
    y[1, 3:] = float("-inf")
    y = y.requires_grad_()
    assert torch.autograd.gradcheck(lambda s: _topk_weights(s, 4), (y,))


@pytest.mark.parametrize("causal", [False, True])
def test_topk_attention_fast_path_equals_reference(causal):
    """sparse_attention(method="topk"), dense and preselected, equals the
    torch.topk reference on the same scores (inference and autograd)."""
    q, k, v = _bqkv(B=1, H=2, L=80, E=8, dtype=torch.float32)
    kpm = torch.ones(1, 1, 1, 80, dtype=torch.bool)
    kpm[..., 70:] = False
    s = (q @ k.transpose(-1, -2)) / math.sqrt(8)
    allowed = kpm.expand(1, 2, 80, 80)
    if causal:
        allowed = allowed & torch.ones(80, 80, dtype=torch.bool).tril()
    ref = sparse_weights(s.masked_fill(~allowed, float("-inf")), "topk", k=20) @ v
    with torch.no_grad():
        out, info = sparse_attention(q, k, v, kpm, method="topk", max_tokens=20,
                                     preselect=None, is_causal=causal)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-5)
    assert info["nnz_max"] <= 20
    # every key a candidate: the preselected path is the exact top-k as well
    with torch.no_grad():
        out2, _ = sparse_attention(q, k, v, kpm, method="topk", max_tokens=20,
                                   preselect=4, block_size=8, is_causal=causal)
    torch.testing.assert_close(out2, ref, atol=1e-6, rtol=1e-5)
    qq = q.double().requires_grad_()
    out3, _ = sparse_attention(qq, k.double(), v.double(), kpm, method="topk",
                               max_tokens=20, preselect=None, is_causal=causal)
    ref3 = sparse_weights(((qq @ k.double().transpose(-1, -2)) / math.sqrt(8)).masked_fill(
        ~allowed, float("-inf")), "topk", k=20) @ v.double()
    torch.testing.assert_close(out3, ref3, atol=1e-12, rtol=1e-12)
    (g1,) = torch.autograd.grad(out3.sum(), qq)
    (g2,) = torch.autograd.grad(ref3.sum(), qq)
    torch.testing.assert_close(g1, g2, atol=1e-12, rtol=1e-12)
