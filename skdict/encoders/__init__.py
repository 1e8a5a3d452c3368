"""Sparse-autoencoder variants, one file each (see :mod:`skdict.encoders.base`).

Importing a variant's module registers it; the list below is the registry.
"""

from . import batchtopk, jumprelu, lifetime, matryoshka, relu_kl, relu_l1, topk  # noqa: F401
from .base import (
    Encoder,
    SelectingEncoder,
    TrainOutput,
    encoder_for_saelens,
    encoder_names,
    encoder_options,
    get_encoder,
    register,
    unregister,
)

__all__ = [
    "Encoder",
    "SelectingEncoder",
    "TrainOutput",
    "encoder_for_saelens",
    "encoder_names",
    "encoder_options",
    "get_encoder",
    "register",
    "unregister",
]
