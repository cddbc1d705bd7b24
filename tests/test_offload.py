"""Query, key and value in host memory: residency from the budget, the pipeline and the in-jit scan.

Every path is checked against the float64 reference, and host-resident
inputs against the same call on device-resident ones.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from reference import as64, attention, random_inputs, rel_error

import stream_cqsa_jax as sc
from stream_cqsa_jax._src import memory_model, offload

DEVICE = jax.devices()[0]
HOST = jax.sharding.SingleDeviceSharding(DEVICE, memory_kind="pinned_host")
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


def test_gradients_of_host_inputs_are_refused_clearly():
    q, k, v = _host(*random_inputs(6, 1, 64, 64, 2, 2, 16, jnp.float32))
    loss = lambda q: jax.device_put(sc.dot_product_attention(q, k, v, implementation="xla"), DEVICE).sum()
    with pytest.raises(NotImplementedError, match="host memory are not supported yet; move them to the device"):
        jax.grad(loss)(q)


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
