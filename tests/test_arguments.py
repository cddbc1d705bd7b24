"""Bad input is refused before any work, with the argument named."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import stream_cqsa_jax as sc

B, T, S, N, K, H = 2, 24, 24, 4, 2, 16


def inputs(dtype=jnp.float32, t=T, s=S, n=N, kh=K, h=H, b=B):
    rng = np.random.default_rng(0)
    return (
        jnp.asarray(rng.standard_normal((b, t, n, h)), dtype),
        jnp.asarray(rng.standard_normal((b, s, kh, h)), dtype),
        jnp.asarray(rng.standard_normal((b, s, kh, h)), dtype),
    )


q, k, v = inputs()


@pytest.mark.parametrize(
    "args, kwargs, error, message",
    [
        ((q[0, 0], k, v), {}, ValueError, "query must have rank"),
        ((q, k[0], v), {}, ValueError, "key must have the same rank"),
        ((q, k, v[..., :8]), {}, ValueError, "same shape"),
        ((q, k[:1], v[:1]), {}, ValueError, "batch size"),
        ((q, k[..., :8], v[..., :8]), {}, ValueError, "head_dim"),
        ((q[:, :, :3], k, v), {}, ValueError, "multiple of the number of key/value heads"),
        ((q.astype(jnp.int32), k, v), {}, TypeError, "query must be a floating"),
        ((q, k.astype(jnp.bfloat16), v), {}, TypeError, "share one dtype"),
        (([[1.0]], k, v), {}, TypeError, "query must be an array"),
        ((q, k, v, jnp.zeros((B, N, T, S))), {}, ValueError, "bias.*is_causal=True"),
        ((q, k, v), dict(mask=jnp.ones((B, N, T, S), bool)), ValueError, "mask.*segment_ids"),
        ((q, k, v), dict(scale="big"), TypeError, "scale"),
        ((q, k, v), dict(scale=float("nan")), ValueError, "scale"),
        ((q, k, v), dict(is_causal=1), TypeError, "is_causal"),
        ((q, k, v), dict(local_window_size=(3,)), TypeError, "local_window_size"),
        ((q, k, v), dict(local_window_size=-2), ValueError, "local_window_size"),
        ((q, k, v), dict(segment_ids=np.zeros((B, T))), TypeError, "segment_ids must be an integer"),
        ((q, k, v), dict(segment_ids=np.zeros((B, T + 1), np.int32)), ValueError, "segment_ids must have shape"),
        ((q, k, v), dict(segment_ids=(np.zeros((B, T), np.int32),)), ValueError, "segment_ids must be"),
        ((q, k, v), dict(query_seq_lengths=np.zeros((B + 1,), np.int32)), ValueError, "query_seq_lengths"),
        ((q, k, v), dict(key_value_seq_lengths=np.zeros((B,), np.float32)), TypeError, "key_value_seq_lengths"),
        ((q, k, v), dict(memory_budget="fast"), ValueError, "memory_budget"),
        ((q, k, v), dict(memory_budget=0), ValueError, "memory_budget"),
        ((q, k, v), dict(memory_budget=True), TypeError, "memory_budget"),
        ((q, k, v), dict(memory_budget="1KiB"), ValueError, "smallest budget that works"),
        ((q, k, v), dict(implementation="flash"), ValueError, "implementation"),
        ((q, k, v), dict(plan="auto"), TypeError, "plan must be"),
        ((q, k, v), dict(return_residuals="yes"), TypeError, "return_residuals"),
    ],
)
def test_bad_input_names_the_argument(args, kwargs, error, message):
    with pytest.raises(error, match=message):
        sc.dot_product_attention(*args, **kwargs)


def test_segment_ids_as_one_array_need_equal_lengths():
    q2, k2, v2 = inputs(t=10, s=12)
    with pytest.raises(ValueError, match="q_len == kv_len"):
        sc.dot_product_attention(q2, k2, v2, segment_ids=np.zeros((B, 10), np.int32))


def test_plan_for_another_call_is_refused():
    p = sc.plan(q_len=T, num_q_heads=N, num_kv_heads=K, head_dim=H, batch=B, is_causal=True)
    with pytest.raises(ValueError, match="is_causal"):
        sc.dot_product_attention(q, k, v, plan=p)
    with pytest.raises(ValueError, match="q_len"):
        sc.dot_product_attention(q[:, :10], k, v, plan=p, is_causal=True)
    with pytest.raises(ValueError, match="dtype"):
        q16, k16, v16 = inputs(jnp.bfloat16)
        sc.dot_product_attention(q16, k16, v16, plan=p, is_causal=True)


def test_errors_come_before_any_work(monkeypatch):
    from stream_cqsa_jax._src import executor

    def fail(*args, **kwargs):
        raise AssertionError("work started")

    monkeypatch.setattr(executor, "forward", fail)
    with pytest.raises(ValueError, match="smallest budget"):
        sc.dot_product_attention(q, k, v, memory_budget=100)


def test_inputs_split_between_host_and_device_memory_are_refused():
    device = jax.devices()[0]
    host = jax.sharding.SingleDeviceSharding(device, memory_kind="pinned_host")
    x = jnp.ones((1, 40, 2, 16), jnp.float32)
    assert x.sharding.memory_kind in (None, "device")
    with pytest.raises(ValueError, match=r"all be in device memory or all in host memory, got query: device, "
                                         r"key: pinned_host, value: device"):
        sc.dot_product_attention(x, jax.device_put(x, host), x)
