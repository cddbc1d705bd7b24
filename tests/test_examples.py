"""The examples run with small flags and do what they claim."""

import importlib.util
import os
import re
import runpy
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load(name):
    path = os.path.join(ROOT, "examples", f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"example_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def train():
    return load("train_long_context")


SMALL = [
    "--seq-len", "256", "--start-len", "32", "--growth", "8", "--stage-steps", "2", "--num-keys", "16",
    "--num-values", "16", "--queries", "4", "--tokens-per-step", "2048", "--eval-batches", "1", "--num-chunks", "3",
]  # fmt: skip


def test_train_long_context_learns_recall(train, capsys):
    result = train.main(SMALL + ["--first-steps", "100"])
    out = capsys.readouterr().out
    assert "lax.scan over 3 subproblems" in out  # the attention really decomposes
    steps = re.findall(r"^step +(\d+) +len +(\d+) .* loss +([\d.]+) +accuracy +([\d.]+)", out, re.M)
    assert len(steps) == result["steps"] == 102 and steps[-1][1] == "256"
    assert float(steps[-1][2]) < 0.5 * float(steps[0][2])
    assert result["chance"] == 1 / 16
    assert result["accuracy"] > 0.5  # chance is 0.0625


def test_train_long_context_is_deterministic(train, capsys):
    tiny = SMALL + ["--seq-len", "64", "--start-len", "64", "--first-steps", "4", "--tokens-per-step", "512"]
    tiny += ["--eval-batches", "0", "--seed", "5"]
    runs = []
    for _ in range(2):
        train.main(tiny)
        runs.append(re.findall(r"loss +([\d.]+) +accuracy +([\d.]+)", capsys.readouterr().out))
    assert len(runs[0]) == 4 and runs[0] == runs[1]  # the same losses, step by step


def test_train_long_context_rejects_bad_flags(train):
    with pytest.raises(SystemExit):
        train.parse_args(["--start-len", "512", "--seq-len", "256"])
    with pytest.raises(ValueError, match="--queries"):
        train.RecallTask(4, 4, 4, queries=5)


def test_visualize_schedule_writes_pictures(tmp_path, capsys):
    paths = load("visualize_schedule").main(["--q-len", "512", "--num-chunks", "7", "--out-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert [os.path.basename(p) for p in paths] == ["schedule_dense.png", "schedule_causal.png", "schedule_window.png"]
    for p in paths:
        with open(p, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert out.count("every visible chunk pair computed exactly once") == 3
    assert "cover {0, 1, 3} of Z_7" in out


def test_quickstart_runs_and_is_accurate(monkeypatch, capsys):
    argv = ["quickstart.py", "--seq-len", "301", "--budget", "1MiB", "--check-rows", "8", "--head-dim", "16"]
    monkeypatch.setattr(sys, "argv", argv)
    runpy.run_path(os.path.join(ROOT, "examples", "quickstart.py"), run_name="__main__")
    out = capsys.readouterr().out
    error = float(re.search(r"relative error vs float64 on \d+ query rows: ([0-9.e+-]+)", out).group(1))
    assert error < 1e-5


def test_out_of_core_streams_what_the_device_budget_refuses_and_runs_on_host_arrays(capsys):
    error = load("out_of_core").main(["--tokens", "3001", "--heads", "4", "--kv-heads", "2", "--head-dim", "16",
                                      "--budget", "700KiB", "--rows", "6"])
    out = capsys.readouterr().out
    assert "device-resident attention refused" in out and "streaming executor" in out
    assert "out-of-core executor" in out and "output in pinned_host memory" in out
    assert "gradients in pinned_host memory, all finite: True" in out
    assert error < 1e-5
