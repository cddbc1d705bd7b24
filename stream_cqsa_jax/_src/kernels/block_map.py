"""The block map as kernels read it: schedule rows packed into one int32 vector, and the
scalar geometry that turns them into tile ranges.

Pallas kernels read the subproblem's schedule rows (`base.KernelInputs`) from one
packed int32 vector in device memory; `TableLayout` holds the offsets. For a run of
query rows, `query_span` gives the key positions some row sees and those every row
sees; `tile_ranges` cuts a key chunk into the tiles before, inside and after the
fully visible run. Shared by the Triton and the Mosaic GPU kernels.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from ..masks import Band
from .base import KernelInputs


def pow2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 << max(0, (n - 1).bit_length())


@dataclasses.dataclass(frozen=True)
class TableLayout:
    """Offsets of the packed schedule rows and the static sizes a kernel needs."""

    mq: int
    mk: int
    pairs: int
    kv_pairs: int

    @property
    def q_chunks(self) -> int:
        return 0

    @property
    def kv_chunks(self) -> int:
        return self.mq

    @property
    def pair_count(self) -> int:
        return self.mq + self.mk

    @property
    def pair_kv(self) -> int:
        return 2 * self.mq + self.mk

    @property
    def kv_pair_count(self) -> int:
        return self.pair_kv + self.mq * self.pairs

    @property
    def kv_pair_q(self) -> int:
        return self.kv_pair_count + self.mk

    @property
    def size(self) -> int:
        return self.kv_pair_q + self.mk * self.kv_pairs


def pack(inp: KernelInputs) -> tuple[jax.Array, TableLayout]:
    """The schedule rows of `inp` as one int32 vector (padded to a power of two) and its layout."""
    lay = TableLayout(inp.q_chunks.shape[0], inp.kv_chunks.shape[0], inp.pair_kv.shape[1], inp.kv_pair_q.shape[1])
    parts = [inp.q_chunks, inp.kv_chunks, inp.pair_count, inp.pair_kv.reshape(-1), inp.kv_pair_count]
    parts.append(inp.kv_pair_q.reshape(-1))
    packed = jnp.concatenate([p.astype(jnp.int32) for p in parts])
    return jnp.pad(packed, (0, pow2(lay.size) - lay.size)), lay


def lengths(inp: KernelInputs) -> jax.Array | None:
    """int32 [2, pow2(B)]: query and key/value lengths per example (or None)."""
    if inp.q_lengths is None and inp.kv_lengths is None:
        return None
    b = inp.q.shape[0]
    q_len = inp.q_lengths if inp.q_lengths is not None else jnp.full((b,), 2**30, jnp.int32)
    kv_len = inp.kv_lengths if inp.kv_lengths is not None else jnp.full((b,), 2**30, jnp.int32)
    both = jnp.stack([q_len, kv_len]).astype(jnp.int32)
    return jnp.pad(both, ((0, 0), (0, pow2(b) - b)))


def div(a, b: int):
    """Floor division for non-negative int32 scalars."""
    return lax.div(a, jnp.int32(b))


def limits(band: Band, lens_ref, bi):
    """Positions at or past these are padding for example `bi`: (queries, keys)."""
    q_limit, kv_limit = jnp.int32(band.q_len), jnp.int32(band.kv_len)
    if lens_ref is not None:
        q_limit = jnp.minimum(q_limit, lens_ref[0, bi])
        kv_limit = jnp.minimum(kv_limit, lens_ref[1, bi])
    return q_limit, kv_limit


class Span(NamedTuple):
    """Keys in [lo, hi] are visible to some row of a run of query rows, keys in
    [full_lo, full_hi] to every row; `empty` when no row sees any key."""

    lo: jax.Array
    hi: jax.Array
    empty: jax.Array
    full_lo: jax.Array
    full_hi: jax.Array


def query_span(band: Band, q_start, rows: int, q_limit, kv_limit) -> Span:
    """The `Span` of query positions ``q_start .. q_start + rows - 1``."""
    q_last = jnp.minimum(q_start + rows, q_limit) - 1
    lo, hi = band.key_span(q_start, q_last, jnp)
    hi = jnp.minimum(hi, kv_limit - 1)
    empty = (q_last < q_start) | (hi < lo)
    full_lo = jnp.maximum(q_last - band.left_bound, 0)
    full_hi = jnp.minimum(q_start + band.right_bound, kv_limit - 1)
    full_hi = jnp.where(q_start + rows <= q_limit, full_hi, -1)  # padding rows must stay empty
    return Span(lo, hi, empty, full_lo, full_hi)


def key_span(band: Band, kv_start, keys: int, q_limit, kv_limit) -> Span:
    """The `Span` of key positions ``kv_start .. kv_start + keys - 1``: the query positions
    that see some (``lo .. hi``) or every (``full_lo .. full_hi``) one of them."""
    kv_last = jnp.minimum(kv_start + keys, kv_limit) - 1
    lo = jnp.maximum(kv_start - band.right_bound, 0)
    hi = jnp.minimum(kv_last + band.left_bound, q_limit - 1)
    empty = (kv_last < kv_start) | (hi < lo)
    full_lo = jnp.maximum(kv_last - band.right_bound, 0)
    full_hi = jnp.minimum(kv_start + band.left_bound, q_limit - 1)
    full_hi = jnp.where(kv_start + keys <= kv_limit, full_hi, -1)  # padding keys must stay masked
    return Span(lo, hi, empty, full_lo, full_hi)


def tile_ranges(span: Span, chunk_start, block: int, tiles: int, all_masked: bool):
    """Tiles of a chunk starting at `chunk_start` holding positions in [span.lo, span.hi]:
    (first, full_first, full_last, last).

    Tiles in [full_first, full_last) lie inside [span.full_lo, span.full_hi] and need no
    mask; with `all_masked`, none is taken as mask-free.
    """
    lo, hi, empty, full_lo, full_hi = span
    first = jnp.minimum(div(jnp.maximum(lo - chunk_start, 0), block), tiles)
    last = jnp.where(hi >= chunk_start, jnp.minimum(div(hi - chunk_start, block) + 1, tiles), 0)
    last = jnp.where(empty, first, jnp.maximum(first, last))
    if all_masked:
        return first, last, last, last
    ff = div(jnp.maximum(full_lo - chunk_start, 0) + block - 1, block)
    ff = jnp.clip(ff, first, last)
    fl = jnp.where(full_hi + 1 >= chunk_start, div(full_hi + 1 - chunk_start, block), 0)
    fl = jnp.clip(fl, ff, last)
    return first, ff, fl, last
