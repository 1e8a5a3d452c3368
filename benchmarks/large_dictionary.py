"""CollapsedDictionaryLearner at large K: memory, throughput, approximate routing,
planted recovery, and scikit-learn side by side.

Run ``python -m benchmarks.large_dictionary`` (default: every part at the
default sizes) or select parts::

    python -m benchmarks.large_dictionary --parts peak,large,approx
    python -m benchmarks.large_dictionary --parts large --n-rows 1000000 --ks 32768,65536

Parts
-----
peak      the machine's matmul peak: a 4096^3 float32 torch GEMM, GFLOP/s.
large     one epoch per K over MiniLM activations read from a memmap, each K in a
          fresh subprocess: peak RSS after every epoch, rows/s, and the fraction
          of the GEMM peak reached by the routing step (2 K P flops per row).
routing   the routing step alone, exact vs approximate: rows/s and recall.
approx    exact vs approximate routing on the same data and dictionary:
          rows/s of the routing+coding step and the reconstruction MSE of both.
profile   where the milliseconds of one minibatch step go, per K (routing GEMM +
          top-s, codes, statistics, atom refresh, resampling, the rest), beside
          the GEMM-bound time of the step's routing.
faiss     routing alone beside FAISS (faiss-cpu): an inner-product IVF index and
          an HNSW index over the atoms and their negatives (|<x, d>| routing),
          build time, rows/s and recall of the exact top-m.
gpu       (``--device cuda``) one epoch per K on the GPU beside the GPU's own
          float32 GEMM peak (fraction of the exact-routing bound), and the
          approximate routing (torch cluster index) beside it.
recovery  planted dictionary, K = 4096: fraction of true atoms with |cos| >= 0.95.
sklearn   vs sklearn MiniBatchDictionaryLearning at K = 1024 / 4096 (MSE at
          equal s and equal wall time), and sklearn's time / peak RSS at
          K = 16384 in a subprocess with a timeout.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np
import torch

from skdict import CollapsedDictionaryLearner


def _rss_gb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def gemm_peak(n=4096, reps=3):
    A = torch.randn(n, n)
    B = torch.randn(n, n)
    A @ B
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        A @ B
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


SOURCE_ROWS = 200000  # MiniLM tokens computed once and cached (memmapped .npy)


def load_rows(n_rows):
    from skdict.datasets import load_minilm_activations

    t = time.perf_counter()
    X = load_minilm_activations(max(n_rows, SOURCE_ROWS), mmap_mode="r")
    return X, time.perf_counter() - t


def _routing_rate(est, X, n=4096):
    """Rows/s of the routing step alone (exact), over ``n`` rows."""
    from skdict.solvers.routing import route_topk

    D = torch.from_numpy(est.components_)
    Xb = torch.from_numpy(np.array(X[:n]))
    route_topk(Xb[:256], D, est.n_nonzero_coefs, tile_size=est.tile_size)
    t = time.perf_counter()
    for r0 in range(0, n, est.batch_size):
        route_topk(Xb[r0:r0 + est.batch_size], D, 2 * est.n_nonzero_coefs,
                   tile_size=est.tile_size)
    return n / (time.perf_counter() - t)


def child_large(K, n_rows, epochs, s, batch, out):
    Xall, t_load = load_rows(n_rows + K)
    X = Xall[:n_rows]
    # initial atoms from rows outside the epoch (otherwise, when K >= n_rows, every
    # row of the epoch would start as an atom and the MSE would be meaningless)
    init = np.asarray(Xall[n_rows:n_rows + K], dtype=np.float32)
    est = CollapsedDictionaryLearner(K, n_nonzero_coefs=s, batch_size=batch, dict_init=init,
                                     tile_size=4096, random_state=0, device="cpu")
    rows = []
    for ep in range(epochs):
        t = time.perf_counter()
        est.partial_fit(X)
        dt = time.perf_counter() - t
        rows.append({"epoch": ep + 1, "rows_per_s": n_rows / dt, "seconds": dt,
                     "peak_rss_gb": _rss_gb(), "mse": float(est.loss_curve_[-1])})
    rate = _routing_rate(est, X)
    json.dump({"K": K, "n_rows": n_rows, "epochs": rows, "routing_rows_per_s": rate,
               "load_s": t_load}, open(out, "w"))


def part_large(args, peak):
    print(f"\n## large: one epoch = {args.n_rows} MiniLM rows (layer 3, 384-d) from a "
          f"memmap, s={args.s}, batch={args.batch}")
    print("| K | epoch | rows/s | peak RSS (GB) | batch MSE | routing-only rows/s | "
          "routing GFLOP/s | fraction of GEMM peak |")
    print("|---|---|---|---|---|---|---|---|")
    for K in args.ks:
        out = f"/tmp/_skdict_large_{K}.json"
        cmd = [sys.executable, "-m", "benchmarks.large_dictionary", "--child-large",
               str(K), "--n-rows", str(args.n_rows), "--epochs", str(args.epochs),
               "--s", str(args.s), "--batch", str(args.batch), "--out", out]
        subprocess.run(cmd, check=True, timeout=3600)
        res = json.load(open(out))
        flops = 2 * K * 384
        # routing-only rate measured with 2s candidates (what fit routes)
        gf = res["routing_rows_per_s"] * flops / 1e9
        for e in res["epochs"]:
            gfe = e["rows_per_s"] * flops / 1e9
            print(f"| {K} | {e['epoch']} | {e['rows_per_s']:.0f} | {e['peak_rss_gb']:.2f} | "
                  f"{e['mse']:.4g} | {res['routing_rows_per_s']:.0f} | {gf:.1f} | "
                  f"{gf / peak:.0%} (whole step: {gfe / peak:.0%}) |")


def part_approx(args):
    """Exact vs approximate routing end to end: one epoch of fit, held-out MSE."""
    from skdict.solvers.routing import faiss_available

    X, _ = load_rows(args.n_rows)
    K = args.approx_k
    n_fit = min(args.n_rows - 4096 - K, args.approx_rows)
    Xtr = X[:n_fit]
    Xte = np.ascontiguousarray(X[-4096 - K:-K])
    init = np.asarray(X[-K:], dtype=np.float32)
    backend = "FAISS IVF" if faiss_available() else "torch ClusterIndex"
    print(f"\n## approx: K={K}, s={args.s}, one epoch of fit over {n_fit} memmapped rows "
          f"(same initial atoms), held-out MSE on 4096 rows; approximate index searched "
          f"with {backend}, rebuilt every 20 minibatches")
    print("| routing | n_clusters | n_probes | fit rows/s | held-out MSE | MSE vs exact | "
          "speed-up |")
    print("|---|---|---|---|---|---|---|")

    def run(**kw):
        est = CollapsedDictionaryLearner(K, n_nonzero_coefs=args.s, batch_size=args.batch,
                                         dict_init=init, random_state=0, device="cpu", **kw)
        t = time.perf_counter()
        est.partial_fit(Xtr)
        rate = n_fit / (time.perf_counter() - t)
        return rate, -est.score(Xte)

    rate_exact, mse_exact = run()
    print(f"| exact | - | - | {rate_exact:.0f} | {mse_exact:.4g} | 1.000 | 1.0x |", flush=True)
    for n_clusters, n_probes in args.approx_grid:
        rate, mse = run(routing="approximate", n_clusters=n_clusters, n_probes=n_probes)
        print(f"| approximate | {n_clusters} | {n_probes} | {rate:.0f} | {mse:.4g} | "
              f"{mse / mse_exact:.3f} | {rate / rate_exact:.1f}x |", flush=True)


def part_routing(args):
    """Routing step alone: exact tiled top-2s vs approximate (cluster index)."""
    from skdict.solvers.routing import ClusterIndex, route_approx, route_topk

    X, _ = load_rows(args.n_rows)
    K = args.approx_k
    Xb = torch.from_numpy(np.ascontiguousarray(X[:2048]))
    D = torch.from_numpy(np.ascontiguousarray(X[100000:100000 + K]))
    D = D / D.norm(dim=1, keepdim=True)
    m = 2 * args.s
    t = time.perf_counter()
    _, i0 = route_topk(Xb, D, m)
    te = time.perf_counter() - t
    print(f"\n## routing only: K={K} atoms = normalised MiniLM rows, 2048 rows, top-{m}")
    print("| routing | n_clusters | n_probes | rows/s | speed-up | recall of exact top-m | "
          "index build s |")
    print("|---|---|---|---|---|---|---|")
    print(f"| exact | - | - | {2048 / te:.0f} | 1.0x | 1.000 | - |")
    for n_clusters, n_probes in args.approx_grid:
        t = time.perf_counter()
        index = ClusterIndex(D, n_clusters, generator=torch.Generator().manual_seed(0))
        tb = time.perf_counter() - t
        t = time.perf_counter()
        _, i = route_approx(Xb, D, m, index, n_probes=n_probes)
        ta = time.perf_counter() - t
        rec = float((i[:, :, None] == i0[:, None, :]).any(2).float().mean())
        print(f"| approximate | {n_clusters} | {n_probes} | {2048 / ta:.0f} | {te / ta:.1f}x | "
              f"{rec:.3f} | {tb:.1f} |")


def part_profile(args, peak):
    """Per-phase time of the training step, by wrapping the functions it calls."""
    import skdict.large as large_mod
    import skdict.training.collapsed as coll_mod
    import skdict.updates.sparse_stats as ss_mod
    from skdict.updates import SparseStats

    X, _ = load_rows(args.n_rows)
    n_steps = 3
    print(f"\n## profile: ms per minibatch step of {args.batch} rows (s={args.s}, "
          f"{2 * args.s} routed candidates), mean of {n_steps} steps after a warm-up "
          "epoch of 4 steps")
    print("| K | step ms | routing (GEMM + top-s) | GEMM bound of routing | codes | "
          "statistics (B / batch pairs / merge+prune) | atom refresh | resampling | "
          "decode | rest | rows/s | fraction of bound |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for K in args.ks:
        acc = {}

        def timed(name, fn, acc=acc):
            def wrapper(*a, **kw):
                t = time.perf_counter()
                out = fn(*a, **kw)
                acc[name] = acc.get(name, 0.0) + time.perf_counter() - t
                return out
            return wrapper

        init = np.asarray(X[-K:], dtype=np.float32)
        est = CollapsedDictionaryLearner(K, n_nonzero_coefs=args.s, batch_size=args.batch,
                                         dict_init=init, random_state=0, device="cpu")
        est.partial_fit(X[:4 * args.batch])
        patches = [(large_mod, "route_topk", "routing"), (large_mod, "active_gram", "codes"),
                   (large_mod, "active_lstsq", "codes"), (SparseStats, "update", "statistics"),
                   (ss_mod, "accumulate_B", "B"), (ss_mod, "batch_cooccurrence", "pairs"),
                   (SparseStats, "_add_offdiag", "merge"),
                   (coll_mod, "refresh_atoms", "refresh"),
                   (coll_mod, "resample_dead_atoms", "resampling"),
                   (coll_mod, "topk_decode", "decode"),
                   (coll_mod.CollapsedLearner, "step", "step")]
        saved = [getattr(obj, name) for obj, name, _ in patches]
        for (obj, name, key), fn in zip(patches, saved, strict=True):
            setattr(obj, name, timed(key, fn))
        try:
            est.partial_fit(X[4 * args.batch:(4 + n_steps) * args.batch])
        finally:
            for (obj, name, _), fn in zip(patches, saved, strict=True):
                setattr(obj, name, fn)
        ms = {k: 1000 * v / n_steps for k, v in acc.items()}
        g = lambda k, ms=ms: ms.get(k, 0.0)  # noqa: E731
        bound = 1000 * args.batch * 2 * K * 384 / (peak * 1e9)
        rest = ms["step"] - sum(g(k) for k in ("routing", "codes", "statistics", "refresh",
                                               "resampling", "decode"))
        rate = args.batch / (ms["step"] / 1000)
        print(f"| {K} | {ms['step']:.0f} | {g('routing'):.0f} | {bound:.0f} | "
              f"{g('codes'):.0f} | {g('statistics'):.0f} ({g('B'):.0f} / {g('pairs'):.0f} / "
              f"{g('merge'):.0f}) | {g('refresh'):.0f} | {g('resampling'):.0f} | "
              f"{g('decode'):.0f} | {rest:.0f} | {rate:.0f} | {bound / ms['step']:.0%} |",
              flush=True)


def _faiss_index(D, kind, nlist, nprobe):
    import faiss

    Dn = np.ascontiguousarray(np.concatenate([D, -D]), dtype=np.float32)
    P = D.shape[1]
    if kind == "ivf":
        quant = faiss.IndexFlatIP(P)
        index = faiss.IndexIVFFlat(quant, P, nlist, faiss.METRIC_INNER_PRODUCT)
        index.train(Dn)
        index.nprobe = nprobe
    else:
        index = faiss.IndexHNSWFlat(P, 32, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efSearch = nprobe
    index.add(Dn)
    return index


def part_faiss(args):
    """Routing alone: exact (skdict), skdict's cluster index, FAISS IVF and HNSW."""
    from skdict.solvers.routing import ClusterIndex, route_approx, route_topk

    try:
        import faiss
    except ImportError:
        print("\n## faiss: faiss-cpu is not installed (pip install skdict[faiss]); skipped")
        return
    faiss.omp_set_num_threads(torch.get_num_threads())
    X, _ = load_rows(args.n_rows)
    K = args.approx_k
    Xb = np.ascontiguousarray(X[:2048])
    D = np.ascontiguousarray(X[100000:100000 + K])
    D = D / np.linalg.norm(D, axis=1, keepdims=True)
    m = 2 * args.s
    Xt, Dt = torch.from_numpy(Xb), torch.from_numpy(D)
    route_topk(Xt[:64], Dt, m)
    t = time.perf_counter()
    _, i0 = route_topk(Xt, Dt, m)
    te = time.perf_counter() - t
    i0 = i0.numpy()
    print(f"\n## faiss: routing alone, K={K} atoms (normalised MiniLM rows), 2048 rows, "
          f"top-{m} by |<x, d>|; FAISS indexes hold the atoms and their negatives")
    print("| routing | setting | build s | rows/s | speed-up vs exact | recall of exact top-m |")
    print("|---|---|---|---|---|---|")
    print(f"| skdict exact | - | - | {2048 / te:.0f} | 1.0x | 1.000 |")

    def recall(i):
        return float(np.mean([len(set(a) & set(b)) / m for a, b in zip(i, i0, strict=True)]))

    for n_clusters, n_probes in args.approx_grid:
        t = time.perf_counter()
        index = ClusterIndex(Dt, n_clusters, generator=torch.Generator().manual_seed(0))
        tb = time.perf_counter() - t
        t = time.perf_counter()
        _, i = route_approx(Xt, Dt, m, index, n_probes=n_probes)
        ta = time.perf_counter() - t
        print(f"| skdict ClusterIndex | {n_clusters} clusters x {n_probes} probes | {tb:.2f} | "
              f"{2048 / ta:.0f} | {te / ta:.1f}x | {recall(i.numpy()):.3f} |")
    for kind, nlist, nprobe in (("ivf", 512, 8), ("ivf", 512, 16), ("ivf", 1024, 16),
                                ("hnsw", 0, 64), ("hnsw", 0, 128)):
        t = time.perf_counter()
        index = _faiss_index(D, kind, nlist, nprobe)
        tb = time.perf_counter() - t
        t = time.perf_counter()
        _, I = index.search(Xb, m)
        ta = time.perf_counter() - t
        ids = np.where(I >= 0, I % K, -1)
        setting = f"nlist {nlist}, nprobe {nprobe}" if kind == "ivf" else f"M 32, efSearch {nprobe}"
        print(f"| FAISS {kind.upper()} | {setting} | {tb:.2f} | {2048 / ta:.0f} | "
              f"{te / ta:.1f}x | {recall(ids):.3f} |", flush=True)


def part_gpu(args):
    if not torch.cuda.is_available():
        print("\n## gpu: CUDA is not available; skipped")
        return
    dev = torch.device(args.device)
    A = torch.randn(8192, 8192, device=dev)
    A @ A
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(5):
        A @ A
    torch.cuda.synchronize()
    peak = 5 * 2 * 8192**3 / (time.perf_counter() - t) / 1e9
    X, _ = load_rows(args.n_rows)
    n = min(args.large_rows, args.n_rows - max(args.ks))
    print(f"\n## gpu: {torch.cuda.get_device_name(dev)}, float32 GEMM peak {peak:.0f} "
          f"GFLOP/s; one epoch of {n} memmapped rows, s={args.s}, batch {args.batch}")
    print("| K | routing | rows/s | bound rows/s (peak / 2KP) | fraction | batch MSE |")
    print("|---|---|---|---|---|---|")
    for K in args.ks:
        init = np.asarray(X[-K:], dtype=np.float32)
        for routing in ("exact", "approximate"):
            est = CollapsedDictionaryLearner(K, n_nonzero_coefs=args.s, batch_size=args.batch,
                                             dict_init=init, random_state=0, device=dev,
                                             routing=routing)
            est.partial_fit(X[:2 * args.batch])  # warm-up (allocations, kernels)
            torch.cuda.synchronize()
            t = time.perf_counter()
            est.partial_fit(X[:n])
            torch.cuda.synchronize()
            rate = n / (time.perf_counter() - t)
            bound = peak * 1e9 / (2 * K * 384)
            print(f"| {K} | {routing} | {rate:.0f} | {bound:.0f} | {rate / bound:.0%} | "
                  f"{est.loss_curve_[-1]:.4g} |", flush=True)


def part_recovery(args):
    from skdict.datasets import make_sparse_data

    K, P, s = 4096, 256, 4
    n = args.recovery_rows
    X, D, _ = make_sparse_data(n, P, K, s, noise=0.01, random_state=0, dtype=np.float32,
                               sparse_codes=True)
    t = time.perf_counter()
    est = CollapsedDictionaryLearner(K, n_nonzero_coefs=s, batch_size=2048,
                                     max_iter=args.recovery_epochs, tol=0, random_state=0,
                                     device="cpu").fit(X)
    dt = time.perf_counter() - t
    best = np.zeros(K)
    for k0 in range(0, K, 1024):
        best = np.maximum(best, np.abs(D @ est.components_[k0:k0 + 1024].T).max(1))
    print(f"\n## recovery: planted K={K}, P={P}, s={s}, noise 0.01, {n} rows, "
          f"{args.recovery_epochs} epochs")
    print("| fraction |cos| >= 0.95 | >= 0.9 | median best |cos| | final MSE | fit s |")
    print("|---|---|---|---|---|---|")
    print(f"| {(best >= 0.95).mean():.3f} | {(best >= 0.9).mean():.3f} | "
          f"{np.median(best):.3f} | {est.loss_curve_[-1]:.4g} | {dt:.0f} |")


def _sk_child(K, n_rows, s, out):
    from sklearn.decomposition import MiniBatchDictionaryLearning

    X, _ = load_rows(max(n_rows, 20000))
    X = np.ascontiguousarray(X[:n_rows])
    t = time.perf_counter()
    sk = MiniBatchDictionaryLearning(K, alpha=1.0, batch_size=256, max_iter=1,
                                     transform_algorithm="omp",
                                     transform_n_nonzero_coefs=s, random_state=0)
    sk.fit(X)
    json.dump({"seconds": time.perf_counter() - t, "peak_rss_gb": _rss_gb()}, open(out, "w"))


def part_sklearn(args):
    from sklearn.decomposition import MiniBatchDictionaryLearning
    from sklearn.linear_model import orthogonal_mp_gram

    X, _ = load_rows(args.n_rows)
    n = args.sk_rows
    Xtr = np.ascontiguousarray(X[:n], dtype=np.float32)
    Xte = np.ascontiguousarray(X[-2048:], dtype=np.float64)
    s = args.s
    print(f"\n## sklearn: {n} MiniLM rows, s={s}; sklearn MiniBatchDictionaryLearning "
          "(alpha=1, batch 256, 1 epoch) then OMP with s atoms; skdict given the same "
          "wall time (partial_fit passes until the time is used); MSE on 2048 held-out rows")
    print("| K | sklearn fit s | sklearn MSE (OMP, s) | skdict passes in that time | "
          "skdict MSE (s) | MSE ratio skdict/sklearn |")
    print("|---|---|---|---|---|---|")
    for K in args.sk_ks:
        t = time.perf_counter()
        sk = MiniBatchDictionaryLearning(K, alpha=1.0, batch_size=256, max_iter=1,
                                         random_state=0).fit(Xtr)
        t_sk = time.perf_counter() - t
        Dsk = sk.components_.astype(np.float64)
        codes = orthogonal_mp_gram(Dsk @ Dsk.T, Dsk @ Xte.T, n_nonzero_coefs=s).T
        mse_sk = float(np.mean((Xte - codes @ Dsk) ** 2))
        est = CollapsedDictionaryLearner(K, n_nonzero_coefs=s, batch_size=args.batch,
                                         random_state=0, device="cpu")
        t = time.perf_counter()
        passes = 0
        while True:
            est.partial_fit(Xtr)
            passes += 1
            if time.perf_counter() - t >= t_sk:
                break
        mse = -est.score(Xte.astype(np.float32))
        print(f"| {K} | {t_sk:.1f} | {mse_sk:.4g} | {passes} ({time.perf_counter() - t:.1f} s)"
              f" | {mse:.4g} | {mse / mse_sk:.2f} |")
    K = args.sk_big
    out = f"/tmp/_skdict_sk_{K}.json"
    cmd = [sys.executable, "-m", "benchmarks.large_dictionary", "--child-sklearn", str(K),
           "--sk-rows", str(n), "--s", str(s), "--out", out]
    t = time.perf_counter()
    try:
        subprocess.run(cmd, check=True, timeout=args.sk_timeout, capture_output=True)
        res = json.load(open(out))
        sk_txt = f"{res['seconds']:.0f} s, peak RSS {res['peak_rss_gb']:.2f} GB"
    except subprocess.TimeoutExpired:
        sk_txt = f"did not finish one epoch in {args.sk_timeout} s (killed)"
    except subprocess.CalledProcessError as exc:
        sk_txt = f"failed: {exc.stderr.decode()[-200:]!r}"
    est = CollapsedDictionaryLearner(K, n_nonzero_coefs=s, batch_size=args.batch,
                                     random_state=0, device="cpu")
    t = time.perf_counter()
    est.partial_fit(Xtr)
    dt = time.perf_counter() - t
    print(f"\n| K={K}, {n} rows, 1 epoch | time | memory |\n|---|---|---|")
    print(f"| sklearn MiniBatchDictionaryLearning | {sk_txt} | (dense K x K = "
          f"{K * K * 8 / 2**30:.1f} GiB float64 statistics) |")
    print(f"| skdict CollapsedDictionaryLearner | {dt:.1f} s | peak RSS of this "
          f"process so far {_rss_gb():.2f} GB |")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts",
                   default="peak,large,profile,routing,faiss,approx,recovery,sklearn")
    p.add_argument("--n-rows", type=int, default=200000,
                   help="MiniLM rows (memmap); an epoch of 'large' reads them all")
    p.add_argument("--large-rows", type=int, default=65536,
                   help="rows per epoch in 'large' (<= n-rows)")
    p.add_argument("--ks", default="32768,65536")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--s", type=int, default=16)
    p.add_argument("--batch", type=int, default=2048)
    p.add_argument("--approx-k", type=int, default=32768)
    p.add_argument("--approx-grid", default="256x4,512x4,512x8")
    p.add_argument("--approx-rows", type=int, default=40960,
                   help="rows of the one-epoch fits of 'approx'")
    p.add_argument("--recovery-rows", type=int, default=40000)
    p.add_argument("--recovery-epochs", type=int, default=3)
    p.add_argument("--sk-rows", type=int, default=4096)
    p.add_argument("--sk-ks", default="1024,4096")
    p.add_argument("--sk-big", type=int, default=16384)
    p.add_argument("--sk-timeout", type=int, default=120)
    p.add_argument("--device", default="cpu",
                   help="'cuda' runs the GPU section (part 'gpu') only")
    p.add_argument("--child-large", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--child-sklearn", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child_large is not None:
        return child_large(args.child_large, args.n_rows, args.epochs, args.s, args.batch,
                           args.out)
    if args.child_sklearn is not None:
        return _sk_child(args.child_sklearn, args.sk_rows, args.s, args.out)
    args.ks = [int(k) for k in args.ks.split(",") if k]
    args.sk_ks = [int(k) for k in args.sk_ks.split(",") if k]
    args.approx_grid = [tuple(int(v) for v in g.split("x")) for g in args.approx_grid.split(",")]
    parts = set(args.parts.split(","))
    if args.device != "cpu":
        print("# python -m benchmarks.large_dictionary " + " ".join(sys.argv[1:]))
        return part_gpu(args)
    print("# python -m benchmarks.large_dictionary " + " ".join(sys.argv[1:]))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    peak = gemm_peak()
    print(f"\n## peak: 4096^3 float32 torch GEMM: {peak:.1f} GFLOP/s")
    if "large" in parts:
        big = argparse.Namespace(**vars(args))
        big.n_rows = args.large_rows
        part_large(big, peak)
    if "profile" in parts:
        part_profile(args, peak)
    if "routing" in parts:
        part_routing(args)
    if "faiss" in parts:
        part_faiss(args)
    if "approx" in parts:
        part_approx(args)
    if "recovery" in parts:
        part_recovery(args)
    if "sklearn" in parts:
        part_sklearn(args)


if __name__ == "__main__":
    main()
