"""The out-of-core pipeline: q, k, v in host memory, a couple of subproblems on the device at once.

Used for calls made outside `jit` with host-resident JAX arrays
(``memory_kind="pinned_host"``). The plan (``executor="offload"``) runs its
quorums in order:

* a producer thread moves each subproblem's query and key/value chunks to the
  device (one `jax.device_put` per subproblem, of zero-copy views of the host
  buffers or of pre-split pinned chunks; a chunk the previous subproblem also
  holds is not sent again), staying `memory_model.OFFLOAD_IN_FLIGHT`
  subproblems ahead;
* the main thread dispatches one jitted step per subproblem: the kernel on
  the chunks side by side, then the merge of its partial state into the
  accumulators, which are donated to the step and live on the device for the
  whole pass or, when they do not fit, chunk-major in pinned host memory
  (`host_accumulators`: each slice is read, merged and written back inside
  the step);
* at the end each query chunk's state becomes its output and log-sum-exp on
  the device, one chunk at a time, and lands in the query's memory.

The device therefore holds what `memory_model.offload_footprint` counts.
"""

from __future__ import annotations

import functools
import queue
import threading

import jax
import jax.numpy as jnp
import numpy as np

from . import executor, host_accumulators, host_threads, memory_kinds, memory_model
from .gather import gather_chunks
from .kernels.base import KernelInputs
from .plan import Plan


# How input chunks reach the device: "view" sends zero-copy NumPy views of the
# host buffers; "split" first copies every chunk into its own pinned host array
# (one host-side program per input), which the runtime then moves at the link's
# full speed and overlaps better with compute (bench/host_paths.py).
INPUT_TRANSFER = "view"


class ChunkSource:
    """Chunks of a host array x [B, L, heads, H] (or [L, heads, H]) on their way to the device;
    rows past the end are zeros."""

    def __init__(self, x: jax.Array, chunk: int, num_chunks: int, device: jax.Device, transfer: str):
        self.chunk = chunk
        self._tail: dict[int, np.ndarray] = {}
        self._split = None
        if transfer == "split":
            self._split = _splitter(x.shape, x.dtype, chunk, num_chunks, x.sharding)(x)
            return
        view = np.asarray(x)  # no copy for arrays in host memory
        self.view = view[None] if view.ndim == 3 else view

    def host_chunk(self, c: int):
        """Chunk `c` in host memory: a pinned array ("split") or a NumPy view or padded copy."""
        if self._split is not None:
            return self._split[c]
        start, length = c * self.chunk, self.view.shape[1]
        if start + self.chunk <= length:
            return self.view[:, start : start + self.chunk]
        if c not in self._tail:
            buf = np.zeros((self.view.shape[0], self.chunk) + self.view.shape[2:], self.view.dtype)
            n = max(length - start, 0)
            buf[:, :n] = self.view[:, start : start + n]
            self._tail[c] = buf
        return self._tail[c]


@functools.lru_cache(maxsize=8)
def _splitter(shape, dtype, chunk: int, num_chunks: int, sharding):
    """A host-side program: x [B, L, ...] (or [L, ...]) -> `num_chunks` zero-padded chunks [B, chunk, ...]."""

    def run(x):
        x = x[None] if x.ndim == 3 else x
        pad = num_chunks * chunk - x.shape[1]
        x = jnp.pad(x, ((0, 0), (0, pad)) + ((0, 0),) * (x.ndim - 2))
        return tuple(x[:, c * chunk : (c + 1) * chunk] for c in range(num_chunks))

    return jax.jit(run, out_shardings=sharding)


def _kernel_state(plan: Plan, cfg, q_chunks, k_chunks, v_chunks, tables, masks: executor.MaskArrays):
    """The partial softmax state of one subproblem over its chunks side by side."""
    kernel = executor._KERNELS[plan.implementation]
    q = jnp.concatenate(q_chunks, axis=1)
    k = jnp.concatenate(k_chunks, axis=1)
    v = jnp.concatenate(v_chunks, axis=1)
    q_slots, kv_slots = tables[0], tables[1]
    inputs = KernelInputs(
        q, k, v, *tables,
        q_segment_ids=gather_chunks(masks.q_segment_ids, q_slots, plan.q_chunk, 1),
        kv_segment_ids=gather_chunks(masks.kv_segment_ids, kv_slots, plan.kv_chunk, 1),
        q_lengths=masks.q_lengths,
        kv_lengths=masks.kv_lengths,
    )
    return kernel.forward(inputs, cfg)


@functools.lru_cache(maxsize=16)
def _step(plan: Plan, cfg, device):
    """(state donated, chunks, tables, num_q, masks) -> (state, done marker): one subproblem's
    kernel and merge. The state is [B, Tp, ...] on the device or chunk-major in host memory
    (`host_accumulators`), as the plan says."""

    def step(total, q_chunks, k_chunks, v_chunks, tables, num_q, masks):
        part = _kernel_state(plan, cfg, q_chunks, k_chunks, v_chunks, tables, masks)
        return executor.merge_partial(plan, total, part, tables[0], num_q, device), part.l[0, 0, 0]

    return jax.jit(step, donate_argnums=0)


@functools.lru_cache(maxsize=16)
def _initial_state(plan: Plan, device):
    """The empty accumulators (`executor.empty_accumulators`), made by one program."""
    make = lambda: executor.empty_accumulators(plan, plan.batch, plan.num_q_heads, device)
    if plan.accumulators == "host":  # placed in host memory by the program itself
        return jax.jit(make)
    return jax.jit(make, out_shardings=memory_kinds.sharding(device, "device"))


@functools.lru_cache(maxsize=16)
def _final_outputs(plan: Plan, out_dtype, device, out_kind: str, with_f32: bool):
    """state -> `host_accumulators.outputs` in memory `out_kind`."""
    target = memory_kinds.sharding(device, out_kind)
    run = lambda total: host_accumulators.outputs(plan, total, out_dtype, device, target, with_f32)
    return jax.jit(run, out_shardings=(target,) * (3 if with_f32 else 2))


class _Stop(Exception):
    pass


def _move_chunks(tables, sources, previous: dict, zeros, device_memory) -> tuple[dict, tuple]:
    """One subproblem's q, k and v chunks on the device: ``(held, chunks)``.

    `held` maps ("q" | "k" | "v", chunk id) to a device chunk; those `previous`
    (the last subproblem's `held`) already has are reused, the others are sent
    in one `jax.device_put`. `chunks` is (q, k, v), each a tuple of the cover
    size's slots, padded with `zeros` (q's, then k's and v's).
    """
    slots = len(tables.q_slots)
    q_ids = [int(c) for c in tables.q_slots[: tables.num_q]]
    kv_ids = [int(c) for c in tables.kv_slots[: tables.num_kv]]
    wanted = (("q", q_ids, sources[0]), ("k", kv_ids, sources[1]), ("v", kv_ids, sources[2]))
    held = {(name, c): previous[name, c] for name, ids, _ in wanted for c in ids if (name, c) in previous}
    new = [((name, c), source.host_chunk(c)) for name, ids, source in wanted for c in ids if (name, c) not in held]
    if new:
        keys, arrays = zip(*new)
        held.update(zip(keys, jax.device_put(list(arrays), device_memory)))
    chunks = tuple(
        tuple(held[name, c] for c in ids) + (pad,) * (slots - len(ids))
        for (name, ids, _), pad in zip(wanted, (zeros[0], zeros[1], zeros[1]))
    )
    return held, chunks


def forward(plan: Plan, scale: float, q, k, v, masks: executor.MaskArrays, out_kind: str | None = None,
            with_f32: bool = False):
    """(o [B, T, N, H] in q's dtype, lse [B, N, T] float32), both in memory `out_kind` (default:
    the query's), from host-resident q [B, T, N, H] and k, v [B, S, K, H]; `with_f32` adds o
    in float32 (for the backward)."""
    device = memory_kinds.device_of(q)
    out_kind = out_kind or memory_kinds.memory_kind(q)
    device_memory = memory_kinds.sharding(device, "device")
    cfg = executor.kernel_config(plan, scale)
    sources = tuple(
        ChunkSource(x, size, plan.num_chunks, device, INPUT_TRANSFER)
        for x, size in ((q, plan.q_chunk), (k, plan.kv_chunk), (v, plan.kv_chunk))
    )
    masks = executor.MaskArrays(*(None if x is None else jax.device_put(x, device_memory) for x in masks))
    feed: queue.Queue = queue.Queue()
    tokens = threading.Semaphore(memory_model.OFFLOAD_IN_FLIGHT)
    stop = threading.Event()
    b = plan.batch
    zeros = (
        jnp.zeros((b, plan.q_chunk, plan.num_q_heads, plan.head_dim), q.dtype, device=device_memory),
        jnp.zeros((b, plan.kv_chunk, plan.num_kv_heads, plan.head_dim), k.dtype, device=device_memory),
    )

    def produce():
        previous: dict = {}
        try:
            for i in range(plan.num_chunks):
                tables = plan.quorum_tables(i)
                if tables.num_pairs == 0:
                    continue
                while not tokens.acquire(timeout=0.1):
                    if stop.is_set():
                        raise _Stop
                previous, chunks = _move_chunks(tables, sources, previous, zeros, device_memory)
                feed.put((tables.num_q, chunks, jax.device_put(tables.kernel_tables(), device_memory)))
            feed.put(None)
        except _Stop:
            return
        except BaseException as e:  # handed to the main thread, which raises it
            feed.put(e)

    producer = threading.Thread(target=produce, daemon=True, name="offload-producer")
    total = _initial_state(plan, device)()
    step = _step(plan, cfg, device)
    running = None  # done marker of the subproblem in flight
    producer.start()
    try:
        for num_q, chunks, device_tables in host_threads.drain(feed):
            total, done = step(total, *chunks, device_tables, np.int32(num_q), masks)
            del chunks
            if running is not None:
                jax.block_until_ready(running)  # the previous subproblem is done: its inputs may go
                tokens.release()
            running = done
        if running is not None:
            jax.block_until_ready(running)
            tokens.release()
    finally:
        stop.set()
        producer.join()
    return _final_outputs(plan, q.dtype, device, out_kind, with_f32)(total)
