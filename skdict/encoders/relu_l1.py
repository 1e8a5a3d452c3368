"""ReLU codes with an L1 penalty ``alpha * sum_j z_j ||W_dec_j||`` (the
"standard" SAE of Bricken et al. 2023). Codes are not capped at ``k``.
SAELens architecture ``"standard"``."""

from __future__ import annotations

import torch

from .base import Encoder, TrainOutput, preactivations, register


class DenseReLU(Encoder):
    """ReLU codes computed densely (every latent of every row carries a
    gradient); subclasses give the penalty."""

    sparse = False
    inference = "threshold"
    auxk = False
    saelens_architecture = "standard"

    def check_params(self):
        pass  # k plays no part

    def penalty(self, z, P):
        return z.new_zeros(())

    def forward(self, x, P, k, buffers, pre=None):
        z = torch.relu(preactivations(x, P))
        x_hat = z @ P["W_dec"] + P["b_dec"]
        with torch.no_grad():
            active = z.detach() > 0
            fired = active.any(0)
            l0 = active.sum().to(x.dtype) / x.shape[0]
        return TrainOutput([x_hat], self.penalty(z, P), fired, l0)


@register
class ReLUL1(DenseReLU):
    """ReLU codes, L1 penalty weighted by the decoder row norms."""

    name = "l1"
    params = ("alpha",)
    saelens_imports = ("standard",)

    def penalty(self, z, P):
        dn = torch.linalg.vector_norm(P["W_dec"], dim=1)
        return self.alpha * (z * dn).sum(1).mean()
