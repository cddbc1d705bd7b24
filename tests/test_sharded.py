"""Sharded execution over a mesh axis vs the single-device result (CPU devices from conftest)."""

import collections
import functools
import json
import os
import re
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

import stream_cqsa_jax as sc
from multiprocess_worker import make_case, value_and_grad_fn
from reference import rel_error
from stream_cqsa_jax._src import sharded, sharded_plan

# Sharded results differ from the single-device ones only by float32 rounding
# (another merge order); a lost or doubled subproblem costs errors near 1.
TOL = 1e-5

CASES = {
    # name: (seed, b, t, s, n, kh, h, is_causal); GQA throughout, lengths not multiples of the device counts
    "causal": (1, 2, 150, 150, 4, 2, 16, True),
    "dense_cross": (2, 1, 131, 170, 4, 2, 16, False),
}


def _mesh(shape, names, kind="explicit"):
    size = int(np.prod(shape))
    if jax.device_count() < size:
        pytest.skip(f"needs {size} devices (XLA_FLAGS=--xla_force_host_platform_device_count=8)")
    types = (AxisType.Explicit if kind == "explicit" else AxisType.Auto,) * len(shape)
    return jax.make_mesh(shape, names, axis_types=types, devices=jax.devices()[:size])


def _plan_kwargs(name):
    _, b, t, s, n, kh, h, causal = CASES[name]
    return dict(q_len=t, kv_len=s, num_q_heads=n, num_kv_heads=kh, head_dim=h, batch=b, is_causal=causal,
                num_chunks=13, memory_budget="1GiB")


@functools.lru_cache(maxsize=None)
def _case(name):
    """(inputs, plan, single-device (o, lse, dq, dk, dv)) for a case cut into 13 chunks (13 subproblems)."""
    seed, b, t, s, n, kh, h, causal = CASES[name]
    arrays = tuple(jnp.asarray(x) for x in make_case(seed, b, t, s, n, kh, h))
    p = sc.plan(**_plan_kwargs(name))
    assert len(p.subproblems) == len(p.backward().subproblems) == 13
    single = jax.jit(value_and_grad_fn(plan=p, is_causal=causal))(*arrays)
    return arrays, p, single


def _rel_error(got, want) -> float:
    """`rel_error`, after checking that rows without keys (lse = -inf) agree."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert np.array_equal(np.isneginf(got), np.isneginf(want))
    return rel_error(np.where(np.isneginf(got), 0.0, got), np.where(np.isneginf(want), 0.0, want))


def _collectives(hlo: str) -> collections.Counter:
    ops = r"(all-reduce|all-gather|collective-permute|all-to-all|reduce-scatter)(?:-start)?"
    return collections.Counter(re.findall(rf"= [^ ]+ {ops}\(", hlo))


@pytest.mark.parametrize("devices", [2, 4, 8])
@pytest.mark.parametrize("name", list(CASES))
def test_results_and_gradients_equal_single_device(name, devices):
    arrays, plan, single = _case(name)
    mesh = _mesh((devices,), ("sp",))
    fn = jax.jit(value_and_grad_fn(mesh, "sp", is_causal=CASES[name][-1], plan=plan))
    compiled = fn.lower(*arrays).compile()
    out = compiled(*arrays)
    for what, got, want in zip(("o", "lse", "dq", "dk", "dv"), out, single):
        assert got.shape == want.shape and got.dtype == want.dtype, what
        assert _rel_error(got, want) <= TOL, what
    # Repeatable, and no all-reduce: the ring (collective-permute) merges the
    # forward (3 arrays) and the backward (3 arrays), D - 1 steps each.
    assert all(np.array_equal(a, b) for a, b in zip(compiled(*arrays), out))
    ops = _collectives(compiled.as_text())
    assert ops["collective-permute"] == 6 * (devices - 1)
    assert ops["all-reduce"] == ops["all-to-all"] == 0


def test_forward_communicates_only_to_merge():
    # An automatic plan under a budget is re-cut into at least 4 subproblems per
    # device; with T a multiple of D the merge is the only communication.
    q, k, v = (jnp.asarray(x) for x in make_case(5, 2, 160, 160, 4, 2, 16)[:3])
    mesh = _mesh((4,), ("sp",))

    def call(q, k, v, mesh=None):
        return sc.dot_product_attention(q, k, v, is_causal=True, memory_budget="64MiB", mesh=mesh)

    compiled = jax.jit(functools.partial(call, mesh=mesh)).lower(q, k, v).compile()
    assert _collectives(compiled.as_text()) == {"collective-permute": 3 * 3}
    out = compiled(q, k, v)
    assert out.sharding.spec[1] == "sp"  # left sharded along the sequence: each device owns its rows
    assert rel_error(out, jax.jit(call)(q, k, v)) <= TOL


@functools.lru_cache(maxsize=None)
def _masked_case():
    """(inputs, plan, masks, single-device results): causal GQA with segment ids and lengths."""
    b, t, s, n, kh, h = 2, 144, 144, 4, 2, 16
    arrays = tuple(jnp.asarray(x) for x in make_case(7, b, t, s, n, kh, h))
    rng = np.random.default_rng(7)
    masks = dict(
        segment_ids=jnp.asarray(np.sort(rng.integers(0, 3, (b, t)), axis=1), jnp.int32),
        query_seq_lengths=jnp.asarray([t, t - 29], jnp.int32),
    )
    plan = sc.plan(q_len=t, num_q_heads=n, num_kv_heads=kh, head_dim=h, batch=b, is_causal=True, num_chunks=13,
                   memory_budget="1GiB")
    single = jax.jit(value_and_grad_fn(plan=plan, is_causal=True, **masks))(*arrays)
    return arrays, plan, masks, single


@pytest.mark.parametrize("kind", ["explicit", "auto"])
def test_data_and_head_parallel_under_jit(kind):
    # Batch over "data", heads over "model", subproblems over "sp"; masks as data.
    arrays, plan, masks, single = _masked_case()
    mesh = _mesh((2, 2, 2), ("data", "model", "sp"), kind)
    heads = NamedSharding(mesh, P("data", None, "model"))
    rows = NamedSharding(mesh, P("data", "model"))
    fn = value_and_grad_fn(mesh, "sp", plan=plan, is_causal=True, **masks)
    if kind == "explicit":  # shardings live in the arrays' types
        placed = [jax.device_put(x, heads) for x in arrays[:4]] + [jax.device_put(arrays[4], rows)]
        out = jax.jit(fn)(*placed)
        assert [tuple(x.sharding.spec)[:3] for x in out[2:]] == [("data", None, "model")] * 3  # as their inputs
    else:
        out = jax.jit(fn, in_shardings=(heads,) * 4 + (rows,), out_shardings=(heads, rows, heads, heads, heads))(
            *arrays
        )
        assert out[0].sharding.spec == P("data", None, "model")
    for what, got, want in zip(("o", "lse", "dq", "dk", "dv"), out, single):
        assert _rel_error(got, want) <= TOL, what


@pytest.mark.parametrize("num_chunks", [64, 73, 91, 133])
def test_causal_balance_and_every_pair_once(num_chunks):
    p = sc.plan(q_len=num_chunks * 48 - 5, num_q_heads=2, head_dim=16, is_causal=True, num_chunks=num_chunks,
                memory_budget="1GiB")
    want = sorted(map(tuple, p.pairs().tolist()))
    for devices in (2, 4, 8):
        a = sharded_plan.assign(p, devices)
        assert a.balance <= 1.10, (devices, a.balance)
        assert a.work.sum() == sharded_plan.subproblem_work(p).sum()
        q_slots, kv_slots, count, pair_kv, _, kv_count, kv_pair_q = a.tables(p.schedule)
        got = []
        for d in range(devices):
            for step in range(a.steps):
                c, kc = count[d, step], kv_count[d, step]
                by_q = {(j, int(kv)) for j in range(len(c)) for kv in pair_kv[d, step, j, : c[j]]}
                by_kv = {(int(j), kv) for kv in range(len(kc)) for j in kv_pair_q[d, step, kv, : kc[kv]]}
                assert by_q == by_kv  # the transposed pair lists agree
                got += [(int(q_slots[d, step, j]), int(kv_slots[d, step, kv])) for j, kv in by_q]
        assert sorted(got) == want


def test_work_counts_the_tiles_the_kernel_visits():
    # Brute force: a (query tile, key tile) of an owned pair counts when some real query sees some key in it.
    p = sc.plan(q_len=301, kv_len=277, num_q_heads=1, head_dim=8, is_causal=True, local_window_size=(90, 0),
                num_chunks=7, block_q=16, block_kv=16, memory_budget="1GiB")
    band, cq, ck, bq, bk = p.band, p.q_chunk, p.kv_chunk, p.block_q, p.block_kv
    for index, sub in enumerate(p.subproblems):
        tiles = 0
        for a, b in sub.pairs:
            for qs in range(a * cq, a * cq + cq, bq):
                for ks in range(b * ck, b * ck + ck, bk):
                    qpos, kpos = np.arange(qs, qs + bq)[:, None], np.arange(ks, ks + bk)[None, :]
                    tiles += bool(band.visible(qpos, kpos).any())
        assert sharded_plan.subproblem_work(p)[index] == tiles


def test_plan_reports_balance_and_communication():
    p = sc.plan(q_len=4096, num_q_heads=8, num_kv_heads=2, head_dim=64, batch=2, is_causal=True, num_chunks=73,
                memory_budget="1GiB")
    sp = sharded_plan.shard_plan(p, 8)
    assert sp.balance == sharded_plan.assign(p, 8).balance <= 1.10
    c = sp.communication
    state = 2 * 4096 * 8 * (64 + 2) * 4  # acc, m, l in float32
    assert c.forward == 7 * state // 8 and c.allreduce_forward == 2 * c.forward
    grads = 2 * 4096 * (8 * 64 + 2 * 2 * 64) * 4
    assert c.backward == 7 * grads // 8 and c.allreduce_backward == 2 * c.backward
    text = sp.summary()
    assert "Sharded over 8 devices" in text and "max/mean" in text and "all-reduce" in text
    assert "max/mean" in p.summary().splitlines()[-1]


def test_automatic_plans_are_cut_for_the_devices():
    kwargs = dict(q_len=1024, num_q_heads=2, head_dim=16, is_causal=True, memory_budget="1GiB")
    whole = sc.plan(**kwargs)
    assert len(whole.subproblems) == 1
    cut = sharded.plan_for_devices(whole, 4)
    assert len(cut.subproblems) >= 4 * 4 and cut.estimated_peak_bytes <= cut.budget_bytes
    assert sharded.plan_for_devices(whole, 1) is whole
    short = sc.plan(**{**kwargs, "q_len": 40})
    assert sharded.plan_for_devices(short, 8) is short  # too short for 32 chunks of 8 tokens


def test_bad_mesh_arguments_are_named():
    q = jnp.ones((1, 16, 2, 8))
    mesh = _mesh((2, 2), ("data", "sp"))
    with pytest.raises(TypeError, match="mesh must be a jax.sharding.Mesh"):
        sc.dot_product_attention(q, q, q, mesh="sp")
    with pytest.raises(ValueError, match="subproblem_axis='x' is not an axis"):
        sc.dot_product_attention(q, q, q, mesh=mesh, subproblem_axis="x")
    with pytest.raises(ValueError, match="subproblem_axis must name"):
        sc.dot_product_attention(q, q, q, mesh=mesh)
    with pytest.raises(ValueError, match="needs a mesh"):
        sc.dot_product_attention(q, q, q, subproblem_axis="sp")
    with pytest.raises(TypeError, match="subproblem_axis must be a str"):
        sc.dot_product_attention(q, q, q, mesh=mesh, subproblem_axis=1)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_equal_single_device(tmp_path):
    # Two processes with two CPU devices each, joined by jax.distributed.initialize
    # on localhost: one subproblem axis of four devices across both.
    seed, b, t, s, n, kh, h, causal = CASES["causal"]
    case = dict(data=dict(seed=seed, b=b, t=t, s=s, n=n, kh=kh, h=h), plan=_plan_kwargs("causal"),
                call=dict(is_causal=causal))
    worker = os.path.join(os.path.dirname(__file__), "multiprocess_worker.py")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    port = _free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, worker, str(i), "2", str(port), str(tmp_path), json.dumps(case)],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for i in range(2)
    ]
    logs = []
    try:
        for proc in procs:
            logs.append(proc.communicate(timeout=180)[0])
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    for proc, log in zip(procs, logs):
        assert proc.returncode == 0, log[-3000:]

    result = np.load(tmp_path / "result.npz")
    assert int(result["processes"]) == 2 and int(result["devices"]) == 4 and bool(result["repeatable"])
    single = _case("causal")[2]
    for i, (what, want) in enumerate(zip(("o", "lse", "dq", "dk", "dv"), single)):
        assert _rel_error(result[f"arr_{i}"], want) <= TOL, what
