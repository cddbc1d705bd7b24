"""The benchmark module: timing orders (programs timed alone or in turns) and its cases."""

import pytest

from stream_cqsa_jax import benchmark

CASE = benchmark.Case(256, 32, True, "fwd", heads=2, dtype="float32")


def test_turn_order_alternates_direction():
    assert benchmark.turn_order(3, 4) == [[0, 1, 2], [2, 1, 0], [0, 1, 2], [2, 1, 0]]
    assert benchmark.turn_order(2, 1) == [[0, 1]]


def _recording(log: list, name: str, fail_on: int | None = None):
    calls = []

    def run():
        calls.append(None)
        if fail_on is not None and len(calls) == fail_on:
            raise RuntimeError(f"{name} broke")
        log.append(name)

    return {"implementation": name}, run


def test_run_interleaved_warms_each_then_takes_turns():
    log = []
    prepared = [_recording(log, "a"), _recording(log, "b"), _recording(log, "c")]
    rows = benchmark.run_interleaved(prepared, CASE, rounds=3)
    assert log == ["a", "b", "c"] + ["a", "b", "c"] + ["c", "b", "a"] + ["a", "b", "c"]
    for row in rows:
        assert len(row["all_seconds"]) == 3 and row["seconds"] > 0 and row["interleaved_rounds"] == 3
        assert row["tflops"] == pytest.approx(CASE.flops() / row["seconds"] / 1e12)


def test_run_interleaved_drops_a_program_that_fails_and_keeps_the_others():
    log = []
    prepared = [_recording(log, "a"), _recording(log, "b", fail_on=3), ({"implementation": "c", "error": "x"}, None)]
    a, b, c = benchmark.run_interleaved(prepared, CASE, rounds=3)
    assert log == ["a", "b", "a", "b", "a", "a"]  # b fails on its second timed run
    assert len(a["all_seconds"]) == 3
    assert b["error"] == "RuntimeError: b broke" and "seconds" not in b
    assert c["error"] == "x" and "seconds" not in c


def test_interleaved_and_alone_time_the_same_programs_on_cpu():
    inputs = benchmark.case_inputs(CASE)
    prepared = [benchmark.prepare_case(impl, CASE, args=inputs) for impl in ("xla_dense", "xla")]
    for row in benchmark.run_interleaved(prepared, CASE, rounds=2):
        assert "error" not in row and len(row["all_seconds"]) == 2
    alone = benchmark.time_alone(*benchmark.prepare_case("xla", CASE), CASE, iters=2)
    assert "error" not in alone and len(alone["all_seconds"]) == 2


def test_prepare_case_records_a_bad_implementation_as_an_error():
    row, run = benchmark.prepare_case("no_such_kernel", CASE)
    assert run is None and "no_such_kernel" in row["error"]
    assert benchmark.time_alone(row, run, CASE, iters=1) is row and "seconds" not in row


def test_cli_interleave_prints_a_table(capsys):
    argv = ["--quick", "--causal", "yes", "--directions", "fwd", "--interleave", "--iters", "2"]
    assert benchmark.main(argv) == 0
    out = capsys.readouterr().out
    assert "| 512 | 32 | yes | fwd | xla_dense |" in out and "| 512 | 32 | yes | fwd | xla |" in out


def test_case_forward_launch_follows_the_key_array_size():
    """One subproblem of the whole case: pairs at head dim 128, and at 64 for a dense key array of 2^23
    rows or more (`mosaic_gpu.LARGE_KEYS`), single blocks otherwise."""
    assert benchmark.Case(65536, 128, False, "fwd").forward_launch().cluster == 2
    assert benchmark.Case(65536, 64, False, "fwd").forward_launch().cluster == 1
    assert benchmark.Case(1 << 20, 64, False, "fwd").forward_launch().cluster == 2
    assert benchmark.Case(1 << 19, 64, False, "fwd_bwd", batch=2).forward_launch().cluster == 2
    assert benchmark.Case(1 << 20, 64, True, "fwd").forward_launch().cluster == 1
    assert benchmark.Case(1 << 20, 64, False, "fwd", heads=2).forward_launch().cluster == 1


def test_deterministic_cudnn_is_a_baseline_compiled_with_xla_deterministic_ops():
    assert benchmark.is_baseline("cudnn:deterministic") and benchmark.is_baseline("xla_dense")
    assert not benchmark.is_baseline("xla") and not benchmark.is_baseline("mosaic_gpu:nondeterministic")
    assert benchmark.compiler_options("cudnn:deterministic") == {"xla_gpu_deterministic_ops": True}
    assert benchmark.compiler_options("cudnn") is None and benchmark.compiler_options("xla") is None
    with pytest.raises(ValueError, match="only variant"):
        benchmark.split_variant("xla:deterministic")  # the variant is cuDNN's alone


def test_ratios_are_taken_against_each_baseline_of_the_case():
    key = dict(seq_len=256, head_dim=32, causal=True, direction="fwd_bwd", batch=1, heads=2, dtype="bfloat16")
    rows = [{"implementation": impl, "seconds": s, **key}
            for impl, s in (("cudnn", 1.0), ("cudnn:deterministic", 1.5), ("mosaic_gpu", 1.2))]
    benchmark.add_ratios(rows)
    ours = rows[2]
    assert ours["ratio_vs_cudnn"] == pytest.approx(1.0 / 1.2)
    assert ours["ratio_vs_cudnn:deterministic"] == pytest.approx(1.5 / 1.2)
    assert "ratio_vs_xla_dense" not in ours
