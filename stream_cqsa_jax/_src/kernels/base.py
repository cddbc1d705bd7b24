"""The kernel contract: one subproblem's gathered chunks in, partial results out.

The executor gathers the query chunks and key/value chunks of one subproblem
into contiguous arrays (slot ``j`` holds chunk ``q_chunks[j]``) and hands them,
with the subproblem's rows of the schedule tables, to a kernel:

    forward(inputs, config) -> SoftmaxState(acc [B, Lq, N, H], m [B, N, Lq], l [B, N, Lq])
    backward(inputs, do, m, l, delta, config) -> (dq [B, Lq, N, H], dk, dv [B, Lk, K, H])

``Lq = Mq * q_chunk`` and ``Lk = Mk * kv_chunk``. Outputs are in the
accumulator dtype (float32, or float64 for float64 inputs). The forward
returns the subproblem's softmax state (``merge.py``): row max ``m``,
``l = sum exp(s - m)`` and the undivided ``acc = sum exp(s - m) v``; rows
that see no key have ``m = -inf, l = 0, acc = 0``. In the backward, ``m`` and
``l`` are the *global* statistics of each query row (so ``p = exp(s - m) / l``)
and ``delta = rowsum(dO * O) - dlse``: every subproblem's gradients are exact
and simply add.

A kernel visits, for each query tile, only the key tiles of the chunk pairs
the schedule lists, trimmed to the band the static mask allows; it applies
padding, band, length and segment masks inside those tiles.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from ..masks import Band


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """Static configuration of a kernel call (hashable).

    Attributes:
      band: the static mask (real lengths, causal/window band).
      q_chunk, kv_chunk: chunk sizes in tokens.
      block_q, block_kv: tile sizes; they divide the chunk sizes.
      scale: the logit scale.
      deterministic: whether the backward must give the same bits on every
        run (else a kernel may add gradient contributions in a varying order).
    """

    band: Band
    q_chunk: int
    kv_chunk: int
    block_q: int
    block_kv: int
    scale: float
    deterministic: bool = True


class KernelInputs(NamedTuple):
    """One subproblem's operands.

    q: [B, Lq, N, H]; k, v: [B, Lk, K, H] (inputs' dtype).
    q_chunks: int32 [Mq]; kv_chunks: int32 [Mk]: global chunk id of each slot.
    pair_count: int32 [Mq]; pair_kv: int32 [Mq, P]; pair_full: bool [Mq, P]:
      for query slot j, the key/value slots it visits, and whether each
      chunk pair is visible everywhere (no band or padding mask needed).
    kv_pair_count: int32 [Mk]; kv_pair_q: int32 [Mk, P']: for key/value
      slot j, the query slots that visit it (the transposed pair lists).
    q_segment_ids: int32 [B, Lq] or None; kv_segment_ids: int32 [B, Lk] or None.
    q_lengths, kv_lengths: int32 [B] or None: real tokens per example.
    """

    q: jax.Array
    k: jax.Array
    v: jax.Array
    q_chunks: jax.Array
    kv_chunks: jax.Array
    pair_count: jax.Array
    pair_kv: jax.Array
    pair_full: jax.Array
    kv_pair_count: jax.Array
    kv_pair_q: jax.Array
    q_segment_ids: jax.Array | None = None
    kv_segment_ids: jax.Array | None = None
    q_lengths: jax.Array | None = None
    kv_lengths: jax.Array | None = None


def row_bias(m: jax.Array, l: jax.Array, base2: bool) -> jax.Array:
    """float32 like `m`: each row's bias b, so that a backward kernel's probability is
    ``p = exp(s - b)`` (``exp2`` of base-2 logits with `base2`).

    b = m + log l, in base 2 (``m log2 e + log2 l``) with `base2`; +inf for rows
    that see no key, whose probabilities are then 0 whatever their logits.
    """
    m, l = m.astype(jnp.float32), l.astype(jnp.float32)
    seen = (l > 0) & (m > -jnp.inf)
    if base2:
        bias = m * math.log2(math.e) + jnp.log2(jnp.where(seen, l, 1.0))
    else:
        bias = m + jnp.log(jnp.where(seen, l, 1.0))
    return jnp.where(seen, bias, jnp.inf)


def accumulator_dtype(dtype) -> jnp.dtype:
    """float32 for 16/32-bit inputs, float64 for float64 inputs."""
    return jnp.promote_types(dtype, jnp.float32)
