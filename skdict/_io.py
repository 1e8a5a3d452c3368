"""Reading model files that may be truncated, corrupted or hand-edited.

Every check raises a ``ValueError`` that names the file and the field, so a
loaded model is validated as strictly as a fitted one: nothing malformed gets
as far as a kernel (where a wrong shape can corrupt memory rather than raise).
"""

from __future__ import annotations

import json
import math
import numbers

import numpy as np
import torch

__all__ = ["LoadError", "read_json", "read_safetensors", "check_model_arrays",
           "check_count", "check_positive_finite", "check_resume"]


class LoadError(ValueError):
    """A model file that cannot be loaded (missing, unreadable or inconsistent)."""


def read_json(path):
    """A JSON object from ``path``; errors name the file."""
    if not path.exists():
        raise LoadError(f"{path} not found.")
    try:
        with open(path) as f:
            cfg = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LoadError(f"{path} is not valid JSON ({exc}); the file is truncated or "
                        "corrupted: write it again.") from None
    if not isinstance(cfg, dict):
        raise LoadError(f"{path} must hold a JSON object, got {type(cfg).__name__}.")
    return cfg


def read_safetensors(path):
    """All tensors of a safetensors file as numpy arrays.

    Half-precision tensors (float16, bfloat16: numpy has no bfloat16) are
    widened to float32. Errors name the file.
    """
    from safetensors.torch import load_file

    if not path.exists():
        raise LoadError(f"{path} not found.")
    try:
        tensors = load_file(str(path))
    except Exception as exc:  # the reader raises its own error types (SafetensorError, OSError)
        raise LoadError(f"{path} could not be read as safetensors ({exc}); the file is "
                        "truncated or corrupted: write it again.") from None
    out = {}
    for key, t in tensors.items():
        if t.dtype in (torch.float16, torch.bfloat16):
            t = t.float()
        try:
            out[key] = t.numpy()
        except TypeError:
            raise LoadError(f"{path}: tensor {key!r} has dtype {t.dtype}, which skdict "
                            "cannot read.") from None
    return out


def _field(path, key):
    return f"{path}: tensor {key!r}"


def check_model_arrays(arrays, path, *, required=("W_enc", "b_enc", "W_dec", "b_dec",
                                                   "threshold")):
    """Check the fitted arrays of a sparse autoencoder read from ``path``.

    ``W_dec`` fixes ``(d_sae, d_in)``; ``W_enc`` must be ``(d_sae, d_in)``,
    ``b_enc`` and ``threshold`` ``(d_sae,)``, ``b_dec`` ``(d_in,)``, all floating and
    finite; ``tokens_since_fired`` (when present) non-negative integers of shape
    ``(d_sae,)``. Returns the arrays with the floating ones in one dtype (W_dec's
    float32 / float64, else float32).
    """
    missing = [k for k in required if k not in arrays]
    if missing:
        raise LoadError(f"{path} lacks tensors {missing}.")
    W_dec = arrays["W_dec"]
    if W_dec.ndim != 2 or min(W_dec.shape) < 1:
        raise LoadError(f"{_field(path, 'W_dec')} must be a non-empty 2-D array "
                        f"(d_sae, d_in), got shape {W_dec.shape}.")
    K, d = W_dec.shape
    shapes = {"W_enc": (K, d), "b_enc": (K,), "b_dec": (d,), "threshold": (K,),
              "tokens_since_fired": (K,)}
    dt = W_dec.dtype if W_dec.dtype in (np.float32, np.float64) else np.dtype(np.float32)
    out = dict(arrays)
    for key in ("W_dec", *shapes):
        if key not in arrays:
            continue
        a = np.asarray(arrays[key])
        if key != "W_dec" and a.shape != shapes[key]:
            raise LoadError(f"{_field(path, key)} has shape {a.shape}, expected "
                            f"{shapes[key]} (from W_dec's shape (d_sae, d_in) = {(K, d)}).")
        if key == "tokens_since_fired":
            if a.dtype.kind not in "iu" or (a.size and a.min() < 0):
                raise LoadError(f"{_field(path, key)} must hold non-negative integers, got "
                                f"dtype {a.dtype}.")
            out[key] = a.astype(np.int64, copy=False)
            continue
        if a.dtype.kind != "f":
            raise LoadError(f"{_field(path, key)} has dtype {a.dtype}; expected a floating "
                            "point dtype.")
        if not np.all(np.isfinite(a)):
            raise LoadError(f"{_field(path, key)} contains NaN or infinity.")
        out[key] = a.astype(dt, copy=False)
    return out


def check_count(value, where, *, minimum=0):
    """An integer ``>= minimum`` (JSON may give it as a float like 3.0)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or (
        isinstance(value, float) and not value.is_integer()
    ) or value < minimum:
        raise LoadError(f"{where} must be an integer >= {minimum}, got {value!r}.")
    return int(value)


def check_positive_finite(value, where):
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (
        math.isfinite(value) and value > 0
    ):
        raise LoadError(f"{where} must be a positive finite number, got {value!r}.")
    return float(value)


def check_resume(resume, path, *, param_shapes, K):
    """Check a saved training state before it reaches the optimizer.

    ``param_shapes``: shapes of the trained parameters in the optimizer's order,
    including the variant's extra parameters (held in ``resume["params"]``).
    An optimizer moment of the wrong shape would otherwise reach the fused Adam
    kernel, which does not check shapes.
    """
    where = f"{path}: training state"
    if not isinstance(resume, dict):
        raise LoadError(f"{where} must be a mapping, got {type(resume).__name__}.")
    for name in ("n_steps", "n_epochs", "n_seen", "k_progress"):
        if name in resume:
            check_count(resume[name], f"{where} field {name!r}")
    if "scale" in resume:
        check_positive_finite(resume["scale"], f"{where} field 'scale'")
    tsf = resume.get("tokens_since_fired")
    if tsf is not None:
        tsf = np.asarray(tsf)
        if tsf.shape != (K,) or tsf.dtype.kind not in "iu" or (tsf.size and tsf.min() < 0):
            raise LoadError(f"{where} field 'tokens_since_fired' must be {K} non-negative "
                            f"integers, got dtype {tsf.dtype} and shape {tsf.shape}.")
    for group in ("params", "buffers"):
        values = resume.get(group) or {}
        if not isinstance(values, dict):
            raise LoadError(f"{where} field {group!r} must be a mapping.")
        for key, a in values.items():
            if isinstance(a, np.ndarray) and a.dtype.kind == "f" and not np.all(np.isfinite(a)):
                raise LoadError(f"{where} field '{group}.{key}' contains NaN or infinity.")
            if group == "params" and (not isinstance(a, np.ndarray) or a.dtype.kind != "f"
                                      or a.ndim < 1 or a.shape[0] != K):
                raise LoadError(f"{where} field 'params.{key}' must be a floating array with "
                                f"{K} rows (one per latent).")
    gen = resume.get("generator")
    if gen is not None:
        from .training.state import _GEN

        n_state = torch.Generator().get_state().numel()
        state = gen.get(_GEN) if isinstance(gen, dict) else None
        if not isinstance(state, np.ndarray) or state.dtype != np.uint8 or state.shape != (
            n_state,
        ):
            raise LoadError(f"{where} field 'generator' is not a torch generator state.")
    opt = resume.get("optimizer")
    if opt is None:
        return
    n_params = len(param_shapes)
    if not isinstance(opt, dict) or not isinstance(opt.get("state"), dict) or not isinstance(
        opt.get("param_groups"), list
    ):
        raise LoadError(f"{where} field 'optimizer' is not an optimizer state "
                        "(state / param_groups).")
    indices = []
    for g in opt["param_groups"]:
        if not isinstance(g, dict) or not isinstance(g.get("params"), list):
            raise LoadError(f"{where} field 'optimizer.param_groups' is malformed.")
        indices += g["params"]
    if sorted(indices) != list(range(n_params)):
        raise LoadError(f"{where} field 'optimizer.param_groups' lists parameters {indices}, "
                        f"expected {list(range(n_params))}.")
    for i, st in opt["state"].items():
        if not isinstance(i, int) or not 0 <= i < n_params or not isinstance(st, dict):
            raise LoadError(f"{where} field 'optimizer.state' has an entry {i!r} for no "
                            "parameter.")
        for name, v in st.items():
            if not isinstance(v, np.ndarray):
                continue
            key = f"optimizer.state.{i}.{name}"
            if v.dtype.kind != "f" or not np.all(np.isfinite(v)):
                raise LoadError(f"{where} field {key!r} must be finite floating point values.")
            if name == "step":  # a counter (a 0-d or 1-element tensor)
                if v.size != 1:
                    raise LoadError(f"{where} field {key!r} must hold one number.")
            elif v.shape != tuple(param_shapes[i]):
                raise LoadError(f"{where} field {key!r} has shape {v.shape}, but parameter "
                                f"{i} has shape {tuple(param_shapes[i])}.")
