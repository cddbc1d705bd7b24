"""Human-readable description of a streaming or out-of-core plan (`Plan.summary()` for
executor='stream', and for executor='offload' with inputs in host memory).

Everything here is O(C): such a plan may have millions of chunks, so no
schedule table is built.
"""

from __future__ import annotations

from . import memory_model
from .budget import format_bytes
from .quorum import singer_q
from .summary import _cover_text, _determinism_text, _kernel_text, _shape_lines

_SHOWN_ELEMENTS = 12


def _cover_line(cover) -> str:
    """`summary._cover_text`, with long element lists cut short."""
    if cover.depth > 1 or cover.size <= _SHOWN_ELEMENTS:
        return _cover_text(cover)
    kind = "perfect (Singer) difference set" if singer_q(cover.num_chunks) is not None else "difference cover"
    head = ", ".join(map(str, cover.elements[:_SHOWN_ELEMENTS]))
    return f"Z_{cover.num_chunks}, {kind} {{{head}, ...}} ({cover.size} elements)"


def _describe_query_rows(plan) -> str:
    """An out-of-core plan in query-row order (`query_rows.py`)."""
    from .offload_plan import moved_bytes

    c, p = plan.num_chunks, plan.problem
    pairs = plan.num_pairs
    _, kv_pair = memory_model.chunk_bytes(p, plan.stream_layout)
    row_state = p.batch * plan.q_chunk * memory_model.state_row_bytes(p)
    forward = plan.pass_kind == "forward"
    if forward:
        executor = (
            "one program (jitted outside jit, traced into the caller's inside): lax.scan over the query chunks, "
            "each looping over its pairs, key/value chunks read from host memory"
        )
        residency = "float32 state of one query chunk on the device"
    else:
        executor = (
            "lax.scan by query chunk (dq, key/value chunks read from host memory), then by key chunk (dk, dv; "
            "query chunks, dO and row statistics read from host memory)"
        )
        residency = "float32 gradients of one chunk on the device"
    lines = [
        f"Stream-CQSA plan ({plan.pass_kind} pass, out-of-core executor, query-row order)",
        *_shape_lines(plan),
        f"  cover      : Z_{c}, full cover: quorum g owns the pairs of query chunk g",
        f"  subproblems: {c} query chunks in order, each against the key chunks it sees, one chunk pair at a time",
        f"  pairs      : {pairs} of {c * c} chunk pairs computed ({c * c - pairs} skipped by masking)",
        f"  kernel     : {_kernel_text(plan)}, tiles {plan.block_q} x {plan.block_kv}{_determinism_text(plan)}",
        f"  executor   : {executor}",
        f"  memory     : estimated device peak {format_bytes(plan.estimated_peak_bytes)} of "
        f"{format_bytes(plan.budget_bytes)} ({plan.budget_source}); per pair {format_bytes(kv_pair)} of key/value "
        f"chunks" + (f", a row's state {format_bytes(row_state)}" if forward else ""),
        f"  residency  : query, key, value and output in host memory; {residency}",
    ]
    if forward:
        lines.append(f"  transfers  : about {format_bytes(moved_bytes(plan))} between host and device")
    return "\n".join(lines)


def describe_stream(plan) -> str:
    if plan.order == "query_rows":
        return _describe_query_rows(plan)
    c, m = plan.num_chunks, plan.cover.size
    pairs = plan.num_pairs
    layout = plan.stream_layout
    inputs = memory_model.stream_input_bytes(plan.problem, layout)
    partial = memory_model.stream_partial_bytes(plan.problem, layout)
    host = plan.host_footprint
    budget = (
        f"{format_bytes(plan.budget_bytes)} ({plan.budget_source})"
        if plan.memory_budget is None
        else f"{format_bytes(plan.memory_budget)} (memory_budget)"
    )
    offload = plan.executor == "offload"
    if offload:
        foot = memory_model.offload_footprint(plan.problem, layout, plan.accumulators)
        executor_line = (
            "outside jit, a pipeline: chunks sent ahead from host memory, "
            f"{memory_model.OFFLOAD_IN_FLIGHT} subproblems on the device at once, merges on the device; "
            "inside jit, lax.scan reading each chunk from host memory"
        )
        where = (
            f"float32 accumulators on the device ({format_bytes(foot.resident)})"
            if plan.accumulators == "device"
            else "float32 accumulators in host memory, visiting the device a subproblem at a time "
            "(outside jit only)"
        )
        host_line = f"  residency  : query, key, value and output in host memory; {where}"
    else:
        executor_line = (
            "Python loop; chunks read from host arrays or files and sent ahead, "
            f"{memory_model.STREAM_IN_FLIGHT} subproblems on the device at once; accumulators in host memory"
        )
        host_line = (
            f"  host       : float32 accumulators {format_bytes(host.accumulators)} (in memory, or files next to "
            f"`out` / in checkpoint_dir); buffers in flight {format_bytes(host.buffers)}"
        )
    lines = [
        f"Stream-CQSA plan (forward pass, {'out-of-core' if offload else 'streaming'} executor)",
        *_shape_lines(plan),
        f"  cover      : {_cover_line(plan.cover)}; {m} of {c} chunks per quorum",
        f"  subproblems: {c} quorums in order, one at a time; up to {m} query and {m} key chunks "
        f"({m * plan.q_chunk} / {m * plan.kv_chunk} tokens) each",
        f"  pairs      : {pairs} of {c * c} chunk pairs computed ({c * c - pairs} skipped by masking); "
        f"{pairs / c:.1f} per subproblem on average",
        f"  kernel     : {_kernel_text(plan)}, tiles {plan.block_q} x {plan.block_kv}",
        f"  executor   : {executor_line}",
        f"  memory     : estimated device peak {format_bytes(plan.estimated_peak_bytes)} of {budget}; "
        f"per subproblem {format_bytes(inputs)} of inputs and {format_bytes(partial)} of partial state",
        host_line,
    ]
    return "\n".join(lines)
