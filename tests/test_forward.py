"""Forward pass through the public API: residuals, layouts, budgets, jit.

Kernel accuracy against float64 and XLA lives in test_kernels.py.
"""

import jax
import jax.numpy as jnp
import numpy as np

import stream_cqsa_jax as sc
from conftest import forcing_budget
from reference import attention, random_inputs, rel_error


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
