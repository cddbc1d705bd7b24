"""Query, key and value in host memory: residency from the budget, the pipeline and the in-jit scan.

Every path is checked against the float64 reference, and host-resident
inputs against the same call on device-resident ones.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from reference import as64, attention, attention_grads, random_inputs, rel_error

import stream_cqsa_jax as sc
from stream_cqsa_jax._src import memory_model, offload

DEVICE = jax.devices()[0]
HOST = jax.sharding.SingleDeviceSharding(DEVICE, memory_kind="pinned_host")
ON_DEVICE = jax.sharding.SingleDeviceSharding(DEVICE, memory_kind="device")
SHAPE = dict(q_len=1000, num_q_heads=4, num_kv_heads=2, head_dim=32)


def _host(*xs):
    return tuple(jax.device_put(x, HOST) for x in xs)


def _plan(budget, dtype="float32", **kw):
    return sc.plan(**{**SHAPE, **kw}, dtype=dtype, memory_budget=budget, executor="offload", implementation="xla")


# Budgets for this shape (float32, causal) that reach each residency; the test
# below checks the planner really picks them.
RESIDENCY_BUDGETS = {("device", "device"): "64MiB", ("host", "device"): "2MiB", ("host", "host"): "900KiB"}


def test_the_budget_decides_residency_and_the_estimate_fits_it():
    for (inputs, accumulators), budget in RESIDENCY_BUDGETS.items():
        p = _plan(budget, is_causal=True)
        assert (p.inputs, p.accumulators) == (inputs, accumulators), budget
        assert p.executor == "offload"
        assert p.estimated_peak_bytes <= p.budget_bytes
    small = _plan("900KiB", is_causal=True)
    assert small.num_chunks > _plan("2MiB", is_causal=True).num_chunks > 1
    # With device accumulators the same layout would not fit: that is why they went home.
    assert memory_model.offload_footprint(small.problem, small.stream_layout, "device").total > small.budget_bytes


def test_too_small_a_budget_states_the_smallest_that_works():
    with pytest.raises(ValueError, match=r"too small for out-of-core attention.*smallest budget that works is (\d+)"):
        _plan("300KiB", is_causal=True)
    try:
        _plan("300KiB", is_causal=True)
    except ValueError as e:
        need = int(str(e).split("smallest budget that works is ")[1].split()[0])
    assert _plan(need, is_causal=True).estimated_peak_bytes <= need


@pytest.mark.parametrize(
    "residency, causal",
    [(("device", "device"), False), (("host", "device"), True), (("host", "device"), False), (("host", "host"), True)],
)
def test_host_inputs_match_float64_and_device_inputs(residency, causal):
    q, k, v = random_inputs(1, 1, 1000, 1000, 4, 2, 32, jnp.float32)
    budget = RESIDENCY_BUDGETS[residency]
    out = sc.dot_product_attention(*_host(q, k, v), is_causal=causal, memory_budget=budget, implementation="xla")
    assert out.sharding.memory_kind == "pinned_host"  # returned where the query lives
    ref, _ = attention(q, k, v, is_causal=causal)
    assert rel_error(np.asarray(out), ref) < 2e-6
    on_device = sc.dot_product_attention(q, k, v, is_causal=causal, implementation="xla")
    np.testing.assert_allclose(np.asarray(out), np.asarray(on_device), rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("residency", [("host", "device"), ("host", "host")])
def test_inside_jit_matches_the_pipeline(residency):
    q, k, v = random_inputs(2, 1, 1000, 1000, 4, 2, 32, jnp.float32)
    budget = RESIDENCY_BUDGETS[residency]
    call = lambda q, k, v: sc.dot_product_attention(q, k, v, is_causal=True, memory_budget=budget,
                                                     implementation="xla", return_residuals=True)
    hq, hk, hv = _host(q, k, v)
    eager, eager_lse = call(hq, hk, hv)
    traced, traced_lse = jax.jit(call)(hq, hk, hv)
    assert traced.sharding.memory_kind == "pinned_host" == traced_lse.sharding.memory_kind
    ref, ref_lse = attention(q, k, v, is_causal=True)
    assert rel_error(np.asarray(traced), ref) < 2e-6
    np.testing.assert_allclose(np.asarray(traced_lse), ref_lse, rtol=1e-5, atol=1e-5)
    # The same plan and merge order: the two executors agree to the last bit.
    np.testing.assert_array_equal(np.asarray(traced), np.asarray(eager))
    np.testing.assert_array_equal(np.asarray(traced_lse), np.asarray(eager_lse))


@pytest.mark.parametrize("transfer", ["view", "split"])
def test_bfloat16_window_unbatched_odd_length(transfer, monkeypatch):
    monkeypatch.setattr(offload, "INPUT_TRANSFER", transfer)
    q, k, v = random_inputs(3, 1, 777, 777, 2, 1, 64, jnp.bfloat16)
    q, k, v = q[0], k[0], v[0]
    p = sc.plan(q_len=777, num_q_heads=2, num_kv_heads=1, head_dim=64, dtype="bfloat16",
                local_window_size=(100, 20), memory_budget="600KiB", executor="offload", implementation="xla")
    assert (p.inputs, p.accumulators) == ("host", "host") and p.num_chunks > 7
    out, lse = sc.dot_product_attention(*_host(q, k, v), local_window_size=(100, 20), plan=p,
                                        return_residuals=True)
    assert out.shape == (777, 2, 64) and lse.shape == (2, 777)
    ref, ref_lse = attention(q[None], k[None], v[None], window=(100, 20))
    assert rel_error(as64(np.asarray(out)), ref[0]) < 8e-3
    np.testing.assert_allclose(np.asarray(lse), ref_lse[0], atol=2e-2)


def test_query_lengths_leave_padded_rows_zero_and_large_logits_stay_finite():
    q, k, v = random_inputs(4, 2, 600, 600, 2, 2, 32, jnp.float32, logit_scale=30.0)
    lengths = jnp.array([600, 351], jnp.int32)
    budget = "1200KiB"
    assert _plan(budget, q_len=600, num_q_heads=2, num_kv_heads=2, batch=2).inputs == "host"
    out = sc.dot_product_attention(*_host(q, k, v), query_seq_lengths=lengths, key_value_seq_lengths=lengths,
                                   memory_budget=budget, implementation="xla")
    out = np.asarray(out)
    ref, _ = attention(q, k, v, q_lengths=np.asarray(lengths), kv_lengths=np.asarray(lengths))
    assert np.all(out[1, 351:] == 0)
    assert rel_error(out, ref) < 2e-5


def _loss(weights):
    """A loss of the output that keeps the output's cotangent random (never all ones)."""
    return lambda out: jnp.sum(jax.device_put(out, ON_DEVICE).astype(jnp.float32) * weights)


@pytest.mark.parametrize("budget", ["64MiB", "2MiB", "600KiB"])
@pytest.mark.parametrize("jit", [False, True])
def test_gradients_of_host_inputs_match_float64_and_stay_in_host_memory(budget, jit):
    q, k, v = random_inputs(8, 1, 300, 300, 4, 2, 32, jnp.float32)
    w = jnp.asarray(np.random.default_rng(9).standard_normal(q.shape), jnp.float32)
    attend = lambda q, k, v: sc.dot_product_attention(q, k, v, is_causal=True, memory_budget=budget,
                                                       implementation="xla")
    grad = jax.grad(lambda q, k, v: _loss(w)(attend(q, k, v)), argnums=(0, 1, 2))
    grads = (jax.jit(grad) if jit else grad)(*_host(q, k, v))
    assert [g.sharding.memory_kind for g in grads] == ["pinned_host"] * 3
    ref = attention_grads(q, k, v, np.asarray(w), is_causal=True)
    for g, r in zip(grads, ref):
        assert rel_error(np.asarray(g), r) < 1e-5


def test_backward_residency_follows_the_budget():
    fwd = _plan("64MiB", q_len=300, is_causal=True)
    assert fwd.backward().accumulators == "device"
    small = _plan("600KiB", q_len=300, is_causal=True).backward()
    assert (small.inputs, small.accumulators, small.pass_kind) == ("host", "host", "backward")
    assert small.estimated_peak_bytes <= small.budget_bytes
    assert "accumulators in host memory" in small.summary()


def test_gradients_with_bfloat16_windows_and_lengths():
    q, k, v = random_inputs(10, 2, 257, 257, 2, 1, 64, jnp.bfloat16)
    lengths = jnp.array([257, 131], jnp.int32)
    w = jnp.asarray(np.random.default_rng(11).standard_normal(q.shape), jnp.float32)
    kw = dict(local_window_size=(40, 0), query_seq_lengths=lengths, key_value_seq_lengths=lengths)
    attend = lambda q, k, v: sc.dot_product_attention(q, k, v, memory_budget="700KiB", implementation="xla", **kw)
    grads = jax.grad(lambda q, k, v: _loss(w)(attend(q, k, v)), argnums=(0, 1, 2))(*_host(q, k, v))
    ref = attention_grads(q, k, v, np.asarray(w), window=(40, 0), q_lengths=np.asarray(lengths),
                          kv_lengths=np.asarray(lengths))
    for g, r in zip(grads, ref):
        assert rel_error(as64(np.asarray(g)), r) < 2e-2


def test_a_plan_for_device_inputs_is_refused_for_host_inputs():
    q, k, v = _host(*random_inputs(7, 1, 64, 64, 2, 2, 16, jnp.float32))
    p = sc.plan(q_len=64, num_q_heads=2, head_dim=16, implementation="xla")
    with pytest.raises(ValueError, match="executor='scan'.*host memory; plan with executor='offload'"):
        sc.dot_product_attention(q, k, v, plan=p)


def test_summary_says_where_each_array_lives():
    host_state = _plan(RESIDENCY_BUDGETS["host", "host"], is_causal=True).summary()
    assert "out-of-core executor" in host_state
    assert "query, key, value and output in host memory; float32 accumulators in host memory" in host_state
    assert "inside jit, lax.scan reading each chunk from host memory" in host_state
    device_state = _plan(RESIDENCY_BUDGETS["host", "device"], is_causal=True).summary()
    assert "float32 accumulators on the device" in device_state
    copied = _plan(RESIDENCY_BUDGETS["device", "device"], is_causal=True).summary()
    assert "copied from host memory once" in copied


def test_gradients_of_unbatched_host_inputs_inside_jit():
    q, k, v = random_inputs(12, 1, 200, 200, 2, 2, 32, jnp.float32)
    q, k, v = q[0], k[0], v[0]
    w = jnp.asarray(np.random.default_rng(13).standard_normal(q.shape), jnp.float32)
    attend = lambda q, k, v: sc.dot_product_attention(q, k, v, memory_budget="300KiB", implementation="xla")
    assert sc.plan(q_len=200, num_q_heads=2, head_dim=32, memory_budget="300KiB", executor="offload",
                   implementation="xla").inputs == "host"
    grads = jax.jit(jax.grad(lambda q, k, v: _loss(w)(attend(q, k, v)), argnums=(0, 1, 2)))(*_host(q, k, v))
    ref = attention_grads(q[None], k[None], v[None], np.asarray(w)[None])
    for g, r in zip(grads, ref):
        assert g.shape == r.shape[1:]
        assert rel_error(np.asarray(g), r[0]) < 1e-5


def test_segment_ids_with_host_inputs_both_executors():
    q, k, v = random_inputs(14, 1, 500, 500, 2, 2, 32, jnp.float32)
    ids = jnp.asarray(np.repeat(np.arange(5), 100)[None], jnp.int32)
    budget = "900KiB"
    assert _plan(budget, q_len=500, num_q_heads=2, num_kv_heads=2).num_chunks > 1
    call = lambda q, k, v: sc.dot_product_attention(q, k, v, segment_ids=ids, memory_budget=budget,
                                                     implementation="xla")
    hq, hk, hv = _host(q, k, v)
    ref, _ = attention(q, k, v, segment_ids=(np.asarray(ids), np.asarray(ids)))
    for out in (call(hq, hk, hv), jax.jit(call)(hq, hk, hv)):
        assert rel_error(np.asarray(out), ref) < 2e-6
