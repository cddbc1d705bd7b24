"""Hardware counters of attention kernels, read by Nsight Compute around `profile_case.py`.

    PYTHONPATH=. python bench/ncu_metrics.py --seq-lens 65536 1048576 --implementations mosaic_gpu cudnn \\
        --out bench/results/ncu_fwd_d64_nc.json
    PYTHONPATH=. python bench/ncu_metrics.py --seq-lens 1048576 --head-dim 128 --direction fwd_bwd ...

Per case and implementation, runs ``ncu --clock-control none --profile-from-start off`` on
``bench/profile_case.py`` (one run inside the capture range, after compiling and a warm-up)
with a kernel name filter that keeps the attention kernels (ours and cuDNN's) and leaves XLA's
fusions out, and records each kernel's metrics. The clocks are left to the card (the runs meet
its power cap as the benchmarks do). With ``--direction fwd_bwd`` the run is forward plus
backward: our three kernels share one name, and they are told apart by their order and their
shared memory (``launch__shared_mem_per_block_dynamic``). ``--parse FILE.csv`` prints the
metrics of a CSV that ncu wrote before, in the form recorded.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import shutil
import subprocess
import sys

METRICS = (
    "gpu__time_duration.sum",
    "dram__bytes_read.sum",
    "dram__throughput.avg.pct_of_peak_sustained_elapsed",
    "lts__t_sector_hit_rate.pct",
    "lts__t_sectors_op_read.sum",
    "sm__cycles_elapsed.avg.per_second",
    "launch__grid_size",
    "launch__registers_per_thread",
    "launch__shared_mem_per_block_dynamic",
)
KERNELS = "regex:mosaic|cudnn|sm90|fprop|fmha|flash|attn|kernel"  # Mosaic GPU kernels are "*_mosaic_gpu_kernel"


def parse_csv(text: str) -> list[dict]:
    """Kernels of ncu's ``--csv`` output (its own ``==PROF==`` lines and the program's output are skipped):
    one dict per kernel launch with its name, grid and block, and ``metrics`` {name: float}."""
    rows = [line for line in text.splitlines() if line.startswith('"')]
    kernels: dict[str, dict] = {}
    for r in csv.DictReader(io.StringIO("\n".join(rows))):
        kernel = kernels.setdefault(
            r["ID"], {"kernel": r["Kernel Name"], "grid": r["Grid Size"], "block": r["Block Size"], "metrics": {}}
        )
        value = r["Metric Value"].replace(",", "")
        try:
            kernel["metrics"][r["Metric Name"]] = float(value) if value else None
        except ValueError:  # a metric that is a word (a limiter's name, say) is kept as it reads
            kernel["metrics"][r["Metric Name"]] = value
    return list(kernels.values())


def ncu_command(
    ncu: str, implementation: str, seq_len: int, head_dim: int, causal: bool, heads: int, direction: str = "fwd",
    extra_metrics: tuple[str, ...] = (), forward_launch: str | None = None,
) -> list[str]:
    """The command line that profiles one case (``extra_metrics`` after ``METRICS``; ncu takes ``regex:...``;
    `forward_launch`, as `mosaic_kernel.py` writes it, for our forward)."""
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "profile_case.py")
    case = ["--implementation", implementation, "--seq-len", str(seq_len), "--head-dim", str(head_dim),
            "--heads", str(heads), "--direction", direction] + (["--causal"] if causal else [])
    if forward_launch and implementation == "mosaic_gpu":
        case += ["--forward-launch", forward_launch]
    return [ncu, "--clock-control", "none", "--profile-from-start", "off", "--csv", "-k", KERNELS,
            "--metrics", ",".join(METRICS + tuple(extra_metrics)), sys.executable, script, *case]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[65536])
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--causal", action="store_true")
    parser.add_argument("--direction", choices=("fwd", "fwd_bwd"), default="fwd")
    parser.add_argument("--implementations", nargs="+", default=["mosaic_gpu", "cudnn"])
    parser.add_argument("--extra-metrics", nargs="*", default=[], help="more metrics, or regex:EXPR")
    parser.add_argument("--forward-launch", default=None, help="our forward's launch, as mosaic_kernel.py writes it")
    parser.add_argument("--timeout", type=float, default=300, help="seconds per profiled case")
    parser.add_argument("--parse", default=None, help="print the kernels of an ncu CSV file and stop")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if args.parse:
        with open(args.parse) as f:
            print(json.dumps(parse_csv(f.read()), indent=1))
        return 0
    ncu = shutil.which("ncu") or "/usr/local/cuda/bin/ncu"
    rows = []
    for n in args.seq_lens:
        for impl in args.implementations:
            command = ncu_command(
                ncu, impl, n, args.head_dim, args.causal, args.heads, args.direction, args.extra_metrics,
                args.forward_launch,
            )
            row = {"implementation": impl, "seq_len": n, "head_dim": args.head_dim, "causal": args.causal,
                   "heads": args.heads, "batch": 1, "direction": args.direction,
                   "ncu_options": " ".join(command[1 : command.index(sys.executable)])}
            if args.forward_launch and impl == "mosaic_gpu":
                row["forward_launch"] = args.forward_launch
            try:
                done = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout)
                row["kernels"] = parse_csv(done.stdout)
                if done.returncode or not row["kernels"]:
                    row["error"] = f"ncu exited {done.returncode}: {done.stderr.strip()[-300:]}"
            except (OSError, subprocess.TimeoutExpired) as err:
                row["error"] = f"{type(err).__name__}: {err}"
            print(json.dumps(row)[:400], flush=True)
            rows.append(row)
    if args.out:
        from stream_cqsa_jax import benchmark

        version = subprocess.run([ncu, "--version"], capture_output=True, text=True).stdout.strip().splitlines()
        benchmark.write_results(args.out, rows=rows, ncu_version=version[-1] if version else None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
