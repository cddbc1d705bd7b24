"""bench/profile_case.py: the one profiled run sits inside the capture range, and only it."""

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))

import profile_case  # noqa: E402


class _Runtime:
    """Stands in for the CUDA runtime library: logs the profiler calls."""

    def __init__(self, log, start_status=0):
        self.log, self.start_status = log, start_status

    def cudaProfilerStart(self):
        self.log.append("start")
        return self.start_status

    def cudaProfilerStop(self):
        self.log.append("stop")
        return 0


def test_capture_range_closes_even_when_the_run_fails(monkeypatch):
    log = []
    monkeypatch.setattr(profile_case, "_cuda_runtime", lambda: _Runtime(log))
    with pytest.raises(RuntimeError):
        with profile_case.capture_range() as captured:
            assert captured
            log.append("run")
            raise RuntimeError("the run broke")
    assert log == ["start", "run", "stop"]


def test_capture_range_that_did_not_start_is_not_stopped(monkeypatch):
    log = []
    monkeypatch.setattr(profile_case, "_cuda_runtime", lambda: _Runtime(log, start_status=1))
    with profile_case.capture_range() as captured:
        assert not captured
    assert log == ["start"]


def test_only_the_run_after_the_warm_up_is_captured(monkeypatch, capsys):
    log = []
    monkeypatch.setattr(profile_case, "_cuda_runtime", lambda: _Runtime(log))
    monkeypatch.setattr(profile_case.benchmark, "prepare_case", lambda *a: ({}, lambda: log.append("run")))
    assert profile_case.main(["--implementation", "xla", "--seq-len", "256", "--head-dim", "32"]) == 0
    assert log == ["run", "start", "run", "stop"]
    assert "inside a capture range" in capsys.readouterr().out


def test_a_case_that_fails_to_compile_is_reported(capsys):
    assert profile_case.main(["--implementation", "no_such_kernel", "--seq-len", "256", "--head-dim", "32"]) == 1
    assert "no_such_kernel" in capsys.readouterr().err


def test_a_forward_launch_given_is_the_one_compiled(monkeypatch):
    seen = []

    def prepare(*_):
        seen.append(profile_case.launches.mosaic_gpu.default_launch(64))
        return {}, lambda: None

    monkeypatch.setattr(profile_case, "_cuda_runtime", lambda: None)
    monkeypatch.setattr(profile_case.benchmark, "prepare_case", prepare)
    args = ["--seq-len", "256", "--head-dim", "64"]
    assert profile_case.main(args + ["--forward-launch", "128,2,heavy,wg3"]) == 0
    assert profile_case.main(args) == 0
    assert [launch.warpgroups for launch in seen] == [3, 2]
