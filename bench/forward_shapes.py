"""The Hopper forward next to cuDNN at chosen (length, heads, batch, head dim), without a causal mask.

    PYTHONPATH=. python bench/forward_shapes.py --shapes 1048576:2:1:64 524288:8:2:64 524288:8:1:64 \\
        --out bench/results/mosaic_fwd_footprint_d64_nc.json
    PYTHONPATH=. python bench/forward_shapes.py --shapes 1048576:8:1:64 524288:8:2:64 1048576:8:1:128 \\
        --block-orders heads_first tiles_first --out bench/results/mosaic_block_order_1m.json
    PYTHONPATH=. python bench/forward_shapes.py --shapes 524288:8:2:64 --clusters 1 2 ...

Each shape is ``seq_len:heads:batch:head_dim``. Per shape, cuDNN and ours (once
per block order given, `mosaic_backward_parts.use_block_order`; default: the
kernels' own order, unlabelled; with ``--clusters``, once per thread blocks per
cluster, `mosaic_gpu.Launch.cluster`) are compiled on the same bfloat16 inputs and
timed in turns (`benchmark.run_interleaved`). Shapes with the same FLOPs but
different K/V sizes or per-block sweep lengths tell which of the two a gap
follows.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from launches import forward_launch_as
from mosaic_backward_parts import use_block_order
from stream_cqsa_jax import benchmark
from stream_cqsa_jax._src.kernels import mosaic_gpu


def _shape(text: str) -> tuple[int, int, int, int]:
    parts = text.split(":")
    if len(parts) != 4 or not all(p.isdigit() for p in parts):
        raise argparse.ArgumentTypeError(f"shape {text!r}: expected seq_len:heads:batch:head_dim")
    n, heads, batch, d = map(int, parts)
    return n, heads, batch, d


def _with_cluster(own_launch, cluster: int):
    """The forward's own launch with `cluster` thread blocks per cluster."""
    return lambda *args: dataclasses.replace(own_launch(*args), cluster=cluster)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", type=_shape, nargs="+", required=True)
    parser.add_argument("--block-orders", nargs="+", choices=["heads_first", "tiles_first"], default=None)
    parser.add_argument("--clusters", type=int, nargs="+", choices=[1, 2], default=None,
                        help="time ours once per cluster size (default: the kernel's own choice)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    rows = []
    for n, heads, batch, d in args.shapes:
        case = benchmark.Case(n, d, False, "fwd", batch=batch, heads=heads)
        inputs = benchmark.case_inputs(case)
        prepared = [benchmark.prepare_case("cudnn", case, args=inputs)]
        own_launch = mosaic_gpu.default_launch
        for order in args.block_orders or [None]:
            for cluster in args.clusters or [None]:
                if order is not None:
                    use_block_order(order)
                # entering clears the traced programs, which are cached per plan, not per block order
                with forward_launch_as(None if cluster is None else _with_cluster(own_launch, cluster)):
                    row, run = benchmark.prepare_case("mosaic_gpu", case, args=inputs)
                if order is not None:
                    row["block_order"] = order
                if cluster is not None:
                    row["cluster"] = cluster
                prepared.append((row, run))
        use_block_order("heads_first")
        got = benchmark.run_interleaved(prepared, case, args.rounds)
        base = got[0].get("seconds")
        for r in got:
            if base and r.get("seconds"):
                r["ratio_vs_cudnn"] = base / r["seconds"]
            what = r["implementation"] + (f" {r['block_order']}" if "block_order" in r else "")
            what += f" cluster={r['cluster']}" if "cluster" in r else ""
            print(f"N={n} heads={heads} batch={batch} D={d} {what}: {r.get('seconds', r.get('error'))} s, "
                  f"{r.get('ratio_vs_cudnn', 0):.3f}x cuDNN", flush=True)
        rows += got
        del inputs, prepared
    if args.out:
        benchmark.write_results(args.out, rows=rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
