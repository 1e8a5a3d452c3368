"""Training step of the sparse autoencoders (:class:`~skdict.KSparseAutoencoder`):
the variant's forward pass (:mod:`skdict.encoders`), summed FVUs + penalty + AuxK
and a ``torch.optim`` step.

The decoder is trained through the directions of its rows: the trained tensor
``W_dec`` has free row norms ``n``, and the model uses the unit rows
``W_dec / n`` with ``n`` folded into the encoder (``W_enc * n``, ``b_enc * n``),
as SAELens' ``rescale_acts_by_decoder_norm`` does (:func:`effective_params`).
The model is the same function as with a unit-norm constrained decoder; what
changes is how far an Adam step moves it: every raw entry moves by about the
learning rate, so rows started at a small norm turn fast early on, and turn
more slowly as their norm grows. Before each Adam step the gradient of every
tensor is divided by its norm (:func:`~skdict.training.optim.normalize_grads`),
so that the steps keep their length as the gradients shrink during training.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch

from ..encoders.base import preactivations
from ..losses import auxk_loss, batch_variance, fvu_loss
from ..updates.atoms import dead_atoms, init_atoms, update_since_used
from .optim import lr_factor, make_optimizer, normalize_grads
from .state import TrainState

__all__ = ["AUTOCAST", "PARAMS", "SAELearner", "SAEState", "effective_params"]

AUTOCAST = {"bfloat16": torch.bfloat16, "float16": torch.float16}
#: the trained parameters of every variant (variants may add their own)
PARAMS = ("W_enc", "b_enc", "W_dec", "b_dec")
# rows the initialisation (input scale, decoder bias) is estimated from
_INIT_ROWS = 65536
# raw norm of the decoder rows at initialisation (SAELens' decoder_init_norm is
# 0.1). It sets how far the first Adam steps turn the rows (about lr / norm per
# entry) against how far they move the encoder (raw rows encoder_init_norm / norm).
DECODER_INIT_NORM = 0.2


def effective_params(P):
    """The model's parameters from the trained ones: unit decoder rows
    ``W_dec / n`` and the norms ``n`` folded into the encoder (differentiable)."""
    n = torch.linalg.vector_norm(P["W_dec"], dim=1).clamp_min(1e-30)
    Q = dict(P)
    Q["W_enc"] = P["W_enc"] * n[:, None]
    Q["b_enc"] = P["b_enc"] * n
    Q["W_dec"] = P["W_dec"] / n[:, None]
    return Q

def _mean_rows(X, comm=None):
    """Mean of the rows of ``X`` (of every rank's ``X`` under a process group)."""
    if comm is None:
        return X.mean(0)
    s = comm.sum(torch.cat([X.sum(0), X.new_tensor([X.shape[0]])]))
    return s[:-1] / s[-1]


def _geometric_median(X, n_iter=50, eps=1e-8, comm=None):
    """Weiszfeld iterations for the geometric median of the rows of ``X`` (of
    every rank's rows under a process group)."""
    y = _mean_rows(X, comm)
    for _ in range(n_iter):
        d = torch.linalg.vector_norm(X - y, dim=1).clamp_min(eps)
        w = 1.0 / d
        if comm is not None:
            s = comm.sum(torch.cat([(w[:, None] * X).sum(0), w.sum().reshape(1)]))
            y_new = s[:-1] / s[-1]
        else:
            y_new = (w[:, None] * X).sum(0) / w.sum()
        done = float(torch.linalg.vector_norm(y_new - y)) < eps * (1 + float(y.norm()))
        y = y_new
        if done:
            break
    return y


@dataclass
class SAEState(TrainState):
    """Training state of :class:`KSparseAutoencoder`.

    ``params``: ``W_enc``, ``b_enc``, ``W_dec``, ``b_dec`` and the variant's
    extra learned tensors; ``buffers``: the variant's running state;
    ``optimizer``: the ``torch.optim`` state dict (None before the first step);
    ``generator``: CPU generator of the batch order; ``k_progress``: steps
    counted by the ``k_schedule``.
    """

    params: dict = None
    buffers: dict = None
    optimizer: dict = None
    tokens_since_fired: torch.Tensor = None
    scale: float = 1.0
    k_progress: int = 0
    generator: torch.Generator = None


class SAELearner:
    """One training step of a sparse autoencoder, for :class:`Trainer`."""

    def __init__(self, est, variant, device, dtype):
        self.est = est
        self.variant = variant
        self.device = device
        self.dtype = dtype
        self.opt = None
        self.k_schedule = copy.deepcopy(est.k_schedule)
        self._pre_buf = {}
        self.lr = est._lr()
        self.total = None  # steps of this run when known (see plan)
        self.run_step = 0
        self.comm = None  # a skdict.distributed.torch.Comm under a process group

    def use_comm(self, comm):
        """Train data-parallel: this process's rows are its shard of the batch."""
        from ..distributed.torch import DATA_PARALLEL_VARIANTS

        if self.variant.name not in DATA_PARALLEL_VARIANTS:
            raise ValueError(
                f"sparsity={self.variant.name!r} cannot train under torch.distributed yet "
                f"(its loss does not add up over the ranks' rows); use one of "
                f"{DATA_PARALLEL_VARIANTS}, or train in one process."
            )
        self.comm = self.variant.comm = comm

    # ---------------------------------------------------------------- state
    def init_state(self, source, generator):
        est, K = self.est, self.est.n_components
        td = self.dtype
        comm = self.comm
        X0 = source.sample(_INIT_ROWS, generator=generator, device=self.device, dtype=td)
        d = X0.shape[1]
        scale = 1.0
        if est.normalize_input:
            # row norms in the data's dtype, their squares summed in float64: no
            # float64 copy of the sample
            sq = torch.linalg.vector_norm(X0, dim=1, keepdim=True).double() ** 2
            ms = float(_mean_rows(sq, comm)[0])
            scale = math.sqrt(ms / d) if ms > 0 else 1.0
        X0 = X0.div_(scale)  # the sample is a copy of the rows, never the caller's array
        W = init_atoms(K, d, method="gaussian", generator=generator, device=self.device,
                       dtype=td)
        if est.b_dec_init == "mean":
            b_dec = _mean_rows(X0, comm)
        elif est.b_dec_init == "geometric_median":
            b_dec = _geometric_median(X0, comm=comm)
        else:
            b_dec = X0.new_zeros(d)
        g = DECODER_INIT_NORM
        P = {"W_enc": W * (self.variant.encoder_init_norm / g), "b_enc": X0.new_zeros(K),
             "W_dec": W * g, "b_dec": b_dec}
        P.update(self.variant.init_parameters(effective_params(P), X0))
        return SAEState(
            params=P,
            buffers=self.variant.init_buffers(P),
            tokens_since_fired=torch.zeros(K, dtype=torch.long, device=self.device),
            scale=float(scale),
            generator=generator,
        )

    def _optimizer(self, state):
        if self.opt is None:
            # a fixed order: the optimizer state is matched to parameters by position
            extra = sorted(k for k in state.params if k not in PARAMS)
            params = [state.params[k] for k in (*PARAMS, *extra)]
            for p in params:
                p.requires_grad_(True)
            self.opt = make_optimizer(self.est.optimizer, params, self.lr)
            if state.optimizer is not None:
                self.opt.load_state_dict(state.optimizer)
        return self.opt

    def plan(self, total):
        """This run will take ``total`` steps (None: unknown, or a ``partial_fit``
        call, which trains at the constant rate ``lr``)."""
        self.total = total
        self.run_step = 0

    def finish(self, state):
        """Write the optimizer's state into ``state`` after a run."""
        if self.opt is not None:
            state.optimizer = self.opt.state_dict()
        for p in state.params.values():
            p.requires_grad_(False)

    # ---------------------------------------------------------------- step
    def _pre(self, x, P):
        """Detached encoder pre-activations (one reused (B, K) buffer)."""
        with torch.no_grad():
            if self.est.autocast is not None:
                ac = AUTOCAST[self.est.autocast]
                xc = (x - P["b_dec"]).to(ac)
                return (xc @ P["W_enc"].to(ac).T).to(x.dtype) + P["b_enc"]
            key = (x.shape[0], P["W_enc"].shape[0], x.dtype, x.device)
            if self._pre_buf.get("key") != key:
                self._pre_buf = {"key": key, "pre": torch.empty(key[0], key[1], dtype=key[2],
                                                                device=key[3])}
            return preactivations(x, P, out=self._pre_buf["pre"])

    def _k(self, state):
        if self.k_schedule is None:
            return int(self.est.k)
        k = round(self.k_schedule.value_at(state.k_progress))
        return int(min(self.est.n_components, max(1, k)))

    def step(self, state, Xb):
        est, variant, Praw = self.est, self.variant, state.params
        opt = self._optimizer(state)
        P = effective_params(Praw)
        comm = self.comm
        x = Xb / state.scale if state.scale != 1.0 else Xb
        B = x.shape[0]
        if comm is None:
            denom = batch_variance(x)
        else:  # the global batch: every rank's rows of this step
            B_local = B
            denom, B = comm.batch_variance(x)
            variant.n_rows = B
        k = self._k(state)
        pre = self._pre(x, P) if variant.sparse else None
        out = variant.forward(x, P, k, state.buffers, pre)
        fvus = [fvu_loss(x, r, denom) for r in out.reconstructions]
        x_hat = out.reconstructions[-1]
        tsf = state.tokens_since_fired
        aux = x.new_zeros(())
        with torch.no_grad():
            fired = out.fired if comm is None else comm.max(out.fired.to(torch.uint8)) > 0
            update_since_used(tsf, fired, B)
            if est.dead_window:
                dead = dead_atoms(tsf, est.dead_window)
                dead_fraction = dead.to(x.dtype).mean()
            else:
                dead, dead_fraction = None, x.new_zeros(())
        if dead is not None and variant.auxk and est.aux_coef > 0:
            aux = auxk_loss(x, x_hat, pre, P, dead, self._k_aux(x))
            if comm is not None and int(dead.sum()):  # normalised by the global residual
                with torch.no_grad():
                    e = (x - x_hat).detach()
                    local = ((e - e.mean(0)) ** 2).sum().clamp_min(1e-30) if B_local \
                        else e.new_ones(())
                    glob = comm.batch_variance(e)[0].clamp_min(1e-30)
                aux = aux * (local / glob)
        loss = sum(fvus) + out.penalty + est.aux_coef * aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if comm is not None:
            comm.all_reduce_grads([p for g in opt.param_groups for p in g["params"]])
            with torch.no_grad():  # the step's metrics over the global batch
                tot = comm.sum(torch.stack([loss.detach(), fvus[-1].detach(), aux.detach(),
                                            torch.nan_to_num(out.l0.detach()) * B_local]))
            loss, fvus[-1], aux = tot[0], tot[1], tot[2]
            out.l0 = tot[3] / B
        if est.optimizer == "adam":  # one gradient scale per tensor and step
            normalize_grads(p for g in opt.param_groups for p in g["params"])
        # set every step: a resumed optimizer state carries the rate its last run ended at
        lr = self.lr * lr_factor(self.run_step, self.total, self.est.lr_decay)
        for g in opt.param_groups:
            g["lr"] = lr
        self.run_step += 1
        opt.step()
        if self.k_schedule is not None:
            thr = self.k_schedule.accuracy_threshold
            if thr is None or 1.0 - float(fvus[-1]) >= thr:
                state.k_progress += 1
        metrics = {
            "loss": loss.detach(),
            "fvu": fvus[-1].detach(),
            "l0": out.l0,
            "dead_fraction": dead_fraction,
            "aux_loss": aux.detach(),
            "k": float(k),
            "lr": lr,
        }
        metrics.update(out.metrics)
        return metrics

    def _k_aux(self, x):
        k_aux = self.est.k_aux
        return int(k_aux) if k_aux is not None else max(1, x.shape[1] // 2)
