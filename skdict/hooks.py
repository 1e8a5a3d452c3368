"""Hidden states of any torch model through forward hooks: collect them (streamed
to a memory map) and splice replacements back in.

These functions work on a standard :mod:`transformers` model, encoder or decoder
(``BertModel``, ``GPT2LMHeadModel``, ...), or any :class:`torch.nn.Module` whose
forward takes keyword tensors: the hidden state is the output of one named
submodule (a transformer block, the embeddings), read or replaced by a forward
hook, so nothing about the architecture is hard-coded.

* :func:`collect_activations`: the module's output at every kept token of a
  list of texts, written batch by batch into an array or a ``.npy`` memory map;
  the forward pass stops at the module (later layers are not run).
* :func:`splice_activations`: a context manager under which the module's output
  at the kept tokens is replaced by ``fn(hidden)`` (e.g. a sparse autoencoder's
  reconstruction), so the rest of the model runs on it.

:func:`skdict.metrics.spliced_evaluation` builds the downstream evaluation of a
sparse autoencoder on these two.
"""

from __future__ import annotations

import contextlib
import sys
import time
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "collect_activations",
    "splice_activations",
    "tokenize",
    "get_module",
    "iter_hidden_states",
]


class _Stop(Exception):
    """Raised by a collecting hook to end the forward pass at its module."""


def get_module(model, module):
    """The submodule ``module`` of ``model``: a dotted name as listed by
    ``model.named_modules()`` (e.g. ``"encoder.layer.2"``), or the module itself.

    Raises
    ------
    ValueError
        If ``model`` has no such submodule (the message lists a few names).
    """
    if isinstance(module, torch.nn.Module):
        if not any(m is module for m in model.modules()):
            raise ValueError("module is not a submodule of model.")
        return module
    if not isinstance(module, str):
        raise ValueError(
            f"module must be a submodule name (str) or a torch.nn.Module, got {module!r}."
        )
    named = dict(model.named_modules())
    if module not in named:
        blocks = [n for n in named if n and n.count(".") <= 2][:12]
        raise ValueError(
            f"model has no submodule {module!r}; names look like {blocks} (see "
            "model.named_modules())."
        )
    return named[module]


def _hidden(output):
    """The hidden-state tensor of a module's output (a tensor, or the first
    element of a tuple / model output, as transformer blocks return)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    first = getattr(output, "last_hidden_state", None)
    if isinstance(first, torch.Tensor):
        return first
    raise ValueError(
        f"cannot find the hidden states in the module's output of type {type(output)}; "
        "hook a module that returns a tensor or a tuple whose first element is one."
    )


def _with_hidden(output, hidden):
    if isinstance(output, torch.Tensor):
        return hidden
    if isinstance(output, tuple):
        return (hidden, *output[1:])
    if isinstance(output, list):
        return [hidden, *output[1:]]
    output.last_hidden_state = hidden
    return output


def tokenize(tokenizer, texts, *, max_length=128, skip_special=True):
    """Token ids of ``texts`` and which tokens are kept.

    Parameters
    ----------
    tokenizer : callable
        A Hugging Face tokenizer (``tokenizer(texts, truncation=True,
        max_length=..., return_special_tokens_mask=True)`` must work).
    texts : str or list of str
    max_length : int, default=128
        Tokens per text, special tokens included; longer texts are truncated.
    skip_special : bool, default=True
        Do not keep the special tokens (``[CLS]``, ``[SEP]``, ``<bos>``, ...).

    Returns
    -------
    ids : list of list of int
    keep : list of ndarray of bool
        For each text, which of its tokens are kept.
    """
    if isinstance(texts, str):
        texts = [texts]
    texts = list(texts)
    if not all(isinstance(t, str) for t in texts):
        raise ValueError("texts must be a string or a list of strings.")
    enc = tokenizer(texts, truncation=True, max_length=int(max_length),
                    return_special_tokens_mask=True)
    ids = [list(map(int, x)) for x in enc["input_ids"]]
    if skip_special:
        keep = [~np.asarray(m, dtype=bool) for m in enc["special_tokens_mask"]]
    else:
        keep = [np.ones(len(x), dtype=bool) for x in ids]
    return ids, keep


def _pad_id(tokenizer, model):
    for obj, attr in ((tokenizer, "pad_token_id"), (getattr(model, "config", None),
                                                    "pad_token_id")):
        v = getattr(obj, attr, None)
        if isinstance(v, int):
            return v
    return 0


def _batches(ids, batch_size, pad_id, device):
    """``(indices, inputs)`` over the sequences in order of length (less padding):
    ``inputs`` holds right-padded ``input_ids`` and ``attention_mask``."""
    order = sorted(range(len(ids)), key=lambda i: (len(ids[i]), i))
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        t = max(len(ids[i]) for i in idx)
        input_ids = torch.full((len(idx), t), pad_id, dtype=torch.long)
        mask = torch.zeros((len(idx), t), dtype=torch.long)
        for r, i in enumerate(idx):
            input_ids[r, :len(ids[i])] = torch.as_tensor(ids[i], dtype=torch.long)
            mask[r, :len(ids[i])] = 1
        yield idx, {"input_ids": input_ids.to(device), "attention_mask": mask.to(device)}


def _model_device(model):
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


def iter_hidden_states(model, module, ids, *, batch_size=32, pad_id=0):
    """Yield ``(i, hidden)`` for each token-id list ``ids[i]``: the output of
    ``module`` over that sequence as a float32 array ``(len(ids[i]), width)``.

    Sequences are run in batches of similar length (right-padded, with an
    attention mask), in eval mode and without gradients; a hook on ``module``
    stops the forward pass there. Results come in order of length.
    """
    mod = get_module(model, module)
    device = _model_device(model)
    captured = {}

    def hook(_mod, _inp, output):
        captured["h"] = _hidden(output)
        raise _Stop

    was_training = model.training
    model.eval()
    handle = mod.register_forward_hook(hook)
    try:
        for idx, inputs in _batches(ids, batch_size, pad_id, device):
            captured.clear()
            with torch.inference_mode(), contextlib.suppress(_Stop):
                model(**inputs)
            if "h" not in captured:
                raise ValueError("the hooked module was not called by the model's forward "
                                 "pass.")
            h = captured.pop("h").float().cpu().numpy()
            for r, i in enumerate(idx):
                yield i, np.ascontiguousarray(h[r, :len(ids[i])])
    finally:
        handle.remove()
        model.train(was_training)


def collect_activations(model, tokenizer, texts, module, *, path=None, max_length=128,
                        batch_size=32, skip_special=True, dtype=np.float32,
                        return_tokens=False, verbose=False):
    """Hidden states of ``module`` at every kept token of ``texts``.

    Runs ``model`` (in eval mode, without gradients) over the texts in batches
    of similar length; a forward hook on ``module`` copies its output at the
    kept tokens into the result and stops the forward pass there. Rows are in
    the order of the texts and, within a text, of its tokens.

    Parameters
    ----------
    model : torch.nn.Module
        E.g. a ``transformers`` model; called as ``model(input_ids=...,
        attention_mask=...)`` on its own device.
    tokenizer : callable
        The model's Hugging Face tokenizer (see :func:`tokenize`).
    texts : str or list of str
    module : str or torch.nn.Module
        The submodule whose output is recorded, e.g. ``"encoder.layer.2"`` (the
        hidden state after the third layer of a BERT) or ``"transformer.h.5"``
        (GPT-2); see :func:`get_module`.
    path : str or os.PathLike, default=None
        Write the rows into this ``.npy`` file through a memory map (the rows
        never need to fit in memory) and return it opened read-only; None
        returns an in-memory array.
    max_length : int, default=128
        Tokens per text (special tokens included); longer texts are truncated.
    batch_size : int, default=32
        Texts per forward pass.
    skip_special : bool, default=True
        Leave out the special tokens (``[CLS]``, ``[SEP]``, ...).
    dtype : numpy dtype, default=np.float32
    return_tokens : bool, default=False
        Also return the token id of every row.
    verbose : bool, default=False
        Print progress to stderr.

    Returns
    -------
    X : ndarray or np.memmap of shape (n_tokens, hidden_size)
    token_ids : ndarray of shape (n_tokens,)
        Only with ``return_tokens=True``.

    Examples
    --------
    >>> from skdict.datasets import minilm_model
    >>> from skdict.hooks import collect_activations
    >>> model, tokenizer = minilm_model()
    >>> X = collect_activations(model, tokenizer, ["Sparse codes are cheap."],
    ...                         "encoder.layer.2")
    >>> X.shape  # five WordPieces, [CLS] and [SEP] left out
    (5, 384)
    """
    mod = get_module(model, module)
    ids, keep = tokenize(tokenizer, texts, max_length=max_length, skip_special=skip_special)
    batch_size = _check_int(batch_size, "batch_size")
    counts = np.array([int(k.sum()) for k in keep], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(counts)])
    n = int(offsets[-1])
    X = None  # allocated at the first batch: the width is the module's output size
    tok_out = np.empty(n, dtype=np.int64)
    t0 = time.perf_counter()
    for j, (i, h) in enumerate(iter_hidden_states(model, mod, ids, batch_size=batch_size,
                                                  pad_id=_pad_id(tokenizer, model))):
        if X is None:
            shape = (n, h.shape[-1])
            if path is not None:
                path = Path(path)
                path.parent.mkdir(parents=True, exist_ok=True)
                X = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)
            else:
                X = np.empty(shape, dtype=dtype)
        rows = slice(offsets[i], offsets[i + 1])
        X[rows] = h[keep[i]]
        tok_out[rows] = np.asarray(ids[i])[keep[i]]
        if verbose and (j + 1) % 500 == 0:
            print(f"[collect_activations] {j + 1}/{len(ids)} texts, "
                  f"{time.perf_counter() - t0:.1f} s", file=sys.stderr)
    if X is None:  # no texts
        width = getattr(getattr(model, "config", None), "hidden_size", 0)
        X = np.empty((0, width), dtype=dtype)
    elif path is not None:
        X.flush()
        del X
        X = np.load(path, mmap_mode="r")
    return (X, tok_out) if return_tokens else X


@contextlib.contextmanager
def splice_activations(model, module, fn):
    """Replace the output of ``module`` by ``fn`` of it while the context is open.

    Inside the context, set the tokens to replace before each forward pass with
    the ``keep`` function the context yields: ``keep(mask)`` with a boolean
    ``(batch, seq)`` tensor (None: every token). At the kept tokens the module's
    hidden state ``h`` (``(n_kept, hidden_size)``) becomes ``fn(h)``; the other
    tokens and the rest of the output are untouched, and the later layers run on
    the result.

    Parameters
    ----------
    model : torch.nn.Module
    module : str or torch.nn.Module
        See :func:`get_module`.
    fn : callable
        ``(n, hidden_size)`` tensor -> tensor of the same shape (e.g. a sparse
        autoencoder's reconstruction, zeros, a mean).

    Yields
    ------
    keep : callable
        ``keep(mask)`` sets the tokens replaced by the next forward passes.

    Examples
    --------
    >>> import torch
    >>> from skdict.datasets import minilm_model
    >>> from skdict.hooks import splice_activations
    >>> model, tokenizer = minilm_model()
    >>> inputs = tokenizer(["Sparse codes are cheap."], return_tensors="pt")
    >>> with torch.no_grad():
    ...     clean = model(**inputs).last_hidden_state
    ...     with splice_activations(model, "encoder.layer.2", lambda h: h):
    ...         same = model(**inputs).last_hidden_state
    >>> bool(torch.allclose(clean, same))
    True
    """
    mod = get_module(model, module)
    state = {"mask": None}

    def hook(_mod, _inp, output):
        h = _hidden(output)
        mask = state["mask"]
        new = h.clone()
        if mask is None:
            new = fn(h.reshape(-1, h.shape[-1])).reshape(h.shape).to(h.dtype)
        else:
            mask = mask.to(h.device).bool()
            if mask.shape != h.shape[:-1]:
                raise ValueError(
                    f"keep mask of shape {tuple(mask.shape)} does not match the hidden "
                    f"states {tuple(h.shape[:-1])}."
                )
            if mask.any():
                new[mask] = fn(h[mask]).to(h.dtype)
        return _with_hidden(output, new)

    def keep(mask):
        state["mask"] = mask

    handle = mod.register_forward_hook(hook)
    try:
        yield keep
    finally:
        handle.remove()


def _check_int(value, name, minimum=1):
    import numbers

    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}.")
    return int(value)
