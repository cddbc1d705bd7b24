"""Forward pass vs the dense float64 reference, against XLA's own error in the same dtype."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import stream_cqsa_jax as sc
from conftest import forcing_budget
from reference import attention, rel_error, visibility

DTYPES = [jnp.float32, jnp.bfloat16, jnp.float16]


def as64(x):
    return np.asarray(jnp.asarray(x).astype(jnp.float32), np.float64)


def random_inputs(seed, b, t, s, n, kh, h, dtype, logit_scale=1.0):
    """Fresh normal q, k, v; q scaled so that logits reach about +-`logit_scale` * 4."""
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((b, t, n, h)) * logit_scale
    k = rng.standard_normal((b, s, kh, h))
    v = rng.standard_normal((b, s, kh, h))
    return tuple(jnp.asarray(x, dtype) for x in (q, k, v))


def xla_error(q, k, v, ref, vis, **kwargs):
    """Relative error of jax.nn.dot_product_attention(implementation="xla"), rows that see no key zeroed.

    (XLA returns an average of masked keys for such rows; this library returns zeros.)
    """
    out = jax.nn.dot_product_attention(q, k, v, implementation="xla", **kwargs)
    seen = vis.any(axis=-1)[:, :, None, None]
    return rel_error(np.where(seen, as64(out), 0.0), ref)


CASES = {
    # name: (b, t, s, n, kh, h, kwargs)
    "odd_lengths_gqa": (2, 203, 203, 4, 2, 32, dict(is_causal=True)),
    "mqa_dense": (1, 177, 177, 4, 1, 64, dict()),
    "cross_attention": (2, 150, 233, 2, 2, 32, dict()),
    "cross_causal": (1, 233, 150, 2, 1, 32, dict(is_causal=True)),
    "window": (1, 300, 300, 2, 2, 32, dict(local_window_size=(37, 5))),
    "causal_window": (1, 300, 300, 2, 1, 32, dict(is_causal=True, local_window_size=20)),
}


def _mask_arrays(name, b, t, s, rng):
    """Extra data-dependent masks for some cases, with the reference's keywords."""
    if name == "odd_lengths_gqa":
        seg = np.sort(rng.integers(0, 4, size=(b, t)), axis=1).astype(np.int32)
        return dict(segment_ids=seg), dict(segment_ids=seg)
    if name == "cross_attention":
        q_len = np.array([150, 61], np.int32)
        kv_len = np.array([233, 100], np.int32)
        return (
            dict(query_seq_lengths=q_len, key_value_seq_lengths=kv_len),
            dict(q_lengths=q_len, kv_lengths=kv_len),
        )
    return {}, {}


def _ref_kwargs(kwargs):
    return dict(is_causal=kwargs.get("is_causal", False), window=kwargs.get("local_window_size"))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("budget", [None, "tiny"])
@pytest.mark.parametrize("name", list(CASES))
def test_matches_float64_at_least_as_well_as_xla(name, budget, dtype):
    b, t, s, n, kh, h, kwargs = CASES[name]
    rng = np.random.default_rng(abs(hash((name, budget))) % 2**32)
    q, k, v = random_inputs(rng.integers(2**31), b, t, s, n, kh, h, dtype)
    extra, ref_extra = _mask_arrays(name, b, t, s, rng)
    rk = _ref_kwargs(kwargs)
    ref, _ = attention(as64(q), as64(k), as64(v), **rk, **ref_extra)
    vis = visibility(t, s, b, **rk, **ref_extra)
    xla_kwargs = {key: val for key, val in {**kwargs, **extra}.items() if key != "segment_ids"}
    if "segment_ids" in extra:
        xla_kwargs["mask"] = jnp.asarray(vis[:, None])
    base = xla_error(q, k, v, ref, vis, **xla_kwargs)

    plan = None
    if budget == "tiny":
        plan = sc.plan(q_len=t, kv_len=s, num_q_heads=n, num_kv_heads=kh, head_dim=h, dtype=dtype, batch=b,
                       is_causal=kwargs.get("is_causal", False), local_window_size=kwargs.get("local_window_size"),
                       num_chunks=13)
        assert len(plan.subproblems) > 5
    out = sc.dot_product_attention(q, k, v, plan=plan, **kwargs, **extra)
    assert out.dtype == q.dtype and out.shape == q.shape
    assert rel_error(as64(out), ref) <= 1.2 * base


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("logit_scale", [4.0, 12.0])
def test_large_logits(dtype, logit_scale):
    # logits up to about +-50: exact softmax must not overflow or lose precision
    q, k, v = random_inputs(7, 1, 190, 190, 2, 2, 32, dtype, logit_scale)
    ref, _ = attention(as64(q), as64(k), as64(v), is_causal=True)
    vis = visibility(190, 190, 1, is_causal=True)
    base = xla_error(q, k, v, ref, vis, is_causal=True)
    for chunks in (1, 7, 21):
        p = sc.plan(q_len=190, num_q_heads=2, head_dim=32, dtype=dtype, is_causal=True, num_chunks=chunks)
        out = sc.dot_product_attention(q, k, v, is_causal=True, plan=p)
        assert rel_error(as64(out), ref) <= 1.2 * base


def test_fully_masked_rows_are_zero_with_minus_inf_lse():
    q, k, v = random_inputs(3, 2, 96, 96, 2, 1, 16, jnp.float32)
    budget = forcing_budget(7, q_len=96, num_q_heads=2, num_kv_heads=1, head_dim=16, batch=2)
    seg_q = np.zeros((2, 96), np.int32)
    seg_q[:, 40:50] = 9  # segment 9 has no keys
    seg_kv = np.zeros((2, 96), np.int32)
    q_len = np.array([96, 70], np.int32)
    out, lse = sc.dot_product_attention(
        q, k, v, segment_ids=(seg_q, seg_kv), query_seq_lengths=q_len, return_residuals=True, memory_budget=budget
    )
    out, lse = np.asarray(out), np.asarray(lse)
    assert np.all(np.isfinite(out))
    assert np.all(out[:, 40:50] == 0) and np.all(out[1, 70:] == 0)
    assert np.all(lse[:, :, 40:50] == -np.inf) and np.all(np.isfinite(lse[0, :, 50:]))
    ref, ref_lse = attention(q, k, v, segment_ids=(seg_q, seg_kv), q_lengths=q_len)
    assert rel_error(out, ref) < 1e-5
    finite = np.isfinite(ref_lse)
    np.testing.assert_allclose(lse[finite], ref_lse[finite], rtol=1e-5, atol=1e-5)


def test_lse_matches_reference_and_layout():
    q, k, v = random_inputs(11, 2, 120, 120, 4, 2, 32, jnp.float32)
    budget = forcing_budget(7, q_len=120, num_q_heads=4, num_kv_heads=2, head_dim=32, batch=2, is_causal=True)
    out, lse = sc.dot_product_attention(q, k, v, is_causal=True, return_residuals=True, memory_budget=budget)
    ref, ref_lse = attention(q, k, v, is_causal=True)
    assert lse.shape == (2, 4, 120) and lse.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(lse), ref_lse, rtol=1e-5, atol=1e-5)


def test_unbatched_inputs():
    q, k, v = random_inputs(5, 1, 80, 80, 2, 2, 16, jnp.float32)
    out = sc.dot_product_attention(q[0], k[0], v[0], is_causal=True)
    assert out.shape == (80, 2, 16)
    ref, _ = attention(q, k, v, is_causal=True)
    assert rel_error(out[None], ref) < 1e-5


def test_tiny_budget_gives_the_same_answer():
    # A prime length: one subproblem would need a padded copy of the inputs.
    q, k, v = random_inputs(13, 1, 1009, 1009, 4, 2, 32, jnp.float32)
    whole = sc.dot_product_attention(q, k, v, is_causal=True)
    kwargs = dict(q_len=1009, num_q_heads=4, num_kv_heads=2, head_dim=32, is_causal=True)
    budget = forcing_budget(31, **kwargs)
    p = sc.plan(**kwargs, memory_budget=budget)
    assert len(p.subproblems) >= 10 and p.estimated_peak_bytes <= budget
    split = sc.dot_product_attention(q, k, v, is_causal=True, memory_budget=budget)
    np.testing.assert_allclose(np.asarray(split), np.asarray(whole), rtol=2e-5, atol=2e-6)


def test_works_under_jit_with_plan_as_static_argument():
    q, k, v = random_inputs(17, 1, 256, 256, 2, 2, 32, jnp.bfloat16)
    p = sc.plan(q_len=256, num_q_heads=2, head_dim=32, dtype=jnp.bfloat16, is_causal=True, num_chunks=7)
    f = jax.jit(lambda q, k, v, p: sc.dot_product_attention(q, k, v, is_causal=True, plan=p), static_argnums=3)
    out = f(q, k, v, p)
    eager = sc.dot_product_attention(q, k, v, is_causal=True, plan=p)
    np.testing.assert_array_equal(np.asarray(out.astype(jnp.float32)), np.asarray(eager.astype(jnp.float32)))


def test_repeated_runs_are_bitwise_identical():
    q, k, v = random_inputs(19, 1, 333, 333, 2, 1, 32, jnp.float32)
    budget = forcing_budget(13, q_len=333, num_q_heads=2, num_kv_heads=1, head_dim=32, is_causal=True)
    run = lambda: np.asarray(sc.dot_product_attention(q, k, v, is_causal=True, memory_budget=budget))
    np.testing.assert_array_equal(run(), run())


@settings(max_examples=30)
@given(
    t=st.integers(1, 90),
    s=st.integers(1, 90),
    chunks=st.integers(1, 13),
    causal=st.booleans(),
    window=st.one_of(st.none(), st.tuples(st.integers(0, 40), st.integers(0, 40))),
    masks=st.sampled_from(["none", "lengths", "segments"]),
    seed=st.integers(0, 2**16),
)
def test_each_visible_pair_is_computed_exactly_once(t, s, chunks, causal, window, masks, seed):
    """With q = k = 0 all visible logits tie, so output row i is the mean of the values it attended to.

    Values are one-hot key positions: a pair computed twice, or skipped, changes the weights.
    """
    rng = np.random.default_rng(seed)
    b = 2
    kw, rk = {}, {}
    if masks == "lengths":
        q_len = rng.integers(0, t + 1, size=b).astype(np.int32)
        kv_len = rng.integers(0, s + 1, size=b).astype(np.int32)
        kw = dict(query_seq_lengths=q_len, key_value_seq_lengths=kv_len)
        rk = dict(q_lengths=q_len, kv_lengths=kv_len)
    elif masks == "segments":
        ids = (np.sort(rng.integers(0, 3, (b, t)), axis=1), np.sort(rng.integers(0, 3, (b, s)), axis=1))
        ids = tuple(x.astype(np.int32) for x in ids)
        kw, rk = dict(segment_ids=ids), dict(segment_ids=ids)
    v = jnp.broadcast_to(jnp.eye(s, dtype=jnp.float32)[None, :, None, :], (b, s, 1, s))
    k = jnp.zeros((b, s, 1, s), jnp.float32)
    q = jnp.zeros((b, t, 1, s), jnp.float32)
    p = sc.plan(q_len=t, kv_len=s, num_q_heads=1, head_dim=s, batch=b, is_causal=causal,
                local_window_size=window, num_chunks=chunks)
    out, lse = sc.dot_product_attention(q, k, v, is_causal=causal, local_window_size=window, plan=p,
                                        return_residuals=True, **kw)
    vis = visibility(t, s, b, is_causal=causal, window=window, **rk)
    count = vis.sum(-1)
    expected = vis / np.maximum(count, 1)[..., None]
    np.testing.assert_allclose(np.asarray(out)[:, :, 0], expected, atol=1e-6)
    expected_lse = np.where(count > 0, np.log(np.maximum(count, 1)), -np.inf)
    np.testing.assert_allclose(np.asarray(lse)[:, 0], expected_lse, atol=1e-5)
