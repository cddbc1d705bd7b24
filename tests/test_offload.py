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
from stream_cqsa_jax._src import memory_model, offload, offload_plan

DEVICE = jax.devices()[0]
HOST = jax.sharding.SingleDeviceSharding(DEVICE, memory_kind="pinned_host")
ON_DEVICE = jax.sharding.SingleDeviceSharding(DEVICE, memory_kind="device")
SHAPE = dict(q_len=1000, num_q_heads=4, num_kv_heads=2, head_dim=32)


def _host(*xs):
    return tuple(jax.device_put(x, HOST) for x in xs)


def _plan(budget, dtype="float32", order=None, **kw):
    return sc.plan(**{**SHAPE, **kw}, dtype=dtype, memory_budget=budget, executor="offload", implementation="xla",
                   order=order)


# Budgets for this shape (float32, causal) that reach each residency of the
# quorum order; the test below checks the planner really picks them.
RESIDENCY_BUDGETS = {("device", "device"): "64MiB", ("host", "device"): "2MiB", ("host", "host"): "900KiB"}


def test_the_budget_decides_residency_and_the_estimate_fits_it():
    for (inputs, accumulators), budget in RESIDENCY_BUDGETS.items():
        p = _plan(budget, is_causal=True, order="quorums")
        assert (p.inputs, p.accumulators, p.order) == (inputs, accumulators, "quorums"), budget
        assert p.executor == "offload"
        assert p.estimated_peak_bytes <= p.budget_bytes
    small = _plan("900KiB", is_causal=True, order="quorums")
    assert small.num_chunks > _plan("2MiB", is_causal=True, order="quorums").num_chunks > 1
    # With device accumulators the same layout would not fit: that is why they went home.
    assert memory_model.offload_footprint(small.problem, small.stream_layout, "device").total > small.budget_bytes


def test_too_small_a_budget_states_the_smallest_that_works():
    with pytest.raises(sc.BudgetTooSmall, match=r"too small for out-of-core attention.*smallest budget that works is") as e:
        _plan("100KiB", is_causal=True)
    need = e.value.smallest
    assert f"smallest budget that works is {need} bytes" in str(e.value)
    assert _plan(need, is_causal=True).estimated_peak_bytes <= need
    with pytest.raises(sc.BudgetTooSmall):
        _plan(need - 1, is_causal=True)


def test_the_order_that_moves_fewer_bytes_wins():
    """Query rows send each key/value chunk once per query chunk that sees it; quorums send every
    chunk once per quorum holding it, and with host accumulators the state twice more."""
    big = dict(q_len=1 << 20, num_q_heads=8, num_kv_heads=8, head_dim=64, is_causal=True)
    rows = _plan("1GiB", "bfloat16", **big)
    quorums = _plan("1GiB", "bfloat16", order="quorums", **big)
    assert (rows.order, rows.inputs, quorums.order, quorums.accumulators) == ("query_rows", "host", "quorums", "host")
    assert offload_plan.moved_bytes(rows) < offload_plan.moved_bytes(quorums) / 3
    assert rows.subproblems[5].q_chunks == (5,) and rows.subproblems[5].kv_chunks == tuple(range(6))
    assert rows.estimated_peak_bytes <= rows.budget_bytes
    for budget, causal in (("2MiB", False), ("1MiB", True), ("1MiB", False)):
        chosen = _plan(budget, is_causal=causal)
        other = _plan(budget, is_causal=causal, order={"quorums": "query_rows", "query_rows": "quorums"}[chosen.order])
        assert offload_plan.moved_bytes(chosen) <= offload_plan.moved_bytes(other)
    with pytest.raises(ValueError, match="order must be None or one of"):
        _plan("1MiB", order="rows")
    with pytest.raises(ValueError, match="order applies to executor='offload'"):
        sc.plan(**SHAPE, order="query_rows")


# (budget, order) reaching each residency and order for SHAPE, float32, causal.
LAYOUTS = {
    "inputs on the device": ("64MiB", None),
    "state on the device": ("2MiB", "quorums"),
    "state in host memory": ("900KiB", "quorums"),
    "query rows": ("400KiB", "query_rows"),
}


@pytest.mark.parametrize(
    "layout, causal",
    [("inputs on the device", False), ("state on the device", True), ("state on the device", False),
     ("state in host memory", True), ("query rows", True), ("query rows", False)],
)
def test_host_inputs_match_float64_and_device_inputs(layout, causal):
    q, k, v = random_inputs(1, 1, 1000, 1000, 4, 2, 32, jnp.float32)
    budget, order = LAYOUTS[layout]
    p = _plan(budget, is_causal=causal, order=order)
    assert p.order == (order or "quorums") and p.num_chunks > (1 if order else 0)
    out = sc.dot_product_attention(*_host(q, k, v), is_causal=causal, plan=p)
    assert out.sharding.memory_kind == "pinned_host"  # returned where the query lives
    ref, _ = attention(q, k, v, is_causal=causal)
    assert rel_error(np.asarray(out), ref) < 2e-6
    on_device = sc.dot_product_attention(q, k, v, is_causal=causal, implementation="xla")
    np.testing.assert_allclose(np.asarray(out), np.asarray(on_device), rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("layout", ["state on the device", "state in host memory", "query rows"])
def test_inside_jit_matches_the_pipeline(layout):
    q, k, v = random_inputs(2, 1, 1000, 1000, 4, 2, 32, jnp.float32)
    budget, order = LAYOUTS[layout]
    p = _plan(budget, is_causal=True, order=order)
    call = lambda q, k, v: sc.dot_product_attention(q, k, v, is_causal=True, plan=p, return_residuals=True)
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


@pytest.mark.parametrize("order", ["quorums", "query_rows"])
@pytest.mark.parametrize("transfer", ["view", "split"])
def test_bfloat16_window_unbatched_odd_length(transfer, order, monkeypatch):
    monkeypatch.setattr(offload, "INPUT_TRANSFER", transfer)
    q, k, v = random_inputs(3, 1, 777, 777, 2, 1, 64, jnp.bfloat16)
    q, k, v = q[0], k[0], v[0]
    p = sc.plan(q_len=777, num_q_heads=2, num_kv_heads=1, head_dim=64, dtype="bfloat16",
                local_window_size=(100, 20), memory_budget={"quorums": "600KiB", "query_rows": "300KiB"}[order],
                executor="offload", implementation="xla", order=order)
    assert p.inputs == "host" and p.num_chunks > 7
    assert p.accumulators == "host" or order == "query_rows"
    assert p.num_pairs < p.num_chunks**2 // 2  # the window skips most chunk pairs
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
    small = _plan("600KiB", q_len=300, is_causal=True, order="quorums").backward()
    assert (small.inputs, small.accumulators, small.pass_kind, small.order) == ("host", "host", "backward", "quorums")
    assert small.estimated_peak_bytes <= small.budget_bytes
    assert "accumulators in host memory" in small.summary()
    rows = _plan("600KiB", q_len=300, is_causal=True).backward()
    assert (rows.order, rows.pass_kind, rows.inputs) == ("query_rows", "backward", "host")
    assert rows.estimated_peak_bytes <= rows.budget_bytes
    assert "backward pass, out-of-core executor, query-row order" in rows.summary()
    assert "then by key chunk (dk, dv" in rows.summary()


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
    host_state = _plan(RESIDENCY_BUDGETS["host", "host"], is_causal=True, order="quorums").summary()
    assert "out-of-core executor" in host_state
    assert "query, key, value and output in host memory; float32 accumulators in host memory" in host_state
    assert "inside jit, lax.scan reading each chunk from host memory" in host_state
    device_state = _plan(RESIDENCY_BUDGETS["host", "device"], is_causal=True, order="quorums").summary()
    assert "float32 accumulators on the device" in device_state
    rows = _plan("900KiB", is_causal=True).summary()
    assert "query-row order" in rows and "full cover" in rows
    assert "float32 state of one query chunk on the device" in rows
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


def test_gradients_in_query_row_order_with_segment_ids_and_grouped_heads():
    q, k, v = random_inputs(15, 2, 320, 320, 4, 2, 32, jnp.float32)
    ids = jnp.asarray(np.repeat(np.arange(4), 80)[None].repeat(2, 0), jnp.int32)
    w = jnp.asarray(np.random.default_rng(16).standard_normal(q.shape), jnp.float32)
    p = _plan("700KiB", q_len=320, batch=2, is_causal=True)
    assert p.order == p.backward().order == "query_rows" and p.backward().num_chunks > 2
    attend = lambda q, k, v: sc.dot_product_attention(q, k, v, is_causal=True, segment_ids=ids, plan=p)
    grads = jax.grad(lambda q, k, v: _loss(w)(attend(q, k, v)), argnums=(0, 1, 2))(*_host(q, k, v))
    assert [g.sharding.memory_kind for g in grads] == ["pinned_host"] * 3
    ref = attention_grads(q, k, v, np.asarray(w), is_causal=True, segment_ids=(np.asarray(ids), np.asarray(ids)))
    for g, r in zip(grads, ref):
        assert rel_error(np.asarray(g), r) < 1e-5
