"""The out-of-core planner: `plan(..., executor="offload")`, for query, key and value in host memory.

It settles residency and order from the budget:

1. ``inputs="device"``: the inputs, the output and a device-resident plan
   (`plan.search` with executor "scan") all fit: the inputs are copied over
   once and the scan executor runs;
2. otherwise the inputs stay in host memory, and two orders compete:

   * ``order="quorums"``: the quorum subproblems one after another (covers
     searched like the streaming planner, fewest chunks first, against
     `memory_model.offload_footprint`), with the float32 softmax state of
     every query token on the device (``accumulators="device"``) or, when it
     does not fit, in host memory, where only the slices a subproblem merges
     visit the device (``accumulators="host"``);
   * ``order="query_rows"``: the full cover of Z_G walked one chunk pair at a
     time, query chunk by query chunk (`query_rows.py`; fewest chunks first,
     against `memory_model.query_rows_footprint`).

   The plan that moves fewer bytes between host and device wins
   (`moved_bytes`), unless the caller names the order.
"""

from __future__ import annotations

import dataclasses
import functools

from . import budget as budget_lib
from . import memory_model, tiling
from .plan import MAX_CHUNKS, STREAM_MAX_CHUNKS, BudgetTooSmall, Plan, _Candidate, _plan_cached, search
from .schedule import visible_pair_count
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


def _row_candidates(max_chunks: int, num_chunks: int | None, depth: int | None) -> list[_Candidate]:
    """Full covers of Z_G, fewest chunks first (the query-row order; forced chunking is not offered)."""
    return [_Candidate(g, g, ("full", g)) for g in range(1, max_chunks + 1)]


def _row_layout(problem, cand, rule, max_bq, max_bk) -> memory_model.Layout:
    """One query chunk and one key/value chunk per step."""
    q_chunk, block_q = tiling.chunk_and_block(problem.q_len, cand.num_chunks, rule, max_bq)
    kv_chunk, block_kv = tiling.chunk_and_block(problem.kv_len, cand.num_chunks, rule, max_bk)
    return memory_model.Layout(cand.num_chunks, 1, 1, q_chunk, kv_chunk, block_q, block_kv)


def _query_rows(problem, is_causal, window, budget, implementation, block_q, block_kv,
                pass_kind: str = "forward") -> Plan:
    """The query-row plan with the fewest chunks that fits (raises `BudgetTooSmall`)."""
    model = memory_model.query_rows_footprint if pass_kind == "forward" else memory_model.query_rows_backward_footprint

    def footprint(cand, rule, bq, bk):
        layout = _row_layout(problem, cand, rule, bq, bk)
        return layout, model(problem, layout)

    what = "out-of-core attention" if pass_kind == "forward" else "the backward pass of out-of-core attention"
    found = search(
        problem, is_causal, window, budget, (None, None), implementation, block_q, block_kv, pass_kind,
        executor="offload", max_chunks=MAX_CHUNKS, candidates=_row_candidates, footprint=footprint,
        what=what, hint="",
    )
    return dataclasses.replace(found, inputs="host", accumulators="device", order="query_rows")


def moved_bytes(plan: Plan) -> int:
    """Estimated host <-> device bytes of an out-of-core forward plan with inputs in host memory."""
    if plan.order == "query_rows":
        return memory_model.query_rows_moved_bytes(plan.problem, plan.stream_layout, visible_pair_count(plan))
    return memory_model.quorum_moved_bytes(plan.problem, plan.stream_layout, plan.accumulators)


def _fewer_moved_bytes(quorums, rows) -> Plan:
    """Of two searches (callables returning a plan or raising `BudgetTooSmall`), the plan that
    moves fewer bytes; when neither fits, the error of the one that needs less budget."""
    plans, errors = [], []
    for make in (quorums, rows):
        try:
            plans.append(make())
        except BudgetTooSmall as e:
            errors.append(e)
    if not plans:
        raise min(errors, key=lambda e: e.smallest)
    return min(plans, key=moved_bytes)


def _device_else_host(search_with) -> Plan:
    """`search_with(accumulators)` with the accumulators on the device if any plan fits so,
    else in host memory (whose error, stating the smallest budget, is the one raised)."""
    try:
        return dataclasses.replace(search_with("device"), inputs="host", accumulators="device")
    except BudgetTooSmall:
        return dataclasses.replace(search_with("host"), inputs="host", accumulators="host")


@functools.lru_cache(maxsize=64)
def offload_plan_cached(problem, is_causal, window, budget, forced, implementation, block_q, block_kv, order=None):
    """The residency, order and cover of an out-of-core call (see the module docstring)."""
    if order == "query_rows" and forced != (None, None):
        raise ValueError("order='query_rows' chooses its own chunks; leave num_chunks and depth unset")
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

    quorums = lambda: _device_else_host(search_with)  # noqa: E731
    rows = lambda: _query_rows(problem, is_causal, window, budget, implementation, block_q, block_kv)  # noqa: E731
    if order == "quorums" or forced != (None, None):
        return quorums()
    if order == "query_rows":
        return rows()
    return _fewer_moved_bytes(quorums, rows)


@functools.lru_cache(maxsize=64)
def offload_backward_of(fwd: Plan) -> Plan:
    """The backward plan of an out-of-core call: inputs, output and statistics in host memory.
    A forward in query-row order gets a backward in query-row order (`query_rows.backward`)
    if one fits; otherwise the quorum subproblems run in the scan executor with the gradient
    accumulators on the device when they fit, else in host memory (the schedule is built
    whole, so at most `plan.MAX_CHUNKS` chunks)."""
    forced = (fwd.cover.moduli[0], fwd.cover.depth) if fwd.forced_chunking else (None, None)
    p = fwd.problem
    if fwd.order == "query_rows":
        try:
            return _query_rows(p, fwd.is_causal, fwd.window, fwd.memory_budget, fwd.implementation, None, None,
                               "backward")
        except BudgetTooSmall:
            pass

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
