"""The planner: ownership of chunk pairs, pruning, budgets, hashability, errors."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import stream_cqsa_jax as sc
from reference import visibility


def chunk_visibility(p: sc.Plan) -> np.ndarray:
    """bool [C, C]: chunk pairs holding at least one visible position pair (dense reference)."""
    window = p.window
    vis = visibility(p.q_len, p.kv_len, 1, is_causal=p.is_causal, window=window)[0]
    padded = np.zeros((p.padded_q_len, p.padded_kv_len), bool)
    padded[: p.q_len, : p.kv_len] = vis
    c = p.num_chunks
    return padded.reshape(c, p.q_chunk, c, p.kv_chunk).any(axis=(1, 3))


plans = st.builds(
    lambda t, s, chunks, depth, causal, window: sc.plan(
        q_len=t,
        kv_len=s,
        num_q_heads=2,
        head_dim=8,
        num_chunks=chunks,
        depth=depth,
        is_causal=causal,
        local_window_size=window,
    ),
    t=st.integers(1, 700),
    s=st.integers(1, 700),
    chunks=st.integers(1, 31),
    depth=st.sampled_from([1, 1, 2]),
    causal=st.booleans(),
    window=st.one_of(st.none(), st.integers(0, 200), st.tuples(st.integers(0, 150), st.integers(0, 150))),
)


@given(plans)
def test_every_visible_chunk_pair_is_scheduled_exactly_once(p):
    pairs = p.pairs()
    counts = np.zeros((p.num_chunks, p.num_chunks), int)
    np.add.at(counts, (pairs[:, 0], pairs[:, 1]), 1)
    np.testing.assert_array_equal(counts, chunk_visibility(p).astype(int))


@given(plans)
def test_subproblems_stay_inside_their_quorums(p):
    cover = p.cover
    for sub in p.subproblems:
        quorum = set(cover.quorum(sub.quorum).tolist())
        assert set(sub.chunks) <= quorum
        assert set(sub.q_chunks) == {a for a, _ in sub.pairs}
        assert set(sub.kv_chunks) == {b for _, b in sub.pairs}
        assert all(cover.owner(a, b) == sub.quorum for a, b in sub.pairs)
        assert len(sub.pairs) <= p.num_chunks


def test_causal_skips_pairs_above_the_diagonal():
    p = sc.plan(q_len=13 * 64, num_q_heads=1, head_dim=16, num_chunks=13, is_causal=True)
    pairs = p.pairs()
    assert np.all(pairs[:, 1] <= pairs[:, 0])
    assert len(pairs) == 13 * 14 // 2
    dense = sc.plan(q_len=13 * 64, num_q_heads=1, head_dim=16, num_chunks=13)
    assert len(dense.pairs()) == 13 * 13
    assert len(dense.subproblems) == 13
    assert all(len(s.q_chunks) == len(s.kv_chunks) == 4 for s in dense.subproblems)


def test_window_prunes_distant_chunks():
    p = sc.plan(q_len=31 * 32, num_q_heads=1, head_dim=16, num_chunks=31, local_window_size=(40, 0))
    pairs = p.pairs()
    assert np.all((pairs[:, 0] - pairs[:, 1] >= 0) & (pairs[:, 0] - pairs[:, 1] <= 2))


@pytest.mark.parametrize("budget", ["14MiB", "16MiB", 24 * 2**20, "0.25GiB"])
@pytest.mark.parametrize("causal", [False, True])
def test_estimate_stays_within_budget(budget, causal):
    p = sc.plan(q_len=20_000, num_q_heads=4, num_kv_heads=2, head_dim=32, is_causal=causal, memory_budget=budget)
    assert p.estimated_peak_bytes <= sc.parse_budget(budget)
    assert p.memory_budget == sc.parse_budget(budget)


def _smallest_budget(**kwargs) -> int:
    with pytest.raises(ValueError, match="smallest budget that works") as info:
        sc.plan(**kwargs, memory_budget=1)
    return int(re.search(r"works is (\d+) bytes", str(info.value)).group(1))


def test_smaller_budget_means_more_subproblems():
    # A prime length: one subproblem would need padded copies of the inputs.
    kwargs = dict(q_len=50_021, num_q_heads=8, head_dim=64, dtype=jnp.bfloat16, is_causal=True)
    floor = _smallest_budget(**kwargs)
    whole = sc.plan(**kwargs, num_chunks=1).estimated_peak_bytes
    budgets = [whole, (whole + floor) // 2, int(1.1 * floor), floor]
    chunks = [sc.plan(**kwargs, memory_budget=b).num_chunks for b in budgets]
    assert chunks[0] == 1
    assert chunks == sorted(chunks) and chunks[-1] > 31


def test_too_small_budget_states_the_smallest_that_works():
    kwargs = dict(q_len=10_000, num_q_heads=4, head_dim=64, is_causal=True)
    with pytest.raises(ValueError, match="smallest budget that works is") as info:
        sc.plan(**kwargs, memory_budget="1MiB")
    need = int(re.search(r"works is (\d+) bytes", str(info.value)).group(1))
    assert sc.plan(**kwargs, memory_budget=need).estimated_peak_bytes <= need
    with pytest.raises(ValueError, match="too small"):
        sc.plan(**kwargs, memory_budget=need - 1)


def test_no_budget_uses_one_subproblem_when_it_fits():
    p = sc.plan(q_len=4096, num_q_heads=4, head_dim=64)
    assert p.num_chunks == 1 and len(p.subproblems) == 1
    assert p.budget_source == "free device memory"


def test_plan_is_hashable_and_a_valid_static_argument():
    kwargs = dict(q_len=1000, num_q_heads=2, head_dim=16, is_causal=True, memory_budget="2MiB")
    a, b = sc.plan(**kwargs), sc.plan(**kwargs)
    assert a == b and hash(a) == hash(b)
    assert a != sc.plan(**{**kwargs, "is_causal": False})

    @jax.jit
    def f(x):
        return x * a.num_chunks

    g = jax.jit(lambda x, p: x + len(p.subproblems), static_argnums=1)
    assert int(g(jnp.int32(0), a)) == len(a.subproblems)
    assert int(f(jnp.int32(1))) == a.num_chunks


def test_deterministic_backward_is_part_of_the_plan_and_its_backward():
    """The default is True; False is kept by `backward()` (device and out-of-core plans), changes the
    plan's identity (it is a jit static argument) and is named in the summary."""
    kwargs = dict(q_len=1000, num_q_heads=2, head_dim=16, is_causal=True, memory_budget="2MiB")
    default, fast = sc.plan(**kwargs), sc.plan(**kwargs, deterministic_backward=False)
    assert default.deterministic_backward and default.backward().deterministic_backward
    assert not fast.deterministic_backward and not fast.backward().deterministic_backward
    assert fast != default and fast.subproblems == default.subproblems
    assert "backward:" not in default.summary() and "the same bits every run" in fast.summary()
    assert not sc.plan(**kwargs, deterministic_backward=False, pass_kind="backward").deterministic_backward
    offload = sc.plan(**kwargs, executor="offload", deterministic_backward=False)
    assert not offload.backward().deterministic_backward


def test_product_cover_depth():
    p = sc.plan(q_len=49 * 16, num_q_heads=1, head_dim=16, num_chunks=7, depth=2)
    assert p.num_chunks == 49 and p.depth == 2 and p.cover.size == 9
    assert len(p.pairs()) == 49 * 49


def test_summary_describes_the_plan():
    p = sc.plan(q_len=5000, num_q_heads=4, head_dim=64, is_causal=True, memory_budget="12MiB")
    text = p.summary()
    for needle in (f"C = {p.num_chunks}", "causal", "estimated peak", "subproblems", "kernel", "xla"):
        assert needle in text


def test_planning_a_long_sequence_is_fast():
    import time

    start = time.perf_counter()
    kwargs = dict(q_len=1_000_003, num_q_heads=8, head_dim=64, dtype="bfloat16", is_causal=True)
    p = sc.plan(**kwargs, memory_budget=int(1.05 * _smallest_budget(**kwargs)))
    assert len(p.subproblems) > 1
    assert time.perf_counter() - start < 30


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(q_len=0), ValueError, "q_len"),
        (dict(q_len=1.5), TypeError, "q_len"),
        (dict(num_q_heads=3, num_kv_heads=2), ValueError, "multiple of num_kv_heads"),
        (dict(dtype=jnp.int32), TypeError, "dtype"),
        (dict(local_window_size=-1), ValueError, "local_window_size"),
        (dict(local_window_size=(1, 2, 3)), TypeError, "local_window_size"),
        (dict(memory_budget="lots"), ValueError, "memory_budget"),
        (dict(memory_budget=-5), ValueError, "memory_budget"),
        (dict(memory_budget=0), ValueError, "memory_budget"),
        (dict(implementation="cuda"), ValueError, "implementation"),
        (dict(num_chunks=0), ValueError, "num_chunks"),
        (dict(is_causal="yes"), TypeError, "is_causal"),
        (dict(deterministic_backward=None), TypeError, "deterministic_backward"),
    ],
)
def test_bad_arguments_are_named(kwargs, error, message):
    args = dict(q_len=128, num_q_heads=2, head_dim=16)
    args.update(kwargs)
    with pytest.raises(error, match=message):
        sc.plan(**args)


@pytest.mark.parametrize(
    "text, expected",
    [("512MiB", 512 * 2**20), ("1.5GiB", 3 * 2**29), ("2GB", 2 * 10**9), ("1e6", 10**6), (4096, 4096), ("7 kib", 7168)],
)
def test_budget_strings(text, expected):
    assert sc.parse_budget(text) == expected
