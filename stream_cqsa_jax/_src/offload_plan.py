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
from .plan import MAX_CHUNKS, STREAM_MAX_CHUNKS, Plan, _plan_cached, search
from .stream_plan import _stream_candidates


def _moved_bytes(problem: memory_model.Problem) -> int:
    """q, k, v copied to the device plus the output (and float32 lse) before it goes home."""
    p = problem
    q_row, kv_row = p.num_q_heads * p.head_dim, p.num_kv_heads * p.head_dim
    inputs = p.batch * (p.q_len * q_row + 2 * p.kv_len * kv_row) * p.itemsize
    output = p.batch * p.q_len * (q_row * p.itemsize + 4 * p.num_q_heads)
    return inputs + output


def _layout(problem, cand, rule, max_bq, max_bk) -> memory_model.Layout:
    """Chunks and tiles of candidate cover `cand`; every quorum padded to the cover size."""
    q_chunk, block_q = tiling.chunk_and_block(problem.q_len, cand.num_chunks, rule, max_bq)
    kv_chunk, block_kv = tiling.chunk_and_block(problem.kv_len, cand.num_chunks, rule, max_bk)
    m = cand.cover_size
    return memory_model.Layout(cand.num_chunks, m, m, q_chunk, kv_chunk, block_q, block_kv)


def _device_else_host(search_with) -> Plan:
    """`search_with(accumulators)` with the accumulators on the device if any plan fits so,
    else in host memory (whose error, stating the smallest budget, is the one raised)."""
    try:
        return dataclasses.replace(search_with("device"), inputs="host", accumulators="device")
    except ValueError:
        return dataclasses.replace(search_with("host"), inputs="host", accumulators="host")


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

    def search_with(accumulators):
        def footprint(cand, rule, bq, bk):
            layout = _layout(problem, cand, rule, bq, bk)
            return layout, memory_model.offload_footprint(problem, layout, accumulators)

        return search(
            problem, is_causal, window, budget, forced, implementation, block_q, block_kv, "forward",
            executor="offload", max_chunks=STREAM_MAX_CHUNKS, candidates=_stream_candidates,
            footprint=footprint, what="out-of-core attention", hint="",
        )

    return _device_else_host(search_with)


@functools.lru_cache(maxsize=64)
def offload_backward_of(fwd: Plan) -> Plan:
    """The backward plan of an out-of-core call: inputs, output and statistics in host memory,
    gradient accumulators on the device when they fit, else in host memory. Its schedule
    is built whole (the scan executor), so it has at most `plan.MAX_CHUNKS` chunks."""
    forced = (fwd.cover.moduli[0], fwd.cover.depth) if fwd.forced_chunking else (None, None)
    p = fwd.problem

    def search_with(accumulators):
        def footprint(cand, rule, bq, bk):
            layout = _layout(p, cand, rule, bq, bk)
            return layout, memory_model.offload_backward_footprint(p, layout, accumulators)

        return search(
            p, fwd.is_causal, fwd.window, fwd.memory_budget, forced, fwd.implementation, None, None, "backward",
            executor="offload", max_chunks=MAX_CHUNKS, candidates=_stream_candidates, footprint=footprint,
            what="the backward pass of out-of-core attention", hint="",
        )

    return _device_else_host(search_with)
