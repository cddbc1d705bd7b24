"""The out-of-core planner: `plan(..., executor="offload")`, for query, key and value in host memory.

It settles residency from the budget, trying in turn:

1. ``inputs="device"``: the inputs, the output and a device-resident plan
   (`plan.search` with executor "scan") all fit: the inputs are copied over
   once and the scan executor runs;
2. ``inputs="host", accumulators="device"``: chunks stream in, the float32
   softmax state of every query token stays on the device;
3. ``inputs="host", accumulators="host"``: the state lives in host memory too
   and only the slices a subproblem merges visit the device.

Cases 2 and 3 search covers like the streaming planner (fewest chunks first)
against `memory_model.offload_footprint`.
"""

from __future__ import annotations

import dataclasses
import functools

from . import budget as budget_lib
from . import memory_model, tiling
from .plan import STREAM_MAX_CHUNKS, _plan_cached, search
from .stream_plan import _stream_candidates


def _moved_bytes(problem: memory_model.Problem) -> int:
    """q, k, v copied to the device plus the output (and float32 lse) before it goes home."""
    p = problem
    q_row, kv_row = p.num_q_heads * p.head_dim, p.num_kv_heads * p.head_dim
    inputs = p.batch * (p.q_len * q_row + 2 * p.kv_len * kv_row) * p.itemsize
    output = p.batch * p.q_len * (q_row * p.itemsize + 4 * p.num_q_heads)
    return inputs + output


def _offload_footprint(problem, cand, rule, max_bq, max_bk, accumulators):
    q_chunk, block_q = tiling.chunk_and_block(problem.q_len, cand.num_chunks, rule, max_bq)
    kv_chunk, block_kv = tiling.chunk_and_block(problem.kv_len, cand.num_chunks, rule, max_bk)
    m = cand.cover_size
    layout = memory_model.Layout(cand.num_chunks, m, m, q_chunk, kv_chunk, block_q, block_kv)
    return layout, memory_model.offload_footprint(problem, layout, accumulators)


@functools.lru_cache(maxsize=64)
def offload_plan_cached(problem, is_causal, window, budget, forced, implementation, block_q, block_kv):
    """The residency and cover of an out-of-core call (see the module docstring)."""
    budget_bytes = budget if budget is not None else int(
        budget_lib.FREE_MEMORY_FRACTION * budget_lib.device_free_bytes()
    )
    if forced == (None, None):
        spare = budget_bytes - _moved_bytes(problem)
        if spare > 0:
            try:
                inner = _plan_cached(problem, is_causal, window, spare, forced, implementation, block_q, block_kv,
                                     "forward")
            except ValueError:
                inner = None
            if inner is not None:
                return dataclasses.replace(
                    inner, executor="offload", inputs="device", accumulators="device", memory_budget=budget,
                    budget_bytes=budget_bytes, budget_source="memory_budget" if budget is not None else
                    "free device memory", estimated_peak_bytes=inner.estimated_peak_bytes + _moved_bytes(problem),
                )
    failure = None
    for accumulators in ("device", "host"):
        try:
            found = search(
                problem, is_causal, window, budget, forced, implementation, block_q, block_kv, "forward",
                executor="offload", max_chunks=STREAM_MAX_CHUNKS, candidates=_stream_candidates,
                footprint=lambda cand, rule, bq, bk: _offload_footprint(problem, cand, rule, bq, bk, accumulators),
                what="out-of-core attention", hint="",
            )
        except ValueError as e:
            failure = e
            continue
        return dataclasses.replace(found, inputs="host", accumulators=accumulators)
    raise failure
