"""Strong scaling of skdict on Dask and torch.distributed, and a communication model.

Run: ``python -m benchmarks.scale`` (``--quick`` for a smaller run,
``--device cuda`` for the GPU section). Sections:

1. Dask, transform of ``n`` rows (1M by default, P=64) with a fitted
   :class:`skdict.KSparseAutoencoder` (1024 latents, k=32, CSR codes): one
   process (one thread) in memory, then a
   ``LocalCluster`` of 1 and of 2 single-threaded worker processes; the data
   are generated and persisted on the workers first, the codes are reduced to
   their non-zero count on the workers (not gathered), so the time is coding.
2. Dask, one dictionary-learning epoch (:class:`skdict.LCASparseCoder`,
   K=128, ``fit_algorithm="exact"``, exact lasso codes): in memory, 1 worker,
   2 workers (steps of two 1/4-chunk blocks per worker).
3. torch.distributed (gloo), one :class:`skdict.KSparseAutoencoder` epoch
   and one :class:`skdict.LISTAEncoder` epoch (16 ALISTA layers over the K=128
   dictionary, exact validation codes included, a quarter of the rows): 1
   process vs 2 ranks holding ``X[r::2]`` (global batch 4096).
4. A per-step model of communication against compute, from the measured
   per-row compute and the measured per-task / per-collective latencies of
   this machine, extrapolated to 8, 64 and 512 workers, stating from where
   communication dominates.

Efficiency is ``T(1) / (2 T(2))``. On a shared 2-core machine the 2-worker
figures are bounded by the cores other processes leave free: report ``uptime``.
"""

from __future__ import annotations

import argparse
import math
import os
import socket
import tempfile
import time

import numpy as np
import torch

from . import _common  # noqa: F401  (OMP_WAIT_POLICY for the worker processes)

K, P, ALPHA = 128, 64, 0.15
SAE_K, SAE_LATENTS, SAE_BATCH = 32, 1024, 4096
# assumed network for the extrapolation (the loopback of one machine says nothing
# about bandwidth): 10 Gb/s Ethernet
BANDWIDTH = 1.25e9


def _dictionary(seed=0):
    rng = np.random.default_rng(seed)
    D = rng.standard_normal((K, P)).astype(np.float32)
    return D / np.linalg.norm(D, axis=1, keepdims=True)


def _rows(block_id, n_rows, seed=0):
    """Deterministic synthetic rows: sparse combinations of the dictionary + noise."""
    rng = np.random.default_rng((seed, block_id))
    A = rng.standard_normal((n_rows, K)) * (rng.random((n_rows, K)) < 0.08)
    return (A @ _dictionary() + 0.1 * rng.standard_normal((n_rows, P))).astype(np.float32)


def _dask_rows(n, chunk):
    import dask.array as da

    n_blocks = -(-n // chunk)
    sizes = [min(chunk, n - i * chunk) for i in range(n_blocks)]
    blocks = [da.from_delayed(_delayed_rows(i, s), shape=(s, P), dtype=np.float32)
              for i, s in enumerate(sizes)]
    return da.concatenate(blocks, axis=0)


def _delayed_rows(i, s):
    import dask

    return dask.delayed(_rows, pure=True)(i, s)


def _nnz(codes):
    return np.array([[codes.nnz]], dtype=np.int64)


def _cluster(n_workers):
    from distributed import Client, LocalCluster

    cluster = LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True,
                           dashboard_address=":0")
    client = Client(cluster)
    client.run(lambda: __import__("skdict.lca"))
    return cluster, client


def _warm(coder, lca):
    """Compile the kernels (numba) before timing: the first call of a process pays it."""
    from skdict import LCASparseCoder

    torch.set_num_threads(1)
    X = _rows(10**7, 2048)
    coder.transform(X)
    LCASparseCoder(**lca).fit(X)


def _task_overhead(client, n_tasks=200):
    """Seconds per trivial task through the scheduler (round trip included)."""
    import dask

    tasks = [dask.delayed(abs, pure=False)(i) for i in range(n_tasks)]
    dask.compute(*tasks[:10])
    t = time.perf_counter()
    dask.compute(*tasks)
    return (time.perf_counter() - t) / n_tasks


def dask_section(n, n_fit, chunk):
    from distributed import wait

    from skdict import KSparseAutoencoder, LCASparseCoder

    torch.set_num_threads(1)
    coder = KSparseAutoencoder(**{**_sae_params("cpu"), "max_iter": 2})
    coder.fit(np.concatenate([_rows(10**6 + i, 4096) for i in range(4)]))
    lca = dict(n_components=K, alpha=ALPHA, fit_algorithm="exact", max_iter=1,
               batch_size=1024, random_state=0, device="cpu")
    X_mem = np.concatenate([_rows(i, min(chunk, n - i * chunk))
                            for i in range(-(-n // chunk))])
    _warm(coder, lca)
    t = time.perf_counter()
    codes = coder.transform(X_mem)
    t_mem = time.perf_counter() - t
    nnz_mem = codes.nnz
    del codes
    t = time.perf_counter()
    LCASparseCoder(**lca).fit(X_mem[:n_fit])
    t_fit_mem = time.perf_counter() - t
    del X_mem
    res = {"transform": {"memory": t_mem}, "epoch": {"memory": t_fit_mem}}
    overhead = {}
    for w in (1, 2):
        cluster, client = _cluster(w)
        try:
            client.run(_warm, coder, lca)  # compiled kernels, on every worker
            X = _dask_rows(n, chunk).persist()
            wait(X)
            nnz = coder.transform(X).map_blocks(_nnz, chunks=(1, 1), dtype=np.int64)
            t = time.perf_counter()
            total = int(nnz.sum().compute())
            res["transform"][w] = time.perf_counter() - t
            assert total == nnz_mem, (total, nnz_mem)
            Xf = X[:n_fit].rechunk({0: chunk // 4}).persist()  # 2 blocks per step and worker
            wait(Xf)
            t = time.perf_counter()
            LCASparseCoder(**lca).fit(Xf)
            res["epoch"][w] = time.perf_counter() - t
            overhead[w] = _task_overhead(client)
        finally:
            client.close()
            cluster.close()
    return res, overhead


# ------------------------------------------------------------------ torch.distributed
def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sae_params(device):
    return dict(n_components=SAE_LATENTS, k=SAE_K, max_iter=1, batch_size=SAE_BATCH,
                random_state=0, device=device, shuffle=False)


def _lista_params():
    return dict(alpha=ALPHA, max_iter=1, batch_size=SAE_BATCH, random_state=0, device="cpu",
                shuffle=False)


def _rank(rank, world, port, n, out):
    import torch.distributed as dist

    from skdict import KSparseAutoencoder, LISTAEncoder

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    try:
        X = np.concatenate([_rows(i, 4096) for i in range(-(-n // 4096))])[:n]
        est = KSparseAutoencoder(**_sae_params("cpu"))
        est.fit(X[rank::world][:SAE_BATCH])  # warm-up (kernels, optimizer import)
        dist.barrier()
        t = time.perf_counter()
        est.fit(X[rank::world])
        el = time.perf_counter() - t
        Xl = X[: n // 4][rank::world]
        LISTAEncoder(_dictionary(), **_lista_params()).fit(Xl[:SAE_BATCH])  # warm-up
        dist.barrier()
        t = time.perf_counter()
        LISTAEncoder(_dictionary(), **_lista_params()).fit(Xl)
        el_lista = time.perf_counter() - t
        # latency of an all-reduce of the SAE's gradients
        g = torch.zeros(2 * SAE_LATENTS * P + SAE_LATENTS + P)
        for _ in range(3):
            dist.all_reduce(g)
        t = time.perf_counter()
        for _ in range(20):
            dist.all_reduce(g)
        ar = (time.perf_counter() - t) / 20
        one = torch.zeros(1)
        t = time.perf_counter()
        for _ in range(50):
            dist.all_reduce(one)
        lat = (time.perf_counter() - t) / 50
        np.save(os.path.join(out, f"r{rank}.npy"), np.array([el, ar, lat, el_lista]))
    finally:
        dist.destroy_process_group()


def torch_section(n):
    import torch.multiprocessing as mp

    from skdict import KSparseAutoencoder, LISTAEncoder

    torch.set_num_threads(1)
    X = np.concatenate([_rows(i, 4096) for i in range(-(-n // 4096))])[:n]
    est = KSparseAutoencoder(**_sae_params("cpu"))
    est.fit(X[:SAE_BATCH])
    t = time.perf_counter()
    est.fit(X)
    t1 = time.perf_counter() - t
    LISTAEncoder(_dictionary(), **_lista_params()).fit(X[:SAE_BATCH])
    t = time.perf_counter()
    LISTAEncoder(_dictionary(), **_lista_params()).fit(X[: n // 4])
    t1_lista = time.perf_counter() - t
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(_rank, args=(2, _free_port(), n, out), nprocs=2)
        r = [np.load(os.path.join(out, f"r{i}.npy")) for i in range(2)]
    t2 = max(x[0] for x in r)
    lista = {1: t1_lista, 2: max(x[3] for x in r)}
    return {1: t1, 2: t2}, max(x[1] for x in r), max(x[2] for x in r), lista


# ------------------------------------------------------------------ model
def _fmt(s):
    return f"{s * 1e3:9.2f} ms" if s < 10 else f"{s:9.1f} s "


def model(per_row_fit, per_row_sae, task_overhead, allreduce_latency, block_rows,
          label=""):
    """Per-step compute vs communication for W = 2 (measured rates), 8, 64, 512."""
    f = 4  # float32 bytes
    print(f"\nCommunication model per step{label}: 10 Gb/s links, latencies measured here")
    print(f"  Dask dictionary learning (one block of {block_rows} rows per worker and step;"
          f" K={K}, P={P}):")
    print("    broadcast D: K*P floats to every worker; reduce A, B (and K worst rows):"
          " (K*K + 2*K*P) floats per block, summed in a tree of depth log2(W);")
    print("    the scheduler handles W tasks per step one after the other.")
    print(f"    {'W':>5} {'compute/step':>13} {'comm/step':>13} {'comm/compute':>13}")
    stats_bytes = (K * K + 2 * K * P) * f
    d_bytes = K * P * f
    crossover = None
    for W in (2, 8, 64, 512):
        compute = block_rows * per_row_fit
        depth = max(1, math.ceil(math.log2(W)))
        comm = (W * task_overhead + depth * (stats_bytes / BANDWIDTH + task_overhead)
                + depth * d_bytes / BANDWIDTH)
        ratio = comm / compute
        if crossover is None and ratio > 1:
            crossover = W
        print(f"    {W:>5} {_fmt(compute):>13} {_fmt(comm):>13} {ratio:>13.2f}")
    print("    -> communication dominates from "
          + (f"W = {crossover} workers" if crossover else "beyond 512 workers")
          + " at this block size (bigger blocks per worker push it out linearly).")
    S = (2 * SAE_LATENTS * P + SAE_LATENTS + P) * f
    print(f"  torch.distributed SAE (global batch {SAE_BATCH}, {SAE_LATENTS} latents, "
          f"{S / 1e6:.2f} MB of gradients):")
    print("    ring all-reduce: 2 (W-1)/W * S / bandwidth + 2 (W-1) * latency, plus ~8 small"
          " collectives per step (batch statistics, fired latents, metrics);")
    print("    compute per rank shrinks as 1/W (strong scaling of a fixed global batch).")
    print(f"    {'W':>5} {'compute/step':>13} {'comm/step':>13} {'comm/compute':>13}")
    crossover = None
    for W in (2, 8, 64, 512):
        compute = SAE_BATCH / W * per_row_sae
        comm = 2 * (W - 1) / W * S / BANDWIDTH + (2 * (W - 1) + 8 * math.log2(W)) \
            * allreduce_latency
        ratio = comm / compute
        if crossover is None and ratio > 1:
            crossover = W
        print(f"    {W:>5} {_fmt(compute):>13} {_fmt(comm):>13} {ratio:>13.2f}")
    print("    -> communication dominates from "
          + (f"W = {crossover} ranks" if crossover else "beyond 512 ranks")
          + f" (below ~{SAE_BATCH // (crossover or 512)} rows per rank and step).")


def gpu_section(n):
    """Per-row compute on the GPU, in memory, and the model with those rates."""
    from skdict import KSparseAutoencoder, LCASparseCoder

    dev = "cuda"
    X = np.concatenate([_rows(i, 65536) for i in range(-(-n // 65536))])[:n]
    lca = dict(n_components=K, alpha=ALPHA, fit_algorithm="exact", max_iter=1,
               batch_size=4096, random_state=0, device=dev)
    LCASparseCoder(**lca).fit(X[:8192])
    torch.cuda.synchronize()
    m = min(n, 262_144)
    t = time.perf_counter()
    LCASparseCoder(**lca).fit(X[:m])
    torch.cuda.synchronize()
    t_code = (time.perf_counter() - t) * n / m
    est = KSparseAutoencoder(**_sae_params(dev))
    est.fit(X[:SAE_BATCH * 2])
    torch.cuda.synchronize()
    t = time.perf_counter()
    est.fit(X)
    torch.cuda.synchronize()
    t_sae = time.perf_counter() - t
    print(f"\nGPU ({torch.cuda.get_device_name()}), in memory, {n} rows:")
    print(f"  LCASparseCoder exact epoch  {_fmt(t_code)}   ({n / t_code:,.0f} rows/s)")
    print(f"  KSparseAutoencoder epoch    {_fmt(t_sae)}   ({n / t_sae:,.0f} rows/s)")
    return t_code / n, t_sae / n


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = ap.parse_args(argv)
    n = 200_000 if args.quick else 1_000_000
    n_fit = 20_000 if args.quick else 100_000
    n_sae = 65_536 if args.quick else 262_144
    chunk = 25_000 if args.quick else 62_500
    print(f"load: {os.getloadavg()}  (cores: {os.cpu_count()})")
    if args.device == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: CUDA is not available")
        code_row, sae_row = gpu_section(n)
        model(code_row, sae_row, task_overhead=1e-3, allreduce_latency=50e-6,
              block_rows=chunk // 4, label=" (GPU compute rates, assumed 1 ms per task, "
              "50 us per collective)")
        return
    res, overhead = dask_section(n, n_fit, chunk)
    print(f"\nDask strong scaling (single-threaded workers), {n} rows x {P} features, "
          f"K={K}")
    print(f"  {'':32} {'in memory':>12} {'1 worker':>12} {'2 workers':>12} "
          f"{'speed-up':>9} {'efficiency':>10}")
    for key, label in (("transform", f"SAE transform {n} rows"),
                       ("epoch", f"LCA epoch {n_fit} rows")):
        r = res[key]
        s = r[1] / r[2]
        print(f"  {label:32} {_fmt(r['memory']):>12} {_fmt(r[1]):>12} {_fmt(r[2]):>12} "
              f"{s:>8.2f}x {s / 2:>10.0%}")
    print(f"  scheduler round trip per task: {overhead[2] * 1e3:.2f} ms")
    sae, allreduce, latency, lista = torch_section(n_sae)
    print(f"\ntorch.distributed (gloo) strong scaling, one epoch, global batch {SAE_BATCH}")
    print(f"  {'':32} {'1 process':>12} {'2 ranks':>12} {'speed-up':>9} {'efficiency':>10}")
    for label, r in ((f"KSparseAutoencoder {n_sae} rows", sae),
                     (f"LISTAEncoder {n_sae // 4} rows", lista)):
        s = r[1] / r[2]
        print(f"  {label:32} {_fmt(r[1]):>12} {_fmt(r[2]):>12} {s:>8.2f}x {s / 2:>10.0%}")
    print(f"  all-reduce of the gradients ({(2 * SAE_LATENTS * P) * 4 / 1e6:.2f} MB): "
          f"{allreduce * 1e3:.2f} ms; of one float: {latency * 1e3:.3f} ms")
    model(res["epoch"][1] / n_fit, sae[1] / n_sae, overhead[2], latency,
          block_rows=chunk // 4)


if __name__ == "__main__":
    main()
