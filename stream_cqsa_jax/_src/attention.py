"""`dot_product_attention`: validated arguments -> plan -> executor, with a custom VJP."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from . import executor, host_accumulators, memory_kinds, offload, query_rows, sharded
from .arguments import check_mesh, check_plan_matches, validate
from .kernels.base import accumulator_dtype
from .merge import finalize
from .plan import Plan, _check_bool, call_shape, plan as make_plan, resolve_implementation


@dataclasses.dataclass(frozen=True)
class _Static:
    plan: Plan
    scale: float


def _forward(static: _Static, q, k, v, masks):
    state = executor.forward(static.plan, static.scale, q, k, v, masks)
    o, lse = finalize(state, q.shape[1])
    return o, lse, state


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attend(static: _Static, q, k, v, masks: executor.MaskArrays):
    o, lse, _ = _forward(static, q, k, v, masks)
    return o.astype(q.dtype), lse


def _attend_fwd(static: _Static, q, k, v, masks):
    o, lse, state = _forward(static, q, k, v, masks)
    # Residuals: the inputs, the output in the accumulator dtype and the row
    # statistics (m, l) that make up the log-sum-exp. Both keep full float32
    # precision: delta = rowsum(dO * O) cancels where softmax rows are peaked,
    # and O rounded to bfloat16 there would double the gradients' error.
    t = q.shape[1]
    return (o.astype(q.dtype), lse), (q, k, v, masks, o, state.m[:, :, :t], state.l[:, :, :t])


def _attend_bwd(static: _Static, residuals, cotangents):
    q, k, v, masks, o, m, l = residuals
    do, dlse = cotangents
    acc = accumulator_dtype(q.dtype)
    delta = jnp.einsum("btnh,btnh->bnt", do.astype(acc), o, precision=jax.lax.Precision.HIGHEST) - dlse.astype(acc)
    dq, dk, dv = executor.backward(static.plan.backward(), static.scale, q, k, v, do, m, l, delta, masks)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), executor.MaskArrays(*(None for _ in masks))


_attend.defvjp(_attend_fwd, _attend_bwd)
_attend_jit = jax.jit(_attend, static_argnums=0)


def _add_batch(arrays, unbatched: bool):
    return tuple(x[None] for x in arrays) if unbatched else tuple(arrays)


def _host_forward(static: _Static, q, k, v, masks, unbatched: bool, with_f32: bool):
    """Query, key and value in host memory: the plan's residency picks the executor.

    Returns (out [B, T, N, H], lse [B, N, T]) in the query's memory, and with
    `with_f32` the output once more in float32 (the backward's residual).
    """
    plan, device = static.plan, memory_kinds.device_of(q)
    where = memory_kinds.sharding(device, memory_kinds.memory_kind(q))
    traced = any(isinstance(x, jax.core.Tracer) for x in (q, k, v))
    if plan.inputs == "device":  # they fit: one copy over, the device-resident executor, one copy home
        q, k, v = _add_batch(memory_kinds.to_memory((q, k, v), "device", device), unbatched)
        if not with_f32:
            return jax.device_put((_attend if traced else _attend_jit)(static, q, k, v, masks), where)
    elif plan.order == "query_rows":  # one program, traced into the caller's jit or jitted here
        if traced:
            return query_rows.attend(plan, static.scale, q, k, v, masks, where, with_f32)
        return query_rows.forward(plan, static.scale, q, k, v, masks, with_f32=with_f32)
    elif not traced:  # outside jit: the pipeline
        return offload.forward(plan, static.scale, q, k, v, masks, with_f32=with_f32)
    else:  # inside the caller's jit: the scan executor reads chunks from host memory
        q, k, v = _add_batch((q, k, v), unbatched)
    run = _scan_outputs if traced else _scan_outputs_jit
    return run(static, q, k, v, masks, where, with_f32)


def _scan_outputs(static: _Static, q, k, v, masks, where, with_f32: bool):
    state = executor.forward(static.plan, static.scale, q, k, v, masks)
    return host_accumulators.outputs(static.plan, state, q.dtype, where=where, with_f32=with_f32)


_scan_outputs_jit = jax.jit(_scan_outputs, static_argnums=(0, 5, 6))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 5))
def _attend_host(static: _Static, q, k, v, masks, unbatched: bool):
    return _host_forward(static, q, k, v, masks, unbatched, with_f32=False)


def _attend_host_fwd(static: _Static, q, k, v, masks, unbatched: bool):
    out, lse, out_f32 = _host_forward(static, q, k, v, masks, unbatched, with_f32=True)
    return (out, lse), (q, k, v, masks, out_f32, lse)


def _host_backward(static: _Static, unbatched: bool, q, k, v, masks, out_f32, lse, do, dlse):
    """(dq, dk, dv) in the inputs' dtype and memory, with the out-of-core backward plan: every
    array read from host memory a chunk at a time, gradients accumulated on the device or,
    when they do not fit, in host memory."""
    plan = static.plan.backward()
    where = memory_kinds.sharding(memory_kinds.device_of(q), memory_kinds.memory_kind(q))
    dtypes = q.dtype, k.dtype, v.dtype
    q, k, v = _add_batch((q, k, v), unbatched)
    t, s = q.shape[1], k.shape[1]
    delta = host_accumulators.row_dots(do, out_f32, dlse, plan.q_chunk)
    if plan.order == "query_rows":
        grads = query_rows.backward(plan, static.scale, q, k, v, do, lse, delta, masks, where)
        return tuple(g[0] for g in grads) if unbatched else grads
    grads = executor.backward(plan, static.scale, q, k, v, do, lse, None, delta, masks)
    if plan.accumulators == "host":
        grads = tuple(host_accumulators.joined(g, n, dtype, where=where) for g, n, dtype in zip(grads, (t, s, s), dtypes))
    else:
        grads = jax.device_put(tuple(g.astype(dtype) for g, dtype in zip(grads, dtypes)), where)
    return tuple(g[0] for g in grads) if unbatched else grads


_host_backward_jit = jax.jit(_host_backward, static_argnums=(0, 1))


def _attend_host_bwd(static: _Static, unbatched: bool, residuals, cotangents):
    q, k, v, masks, out_f32, lse = residuals
    do, dlse = cotangents
    traced = any(isinstance(x, jax.core.Tracer) for x in (q, do))
    run = _host_backward if traced else _host_backward_jit
    dq, dk, dv = run(static, unbatched, q, k, v, masks, out_f32, lse, do, dlse)
    return dq, dk, dv, executor.MaskArrays(*(None for _ in masks))


_attend_host.defvjp(_attend_host_fwd, _attend_host_bwd)


def dot_product_attention(
    query,
    key,
    value,
    bias=None,
    mask=None,
    *,
    scale: float | None = None,
    is_causal: bool = False,
    local_window_size: int | tuple[int, int] | None = None,
    segment_ids=None,
    query_seq_lengths=None,
    key_value_seq_lengths=None,
    memory_budget: int | float | str | None = None,
    plan: Plan | None = None,
    implementation: str | None = None,
    return_residuals: bool = False,
    mesh=None,
    subproblem_axis: str | None = None,
    deterministic_backward: bool = True,
):
    """Exact softmax attention, decomposed into quorum subproblems that fit a memory budget.

    Arguments, shapes and masking follow `jax.nn.dot_product_attention`:

    Args:
      query: [B, T, N, H] (or [T, N, H]).
      key, value: [B, S, K, H] (or [S, K, H]), N a multiple of K (GQA / MQA).
      bias, mask: dense [.., T, S] arrays are refused (O(T*S)); use the
        structured arguments below.
      scale: logit scale; default ``1 / sqrt(H)``.
      is_causal: query ``i`` sees keys ``j <= i`` (top-left aligned).
      local_window_size: int or (left, right): keys ``i - left <= j <= i + right``.
      segment_ids: int [B, T] (self-attention) or a pair (q_ids [B, T],
        kv_ids [B, S]): queries see keys of their own segment only.
      query_seq_lengths, key_value_seq_lengths: int [B]: real tokens per
        example; padded query rows return zeros.
      memory_budget: device bytes the call may add (int or e.g. "1.5GiB");
        default: 80% of the device's free memory.
      plan: a `Plan` from `stream_cqsa_jax.plan(...)` for exactly this call
        (it overrides `memory_budget`, `implementation` and
        `deterministic_backward`).
      implementation: kernel name: "xla" (any backend), "pallas_triton"
        (GPU, Pallas interpret mode elsewhere) or "mosaic_gpu" (forward and
        backward on compute capability 9.x, else "pallas_triton"); default: the fastest
        for the backend (`plan.summary()` says which).
      return_residuals: also return the natural-log log-sum-exp, float32
        [B, N, T] ([N, T] unbatched); its cotangent is supported.
      mesh, subproblem_axis: a `jax.sharding.Mesh` and one of its axis names
        (default: the mesh's only axis): the subproblems are spread over the
        devices along that axis and merged once; the output comes back
        sharded along the sequence over that axis (docs/multi_device.md).
      deterministic_backward: True (default): gradients with the same bits on
        every run; False allows a faster backward whose last bits vary from
        run to run where there is one (`stream_cqsa_jax.plan`).

    Returns:
      The output [B, T, N, H] in the inputs' dtype; with `return_residuals`,
      ``(output, lse)``. Rows that see no key are zeros (their lse is -inf).

    Raises:
      TypeError / ValueError before any work for malformed arguments, and
      ValueError when the budget is too small (it states the smallest one that
      works).
    """
    axis = check_mesh(mesh, subproblem_axis)
    spec, q, k, v, masks = validate(
        query,
        key,
        value,
        bias,
        mask,
        scale=scale,
        is_causal=is_causal,
        local_window_size=local_window_size,
        segment_ids=segment_ids,
        query_seq_lengths=query_seq_lengths,
        key_value_seq_lengths=key_value_seq_lengths,
    )
    if not isinstance(return_residuals, bool):
        raise TypeError(f"return_residuals must be a bool, got {return_residuals!r}")
    if spec.host_inputs and mesh is not None:
        raise ValueError(
            "mesh: query, key and value in host memory run on one device; move them to the devices of the "
            "mesh (jax.device_put with a sharding) to spread the subproblems"
        )
    executor_kind = "offload" if spec.host_inputs else "scan"
    if plan is None:
        plan = make_plan(
            **call_shape(spec),
            memory_budget=memory_budget,
            implementation=implementation,
            executor=executor_kind,
            deterministic_backward=deterministic_backward,
        )
        if mesh is not None:
            plan = sharded.plan_for_devices(plan, mesh.shape[axis])
    else:
        resolve_implementation(implementation)
        _check_bool("deterministic_backward", deterministic_backward)
        check_plan_matches(plan, spec)
        if (plan.executor == "offload") != spec.host_inputs:
            raise ValueError(
                f"plan was made with executor={plan.executor!r}, but query, key and value are in "
                f"{'host' if spec.host_inputs else 'device'} memory; plan with executor="
                f"{executor_kind!r}"
            )
    if spec.host_inputs:
        out, lse = _attend_host(_Static(plan, spec.scale), q, k, v, masks, spec.unbatched)
    elif mesh is None:
        out, lse = _attend_jit(_Static(plan, spec.scale), q, k, v, masks)
    else:
        out, lse = sharded.attend_jit(sharded.ShardedStatic(plan, spec.scale, mesh, axis), q, k, v, masks)
    if spec.unbatched:
        out, lse = out[0], lse[0]
    return (out, lse) if return_residuals else out
