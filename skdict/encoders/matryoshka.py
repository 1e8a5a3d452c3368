"""Matryoshka BatchTopK (Bussmann et al. 2025): BatchTopK whose loss sums the
FVUs of nested reconstructions from the latent prefixes ``[0, m)`` for each
``m`` in ``prefix_sizes`` (by default ``n_components / 16, / 8, / 4, / 2`` and
``n_components``), so that early latents learn general features on their own
and later ones refine them. Inference and SAELens export as
:mod:`~skdict.encoders.batchtopk` (``"jumprelu"`` with the global threshold)."""

from __future__ import annotations

import numpy as np
import torch

from ..solvers.topk import SparsePairs, sparse_decode_pairs, sparse_encode
from .base import register, selected_output
from .batchtopk import BatchTopK


def prefix_sizes_for(n_components, prefix_sizes=None):
    """The validated, strictly increasing prefix sizes ending at ``n_components``."""
    K = int(n_components)
    if prefix_sizes is None:
        sizes = sorted({max(1, K // f) for f in (16, 8, 4, 2)} | {K})
        return tuple(sizes)
    arr = np.asarray(prefix_sizes)
    if arr.ndim != 1 or arr.dtype.kind not in "iu":
        raise ValueError(
            f"prefix_sizes={prefix_sizes!r} must be a 1-D sequence of integers (latent "
            "counts), e.g. (n_components // 4, n_components // 2)."
        )
    sizes = [int(m) for m in arr]
    if not sizes or any(m < 1 or m > K for m in sizes):
        raise ValueError(
            f"prefix_sizes={tuple(prefix_sizes)} must be latent counts between 1 and "
            f"n_components={K}."
        )
    if any(b <= a for a, b in zip(sizes, sizes[1:], strict=False)):
        raise ValueError(f"prefix_sizes={tuple(prefix_sizes)} must be strictly increasing.")
    if sizes[-1] != K:
        sizes.append(K)  # the whole model is always the last prefix
    return tuple(sizes)


@register
class MatryoshkaBatchTopK(BatchTopK):
    """BatchTopK trained on the summed FVUs of its nested prefix reconstructions."""

    name = "matryoshka"
    params = ("k", "prefix_sizes")
    saelens_imports = ("matryoshka_batchtopk",)

    def check_params(self):
        super().check_params()
        prefix_sizes_for(self.n_components, self.prefix_sizes)

    def forward(self, x, P, k, buffers, pre=None):
        sizes = prefix_sizes_for(self.n_components, self.prefix_sizes)
        pairs = self.select(pre, k, buffers)
        vals = sparse_encode(x, P["W_enc"], P["b_enc"], pairs, pre, b_dec=P["b_dec"])
        # pairs grouped by prefix band [sizes[i-1], sizes[i]); each band is decoded
        # once and the prefix reconstructions are running sums of the bands
        band = torch.bucketize(pairs.col, torch.tensor(sizes, device=x.device), right=True)
        recon = []
        x_hat = P["b_dec"].expand_as(x)
        for i in range(len(sizes)):
            sel = (band == i).nonzero(as_tuple=True)[0]
            sub = SparsePairs(pairs.row[sel], pairs.col[sel], pairs.n_rows, pairs.n_cols)
            x_hat = x_hat + sparse_decode_pairs(vals[sel], P["W_dec"], sub)
            recon.append(x_hat)
        out = selected_output(x, recon, pairs, vals)
        self.after_step(out, vals, buffers)
        return out

    @classmethod
    def from_saelens(cls, cfg, tensors, d_sae):
        params, thr = BatchTopK.from_saelens(cfg, tensors, d_sae)
        widths = cfg.get("matryoshka_widths")
        params["prefix_sizes"] = tuple(int(w) for w in widths) if widths else None
        return params, thr
