"""The Pallas kernels' tile geometry (kernels/block_map.py) against brute-force visibility.

The Mosaic GPU kernel cannot run on a CPU, but the walk it makes can be
checked here: for a run of query rows and a key chunk, every tile holding a
visible pair lies in the range the walk visits, tiles taken without a mask
are visible everywhere, and a compute warpgroup's own range (64 rows) clipped
to its thread block's range (128 rows) loses no visible tile. The dq kernel's
passes over windows of the key array split each walk into disjoint parts.
Thread blocks of three warpgroups (192 rows) hold every query row of chunks
of 128-row multiples once, and their rows past a chunk's end see nothing.
"""

import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from stream_cqsa_jax._src.kernels import block_map
from stream_cqsa_jax._src.kernels.base import KernelConfig, KernelInputs
from stream_cqsa_jax._src.kernels.mosaic_gpu_backward import key_windows
from stream_cqsa_jax._src.kernels.mosaic_gpu_common import QueryBlock
from stream_cqsa_jax._src.masks import Band


def _visible(band: Band, q_limit: int, kv_limit: int, q_rows: np.ndarray, k_cols: np.ndarray) -> np.ndarray:
    q, k = q_rows[:, None], k_cols[None, :]
    return np.asarray(band.visible(q, k)) & (q < q_limit) & (k < kv_limit)


def _ranges(band, q_start, rows, q_limit, kv_limit, chunk_start, block, tiles, all_masked):
    span = block_map.query_span(band, jnp.int32(q_start), rows, jnp.int32(q_limit), jnp.int32(kv_limit))
    out = block_map.tile_ranges(span, jnp.int32(chunk_start), block, tiles, all_masked)
    return [int(x) for x in out]


@settings(max_examples=40, deadline=None)
@given(
    q_len=st.integers(1, 700),
    kv_len=st.integers(1, 700),
    causal=st.booleans(),
    window=st.one_of(st.none(), st.tuples(st.integers(0, 300), st.integers(0, 300))),
    lengths=st.one_of(st.none(), st.tuples(st.integers(0, 700), st.integers(0, 700))),
    block=st.sampled_from([64, 128]),
    data=st.data(),
)
def test_walks_cover_every_visible_tile_and_skip_masks_only_where_all_is_visible(
    q_len, kv_len, causal, window, lengths, block, data
):
    band = Band.of(q_len, kv_len, causal, window)
    q_limit, kv_limit = (q_len, kv_len) if lengths is None else (min(q_len, lengths[0]), min(kv_len, lengths[1]))
    chunk = block * data.draw(st.integers(1, 3))
    tiles = chunk // block
    block_start = 128 * data.draw(st.integers(0, -(-q_len // 128)))
    chunk_start = chunk * data.draw(st.integers(0, -(-kv_len // chunk)))
    kv_tiles = [chunk_start + np.arange(kt * block, (kt + 1) * block) for kt in range(tiles)]

    shared = _ranges(band, block_start, 128, q_limit, kv_limit, chunk_start, block, tiles, all_masked=True)
    first, last = shared[0], shared[3]
    for w in range(2):  # the two compute warpgroups of a thread block
        q_rows = block_start + 64 * w + np.arange(64)
        own = _ranges(band, block_start + 64 * w, 64, q_limit, kv_limit, chunk_start, block, tiles, False)
        own_first, full_first, full_last, own_last = (min(max(x, first), last) for x in own)
        assert first <= own_first <= full_first <= full_last <= own_last <= last
        for kt, cols in enumerate(kv_tiles):
            vis = _visible(band, q_limit, kv_limit, q_rows, cols)
            if vis.any():
                assert own_first <= kt < own_last, (w, kt, own, shared)
            if full_first <= kt < full_last:
                assert vis.all(), (w, kt, own)


@settings(max_examples=30, deadline=None)
@given(
    causal=st.booleans(),
    tiles_per_chunk=st.integers(1, 3),
    chunks=st.integers(1, 4),
    pass_tiles=st.integers(1, 5),
    data=st.data(),
)
def test_key_windows_split_every_walk_into_disjoint_passes(causal, tiles_per_chunk, chunks, pass_tiles, data):
    """`QueryBlock.pair_tiles` within the windows of `key_windows`: per pair, the passes' tile ranges
    are disjoint, lie inside their windows and add up to the range of one pass over all keys."""
    block = 128
    chunk = block * tiles_per_chunk
    kv_ids = data.draw(st.permutations(range(chunks)))  # key slots hold the chunks in any order
    pairs = data.draw(st.lists(st.sampled_from(range(chunks)), min_size=1, max_size=chunks, unique=True))
    q_id = data.draw(st.integers(0, chunks - 1))
    seq = chunk * chunks
    i32 = lambda x: jnp.asarray(x, jnp.int32)
    inp = KernelInputs(
        None, None, None, i32([q_id]), i32(kv_ids), i32([len(pairs)]), i32([pairs]), jnp.zeros((1, len(pairs)), bool),
        i32(np.zeros(chunks)), i32(np.zeros((chunks, 1))), None, None, None, None,
    )
    tab, lay = block_map.pack(inp)
    cfg = KernelConfig(Band.of(seq, seq, causal, None), chunk, chunk, 128, block, 1.0)
    t = data.draw(st.integers(0, chunk // 128 - 1))  # a query tile of the slot
    key_rows = chunks * chunk
    windows = key_windows(key_rows, block * pass_tiles)
    assert len(windows) == -(-key_rows // (block * pass_tiles))
    assert (windows == [None]) == (block * pass_tiles >= key_rows)

    def ranges(window):
        qb = QueryBlock(tab, None, lay, cfg, 0, t, 128, block, window=window)
        return [tuple(int(x) for x in qb.pair_tiles(jnp.int32(p))) for p in range(len(pairs))]

    whole = ranges(None)
    parts = [ranges(w) for w in windows]
    for p, (slot, _, first, last) in enumerate(whole):
        covered = []
        for window, part in zip(windows, parts):
            _, _, lo, hi = part[p]
            assert lo <= hi
            tiles = list(range(lo, hi))
            if window is not None:
                assert all(window[0] <= slot * chunk + kt * block < window[1] for kt in tiles), (window, part[p])
            covered += tiles
        assert covered == list(range(first, last)), (p, whole[p], [part[p] for part in parts])


@settings(max_examples=30, deadline=None)
@given(
    causal=st.booleans(),
    chunk_tiles=st.integers(1, 7),
    slots=st.integers(1, 3),
    q_limit=st.one_of(st.none(), st.integers(0, 3000)),
    data=st.data(),
)
def test_three_warpgroup_tiles_cover_each_chunk_once_and_rows_past_it_see_nothing(
    causal, chunk_tiles, slots, q_limit, data
):
    """Thread blocks of three compute warpgroups (192 rows, `mosaic_gpu.Launch.warpgroups`) over chunks
    of 128-row multiples: the warpgroups inside their chunk hold each of the subproblem's query rows once,
    at the row's position; a chunk's last tile may run past its end, and its warpgroups past the end see
    no key (their span, with the limit the forward gives them, is empty) and the block walks the key tiles
    of its rows inside the chunk only."""
    block, rows, chunk = 128, 192, 128 * chunk_tiles
    chunks = slots + data.draw(st.integers(0, 2))  # the sequence's chunks; the subproblem holds `slots` of them
    q_ids = data.draw(st.permutations(range(chunks)))[:slots]
    seq = chunk * chunks
    limit = seq if q_limit is None else min(q_limit, seq)
    i32 = lambda x: jnp.asarray(x, jnp.int32)
    inp = KernelInputs(
        None, None, None, i32(q_ids), i32(range(chunks)), i32([chunks] * slots), i32([list(range(chunks))] * slots),
        jnp.zeros((slots, chunks), bool), i32(np.zeros(chunks)), i32(np.zeros((chunks, 1))), None, None, None, None,
    )
    tab, lay = block_map.pack(inp)
    band = Band.of(seq, seq, causal, None)
    cfg = KernelConfig(band, chunk, chunk, 128, block, 1.0)
    lens = i32([[limit], [seq]])  # the query length of the example, as `block_map.lengths` packs it
    per_chunk = -(-chunk // rows)
    held = {}
    for t in range(slots * per_chunk):
        qb = QueryBlock(tab, lens, lay, cfg, 0, jnp.int32(t), rows, block)
        walked = [tuple(int(x) for x in qb.pair_tiles(jnp.int32(p))) for p in range(chunks)]
        for wg in range(3):
            q_start, row0 = (int(x) for x in qb.warpgroup_rows(wg, 64))
            inside = qb.warpgroup_inside(wg, 64)
            assert (inside is None) == (chunk % rows == 0)
            inside = True if inside is None else bool(inside)
            own_limit = limit if inside else 0  # what the forward gives the warpgroup
            if not inside:
                assert bool(block_map.query_span(band, jnp.int32(q_start), 64, jnp.int32(0), jnp.int32(seq)).empty)
                continue
            for i in range(64):
                assert row0 + i not in held, (t, wg, row0 + i)
                held[row0 + i] = q_start + i
            q_rows = q_start + np.arange(64)
            for kv_slot, chunk_start, first, last in walked:
                assert chunk_start == kv_slot * chunk
                for kt in range(chunk // block):
                    cols = chunk_start + kt * block + np.arange(block)
                    if _visible(band, own_limit, seq, q_rows, cols).any():
                        assert first <= kt < last, (t, wg, kv_slot, kt, first, last)
        # The walk is that of the block's rows inside the chunk: none is walked for the rows past it.
        in_chunk = (t % per_chunk) * rows
        start = q_ids[t // per_chunk] * chunk + in_chunk
        for kv_slot, chunk_start, first, last in walked:
            valid = min(rows, chunk - in_chunk)
            alone = _ranges(band, start, valid, limit, seq, chunk_start, block, chunk // block, True)
            assert (first, last) == (alone[0], alone[3]), (t, kv_slot)
    assert sorted(held) == list(range(slots * chunk))
    assert all(held[r] == q_ids[r // chunk] * chunk + r % chunk for r in held)
