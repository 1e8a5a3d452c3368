"""Fit benchmark (issue 3, workload 2): online dictionary learning on natural patches.

Run::

    python -m benchmarks.fit                        # SPAMS 100/300/1000/3000 iterations
    python -m benchmarks.fit --spams-iters 100 300 --skdict-epochs 2   # quick look

8x8 mean-removed unit-norm patches, 256 atoms, ``alpha=0.2``, minibatches of 256.
Every learner starts from the same dictionary (random training patches). The
score is the held-out objective: the mean of ``0.5 ||x - a D||^2 + alpha ||a||_1``
over held-out rows with *exact* lasso codes (skdict's certified solver, float64).

* SPAMS ``trainDL`` (2 threads, batch 256), one run per iteration count;
* skdict ``LCASparseCoder(fit_algorithm="exact", dict_update="online")``,
  trained with ``partial_fit`` in slices; the wall time of the training only is
  accumulated and the held-out objective is evaluated after every slice;
* scikit-learn ``MiniBatchDictionaryLearning`` (batch 256, lasso_lars fit), the
  same way with ``partial_fit``.

The target: skdict reaches SPAMS' 3000-iteration held-out objective in at most
0.5x SPAMS' time. The script prints the first skdict time at which its
held-out objective is at or below that value and the ratio.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from ._common import import_spams, machine_info, natural_patches, print_table

ALPHA = 0.2
K = 256
BATCH = 256


def held_out_objective(D, X):
    from skdict import SparseCoder

    from ._common import lasso_objective

    D = D / np.linalg.norm(D, axis=1, keepdims=True)
    codes = SparseCoder(D, alpha=ALPHA, device="cpu").transform(X)
    return float(lasso_objective(X, codes, D, ALPHA).mean())


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n-train", type=int, default=50000)
    p.add_argument("--n-test", type=int, default=5000)
    p.add_argument("--spams-iters", type=int, nargs="+", default=[100, 300, 1000, 3000])
    p.add_argument("--skdict-steps", type=int, default=3000,
                   help="minibatches of skdict (and sklearn) training")
    p.add_argument("--forget-window", type=int, default=10000,
                   help="LCASparseCoder forget_window (rows the statistics remember; 0: None)")
    p.add_argument("--eval-every", type=int, default=250, help="minibatches between evaluations")
    p.add_argument("--sklearn-steps", type=int, default=1000)
    args = p.parse_args(argv)
    print(f"# Fit benchmark  ({machine_info()})")
    X = natural_patches(args.n_train + args.n_test + 500, 8, seed=0)
    Xtr, Xte = X[: args.n_train], X[args.n_train : args.n_train + args.n_test]
    rng = np.random.default_rng(0)
    D0 = Xtr[rng.choice(Xtr.shape[0], K, replace=False)].copy()
    D0 /= np.linalg.norm(D0, axis=1, keepdims=True)
    print(f"{Xtr.shape[0]} training rows, {Xte.shape[0]} held-out rows, {K} atoms, "
          f"alpha={ALPHA}, batch {BATCH}; initial held-out objective "
          f"{held_out_objective(D0, Xte):.6f}")
    rows = []
    spams, why = import_spams()
    spams_final = None
    if spams is None:
        print(why)
    else:
        for it in args.spams_iters:
            t = time.perf_counter()
            D = spams.trainDL(np.asfortranarray(Xtr.T), D=np.asfortranarray(D0.T), K=K,
                              lambda1=ALPHA, iter=it, batchsize=BATCH, numThreads=2,
                              mode=2, verbose=False)
            el = time.perf_counter() - t
            obj = held_out_objective(np.asarray(D.T), Xte)
            rows.append({"learner": "SPAMS trainDL (2 thr)", "minibatches": it,
                         "train time (s)": el, "held-out objective": obj})
            spams_final = (it, el, obj)

    from skdict import LCASparseCoder

    est = LCASparseCoder(n_components=K, alpha=ALPHA, fit_algorithm="exact",
                         dict_update="online", dict_init=D0, batch_size=BATCH,
                         forget_window=args.forget_window or None, dead_window=0,
                         shuffle=False, random_state=0, device="cpu")
    print(f"skdict: LCASparseCoder(fit_algorithm='exact', dict_update='online', "
          f"forget_window={args.forget_window})")
    # the rows come in this (random) order, as SPAMS and scikit-learn get theirs:
    # partial_fit reads them as given (shuffle=False)
    order = rng.permutation(Xtr.shape[0])
    sk_rows = []
    elapsed, step = 0.0, 0
    while step < args.skdict_steps:
        n_b = min(args.eval_every, args.skdict_steps - step)
        idx = np.concatenate([order, order])[(step * BATCH) % Xtr.shape[0]:][: n_b * BATCH]
        if idx.shape[0] < n_b * BATCH:
            idx = np.resize(order, n_b * BATCH)
        t = time.perf_counter()
        est.partial_fit(Xtr[idx])
        elapsed += time.perf_counter() - t
        step += n_b
        obj = held_out_objective(est.components_, Xte)
        r = {"learner": "skdict LCASparseCoder exact/online", "minibatches": step,
             "train time (s)": elapsed, "held-out objective": obj}
        rows.append(r)
        sk_rows.append(r)

    from sklearn.decomposition import MiniBatchDictionaryLearning

    mb = MiniBatchDictionaryLearning(n_components=K, alpha=ALPHA, batch_size=BATCH,
                                     dict_init=D0, random_state=0, fit_algorithm="lars")
    elapsed, step = 0.0, 0
    while step < args.sklearn_steps:
        n_b = min(args.eval_every, args.sklearn_steps - step)
        t = time.perf_counter()
        for _ in range(n_b):
            b = rng.choice(Xtr.shape[0], BATCH, replace=False)
            mb.partial_fit(Xtr[b])
        elapsed += time.perf_counter() - t
        step += n_b
        rows.append({"learner": "sklearn MiniBatchDictionaryLearning", "minibatches": step,
                     "train time (s)": elapsed,
                     "held-out objective": held_out_objective(mb.components_, Xte)})
    print_table(rows, ["learner", "minibatches", "train time (s)", "held-out objective"],
                "Fit: held-out objective (exact codes) vs training wall time")
    if spams_final is not None:
        it, t_sp, obj_sp = spams_final
        hit = next((r for r in sk_rows if r["held-out objective"] <= obj_sp), None)
        print(f"\nSPAMS after {it} iterations: objective {obj_sp:.6f} in {t_sp:.2f} s")
        if hit is None:
            best = min(sk_rows, key=lambda r: r["held-out objective"])
            print(f"skdict did not reach it within {args.skdict_steps} minibatches "
                  f"(best {best['held-out objective']:.6f} after {best['train time (s)']:.2f} s)"
                  " -- target MISSED")
        else:
            ratio = hit["train time (s)"] / t_sp
            print(f"skdict reached it after {hit['minibatches']} minibatches in "
                  f"{hit['train time (s)']:.2f} s: {ratio:.2f} x SPAMS' time "
                  f"(target <= 0.5: {'met' if ratio <= 0.5 else 'MISSED'})")


if __name__ == "__main__":
    main()
