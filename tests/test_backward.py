"""Gradients through the public API: budgets, lse cotangents, finite differences, transformations, memory.

Kernel accuracy against float64 and XLA lives in test_kernels.py.
"""

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import stream_cqsa_jax as sc
from conftest import forcing_budget
from reference import attention_grads, random_inputs, rel_error


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


def test_deterministic_backward_switch_reaches_the_kernels(monkeypatch):
    """`deterministic_backward=False` travels from the call to every backward kernel call; where no kernel
    varies its order (here, the XLA kernel) the gradients keep their bits. A malformed value is refused
    even with a plan."""
    from stream_cqsa_jax._src import executor

    seen = []
    config = executor.kernel_config
    monkeypatch.setattr(executor, "kernel_config", lambda plan, scale: seen.append(plan.deterministic_backward)
                        or config(plan, scale))
    q, k, v = random_inputs(23, 1, 300, 300, 2, 1, 16, jnp.float32)
    budget = forcing_budget(7, backward=True, q_len=300, num_q_heads=2, num_kv_heads=1, head_dim=16, is_causal=True)
    grads = {}
    for deterministic in (True, False):
        f = lambda q, k, v: sc.dot_product_attention(q, k, v, is_causal=True, memory_budget=budget,
                                                     deterministic_backward=deterministic).sum()
        seen.clear()
        jax.clear_caches()  # traced programs are cached per plan: trace this one here
        grads[deterministic] = [np.asarray(g) for g in jax.grad(f, argnums=(0, 1, 2))(q, k, v)]
        assert seen and set(seen) == {deterministic}
    for a, b in zip(grads[True], grads[False]):
        np.testing.assert_array_equal(a, b)
    plan = sc.plan(q_len=300, num_q_heads=2, num_kv_heads=1, head_dim=16, is_causal=True)
    with pytest.raises(TypeError, match="deterministic_backward"):
        sc.dot_product_attention(q, k, v, is_causal=True, plan=plan, deterministic_backward="no")


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
