"""Token selection on real MiniLM token embeddings, and SparseAttention speed.

Run: ``python -m benchmarks.token_selection`` (``--quick`` for a smaller run).

1. Real data: all-MiniLM-L6-v2 layer-3 hidden states of 5000 tokens of the
   stdlib-docstring corpus (``skdict.datasets.load_minilm_activations``) are the
   tokens; 200 *other* tokens of the same corpus are the queries. For each method
   and keep_ratio in (0.05, 0.1, 0.2): captured softmax mass, recall@k, output
   relative error ``||W V - A V|| / ||A V||`` (V = the token embeddings), and the
   realized non-zeros. Table A scores the raw hidden states at the natural
   dot-product scale ``1 / sqrt(384)``; table B uses the model's own attention
   of the next layer (encoder.layer.3 query/key/value projections, 12 heads of
   32 dims, scale ``1 / sqrt(32)``), averaged over the heads.
2. Speed: ``sparse_attention`` vs ``F.scaled_dot_product_attention`` at sequence
   length 4096 (batch 1, 6 heads of 64) on CPU, forward only.
3. Scale: SparseTokenSelector(topk) over 1,000,000 synthetic tokens, tiled.
4. Lasso speed: SparseTokenSelector(method="lasso") ms per query over 5000 tokens,
   and its supports against the exact lasso on the full Gram matrix.
5. Block-sparse attention on data with locality: all-MiniLM-L6-v2 layer-3 states
   of a long concatenation of corpus passages (each passage of <= 128 tokens run
   through the model, states concatenated in corpus order), projected by the
   model's own layer-3 query/key/value weights (12 heads x 32). Per length L
   (1k .. 16k; 64k with ``--long``): SDPA time, ``method="block"`` and
   ``method="topk"`` (block preselection) times and ratios, and the output
   relative error against dense attention of block, preselected top-k and exact
   per-query top-k at the same budget (keep_ratio 0.1; errors on 512 sampled
   queries per head). ``--device cuda`` adds the same table on the GPU.
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch
import torch.nn.functional as F

from skdict import SparseTokenSelector
from skdict.metrics import (
    attention_mass_captured,
    output_fidelity,
    realized_nnz,
    recall_at_k,
)
from skdict.nn import sparse_attention

RATIOS = (0.05, 0.1, 0.2)


def _row(name, ratio, W, S, V, seconds):
    k = max(1, math.ceil(ratio * S.shape[1]))
    nnz = realized_nnz(W)
    return (
        f"| {name:9s} | {ratio:4.2f} | {attention_mass_captured(W, S):6.3f} | "
        f"{recall_at_k(W, S, k):6.3f} | {output_fidelity(W, S, V):6.3f} | "
        f"{nnz['mean']:7.1f} | {nnz['max']:5d} | {seconds:6.2f} |"
    )


HEADER = (
    "| method    | keep | mass   | rec@k  | relerr | nnz avg | nnz max | time s |\n"
    "|-----------|------|--------|--------|--------|---------|---------|--------|"
)


def table_a(T, Q, n_lasso, lasso_alpha, thr_alpha):
    scale = 1 / math.sqrt(T.shape[1])
    print(f"\nA. raw layer-3 hidden states, scale 1/sqrt({T.shape[1]}) = {scale:.4f}; "
          f"{len(T)} tokens, {len(Q)} queries ({n_lasso} for lasso, alpha="
          f"{lasso_alpha}); threshold alpha={thr_alpha}")
    print(HEADER)
    for ratio in RATIOS:
        for method in ("lasso", "threshold", "sparsemax", "topk"):
            q = Q[:n_lasso] if method == "lasso" else Q
            alpha = lasso_alpha if method == "lasso" else thr_alpha
            sel = SparseTokenSelector(method=method, alpha=alpha, keep_ratio=ratio,
                                      normalize=False, device="cpu").fit(T)
            t = time.perf_counter()
            W = sel.transform(q)
            dt = time.perf_counter() - t
            print(_row(method, ratio, W, sel.attention_scores(q), T, dt), flush=True)
    dense = np.sort(_softmax(Q @ T.T * scale), 1)[:, ::-1]
    for ratio in RATIOS:
        k = math.ceil(ratio * len(T))
        print(f"  oracle: best possible mass with {k} tokens = "
              f"{dense[:, :k].sum(1).mean():.3f}")


def _layer3_params():
    """The bundled model's encoder.layer.3 self-attention weights, float32 CPU tensors,
    keyed ``encoder.layer.3.attention.self.{query,key,value}.{weight,bias}``."""
    from skdict.datasets import minilm_model

    model, _ = minilm_model("cpu")
    pre = "encoder.layer.3.attention.self."
    return {pre + n: t.detach().float().cpu()
            for n, t in model.encoder.layer[3].attention.self.named_parameters()}


def _softmax(S):
    e = np.exp(S - S.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def table_b(T, Q, thr_alpha):
    p = _layer3_params()
    pre = "encoder.layer.3.attention.self."

    def lin(x, name):
        w = p[pre + name + ".weight"].float().numpy()
        b = p[pre + name + ".bias"].float().numpy()
        return x @ w.T + b

    q_all, k_all, v_all = lin(Q, "query"), lin(T, "key"), lin(T, "value")
    H, dh = 12, 32
    print(f"\nB. the model's own attention (encoder.layer.3 q/k/v projections of the "
          f"layer-3 states), {H} heads x {dh} dims, scale 1/sqrt({dh}); mean over "
          f"heads; threshold alpha={thr_alpha}")
    print("| method    | keep | mass   | rec@k  | relerr | nnz avg |\n"
          "|-----------|------|--------|--------|--------|---------|")
    for ratio in RATIOS:
        for method in ("threshold", "sparsemax", "topk"):
            acc = np.zeros(4)
            for h in range(H):
                sl = slice(h * dh, (h + 1) * dh)
                sel = SparseTokenSelector(method=method, alpha=thr_alpha,
                                          keep_ratio=ratio, normalize=False,
                                          device="cpu").fit(k_all[:, sl],
                                                            values=v_all[:, sl])
                W = sel.transform(q_all[:, sl])
                S = sel.attention_scores(q_all[:, sl])
                k = math.ceil(ratio * len(T))
                acc += [attention_mass_captured(W, S), recall_at_k(W, S, k),
                        output_fidelity(W, S, v_all[:, sl]), realized_nnz(W)["mean"]]
            acc /= H
            print(f"| {method:9s} | {ratio:4.2f} | {acc[0]:6.3f} | {acc[1]:6.3f} | "
                  f"{acc[2]:6.3f} | {acc[3]:7.1f} |", flush=True)


def speed(L=4096, H=6, dh=64, repeats=3):
    print(f"\nSpeed: batch 1, {H} heads x {dh}, sequence length {L}, CPU "
          f"({torch.get_num_threads()} threads), forward; SDPA best of {repeats}, "
          "sparse: one run")
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, H, L, dh, generator=g) for _ in range(3))

    def best(fn, repeats=repeats):
        ts = []
        for _ in range(repeats):
            t = time.perf_counter()
            with torch.no_grad():
                fn()
            ts.append(time.perf_counter() - t)
        return min(ts)

    base = best(lambda: F.scaled_dot_product_attention(q, k, v))
    print("| attention                     | time s | vs SDPA |\n"
          "|-------------------------------|--------|---------|")
    print(f"| F.scaled_dot_product_attention | {base:6.3f} |   1.00x |")
    for method, kw in [("block", {"keep_ratio": 0.1}), ("topk", {"keep_ratio": 0.1}),
                       ("threshold", {"keep_ratio": 0.1}),
                       ("sparsemax", {"keep_ratio": 0.1}), ("sparsemax", {})]:
        t = best(lambda method=method, kw=kw: sparse_attention(q, k, v, method=method, **kw),
                 repeats=1)
        name = f"{method} " + (f"keep {kw['keep_ratio']}" if kw else "no budget")
        print(f"| {name:30s}| {t:6.3f} | {t / base:6.2f}x |", flush=True)


def million(n=1_000_000, d=64, nq=32):
    print(f"\nScale: topk (max_tokens=64) over {n:,} synthetic tokens (d={d}, "
          f"float32), {nq} queries, tile 65536")
    rng = np.random.default_rng(0)
    T = rng.standard_normal((n, d), dtype=np.float32)
    Q = rng.standard_normal((nq, d), dtype=np.float32)
    sel = SparseTokenSelector(method="topk", max_tokens=64, device="cpu").fit(T)
    t = time.perf_counter()
    W = sel.transform(Q)
    dt = time.perf_counter() - t
    Tn = T / np.linalg.norm(T, axis=1, keepdims=True)
    ok = all(
        set(np.argpartition(-(Q[i] @ Tn.T), 64)[:64]) == set(W[i].indices)
        for i in range(3)
    )
    print(f"  {dt:.2f} s, nnz/row {W.getnnz(1).max()}, matches brute force: {ok}")


def lasso_speed(T, Q, alpha=5.0, n_q=20):
    from skdict.solvers import lasso_exact

    n_q = min(n_q, len(Q))
    print(f"\nLasso selector: {len(T)} MiniLM tokens (raw states), alpha={alpha}, "
          f"{n_q} queries, {torch.get_num_threads()} threads")
    sel = SparseTokenSelector(method="lasso", alpha=alpha, normalize=False,
                              device="cpu").fit(T)
    sel.transform(Q[:1])  # compile the kernels
    t = time.perf_counter()
    W = sel.transform(Q[:n_q])
    dt = (time.perf_counter() - t) / n_q
    Tt = torch.from_numpy(T).double()
    ref = lasso_exact(torch.from_numpy(Q[:n_q]).double() @ Tt.T, Tt @ Tt.T, alpha)
    same = sum(bool(np.array_equal(W[i].toarray()[0] != 0, ref.codes[i].numpy() != 0))
               for i in range(n_q))
    print(f"  {1000 * dt:.1f} ms per query (target <= 50), support sizes "
          f"{np.median(W.getnnz(1)):.0f} median; supports equal to the full-Gram exact "
          f"lasso (certified: {ref.converged}): {same}/{n_q}")


def long_context_states(n_tokens):
    """Layer-3 MiniLM states of corpus passages concatenated in order, and the
    model's layer-3 q/k/v projections: (12, L, 32) each."""
    from skdict.datasets import load_minilm_corpus, minilm_token_activations

    texts = load_minilm_corpus()
    rows, total, i = [], 0, 0
    while total < n_tokens:
        batch = texts[i:i + 64]
        i += 64
        for _, act in minilm_token_activations(batch, layer=3, max_length=128):
            rows.append(act[1:-1])
            total += len(act) - 2
    X = torch.from_numpy(np.concatenate(rows)[:n_tokens])
    p = _layer3_params()
    pre = "encoder.layer.3.attention.self."

    def proj(name):
        y = X @ p[pre + name + ".weight"].float().T + p[pre + name + ".bias"].float()
        return y.view(-1, 12, 32).transpose(0, 1).contiguous()

    return proj("query"), proj("key"), proj("value")


def _timed(fn, repeats):
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    best = float("inf")
    for _ in range(repeats):
        sync()
        t = time.perf_counter()
        with torch.no_grad():
            out = fn()
        sync()
        best = min(best, time.perf_counter() - t)
    return best, out


def _rel(a, b):
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


def block_attention(lengths, keep=0.1, block_size=64, device="cpu", repeats=2, n_err=512):
    print(f"\nBlock-sparse attention on MiniLM layer-3 q/k/v of concatenated passages "
          f"(12 heads x 32), keep_ratio {keep}, block_size {block_size}, forward, "
          f"{device} ({torch.get_num_threads()} threads); time best of {repeats}; "
          f"error = ||out - SDPA|| / ||SDPA|| on {n_err} sampled queries per head")
    print("| L | SDPA s | block s | SDPA/block | topk s | SDPA/topk | err block | "
          "err topk (preselected) | err exact top-k | block / exact |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    qa, ka, va = long_context_states(max(lengths))
    g = torch.Generator().manual_seed(0)
    for L in lengths:
        q, k, v = (t[None, :, :L].to(device) for t in (qa, ka, va))
        ts, ref = _timed(lambda q=q, k=k, v=v: F.scaled_dot_product_attention(q, k, v),
                         repeats)
        tb, (ob, _) = _timed(lambda q=q, k=k, v=v: sparse_attention(
            q, k, v, method="block", keep_ratio=keep, block_size=block_size), repeats)
        tt, (ot, _) = _timed(lambda q=q, k=k, v=v: sparse_attention(
            q, k, v, method="topk", keep_ratio=keep, block_size=block_size), repeats)
        rows = torch.randperm(L, generator=g)[:n_err].to(device)
        with torch.no_grad():
            oe, _ = sparse_attention(q[:, :, rows], k, v, method="topk", keep_ratio=keep,
                                     preselect=None)
        r = ref[:, :, rows]
        eb, et, ee = _rel(ob[:, :, rows], r), _rel(ot[:, :, rows], r), _rel(oe, r)
        print(f"| {L} | {ts:.3f} | {tb:.3f} | {ts / tb:.2f}x | {tt:.3f} | {ts / tt:.2f}x | "
              f"{eb:.4f} | {et:.4f} | {ee:.4f} | {eb / ee:.2f} |", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--long", action="store_true", help="add L = 65536 to the attention table")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--parts", default="a,b,speed,million,lasso,block")
    args = ap.parse_args()
    parts = set(args.parts.split(","))
    if args.device != "cpu":
        if not torch.cuda.is_available():
            print("CUDA is not available: GPU section skipped")
            return
        lengths = (1024, 4096, 16384) if args.quick else (1024, 4096, 16384, 65536)
        block_attention(lengths, device=args.device, repeats=3)
        return
    from skdict.datasets import load_minilm_activations

    n_tok, n_q = (2000, 50) if args.quick else (5000, 200)
    X = load_minilm_activations(n_tok + n_q, layer=3)
    T, Q = np.ascontiguousarray(X[:n_tok]), np.ascontiguousarray(X[n_tok:])
    print(f"torch {torch.__version__}, tokens {T.shape}, queries {Q.shape} "
          "(all-MiniLM-L6-v2 layer 3, stdlib docstring corpus)")
    if "a" in parts:
        table_a(T, Q, n_lasso=5 if args.quick else 10, lasso_alpha=5.0, thr_alpha=1.0)
    if "b" in parts:
        table_b(T, Q, thr_alpha=1.0)
    if "speed" in parts:
        speed(L=1024 if args.quick else 4096)
    if "million" in parts:
        million(n=100_000 if args.quick else 1_000_000)
    if "lasso" in parts:
        lasso_speed(T, Q, n_q=5 if args.quick else 20)
    if "block" in parts:
        lengths = [1024, 4096] if args.quick else [1024, 2048, 4096, 8192, 16384]
        if args.long:
            lengths.append(65536)
        block_attention(lengths, repeats=1 if args.quick else 2)


if __name__ == "__main__":
    main()
