"""The portable Pallas kernel: block-map flash attention lowered through Triton.

One program per (query tile, batch, head) walks the key tiles of its chunk
pairs, trimmed to the band; tiles that need no mask take an unmasked path.
The backward runs two kernels and no atomics, so it is deterministic: one over
query tiles for ``dq``, one over key tiles (walking the transposed pair lists,
scores formed as [keys, queries]) for ``dk, dv``, summing the query heads of
each group. Both take each row's ``m + log l`` precomputed.

On GPU, bfloat16/float16 products run on tensor cores with float32
accumulation (probabilities are rounded to the inputs' dtype before
``p @ v``, as in every flash kernel); float32 inputs run in TF32. For float32
inputs the planner uses 16-token tiles and the kernels contract the head dim
in 16-wide slices, so every dot product sums at most 16 terms and the result
does not depend on how a backend orders long sums. On other backends the same
kernels run in Pallas interpret mode: slow, exact, and what the CPU tests
exercise.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from ..masks import Band
from ..merge import SoftmaxState
from . import block_map
from .base import KernelConfig, KernelInputs, row_bias


@dataclasses.dataclass(frozen=True)
class Launch:
    """Launch parameters of one Triton kernel.

    block_q, block_kv: the kernel's tiles, at most the plan's (powers of two,
    so they divide its chunks); None takes the plan's.
    """

    num_warps: int = 4
    num_stages: int = 2
    block_q: int | None = None
    block_kv: int | None = None

    def tiles(self, cfg: KernelConfig) -> KernelConfig:
        """`cfg` with this launch's tiles."""
        bq = cfg.block_q if self.block_q is None else min(self.block_q, cfg.block_q)
        bk = cfg.block_kv if self.block_kv is None else min(self.block_kv, cfg.block_kv)
        return dataclasses.replace(cfg, block_q=bq, block_kv=bk)

    def params(self):
        return plgpu.CompilerParams(num_warps=self.num_warps, num_stages=self.num_stages)


@dataclasses.dataclass(frozen=True)
class Tuning:
    """Launch parameters of the forward, dq and dk/dv kernels."""

    forward: Launch = Launch()
    dq: Launch = Launch()
    dkv: Launch = Launch()


# The dk/dv program stages a query tile of every query head of its group: at
# 128-row tiles, groups * head dim above this asked for more than the H200's
# 227 KiB of shared memory (2 x 128 and 4 x 64 both wanted about 300 KB), so
# the query tile shrinks in proportion.
_DKV_GROUP_WIDTH = 128


def default_tuning(head_dim: int) -> Tuning:
    """Settings measured on an H200 at 64K tokens (bench/tune_triton.py, docs/benchmarks.md)."""
    if head_dim <= 64:
        return Tuning(forward=Launch(4, 3, 128, 128), dq=Launch(4, 3, 64, 64), dkv=Launch(4, 2, 128, 64))
    return Tuning(forward=Launch(4, 2, 128, 64), dq=Launch(8, 2, 128, 64), dkv=Launch(4, 2, 64, 64))


def _interpret() -> bool:
    return jax.default_backend() != "gpu"


def _full_spec(x: jax.Array | None):
    if x is None:
        return None
    return pl.BlockSpec(x.shape, lambda *_: (0,) * x.ndim)


def _visible(band: Band, q, k, q_limit, kv_limit, q_ids, kv_ids):
    """bool: which (query, key) pairs of a tile are visible.

    `q`, `k` (positions) and `q_ids`, `kv_ids` (segment ids, or None) come
    shaped to broadcast against each other: [bq, 1] and [1, bk] for a query
    tile's scores, [1, bq] and [bk, 1] for their transpose.
    """
    left, right = band.left_bound, band.right_bound
    mask = (k < kv_limit) & (q < q_limit) & (k >= q - left) & (k <= q + right)
    if q_ids is not None:
        mask = mask & (q_ids == kv_ids)
    return mask


_SLICE = 16
_LOG2E = float(np.log2(np.e))
_LN2 = float(np.log(2.0))


def _exponent(sliced: bool) -> tuple[float, Callable]:
    """(factor, exp) for softmax exponentials.

    16-bit inputs work in base 2 (``exp2(s * log2 e)``: one multiply per
    element fewer on the GPU; the row max handed out is converted back to
    natural units once, an error far below 16-bit rounding). 32-bit inputs
    keep natural units so that merges stay exact.
    """
    return (1.0, jnp.exp) if sliced else (_LOG2E, jnp.exp2)


def _sliced(ref) -> bool:
    """Whether dot products over the head dim run in 16-wide slices (32/64-bit inputs)."""
    return jnp.dtype(ref.dtype).itemsize >= 4


def _qk(q, q_ref, q_rows: tuple, k_ref, k_rows: tuple):
    """q k^T [rows_q, rows_k] in float32 over the head dim.

    `q` is the loaded query tile, or None to read `q_ref[q_rows]` in 16-wide
    head-dim slices (see `_sliced`); `k_ref[k_rows]` is read likewise.
    """
    if q is not None:
        return plgpu.dot(q, k_ref[k_rows], trans_b=True)
    hp = q_ref.shape[-1]
    total = None
    for c in range(0, hp, _SLICE):
        cols = pl.ds(c, _SLICE)
        part = plgpu.dot(q_ref[q_rows + (cols,)], k_ref[k_rows + (cols,)], trans_b=True)
        total = part if total is None else total + part
    return total


def _pad_heads(x: jax.Array | None, hp: int) -> jax.Array | None:
    """Zero-pads the head dim (last axis) to the power of two `hp` that Triton tiles need."""
    if x is None or x.shape[-1] == hp:
        return x
    return jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, hp - x.shape[-1])])


# -- one query tile's walk over its key tiles (forward and dq kernels) ------------------


class _QueryTile(NamedTuple):
    """A query tile of this program: its slot, positions, limits and the key ranges it sees."""

    slot: jax.Array
    pos: jax.Array
    q_limit: jax.Array
    kv_limit: jax.Array
    span: block_map.Span


def _query_tile(cfg: KernelConfig, lay, tab_ref, lens_ref) -> _QueryTile:
    """The query tile of grid step (t, bi): from the packed table and the band."""
    bq, cq, band = cfg.block_q, cfg.q_chunk, cfg.band
    t, bi = pl.program_id(0), pl.program_id(1)
    per_chunk = cq // bq
    slot = block_map.div(t, per_chunk)
    q_start = tab_ref[lay.q_chunks + slot] * cq + (t - slot * per_chunk) * bq
    q_limit, kv_limit = block_map.limits(band, lens_ref, bi)
    span = block_map.query_span(band, q_start, bq, q_limit, kv_limit)
    pos = q_start + jnp.arange(bq, dtype=jnp.int32)
    return _QueryTile(slot, pos, q_limit, kv_limit, span)


def _masked(s, cfg: KernelConfig, qt: _QueryTile, q_ids, kv_ids_ref, rows, kv_start):
    """Scores `s` [bq, bk] with the pairs the band, lengths or segments hide set to -inf."""
    kv_ids = None if kv_ids_ref is None else kv_ids_ref[rows]
    kv_pos = kv_start + jnp.arange(cfg.block_kv, dtype=jnp.int32)
    if q_ids is not None:
        q_ids, kv_ids = q_ids[:, None], kv_ids[None, :]
    visible = _visible(cfg.band, qt.pos[:, None], kv_pos[None, :], qt.q_limit, qt.kv_limit, q_ids, kv_ids)
    return jnp.where(visible, s, -jnp.inf)


def _walk_key_tiles(cfg: KernelConfig, lay, tab_ref, qt: _QueryTile, all_masked: bool, tile, init):
    """Folds ``tile(kt, carry, kv_slot, chunk_start, masked)`` over every key tile the query tile
    visits, pair by pair of its slot: the tiles that need a mask, then the unmasked run, then
    masked ones again."""
    bk, ck = cfg.block_kv, cfg.kv_chunk

    def pair(p, carry):
        kv_slot = tab_ref[lay.pair_kv + qt.slot * lay.pairs + p]
        chunk_start = tab_ref[lay.kv_chunks + kv_slot] * ck
        first, ff, fl, last = block_map.tile_ranges(qt.span, chunk_start, bk, ck // bk, all_masked)
        masked = functools.partial(tile, kv_slot=kv_slot, chunk_start=chunk_start, masked=True)
        plain = functools.partial(tile, kv_slot=kv_slot, chunk_start=chunk_start, masked=False)
        carry = lax.fori_loop(first, ff, masked, carry)
        carry = lax.fori_loop(ff, fl, plain, carry)
        return lax.fori_loop(fl, last, masked, carry)

    return lax.fori_loop(0, tab_ref[lay.pair_count + qt.slot], pair, init)


def _forward_kernel(
    tab_ref, lens_ref, q_ids_ref, kv_ids_ref, q_ref, k_ref, v_ref, acc_ref, m_ref, l_ref, *, cfg, lay
):
    bk, ck = cfg.block_kv, cfg.kv_chunk
    qt = _query_tile(cfg, lay, tab_ref, lens_ref)
    hp = q_ref.shape[-1]
    sliced = _sliced(q_ref)
    base, exp = _exponent(sliced)
    q = None if sliced else q_ref[...]
    q_ids = None if q_ids_ref is None else q_ids_ref[...]

    def tile(kt, carry, kv_slot, chunk_start, masked):
        o, m, l = carry
        rows = pl.ds(kv_slot * ck + kt * bk, bk)
        s = _qk(q, q_ref, (slice(None),), k_ref, (rows,)) * (cfg.scale * base)
        if masked:
            s = _masked(s, cfg, qt, q_ids, kv_ids_ref, rows, chunk_start + kt * bk)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        m_ref_ = jnp.where(m_new == -jnp.inf, 0.0, m_new)
        p = exp(s - m_ref_[:, None])
        alpha = exp(m - m_ref_)
        v = v_ref[rows, :]
        o = alpha[:, None] * o + plgpu.dot(p.astype(v.dtype), v)
        return o, m_new, alpha * l + jnp.sum(p, axis=1)

    bq = cfg.block_q
    init = (jnp.zeros((bq, hp), jnp.float32), jnp.full((bq,), -jnp.inf, jnp.float32), jnp.zeros((bq,), jnp.float32))
    o, m, l = _walk_key_tiles(cfg, lay, tab_ref, qt, q_ids_ref is not None, tile, init)
    acc_ref[...] = o
    m_ref[...] = m if sliced else m * _LN2
    l_ref[...] = l


def forward(inp: KernelInputs, cfg: KernelConfig, tuning: Tuning | None = None) -> SoftmaxState:
    """The softmax state of one subproblem; see `base`."""
    b, lq, n, h = inp.q.shape
    lk, kh = inp.k.shape[1], inp.k.shape[2]
    g = n // kh
    launch = (tuning or default_tuning(h)).forward
    cfg = launch.tiles(cfg)
    bq, hp = cfg.block_q, block_map.pow2(h)
    tab, lay = block_map.pack(inp)
    lens = block_map.lengths(inp)
    q_spec = pl.BlockSpec((None, bq, None, hp), lambda t, bi, ni: (bi, t, ni, 0))
    kv_spec = pl.BlockSpec((None, lk, None, hp), lambda t, bi, ni: (bi, 0, ni // g, 0))
    q_ids_spec = kv_ids_spec = None
    if inp.q_segment_ids is not None:
        q_ids_spec = pl.BlockSpec((None, bq), lambda t, bi, ni: (bi, t))
        kv_ids_spec = pl.BlockSpec((None, lk), lambda t, bi, ni: (bi, 0))
    row_spec = pl.BlockSpec((None, None, bq), lambda t, bi, ni: (bi, ni, t))
    acc, m, l = pl.pallas_call(
        functools.partial(_forward_kernel, cfg=cfg, lay=lay),
        grid=(lq // bq, b, n),
        in_specs=[_full_spec(tab), _full_spec(lens), q_ids_spec, kv_ids_spec, q_spec, kv_spec, kv_spec],
        out_specs=[q_spec, row_spec, row_spec],
        out_shape=[
            jax.ShapeDtypeStruct((b, lq, n, hp), jnp.float32),
            jax.ShapeDtypeStruct((b, n, lq), jnp.float32),
            jax.ShapeDtypeStruct((b, n, lq), jnp.float32),
        ],
        compiler_params=launch.params(),
        interpret=_interpret(),
        name="stream_cqsa_forward",
    )(tab, lens, inp.q_segment_ids, inp.kv_segment_ids, *(_pad_heads(x, hp) for x in (inp.q, inp.k, inp.v)))
    return SoftmaxState(acc[..., :h], m, l)


# -- backward -------------------------------------------------------------------------


def _dq_kernel(
    tab_ref, lens_ref, q_ids_ref, kv_ids_ref, q_ref, k_ref, v_ref, do_ref, bias_ref, delta_ref, dq_ref, *, cfg, lay
):
    bq, bk, ck = cfg.block_q, cfg.block_kv, cfg.kv_chunk
    qt = _query_tile(cfg, lay, tab_ref, lens_ref)
    hp = q_ref.shape[-1]
    sliced = _sliced(q_ref)
    base, exp = _exponent(sliced)
    q = None if sliced else q_ref[...]
    do = None if sliced else do_ref[...]
    bias, delta = bias_ref[...], delta_ref[...]
    q_ids = None if q_ids_ref is None else q_ids_ref[...]

    def tile(kt, dq, kv_slot, chunk_start, masked):
        rows = pl.ds(kv_slot * ck + kt * bk, bk)
        s = _qk(q, q_ref, (slice(None),), k_ref, (rows,)) * (cfg.scale * base)
        if masked:
            s = _masked(s, cfg, qt, q_ids, kv_ids_ref, rows, chunk_start + kt * bk)
        p = exp(s - bias[:, None])
        ds = p * (_qk(do, do_ref, (slice(None),), v_ref, (rows,)) - delta[:, None])
        k = k_ref[rows, :]
        return dq + plgpu.dot(ds.astype(k.dtype), k)

    dq = _walk_key_tiles(cfg, lay, tab_ref, qt, q_ids_ref is not None, tile, jnp.zeros((bq, hp), jnp.float32))
    dq_ref[...] = dq * cfg.scale


def _dkv_kernel(
    tab_ref, lens_ref, q_ids_ref, kv_ids_ref, q_ref, k_ref, v_ref, do_ref, bias_ref, delta_ref, dk_ref, dv_ref,
    *, cfg, lay, groups,
):
    """dk, dv of one key tile. Scores are formed transposed, [keys, queries] (k q^T, v do^T), so
    that p^T and ds^T are the left operands of the products with do and q as they stand."""
    bq, bk, cq, ck = cfg.block_q, cfg.block_kv, cfg.q_chunk, cfg.kv_chunk
    band = cfg.band
    t, bi = pl.program_id(0), pl.program_id(1)
    per_chunk = ck // bk
    kv_slot = block_map.div(t, per_chunk)
    kv_start = tab_ref[lay.kv_chunks + kv_slot] * ck + (t - kv_slot * per_chunk) * bk
    q_limit, kv_limit = block_map.limits(band, lens_ref, bi)
    hp = k_ref.shape[-1]
    sliced = _sliced(k_ref)
    base, exp = _exponent(sliced)
    k = None if sliced else k_ref[...]
    v = None if sliced else v_ref[...]
    kv_ids = None if kv_ids_ref is None else kv_ids_ref[...][:, None]
    kv_pos = (kv_start + jnp.arange(bk, dtype=jnp.int32))[:, None]
    # Queries that see some key of this tile, and those that see all of them (padding keys get
    # no gradient).
    span = block_map.key_span(band, kv_start, bk, q_limit, kv_limit)

    def tile(qt, grads, q_slot, chunk_start, masked):
        dk, dv = grads
        rows = pl.ds(q_slot * cq + qt * bq, bq)
        q_pos = (chunk_start + qt * bq + jnp.arange(bq, dtype=jnp.int32))[None, :]
        q_ids = None if q_ids_ref is None else q_ids_ref[rows][None, :]
        for gi in range(groups):
            q, do = q_ref[rows, gi, :], do_ref[rows, gi, :]
            st = _qk(k, k_ref, (slice(None),), q_ref, (rows, gi)) * (cfg.scale * base)
            if masked:
                st = jnp.where(_visible(band, q_pos, kv_pos, q_limit, kv_limit, q_ids, kv_ids), st, -jnp.inf)
            pt = exp(st - bias_ref[gi, rows][None, :])
            dv = dv + plgpu.dot(pt.astype(do.dtype), do)
            dpt = _qk(v, v_ref, (slice(None),), do_ref, (rows, gi))
            dst = pt * (dpt - delta_ref[gi, rows][None, :])
            dk = dk + plgpu.dot(dst.astype(q.dtype), q)
        return dk, dv

    def visitor(i, grads):
        q_slot = tab_ref[lay.kv_pair_q + kv_slot * lay.kv_pairs + i]
        chunk_start = tab_ref[lay.q_chunks + q_slot] * cq
        first, ff, fl, last = block_map.tile_ranges(span, chunk_start, bq, cq // bq, q_ids_ref is not None)
        masked = functools.partial(tile, q_slot=q_slot, chunk_start=chunk_start, masked=True)
        plain = functools.partial(tile, q_slot=q_slot, chunk_start=chunk_start, masked=False)
        grads = lax.fori_loop(first, ff, masked, grads)
        grads = lax.fori_loop(ff, fl, plain, grads)
        return lax.fori_loop(fl, last, masked, grads)

    zeros = jnp.zeros((bk, hp), jnp.float32)
    dk, dv = lax.fori_loop(0, tab_ref[lay.kv_pair_count + kv_slot], visitor, (zeros, zeros))
    dk_ref[...], dv_ref[...] = dk * cfg.scale, dv


def backward(
    inp: KernelInputs, do, m, l, delta, cfg: KernelConfig, tuning: Tuning | None = None
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(dq [B, Lq, N, H], dk, dv [B, Lk, K, H]) float32 of one subproblem; see `base`."""
    b, lq, n, h = inp.q.shape
    lk, kh = inp.k.shape[1], inp.k.shape[2]
    g = n // kh
    hp = block_map.pow2(h)
    tuning = tuning or default_tuning(h)
    tab, lay = block_map.pack(inp)
    lens = block_map.lengths(inp)
    bias = row_bias(m, l, base2=not _sliced(inp.q))  # in the exponent's base (`_exponent`)
    delta = delta.astype(jnp.float32)
    q, k, v, do = (_pad_heads(x, hp) for x in (inp.q, inp.k, inp.v, do))

    # dq: one program per (query tile, batch, query head).
    dq_cfg = tuning.dq.tiles(cfg)
    bq = dq_cfg.block_q
    q_spec = pl.BlockSpec((None, bq, None, hp), lambda t, bi, ni: (bi, t, ni, 0))
    kv_spec = pl.BlockSpec((None, lk, None, hp), lambda t, bi, ni: (bi, 0, ni // g, 0))
    row_spec = pl.BlockSpec((None, None, bq), lambda t, bi, ni: (bi, ni, t))
    ids_specs = [None, None]
    if inp.q_segment_ids is not None:
        ids_specs = [
            pl.BlockSpec((None, bq), lambda t, bi, ni: (bi, t)),
            pl.BlockSpec((None, lk), lambda t, bi, ni: (bi, 0)),
        ]
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, cfg=dq_cfg, lay=lay),
        grid=(lq // bq, b, n),
        in_specs=[_full_spec(tab), _full_spec(lens), *ids_specs, q_spec, kv_spec, kv_spec, q_spec]
        + [row_spec] * 2,
        out_specs=q_spec,
        out_shape=jax.ShapeDtypeStruct((b, lq, n, hp), jnp.float32),
        compiler_params=tuning.dq.params(),
        interpret=_interpret(),
        name="stream_cqsa_backward_dq",
    )(tab, lens, inp.q_segment_ids, inp.kv_segment_ids, q, k, v, do, bias, delta)

    # dk, dv: one program per (key tile, batch, key/value head), over the group's query heads.
    dkv_launch = tuning.dkv
    if g * hp > _DKV_GROUP_WIDTH:  # the group's query heads share the program: shrink its query tile to fit
        share = 128 * _DKV_GROUP_WIDTH // (g * hp)
        narrow = max(16, 1 << (max(share, 1).bit_length() - 1))  # a power of two, like every tile
        dkv_launch = dataclasses.replace(dkv_launch, block_q=min(narrow, dkv_launch.block_q or cfg.block_q))
    dkv_cfg = dkv_launch.tiles(cfg)
    bk = dkv_cfg.block_kv
    group_spec = pl.BlockSpec((None, lq, g, hp), lambda t, bi, ki: (bi, 0, ki, 0))
    tile_spec = pl.BlockSpec((None, bk, None, hp), lambda t, bi, ki: (bi, t, ki, 0))
    stats_spec = pl.BlockSpec((None, g, lq), lambda t, bi, ki: (bi, ki, 0))
    if inp.q_segment_ids is not None:
        ids_specs = [
            pl.BlockSpec((None, lq), lambda t, bi, ki: (bi, 0)),
            pl.BlockSpec((None, bk), lambda t, bi, ki: (bi, t)),
        ]
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, cfg=dkv_cfg, lay=lay, groups=g),
        grid=(lk // bk, b, kh),
        in_specs=[_full_spec(tab), _full_spec(lens), *ids_specs, group_spec, tile_spec, tile_spec, group_spec]
        + [stats_spec] * 2,
        out_specs=[tile_spec, tile_spec],
        out_shape=[jax.ShapeDtypeStruct((b, lk, kh, hp), jnp.float32)] * 2,
        compiler_params=dkv_launch.params(),
        interpret=_interpret(),
        name="stream_cqsa_backward_dkv",
    )(tab, lens, inp.q_segment_ids, inp.kv_segment_ids, q, k, v, do, bias, delta)
    return dq[..., :h], dk[..., :h], dv[..., :h]
