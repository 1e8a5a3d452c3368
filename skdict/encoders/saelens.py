"""SAELens' on-disk format (``cfg.json`` + ``sae_weights.safetensors``) for the
sparse-autoencoder variants.

:func:`read_saelens` turns an SAELens directory into the arrays of our
parameterisation (``W_enc`` of shape ``(d_sae, d_in)``, codes and reconstructions
unchanged), the variant that reproduces its inference rule and that variant's
parameters; :func:`write_saelens` writes our arrays in the layout SAELens >= 6
loads with ``SAE.load_from_disk``. Each variant supplies its architecture name,
config fields and extra tensors (:class:`~skdict.encoders.base.Encoder`).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .._io import LoadError, check_model_arrays, read_json, read_safetensors
from .base import encoder_for_saelens

__all__ = ["read_saelens", "write_saelens"]

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
# the config layout written by write_saelens
FORMAT_VERSION = "6.0.0"


def read_saelens(path):
    """Read an SAELens directory.

    Returns
    -------
    variant : type
        The :class:`~skdict.encoders.base.Encoder` subclass of the architecture.
    params : dict
        Estimator parameters from the config (``n_components``, ``sparsity``,
        ``k``, ``prefix_sizes``, ...).
    arrays : dict of str to ndarray
        ``W_enc`` (d_sae, d_in), ``b_enc``, ``W_dec`` (d_sae, d_in), ``b_dec`` and
        ``threshold`` (d_sae,): ``apply_b_dec_to_input: false`` is absorbed into
        ``b_enc`` and ``rescale_acts_by_decoder_norm: true`` folded into the
        encoder (as SAELens does when it saves an inference model), so the codes
        and reconstructions are SAELens'.
    """
    path = Path(path)
    cfg_path, w_path = path / CFG_FILE, path / WEIGHTS_FILE
    for p in (cfg_path, w_path):
        if not p.exists():
            raise LoadError(
                f"{p} not found: an SAELens directory holds {CFG_FILE} and {WEIGHTS_FILE}."
            )
    cfg = read_json(cfg_path)
    t = read_safetensors(w_path)
    missing = {"W_enc", "W_dec", "b_enc", "b_dec"} - set(t)
    if missing:
        raise LoadError(f"{w_path} lacks tensors {sorted(missing)}.")
    W_enc, W_dec = np.asarray(t["W_enc"]), np.asarray(t["W_dec"])
    if W_enc.ndim != 2 or min(W_enc.shape) < 1:
        raise LoadError(f"{w_path}: tensor 'W_enc' must be a non-empty 2-D array (d_in, d_sae), "
                        f"got shape {W_enc.shape}.")
    d_in, d_sae = W_enc.shape
    if W_dec.shape != (d_sae, d_in):
        raise LoadError(
            f"{w_path}: tensor 'W_dec' has shape {W_dec.shape}, expected (d_sae, d_in) = "
            f"{(d_sae, d_in)} (from W_enc)."
        )
    for name, value in (("d_in", d_in), ("d_sae", d_sae)):
        if name in cfg and cfg[name] != value:
            raise LoadError(f"{cfg_path}: {name!r} is {cfg[name]!r}, but the tensors of "
                            f"{WEIGHTS_FILE} have {name} = {value}.")
    if cfg.get("normalize_activations", "none") not in ("none", None):
        raise LoadError(
            f"{cfg_path} normalizes activations ({cfg['normalize_activations']!r}); fold "
            "the normalisation into the weights in SAELens first."
        )
    try:
        variant = encoder_for_saelens(str(cfg.get("architecture", "standard")).lower())
        params, threshold = variant.from_saelens(cfg, t, d_sae)
    except (TypeError, ValueError) as exc:
        raise LoadError(f"{cfg_path}: {exc}") from None
    raw = check_model_arrays({"W_enc": W_enc.T, "W_dec": W_dec, "b_enc": t["b_enc"],
                              "b_dec": t["b_dec"]}, w_path,
                             required=("W_enc", "W_dec", "b_enc", "b_dec"))
    W_enc, W_dec, b_enc, b_dec = raw["W_enc"].T, raw["W_dec"], raw["b_enc"], raw["b_dec"]
    dt = W_dec.dtype
    if not cfg.get("apply_b_dec_to_input", True):
        b_enc = b_enc + b_dec @ W_enc
    if cfg.get("rescale_acts_by_decoder_norm", False):
        norms = np.linalg.norm(W_dec, axis=1).clip(1e-8)
        W_enc = W_enc * norms[None, :]
        b_enc = b_enc * norms
        W_dec = W_dec / norms[:, None]
    arrays = {
        "W_enc": np.ascontiguousarray(W_enc.T),
        "b_enc": b_enc,
        "W_dec": np.ascontiguousarray(W_dec),
        "b_dec": b_dec,
        "threshold": (np.zeros(d_sae, dt) if threshold is None
                      else np.asarray(threshold, dtype=dt)),
    }
    # shapes (b_enc, b_dec, threshold), dtypes and finiteness, naming the file
    arrays = check_model_arrays(arrays, w_path)
    params = {"n_components": d_sae, "sparsity": variant.name, **params}
    return variant, params, arrays


def write_saelens(path, variant, arrays, input_scale=1.0):
    """Write ``arrays`` (our parameterisation, see :func:`read_saelens`) for
    ``variant`` (an :class:`~skdict.encoders.base.Encoder` instance) to ``path``.

    ``input_scale`` (inputs are divided by it before encoding) is folded into the
    weights: ``W_enc / s``, ``W_dec * s``, ``b_dec * s``, so SAELens reads raw
    inputs and returns raw reconstructions.
    """
    from safetensors.numpy import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    s = float(input_scale)
    W_dec = np.asarray(arrays["W_dec"])
    dt = W_dec.dtype
    tensors = {
        "W_enc": np.ascontiguousarray((np.asarray(arrays["W_enc"]) / s).T.astype(dt)),
        "b_enc": np.ascontiguousarray(arrays["b_enc"], dtype=dt),
        "W_dec": np.ascontiguousarray((W_dec * s).astype(dt)),
        "b_dec": np.ascontiguousarray((np.asarray(arrays["b_dec"]) * s).astype(dt)),
    }
    for name, arr in variant.saelens_tensors(np.asarray(arrays["threshold"])).items():
        tensors[name] = np.ascontiguousarray(arr, dtype=dt)
    d_sae, d_in = W_dec.shape
    cfg = {
        "architecture": variant.saelens_architecture,
        "d_in": int(d_in),
        "d_sae": int(d_sae),
        "dtype": str(np.dtype(dt)),
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": {"sae_lens_version": FORMAT_VERSION,
                     "sae_lens_training_version": FORMAT_VERSION},
        **variant.saelens_config(),
    }
    with open(path / CFG_FILE, "w") as f:
        json.dump(cfg, f, indent=2)
    save_file(tensors, str(path / WEIGHTS_FILE))
    return path
