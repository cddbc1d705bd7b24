"""Sharded execution: a plan's subproblems spread over one axis of a `jax.sharding.Mesh`.

Inside `jax.shard_map` (manual over the subproblem axis; see
`sharded_layout` for the other axes) each device runs the executor on its
own subproblems (`sharded_plan.assign`) with no communication, over the
full sequence: the inputs are whole along the sequence on every device. The
partial results are then combined once, by a ring reduce-scatter along the
sequence (`sharded_layout.ring_reduce_scatter`): each of the D devices
sends ``D - 1`` blocks of ``ceil(T / D)`` rows to its neighbour and ends up
owning one block, so the output leaves sharded along the sequence. The
forward combines with the exact softmax-state merge (``merge.merge_states``),
which needs no separate all-reduce of row maxima; the backward sums dq, dk,
dv. The backward first all-gathers the row statistics (m, l, delta) it needs
on every device, a few floats per row.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax

from . import executor
from .kernels.base import accumulator_dtype
from .merge import SoftmaxState, empty_state, finalize, merge_states
from .plan import Plan, call_shape
from .plan import plan as make_plan
from .quorum import singer_numbers
from .sharded_layout import Layout, layout_of, own_block, ring_reduce_scatter, shard_map
from .sharded_plan import assign, owned_rows
from .tiling import TILE_RULES

# Subproblems per device below which an automatic plan is re-cut (see `plan_for_devices`).
MIN_SUBPROBLEMS_PER_DEVICE = 4


def _resize_rows(state: SoftmaxState, rows: int) -> SoftmaxState:
    """`state` cut or padded (with rows that saw no key) to `rows` rows."""
    have = state.acc.shape[1]
    if have >= rows:
        return SoftmaxState(state.acc[:, :rows], state.m[:, :, :rows], state.l[:, :, :rows])
    b, _, n, h = state.acc.shape
    pad = empty_state(b, rows - have, n, h, state.acc.dtype)
    return SoftmaxState(*(jnp.concatenate([x, y], axis=ax) for x, y, ax in zip(state, pad, (1, 2, 2))))


def _pad_rows(x: jax.Array, rows: int, dim: int = 1) -> jax.Array:
    widths = [(0, 0)] * x.ndim
    widths[dim] = (0, rows - x.shape[dim])
    return jnp.pad(x, widths)


def _device_tables(plan: Plan, size: int) -> tuple[jax.Array, ...]:
    """Every device's schedule tables, [D, steps, ...] each (small; replicated)."""
    return tuple(jnp.asarray(t) for t in assign(plan, size).tables(plan.schedule))


def _mine(tables, axis: str) -> tuple[jax.Array, ...]:
    """This device's rows of `_device_tables`: [steps, ...] each."""
    index = lax.axis_index(axis)
    return tuple(lax.dynamic_index_in_dim(t, index, keepdims=False) for t in tables)


@dataclasses.dataclass(frozen=True)
class ShardedStatic:
    """Static facts of a sharded call: the plan, the scale, the mesh and its subproblem axis."""

    plan: Plan
    scale: float
    mesh: jax.sharding.Mesh
    axis: str

    def layout(self, q, k) -> Layout:
        return layout_of(self.mesh, self.axis, q, k)


def forward(static: ShardedStatic, q, k, v, masks: executor.MaskArrays):
    """Sharded forward pass.

    Returns (o [B, Tr, N, H] in the accumulator dtype, lse, m, l [B, N, Tr]),
    sharded along the sequence over the subproblem axis; ``Tr = D * ceil(T /
    D)`` and rows past T are padding.
    """
    lay = static.layout(q, k)
    plan, size, axis = static.plan, lay.size, lay.axis
    rows = size * owned_rows(q.shape[1], size)

    def body(q, k, v, masks, tables):
        state = executor.forward(plan, static.scale, q, k, v, masks, _mine(tables, axis))
        own = ring_reduce_scatter(_resize_rows(state, rows), axis, size, SoftmaxState(1, 2, 2), merge_states)
        o, lse = finalize(own, rows // size)
        return o, lse, own.m, own.l

    tok, msk = lay.tokens(), lay.masks(masks)
    in_specs = (tok, tok, tok, msk, jax.sharding.PartitionSpec())
    out_specs = (lay.tokens(True), lay.rows(True), lay.rows(True), lay.rows(True))
    args = (lay.place(q, tok), lay.place(k, tok), lay.place(v, tok))
    masks = type(masks)(*(lay.place(x, s) for x, s in zip(masks, msk)))
    return shard_map(body, lay, in_specs, out_specs)(*args, masks, _device_tables(plan, size))


def backward(static: ShardedStatic, q, k, v, masks, o, m, l, do, dlse):
    """Sharded backward pass: (dq [B, Tr, N, H], dk, dv [B, Sr, K, H]) in the accumulator dtype.

    `o`, `m`, `l` are the forward's sharded outputs ([B, Tr, N, H] and [B, N,
    Tr]); `do` [B, T, N, H] and `dlse` [B, N, T] the cotangents. The results
    are sharded along the sequence over the subproblem axis; ``Tr``, ``Sr``
    are T and S rounded up to multiples of D.
    """
    lay = static.layout(q, k)
    plan, size, axis = static.plan.backward(), lay.size, lay.axis
    t, s = q.shape[1], k.shape[1]
    q_rows, kv_rows = size * owned_rows(t, size), size * owned_rows(s, size)
    acc = accumulator_dtype(q.dtype)

    def body(q, k, v, masks, o, m, l, do, dlse, tables):
        # delta = rowsum(dO * O) - dlse for this device's rows, then every row on every device.
        do_own = own_block(_pad_rows(do, q_rows), axis, size, 1).astype(acc)
        dlse_own = own_block(_pad_rows(dlse, q_rows, 2), axis, size, 2).astype(acc)
        delta = jnp.einsum("btnh,btnh->bnt", do_own, o, precision=lax.Precision.HIGHEST) - dlse_own
        stats = [lax.all_gather(x, axis, axis=2, tiled=True)[:, :, :t] for x in (m, l, delta)]
        grads = executor.backward(plan, static.scale, q, k, v, do, *stats, masks, _mine(tables, axis))
        grads = (_pad_rows(grads[0], q_rows), _pad_rows(grads[1], kv_rows), _pad_rows(grads[2], kv_rows))
        return ring_reduce_scatter(grads, axis, size, (1, 1, 1), lambda a, b: jax.tree.map(jnp.add, a, b))

    tok, row, msk = lay.tokens(), lay.rows(), lay.masks(masks)
    in_specs = (tok, tok, tok, msk, lay.tokens(True), lay.rows(True), lay.rows(True), tok, row,
                jax.sharding.PartitionSpec())
    out_specs = (lay.tokens(True),) * 3
    args = (lay.place(q, tok), lay.place(k, tok), lay.place(v, tok))
    masks = type(masks)(*(lay.place(x, s_) for x, s_ in zip(masks, msk)))
    return shard_map(body, lay, in_specs, out_specs)(
        *args, masks, o, m, l, lay.place(do, tok), lay.place(dlse, row), _device_tables(plan, size)
    )


def _outputs(static: ShardedStatic, q, k, o, lse):
    lay, t = static.layout(q, k), q.shape[1]
    return lay.trim(o, t, 1).astype(q.dtype), lay.trim(lse, t, 2)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def attend(static: ShardedStatic, q, k, v, masks: executor.MaskArrays):
    """(out [B, T, N, H] in the inputs' dtype, lse [B, N, T]) over the mesh; see the module doc."""
    o, lse, _, _ = forward(static, q, k, v, masks)
    return _outputs(static, q, k, o, lse)


def _attend_fwd(static: ShardedStatic, q, k, v, masks):
    o, lse, m, l = forward(static, q, k, v, masks)
    # Residuals stay sharded along the sequence; O is kept in float32 as in attention._attend_fwd.
    return _outputs(static, q, k, o, lse), (q, k, v, masks, o, m, l)


def _attend_bwd(static: ShardedStatic, residuals, cotangents):
    q, k, v, masks, o, m, l = residuals
    do, dlse = cotangents
    lay, t, s = static.layout(q, k), q.shape[1], k.shape[1]
    dq, dk, dv = backward(static, q, k, v, masks, o, m, l, do, dlse)
    grads = (lay.trim(g, n, 1).astype(x.dtype) for g, n, x in ((dq, t, q), (dk, s, k), (dv, s, v)))
    dq, dk, dv = (lay.like(g, x) for g, x in zip(grads, (q, k, v)))
    return dq, dk, dv, executor.MaskArrays(*(None for _ in masks))


attend.defvjp(_attend_fwd, _attend_bwd)
attend_jit = jax.jit(attend, static_argnums=0)


def plan_for_devices(plan: Plan, num_devices: int) -> Plan:
    """An automatic plan re-cut so that `num_devices` devices all get work.

    When `plan` has fewer than ``MIN_SUBPROBLEMS_PER_DEVICE * num_devices``
    live subproblems, the same call is planned again with that many chunks
    (or the next perfect cover above 64 chunks), under the same budget. The
    original plan is kept when the sequence is too short for that many
    chunks or the new plan does not fit the budget.
    """
    want = MIN_SUBPROBLEMS_PER_DEVICE * num_devices
    if num_devices == 1 or len(plan.schedule.quorums) >= want:
        return plan
    chunks = want if want <= 64 else min((c for c in singer_numbers(4 * want) if c >= want), default=want)
    if chunks <= plan.num_chunks or chunks * TILE_RULES[plan.implementation].align > max(plan.q_len, plan.kv_len):
        return plan
    try:
        return make_plan(
            **call_shape(plan),
            memory_budget=plan.memory_budget,
            num_chunks=chunks,
            implementation=plan.implementation,
            deterministic_backward=plan.deterministic_backward,
        )
    except ValueError:
        return plan
