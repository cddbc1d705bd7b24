"""bench/device_reference.py's blocked float64 reference agrees with the tests' dense one."""

import os
import sys

import numpy as np
import pytest

from reference import attention, attention_grads

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))

import device_reference  # noqa: E402


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("n,block", [(150, 64), (128, 32), (37, 2048)])
def test_blocked_reference_matches_the_dense_one(n, block, causal):
    """Lengths that are not a multiple of the block (padding rows and keys), one block, several; logits
    large enough that a softmax without its running maximum would overflow."""
    rng = np.random.default_rng(n)
    q, k, v, do = (rng.standard_normal((1, n, 1, 16)) * 3.0 for _ in range(4))
    q[0, n // 2] *= 40.0
    out, _ = attention(q, k, v, is_causal=causal)
    grads = attention_grads(q, k, v, do, is_causal=causal)
    got = device_reference.head_reference(q[0, :, 0], k[0, :, 0], v[0, :, 0], do[0, :, 0], causal, block)
    for name, g, r in zip(("out", "dq", "dk", "dv"), got, (out, *grads)):
        assert g.dtype == np.float64, name
        np.testing.assert_allclose(np.asarray(g), r[0, :, 0], rtol=1e-9, atol=1e-11, err_msg=name)


def test_output_alone_skips_the_gradients(monkeypatch):
    """Without gradients to check, the reference is the output alone, the same as with them."""
    rng = np.random.default_rng(1)
    q, k, v, do = (rng.standard_normal((100, 8)) for _ in range(4))
    full = device_reference.head_reference(q, k, v, do, True, 32)
    alone = device_reference.head_reference(q, k, v, do, True, 32, grads=False)
    assert len(alone) == 1
    np.testing.assert_allclose(np.asarray(alone[0]), np.asarray(full[0]), rtol=1e-14, atol=0)
    asked = []
    reference = device_reference.head_reference
    monkeypatch.setattr(device_reference, "head_reference", lambda *a: asked.append(a[-1]) or reference(*a))
    errors = device_reference.relative_errors(*(x[None, :, None] for x in (q, k, v, do)), True,
                                              {"out only": (full[0][None, :, None],)}, block=32)
    assert asked == [False]  # the one head's reference, without gradients
    assert list(errors) == ["out only"] and list(errors["out only"]) == ["out"]
    assert errors["out only"]["out"] < 1e-14


def test_relative_errors_over_every_head():
    """Errors of the exact answer are 0; of a perturbed one, the perturbation's relative size, summed
    over heads in squares."""
    rng = np.random.default_rng(0)
    q, k, v, do = (rng.standard_normal((1, 70, 2, 8)) for _ in range(4))
    exact = (attention(q, k, v, is_causal=True)[0], *attention_grads(q, k, v, do, is_causal=True))
    off = [x.copy() for x in exact]
    off[2][0, :, 1] *= 1.01  # dk of the second head, 1% too large
    errors = device_reference.relative_errors(q, k, v, do, True, {"exact": exact, "off": off}, block=32)
    assert max(errors["exact"].values()) < 1e-12
    dk = exact[2]
    expected = 0.01 * np.linalg.norm(dk[0, :, 1]) / np.linalg.norm(dk)
    assert errors["off"]["dk"] == pytest.approx(expected, rel=1e-6)
    assert errors["off"]["dq"] < 1e-12


def test_check_every_row_gives_the_host_checks_errors():
    """check_accuracy.py: `--reference device` and the host reference on every row report the same
    errors for the same inputs."""
    import check_accuracy

    args = (300, 2, 32, True)
    host = check_accuracy.check(*args, None, ["xla"], grads=True, seed=3)
    device = check_accuracy.check_every_row(*args, ["xla"], grads=True, seed=3)
    assert device["reference"] == "device" and device["rows_checked"] == host["rows_checked"] == 300
    assert device["errors"]["xla"] == pytest.approx(host["errors"]["xla"], rel=1e-9)
    for g in ("dq", "dk", "dv"):
        assert device["grad_errors"]["xla"][g] == pytest.approx(host["grad_errors"]["xla"][g], rel=1e-9)
