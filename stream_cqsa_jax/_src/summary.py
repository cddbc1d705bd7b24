"""Human-readable description of a plan (`Plan.summary()`)."""

from __future__ import annotations

import numpy as np

from . import tiling
from .budget import format_bytes
from .devices import on_hopper


def _cover_text(cover) -> str:
    if cover.depth == 1:
        c = cover.num_chunks
        from .quorum import singer_q

        kind = "perfect (Singer) difference set" if singer_q(c) is not None else "difference cover"
        return f"Z_{c}, {kind} {{{', '.join(map(str, cover.elements))}}}"
    groups = " x ".join(f"Z_{m}" for m in cover.moduli)
    return f"{groups} (depth {cover.depth}), product cover of {cover.size} elements"


def _mask_text(plan) -> str:
    parts = []
    if plan.is_causal:
        parts.append("causal")
    if plan.window is not None:
        parts.append(f"window (left {plan.window[0]}, right {plan.window[1]})")
    return ", ".join(parts) or "none (dense)"


def _shape_lines(plan) -> list[str]:
    """The problem, masking and chunking lines every summary starts with."""
    c = plan.num_chunks
    return [
        f"  problem    : batch {plan.batch}, q_len {plan.q_len}, kv_len {plan.kv_len}, heads {plan.num_q_heads} "
        f"(kv heads {plan.num_kv_heads}), head_dim {plan.head_dim}, {plan.dtype}",
        f"  masking    : {_mask_text(plan)}",
        f"  chunks     : C = {c}: {plan.q_chunk} query / {plan.kv_chunk} key tokens per chunk "
        f"(padded lengths {plan.padded_q_len} / {plan.padded_kv_len})",
    ]


def _kernel_text(plan) -> str:
    import jax

    interpret = "" if jax.default_backend() == "gpu" else " (Pallas interpret mode on this backend)"
    if plan.implementation == "pallas_triton":
        return "pallas_triton" + interpret
    if plan.implementation == "mosaic_gpu":
        if not on_hopper():
            return f"pallas_triton{interpret} (mosaic_gpu needs compute capability 9.x)"
        if _runs_mosaic_gpu(plan):
            return "mosaic_gpu (forward and backward; calls with segment ids: pallas_triton)"
        return "pallas_triton (mosaic_gpu takes 16-bit inputs with head dim 64 or 128)"
    return plan.implementation


def _runs_mosaic_gpu(plan) -> bool:
    """Whether the plan's calls (without segment ids) run the Hopper kernels."""
    return (
        plan.implementation == "mosaic_gpu"
        and on_hopper()
        and plan.dtype in tiling.MOSAIC_GPU_DTYPES
        and plan.head_dim in tiling.MOSAIC_GPU_HEAD_DIMS
    )


def _determinism_text(plan) -> str:
    """What `deterministic_backward=False` changes in this plan's backward (nothing said when True)."""
    if plan.deterministic_backward:
        return ""
    from .kernels.mosaic_gpu_backward import default_launch

    if _runs_mosaic_gpu(plan) and default_launch(plan.head_dim, deterministic=False).fused_dq:
        return "; backward: dq added up by the dk/dv kernel, last bits may vary run to run"
    return "; backward: the same bits every run (no faster order-varying kernel for this plan)"


def describe(plan) -> str:
    host_inputs = plan.executor == "offload" and plan.inputs == "host"
    if plan.executor == "stream" or (host_inputs and (plan.pass_kind == "forward" or plan.order == "query_rows")):
        # O(C) description, no schedule tables (stream_summary.py)
        from .stream_summary import describe_stream

        return describe_stream(plan)
    sched = plan.schedule
    c = plan.num_chunks
    pairs = int(sched.pair_count.sum())
    q_used = int(np.max(np.count_nonzero(sched.pair_count, axis=1))) if sched.num_subproblems else 0
    per_sub = sched.pair_count.sum(axis=1)
    work_line = (
        f"{int(per_sub.min())}..{int(per_sub.max())} pairs per subproblem (max/mean {per_sub.max() / per_sub.mean():.2f})"
        if sched.num_subproblems
        else "nothing visible"
    )
    budget = (
        f"{format_bytes(plan.budget_bytes)} ({plan.budget_source})"
        if plan.memory_budget is None
        else f"{format_bytes(plan.memory_budget)} (memory_budget)"
    )
    if plan.reads_in_place:
        executor = "one kernel call on the inputs in place"
    elif c == 1:
        executor = "one kernel call on padded copies of the inputs"
    else:
        executor = f"lax.scan over {sched.num_subproblems} subproblems"
    lines = [
        f"Stream-CQSA plan ({plan.pass_kind} pass)",
        *_shape_lines(plan),
        f"  cover      : {_cover_text(plan.cover)}; {plan.cover.size} of {c} chunks per quorum",
        f"  subproblems: {sched.num_subproblems} live of {c}; up to {q_used} query and {sched.max_kv_slots} key "
        f"chunks each",
        f"  pairs      : {pairs} of {c * c} chunk pairs computed ({c * c - pairs} skipped by masking); {work_line}",
        f"  kernel     : {_kernel_text(plan)}, tiles {plan.block_q} x {plan.block_kv}{_determinism_text(plan)}",
        f"  executor   : {executor}, {_residency_text(plan)}",
        f"  memory     : estimated peak {format_bytes(plan.estimated_peak_bytes)} of {budget}; "
        f"accumulators {format_bytes(plan.estimated_resident_bytes)}, "
        f"per step {format_bytes(plan.estimated_peak_bytes - plan.estimated_resident_bytes)}",
    ]
    lines.append(_devices_line(plan))
    return "\n".join(lines)


def _residency_text(plan) -> str:
    if plan.executor != "offload":
        return "all arrays device-resident"
    if plan.inputs == "device":
        return "all arrays device-resident (query, key and value are copied from host memory once, the output goes back)"
    return (
        "query, key, value, dO and the row statistics read from host memory a chunk at a time; float32 gradient "
        + ("accumulators on the device" if plan.accumulators == "device" else "accumulators in host memory")
    )


def _devices_line(plan) -> str:
    """Per-device work balance when the subproblems are spread over a mesh axis (sharded_plan.py)."""
    from .sharded_plan import assign

    counts = (2, 4, 8)
    balance = " / ".join(f"{assign(plan, d).balance:.2f}" for d in counts)
    return (
        f"  devices    : work max/mean {balance} over {' / '.join(map(str, counts))} devices "
        "(mesh=..., subproblem_axis=...)"
    )
