"""Argument parsing of bench/mosaic_kernel.py, the launches the bench scripts run under (bench/launches.py),
the CSV reading of bench/ncu_metrics.py and the bit comparisons of bench/repeatability.py."""

import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))

import launches  # noqa: E402
import mosaic_kernel  # noqa: E402
import ncu_metrics  # noqa: E402
import repeatability  # noqa: E402
from stream_cqsa_jax._src.kernels import mosaic_gpu, mosaic_gpu_backward  # noqa: E402


def test_forward_launch_flags():
    plain = mosaic_kernel.forward_launch("128,2")
    assert (plain.block_kv, plain.stages, plain.heavy_first, plain.cluster) == (128, 2, False, 1)
    paired = mosaic_kernel.forward_launch("64,3,heavy,cluster2")
    assert (paired.block_kv, paired.stages, paired.heavy_first, paired.cluster) == (64, 3, True, 2)
    assert mosaic_kernel.forward_launch("128,2,heavy,scoresfirst").scores_first and not paired.scores_first
    assert mosaic_kernel.forward_launch("128,2,namedturns").named_turns and not paired.named_turns
    assert mosaic_kernel.forward_launch("128,2,exp2fma3").exp2_on_fma == 3 and paired.exp2_on_fma == 0
    assert mosaic_kernel.forward_launch("128,2,heavy,wg3").warpgroups == 3 and paired.warpgroups == 2
    with pytest.raises(ValueError, match="'heavy', 'cluster2', 'scoresfirst', 'namedturns', 'wg3' and one 'exp2fmaN'"):
        mosaic_kernel.forward_launch("128,2,cluster4")
    for text in ("128,2,exp2fma2,exp2fma4", "128,2,exp2fma"):
        with pytest.raises(ValueError, match="one 'exp2fmaN'"):
            mosaic_kernel.forward_launch(text)
    with pytest.raises(ValueError, match=r"exp2_on_fma must be in \[0, 16\]"):
        mosaic_kernel.forward_launch("128,2,exp2fma17")
    for flag in ("valuesfirst", "psmem"):  # removed options
        with pytest.raises(ValueError, match="flags after the numbers"):
            mosaic_kernel.forward_launch(f"128,2,heavy,{flag}")
    for text in ("128,2", "64,3,heavy,cluster2", "128,2,cluster2", "128,2,heavy,cluster2,scoresfirst",
                 "128,2,heavy,cluster2,namedturns", "128,2,heavy,cluster2,scoresfirst,namedturns",
                 "128,2,heavy,exp2fma4", "128,2,heavy,scoresfirst,exp2fma2,wg3"):
        # how backward rows record the forward's
        assert mosaic_kernel.launch_text(mosaic_kernel.forward_launch(text)) == text


def test_backward_launch_flags():
    launch = mosaic_kernel.backward_launch("128,2,64,2,paired,seg8,cluster2")
    assert launch.dkv_paired and launch.dq_segment == 8 and launch.dq_cluster == 2 and not launch.dq_flush
    assert mosaic_kernel.backward_launch("128,2,64,2,seg8,flush").dq_cluster == 1
    both = mosaic_kernel.backward_launch("128,2,64,2,seg8,flush,dkvcluster2")
    assert (both.dq_cluster, both.dkv_cluster, both.dq_flush) == (1, 2, True)
    assert mosaic_kernel.backward_launch("128,2,64,2,paired,seg8,dqturns").dq_turns and not both.dq_turns
    named = mosaic_kernel.backward_launch("128,2,64,2,paired,seg8,dqturns,dqnamed")
    assert named.dq_turns and named.dq_named_turns and not both.dq_named_turns
    assert mosaic_kernel.backward_launch("128,2,64,2,seg8,flush,pass65536").dq_pass_keys == 65536
    assert mosaic_kernel.backward_launch("128,2,64,2,seg8,flush").dq_pass_keys == 0
    assert mosaic_kernel.backward_launch("128,2,64,2,paired,seg8,kvregs").dkv_kv_in_registers
    assert not both.dkv_kv_in_registers
    with pytest.raises(ValueError, match="'cluster2'"):
        mosaic_kernel.backward_launch("128,2,64,2,pairs")
    with pytest.raises(ValueError, match="one 'passN'"):
        mosaic_kernel.backward_launch("128,2,64,2,pass1024,pass2048")


def test_launches_given_hold_within_and_the_defaults_come_back():
    default = mosaic_gpu_backward.default_launch(128)
    with launches.backward_launch_as(mosaic_kernel.backward_launch("128,2,64,2,seg8,flush,pass65536")):
        chosen = mosaic_gpu_backward.default_launch(128, deterministic=False)
        assert (chosen.dq_pass_keys, chosen.dq_segment, chosen.dq_flush) == (65536, 8, True)
    assert mosaic_gpu_backward.default_launch(128) == default
    with launches.backward_launch_as(None):
        assert mosaic_gpu_backward.default_launch(128) == default
    forward_default = mosaic_gpu.default_launch
    with launches.forward_launch_as(mosaic_kernel.forward_launch("64,3")) as own:
        assert own is forward_default
        assert (mosaic_gpu.default_launch(128, 1 << 20).block_kv, mosaic_gpu.default_launch(64).stages) == (64, 3)
    with pytest.raises(RuntimeError, match="broke"), launches.forward_launch_as(lambda *a: own(*a)):
        raise RuntimeError("broke")
    assert mosaic_gpu.default_launch is forward_default


def test_mosaic_kernel_records_each_launch_and_gives_the_defaults_back(tmp_path):
    """On a CPU, cuDNN fails (recorded) and the plans run the portable kernel, through the same flow."""
    forward, backward = mosaic_gpu.default_launch, mosaic_gpu_backward.default_launch
    out = tmp_path / "m.json"
    common = ["--seq-lens", "256", "--head-dims", "64", "--causal", "yes", "--iters", "1", "--out", str(out)]
    assert mosaic_kernel.main(common + ["--backward-launches", "128,2,64,2,paired", "--cudnn-deterministic"]) == 0
    cudnn, deterministic, ours = json.loads(out.read_text())["rows"]
    assert (cudnn["implementation"], deterministic["implementation"]) == ("cudnn", "cudnn:deterministic")
    assert ours["implementation"] == "mosaic_gpu" and ours["dkv_paired"] and "seconds" in ours
    assert mosaic_kernel.main(common + ["--launches", "64,3"]) == 0
    ours = json.loads(out.read_text())["rows"][1]
    assert (ours["block_kv"], ours["stages"]) == (64, 3) and "seconds" in ours
    assert mosaic_gpu.default_launch is forward and mosaic_gpu_backward.default_launch is backward


# The shape of ncu's --csv output: its own lines, the program's output, then one row per kernel and metric.
_NCU_CSV = """==PROF== Connected to process 921 (/usr/bin/python3.12)
mosaic_gpu Case(seq_len=1048576): ran once inside a capture range
==PROF== Disconnected from process 921
"ID","Process ID","Process Name","Host Name","Kernel Name","Context","Stream","Block Size","Grid Size","Device","CC","Section Name","Metric Name","Metric Unit","Metric Value"
"0","921","python3.12","127.0.0.1","anonymous_mosaic_gpu_kernel","1","7","(384, 1, 1)","(1, 8192, 8)","0","9.0","Command line profiler metrics","dram__bytes_read.sum","byte","11,580,752,065,536"
"0","921","python3.12","127.0.0.1","anonymous_mosaic_gpu_kernel","1","7","(384, 1, 1)","(1, 8192, 8)","0","9.0","Command line profiler metrics","lts__t_sector_hit_rate.pct","%","26.88"
"1","921","python3.12","127.0.0.1","cudnn_generated_fort_native_sdpa_sm90","1","7","(384, 1, 1)","(132, 1, 1)","0","9.0","Command line profiler metrics","gpu__time_duration.sum","ns","5,456,638,720"
"1","921","python3.12","127.0.0.1","cudnn_generated_fort_native_sdpa_sm90","1","7","(384, 1, 1)","(132, 1, 1)","0","9.0","Command line profiler metrics","launch__occupancy_limit_reason","","Registers"
"""


def test_ncu_csv_gives_one_entry_per_kernel_with_numeric_metrics_and_words_kept():
    kernels = ncu_metrics.parse_csv(_NCU_CSV)
    assert [k["kernel"] for k in kernels] == ["anonymous_mosaic_gpu_kernel", "cudnn_generated_fort_native_sdpa_sm90"]
    assert kernels[0]["grid"] == "(1, 8192, 8)" and kernels[0]["block"] == "(384, 1, 1)"
    assert kernels[0]["metrics"] == {"dram__bytes_read.sum": 11580752065536.0, "lts__t_sector_hit_rate.pct": 26.88}
    assert kernels[1]["metrics"] == {
        "gpu__time_duration.sum": 5456638720.0, "launch__occupancy_limit_reason": "Registers"
    }
    assert ncu_metrics.parse_csv("==PROF== nothing profiled\n") == []


def test_ncu_command_profiles_one_run_of_the_case_with_the_clocks_left_alone():
    command = ncu_metrics.ncu_command("ncu", "cudnn", 65536, 128, True, 4)
    assert command[:6] == ["ncu", "--clock-control", "none", "--profile-from-start", "off", "--csv"]
    assert ",".join(ncu_metrics.METRICS) in command
    script = command.index(sys.executable) + 1
    assert command[script].endswith("profile_case.py")
    assert command[script + 1:] == [
        "--implementation", "cudnn", "--seq-len", "65536", "--head-dim", "128", "--heads", "4", "--direction", "fwd",
        "--causal",
    ]
    backward = ncu_metrics.ncu_command("ncu", "mosaic_gpu", 65536, 64, False, 8, "fwd_bwd")
    assert backward[-2:] == ["--direction", "fwd_bwd"]
    stalls = "regex:smsp__average_warps_issue_stalled_.*_per_issue_active\\.ratio"
    more = ncu_metrics.ncu_command("ncu", "mosaic_gpu", 65536, 64, False, 8, "fwd", (stalls, "sm__cycles_active.avg"))
    assert ",".join((*ncu_metrics.METRICS, stalls, "sm__cycles_active.avg")) in more
    ours = ncu_metrics.ncu_command("ncu", "mosaic_gpu", 65536, 64, False, 8, forward_launch="128,2,heavy,wg3")
    assert ours[-2:] == ["--forward-launch", "128,2,heavy,wg3"]
    assert "--forward-launch" not in ncu_metrics.ncu_command("ncu", "cudnn", 65536, 64, False, 8, forward_launch="x")


def test_kernel_programs_are_the_same_text_for_the_same_code_and_differ_with_pairs():
    """bench/kernel_programs.py: two lowerings of one case give identical text (no locations, no
    numbering left over from folded arithmetic); pairs of thread blocks change all three kernels."""
    import kernel_programs

    single = kernel_programs.kernel_programs(1024, 64, causal=True, cluster=1)
    assert len(single) == 3 and all("gpu.launch" in text for text in single)  # forward, dq, dk/dv
    assert kernel_programs.kernel_programs(1024, 64, causal=True, cluster=1) == single
    paired = kernel_programs.kernel_programs(1024, 64, causal=True, cluster=2)
    assert [a == b for a, b in zip(single, paired)] == [False, False, False]


def test_kernel_programs_change_with_launch_fields():
    """bench/kernel_programs.py --forward-fields and --backward-fields reach the kernels they name, and
    only those; a field of the other launch, or a value that is not an integer, is refused."""
    import kernel_programs

    default = kernel_programs.kernel_programs(1024, 64, causal=True)
    forward = kernel_programs.kernel_programs(1024, 64, causal=True, forward_fields=dict(scores_first=True))
    dq = kernel_programs.kernel_programs(1024, 64, causal=True, backward_fields=dict(dq_turns=False))
    assert [a == b for a, b in zip(default, forward)] == [False, True, True]  # forward, dq, dk/dv
    assert [a == b for a, b in zip(default, dq)] == [True, False, True]
    for argv in (["--backward-fields", "dq_turns=yes"], ["--forward-fields", "dq_turns=1"]):
        with pytest.raises(SystemExit):
            kernel_programs.main([*argv, "--out", "unused.mlir"])


# A ptxas report as MOSAIC_GPU_DUMP_PTXAS=1 prints it: a kernel's notes and warnings come before its
# "Compiling entry function" line, and "Compile time" ends each kernel's report.
PTXAS_LOG = """\
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function 'kernel_a' for 'sm_90a'
ptxas info    : Function properties for kernel_a
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 168 registers, used 16 barriers, 1 bytes smem
ptxas info    : Compile time = 220.356 ms

ptxas info    : (C7519) warpgroup.arrive is injected in around line 876 by compiler
ptxas info    : (C7519) warpgroup.arrive is injected in around line 1734 by compiler
ptxas warning : (C7513) wgmma.mma_async instructions are serialized
ptxas warning : Registers are spilled to local memory in function 'kernel_b', 40 bytes spill stores, 72 bytes spill loads
some other output of the run
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function 'kernel_b' for 'sm_90a'
ptxas info    : Function properties for kernel_b
    32 bytes stack frame, 40 bytes spill stores, 72 bytes spill loads
ptxas info    : Used 232 registers, used 16 barriers, 32 bytes cumulative stack size, 1 bytes smem
ptxas info    : Compile time = 260.852 ms
"""


def test_ptxas_report_gives_each_kernel_its_own_notes_and_spills(tmp_path, capsys):
    """bench/ptxas_report.py: the notes and the spill warning printed before a kernel's "Compiling entry
    function" line count for that kernel, not for the one before it."""
    import ptxas_report

    first, second = ptxas_report.compiles(PTXAS_LOG)
    assert (first.name, first.registers, first.spill_stores, first.stack, dict(first.notes)) == (
        "kernel_a", 168, 0, 0, {}
    )
    assert (second.name, second.registers, second.spill_stores, second.spill_loads, second.stack) == (
        "kernel_b", 232, 40, 72, 32
    )
    assert dict(second.notes) == {"C7519": 2, "C7513": 1}
    log = tmp_path / "run.log"
    log.write_text(PTXAS_LOG)
    assert ptxas_report.main([str(log)]) == 0
    assert "| 1 | 232 | 40 | 72 | 32 | C7513 x1, C7519 x2 |" in capsys.readouterr().out
    log.write_text("no report here\n")
    assert ptxas_report.main([str(log)]) == 1


def test_repeatability_compares_bits_and_scales_the_difference():
    import jax.numpy as jnp

    a = jnp.array([1.0, -4.0, 2.0], jnp.bfloat16)
    b = a.at[2].set(2.015625)  # the next bfloat16 above 2
    (same, diff), (same_b, diff_b) = repeatability._compare((a, b), (a, a))
    assert same and diff == 0.0
    assert not same_b and diff_b == pytest.approx(0.015625 / 4)
    zero = jnp.zeros(2, jnp.bfloat16)
    assert not repeatability._compare((zero,), (-zero,))[0][0]  # -0 is other bits
    wide = jnp.array([1.0, 3.0], jnp.float32)
    (same, diff), = repeatability._compare((wide,), (wide.at[0].set(1.0 + 2**-23),))
    assert not same and diff == pytest.approx(2**-23 / 3)


def test_repeatability_rows_on_cpu(tmp_path, capsys):
    out = tmp_path / "r.json"
    argv = ["--seq-lens", "256", "--head-dims", "32", "--heads", "2", "--runs", "2", "--implementations", "xla"]
    argv += ["--out", str(out)]
    assert repeatability.main(argv) == 0
    row = json.loads(out.read_text())["rows"][0]
    assert row["implementation"] == "xla" and row["runs"] == 2
    assert row["runs_differing"] == {"out": 0, "dq": 0, "dk": 0, "dv": 0}
    assert "dq 0/1 differ" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        repeatability.main(["--runs", "1"])
