"""Winner-take-all lifetime sparsity (Makhzani & Frey 2015): in training each
latent keeps its top ``k / n_components`` fraction of the batch; inference keeps
the top ``k`` of each row (exported to SAELens as ``"topk"``)."""

from __future__ import annotations

from ..solvers.topk import select_lifetime
from .base import SelectingEncoder, register


@register
class Lifetime(SelectingEncoder):
    """Per-latent top fraction of the batch in training, per-row top-``k`` at
    inference."""

    name = "lifetime"
    params = ("k",)
    inference = "topk"
    saelens_architecture = "topk"
    saelens_imports = ()

    def select(self, pre, k, buffers):
        return select_lifetime(pre, k / self.n_components)

    def saelens_config(self):
        return {"k": int(self.k), "rescale_acts_by_decoder_norm": False}
