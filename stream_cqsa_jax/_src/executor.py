"""The scan executor: runs a plan's subproblems with a kernel, all on one device.

Each `lax.scan` step gathers one subproblem's query and key/value chunks
(padding past the real length reads as zeros and is masked), calls the
kernel, and folds the partial results into full-length accumulators: the
forward merges softmax states (``merge.py``), the backward adds
``dq, dk, dv``. The order is static, so results are bitwise repeatable.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from . import host_accumulators, memory_kinds
from .gather import gather_chunks
from .kernels import mosaic_gpu, pallas_triton, xla as xla_kernel
from .kernels.base import KernelConfig, KernelInputs, accumulator_dtype
from .merge import SoftmaxState, empty_state, merge_states, rows_of
from .plan import Plan

_KERNELS = {"xla": xla_kernel, "pallas_triton": pallas_triton, "mosaic_gpu": mosaic_gpu}


class MaskArrays(NamedTuple):
    """The data-dependent masks of a call (each may be None).

    q_segment_ids: int32 [B, T]; kv_segment_ids: int32 [B, S];
    q_lengths, kv_lengths: int32 [B].
    """

    q_segment_ids: jax.Array | None = None
    kv_segment_ids: jax.Array | None = None
    q_lengths: jax.Array | None = None
    kv_lengths: jax.Array | None = None


def kernel_config(plan: Plan, scale: float) -> KernelConfig:
    return KernelConfig(
        plan.band, plan.q_chunk, plan.kv_chunk, plan.block_q, plan.block_kv, float(scale), plan.deterministic_backward
    )


def schedule_tables(plan: Plan, rows=None) -> tuple[jax.Array, ...]:
    """The executor's tables (see `schedule.Schedule`) for subproblems `rows`.

    Default: all subproblems in plan order. Each table has one leading row per subproblem.
    """
    sched = plan.schedule
    tables = (
        sched.q_slots,
        sched.kv_slots,
        sched.pair_count,
        sched.pair_kv,
        sched.pair_full,
        sched.kv_pair_count,
        sched.kv_pair_q,
    )
    return tuple(jnp.asarray(t if rows is None else t[rows]) for t in tables)


def _kernel_inputs(plan: Plan, row, q, k, v, masks: MaskArrays) -> KernelInputs:
    """Gathers one subproblem's chunks (`row` holds its schedule rows)."""
    q_slots, kv_slots, pair_count, pair_kv, pair_full, kv_pair_count, kv_pair_q = row
    if plan.reads_in_place and not memory_kinds.is_host(q):
        gq, gkv = (lambda x, axis=1: x), (lambda x, axis=1: x)
    else:
        gq = lambda x, axis=1: gather_chunks(x, q_slots, plan.q_chunk, axis)
        gkv = lambda x, axis=1: gather_chunks(x, kv_slots, plan.kv_chunk, axis)
    return KernelInputs(
        q=gq(q),
        k=gkv(k),
        v=gkv(v),
        q_chunks=q_slots,
        kv_chunks=kv_slots,
        pair_count=pair_count,
        pair_kv=pair_kv,
        pair_full=pair_full,
        kv_pair_count=kv_pair_count,
        kv_pair_q=kv_pair_q,
        q_segment_ids=gq(masks.q_segment_ids),
        kv_segment_ids=gkv(masks.kv_segment_ids),
        q_lengths=masks.q_lengths,
        kv_lengths=masks.kv_lengths,
    )


def _chunk(x, index, chunk, axis):
    return lax.dynamic_slice_in_dim(x, index * chunk, chunk, axis=axis)


def _put_chunk(x, value, index, chunk, axis):
    return lax.dynamic_update_slice_in_dim(x, value, index * chunk, axis=axis)


def forward(plan: Plan, scale: float, q, k, v, masks: MaskArrays, tables=None) -> SoftmaxState:
    """Exact attention as a softmax state over all keys: acc [B, Tp, N, H], m, l [B, N, Tp].

    ``Tp >= T`` is the padded length; rows past T are padding. A plan with
    host accumulators returns them chunk-major in host memory instead
    (`host_accumulators`). `tables`
    (default: every subproblem, see `schedule_tables`) selects the subproblems
    to run; the state then covers only their pairs.
    """
    kernel = _KERNELS[plan.implementation]
    cfg = kernel_config(plan, scale)
    tables = schedule_tables(plan) if tables is None else tables

    single = tables[0].shape[0] == 1 and plan.num_chunks == 1 and plan.accumulators == "device"
    if single:  # the single subproblem's state is the result
        return kernel.forward(_kernel_inputs(plan, tuple(x[0] for x in tables), q, k, v, masks), cfg)

    def step(carry, row):
        part = kernel.forward(_kernel_inputs(plan, row, q, k, v, masks), cfg)
        q_slots = row[0]
        return merge_partial(plan, carry, part, q_slots, q_slots.shape[0]), None

    total, _ = lax.scan(step, empty_accumulators(plan, q.shape[0], q.shape[2]), tables)
    return total


def empty_accumulators(plan: Plan, batch: int, heads: int, device=None) -> SoftmaxState:
    """Empty softmax accumulators for `batch` examples and `heads` query heads (a sharded call
    holds a slice of the plan's): full length [B, Tp, N, H] on the device, or chunk-major in
    host memory (`host_accumulators`) when the plan keeps them there."""
    if plan.accumulators == "host":
        return host_accumulators.empty(plan, batch, heads, device)
    return empty_state(batch, plan.padded_q_len, heads, plan.head_dim, accumulator_dtype(plan.dtype))


def merge_partial(plan: Plan, total: SoftmaxState, part: SoftmaxState, q_slots, count, device=None) -> SoftmaxState:
    """Merges query slot ``j < count`` of a subproblem's state `part` into chunk ``q_slots[j]``
    of the accumulators `total` (laid out as `empty_accumulators` makes them), in order."""
    cq = plan.q_chunk
    if plan.accumulators == "host":
        return host_accumulators.merge(total, part, q_slots, count, cq, device)

    def merge_slot(j, total: SoftmaxState):
        c = q_slots[j]
        merged = merge_states(rows_of(total, c * cq, cq), rows_of(part, j * cq, cq))
        return SoftmaxState(*(
            lax.dynamic_update_slice_in_dim(t, x, c * cq, axis) for t, x, axis in zip(total, merged, (1, 2, 2))
        ))

    return lax.fori_loop(0, count, merge_slot, total)


def backward(
    plan: Plan, scale: float, q, k, v, do, m, l, delta, masks: MaskArrays, tables=None
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Gradients (dq [B, T, N, H], dk, dv [B, S, K, H]) in the accumulator dtype.

    Only the pairs of the subproblems in `tables` (default: all) contribute.

    `m`, `l` [B, N, T] are the global softmax statistics of each query row
    (``l=None``: all ones, `m` being the log-sum-exp) and `delta` [B, N, T] is
    ``rowsum(dO * O) - dlse`` (accumulator dtype); `do` [B, T, N, H]. Any of
    the arrays may be in host memory (read a chunk at a time). A plan with
    host accumulators returns the gradients chunk-major in host memory instead
    (dq [C, B, cq, N, H], dk, dv [C, B, ck, K, H]; `host_accumulators.joined`).
    """
    kernel = _KERNELS[plan.implementation]
    cfg = kernel_config(plan, scale)
    b, t, n, h = q.shape
    s, kh = k.shape[1], k.shape[2]
    acc = accumulator_dtype(q.dtype)
    cq, ck = plan.q_chunk, plan.kv_chunk
    tables = schedule_tables(plan) if tables is None else tables

    def subproblem_grads(row):
        inputs = _kernel_inputs(plan, row, q, k, v, masks)
        if plan.reads_in_place and not memory_kinds.is_host(q):
            rows = (do, m, jnp.ones_like(m) if l is None else l, delta)
        else:
            q_slots = row[0]
            gather = lambda x, axis: gather_chunks(x, q_slots, cq, axis)
            gm = gather(m, 2)
            rows = (gather(do, 1), gm, jnp.ones_like(gm) if l is None else gather(l, 2), gather(delta, 2))
        return kernel.backward(inputs, *rows, cfg)

    single = tables[0].shape[0] == 1 and plan.num_chunks == 1 and plan.accumulators == "device"
    if single:  # the single subproblem's gradients are the result
        dq, dk, dv = subproblem_grads(tuple(x[0] for x in tables))
        return dq[:, :t], dk[:, :s], dv[:, :s]

    def step(carry, row):
        dq_part, dk_part, dv_part = subproblem_grads(row)
        q_slots, kv_slots = row[0], row[1]

        def add_q(j, dq):
            c = q_slots[j]
            return _put_chunk(dq, _chunk(dq, c, cq, 1) + _chunk(dq_part, j, cq, 1), c, cq, 1)

        def add_kv(j, grads):
            dk, dv = grads
            c = kv_slots[j]
            dk = _put_chunk(dk, _chunk(dk, c, ck, 1) + _chunk(dk_part, j, ck, 1), c, ck, 1)
            dv = _put_chunk(dv, _chunk(dv, c, ck, 1) + _chunk(dv_part, j, ck, 1), c, ck, 1)
            return dk, dv

        dq_acc, dk_acc, dv_acc = carry
        if plan.accumulators == "host":
            add = host_accumulators.add
            return (
                add(dq_acc, dq_part, q_slots, q_slots.shape[0], cq),
                add(dk_acc, dk_part, kv_slots, kv_slots.shape[0], ck),
                add(dv_acc, dv_part, kv_slots, kv_slots.shape[0], ck),
            ), None
        dq_acc = lax.fori_loop(0, q_slots.shape[0], add_q, dq_acc)
        dk_acc, dv_acc = lax.fori_loop(0, kv_slots.shape[0], add_kv, (dk_acc, dv_acc))
        return (dq_acc, dk_acc, dv_acc), None

    if plan.accumulators == "host":
        c = plan.num_chunks
        zeros = host_accumulators.zeros
        init = (zeros(c, (b, cq, n, h), acc), zeros(c, (b, ck, kh, h), acc), zeros(c, (b, ck, kh, h), acc))
        grads, _ = lax.scan(step, init, tables)
        return grads
    init = (
        jnp.zeros((b, plan.padded_q_len, n, h), acc),
        jnp.zeros((b, plan.padded_kv_len, kh, h), acc),
        jnp.zeros((b, plan.padded_kv_len, kh, h), acc),
    )
    (dq, dk, dv), _ = lax.scan(step, init, tables)
    return dq[:, :t], dk[:, :s], dv[:, :s]
