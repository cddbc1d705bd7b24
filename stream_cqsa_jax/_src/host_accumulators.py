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
from .kernels.base import accumulator_dtype
from .merge import SoftmaxState, empty_state, finalize, merge_states
from .plan import Plan


def _memories(device=None):
    device = device or jax.devices()[0]
    return memory_kinds.sharding(device, "device"), memory_kinds.sharding(device, "pinned_host")


def empty(plan: Plan, device=None) -> SoftmaxState:
    """The empty state of every query chunk, built chunk by chunk into host memory (traceable)."""
    on_device, host = _memories(device)
    one = lambda: empty_state(plan.batch, plan.q_chunk, plan.num_q_heads, plan.head_dim, accumulator_dtype(plan.dtype))

    def step(_, __):
        return None, jax.device_put(one(), host)

    _, state = lax.scan(step, None, None, length=plan.num_chunks)
    return SoftmaxState(*state)


def merge(total: SoftmaxState, part: SoftmaxState, q_slots, num_q, chunk: int, device=None) -> SoftmaxState:
    """Merges slot ``j < num_q`` of `part` ([B, M * chunk, ...] on the device) into host chunk
    ``q_slots[j]`` of `total`, in place, one slot at a time."""
    on_device, host = _memories(device)

    def slot(j, total):
        c = q_slots[j]
        old = SoftmaxState(*(jax.device_put(lax.dynamic_index_in_dim(x, c, 0, keepdims=False), on_device)
                             for x in total))
        new = SoftmaxState(
            lax.dynamic_slice_in_dim(part.acc, j * chunk, chunk, 1),
            lax.dynamic_slice_in_dim(part.m, j * chunk, chunk, 2),
            lax.dynamic_slice_in_dim(part.l, j * chunk, chunk, 2),
        )
        merged = merge_states(old, new)
        return SoftmaxState(*(
            lax.dynamic_update_index_in_dim(x, jax.device_put(y, host), c, 0) for x, y in zip(total, merged)
        ))

    return lax.fori_loop(0, num_q, slot, total)


def outputs(total: SoftmaxState, length: int, out_dtype, device=None) -> tuple[jax.Array, jax.Array]:
    """(o [B, length, N, H] in `out_dtype`, lse [B, N, length] float32), both in host memory,
    finalised one chunk at a time on the device."""
    on_device, host = _memories(device)

    def step(_, chunk_state):
        state = SoftmaxState(*(jax.device_put(x, on_device) for x in chunk_state))
        o, lse = finalize(state, state.acc.shape[1])
        return None, jax.device_put((o.astype(out_dtype), lse.astype(jnp.float32)), host)

    _, (o, lse) = lax.scan(step, None, tuple(total))
    return sequence_major(o, lse, length, host)


def sequence_major(o, lse, length: int, where) -> tuple[jax.Array, jax.Array]:
    """Chunk-major o [C, B, cq, N, H] and lse [C, B, N, cq] -> o [B, length, N, H], lse [B, N, length],
    placed by sharding `where`. With one example the output is a reshape (no transpose)."""
    c, b, cq, n, h = o.shape
    o = o.reshape(1, c * cq, n, h) if b == 1 else jnp.moveaxis(o, 0, 1).reshape(b, c * cq, n, h)
    lse = jnp.moveaxis(lse, 0, 2).reshape(b, n, c * cq)
    return jax.device_put((o[:, :length], lse[:, :, :length]), where)
