"""Sweeps tile sizes and launch parameters of the Triton kernels at one size, next to cuDNN.

    PYTHONPATH=. python bench/tune_triton.py --seq-len 65536 --head-dims 64 \\
        --forward 128,64,4,3 128,64,4,2 --out bench/results/tune.json
    PYTHONPATH=. python bench/tune_triton.py --directions fwd_bwd --dq 128,64,4,2 --dkv 64,64,8,2 ...

Each launch is written ``block_q,block_kv,num_warps,num_stages``; every
combination of the forward, dq and dk/dv launches given is timed on the
single-subproblem plan (kernel speed alone).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys

import jax

from stream_cqsa_jax import benchmark
from stream_cqsa_jax._src.kernels import pallas_triton


def _launch(text: str) -> pallas_triton.Launch:
    bq, bk, warps, stages = (int(x) for x in text.split(","))
    return pallas_triton.Launch(num_warps=warps, num_stages=stages, block_q=bq, block_kv=bk)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", type=int, default=65536)
    parser.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--causal", choices=["yes", "no", "both"], default="both")
    parser.add_argument("--directions", nargs="+", default=["fwd"])
    parser.add_argument("--forward", nargs="+", default=["128,64,4,2"])
    parser.add_argument("--dq", nargs="+", default=["128,64,4,2"])
    parser.add_argument("--dkv", nargs="+", default=["128,64,4,2"])
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    causal = {"yes": [True], "no": [False], "both": [True, False]}[args.causal]
    rows = []
    for d, c, direction in itertools.product(args.head_dims, causal, args.directions):
        case = benchmark.Case(args.seq_len, d, c, direction)
        base = benchmark.run_case("cudnn", case, args.iters)
        rows.append(base)
        backward = itertools.product(args.dq, args.dkv) if direction == "fwd_bwd" else [(args.dq[0], args.dkv[0])]
        for fwd, (dq, dkv) in itertools.product(args.forward, backward):
            tuning = pallas_triton.Tuning(_launch(fwd), _launch(dq), _launch(dkv))
            pallas_triton.default_tuning = lambda head_dim, tuning=tuning: tuning
            jax.clear_caches()  # compiled programs are cached per plan, not per launch parameters
            row = benchmark.run_case("pallas_triton", case, args.iters, block_q=128, block_kv=128)
            row.update(forward=fwd, dq=dq, dkv=dkv)
            if "seconds" in row and "seconds" in base:
                row["ratio_vs_cudnn"] = base["seconds"] / row["seconds"]
            rows.append(row)
            launches = f"fwd={fwd}" + (f" dq={dq} dkv={dkv}" if direction == "fwd_bwd" else "")
            result = (
                f"{row['seconds']:.4f} s, {row.get('ratio_vs_cudnn', 0):.3f}x cuDNN"
                if "seconds" in row
                else row.get("error", "?")
            )
            print(f"D={d} causal={c} {direction} {launches}: {result}", flush=True)
    if args.out:
        meta = {"jax": jax.__version__, "device": jax.devices()[0].device_kind, "seq_len": args.seq_len}
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
