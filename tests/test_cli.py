"""The command line: every subcommand runs and prints what the library computes."""

import importlib.util
import os
import re
import struct
import subprocess
import sys
import tomllib
import zlib

import numpy as np
import pytest

import stream_cqsa_jax as sc
from stream_cqsa_jax import cli
from stream_cqsa_jax._src import visualize

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPE = ["--q-len", "4096", "--heads", "4", "--kv-heads", "2", "--head-dim", "64", "--causal", "--num-chunks", "7"]
PLAN_ARGS = dict(q_len=4096, num_q_heads=4, num_kv_heads=2, head_dim=64, is_causal=True, num_chunks=7)


def run(capsys, *argv):
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_plan_prints_the_plan(capsys):
    code, out, _ = run(capsys, "plan", *SHAPE, "--backward", "--subproblems")
    assert code == 0
    p = sc.plan(**PLAN_ARGS)
    assert p.summary() in out and p.backward().summary() in out
    rows = [line for line in out.splitlines() if re.match(r"^\s+\d+\s+\d+\s+[\d,]+", line)]
    assert len(rows) == len(p.subproblems) == 7
    assert all(line.split()[-1] == "4" for line in rows)  # 28 causal pairs over 7 subproblems


def test_plan_for_host_resident_inputs_says_where_each_array_lives(capsys):
    args = ["--q-len", "1048576", "--heads", "8", "--head-dim", "64", "--dtype", "bfloat16", "--causal",
            "--budget", "1GiB", "--implementation", "xla"]
    code, out, _ = run(capsys, "plan", *args, "--executor", "offload")
    assert code == 0
    p = sc.plan(q_len=1048576, num_q_heads=8, head_dim=64, dtype="bfloat16", is_causal=True, memory_budget="1GiB",
                implementation="xla", executor="offload")
    assert p.summary() in out and "float32 state of one query chunk on the device" in out
    code, _, err = run(capsys, "plan", *args)  # with inputs on the device the accumulators alone need 2 GiB
    assert code == 2 and "executor='offload'" in err


def test_plan_error_names_the_argument(capsys):
    code, _, err = run(capsys, "plan", "--q-len", "100", "--heads", "3", "--kv-heads", "2", "--head-dim", "8")
    assert code == 2 and "num_q_heads=3" in err and "num_kv_heads=2" in err
    code, _, err = run(capsys, "plan", "--q-len", "4096", "--heads", "4", "--head-dim", "64", "--budget", "1KiB")
    assert code == 2 and "smallest budget that works" in err


def test_estimate_reports_the_model_and_a_labelled_rough_time(capsys):
    code, out, _ = run(capsys, "estimate", *SHAPE, "--tflops", "2")
    assert code == 0
    p = sc.plan(**PLAN_ARGS)
    assert f"({p.estimated_peak_bytes} bytes)" in out
    assert f"({p.backward().estimated_peak_bytes} bytes)" in out
    assert "ROUGH TIME ESTIMATE (not a measurement)" in out
    pairs = 4096 * 4097 // 2
    assert f"{pairs:,} visible logits" in out
    seconds = 4 * 4 * 64 * pairs / 2e12  # forward: 4 flops per logit and head dim, 4 heads, 2 TFLOP/s
    assert f"forward ~{seconds * 1e3:.1f} ms" in out


def test_estimate_survives_a_backward_that_does_not_fit(capsys):
    kw = dict(q_len=4096, num_q_heads=4, head_dim=64, is_causal=True)
    budget = sc.plan(**kw, memory_budget="1GiB").estimated_peak_bytes
    code, out, _ = run(capsys, "estimate", "--q-len", "4096", "--heads", "4", "--head-dim", "64", "--causal",
                       "--budget", str(budget))  # fmt: skip
    assert code == 0 and "backward peak      : does not fit" in out and "smallest budget" in out


@pytest.mark.parametrize("t, s", [(1, 1), (7, 7), (13, 5), (5, 13)])
@pytest.mark.parametrize("left, right", [(None, None), (None, 0), (2, 0), (3, 1), (0, 0), (None, 4), (20, 20)])
def test_visible_pairs_is_exact(t, s, left, right):
    i, j = np.meshgrid(np.arange(t), np.arange(s), indexing="ij")
    visible = np.ones((t, s), bool)
    if left is not None:
        visible &= j >= i - left
    if right is not None:
        visible &= j <= i + right
    assert cli.visible_pairs(t, s, left, right) == int(visible.sum())


def read_png(path):
    """(width, height, uint8 [height, width, 3]) of an unfiltered 8-bit RGB PNG."""
    data = open(path, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, {}
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])
        assert crc == zlib.crc32(kind + body) & 0xFFFFFFFF
        chunks[kind] = chunks.get(kind, b"") + body
        pos += 12 + length
    width, height, depth, colour, _, _, _ = struct.unpack(">IIBBBBB", chunks[b"IHDR"])
    assert (depth, colour) == (8, 2) and b"IEND" in chunks
    raw = np.frombuffer(zlib.decompress(chunks[b"IDAT"]), np.uint8).reshape(height, 1 + 3 * width)
    assert (raw[:, 0] == 0).all()
    return width, height, raw[:, 1:].reshape(height, width, 3)


def test_visualize_writes_the_ownership_matrix(capsys, tmp_path):
    path = str(tmp_path / "s.png")
    code, out, _ = run(capsys, "visualize", *SHAPE, "--cell", "10", "-o", path)
    assert code == 0 and f"wrote {path}" in out
    p = sc.plan(**PLAN_ARGS)
    width, height, image = read_png(path)
    assert (width, height) == (70, 70 + 12 + 120)
    owner = visualize.ownership(p)
    colours = visualize.palette(len(p.subproblems))
    for a in range(7):
        for b in range(7):
            pixel = image[10 * a + 5, 10 * b + 5]
            want = colours[owner[a, b]] if b <= a else (225, 225, 225)  # causal: pairs above the diagonal skipped
            assert tuple(pixel) == tuple(want), (a, b)
    for s, sub in enumerate(p.subproblems):  # each owned pair really belongs to that subproblem
        assert all(owner[a, b] == s for a, b in sub.pairs)
    assert "0 . . . . . ." in out  # the text matrix: chunk 0 sees only itself


def test_bench_delegates_to_the_benchmark_suite(capsys, monkeypatch):
    if importlib.util.find_spec("stream_cqsa_jax.benchmark") is None:
        pytest.skip("stream_cqsa_jax.benchmark (the benchmark suite) is not in this checkout")
    import stream_cqsa_jax.benchmark as benchmark

    seen = []
    monkeypatch.setattr(benchmark, "main", lambda argv: seen.append(argv) or 0)
    assert cli.main(["bench", "--quick", "--iters", "1"]) == 0
    assert seen == [["--quick", "--iters", "1"]]


@pytest.mark.skipif(importlib.util.find_spec("stream_cqsa_jax.benchmark") is None, reason="no benchmark suite")
def test_bench_quick_runs_and_prints_a_table(capsys):
    assert cli.main(["bench", "--quick", "--causal", "yes", "--directions", "fwd"]) == 0
    out = capsys.readouterr().out
    assert len([line for line in out.splitlines() if line.strip()]) >= 3 and "xla" in out


def test_module_entry_point_and_console_script():
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run([sys.executable, "-m", "stream_cqsa_jax", "--help"], capture_output=True, text=True, env=env)
    assert done.returncode == 0
    for command in ("plan", "estimate", "visualize", "bench"):
        assert command in done.stdout
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        scripts = tomllib.load(f)["project"]["scripts"]
    assert scripts["stream-cqsa-jax"] == "stream_cqsa_jax.cli:main"
