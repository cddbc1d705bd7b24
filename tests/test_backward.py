"""Gradients vs the float64 reference, finite differences, determinism, transformations, memory."""

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import stream_cqsa_jax as sc
from conftest import forcing_budget
from reference import attention_grads, rel_error, visibility
from test_forward import DTYPES, as64, random_inputs

GRAD_CASES = {
    # name: (b, t, s, n, kh, h, kwargs)
    "causal_gqa_odd": (2, 181, 181, 4, 2, 32, dict(is_causal=True)),
    "mqa_dense": (1, 150, 150, 2, 1, 32, dict()),
    "cross": (1, 120, 211, 2, 2, 32, dict()),
    "window": (1, 230, 230, 2, 1, 32, dict(local_window_size=(30, 7))),
    "segments_lengths": (2, 160, 160, 2, 2, 16, dict(is_causal=True)),
}


def _data_masks(name, b, t, rng):
    if name != "segments_lengths":
        return {}, {}
    seg = np.sort(rng.integers(0, 3, (b, t)), axis=1).astype(np.int32)
    q_len = np.array([t, t - 37], np.int32)
    return (
        dict(segment_ids=seg, query_seq_lengths=q_len, key_value_seq_lengths=q_len),
        dict(segment_ids=seg, q_lengths=q_len, kv_lengths=q_len),
    )


def _xla_grads(q, k, v, do, vis, kwargs):
    """jax.nn.dot_product_attention(implementation='xla') gradients; fully masked rows contribute nothing."""
    seen = jnp.asarray(vis.any(-1))[:, :, None, None]
    xla_kwargs = dict(is_causal=kwargs.get("is_causal", False), local_window_size=kwargs.get("local_window_size"))
    if "segment_ids" in kwargs:
        xla_kwargs = dict(mask=jnp.asarray(vis[:, None]))

    def f(q, k, v):
        return jnp.where(seen, jax.nn.dot_product_attention(q, k, v, implementation="xla", **xla_kwargs), 0)

    return jax.vjp(f, q, k, v)[1](do)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("split", [False, True], ids=["whole", "many_subproblems"])
@pytest.mark.parametrize("name", list(GRAD_CASES))
def test_gradients_match_float64_within_xla_error(name, split, dtype):
    b, t, s, n, kh, h, kwargs = GRAD_CASES[name]
    rng = np.random.default_rng(abs(hash((name, split))) % 2**32)
    q, k, v = random_inputs(rng.integers(2**31), b, t, s, n, kh, h, dtype)
    do = jnp.asarray(rng.standard_normal((b, t, n, h)), dtype)
    extra, ref_extra = _data_masks(name, b, t, rng)
    rk = dict(is_causal=kwargs.get("is_causal", False), window=kwargs.get("local_window_size"), **ref_extra)
    vis = visibility(t, s, b, **rk)
    ref = attention_grads(as64(q), as64(k), as64(v), as64(do), **rk)
    base = [rel_error(as64(g), r) for g, r in zip(_xla_grads(q, k, v, do, vis, {**kwargs, **extra}), ref)]

    plan = None
    if split:
        # 13 chunks in the forward and (the same forced chunking) in the backward pass
        plan = sc.plan(q_len=t, kv_len=s, num_q_heads=n, num_kv_heads=kh, head_dim=h, dtype=dtype, batch=b,
                       is_causal=kwargs.get("is_causal", False), local_window_size=kwargs.get("local_window_size"),
                       num_chunks=13)
        assert len(plan.subproblems) >= 7 and plan.backward().cover == plan.cover

    f = lambda q, k, v: sc.dot_product_attention(q, k, v, plan=plan, **kwargs, **extra)
    grads = jax.vjp(f, q, k, v)[1](do)
    for name_, g, r, e in zip("qkv", grads, ref, base):
        assert g.dtype == dtype
        assert rel_error(as64(g), r) <= 1.5 * e, name_


def test_budget_splits_the_backward_and_keeps_gradients_exact():
    # The backward holds more per token than the forward (residuals and three
    # gradient accumulators), so under one budget it is cut more finely.
    shape = dict(q_len=700, num_q_heads=2, num_kv_heads=1, head_dim=16, is_causal=True)
    budget = forcing_budget(31, backward=True, **shape)
    p = sc.plan(**shape, memory_budget=budget)
    assert len(p.backward().subproblems) >= 7 and p.backward().num_chunks > p.num_chunks
    assert max(p.estimated_peak_bytes, p.backward().estimated_peak_bytes) <= budget
    q, k, v = random_inputs(21, 1, 700, 700, 2, 1, 16, jnp.float32)
    do = np.random.default_rng(22).standard_normal(q.shape).astype(np.float32)
    f = lambda q, k, v: sc.dot_product_attention(q, k, v, is_causal=True, memory_budget=budget)
    grads = jax.vjp(f, q, k, v)[1](jnp.asarray(do))
    ref = attention_grads(q, k, v, do, is_causal=True)
    for g, r in zip(grads, ref):
        assert rel_error(g, r) < 2e-6


def test_lse_cotangent_is_supported():
    q, k, v = random_inputs(1, 1, 97, 97, 2, 1, 16, jnp.float32)
    rng = np.random.default_rng(2)
    do = rng.standard_normal(q.shape).astype(np.float32)
    dlse = rng.standard_normal((1, 2, 97)).astype(np.float32)
    budget = forcing_budget(7, backward=True, q_len=97, num_q_heads=2, num_kv_heads=1, head_dim=16, is_causal=True)
    f = lambda q, k, v: sc.dot_product_attention(q, k, v, is_causal=True, return_residuals=True, memory_budget=budget)
    grads = jax.vjp(f, q, k, v)[1]((jnp.asarray(do), jnp.asarray(dlse)))
    ref = attention_grads(q, k, v, do, dlse=dlse, is_causal=True)
    for g, r in zip(grads, ref):
        assert rel_error(g, r) < 1e-5


def _x64():
    return jax.enable_x64(True) if hasattr(jax, "enable_x64") else contextlib.nullcontext()


@pytest.mark.parametrize("kwargs", [dict(is_causal=True), dict(local_window_size=(3, 2)), dict()])
def test_finite_differences_float64(kwargs):
    from jax.test_util import check_grads

    with _x64():
        rng = np.random.default_rng(4)
        q = jnp.asarray(rng.standard_normal((1, 13, 2, 4)))
        k = jnp.asarray(rng.standard_normal((1, 11, 1, 4)))
        v = jnp.asarray(rng.standard_normal((1, 11, 1, 4)))
        assert q.dtype == jnp.float64
        p = sc.plan(q_len=13, kv_len=11, num_q_heads=2, num_kv_heads=1, head_dim=4, dtype=jnp.float64,
                    num_chunks=3, **{("local_window_size" if "local" in key else key): val for key, val in kwargs.items()})
        f = lambda q, k, v: sc.dot_product_attention(q, k, v, plan=p, **kwargs)
        check_grads(f, (q, k, v), order=1, modes=("rev",), atol=1e-6, rtol=1e-6)


def test_gradients_are_bitwise_repeatable():
    q, k, v = random_inputs(8, 1, 200, 200, 2, 1, 32, jnp.bfloat16)
    budget = forcing_budget(13, backward=True, q_len=200, num_q_heads=2, num_kv_heads=1, head_dim=32,
                            dtype=jnp.bfloat16, is_causal=True)
    loss = lambda q, k, v: jnp.sum(
        sc.dot_product_attention(q, k, v, is_causal=True, memory_budget=budget).astype(jnp.float32) ** 2
    )
    g1 = jax.grad(loss, argnums=(0, 1, 2))(q, k, v)
    g2 = jax.grad(loss, argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(g1, g2):
        np.testing.assert_array_equal(np.asarray(a.astype(jnp.float32)), np.asarray(b.astype(jnp.float32)))


def test_composes_with_jit_vmap_remat_and_outer_grad():
    q, k, v = random_inputs(9, 3, 64, 64, 2, 2, 16, jnp.float32)
    budget = forcing_budget(7, backward=True, q_len=64, num_q_heads=2, head_dim=16, is_causal=True)

    def attend(q, k, v):  # unbatched [T, N, H]
        return sc.dot_product_attention(q, k, v, is_causal=True, memory_budget=budget)

    def loss(params, q, k, v):
        out = jax.vmap(jax.checkpoint(attend))(q * params["a"], k, v)
        return jnp.mean(jnp.tanh(out) * params["b"])

    params = {"a": jnp.float32(1.3), "b": jnp.float32(0.7)}
    got = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))(params, q, k, v)

    def dense_loss(params, q, k, v):
        out = jax.nn.dot_product_attention(q * params["a"], k, v, is_causal=True)
        return jnp.mean(jnp.tanh(out) * params["b"])

    want = jax.grad(dense_loss, argnums=(0, 1, 2, 3))(params, q, k, v)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=2e-4, atol=2e-6)


@pytest.mark.parametrize("t", [32768, 32749])
def test_forward_and_backward_temporaries_stay_within_budget(t):
    """A 64 MiB budget holds at T = 32K, where dense attention's score matrix alone is 4 GiB.

    (float32: XLA's CPU backend upcasts 16-bit arrays inside loops, which the
    memory model, written for accelerators, does not count.)
    """
    n, h = 1, 64
    budget = 64 * 2**20
    spec = jax.ShapeDtypeStruct((1, t, n, h), jnp.float32)

    def loss(q, k, v):
        return jnp.sum(sc.dot_product_attention(q, k, v, is_causal=True, memory_budget=budget))

    compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(spec, spec, spec).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    plan = sc.plan(q_len=t, num_q_heads=n, head_dim=h, is_causal=True, memory_budget=budget)
    estimate = max(plan.estimated_peak_bytes, plan.backward().estimated_peak_bytes)
    assert temp <= estimate <= budget, (temp, estimate)

    def dense_loss(q, k, v):
        return jnp.sum(jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="xla"))

    dense = jax.jit(jax.grad(dense_loss, argnums=(0, 1, 2))).lower(spec, spec, spec).compile()
    assert dense.memory_analysis().temp_size_in_bytes > 10 * budget
