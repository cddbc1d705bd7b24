"""Where the Hopper forward plus backward spends its time, next to cuDNN's, all on the device.

    PYTHONPATH=. python bench/mosaic_backward_parts.py --seq-lens 65536 262144 --head-dims 64 128 \\
        --causal no --out bench/results/mosaic_backward_parts.json

Per case it times cuDNN's forward and forward plus backward, then ours four
ways: the forward, the whole forward plus backward, and the same with the dq
kernel or the dk/dv kernel replaced by zeros of its outputs' shapes. The
differences give each backward kernel's time (the XLA work around the
kernels stays in every variant). Printed as milliseconds and as TFLOP/s of
each part's own products (the forward 2 per score, dq 3, dk/dv 4; cuDNN's
backward 5).

``--block-orders heads_first tiles_first`` times ours once per order of the
thread blocks, named by the outermost axis of the kernels' grid: (heads,
tiles, batch) (``heads_first``, the kernels' own) or (tiles, heads, batch)
(``tiles_first``). The last axis varies fastest (Mosaic GPU lays the grid out
for CUDA in reverse; Nsight Compute reports the forward's grid at 1M tokens,
8 heads as (1, 8192, 8)), so under ``heads_first`` the blocks running at once
are query tiles of one head, which read the same key/value tiles, and under
``tiles_first`` they cover every head.

``--backward-launches`` times ours once per backward launch, written as
`bench/mosaic_kernel.py` takes them (``128,2,64,2,seg8,flush,pass65536``), in
place of the default; each row records its launch.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import sys

import jax
import jax.numpy as jnp

from launches import backward_launch_as
from mosaic_kernel import backward_launch
from stream_cqsa_jax import benchmark
from stream_cqsa_jax._src.kernels import mosaic_gpu_backward, mosaic_gpu_common


def use_block_order(order: str) -> None:
    """From now on the Hopper kernels' grid is (heads, tiles, batch) (``"heads_first"``, their own
    order: the blocks running at once are query tiles of one head) or (tiles, heads, batch)
    (``"tiles_first"``: they cover every head), through `mosaic_gpu_common.GRID_ORDER`."""
    mosaic_gpu_common.GRID_ORDER = {
        "heads_first": ("heads", "tiles", "batch"), "tiles_first": ("tiles", "heads", "batch")
    }[order]


def _no_dq(inp, *args, **kwargs):
    return jnp.zeros(inp.q.shape, jnp.float32)


def _no_dkv(inp, *args, **kwargs):
    zeros = jnp.zeros(inp.k.shape, jnp.float32)
    return zeros, zeros


@contextlib.contextmanager
def backward_without(kernel: str | None):
    """Within: the Hopper backward with its dq (``"dq"``) or dk/dv (``"dkv"``) kernel replaced by zeros
    of its outputs' shapes (None: both run). Traced programs are cleared on entry: they are
    cached per plan, not per kernel."""
    saved = mosaic_gpu_backward._dq, mosaic_gpu_backward._dkv
    replacement = {None: {}, "dq": {"_dq": _no_dq}, "dkv": {"_dkv": _no_dkv}}[kernel]
    for name, f in replacement.items():
        setattr(mosaic_gpu_backward, name, f)
    jax.clear_caches()
    try:
        yield
    finally:
        mosaic_gpu_backward._dq, mosaic_gpu_backward._dkv = saved


def _time(impl: str, case: benchmark.Case, iters: int, without: str | None = None) -> float | None:
    with backward_without(without):
        row = benchmark.run_case(impl, case, iters)
    if "error" in row:
        print(row["error"], flush=True)
    return row.get("seconds")


def _parts(t: dict, fwd: benchmark.Case) -> dict:
    """{"parts": milliseconds and TFLOP/s of each part, "ratio_vs_cudnn": ...} from the timings `t`
    (empty if one is missing)."""
    if any(v is None for v in t.values()):
        return {}
    unit = fwd.flops() / 2  # the FLOPs of one product per score
    parts = {
        "cudnn_fwd": (t["cudnn_fwd"], 2),
        "cudnn_bwd": (t["cudnn_fwd_bwd"] - t["cudnn_fwd"], 5),
        "fwd": (t["fwd"], 2),
        "dq": (t["fwd_bwd"] - t["fwd_bwd_without_dq"], 3),
        "dkv": (t["fwd_bwd"] - t["fwd_bwd_without_dkv"], 4),
        "rest_of_bwd": (t["fwd_bwd_without_dq"] + t["fwd_bwd_without_dkv"] - t["fwd_bwd"] - t["fwd"], 0),
    }
    return {
        "parts": {k: {"ms": 1e3 * s, "tflops": unit * p / s / 1e12 if p else None} for k, (s, p) in parts.items()},
        "ratio_vs_cudnn": t["cudnn_fwd_bwd"] / t["fwd_bwd"],
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[65536])
    parser.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--causal", choices=["yes", "no", "both"], default="no")
    parser.add_argument("--block-orders", nargs="+", choices=["heads_first", "tiles_first"], default=["heads_first"])
    parser.add_argument("--backward-launches", nargs="+", default=[None],
                        help="backward launches to time in place of the default, as bench/mosaic_kernel.py takes them")
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    causal = {"yes": [True], "no": [False], "both": [True, False]}[args.causal]
    # parsed before any timing, so that a mistyped launch stops the run at once
    launches = {text: text and backward_launch(text) for text in args.backward_launches}
    rows = []
    for n, d, c in itertools.product(args.seq_lens, args.head_dims, causal):
        fwd, both = benchmark.Case(n, d, c, "fwd"), benchmark.Case(n, d, c, "fwd_bwd")
        cudnn = {"cudnn_fwd": _time("cudnn", fwd, args.iters), "cudnn_fwd_bwd": _time("cudnn", both, args.iters)}
        for order, launch in itertools.product(args.block_orders, args.backward_launches):
            use_block_order(order)
            try:
                with backward_launch_as(launches[launch]):
                    t = {
                        **cudnn,
                        "fwd": _time("mosaic_gpu", fwd, args.iters),
                        "fwd_bwd": _time("mosaic_gpu", both, args.iters),
                        "fwd_bwd_without_dq": _time("mosaic_gpu", both, args.iters, without="dq"),
                        "fwd_bwd_without_dkv": _time("mosaic_gpu", both, args.iters, without="dkv"),
                    }
            finally:
                use_block_order("heads_first")
            row = {"seq_len": n, "head_dim": d, "causal": c, "block_order": order, "seconds": t, **_parts(t, fwd)}
            if launch is not None:
                row["backward_launch"] = launch
            rows.append(row)
            if "parts" in row:
                text = ", ".join(
                    f"{k} {v['ms']:.1f} ms" + (f" ({v['tflops']:.0f} TF/s)" if v["tflops"] else "")
                    for k, v in row["parts"].items()
                )
                label = order if launch is None else f"{order}, {launch}"
                print(f"N={n} D={d} causal={c} {label}: {row['ratio_vs_cudnn']:.3f}x cuDNN; {text}", flush=True)
    if args.out:
        benchmark.write_results(args.out, rows=rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
