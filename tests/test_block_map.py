"""The Pallas kernels' tile geometry (kernels/block_map.py) against brute-force visibility.

The Mosaic GPU kernel cannot run on a CPU, but the walk it makes can be
checked here: for a run of query rows and a key chunk, every tile holding a
visible pair lies in the range the walk visits, tiles taken without a mask
are visible everywhere, and a compute warpgroup's own range (64 rows) clipped
to its thread block's range (128 rows) loses no visible tile. The dq kernel's
passes over windows of the key array split each walk into disjoint parts.
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
