"""Validation of `dot_product_attention`'s arguments, before any work starts.

Every check names the argument and what was expected. The result is a
`CallSpec` (static, hashable) plus the arrays in canonical form:
4-D inputs, int32 masks.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from . import memory_kinds
from .executor import MaskArrays
from .plan import _check_bool, dtype_name_of, normalize_window

_STRUCTURED = (
    "pass the structure instead: is_causal=True, local_window_size=(left, right), "
    "segment_ids (packed documents), query_seq_lengths / key_value_seq_lengths (padding)"
)


@dataclasses.dataclass(frozen=True)
class CallSpec:
    """Static facts about one call."""

    batch: int
    q_len: int
    kv_len: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    dtype: str
    scale: float
    is_causal: bool
    window: tuple[int, int] | None
    unbatched: bool
    host_inputs: bool = False


def _shape_of(x, name: str):
    shape, dtype = getattr(x, "shape", None), getattr(x, "dtype", None)
    if shape is None or dtype is None:
        raise TypeError(f"{name} must be an array of shape [B, T, N, H] or [T, N, H], got {type(x).__name__}")
    return tuple(shape), dtype


def _int_array(x, name: str, shape: tuple[int, ...], meaning: str):
    got, dtype = _shape_of(x, name) if hasattr(x, "shape") else (None, None)
    if got is None:
        raise TypeError(f"{name} must be an integer array of shape {list(shape)} ({meaning}), got {type(x).__name__}")
    if not jnp.issubdtype(dtype, jnp.integer):
        raise TypeError(f"{name} must be an integer array ({meaning}), got dtype {dtype}")
    if got != shape:
        raise ValueError(f"{name} must have shape {list(shape)} ({meaning}), got {list(got)}")
    return jnp.asarray(x).astype(jnp.int32)


def _residency(query, key, value) -> bool:
    """True when query, key and value all live in host memory, False when all on the device."""
    host = [memory_kinds.is_host(x) for x in (query, key, value)]
    if any(host) and not all(host):
        where = ", ".join(f"{name}: {memory_kinds.memory_kind(x) or 'device'}"
                          for name, x in zip(("query", "key", "value"), (query, key, value)))
        raise ValueError(
            f"query, key and value must all be in device memory or all in host memory, got {where}; "
            "move them with jax.device_put(x, jax.sharding.SingleDeviceSharding(device, memory_kind=...))"
        )
    return all(host)


def check_shapes_and_scale(q_shape, k_shape, scale, is_causal) -> float:
    """Checks 4-D query [B, T, N, H] and key/value [B, S, K, H] shapes against each other, the
    logit `scale` and `is_causal`; returns the scale (default ``1 / sqrt(H)``)."""
    b, t, n, h = q_shape
    kb, s, kh, kd = k_shape
    if kb != b:
        raise ValueError(f"key/value batch size {kb} must equal query's batch size {b}")
    if kd != h:
        raise ValueError(f"key/value head_dim {kd} must equal query's head_dim {h}")
    if min(b, t, s, n, kh, h) < 1:
        raise ValueError(f"query and key/value must be non-empty, got shapes {list(q_shape)} and {list(k_shape)}")
    if n % kh:
        raise ValueError(
            f"the number of query heads ({n}) must be a multiple of the number of key/value heads ({kh})"
        )
    if scale is None:
        scale = 1.0 / math.sqrt(h)
    elif isinstance(scale, (bool, np.bool_)) or not isinstance(scale, (int, float, np.integer, np.floating)):
        raise TypeError(f"scale must be a Python or NumPy real number, got {type(scale).__name__}")
    elif not math.isfinite(float(scale)):
        raise ValueError(f"scale must be finite, got {scale}")
    _check_bool("is_causal", is_causal)
    return float(scale)


def validate(
    query,
    key,
    value,
    bias,
    mask,
    *,
    scale,
    is_causal,
    local_window_size,
    segment_ids,
    query_seq_lengths,
    key_value_seq_lengths,
):
    """Returns ``(spec, q, k, v, masks)`` with 4-D arrays, or raises TypeError / ValueError."""
    if bias is not None:
        raise ValueError(f"bias: dense bias arrays are not supported (they are O(T*S)); {_STRUCTURED}")
    if mask is not None:
        raise ValueError(f"mask: dense mask arrays are not supported (they are O(T*S)); {_STRUCTURED}")
    (q_shape, q_dtype), (k_shape, k_dtype), (v_shape, v_dtype) = (
        _shape_of(query, "query"),
        _shape_of(key, "key"),
        _shape_of(value, "value"),
    )
    host = _residency(query, key, value)
    if len(q_shape) not in (3, 4):
        raise ValueError(f"query must have rank 4 [B, T, N, H] or 3 [T, N, H], got shape {list(q_shape)}")
    for name, shape in (("key", k_shape), ("value", v_shape)):
        if len(shape) != len(q_shape):
            raise ValueError(
                f"{name} must have the same rank as query ({len(q_shape)}): expected "
                f"{'[B, S, K, H]' if len(q_shape) == 4 else '[S, K, H]'}, got shape {list(shape)}"
            )
    for name, dtype in (("query", q_dtype), ("key", k_dtype), ("value", v_dtype)):
        if not jnp.issubdtype(dtype, jnp.floating):
            raise TypeError(f"{name} must be a floating array (bfloat16, float16, float32, float64), got {dtype}")
        dtype_name_of(dtype)
    if not (q_dtype == k_dtype == v_dtype):
        raise TypeError(f"query, key and value must share one dtype, got {q_dtype}, {k_dtype}, {v_dtype}")
    if k_shape != v_shape:
        raise ValueError(f"key and value must have the same shape, got {list(k_shape)} and {list(v_shape)}")
    unbatched = len(q_shape) == 3
    if unbatched:
        q_shape, k_shape = (1,) + q_shape, (1,) + k_shape
    b, t, n, h = q_shape
    s, kh = k_shape[1], k_shape[2]
    scale = check_shapes_and_scale(q_shape, k_shape, scale, is_causal)
    window = normalize_window(local_window_size)

    lead = () if unbatched else (b,)
    q_ids = kv_ids = None
    if segment_ids is not None:
        if isinstance(segment_ids, (tuple, list)):
            if len(segment_ids) != 2:
                raise ValueError("segment_ids must be an array [B, T] or a pair (q_ids [B, T], kv_ids [B, S])")
            q_ids = _int_array(segment_ids[0], "segment_ids[0]", lead + (t,), "query segment ids")
            kv_ids = _int_array(segment_ids[1], "segment_ids[1]", lead + (s,), "key/value segment ids")
        else:
            if t != s:
                raise ValueError(
                    f"segment_ids as one array needs q_len == kv_len, got {t} and {s}; "
                    "pass a pair (q_ids [B, T], kv_ids [B, S]) for cross-attention"
                )
            q_ids = kv_ids = _int_array(segment_ids, "segment_ids", lead + (t,), "segment ids")
        if unbatched:
            q_ids, kv_ids = q_ids[None], kv_ids[None]
    q_lengths = kv_lengths = None
    if query_seq_lengths is not None:
        q_lengths = _int_array(query_seq_lengths, "query_seq_lengths", (b,), "real query tokens per example")
    if key_value_seq_lengths is not None:
        kv_lengths = _int_array(key_value_seq_lengths, "key_value_seq_lengths", (b,), "real key tokens per example")

    if host:  # kept where they are; the out-of-core paths add the batch axis without moving them
        q, k, v = query, key, value
    else:
        q, k, v = (jnp.asarray(x) for x in (query, key, value))
        if unbatched:
            q, k, v = q[None], k[None], v[None]
    spec = CallSpec(
        b, t, s, n, kh, h, dtype_name_of(q_dtype), float(scale), bool(is_causal), window, unbatched, host
    )
    return spec, q, k, v, MaskArrays(q_ids, kv_ids, q_lengths, kv_lengths)


def check_plan_matches(plan, spec: CallSpec) -> None:
    """Raises ValueError when a user-given plan was made for another call."""
    from .plan import Plan

    if not isinstance(plan, Plan):
        raise TypeError(f"plan must be a stream_cqsa_jax.Plan (from stream_cqsa_jax.plan(...)), got {type(plan).__name__}")
    expected = {
        "batch": spec.batch,
        "q_len": spec.q_len,
        "kv_len": spec.kv_len,
        "num_q_heads": spec.num_q_heads,
        "num_kv_heads": spec.num_kv_heads,
        "head_dim": spec.head_dim,
        "dtype": spec.dtype,
        "is_causal": spec.is_causal,
        "window": spec.window,
        "pass_kind": "forward",
    }
    wrong = {name: (getattr(plan, name), want) for name, want in expected.items() if getattr(plan, name) != want}
    if wrong:
        detail = ", ".join(f"{name}: plan has {have!r}, call has {want!r}" for name, (have, want) in wrong.items())
        raise ValueError(f"plan was made for a different call ({detail})")


def check_mesh(mesh, subproblem_axis) -> str | None:
    """Validates `mesh` and `subproblem_axis`; returns the axis name (None without a mesh)."""
    from jax.sharding import Mesh

    if mesh is None:
        if subproblem_axis is not None:
            raise ValueError(f"subproblem_axis={subproblem_axis!r} needs a mesh: pass mesh=jax.sharding.Mesh(...)")
        return None
    if not isinstance(mesh, Mesh):
        raise TypeError(f"mesh must be a jax.sharding.Mesh or None, got {type(mesh).__name__}")
    names = tuple(mesh.axis_names)
    if subproblem_axis is None:
        if len(names) != 1:
            raise ValueError(
                f"subproblem_axis must name the mesh axis to spread subproblems over; the mesh has axes {names}"
            )
        return names[0]
    if not isinstance(subproblem_axis, str):
        raise TypeError(f"subproblem_axis must be a str (a mesh axis name), got {type(subproblem_axis).__name__}")
    if subproblem_axis not in names:
        raise ValueError(f"subproblem_axis={subproblem_axis!r} is not an axis of the mesh (axes: {names})")
    return subproblem_axis
