"""LISTA benchmark: learned encoders against ISTA / FISTA at the same depth, and
their encode throughput against the exact solver.

Run::

    python -m benchmarks.lista                 # full CPU run
    python -m benchmarks.lista --quick         # small sizes, a few minutes
    python -m benchmarks.lista --device cuda   # the same on a GPU

Sections (every contender runs in this process on the same held-out rows):

1. Compressed sensing (the setting of Chen et al. 2018 and Liu et al. 2019): 500
   unit-norm Gaussian atoms in 250 dimensions, codes Bernoulli(0.1) x N(0, 1),
   noiseless and at 40 dB SNR. Every variant of :class:`skdict.LISTAEncoder` is
   trained on the planted codes (``fit(X, A)``, ``loss="codes"``); the table
   gives the NMSE in dB of each layer's codes to the planted codes, and of
   ISTA / FISTA (skdict's solvers,
   from zero, best ``alpha`` of a grid at each count) after the same number of
   iterations.
2. Natural 8x8 patches (unit norm, mean removed) with a 256-atom dictionary
   learned by :class:`skdict.LCASparseCoder` (exact codes): the encoders are
   trained with their default loss (the lasso objective, ``fit(X)``) for 10
   epochs (``--patch-epochs``) at ``lr=0.015`` (``--patch-lr``) in batches of
   128 (``--patch-batch-size``) on the dictionary's 20000 rows and 200000 more distinct patches
   (``--patch-encoder-train``; ``--patch-encoder-rows all``, the default: an
   encoder for a dictionary is naturally trained on the data the dictionary
   was learned from; ``train`` uses the training rows alone). The held-out rows
   come from 16x16 tiles (``--patch-tile``, drawn with ``--split-seed``) of the
   images that no training patch touches. The
   table gives the relative lasso-objective gap to the exact optimum per
   layer, and ISTA / FISTA's.
3. For both: the FISTA iterations needed to match 16 LISTA layers (the first
   count at which FISTA is as good, bisected between powers of two; target >= 64),
   and the encode throughput of the
   trained encoder's ``transform`` against ``SparseCoder(algorithm="exact")``
   (rows per second; the exact solver on a subset when the run is large).
4. ``--sections default``: the wall time of ``LISTAEncoder(D, alpha=0.05).fit(X)``
   with every other parameter at its default, 20000 x 250 rows, 500 atoms.

The training time of every encoder is printed with its CPU time.
"""

from __future__ import annotations

import argparse
import resource
import time

import numpy as np
import torch

from ._common import machine_info, natural_patch_split, natural_patches, print_table

COUNTS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
VARIANTS = ("lista", "lista_cp", "alista", "lfista")


def _cpu_seconds():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _db(x):
    return 10 * np.log10(max(float(x), 1e-30))


def compressed_sensing(n, snr_db, seed=0, dtype=np.float32, D=None):
    rng = np.random.default_rng(seed)
    if D is None:
        D = rng.standard_normal((500, 250))
        D /= np.linalg.norm(D, axis=1, keepdims=True)
    A = (rng.random((n, 500)) < 0.1) * rng.standard_normal((n, 500))
    X = A @ D
    if snr_db is not None:
        sigma = np.sqrt(np.mean(X**2) / 10 ** (snr_db / 10))
        X = X + sigma * rng.standard_normal(X.shape)
    return D.astype(dtype), X.astype(dtype), A.astype(dtype)


def solver_curve(X, D, alpha, solver, device, counts=COUNTS):
    """Codes of ``solver`` ("ista" / "fista") after each iteration count."""
    from skdict.operators import DenseOperator
    from skdict.solvers import fista, ista

    fn = {"ista": ista, "fista": fista}[solver]
    Xt = torch.as_tensor(X, dtype=torch.float64, device=device)
    op = DenseOperator(torch.as_tensor(D, dtype=torch.float64, device=device))
    L = float(torch.linalg.eigvalsh(op.gram())[-1])
    C = op.adjoint(Xt)
    if solver == "fista":  # momentum: every count is its own run from zero
        return {k: fn(C, op, alpha, xnorm2=None, L=L, max_iter=k).codes for k in counts}
    out, a, done = {}, None, 0  # ISTA is memoryless: continue from the previous count
    for k in sorted(counts):
        a = fn(C, op, alpha, xnorm2=None, L=L, a0=a, max_iter=k - done).codes
        out[k], done = a, k
    return out


def nmse(codes, target):
    t = torch.as_tensor(target, dtype=torch.float64, device=codes.device)
    return float(((codes.double() - t) ** 2).sum() / (t**2).sum())


def gap(codes, X, D, fstar, alpha):
    Xt = torch.as_tensor(X, dtype=torch.float64, device=codes.device)
    Dt = torch.as_tensor(D, dtype=torch.float64, device=codes.device)
    a = codes.double()
    r = Xt - a @ Dt
    f = float((0.5 * (r * r).sum(1) + alpha * a.abs().sum(1)).sum())
    return (f - fstar) / fstar


def train(D, X, y, alpha, variant, device, args, epochs=None, seed=0, lr=None, batch_size=None):
    from skdict import LISTAEncoder

    epochs = args.epochs if epochs is None else epochs
    kw = {} if epochs is None else {"max_iter": epochs}
    if y is not None:
        kw["loss"] = "codes"
    enc = LISTAEncoder(D, n_layers=16, alpha=alpha, variant=variant, device=device, **kw,
                       random_state=seed, batch_size=batch_size or args.batch_size, lr=lr)
    t, c = time.perf_counter(), _cpu_seconds()
    enc.fit(X, y)
    return enc, time.perf_counter() - t, _cpu_seconds() - c


def layer_codes(enc, X, device):
    net = enc.to_module(device=device)
    with torch.no_grad():
        return net(torch.as_tensor(X, device=device, dtype=net.D.dtype), all_layers=True)


def match(curve, value, at=None):
    """First iteration count at which the solver's error is at most ``value``:
    the first power of two of ``curve``, then, with ``at`` (the error after
    ``k`` iterations), bisected between it and the power before (the errors
    decrease with the count, up to FISTA's small ripples)."""
    prev = 0
    for k in sorted(curve):
        if curve[k] <= value:
            if at is None:
                return str(k)
            lo, hi = prev, k  # at(lo) > value >= at(hi)
            while hi - lo > 1:
                mid = (lo + hi) // 2
                lo, hi = (lo, mid) if at(mid) <= value else (mid, hi)
            return str(hi)
        prev = k
    return f">{max(curve)}"


def throughput(enc, D, alpha, X, device, exact_rows):
    from skdict import SparseCoder

    enc.transform(X[:1000])  # warm-up
    t = time.perf_counter()
    enc.transform(X)
    t_lista = time.perf_counter() - t
    coder = SparseCoder(D, algorithm="exact", alpha=alpha, device=device)
    sub = X[:exact_rows]
    coder.transform(sub[:200])
    t = time.perf_counter()
    coder.transform(sub)
    t_exact = time.perf_counter() - t
    return len(X) / t_lista, len(sub) / t_exact


def section_cs(args, device):
    rows, summary = [], []
    Dref = None
    for snr in (None, 40.0):
        D, X, A = compressed_sensing(args.n_train + args.n_test, snr, seed=1, D=Dref)
        Dref = D.astype(np.float64)
        Xtr, Atr, Xte, Ate = X[:args.n_train], A[:args.n_train], X[args.n_train:], A[args.n_train:]
        label = "noiseless" if snr is None else f"{snr:g} dB"
        curves = {}
        for solver in ("ista", "fista"):
            best = {}
            for alpha in args.cs_alphas:
                for k, c in solver_curve(Xte, D, alpha, solver, device).items():
                    best[k] = min(best.get(k, np.inf), nmse(c, Ate))
            curves[solver] = best

        def at(k, solver, Xte=Xte, D=D, Ate=Ate):
            return min(nmse(solver_curve(Xte, D, a, solver, device, counts=(k,))[k], Ate)
                       for a in args.cs_alphas)

        encs = {}
        for v in args.variants:
            enc, wall, cpu = train(D, Xtr, Atr, args.cs_alpha, v, device, args)
            encs[v] = enc
            layers = layer_codes(enc, Xte, device)
            nm = [nmse(a, Ate) for a in layers]
            summary.append({"setting": f"CS {label}", "variant": v,
                            "NMSE@16 dB": _db(nm[-1]), "FISTA iters to match":
                            match(curves["fista"], nm[-1], lambda k: at(k, "fista")),
                            "ISTA iters to match":
                            match(curves["ista"], nm[-1], lambda k: at(k, "ista")),
                            "train s": wall, "train cpu s": cpu})
            for k in (1, 2, 4, 8, 16):
                rows.append({"setting": label, "layer": k, "variant": v, "dB": _db(nm[k - 1])})
        table = []
        for k in (1, 2, 4, 8, 16):
            r = {"layer / iter": k}
            for v in args.variants:
                r[v] = next(x["dB"] for x in rows if x["setting"] == label and x["layer"] == k
                            and x["variant"] == v)
            r["ISTA"] = _db(curves["ista"][k])
            r["FISTA"] = _db(curves["fista"][k])
            table.append(r)
        for k in (32, 64, 128, 256, 512, 1024):
            table.append({"layer / iter": k, "ISTA": _db(curves["ista"][k]),
                          "FISTA": _db(curves["fista"][k])})
        print_table(table, ["layer / iter", *args.variants, "ISTA", "FISTA"],
                    f"Compressed sensing, {label}: NMSE (dB) to the planted codes, "
                    f"{len(Xte)} held-out rows")
        if snr is None:
            best_v = min(args.variants, key=lambda v: layer_codes_nmse(encs[v], Xte, Ate, device))
            rps, rps_exact = throughput(encs[best_v], D, args.cs_alpha,
                                        np.tile(Xte, (args.throughput_rows // len(Xte) + 1, 1))
                                        [:args.throughput_rows], device, args.exact_rows)
            summary.append({"setting": f"CS throughput ({best_v})", "variant": "rows/s",
                            "NMSE@16 dB": rps, "FISTA iters to match":
                            f"exact: {rps_exact:.4g} rows/s", "ISTA iters to match":
                            f"x{rps / rps_exact:.1f}"})
    return summary


def layer_codes_nmse(enc, X, A, device):
    return nmse(layer_codes(enc, X, device)[-1], A)


def section_patches(args, device):
    from skdict import LCASparseCoder, SparseCoder

    alpha = args.patch_alpha
    Xd, Xtr, Xte = natural_patch_split([args.n_dict, args.patch_encoder_train], args.n_test,
                                       tile=args.patch_tile, seed=args.split_seed,
                                       dtype=np.float32)
    t = time.perf_counter()
    lca = LCASparseCoder(n_components=256, alpha=alpha, fit_algorithm="exact",
                         transform_algorithm="exact", max_iter=args.dict_epochs,
                         random_state=0, device=device).fit(Xd)
    print(f"\ndictionary: 256 atoms learned by LCASparseCoder(fit_algorithm='exact') on "
          f"{len(Xd)} patches in {time.perf_counter() - t:.1f} s")
    D = lca.components_.astype(np.float64)
    exact = SparseCoder(D, alpha=alpha, device=device).transform(Xte.astype(np.float64))
    Dt = torch.as_tensor(D)
    Xt = torch.as_tensor(Xte, dtype=torch.float64)
    E = torch.as_tensor(exact.toarray())
    r = Xt - E @ Dt
    fstar = float((0.5 * (r * r).sum(1) + alpha * E.abs().sum(1)).sum())
    curves = {s: {k: gap(c, Xte, D, fstar, alpha)
                  for k, c in solver_curve(Xte, D, alpha, s, device).items()}
              for s in ("ista", "fista")}

    def at(k, solver):
        return gap(solver_curve(Xte, D, alpha, solver, device, counts=(k,))[k], Xte, D, fstar,
                   alpha)

    summary, gaps, encs = [], {}, {}
    Xenc = np.concatenate([Xd, Xtr]) if args.patch_encoder_rows == "all" else Xtr
    print(f"encoders trained on {len(Xenc)} distinct patches ({args.patch_encoder_rows}; "
          f"{args.patch_epochs or args.epochs or 'default'} epochs, "
          f"lr {args.patch_lr or 'default'}, batch {args.patch_batch_size or args.batch_size}), "
          f"{len(Xte)} held out "
          f"(from {args.patch_tile}-px tiles no training patch touches, split seed "
          f"{args.split_seed})")
    for v in args.variants:
        enc, wall, cpu = train(lca.components_, Xenc, None, alpha, v, device, args,
                               epochs=args.patch_epochs or None, seed=args.encoder_seed,
                               lr=args.patch_lr or None,
                               batch_size=args.patch_batch_size or None)
        encs[v] = enc
        gaps[v] = [gap(a, Xte, D, fstar, alpha) for a in layer_codes(enc, Xte, device)]
        summary.append({"setting": "patches", "variant": v, "NMSE@16 dB": None,
                        "gap@16": gaps[v][-1],
                        # (its validation rows: drawn from the training rows)
                        "val gap@16": float(enc.layer_gap_[-1]),
                        "FISTA iters to match": match(curves["fista"], gaps[v][-1],
                                                      lambda k: at(k, "fista")),
                        "ISTA iters to match": match(curves["ista"], gaps[v][-1],
                                                     lambda k: at(k, "ista")),
                        "train s": wall, "train cpu s": cpu})
    table = []
    for k in (1, 2, 4, 8, 16):
        row = {"layer / iter": k, **{v: gaps[v][k - 1] for v in args.variants}}
        row.update({"ISTA": curves["ista"][k], "FISTA": curves["fista"][k]})
        table.append(row)
    for k in (32, 64, 128, 256, 512, 1024):
        table.append({"layer / iter": k, "ISTA": curves["ista"][k],
                      "FISTA": curves["fista"][k]})
    print_table(table, ["layer / iter", *args.variants, "ISTA", "FISTA"],
                f"Natural 8x8 patches, alpha={alpha}: relative objective gap to the exact "
                f"optimum, {len(Xte)} held-out rows")
    if not args.throughput_rows:
        return summary
    best_v = min(args.variants, key=lambda v: gaps[v][-1])
    big = natural_patches(args.throughput_rows, seed=7, dtype=np.float32)
    rps, rps_exact = throughput(encs[best_v], lca.components_, alpha, big, device,
                                args.exact_rows)
    summary.append({"setting": f"patches throughput ({best_v})", "variant": "rows/s",
                    "NMSE@16 dB": rps, "FISTA iters to match": f"exact: {rps_exact:.4g} rows/s",
                    "ISTA iters to match": f"x{rps / rps_exact:.1f}"})
    return summary


def section_default(args, device):
    """``LISTAEncoder(D, alpha=0.05).fit(X)`` at every other default, on the
    compressed-sensing problem at full size (20000 rows, 250 features, 500 atoms;
    the issue's budget: 3 minutes on 2 CPU cores)."""
    from skdict import LISTAEncoder

    D, X, _ = compressed_sensing(20000, None, seed=0)
    t, c = time.perf_counter(), _cpu_seconds()
    enc = LISTAEncoder(D, alpha=0.05, device=device, random_state=0).fit(X)
    wall, cpu = time.perf_counter() - t, _cpu_seconds() - c
    print(f"\ndefault fit, 20000 x 250, 500 atoms: {wall:.1f} s wall, {cpu:.1f} s CPU; "
          f"variant_ {enc.variant_!r}, support {enc.support_selection_:g}, {enc.n_iter_} "
          f"epochs, {enc.n_steps_} steps; validation gap at 16 layers "
          f"{enc.layer_gap_[-1]:.4g}")
    return [{"setting": "default fit 20k x 250 x 500", "variant": enc.variant_,
             "gap@16": enc.layer_gap_[-1], "train s": wall, "train cpu s": cpu}]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--quick", action="store_true", help="small sizes (a few minutes on CPU)")
    p.add_argument("--n-train", type=int, default=20000)
    p.add_argument("--n-test", type=int, default=1000)
    p.add_argument("--n-dict", type=int, default=20000)
    p.add_argument("--dict-epochs", type=int, default=3)
    p.add_argument("--epochs", type=int, default=None,
                   help="max_iter of every encoder (default: LISTAEncoder's)")
    p.add_argument("--batch-size", type=int, default=256, help="of every encoder")
    p.add_argument("--cs-alpha", type=float, default=0.05)
    p.add_argument("--cs-alphas", type=float, nargs="+", default=[0.01, 0.05, 0.2],
                   help="ISTA / FISTA: the best of these at each count")
    p.add_argument("--patch-alpha", type=float, default=0.1)
    p.add_argument("--throughput-rows", type=int, default=1_000_000)
    p.add_argument("--exact-rows", type=int, default=50_000,
                   help="rows the exact solver encodes for its rows/s")
    p.add_argument("--sections", nargs="+", default=["cs", "patches", "default"])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--patch-encoder-rows", choices=["all", "train"], default="all",
                   help="patches: train the encoders on the dictionary's rows and the "
                        "training rows (all), or on the training rows alone")
    p.add_argument("--patch-encoder-train", type=int, default=200_000,
                   help="patches: distinct training patches drawn beside the dictionary's")
    p.add_argument("--patch-epochs", type=int, default=10,
                   help="patches: max_iter of every encoder (0: --epochs)")
    p.add_argument("--patch-lr", type=float, default=0.015,
                   help="patches: lr of every encoder (0: LISTAEncoder's default); the "
                        "7700 steps of the default protocol spike less at half lfista's")
    p.add_argument("--patch-batch-size", type=int, default=128,
                   help="patches: batch_size of every encoder (0: --batch-size); twice "
                        "the steps of batch 256 in the same epochs, for a 10%% smaller gap")
    p.add_argument("--patch-tile", type=int, default=16,
                   help="patches: side in pixels of the tiles the held-out rows come from")
    p.add_argument("--split-seed", type=int, default=0,
                   help="patches: seed of the draw of held-out tiles and of the patches")
    p.add_argument("--encoder-seed", type=int, default=0,
                   help="random_state of every encoder (validation split, batch order)")
    args = p.parse_args(argv)
    if args.quick:
        args.n_train, args.n_test, args.n_dict = 4000, 300, 5000
        args.epochs, args.dict_epochs = 10, 2
        args.patch_encoder_train, args.patch_epochs, args.patch_lr = args.n_train, None, None
        args.patch_batch_size = None
        args.throughput_rows, args.exact_rows = 50_000, 5_000
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA device: skipping the GPU run")
        return
    print(f"# LISTA benchmark ({machine_info()}, device {args.device})")
    summary = []
    if "cs" in args.sections:
        summary += section_cs(args, args.device)
    if "patches" in args.sections:
        summary += section_patches(args, args.device)
    if "default" in args.sections and not args.quick:
        summary += section_default(args, args.device)
    print_table(summary, ["setting", "variant", "NMSE@16 dB", "gap@16", "val gap@16",
                          "FISTA iters to match",
                          "ISTA iters to match", "train s", "train cpu s"],
                "Summary: 16 layers vs FISTA / ISTA (target: FISTA needs >= 64 iterations); "
                "throughput rows: rows/s of transform, exact rows/s, ratio")


if __name__ == "__main__":
    main()
