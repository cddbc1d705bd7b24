"""bench/check_accuracy.py's row-blocked float64 reference agrees with the tests' dense one."""

import os
import sys

import numpy as np
import pytest

from reference import attention, attention_grads

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))

import check_accuracy  # noqa: E402


@pytest.mark.parametrize("causal", [True, False])
def test_row_blocked_reference_matches_the_dense_one(causal):
    rng = np.random.default_rng(3)
    q, k, v, do = (rng.standard_normal((2, 150, 3, 16)) * 2.0 for _ in range(4))
    out, _ = attention(q, k, v, is_causal=causal)
    dq, dk, dv = attention_grads(q, k, v, do, is_causal=causal)
    every = np.arange(150)
    np.testing.assert_allclose(check_accuracy.reference_rows(q, k, v, every, causal), out, rtol=1e-10, atol=1e-12)
    got = check_accuracy.reference_grads(q, k, v, do, every, causal)
    for name, g, r in zip(("dq", "dk", "dv"), got, (dq, dk, dv)):
        np.testing.assert_allclose(g, r, rtol=1e-10, atol=1e-12, err_msg=name)
    # Sampled rows (across the 64-row blocks) with a cotangent that is zero elsewhere: dk and dv are
    # exact for every key.
    sampled = np.array([0, 7, 64, 149])
    sparse = np.zeros_like(do)
    sparse[:, sampled] = do[:, sampled]
    dq, dk, dv = attention_grads(q, k, v, sparse, is_causal=causal)
    got = check_accuracy.reference_grads(q, k, v, sparse, sampled, causal)
    for name, g, r in zip(("dq", "dk", "dv"), got, (dq[:, sampled], dk, dv)):
        np.testing.assert_allclose(g, r, rtol=1e-10, atol=1e-12, err_msg=name)
