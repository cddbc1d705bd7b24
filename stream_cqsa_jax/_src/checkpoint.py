"""Crash-safe checkpoints of a streaming run, resumable to a bitwise identical result.

A checkpoint directory holds:

* ``fingerprint.json``: what the run computes (shapes, dtypes, masks, scale,
  the plan, the JAX version and device, and digests of a few sampled blocks
  of each input); written once, atomically.
* ``acc.f32``, ``m.f32``, ``l.f32``: the accumulator slots (`host_state.py`),
  memory-mapped; created sparse.
* ``state.npz``: ``done`` (quorums finished, in plan order), ``pairs_done``
  and ``slot_of`` (each query chunk's current slot), plus the fingerprint's
  digest; replaced atomically after every subproblem.
* ``lock``: held (``flock``) while a call uses the directory.

Merging subproblem ``s`` writes its merged chunks into *free* slots only,
flushes them, then writes the new ``state.npz`` to a temporary file, fsyncs
it and renames it over the old one (then fsyncs the directory). The rename
is atomic, so a kill at any moment leaves either the old state (the slots it
names untouched) or the new one (all its slots written). A restart resumes
after ``done``; the remaining merges run in the same order on the same bits,
so the result is bitwise identical to an uninterrupted run.
"""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np

from .host_state import FILES, HostState, StateLayout

try:  # POSIX advisory locks; elsewhere, concurrent use is not detected
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None

FORMAT = 1
FINGERPRINT_FILE = "fingerprint.json"
STATE_FILE = "state.npz"
LOCK_FILE = "lock"
_SAMPLED_BLOCKS = 8
_SAMPLED_TOKENS = 16


def _sample_digest(x: np.ndarray) -> str:
    """Digest of `_SAMPLED_BLOCKS` evenly spaced blocks of tokens of x [B, T, ...] (first and last included)."""
    t = x.shape[1]
    starts = np.unique(np.linspace(0, max(t - _SAMPLED_TOKENS, 0), _SAMPLED_BLOCKS).astype(np.int64))
    digest = hashlib.blake2b(digest_size=16)
    for start in starts:
        digest.update(np.ascontiguousarray(x[:, start : start + _SAMPLED_TOKENS]).tobytes())
    return digest.hexdigest()


def fingerprint(spec, plan, q: np.ndarray, k: np.ndarray, v: np.ndarray) -> dict:
    """Everything that determines a run's bits, as plain JSON data."""
    import jax

    device = jax.devices()[0]
    elements = np.asarray(plan.cover.elements, dtype=np.int64).tobytes()
    return {
        "format": FORMAT,
        "call": {
            "query": [list(q.shape), str(q.dtype)],
            "key": [list(k.shape), str(k.dtype)],
            "value": [list(v.shape), str(v.dtype)],
            "scale": float(spec.scale).hex(),
            "is_causal": bool(spec.is_causal),
            "local_window_size": None if spec.window is None else list(spec.window),
        },
        "plan": {
            "num_chunks": plan.num_chunks,
            "cover_moduli": list(plan.cover.moduli),
            "cover_elements": hashlib.sha256(elements).hexdigest(),
            "q_chunk": plan.q_chunk,
            "kv_chunk": plan.kv_chunk,
            "block_q": plan.block_q,
            "block_kv": plan.block_kv,
            "implementation": plan.implementation,
        },
        "runtime": {"jax": jax.__version__, "platform": device.platform, "device_kind": device.device_kind},
        "data": {"query": _sample_digest(q), "key": _sample_digest(k), "value": _sample_digest(v)},
    }


def _digest(fp: dict) -> str:
    return hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()


def _differences(stored: dict, current: dict) -> list[str]:
    out = []
    for section in sorted(set(stored) | set(current)):
        a, b = stored.get(section), current.get(section)
        if isinstance(a, dict) and isinstance(b, dict):
            for key in sorted(set(a) | set(b)):
                if a.get(key) != b.get(key):
                    out.append(f"{section}.{key}: checkpoint has {a.get(key)!r}, this call has {b.get(key)!r}")
        elif a != b:
            out.append(f"{section}: checkpoint has {a!r}, this call has {b!r}")
    return out


def _fsync_directory(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover (platforms without directory handles)
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write(path: str, write) -> None:
    """Writes `path` through a temporary file: write, fsync, rename, fsync the directory."""
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_directory(os.path.dirname(path) or ".")


def _damaged(path: str, why: str) -> ValueError:
    return ValueError(
        f"checkpoint file {path!r} is damaged ({why}); delete its checkpoint directory to start over"
    )


class Checkpoint:
    """An open checkpoint directory (holds its lock until `close` or `remove`)."""

    def __init__(self, directory: str, fp: dict, lock_fd: int | None):
        self.directory = directory
        self.digest = _digest(fp)
        self._lock_fd = lock_fd

    @classmethod
    def open(cls, directory: str, fp: dict, layout: StateLayout) -> tuple["Checkpoint", HostState, int, int]:
        """Opens or creates the checkpoint; returns it, the accumulators, ``done`` and ``pairs_done``.

        Raises ValueError when the directory holds a run of other arguments
        (naming each difference), or damaged files; RuntimeError when another
        call holds the directory.
        """
        os.makedirs(directory, exist_ok=True)
        lock_fd = _lock(directory)
        try:
            ckpt = cls(directory, fp, lock_fd)
            state_path = ckpt._path(STATE_FILE)
            if os.path.exists(state_path):
                stored = ckpt._read_fingerprint()
                diffs = _differences(stored, fp)
                if diffs:
                    hint = ""
                    if any(d.startswith("plan.") for d in diffs):
                        hint = " (the plan follows memory_budget, and without one the free device memory)"
                    raise ValueError(
                        f"checkpoint_dir {directory!r} holds an unfinished run with other arguments: "
                        + "; ".join(diffs)
                        + hint
                        + ". Resume it with the same arguments, or pass another (or an emptied) checkpoint_dir"
                    )
                done, pairs_done, slot_of = ckpt._read_state(layout)
                host = HostState.in_files(directory, layout, slot_of, copy_on_write=True)
            else:
                _atomic_write(ckpt._path(FINGERPRINT_FILE), lambda f: f.write(json.dumps(fp, indent=1).encode()))
                host = HostState.in_files(directory, layout, None, copy_on_write=True)
                done = pairs_done = 0
                ckpt._write_state(host.slot_of, done, pairs_done)
        except BaseException:
            _unlock(lock_fd)
            raise
        return ckpt, host, done, pairs_done

    def _path(self, name: str) -> str:
        return os.path.join(self.directory, name)

    def _read_fingerprint(self) -> dict:
        path = self._path(FINGERPRINT_FILE)
        try:
            with open(path, "rb") as f:
                return json.loads(f.read().decode())
        except FileNotFoundError:
            raise _damaged(self._path(STATE_FILE), f"{FINGERPRINT_FILE} is missing") from None
        except (ValueError, UnicodeDecodeError) as e:
            raise _damaged(path, f"not JSON: {e}") from None

    def _read_state(self, layout: StateLayout) -> tuple[int, int, np.ndarray]:
        path = self._path(STATE_FILE)
        try:
            with np.load(path, allow_pickle=False) as data:
                done, pairs_done = int(data["done"]), int(data["pairs_done"])
                slot_of = np.asarray(data["slot_of"], dtype=np.int64)
                digest = str(data["fingerprint"])
        except (OSError, ValueError, KeyError) as e:
            raise _damaged(path, str(e)) from None
        if digest != self.digest:
            raise _damaged(path, "it belongs to another fingerprint")
        used = slot_of[slot_of >= 0]
        if (
            slot_of.shape != (layout.num_chunks,)
            or not 0 <= done <= layout.num_chunks
            or slot_of.min(initial=0) < -1
            or used.max(initial=-1) >= layout.num_slots
            or len(np.unique(used)) != len(used)
        ):
            raise _damaged(path, "its slot table does not fit the plan")
        return done, pairs_done, slot_of

    def _write_state(self, slot_of: np.ndarray, done: int, pairs_done: int) -> None:
        def write(f):
            np.savez(
                f,
                done=np.int64(done),
                pairs_done=np.int64(pairs_done),
                slot_of=slot_of.astype(np.int32),
                fingerprint=np.str_(self.digest),
            )

        _atomic_write(self._path(STATE_FILE), write)

    def commit(self, host: HostState, done: int, pairs_done: int) -> None:
        """Makes the pending merges durable: flush their slots, then switch the state atomically."""
        host.flush()
        self._write_state(host.proposed_slots(), done, pairs_done)
        host.commit()

    def remove(self) -> None:
        """Deletes the checkpoint's files (state first, so a kill midway leaves no resumable state)."""
        for name in (STATE_FILE, *FILES, FINGERPRINT_FILE, STATE_FILE + ".tmp", FINGERPRINT_FILE + ".tmp"):
            try:
                os.remove(self._path(name))
            except FileNotFoundError:
                pass
        try:
            os.remove(self._path(LOCK_FILE))
        except FileNotFoundError:
            pass
        self.close()

    def close(self) -> None:
        _unlock(self._lock_fd)
        self._lock_fd = None


def _lock(directory: str) -> int | None:
    if fcntl is None:  # pragma: no cover
        return None
    fd = os.open(os.path.join(directory, LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise RuntimeError(
            f"checkpoint_dir {directory!r} is in use by another running stream_attention call"
        ) from None
    return fd


def _unlock(fd: int | None) -> None:
    if fd is not None:
        os.close(fd)  # closing the descriptor releases the flock


def read_progress(directory: str) -> tuple[int, int] | None:
    """(quorums done, quorums in all) of the run checkpointed in `directory`, or None if there is none."""
    try:
        with np.load(os.path.join(directory, STATE_FILE), allow_pickle=False) as data:
            done, total = int(data["done"]), len(data["slot_of"])
    except FileNotFoundError:
        return None
    return done, total
