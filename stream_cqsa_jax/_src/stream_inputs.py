"""Validation of `stream_attention`'s arguments and reading of chunks from host arrays.

Inputs are NumPy arrays, `np.memmap`s or paths of ``.npy`` files (opened
memory-mapped, read-only). Every check names the argument and what was
expected, and all of them run before any work starts.
"""

from __future__ import annotations

import mmap
import os

import numpy as np

from . import host_threads
from .arguments import CallSpec, check_shapes_and_scale
from .plan import _check_bool, normalize_window

_DTYPES = ("float32", "float16", "bfloat16")
# Tokens per group of chunks one host thread gathers.
_GATHER_ROWS = 1 << 14


# Static facts about one streaming call: the same as a `dot_product_attention` call's.
StreamSpec = CallSpec


def _open(x, name: str) -> np.ndarray:
    """`x` as a NumPy array; a path is opened as a read-only memory-mapped ``.npy`` file."""
    if isinstance(x, (str, os.PathLike)):
        path = os.fspath(x)
        try:
            x = np.load(path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError, EOFError) as e:
            raise ValueError(f"{name}: cannot read {path!r} as a .npy array: {e}") from None
        if not isinstance(x, np.ndarray):
            raise ValueError(f"{name}: {path!r} holds an archive of arrays, not one .npy array")
        return x
    if not isinstance(x, np.ndarray):
        raise TypeError(
            f"{name} must be a NumPy array, an np.memmap or the path of a .npy file, got {type(x).__name__} "
            "(JAX arrays on the device go to stream_cqsa_jax.dot_product_attention; or pass np.asarray(x))"
        )
    return x


def _check_mapping(x: np.ndarray, name: str) -> None:
    """A memory-mapped array whose file is now shorter than its mapping would crash on reading."""
    mapping = getattr(x, "_mmap", None)
    if not isinstance(mapping, mmap.mmap):
        return
    offset = int(getattr(x, "offset", 0) or 0)
    start = offset - offset % mmap.ALLOCATIONGRANULARITY
    try:
        size = mapping.size()
    except (OSError, ValueError) as e:
        raise ValueError(f"{name}: its memory-mapped file {getattr(x, 'filename', None)!r} is unreadable: {e}") from None
    if size < start + len(mapping):
        raise ValueError(
            f"{name}: its memory-mapped file {getattr(x, 'filename', None)!r} has {size} bytes, fewer than the "
            f"{start + len(mapping)} the mapping covers (was it truncated?)"
        )


def _dtype_name(x: np.ndarray, name: str) -> str:
    dtype_name = x.dtype.name
    if dtype_name not in _DTYPES:
        if dtype_name == "float64":
            raise TypeError(f"{name} must be float32, float16 or bfloat16 (accumulation is float32), got float64")
        raise TypeError(
            f"{name} must hold floating-point data (float32, float16 or bfloat16 via ml_dtypes), got dtype {x.dtype}"
            + (" (a bfloat16 .npy file loads as raw records: open it with np.memmap(..., dtype=ml_dtypes.bfloat16))"
               if x.dtype.kind == "V" and x.dtype.itemsize == 2 else "")
        )
    return dtype_name


def _check_out(out, query: np.ndarray, inputs) -> np.ndarray | None:
    if out is None:
        return None
    if not isinstance(out, np.ndarray):
        raise TypeError(f"out must be None, a NumPy array or an np.memmap, got {type(out).__name__}")
    if out.shape != query.shape:
        raise ValueError(f"out must have the query's shape {list(query.shape)}, got {list(out.shape)}")
    if out.dtype != query.dtype:
        raise TypeError(f"out must have the query's dtype {query.dtype}, got {out.dtype}")
    if not out.flags.writeable:
        raise ValueError("out must be writeable (a memmap opened with mode 'r' is not)")
    if isinstance(out, np.memmap) and out.mode == "c":
        raise ValueError("out is a copy-on-write memmap (mode 'c'): results would never reach its file; use 'r+' or 'w+'")
    _check_mapping(out, "out")
    for name, x in inputs:
        if np.may_share_memory(out, x):
            raise ValueError(f"out must not overlap {name}")
    return out


def _check_checkpoint_dir(checkpoint_dir) -> str | None:
    if checkpoint_dir is None:
        return None
    if not isinstance(checkpoint_dir, (str, os.PathLike)):
        raise TypeError(f"checkpoint_dir must be None or a directory path, got {type(checkpoint_dir).__name__}")
    path = os.path.abspath(os.fspath(checkpoint_dir))
    if os.path.exists(path):
        if not os.path.isdir(path):
            raise ValueError(f"checkpoint_dir {path!r} exists and is not a directory")
        if not os.access(path, os.R_OK | os.W_OK | os.X_OK):
            raise ValueError(f"checkpoint_dir {path!r} is not readable and writable")
        return path
    parent = os.path.dirname(path)
    while parent and not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"checkpoint_dir {path!r} cannot be created: {parent!r} is not a writable directory")
    return path


def validate(query, key, value, out, *, scale, is_causal, local_window_size, checkpoint_dir, progress):
    """Returns ``(spec, q, k, v, out4, checkpoint_dir)``: 4-D views of the arrays (``out4`` is
    None when no `out` was given) and the absolute checkpoint path (or None)."""
    q, k, v = _open(query, "query"), _open(key, "key"), _open(value, "value")
    for name, x in (("query", q), ("key", k), ("value", v)):
        if x.ndim not in (3, 4):
            raise ValueError(f"{name} must have rank 4 [B, T, N, H] or 3 [T, N, H], got shape {list(x.shape)}")
        _dtype_name(x, name)
        _check_mapping(x, name)
    if not (k.ndim == v.ndim == q.ndim):
        raise ValueError(
            f"query, key and value must have the same rank, got shapes {list(q.shape)}, {list(k.shape)}, {list(v.shape)}"
        )
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"query, key and value must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.shape != v.shape:
        raise ValueError(f"key and value must have the same shape, got {list(k.shape)} and {list(v.shape)}")
    out = _check_out(out, q, (("query", q), ("key", k), ("value", v)))
    unbatched = q.ndim == 3
    if unbatched:
        q, k, v = q[None], k[None], v[None]
        out = None if out is None else out[None]
    b, t, n, h = q.shape
    s, kh = k.shape[1], k.shape[2]
    scale = check_shapes_and_scale(q.shape, k.shape, scale, is_causal)
    _check_bool("progress", progress)
    window = normalize_window(local_window_size)
    path = _check_checkpoint_dir(checkpoint_dir)
    spec = StreamSpec(b, t, s, n, kh, h, q.dtype.name, float(scale), bool(is_causal), window, unbatched)
    return spec, q, k, v, out, path


def gather(x: np.ndarray, chunk_ids, chunk: int, slots: int) -> np.ndarray:
    """[B, slots * chunk, heads, H]: chunks `chunk_ids` of x [B, L, heads, H] side by side.

    Positions past the end of x and slots past ``len(chunk_ids)`` are zeros
    (the kernel masks them by position). The copies run on the host thread pool.
    """
    b, length = x.shape[:2]
    ids = [int(c) for c in chunk_ids]
    buf = np.empty((b, slots * chunk) + x.shape[2:], x.dtype)

    def copy(lo: int, hi: int) -> None:
        for j in range(lo, hi):
            start, stop = ids[j] * chunk, min(ids[j] * chunk + chunk, length)
            n = max(stop - start, 0)
            buf[:, j * chunk : j * chunk + n] = x[:, start:stop]
            buf[:, j * chunk + n : (j + 1) * chunk] = 0

    host_threads.for_ranges(len(ids), copy, min_items=max(1, _GATHER_ROWS // chunk))
    buf[:, len(ids) * chunk :] = 0
    return buf
