"""SM clock and power while each part of forward plus backward runs, ours next to cuDNN's.

    PYTHONPATH=. python bench/clock_probe.py --seq-lens 65536 262144 --head-dims 128 \\
        --out bench/results/clock_probe.json

Each program (cuDNN's forward plus backward; ours: forward, forward plus
backward, and forward plus backward with the dq or the dk/dv kernel replaced by
zeros, as in `mosaic_backward_parts.py`) runs back to back for `--seconds`
while ``nvidia-smi`` samples the SM clock, power draw and throttle reasons
every 50 ms. Reported per program: calls per second, median SM clock, median
power, and the throttle reasons seen. Needs ``nvidia-smi`` on the path.
"""

from __future__ import annotations

import argparse
import csv
import io
import itertools
import statistics
import subprocess
import sys
import tempfile
import time

import jax

from mosaic_backward_parts import backward_without
from stream_cqsa_jax import benchmark

_FIELDS = "timestamp,clocks.sm,power.draw,temperature.gpu,clocks_throttle_reasons.active"


def _compiled(impl: str, case: benchmark.Case, without: str | None = None):
    """The program's ``run()`` (`benchmark.prepare_case`), run once to warm up."""
    with backward_without(without):
        row, run = benchmark.prepare_case(impl, case)
    if run is None:
        raise RuntimeError(f"{impl} {case}: {row['error']}")
    run()
    return run


def _run_for(run, seconds: float) -> tuple[float, float, int]:
    """(start, end, calls): calls back to back until `seconds` have passed."""
    start, calls = time.time(), 0
    while time.time() - start < seconds:
        run()
        calls += 1
    return start, time.time(), calls


def _samples(text: str) -> list[tuple[float, float, float, str]]:
    """(unix time, SM MHz, watts, throttle reasons) per nvidia-smi line."""
    out = []
    for row in csv.reader(io.StringIO(text)):
        if len(row) < 5 or row[0].startswith("timestamp"):
            continue
        try:
            stamp = time.mktime(time.strptime(row[0].strip().split(".")[0], "%Y/%m/%d %H:%M:%S"))
            stamp += float("0." + row[0].strip().split(".")[1]) if "." in row[0] else 0.0
            out.append((stamp, float(row[1].split()[0]), float(row[2].split()[0]), row[4].strip()))
        except (ValueError, IndexError):
            continue
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[262144])
    parser.add_argument("--head-dims", type=int, nargs="+", default=[128])
    parser.add_argument("--causal", choices=["yes", "no"], default="no")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    # Samples go to a file: a pipe nobody reads fills up and stops the sampler.
    log = tempfile.TemporaryFile(mode="w+")
    smi = subprocess.Popen(
        ["nvidia-smi", f"--query-gpu={_FIELDS}", "--format=csv,noheader,nounits", "-lms", "50"], stdout=log, text=True
    )
    spans = []
    try:
        for n, d in itertools.product(args.seq_lens, args.head_dims):
            both = benchmark.Case(n, d, args.causal == "yes", "fwd_bwd")
            fwd = benchmark.Case(n, d, args.causal == "yes", "fwd")
            programs = {
                "cudnn_fwd_bwd": ("cudnn", both, None),
                "fwd": ("mosaic_gpu", fwd, None),
                "fwd_bwd": ("mosaic_gpu", both, None),
                "fwd_bwd_without_dq": ("mosaic_gpu", both, "dq"),
                "fwd_bwd_without_dkv": ("mosaic_gpu", both, "dkv"),
            }
            for name, (impl, case, without) in programs.items():
                run = _compiled(impl, case, without)
                start, end, calls = _run_for(run, args.seconds)
                spans.append({"seq_len": n, "head_dim": d, "program": name, "start": start, "end": end, "calls": calls})
                del run
    finally:
        time.sleep(0.5)
        smi.terminate()
        smi.wait()
        log.seek(0)
        text = log.read()
    samples = _samples(text)
    for span in spans:
        inside = [s for s in samples if span["start"] + 0.5 <= s[0] <= span["end"]]
        span["calls_per_second"] = span["calls"] / (span["end"] - span["start"])
        if inside:
            span["sm_mhz"] = statistics.median(s[1] for s in inside)
            span["watts"] = statistics.median(s[2] for s in inside)
            span["throttle_reasons"] = sorted({s[3] for s in inside})
        print(
            f"N={span['seq_len']} D={span['head_dim']} {span['program']}: {span['calls_per_second']:.2f}/s, "
            f"{span.get('sm_mhz', '?')} MHz, {span.get('watts', '?')} W, {span.get('throttle_reasons')}",
            flush=True,
        )
    if args.out:
        benchmark.write_results(args.out, spans=spans, samples=samples)
    return 0


if __name__ == "__main__":
    sys.exit(main())
