"""One benchmark case, compiled and warmed up, then run once inside a profiler's capture range.

    ncu --clock-control none --profile-from-start off -k regex:"mosaic|cudnn" \\
        --metrics gpu__time_duration.sum,lts__t_sector_hit_rate.pct,dram__bytes_read.sum \\
        python bench/profile_case.py --implementation mosaic_gpu --seq-len 65536 --head-dim 64 \\
        [--forward-launch 128,2,heavy,wg3]

Compiling launches kernels of its own (XLA's autotuning, cuDNN's plan search) that a profiler
attached from the start would capture. So the capture range is opened around the one run that
counts, through the CUDA runtime's ``cudaProfilerStart`` / ``cudaProfilerStop`` (ncu's
``--profile-from-start off`` waits for them); the run's own XLA fusions are still in it, which
a kernel name filter leaves out. Where no CUDA runtime library loads (no GPU), the run happens
without them and the script says so.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import glob
import os
import sys

import launches
import mosaic_kernel
from stream_cqsa_jax import benchmark


def _cuda_runtime():
    """The CUDA runtime library (a `ctypes.CDLL`), or None where none loads."""
    names = ["libcudart.so.13", "libcudart.so.12", "libcudart.so"]
    for root in sys.path:  # the wheels that JAX's CUDA plugin depends on keep it under nvidia/
        names += sorted(glob.glob(os.path.join(root, "nvidia", "**", "libcudart.so*"), recursive=True))
    for name in names:
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    return None


@contextlib.contextmanager
def capture_range():
    """Opens the profiler's capture range for the block; yields whether it could."""
    runtime = _cuda_runtime()
    started = runtime is not None and runtime.cudaProfilerStart() == 0
    try:
        yield started
    finally:
        if started:
            runtime.cudaProfilerStop()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--implementation", default="mosaic_gpu", help="cudnn, xla, or a kernel of ours")
    parser.add_argument("--seq-len", type=int, default=65536)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--causal", action="store_true")
    parser.add_argument("--direction", choices=("fwd", "fwd_bwd"), default="fwd")
    parser.add_argument("--num-chunks", type=int, default=None, help="chunks of our plan (default: its own)")
    parser.add_argument(
        "--forward-launch", default=None, help="the Hopper forward's launch as bench/mosaic_kernel.py writes it"
    )
    args = parser.parse_args(argv)
    case = benchmark.Case(args.seq_len, args.head_dim, args.causal, args.direction, args.batch, args.heads)
    launch = mosaic_kernel.forward_launch(args.forward_launch) if args.forward_launch else None
    with launches.forward_launch_as(launch):  # compiled under it; the program keeps it
        row, run = benchmark.prepare_case(args.implementation, case, args.num_chunks)
    if run is None:
        print(f"{args.implementation}: {row['error']}", file=sys.stderr)
        return 1
    run()  # the first run may still load and initialise what it needs
    with capture_range() as captured:
        run()
    print(f"{args.implementation} {case}: ran once {'inside' if captured else 'without'} a capture range")
    return 0


if __name__ == "__main__":
    sys.exit(main())
