"""Tile walking shared by the XLA kernels: which key tiles a query tile visits, and their masks.

For query tile ``t`` of a subproblem (rows ``t*block_q ...`` of the gathered
queries), the key tiles visited are those of the chunk pairs its slot owns,
trimmed to the key positions the band allows and to the longest real
length in the batch. Tiles that segment ids leave fully masked are skipped
at run time.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from .base import KernelConfig, KernelInputs


class QueryTile(NamedTuple):
    """Where query tile ``t`` lives: its slot, first gathered row and first global position."""

    slot: jax.Array
    row0: jax.Array
    start: jax.Array


def query_tile(inp: KernelInputs, cfg: KernelConfig, t) -> QueryTile:
    per_chunk = cfg.q_chunk // cfg.block_q
    slot = t // per_chunk
    return QueryTile(slot, t * cfg.block_q, inp.q_chunks[slot] * cfg.q_chunk + (t % per_chunk) * cfg.block_q)


def _real_limit(static_len: int, lengths: jax.Array | None) -> jax.Array:
    """Positions at or past this are padding in every example."""
    if lengths is None:
        return jnp.int32(static_len)
    return jnp.minimum(jnp.int32(static_len), jnp.max(lengths).astype(jnp.int32))


def _segment_range(ids: jax.Array | None, row0, size: int):
    if ids is None:
        return None
    tile = lax.dynamic_slice_in_dim(ids, row0, size, axis=1)
    return jnp.min(tile, axis=1), jnp.max(tile, axis=1)


def for_each_key_tile(
    inp: KernelInputs,
    cfg: KernelConfig,
    qt: QueryTile,
    body: Callable,
    state,
):
    """Folds ``state = body(state, kv_row0, kv_start)`` over the key tiles query tile `qt` visits.

    ``kv_row0`` is the tile's first row in the gathered keys and ``kv_start``
    its first global key position.
    """
    bq, bk = cfg.block_q, cfg.block_kv
    tiles = cfg.kv_chunk // bk
    q_last = jnp.minimum(qt.start + bq, _real_limit(cfg.band.q_len, inp.q_lengths)) - 1
    lo, hi = cfg.band.key_span(qt.start, q_last, jnp)
    hi = jnp.minimum(hi, _real_limit(cfg.band.kv_len, inp.kv_lengths) - 1)
    empty = (q_last < qt.start) | (hi < lo)
    q_seg = _segment_range(inp.q_segment_ids, qt.row0, bq)

    def visit(kt, state, kv_slot, chunk_start):
        kv_row0 = kv_slot * cfg.kv_chunk + kt * bk
        kv_start = chunk_start + kt * bk
        if q_seg is None:
            return body(state, kv_row0, kv_start)
        kv_seg = _segment_range(inp.kv_segment_ids, kv_row0, bk)
        # Live when, in some example, the id ranges of the two tiles meet.
        live = jnp.any((q_seg[0] <= kv_seg[1]) & (kv_seg[0] <= q_seg[1]))
        return lax.cond(live, lambda s: body(s, kv_row0, kv_start), lambda s: s, state)

    def pair(p, state):
        kv_slot = inp.pair_kv[qt.slot, p]
        chunk_start = inp.kv_chunks[kv_slot] * cfg.kv_chunk
        first = jnp.clip((lo - chunk_start) // bk, 0, tiles)
        last = jnp.clip((hi - chunk_start) // bk + 1, 0, tiles)
        last = jnp.where(empty, first, jnp.maximum(first, last))
        return lax.fori_loop(first, last, lambda kt, s: visit(kt, s, kv_slot, chunk_start), state)

    return lax.fori_loop(0, inp.pair_count[qt.slot], pair, state)


def tile_mask(inp: KernelInputs, cfg: KernelConfig, qt: QueryTile, kv_row0, kv_start) -> jax.Array:
    """bool [B or 1, block_q, block_kv]: which (query, key) pairs of the tile are visible."""
    q_pos = qt.start + jnp.arange(cfg.block_q, dtype=jnp.int32)
    kv_pos = kv_start + jnp.arange(cfg.block_kv, dtype=jnp.int32)
    mask = cfg.band.visible(q_pos[:, None], kv_pos[None, :])[None]
    if inp.q_lengths is not None:
        mask = mask & (q_pos[None, :, None] < inp.q_lengths[:, None, None])
    if inp.kv_lengths is not None:
        mask = mask & (kv_pos[None, None, :] < inp.kv_lengths[:, None, None])
    if inp.q_segment_ids is not None:
        q_ids = lax.dynamic_slice_in_dim(inp.q_segment_ids, qt.row0, cfg.block_q, axis=1)
        kv_ids = lax.dynamic_slice_in_dim(inp.kv_segment_ids, kv_row0, cfg.block_kv, axis=1)
        mask = mask & (q_ids[:, :, None] == kv_ids[:, None, :])
    return mask
