"""The shared kernel suite: every kernel, forward and gradients, vs float64 and vs XLA's own error.

Each kernel runs through the public API with a plan that selects it; the Pallas
kernel runs in interpret mode on CPU. A kernel passes when its relative error
is at most 1.2x (forward) and 1.5x (gradients) that of
`jax.nn.dot_product_attention(implementation="xla")` in the same dtype.
"""

import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import stream_cqsa_jax as sc
from baselines import data_masks, xla_errors
from reference import as64, attention, attention_grads, random_inputs, rel_error, visibility

KERNELS = ["xla", "pallas_triton"]
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}

# name: (b, t, s, n, kh, h, structured masks, data masks, chunks)
CASES = {
    "causal_gqa_segments": (2, 181, 181, 4, 2, 32, dict(is_causal=True), "segments", 7),
    "mqa_dense": (1, 177, 177, 4, 1, 64, dict(), None, 1),
    "cross_lengths": (2, 150, 233, 2, 2, 32, dict(), "lengths", 13),
    "cross_causal": (1, 233, 150, 2, 1, 32, dict(is_causal=True), None, 1),
    "window": (1, 300, 300, 2, 2, 32, dict(local_window_size=(37, 5)), None, 7),
    "causal_window_head96": (1, 200, 200, 2, 1, 96, dict(is_causal=True, local_window_size=20), None, 3),
}


def _plan(impl, b, t, s, n, kh, h, dtype, structured, chunks):
    return sc.plan(q_len=t, kv_len=s, num_q_heads=n, num_kv_heads=kh, head_dim=h, dtype=dtype, batch=b,
                   num_chunks=chunks, implementation=impl, is_causal=structured.get("is_causal", False),
                   local_window_size=structured.get("local_window_size"))


# float16 shares the 16-bit code paths of bfloat16; it runs on a subset of the cases.
FLOAT16_CASES = ("causal_gqa_segments", "window")


def _kernel_dtype_params():
    for impl in KERNELS:
        for name in DTYPES:
            if impl == "pallas_triton" and name == "float16":
                continue  # the same 16-bit code path as bfloat16
            yield pytest.param(impl, name, id=f"{impl}-{name}")


def _case_params():
    for case in CASES:
        for param in _kernel_dtype_params():
            impl, name = param.values
            if name != "float16" or case in FLOAT16_CASES:
                yield pytest.param(case, impl, name, id=f"{case}-{impl}-{name}")


@pytest.mark.parametrize("case, impl, dtype_name", list(_case_params()))
def test_forward_and_gradients_match_float64(case, impl, dtype_name):
    b, t, s, n, kh, h, structured, data, chunks = CASES[case]
    dtype = DTYPES[dtype_name]
    rng = np.random.default_rng(zlib.crc32(case.encode()))
    q, k, v = random_inputs(rng.integers(2**31), b, t, s, n, kh, h, dtype)
    do = jnp.asarray(rng.standard_normal((b, t, n, h)), dtype)
    extra, ref_extra = data_masks(data, b, t, s, rng)
    rk = dict(is_causal=structured.get("is_causal", False), window=structured.get("local_window_size"), **ref_extra)
    vis = visibility(t, s, b, **rk)
    ref_out, _ = attention(as64(q), as64(k), as64(v), **rk)
    ref_grads = attention_grads(as64(q), as64(k), as64(v), as64(do), **rk)
    base_out, base_grads = xla_errors(q, k, v, do, vis, structured, extra, ref_out, ref_grads)

    plan = _plan(impl, b, t, s, n, kh, h, dtype, structured, chunks)
    assert plan.implementation == impl and len(plan.subproblems) >= min(chunks, 2)
    f = lambda q, k, v: sc.dot_product_attention(q, k, v, plan=plan, **structured, **extra)
    out, vjp = jax.vjp(f, q, k, v)
    assert out.dtype == dtype and out.shape == q.shape
    assert rel_error(as64(out), ref_out) <= 1.2 * base_out
    for name, g, r, base in zip("qkv", vjp(do), ref_grads, base_grads):
        assert g.dtype == dtype, name
        assert rel_error(as64(g), r) <= 1.5 * base, name


@pytest.mark.parametrize("impl, dtype_name", list(_kernel_dtype_params()))
def test_large_logits(impl, dtype_name):
    """Logits up to about +-50: nothing overflows, no precision is lost in merges."""
    dtype = DTYPES[dtype_name]
    q, k, v = random_inputs(7, 1, 190, 190, 2, 2, 32, dtype, logit_scale=8.0)
    rng = np.random.default_rng(8)
    do = jnp.asarray(rng.standard_normal(q.shape), dtype)
    ref_out, _ = attention(as64(q), as64(k), as64(v), is_causal=True)
    ref_grads = attention_grads(as64(q), as64(k), as64(v), as64(do), is_causal=True)
    vis = visibility(190, 190, 1, is_causal=True)
    base_out, base_grads = xla_errors(q, k, v, do, vis, dict(is_causal=True), {}, ref_out, ref_grads)
    plan = _plan(impl, 1, 190, 190, 2, 2, 32, dtype, dict(is_causal=True), 13)
    out, vjp = jax.vjp(lambda q, k, v: sc.dot_product_attention(q, k, v, is_causal=True, plan=plan), q, k, v)
    assert rel_error(as64(out), ref_out) <= 1.2 * base_out
    for g, r, base in zip(vjp(do), ref_grads, base_grads):
        assert rel_error(as64(g), r) <= 1.5 * base


@pytest.mark.parametrize("impl", KERNELS)
def test_fully_masked_rows_are_zero_with_minus_inf_lse(impl):
    q, k, v = random_inputs(3, 2, 96, 96, 2, 1, 16, jnp.float32)
    seg_q = np.zeros((2, 96), np.int32)
    seg_q[:, 40:50] = 9  # segment 9 has no keys
    seg_kv = np.zeros((2, 96), np.int32)
    q_len = np.array([96, 70], np.int32)
    plan = _plan(impl, 2, 96, 96, 2, 1, 16, jnp.float32, {}, 7)
    kwargs = dict(segment_ids=(seg_q, seg_kv), query_seq_lengths=q_len, plan=plan)
    out, lse = sc.dot_product_attention(q, k, v, return_residuals=True, **kwargs)
    out, lse = np.asarray(out), np.asarray(lse)
    assert np.all(np.isfinite(out))
    assert np.all(out[:, 40:50] == 0) and np.all(out[1, 70:] == 0)
    assert np.all(lse[:, :, 40:50] == -np.inf) and np.all(np.isfinite(lse[0, :, 50:]))
    ref, ref_lse = attention(q, k, v, segment_ids=(seg_q, seg_kv), q_lengths=q_len)
    assert rel_error(out, ref) < 1e-5
    finite = np.isfinite(ref_lse)
    np.testing.assert_allclose(lse[finite], ref_lse[finite], rtol=1e-5, atol=1e-5)
    grads = jax.grad(lambda q, k, v: jnp.sum(sc.dot_product_attention(q, k, v, **kwargs) ** 2), (0, 1, 2))(q, k, v)
    assert all(np.all(np.isfinite(np.asarray(g))) for g in grads)
    assert np.all(np.asarray(grads[0])[:, 40:50] == 0)


@pytest.mark.parametrize("impl", KERNELS)
def test_repeated_runs_are_bitwise_identical(impl):
    q, k, v = random_inputs(8, 1, 200, 200, 2, 1, 32, jnp.bfloat16)
    plan = _plan(impl, 1, 200, 200, 2, 1, 32, jnp.bfloat16, dict(is_causal=True), 13)

    def loss(q, k, v):
        return jnp.sum(sc.dot_product_attention(q, k, v, is_causal=True, plan=plan).astype(jnp.float32) ** 2)

    run = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
    first, second = run(q, k, v), run(q, k, v)
    for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(second)):
        np.testing.assert_array_equal(np.asarray(a.astype(jnp.float32)), np.asarray(b.astype(jnp.float32)))


def _exactly_once(impl, t, s, chunks, causal, window, masks, seed):
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
    h = 16 * -(-s // 16)
    v = jnp.broadcast_to(jnp.eye(s, h, dtype=jnp.float32)[None, :, None, :], (b, s, 1, h))
    k = jnp.zeros((b, s, 1, h), jnp.float32)
    q = jnp.zeros((b, t, 1, h), jnp.float32)
    p = sc.plan(q_len=t, kv_len=s, num_q_heads=1, head_dim=h, batch=b, is_causal=causal,
                local_window_size=window, num_chunks=chunks, implementation=impl)
    out, lse = sc.dot_product_attention(q, k, v, is_causal=causal, local_window_size=window, plan=p,
                                        return_residuals=True, **kw)
    vis = visibility(t, s, b, is_causal=causal, window=window, **rk)
    count = vis.sum(-1)
    expected = vis / np.maximum(count, 1)[..., None]
    np.testing.assert_allclose(np.asarray(out)[:, :, 0, :s], expected, atol=1e-6)
    expected_lse = np.where(count > 0, np.log(np.maximum(count, 1)), -np.inf)
    np.testing.assert_allclose(np.asarray(lse)[:, 0], expected_lse, atol=1e-5)


_EXACTLY_ONCE = dict(
    t=st.integers(1, 90),
    s=st.integers(1, 90),
    chunks=st.integers(1, 13),
    causal=st.booleans(),
    window=st.one_of(st.none(), st.tuples(st.integers(0, 40), st.integers(0, 40))),
    masks=st.sampled_from(["none", "lengths", "segments"]),
    seed=st.integers(0, 2**16),
)


@settings(max_examples=15, deadline=None)
@given(**_EXACTLY_ONCE)
def test_xla_computes_each_visible_pair_exactly_once(t, s, chunks, causal, window, masks, seed):
    _exactly_once("xla", t, s, chunks, causal, window, masks, seed)


@settings(max_examples=6, deadline=None)
@given(**_EXACTLY_ONCE)
def test_pallas_computes_each_visible_pair_exactly_once(t, s, chunks, causal, window, masks, seed):
    _exactly_once("pallas_triton", t, s, chunks, causal, window, masks, seed)
