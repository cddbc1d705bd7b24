"""Float32 softmax accumulators in host memory, merged on the device inside a jitted program.

The state of every query chunk is kept chunk-major in host memory:
``acc [C, B, cq, N, H]``, ``m, l [C, B, N, cq]``. A subproblem's merge reads
the slices of its query chunks (one `jax.device_put` each), merges its partial
state into them on the device, and writes them back in place (the state is
the loop carry inside `jit`, or a donated argument of the pipeline's step), so
the device only ever holds one subproblem's slices. Creating the state and
turning it into the output also go one chunk at a time.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from . import memory_kinds
from .gather import gather_chunks
from .kernels.base import accumulator_dtype
from .merge import SoftmaxState, empty_state, finalize, merge_states, rows_of
from .plan import Plan


def _memories(device=None):
    device = device or jax.devices()[0]
    return memory_kinds.sharding(device, "device"), memory_kinds.sharding(device, "pinned_host")


def _update_chunks(total, slots, count, update, device):
    """For ``j < count``: chunk ``slots[j]`` of every array of pytree `total` (chunk-major, host
    memory) is read to the device, replaced by ``update(j, chunk)`` and written back in place,
    one slot at a time."""
    on_device, host = _memories(device)

    def slot(j, total):
        c = slots[j]
        old = jax.tree.map(lambda x: jax.device_put(lax.dynamic_index_in_dim(x, c, 0, keepdims=False), on_device),
                           total)
        new = update(j, old)
        return jax.tree.map(lambda x, y: lax.dynamic_update_index_in_dim(x, jax.device_put(y, host), c, 0), total, new)

    return lax.fori_loop(0, count, slot, total)


def empty(plan: Plan, batch: int, heads: int, device=None) -> SoftmaxState:
    """The empty state of every query chunk ([C, batch, cq, heads, H] and [C, batch, heads, cq]),
    built chunk by chunk into host memory (traceable)."""
    _, host = _memories(device)
    one = lambda: empty_state(batch, plan.q_chunk, heads, plan.head_dim, accumulator_dtype(plan.dtype))

    def step(_, __):
        return None, jax.device_put(one(), host)

    _, state = lax.scan(step, None, None, length=plan.num_chunks)
    return SoftmaxState(*state)


def merge(total: SoftmaxState, part: SoftmaxState, q_slots, num_q, chunk: int, device=None) -> SoftmaxState:
    """Merges slot ``j < num_q`` of `part` ([B, M * chunk, ...] on the device) into host chunk
    ``q_slots[j]`` of `total`, in place, one slot at a time."""
    return _update_chunks(total, q_slots, num_q, lambda j, old: merge_states(old, rows_of(part, j * chunk, chunk)),
                          device)


def chunk_outputs(state: SoftmaxState, length: int, out_dtype, with_f32: bool) -> tuple[jax.Array, ...]:
    """(o in `out_dtype`, lse float32) of a state `length` rows long, and with `with_f32` o in float32."""
    o, lse = finalize(state, length)
    return (o.astype(out_dtype), lse.astype(jnp.float32)) + ((o.astype(jnp.float32),) if with_f32 else ())


def joined_outputs(plan: Plan, parts: tuple[jax.Array, ...], where) -> tuple[jax.Array, ...]:
    """Chunk-major outputs (`chunk_outputs` of every query chunk, stacked: o [C, B, cq, N, H],
    lse [C, B, N, cq]) -> o [B, T, N, H], lse [B, N, T], placed by sharding `where`."""
    seq_axes = (2, 3, 2)[: len(parts)]
    out = tuple(sequence_major(x, plan.q_len, axis) for x, axis in zip(parts, seq_axes))
    return jax.device_put(out, where)


def outputs(plan: Plan, total: SoftmaxState, out_dtype, device=None, where=None, with_f32: bool = False):
    """(o [B, T, N, H] in `out_dtype`, lse [B, N, T] float32) and, `with_f32`, o once more in
    float32 (for the backward), placed by sharding `where` (default: pinned host memory).

    `total` is the plan's state: full length on the device, or chunk-major in host memory.
    Each query chunk is finalised on the device on its own, so the device never holds
    more than one chunk of output.
    """
    on_device, host = _memories(device)
    cq = plan.q_chunk

    if plan.accumulators == "host":
        def step(_, chunk_state):
            state = SoftmaxState(*(jax.device_put(x, on_device) for x in chunk_state))
            return None, jax.device_put(chunk_outputs(state, cq, out_dtype, with_f32), host)

        _, parts = lax.scan(step, None, tuple(total))
    else:
        def step(_, c):
            return None, jax.device_put(chunk_outputs(rows_of(total, c * cq, cq), cq, out_dtype, with_f32), host)

        _, parts = lax.scan(step, None, jnp.arange(plan.num_chunks))
    return joined_outputs(plan, parts, where or host)


def sequence_major(x: jax.Array, length: int, seq_axis: int) -> jax.Array:
    """Chunk-major x [C, ..., cq (at `seq_axis`), ...] -> [..., length, ...]: the chunks joined in
    order along the sequence axis and cut to `length`. A reshape when every axis between
    the chunk axis and the sequence axis has size 1 (one example), else a transpose too."""
    c, cq = x.shape[0], x.shape[seq_axis]
    lead, rest = x.shape[1:seq_axis], x.shape[seq_axis + 1 :]
    if any(d != 1 for d in lead):
        x = jnp.moveaxis(x, 0, seq_axis - 1)
    joined = x.reshape(lead + (c * cq,) + rest)
    return lax.slice_in_dim(joined, 0, length, axis=seq_axis - 1)


# -- gradients -------------------------------------------------------------------------


def zeros(num_chunks: int, chunk_shape: tuple[int, ...], dtype, device=None) -> jax.Array:
    """Chunk-major zeros [num_chunks, *chunk_shape] in host memory, built a chunk at a time."""
    _, host = _memories(device)
    _, out = lax.scan(lambda _, __: (None, jax.device_put(jnp.zeros(chunk_shape, dtype), host)), None, None,
                      length=num_chunks)
    return out


def add(total: jax.Array, part: jax.Array, slots, count, chunk: int, device=None) -> jax.Array:
    """Adds slot ``j < count`` of `part` ([B, M * chunk, ...] on the device) to host chunk
    ``slots[j]`` of `total` ([C, B, chunk, ...]), in place, one slot at a time."""
    return _update_chunks(total, slots, count, lambda j, old: old + lax.dynamic_slice_in_dim(part, j * chunk, chunk, 1),
                          device)


def joined(x: jax.Array, length: int, dtype, device=None, where=None) -> jax.Array:
    """Chunk-major host x [C, B, chunk, ...] -> [B, length, ...] in `dtype`, cast a chunk at a time
    on the device, placed by `where` (default: pinned host memory)."""
    on_device, host = _memories(device)
    _, cast = lax.scan(lambda _, c: (None, jax.device_put(jax.device_put(c, on_device).astype(dtype), host)), None, x)
    return jax.device_put(sequence_major(cast, length, 2), where or host)


def row_dots(do: jax.Array, o: jax.Array, dlse: jax.Array, chunk: int, device=None) -> jax.Array:
    """delta [B, N, T] = rowsum(do * o) - dlse in float32, in host memory, from host-resident
    do, o [B, T, N, H] and dlse [B, N, T], a chunk of rows at a time on the device."""
    on_device, host = _memories(device)
    t = do.shape[1]
    count = -(-t // chunk)

    def step(_, c):
        ids = c[None]
        rows = lambda x, axis: gather_chunks(x, ids, chunk, axis).astype(jnp.float32)
        delta = jnp.einsum("btnh,btnh->bnt", rows(do, 1), rows(o, 1), precision=lax.Precision.HIGHEST)
        return None, jax.device_put(delta - rows(dlse, 2), host)

    _, parts = lax.scan(step, None, jnp.arange(count, dtype=jnp.int32))
    return sequence_major(parts, t, 3)
