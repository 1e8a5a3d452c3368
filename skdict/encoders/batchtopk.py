"""BatchTopK (Bussmann et al. 2024): the ``k * B`` largest pre-activations of a
batch of ``B`` rows in training; at inference one global threshold, a running
average of the smallest selected activation, so that codes do not depend on the
batch. Saved to SAELens as ``"jumprelu"`` with that threshold for every latent
(as SAELens saves its BatchTopK SAEs)."""

from __future__ import annotations

import numpy as np
import torch

from ..solvers.topk import select_batch_topk
from .base import SelectingEncoder, register

#: weight of the newest batch in the running inference threshold
THRESHOLD_MOMENTUM = 0.01


@register
class BatchTopK(SelectingEncoder):
    """Top ``k * B`` of the batch in training, a learned global threshold at
    inference."""

    name = "batchtopk"
    params = ("k",)
    inference = "threshold"
    saelens_architecture = "jumprelu"
    saelens_imports = ("batchtopk",)

    def init_buffers(self, P):
        # threshold, and whether it has been set (the first batch sets it directly)
        z = P["b_enc"].new_zeros(())
        return {"threshold": z.clone(), "threshold_set": z.clone()}

    def from_threshold(self, P, threshold):
        buffers = self.init_buffers(P)
        buffers["threshold"].copy_(threshold.max())
        buffers["threshold_set"].fill_(1)
        return {}, buffers

    comm = None  # a skdict.distributed.torch.Comm: select over the global batch

    def select(self, pre, k, buffers):
        if self.comm is not None:
            return self.comm.batch_topk(pre, k, self.n_rows)
        return select_batch_topk(pre, k)

    @torch.no_grad()
    def after_step(self, out, vals, buffers):
        # tensors only: no host synchronisation on the training path
        v = vals.detach()
        tmin = torch.where(v > 0, v, torch.full_like(v, float("inf"))).min() if v.numel() \
            else v.new_full((), float("inf"))
        if self.comm is not None:
            tmin = self.comm.min(tmin)
        t, seen = buffers["threshold"], buffers["threshold_set"]
        new = torch.where(seen > 0, (1 - THRESHOLD_MOMENTUM) * t + THRESHOLD_MOMENTUM * tmin,
                          tmin)
        ok = torch.isfinite(tmin)
        t.copy_(torch.where(ok, new, t))
        seen.copy_(torch.where(ok, torch.ones_like(seen), seen))

    def inference_threshold(self, P, buffers):
        return buffers["threshold"].clamp_min(0).expand(self.n_components).clone()

    def saelens_tensors(self, threshold):
        return {"threshold": np.ascontiguousarray(threshold)}

    @classmethod
    def from_saelens(cls, cfg, tensors, d_sae):
        k = cfg.get("k")
        thr = tensors.get("threshold", tensors.get("topk_threshold"))
        if k is None or thr is None:
            raise ValueError(
                "a batchtopk SAE needs 'k' in cfg.json and a 'threshold' (or "
                "'topk_threshold') tensor."
            )
        thr = np.broadcast_to(np.asarray(thr, dtype=np.float64).reshape(-1), (d_sae,))
        # rounded (SAELens allows a fractional average k), never raised: k=0 is an error
        return {"k": int(round(float(k)))}, np.array(thr)
