"""Training step of :class:`~skdict.LISTAEncoder`: the unrolled network of
:class:`skdict.nn.LISTA` fitted by Adam to target codes (exact lasso codes from
:class:`skdict.functional.BlockEncoder`, or the codes given as ``y``) or to the
lasso objective of its output."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch

from .._backend import torch_dtype
from ..data.sources import ArraySource
from ..functional import BlockEncoder
from ..nn.lista import LISTA
from .optim import make_optimizer
from .state import TrainState

__all__ = ["LISTALearner", "LISTAState", "exact_codes"]

# rows per exact-solver call when computing targets
_TARGET_BATCH = 4096
# rows the validation metrics use when no rows are held out
_FALLBACK_VAL_ROWS = 1024
# in a long pass, fit checks the validation rows every this many steps too, so
# that an Adam spike is rolled back before it has cost a whole pass
_CHECK_STEPS = 256
# a check also rolls back when the validation loss's excess over its floor (the
# exact codes' objective, or 0 for squared error) grew by more than this
# fraction: late in training the gain over the untrained network is ~100 times
# the excess, and a spike that tripled the gap (8x8 patches, lfista: held-out
# gap 0.00042 -> 0.0013 absolute) stayed within a quarter of it, so training
# went on from it and never got back (gap at 16 layers 0.00112 vs 0.00097)
_SPIKE_EXCESS = 0.5
# lfista's learning-rate units, in FISTA's step 1 / L (momentum: absolute).
# Its momentum makes the unrolled iteration unstable once W_k outgrows the step:
# on 8x8 patches W at the thresholds' rate (lr / L) spiked the held-out gap to
# 1e6 within 6 epochs, at a third of it it trains (0.0027 after 12 epochs)
_LFISTA_LR_UNITS = {"W": 1 / 3, "theta": 1.0}
_LFISTA_BETA_UNIT = 0.1  # and of the per-row step's weight rho (also absolute)


@dataclass
class LISTAState(TrainState):
    """What :class:`LISTAEncoder` trains: the learned tensors of
    :class:`skdict.nn.LISTA` (``params``), the ``torch.optim`` state dict
    (None before the first step), each parameter's learning-rate scale and the
    generator of the batch order."""

    params: dict = None
    optimizer: dict = None
    lr_scale: dict = None
    generator: torch.Generator = None


def exact_codes(X, D, alpha, *, device, batch_size=_TARGET_BATCH):
    """Dense exact lasso codes of the rows of the tensor ``X`` against ``D`` (a
    tensor), on ``device``, by the exact solver of :mod:`skdict.functional`."""
    enc = BlockEncoder(D, "exact", device=device, alpha=float(alpha))
    K = D.shape[0]
    out = X.new_empty((X.shape[0], K))
    for s in range(0, X.shape[0], batch_size):
        codes = enc.codes(X[s : s + batch_size])
        out[s : s + batch_size] = codes.to_dense(K).to(device=X.device, dtype=X.dtype)
    return out


def _check_targets(y, n_samples, n_components, name):
    """Target codes as a dense numpy array or CSR matrix of shape
    ``(n_samples, n_components)``; ValueError otherwise."""
    if isinstance(y, torch.Tensor):
        y = y.detach().cpu()
        y = y.to_dense().numpy() if y.layout != torch.strided else y.numpy()
    if sp.issparse(y):
        y = sp.csr_matrix(y)
        data = y.data
    else:
        y = np.asarray(y)
        data = y
    if y.ndim != 2 or y.shape != (n_samples, n_components):
        raise ValueError(
            f"y must hold target codes of shape (n_samples, n_components) = "
            f"{(n_samples, n_components)}, got shape {tuple(y.shape)}; pass y=None to "
            f"train {name} on the exact lasso codes of X."
        )
    if data.dtype.kind not in "fiub":
        raise ValueError(f"y must be numeric codes, got dtype {data.dtype}.")
    if not np.all(np.isfinite(data)):
        raise ValueError("y contains NaN or infinity.")
    return y


def _rows_tensor(source, device, tdtype):
    """All rows of an array source as one dense tensor on ``device``."""
    X = torch.empty(source.n_samples, source.n_features, dtype=tdtype, device=device)
    for start, stop, Xb in source.ordered(_TARGET_BATCH, device=device, dtype=tdtype):
        X[start:stop] = Xb
    return X


def _rms(t):
    return float(t.detach().double().pow(2).mean().sqrt()) if t.numel() else 0.0


class LISTALearner:
    """One Adam step of :class:`skdict.nn.LISTA` for :class:`Trainer`.

    ``prepare`` reads the rows once, computes the targets, holds out the
    validation rows and returns the training rows (joined with their targets)
    as the source the trainer reads.
    """

    def __init__(self, est, D, alpha, support, device, dtype, variant=None):
        self.est = est
        # the network's variant; "auto" until prepare resolves it
        self.variant = est.variant if variant is None else variant
        self.D = D  # (K, P) tensor on device, in dtype
        self.alpha = float(alpha)
        self.support = support  # float, or "auto" until prepare resolves it
        self.device = device
        self.dtype = dtype
        self.module = None
        self.opt = None
        self.total_steps = None
        self.run_steps = 0
        self.scale = 1.0
        self.val = None
        self.comm = None  # a skdict.distributed.torch.Comm under a process group
        # keep-best on the validation rows (fit only): best validation loss, the
        # parameters that reached it, and the loss of the untrained network
        self.track_best = False
        self.best = None
        self.best_params = None
        self.init_val = None
        self.val_floor = None  # the validation loss of the exact codes (objective loss)
        self.val_curve = []
        self.since_check = 0  # steps since the validation rows were last checked

    def use_comm(self, comm):
        """Train data-parallel: this process's rows are its shard of the data
        (every rank must train for the same dictionary and alpha)."""
        name = type(self.est).__name__
        what = "dictionaries (or alphas)"
        comm.check_same(torch.cat([self.D.detach().double().cpu().reshape(-1),
                                   torch.tensor([self.alpha], dtype=torch.float64)]),
                        what, name)
        self.comm = comm

    def _total(self, *values):
        """float64 sums of ``values`` (over every rank's rows under a process group)."""
        t = torch.tensor([float(v) for v in values], dtype=torch.float64)
        return (t if self.comm is None else self.comm.sum(t)).tolist()

    # ---------------------------------------------------------------- data
    def prepare(self, source, y, generator, single_pass):
        est, D, comm = self.est, self.D, self.comm
        name = type(est).__name__
        if comm is not None:  # this rank's shard: its rows' places in the global order
            from ..distributed.torch import global_rows

            counts = source.counts
            source = source.source
            n, gidx = int(sum(counts)), global_rows(counts, comm.rank)
        else:
            n = source.n_samples
        if comm is None:
            y = self._check_inputs(source, y)
        else:  # a rank's bad y is raised on every rank
            y = comm.run_together(name, self._check_inputs, source, y)
        tdtype = torch_dtype(self.dtype)
        X = _rows_tensor(source, self.device, tdtype)
        n_val = int(math.floor(est.validation_fraction * n)) if n > 1 else 0
        n_val = min(n_val, n - 1)
        # one split of all rows, drawn alike on every rank
        perm = torch.randperm(n, generator=generator)
        if comm is None:
            val_idx = perm[:n_val].sort().values
            train_idx = perm[n_val:].sort().values
            pos = torch.arange(n - n_val)  # places of the training rows in training order
        else:
            held = torch.zeros(n, dtype=torch.bool)
            held[perm[:n_val]] = True
            mine = held[gidx]
            val_idx = torch.nonzero(mine).flatten()
            train_idx = torch.nonzero(~mine).flatten()
            pos = (torch.cumsum(~held, 0) - 1)[gidx[train_idx]]
        val_idx, train_idx = val_idx.to(self.device), train_idx.to(self.device)
        targets = None
        if est.loss == "codes":
            if y is None:  # rows are independent: each rank solves its own
                targets = exact_codes(X, D, self.alpha, device=self.device)
            else:
                targets = torch.as_tensor(
                    y.toarray() if sp.issparse(y) else np.asarray(y, dtype=self.dtype),
                    dtype=tdtype).to(self.device)
        if n_val > 0:
            vx = X[val_idx]
            vt = targets[val_idx] if targets is not None else None
        else:  # the first training rows of the global order
            first = train_idx[(pos < _FALLBACK_VAL_ROWS).to(self.device)]
            vx = X[first]
            vt = targets[first] if targets is not None else None
        exact_given = targets is not None and y is None
        vexact = vt if exact_given else exact_codes(vx, D, self.alpha, device=self.device)
        self.val = (vx, vexact, vt)
        if self.support == "auto" and targets is None:
            # the lasso minimiser is a fixed point of the soft threshold, and
            # support selection passes entries unshrunk: against the objective it
            # costs accuracy (gap at 16 layers, 0.1 selection vs none: CS 500x250
            # ALISTA 0.026 vs 0.0055; 8x8 patches lista_cp 0.037 vs 0.0096)
            self.support = 0.0
        elif self.support == "auto":
            nnz, size = self._total(int((targets != 0).sum()), targets.numel())
            self.support = nnz / size if size else 0.0
        if self.variant == "auto":
            self.variant = self._choose_variant(vx)
        Xt = X[train_idx]
        n_train = n - n_val
        if targets is not None:
            Tt = targets[train_idx]
            self.scale = self._total(Tt.double().pow(2).sum())[0] / n_train
            Xt = torch.cat([Xt, Tt], dim=1)
        else:
            self.scale = self._total(0.5 * Xt.double().pow(2).sum())[0] / n_train
        if not self.scale > 0:
            self.scale = 1.0
        self.track_best = not single_pass
        if single_pass:
            self.total_steps = None
        elif est.n_steps is not None:
            self.total_steps = int(est.n_steps)
        else:
            self.total_steps = int(est.max_iter) * -(-n_train // int(est.batch_size))
        if comm is None:
            return ArraySource(Xt, self.dtype, name=name)
        from ..distributed.torch import OrderedShard

        return OrderedShard(Xt, pos, n_train, dtype=self.dtype)

    def _check_inputs(self, source, y):
        """This process's rows as one array and ``y`` as target codes (or None)."""
        est = self.est
        name = type(est).__name__
        if source.is_stream:
            raise ValueError(
                f"{name} needs X as one array (rows are paired with their target codes); "
                "concatenate the batches, or train skdict.nn.LISTA in your own loop."
            )
        if y is not None and not sp.issparse(y) and not isinstance(y, torch.Tensor):
            y = np.asarray(y)
        if y is not None and y.ndim == 1:
            y = None  # labels passed through a Pipeline: not codes
        if y is not None:
            if est.loss != "codes":
                raise ValueError(
                    f"y gives target codes, which only loss='codes' uses; got "
                    f"loss={est.loss!r}. Pass y=None, or set loss='codes'."
                )
            y = _check_targets(y, source.n_samples, self.D.shape[0], name)
        return y

    def _choose_variant(self, vx):
        """ALISTA when its analytic weight, untrained, already codes the
        validation rows at least as well as ISTA (the untrained lista_cp) at the
        same depth; lfista otherwise. ALISTA learns only two scalars a layer,
        so it can only be as good as its fixed weight allows: on incoherent
        (compressed-sensing) dictionaries that weight beats ISTA, on dictionaries
        learned from natural data it is worse than ISTA and its objective grows
        with depth (8x8 patches, 256 atoms: 0.357 vs ISTA's 0.242 at 16 layers)."""
        est, tdtype = self.est, torch_dtype(self.dtype)
        losses = {}
        for v in ("alista", "lista_cp"):
            net = LISTA(self.D, est.n_layers, alpha=self.alpha, variant=v,
                        support_selection=self.support, dtype=tdtype, device=self.device)
            with torch.no_grad():
                losses[v] = net.objective(vx, net(vx)).double().sum()
        a, c = self._total(losses["alista"], losses["lista_cp"])
        # where ALISTA's weight does not suit the dictionary, learned FISTA is
        # the best trained network (8x8 patches, 18000 rows: held-out gap at 16
        # layers lfista 0.0021, lista_cp 0.0063, lista 0.0075); on compressed
        # sensing ALISTA stays far ahead (--quick: -36 dB vs lfista's -22 dB)
        return "alista" if a <= c else "lfista"

    # ---------------------------------------------------------------- state
    def new_module(self):
        est = self.est
        return LISTA(self.D, est.n_layers, alpha=self.alpha, variant=self.variant,
                     support_selection=self.support, dtype=torch_dtype(self.dtype),
                     device=self.device)

    def init_state(self, source, generator):
        module = self.new_module()
        params = {k: p.detach().clone() for k, p in module.named_parameters()}
        # fallback scale of a parameter that starts at zero: thresholds and steps
        # are on the scale of 1 / L
        unit = 1.0 / module.lipschitz
        if self.variant == "lfista":
            lr_scale = {k: _LFISTA_LR_UNITS[k] * unit for k in ("W", "theta")}
            lr_scale["beta"] = lr_scale["rho"] = _LFISTA_BETA_UNIT
        else:
            lr_scale = {k: (_rms(p) or unit) for k, p in params.items()}
        return LISTAState(params=params, lr_scale=lr_scale, generator=generator)

    def _module(self, state):
        if self.module is None:
            module = self.new_module()
            with torch.no_grad():
                for k, p in module.named_parameters():
                    p.copy_(state.params[k])
            self.module = module
            state.params = dict(module.named_parameters())
        return self.module

    def _optimizer(self, state):
        if self.opt is None:
            lr = self.est._lr(self.variant)
            groups = [{"params": [p], "lr": lr * state.lr_scale[k], "base_lr":
                       lr * state.lr_scale[k]} for k, p in sorted(state.params.items())]
            self.opt = make_optimizer("adam", groups, lr)
            if state.optimizer is not None:
                self.opt.load_state_dict(state.optimizer)
                for g in self.opt.param_groups:
                    g["lr"] = g["base_lr"]
        return self.opt

    def finish(self, state):
        """Detach the parameters and keep the optimizer's state after a run; a
        ``fit`` ends on the parameters with the best validation loss."""
        if self.best_params is not None and self.module is not None:
            if self.val_loss(self.module) > self.best:
                self._load(self.best_params)
        if self.opt is not None:
            state.optimizer = self.opt.state_dict()
        state.params = {k: p.detach() for k, p in state.params.items()}

    # ---------------------------------------------------------------- step
    def step(self, state, Xb):
        module = self._module(state)
        opt = self._optimizer(state)
        if self.total_steps:
            # cosine decay to zero over the steps of this fit
            f = 0.5 * (1.0 + math.cos(math.pi * min(self.run_steps, self.total_steps)
                                      / self.total_steps))
            for g in opt.param_groups:
                g["lr"] = g["base_lr"] * f
        self.run_steps += 1
        P = self.D.shape[1]
        x = Xb[:, :P]
        out = module(x)
        if self.est.loss == "codes":
            per_row = (out - Xb[:, P:]).pow(2).sum(1)
        else:
            per_row = module.objective(x, out)
        opt.zero_grad(set_to_none=True)
        if self.comm is None:
            loss = per_row.mean() / self.scale
            loss.backward()
            with torch.no_grad():
                l0 = (out != 0).sum(1).to(out.dtype).mean()
        else:
            loss, l0 = self._global_backward(per_row.sum() / self.scale, out, state)
        opt.step()
        self.since_check += 1
        if self.track_best and self.since_check >= _CHECK_STEPS:
            self._check_best()
        return {"loss": loss.detach(), "l0": l0}

    def _global_backward(self, loss_sum, out, state):
        """Gradients of the global batch's mean loss on every rank: this rank's
        summed loss differentiated, then one all-reduce of the gradients with
        the batch's loss, non-zeros and row count (a rank may have no rows)."""
        loss_sum.backward()
        params = [state.params[k] for k in sorted(state.params)]
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        with torch.no_grad():
            extra = torch.stack([loss_sum.detach(), (out != 0).sum().to(out.dtype),
                                 out.new_tensor(out.shape[0])])
            flat = self.comm.sum(torch.cat([g.reshape(-1) for g in grads] + [extra]))
            B = flat[-1]
            off = 0
            for p in params:
                # in the parameter's own strides: the fused Adam step reads the
                # gradient's storage as laid out like the parameter's
                p.grad = torch.empty_like(p).copy_(flat[off : off + p.numel()].view_as(p) / B)
                off += p.numel()
        return flat[-3] / B, flat[-2] / B

    # ---------------------------------------------------------------- validation
    def val_loss(self, module):
        """The training loss of the last layer on the validation rows."""
        vx, _, vt = self.val
        with torch.no_grad():
            out = module(vx)
            if self.est.loss == "codes":
                tot = (out - vt).double().pow(2).sum()
            else:
                tot = module.objective(vx, out).double().sum()
        tot, n = self._total(tot, vx.shape[0])  # every rank's validation rows
        return tot / (max(n, 1) * self.scale)

    def _load(self, params):
        with torch.no_grad():
            for k, p in self.module.named_parameters():
                p.copy_(params[k])

    def end_epoch(self, state):
        """Keep the best parameters of ``fit`` on the validation rows. A pass that
        loses more than a quarter of what training gained over the untrained
        network (an Adam spike: lista_cp at lr 0.3 on natural patches went from
        0.44 to 3.5 in one pass and never came back), or that grows the excess of
        the best validation loss over its floor (the exact codes' loss) by more
        than half, restarts from the best parameters with half the learning rate
        and fresh moments."""
        if not self.track_best or self.module is None:
            return
        self.val_curve.append(self._check_best())

    def _check_best(self):
        """Keep the parameters if they are the best on the validation rows so
        far; restart from the best after a spike. Returns the validation loss."""
        self.since_check = 0
        if self.init_val is None:
            # the untrained network (ISTA for lista / lista_cp) is the first candidate
            init = self.new_module()
            self.init_val = self.best = self.val_loss(init)
            self.best_params = {k: p.detach().clone() for k, p in init.named_parameters()}
        cur = self.val_loss(self.module)
        if cur < self.best:
            self.best = cur
            self.best_params = {k: p.detach().clone()
                                for k, p in self.module.named_parameters()}
            return cur
        gained = max(self.init_val - self.best, 0.0)
        excess = max(self.best - self._val_floor(self.module), 0.0)
        if cur - self.best > min(0.25 * gained, _SPIKE_EXCESS * excess):
            self._load(self.best_params)
            self.opt.state.clear()
            for g in self.opt.param_groups:
                g["base_lr"] *= 0.5
        return cur

    def _val_floor(self, module):
        """The lowest validation loss: the objective of the exact codes of the
        validation rows (``loss="objective"``), 0 for squared error to targets."""
        if self.val_floor is None:
            vx, vexact, _ = self.val
            tot = 0.0
            if self.est.loss == "objective":
                with torch.no_grad():
                    tot = module.objective(vx, vexact).double().sum()
            tot, n = self._total(tot, vx.shape[0])
            self.val_floor = tot / (max(n, 1) * self.scale)
        return self.val_floor

    def layer_metrics(self, module):
        """``(layer_gap, layer_nmse)`` on the validation rows: each layer's
        relative lasso-objective gap to the exact codes, and its squared error
        to the targets relative to their energy (None without targets)."""
        vx, vexact, vt = self.val
        with torch.no_grad():
            layers = module(vx, all_layers=True)
            # the validation rows' sums, of every rank's rows under a process group
            sums = [module.objective(vx, a).double().sum() for a in layers]
            sums.append(module.objective(vx, vexact).double().sum())
            if vt is not None:
                sums += [(a - vt).double().pow(2).sum() for a in layers]
                sums.append(vt.double().pow(2).sum())
            sums = self._total(*sums)
        L = len(layers)
        fstar = sums[L]
        gap = [(f - fstar) / max(fstar, 1e-300) for f in sums[:L]]
        nmse = None
        if vt is not None:
            e = sums[-1]
            nmse = [s / max(e, 1e-300) for s in sums[L + 1 : 2 * L + 1]]
        return np.asarray(gap), None if nmse is None else np.asarray(nmse)
