"""The query-row order of the out-of-core executor: a query chunk and its state stay on the device.

A plan with ``order="query_rows"`` (`offload_plan`) uses the full cover of
Z_G: every quorum holds every chunk and quorum ``g`` owns exactly the pairs of
query chunk ``g``, so subproblem ``g`` is query chunk ``g`` against every key
chunk it sees. That subproblem does not fit on the device at once, so it runs
one chunk pair at a time: query chunk ``g`` and its float32 softmax state stay
on the device while the key/value chunks of its visible pairs pass through
(`schedule.row_pairs`), and when the row ends its output and log-sum-exp go
home. Each key/value byte crosses the link once per query chunk that sees it,
and the softmax state never does (docs/out_of_core.md).

The pass is one program: a `lax.scan` over the query chunks, each a
`lax.fori_loop` over its pairs that reads the key/value chunks from host
memory; the finished rows are the scan's outputs, in host memory. Calls made
inside `jit` trace it into the caller's program; calls made outside run it
jitted. (A Python pipeline that sends chunks ahead from another thread, as
the quorum order uses, was slower on the H200 for this order:
docs/out_of_core.md.)
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from . import executor, memory_kinds
from .gather import gather_chunks
from .host_accumulators import chunk_outputs, joined_outputs, sequence_major
from .kernels.base import KernelInputs, accumulator_dtype
from .merge import empty_state, merge_states
from .plan import Plan
from .schedule import row_pairs


def _runs(ids: np.ndarray, num_chunks: int) -> tuple[jax.Array, jax.Array]:
    """int32 [C] start and stop of each chunk's run of pairs in `ids` (sorted chunk ids, one per pair)."""
    chunks = np.arange(num_chunks)
    return (jnp.asarray(np.searchsorted(ids, chunks, "left"), jnp.int32),
            jnp.asarray(np.searchsorted(ids, chunks, "right"), jnp.int32))


def _pair_inputs(plan: Plan, q_chunk, q_segments, g, j, full, k_chunk, v_chunk, masks) -> KernelInputs:
    """The chunk pair (query chunk ``g[0]``, key chunk ``j[0]``) as a one-slot, one-pair subproblem;
    `full` says the band leaves it unmasked."""
    one, zero = jnp.ones((1,), jnp.int32), jnp.zeros((1, 1), jnp.int32)
    return KernelInputs(
        q_chunk, k_chunk, v_chunk, g, j, one, zero, full[None, None], one, zero, q_segment_ids=q_segments,
        kv_segment_ids=gather_chunks(masks.kv_segment_ids, j, plan.kv_chunk, 1), q_lengths=masks.q_lengths,
        kv_lengths=masks.kv_lengths,
    )


def attend(plan: Plan, scale: float, q, k, v, masks: executor.MaskArrays, where, with_f32: bool = False):
    """(o [B, T, N, H] in q's dtype, lse [B, N, T] float32), and with `with_f32` o in float32,
    placed by sharding `where`, from q [B, T, N, H] and k, v [B, S, K, H] (or unbatched) in host
    memory. Traceable."""
    q, k, v = (x[None] if x.ndim == 3 else x for x in (q, k, v))
    kernel = executor._KERNELS[plan.implementation]
    cfg = executor.kernel_config(plan, scale)
    host = memory_kinds.sharding(jax.devices()[0], "pinned_host")
    cq, ck = plan.q_chunk, plan.kv_chunk
    q_ids, kv_ids, full = row_pairs(plan)
    starts, stops = _runs(q_ids, plan.num_chunks)
    kv_ids, full = jnp.asarray(kv_ids), jnp.asarray(full)
    empty = empty_state(plan.batch, cq, plan.num_q_heads, plan.head_dim, accumulator_dtype(plan.dtype))

    def row(_, g):
        slot = g[None]
        q_chunk = gather_chunks(q, slot, cq, 1)
        q_ids_chunk = gather_chunks(masks.q_segment_ids, slot, cq, 1)

        def pair(i, state):
            j = kv_ids[i][None]
            inputs = _pair_inputs(plan, q_chunk, q_ids_chunk, slot, j, full[i], gather_chunks(k, j, ck, 1),
                                  gather_chunks(v, j, ck, 1), masks)
            return merge_states(state, kernel.forward(inputs, cfg))

        state = lax.fori_loop(starts[g], stops[g], pair, empty)
        return None, jax.device_put(chunk_outputs(state, cq, q.dtype, with_f32), host)

    _, parts = lax.scan(row, None, jnp.arange(plan.num_chunks, dtype=jnp.int32))
    return joined_outputs(plan, parts, where)


def backward(plan: Plan, scale: float, q, k, v, do, lse, delta, masks: executor.MaskArrays, where):
    """(dq [B, T, N, H], dk, dv [B, S, K, H]) in the inputs' dtypes, placed by sharding `where`,
    from q, do [B, T, N, H], k, v [B, S, K, H], lse and delta [B, N, T] (float32,
    ``delta = rowsum(dO * O) - dlse``), all in host memory. Traceable.

    Two passes over the visible chunk pairs: by query chunk, each holding its dq in
    float32 on the device while the key/value chunks pass through; then by key
    chunk, each holding its dk and dv while the query chunks (with dO and the row
    statistics) pass through. Each pass uses one half of the kernel's backward
    (the other half is dead code to XLA).
    """
    kernel = executor._KERNELS[plan.implementation]
    cfg = executor.kernel_config(plan, scale)
    host = memory_kinds.sharding(jax.devices()[0], "pinned_host")
    cq, ck, acc = plan.q_chunk, plan.kv_chunk, accumulator_dtype(plan.dtype)
    b, t, n, h = q.shape
    s, kh = k.shape[1], k.shape[2]
    q_ids, kv_ids, full = row_pairs(plan)
    by_column = np.lexsort((q_ids, kv_ids))

    def query_side(g):
        """Query chunk g with its dO, log-sum-exp, ones, delta and segment ids, on the device."""
        gather = lambda x, axis: gather_chunks(x, g, cq, axis)  # noqa: E731
        m = gather(lse, 2)
        return gather(q, 1), (gather(do, 1), m, jnp.ones_like(m), gather(delta, 2)), gather(masks.q_segment_ids, 1)

    def grads(q_side, g, j, full_pair, k_chunk, v_chunk):
        q_chunk, rows, q_segments = q_side
        inputs = _pair_inputs(plan, q_chunk, q_segments, g, j, full_pair, k_chunk, v_chunk, masks)
        return kernel.backward(inputs, *rows, cfg)

    kv_pair, full_pair = jnp.asarray(kv_ids), jnp.asarray(full)
    starts, stops = _runs(q_ids, plan.num_chunks)

    def dq_row(_, g):
        q_side = query_side(g[None])

        def pair(i, dq):
            j = kv_pair[i][None]
            part = grads(q_side, g[None], j, full_pair[i], gather_chunks(k, j, ck, 1), gather_chunks(v, j, ck, 1))
            return dq + part[0]

        dq = lax.fori_loop(starts[g], stops[g], pair, jnp.zeros((b, cq, n, h), acc))
        return None, jax.device_put(dq.astype(q.dtype), host)

    col_q, col_full = jnp.asarray(q_ids[by_column]), jnp.asarray(full[by_column])
    col_starts, col_stops = _runs(kv_ids[by_column], plan.num_chunks)

    def dkv_column(_, j):
        slot = j[None]
        k_chunk, v_chunk = gather_chunks(k, slot, ck, 1), gather_chunks(v, slot, ck, 1)

        def pair(i, dkv):
            g = col_q[i][None]
            _, dk, dv = grads(query_side(g), g, slot, col_full[i], k_chunk, v_chunk)
            return dkv[0] + dk, dkv[1] + dv

        zeros = jnp.zeros((b, ck, kh, h), acc)
        dk, dv = lax.fori_loop(col_starts[j], col_stops[j], pair, (zeros, zeros))
        return None, jax.device_put((dk.astype(k.dtype), dv.astype(v.dtype)), host)

    _, dq = lax.scan(dq_row, None, jnp.arange(plan.num_chunks, dtype=jnp.int32))
    _, (dk, dv) = lax.scan(dkv_column, None, jnp.arange(plan.num_chunks, dtype=jnp.int32))
    out = (sequence_major(dq, t, 2), sequence_major(dk, s, 2), sequence_major(dv, s, 2))
    return jax.device_put(out, where)


@functools.lru_cache(maxsize=16)
def _jitted(plan: Plan, scale: float, where, with_f32: bool):
    outputs = 3 if with_f32 else 2
    run = lambda q, k, v, masks: attend(plan, scale, q, k, v, masks, where, with_f32)  # noqa: E731
    return jax.jit(run, out_shardings=(where,) * outputs)


def forward(plan: Plan, scale: float, q, k, v, masks: executor.MaskArrays, out_kind: str | None = None,
            with_f32: bool = False):
    """`attend` for a call made outside `jit`, outputs in memory `out_kind` (default: the query's)."""
    device = memory_kinds.device_of(q)
    where = memory_kinds.sharding(device, out_kind or memory_kinds.memory_kind(q))
    on_device = memory_kinds.sharding(device, "device")
    masks = executor.MaskArrays(*(None if x is None else jax.device_put(x, on_device) for x in masks))
    return _jitted(plan, float(scale), where, with_f32)(q, k, v, masks)
