"""The streaming planner: `plan(..., executor="stream")`.

The same search as `plan.search` (fewest chunks first, full-size tiles
before smaller ones), against the streaming executor's device model
(`memory_model.stream_footprint`: no device-resident accumulators) and over
covers that reach millions of chunks: perfect (Singer) covers and their
products. Cover sizes come from formulas; only the chosen cover is built.
"""

from __future__ import annotations

import functools

from . import memory_model, quorum, tiling
from .plan import _DENSE_CANDIDATES, STREAM_MAX_CHUNKS, _Candidate, _candidates, search


def _stream_candidates(max_chunks: int, num_chunks: int | None, depth: int | None) -> list[_Candidate]:
    """Covers for streaming plans, fewest chunks first: cyclic covers up to 64 chunks, perfect
    (Singer) covers above, and products of perfect covers (depth 2 and 3) of any size.

    Cover sizes follow from the formulas (``q + 1`` per Singer factor), so no cover is
    built until one is chosen.
    """
    if num_chunks is not None:
        return _candidates(max_chunks, num_chunks, depth)
    found = []
    singer = quorum.singer_numbers(max_chunks)
    if depth is None or depth == 1:
        for c in range(1, min(max_chunks, _DENSE_CANDIDATES) + 1):
            found.append(_Candidate(c, len(quorum.difference_cover(c)), ("cyclic", c)))
        found += [_Candidate(c, quorum.singer_q(c) + 1, ("cyclic", c)) for c in singer if c > _DENSE_CANDIDATES]
    for d in (2, 3) if depth is None else (depth,) if depth > 1 else ():
        for base in singer:
            if base**d <= max_chunks:
                found.append(_Candidate(base**d, (quorum.singer_q(base) + 1) ** d, ("product", base, d)))
    return sorted(found, key=lambda c: (c.num_chunks, c.cover_size))


def _stream_footprint(problem, cand, rule, max_bq, max_bk):
    q_chunk, block_q = tiling.chunk_and_block(problem.q_len, cand.num_chunks, rule, max_bq)
    kv_chunk, block_kv = tiling.chunk_and_block(problem.kv_len, cand.num_chunks, rule, max_bk)
    layout = memory_model.Layout(cand.num_chunks, cand.cover_size, cand.cover_size, q_chunk, kv_chunk, block_q, block_kv)
    return layout, memory_model.stream_footprint(problem, layout)


@functools.lru_cache(maxsize=64)
def stream_plan_cached(problem, is_causal, window, budget, forced, implementation, block_q, block_kv):
    """The streaming planner: `plan.search` over `_stream_candidates`, against
    `memory_model.stream_footprint` (no device-resident accumulators)."""
    if problem.dtype == "float64":
        raise TypeError("executor='stream' supports bfloat16, float16 and float32 inputs, got float64")
    return search(
        problem, is_causal, window, budget, forced, implementation, block_q, block_kv, "forward",
        executor="stream", max_chunks=STREAM_MAX_CHUNKS, candidates=_stream_candidates,
        footprint=lambda cand, rule, bq, bk: _stream_footprint(problem, cand, rule, bq, bk),
        what="streaming attention", hint="",
    )
