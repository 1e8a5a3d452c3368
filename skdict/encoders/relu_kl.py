"""ReLU codes with ``alpha`` times the KL divergence between a target mean
activation ``rho`` and each latent's mean ``tanh(z)`` over the batch (Ng's sparse
autoencoder). Inference is the ReLU, exported to SAELens as ``"standard"``."""

from __future__ import annotations

import torch

from ..losses import sparsity_loss
from .base import register
from .relu_l1 import DenseReLU


@register
class ReLUKL(DenseReLU):
    """ReLU codes, Bernoulli-KL penalty on the latents' mean activations."""

    name = "kl"
    params = ("alpha", "rho")
    saelens_imports = ()

    def penalty(self, z, P):
        rho_hat = torch.tanh(z).mean(0)
        return self.alpha * sparsity_loss(rho_hat, self.rho, kind="kl", reduction="sum")
