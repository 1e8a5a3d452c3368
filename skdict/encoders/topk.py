"""TopK: the ``k`` largest pre-activations of each row, ReLU (Makhzani & Frey
2013; Gao et al. 2024). SAELens architecture ``"topk"``."""

from __future__ import annotations

from ..solvers.topk import select_topk
from .base import SelectingEncoder, register


@register
class TopK(SelectingEncoder):
    """Per-row top-``k``, in training and at inference."""

    name = "topk"
    params = ("k",)
    inference = "topk"
    saelens_architecture = "topk"
    saelens_imports = ("topk",)

    def select(self, pre, k, buffers):
        return select_topk(pre, k)

    def saelens_config(self):
        return {"k": int(self.k), "rescale_acts_by_decoder_norm": False}

    @classmethod
    def from_saelens(cls, cfg, tensors, d_sae):
        k = cfg.get("k", (cfg.get("activation_fn_kwargs") or {}).get("k"))
        if k is None:
            raise ValueError("cfg.json of a topk SAE has no 'k'.")
        if isinstance(k, bool) or not float(k).is_integer():
            raise ValueError(f"'k' must be an integer, got {k!r}.")
        return {"k": int(k)}, None
