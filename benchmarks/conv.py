"""Convolutional sparse coding and dictionary learning, skdict vs sporco.

Run::

    python -m benchmarks.conv                       # all CPU sections
    python -m benchmarks.conv --quick               # 128 x 128 crops, short runs
    python -m benchmarks.conv --sections gpu --device cuda   # the GPU section

Data: the scikit-learn sample images (``load_sample_images``: china, flower) in
grey levels in [0, 1], high-passed as in sporco's examples (the image minus its
Tikhonov low-pass, ``sporco.signal.tikhonov_filter(s, 5, 16)``).

* coding: one ``size x size`` crop of each image, sporco's shipped 8x8x64
  dictionary (``sporco.util.convdicts()["G:8x8x64"]``), ``alpha = lmbda = 0.05``,
  circular boundary. The optimum is the lowest objective of long runs of both;
  the time to an objective within 1e-4 (relative) of it: sporco ``ConvBPDN``
  (default options, timed per iteration through its callback, the callback's
  own time excluded) vs skdict's ADMM (``skdict.solvers.cbpdn``, timed the
  same way at its residual checks, every 10 iterations; for float64 input it
  runs float32 iterations to residual 1e-3 first, then float64, and the
  ``float64 (mixed=False)`` row is float64 throughout). Also skdict
  ``ConvSparseCoder`` as a user calls it, at its defaults (``tol=None``: 1e-3
  on the scaled residuals), timed whole: its relative objective and its time
  over sporco's (``default_ratio``).
* memory: ``ConvSparseCoder.transform`` of 64 images of 512 x 512 with the 64
  filters (float32, a few iterations: the working set does not depend on the
  iteration count), in a child process; its peak RSS.
* dictionary learning: 32 random 8x8 filters (the same start for both), learned
  on ``--dl-train`` crops; the score is the held-out objective (a crop of each
  image not used in training, coded by skdict's ADMM to a 1e-5 duality gap,
  float64, for every dictionary). sporco ``ConvBPDNDictLearn`` (snapshots of its
  dictionary through the callback) vs ``ConvDictionaryLearning.partial_fit``
  one epoch at a time (training time only).
* gpu (with ``--device cuda``): images per second at 512 x 512 with 64 filters.
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

from ._common import machine_info, print_table

ALPHA = 0.05
DL_ALPHA = 0.1


# ---------------------------------------------------------------------- data
def sample_images():
    from sklearn.datasets import load_sample_images

    return [im.astype(np.float64).mean(2) / 255.0 for im in load_sample_images().images]


def highpass(s):
    from sporco.signal import tikhonov_filter

    return s - tikhonov_filter(s, 5.0, 16)[0]


def crops(size, n_per_image, seed=0, images=None):
    """``n_per_image`` random high-passed ``size x size`` crops of each sample image
    (reflect-padded when the image is smaller)."""
    rng = np.random.default_rng(seed)
    out = []
    for im in images or sample_images():
        H, W = im.shape
        im = np.pad(im, ((0, max(0, size - H)), (0, max(0, size - W))), mode="reflect")
        hp = highpass(im)
        for _ in range(n_per_image):
            r = rng.integers(0, hp.shape[0] - size + 1)
            c = rng.integers(0, hp.shape[1] - size + 1)
            out.append(hp[r:r + size, c:c + size])
    return np.stack(out)


def sporco_dict():
    import sporco.util as su

    return su.convdicts()["G:8x8x64"]  # (8, 8, 64)


def objective(S, Z, filters, alpha):
    """Mean per-image objective of maps ``Z`` (n, M, H, W), in float64."""
    import torch

    from skdict.operators import conv_operator

    n, H, W = S.shape
    op = conv_operator(filters, (H, W), device="cpu", dtype=torch.float64)
    Zt = torch.as_tensor(np.ascontiguousarray(Z), dtype=torch.float64).reshape(n, -1)
    R = torch.as_tensor(S, dtype=torch.float64).reshape(n, -1) - op.forward(Zt)
    return float((0.5 * (R * R).sum(1) + alpha * Zt.abs().sum(1)).mean())


# ---------------------------------------------------------------------- sporco
def sporco_cbpdn(D, S, alpha, n_iter, dtype, eval_every=5):
    """sporco ConvBPDN on images ``S`` (n, H, W); returns [(iteration, seconds,
    objective)], the seconds excluding the callback's objective evaluations."""
    from sporco.admm import cbpdn

    Ss = np.ascontiguousarray(np.transpose(S, (1, 2, 0))).astype(dtype)
    opt = cbpdn.ConvBPDN.Options({"Verbose": False, "MaxMainIter": n_iter, "FastSolve": True,
                                  "DataType": dtype})
    filters = np.transpose(D, (2, 0, 1))
    trace = []
    excluded = [0.0]
    t0 = [None]

    def cb(b):
        k = b.k + 1
        if k % eval_every == 0 or k == n_iter:
            t = time.perf_counter()
            Y = np.asarray(b.Y).reshape(S.shape[1], S.shape[2], S.shape[0], -1)
            Z = np.transpose(Y, (2, 3, 0, 1))
            trace.append((k, t - t0[0] - excluded[0], objective(S, Z, filters, alpha)))
            excluded[0] += time.perf_counter() - t
        return False

    opt["Callback"] = cb
    b = cbpdn.ConvBPDN(D.astype(dtype), Ss, alpha, opt, dimK=1)
    t0[0] = time.perf_counter()
    b.solve()
    return trace


def skdict_admm(filters, S, alpha, n_iter, dtype, device="cpu", trace=False, mixed=True):
    """skdict's CBPDN ADMM (:func:`skdict.solvers.cbpdn.cbpdn`) for ``n_iter``
    iterations (no stopping test); (seconds, maps), or with ``trace`` (seconds
    at each residual check, the callback's own time excluded, objective) per
    check."""
    import torch

    from skdict.operators import conv_operator
    from skdict.solvers.cbpdn import cbpdn

    tdt = torch.float32 if dtype == np.float32 else torch.float64
    n, H, W = S.shape
    X = torch.as_tensor(S.reshape(n, -1), dtype=tdt, device=device)
    out, excluded, t0 = [], [0.0], [None]
    Zall = np.zeros((n, filters.shape[0], H, W))  # rows that stopped keep their codes

    def cb(it, rows, Y):
        t = time.perf_counter()
        Zall[rows.cpu().numpy()] = Y.reshape(-1, filters.shape[0], H, W).cpu().double().numpy()
        out.append((it, t - t0[0] - excluded[0], objective(S, Zall, filters, alpha)))
        excluded[0] += time.perf_counter() - t

    _sync(device)
    t0[0] = time.perf_counter()
    op = conv_operator(filters, (H, W), device=device, dtype=tdt)
    res = cbpdn(op, X, alpha, max_iter=n_iter, tol=0, callback=cb if trace else None,
                mixed=mixed)
    _sync(device)
    el = time.perf_counter() - t0[0]
    if trace:
        return out
    return el, res.codes.reshape(n, -1, H, W).cpu().double().numpy()


def _sync(device):
    import torch

    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


# ---------------------------------------------------------------------- coding
def run_coding(args):
    from skdict import ConvSparseCoder

    D = sporco_dict()
    filters = np.transpose(D, (2, 0, 1))
    S = crops(args.size, 1, seed=0)
    print(f"\n## Coding: {S.shape[0]} images {args.size}x{args.size}, 64 8x8 filters, "
          f"alpha={ALPHA}, circular boundary")
    # the optimum: long runs of both, the lowest objective
    _, Zref = skdict_admm(filters, S, ALPHA, args.ref_iter, np.float64)
    f_opt = objective(S, Zref, filters, ALPHA)
    rows = []
    for dtype in args.dtypes:
        dt = np.float32 if dtype == "float32" else np.float64
        tr = sporco_cbpdn(D, S, ALPHA, args.sporco_iter, dt)
        f_opt = min(f_opt, min(o for _, _, o in tr))
        rows.append((dtype, tr))
    target = f_opt * (1 + 1e-4)
    out = []
    for dtype, tr in rows:
        dt = np.float32 if dtype == "float32" else np.float64
        hit = next(((k, t, o) for k, t, o in tr if o <= target), None)
        sp_k, sp_t = (hit[0], hit[1]) if hit else (None, None)
        sk = skdict_admm(filters, S, ALPHA, args.skdict_iter, dt, trace=True)
        sk_hit = next(((k, t) for k, t, o in sk if o <= target), None)
        sk_k, sk_t = sk_hit if sk_hit else (None, None)
        extra = []
        if dt == np.float64:  # float64 arithmetic throughout (no float32 first phase)
            pure = skdict_admm(filters, S, ALPHA, args.skdict_iter, dt, trace=True, mixed=False)
            p_hit = next(((k, t) for k, t, o in pure if o <= target), None)
            extra.append({"dtype": "float64 (mixed=False)", "skdict_iters": p_hit and p_hit[0],
                        "skdict_s": p_hit and p_hit[1],
                        "skdict_s_per_iter": pure[-1][1] / pure[-1][0],
                        "ratio": (p_hit[1] / hit[1]) if p_hit and hit else None})
        # the estimator at its defaults (tol=None: 1e-3 on the scaled residuals)
        coder = ConvSparseCoder(filters.astype(dt), alpha=ALPHA, image_shape=S.shape[1:],
                                device="cpu")
        X = S.reshape(S.shape[0], -1).astype(dt)
        coder.fit(X)
        t = time.perf_counter()
        codes = coder.transform(X)
        el_est = time.perf_counter() - t
        Z = codes.toarray().reshape(S.shape[0], 64, *S.shape[1:])
        rel = objective(S, Z, filters, ALPHA) / f_opt - 1
        out.append({"dtype": dtype, "sporco_iters": sp_k, "sporco_s": sp_t,
                    "sporco_s_per_iter": tr[-1][1] / tr[-1][0],
                    "skdict_iters": sk_k, "skdict_s": sk_t,
                    "skdict_s_per_iter": sk[-1][1] / sk[-1][0],
                    "ratio": (sk_t / sp_t) if sk_t and sp_t else None,
                    "ConvSparseCoder_s": el_est, "its_rel_obj": rel,
                    "default_ratio": (el_est / sp_t) if sp_t else None})
        out.extend(extra)
    print(f"optimum (lowest of both) {f_opt:.8f}; target {target:.8f}")
    print_table(out, ["dtype", "sporco_iters", "sporco_s", "sporco_s_per_iter", "skdict_iters",
                      "skdict_s", "skdict_s_per_iter", "ratio", "ConvSparseCoder_s",
                      "its_rel_obj", "default_ratio"])
    return out


# ---------------------------------------------------------------------- memory
def memory_child(n_images, size, n_iter):
    from skdict import ConvSparseCoder

    filters = np.transpose(sporco_dict(), (2, 0, 1)).astype(np.float32)
    base = crops(size, 2, seed=1).astype(np.float32)
    X = np.concatenate([base] * (-(-n_images // base.shape[0])))[:n_images]
    X = X.reshape(n_images, -1)
    coder = ConvSparseCoder(filters, alpha=ALPHA, image_shape=(size, size), device="cpu",
                            transform_max_iter=n_iter).fit(X[:1])
    t = time.perf_counter()
    codes = coder.transform(X)
    el = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"images": n_images, "seconds": el, "peak_rss": peak, "nnz": codes.nnz,
                      "csr_bytes": codes.data.nbytes + codes.indices.nbytes
                      + codes.indptr.nbytes,
                      "batch_images": coder._batch_size_for(coder._n_codes(), np.float32),
                      "input_bytes": X.nbytes}))


def run_memory(args):
    print(f"\n## Memory: ConvSparseCoder.transform of {args.mem_images} images "
          f"{args.mem_size}x{args.mem_size}, 64 filters, float32, {args.mem_iter} iterations")
    out = subprocess.run([sys.executable, "-m", "benchmarks.conv", "--memory-child",
                          str(args.mem_images), str(args.mem_size), str(args.mem_iter)],
                         capture_output=True, text=True, check=False,
                         env={**os.environ})
    if out.returncode != 0:
        print("memory run failed:", out.stderr[-2000:])
        return None
    r = json.loads(out.stdout.strip().splitlines()[-1])
    r["peak_rss_GB"] = r.pop("peak_rss") / 2**30
    r["csr_MB"] = r.pop("csr_bytes") / 2**20
    r["under_4GB"] = r["peak_rss_GB"] < 4.0
    print_table([r], ["images", "batch_images", "seconds", "nnz", "csr_MB", "peak_rss_GB",
                      "under_4GB"])
    return r


# ---------------------------------------------------------------------- learning
def sporco_dl(D0, S, alpha, n_iter, snapshots):
    from sporco.dictlrn import cbpdndl

    Ss = np.ascontiguousarray(np.transpose(S, (1, 2, 0)))
    opt = cbpdndl.ConvBPDNDictLearn.Options(
        {"Verbose": False, "MaxMainIter": n_iter, "AccurateDFid": False,
         "CBPDN": {"rho": 50.0 * alpha + 0.5}, "CCMOD": {"rho": 10.0, "ZeroMean": True}},
        dmethod="cns")
    got = []
    excluded = [0.0]
    t0 = [None]

    def cb(d):
        k = d.j + 1
        if k in snapshots:
            t = time.perf_counter()
            got.append((k, t - t0[0] - excluded[0], np.asarray(d.getdict()).squeeze().copy()))
            excluded[0] += time.perf_counter() - t
        return False

    opt["Callback"] = cb
    d = cbpdndl.ConvBPDNDictLearn(D0, Ss, alpha, opt, dmethod="cns")
    t0[0] = time.perf_counter()
    d.solve()
    return got


def held_out(filters, S_test, alpha):
    from skdict import ConvSparseCoder

    nrm = np.linalg.norm(filters.reshape(filters.shape[0], -1), axis=1)
    filters = filters / np.maximum(nrm, 1e-12)[:, None, None]
    X = S_test.reshape(S_test.shape[0], -1)
    coder = ConvSparseCoder(filters, alpha=alpha, image_shape=S_test.shape[1:], tol=1e-5,
                            transform_max_iter=2000, device="cpu").fit(X)
    return coder._objective(X)


def run_dl(args):
    from skdict import ConvDictionaryLearning

    S = crops(args.dl_size, args.dl_train // 2, seed=3)
    S_test = crops(args.dl_size, 1, seed=4)
    rng = np.random.default_rng(0)
    D0 = rng.standard_normal((8, 8, 32))
    D0 /= np.linalg.norm(D0.reshape(-1, 32), axis=0)
    print(f"\n## Dictionary learning: 32 8x8 filters, {S.shape[0]} training crops "
          f"{args.dl_size}x{args.dl_size}, alpha={DL_ALPHA}, held-out: {S_test.shape[0]} crops")
    snaps = sorted({max(1, args.dl_sporco_iter * f // 8) for f in range(1, 9)})
    got = sporco_dl(D0, S, DL_ALPHA, args.dl_sporco_iter, set(snaps))
    rows = []
    for k, t, Dk in got:
        rows.append({"learner": "sporco ConvBPDNDictLearn", "iters": k, "train_s": t,
                     "held_out": held_out(np.transpose(Dk, (2, 0, 1)), S_test, DL_ALPHA)})
    target, sp_time = rows[-1]["held_out"], rows[-1]["train_s"]
    est = ConvDictionaryLearning(32, (8, 8), alpha=DL_ALPHA, image_shape=S.shape[1:],
                                 dict_init=np.transpose(D0, (2, 0, 1)), random_state=0,
                                 device="cpu")
    X = S.reshape(S.shape[0], -1)
    t_train = 0.0
    hit = None
    for epoch in range(1, args.dl_epochs + 1):
        t = time.perf_counter()
        est.partial_fit(X)
        t_train += time.perf_counter() - t
        h = held_out(est.components_, S_test, DL_ALPHA)
        rows.append({"learner": "skdict ConvDictionaryLearning", "iters": epoch,
                     "train_s": t_train, "held_out": h})
        if hit is None and h <= target:
            hit = t_train
            if not args.dl_full:
                break
    print_table(rows, ["learner", "iters", "train_s", "held_out"])
    ratio = hit / sp_time if hit is not None else None
    print(f"sporco final held-out {target:.6f} after {sp_time:.2f} s; skdict reaches it after "
          f"{hit if hit is None else round(hit, 2)} s: ratio {ratio}")
    return {"target": target, "sporco_s": sp_time, "skdict_s": hit, "ratio": ratio}


# ---------------------------------------------------------------------- GPU
def run_gpu(args):
    import torch

    if not torch.cuda.is_available():
        print("\n## GPU: CUDA is not available; skipped")
        return None
    try:
        filters = np.transpose(sporco_dict(), (2, 0, 1))
    except ImportError:  # a GPU machine without sporco: same shape, random unit filters
        print("sporco is not installed: 64 random unit-norm 8x8 filters stand in")
        filters = np.random.default_rng(0).standard_normal((64, 8, 8))
        filters /= np.linalg.norm(filters.reshape(64, -1), axis=1)[:, None, None]
    S = crops(512, 2, seed=1)
    n = args.gpu_images
    S = np.concatenate([S] * (-(-n // S.shape[0])))[:n]
    rows = []
    for dtype in args.dtypes:
        dt = np.float32 if dtype == "float32" else np.float64
        skdict_admm(filters, S[:2], ALPHA, 5, dt, device="cuda")  # warm-up
        for bs in (4, 16):
            t = 0.0
            for s in range(0, n, bs):
                el, _ = skdict_admm(filters, S[s:s + bs], ALPHA, args.gpu_iter, dt,
                                    device="cuda")
                t += el
            rows.append({"dtype": dtype, "batch": bs, "iters": args.gpu_iter, "seconds": t,
                         "images_per_s": n / t})
    print(f"\n## GPU ({torch.cuda.get_device_name()}): ADMM, {n} images 512x512, 64 filters")
    print_table(rows, ["dtype", "batch", "iters", "seconds", "images_per_s"])
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sections", nargs="+", default=["coding", "memory", "dl", "gpu"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--dtypes", nargs="+", default=["float64", "float32"])
    p.add_argument("--ref-iter", type=int, default=600)
    p.add_argument("--sporco-iter", type=int, default=250)
    p.add_argument("--skdict-iter", type=int, default=300)
    p.add_argument("--mem-images", type=int, default=64)
    p.add_argument("--mem-size", type=int, default=512)
    p.add_argument("--mem-iter", type=int, default=3)
    p.add_argument("--dl-train", type=int, default=8)
    p.add_argument("--dl-size", type=int, default=128)
    p.add_argument("--dl-sporco-iter", type=int, default=100)
    p.add_argument("--dl-epochs", type=int, default=40)
    p.add_argument("--dl-full", action="store_true", help="run every skdict epoch")
    p.add_argument("--gpu-images", type=int, default=64)
    p.add_argument("--gpu-iter", type=int, default=100)
    p.add_argument("--memory-child", nargs=3, type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.memory_child:
        memory_child(*args.memory_child)
        return
    if args.quick:
        args.size, args.ref_iter, args.sporco_iter = 128, 400, 200
        args.mem_images, args.dl_sporco_iter, args.dl_epochs = 8, 40, 20
        args.gpu_images, args.gpu_iter = 16, 50
    print(machine_info())
    if args.device.startswith("cuda"):
        run_gpu(args)
        return
    for s in args.sections:
        {"coding": run_coding, "memory": run_memory, "dl": run_dl, "gpu": run_gpu}[s](args)


if __name__ == "__main__":
    main()
