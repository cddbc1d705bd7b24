"""One attention call over the GPUs of one machine: time on 1 GPU vs on several, with the same plan.

    NCCL_NVLS_ENABLE=0 PYTHONPATH=. python bench/scaling.py --tokens 4M --chunks 31 \\
        --devices 1 2 --out bench/results/scaling.json
    NCCL_NVLS_ENABLE=0 PYTHONPATH=. python bench/scaling.py --tokens 1M --grad ...

B=1, H=8, D=64, bfloat16, causal. The plan is forced to ``--chunks`` chunks
(so it has that many subproblems to share out) and is the same for every
device count; on D devices the call runs with ``mesh=`` a one-axis mesh of the
first D GPUs, inputs replicated on them. Each count is timed on its first call
(compilation included) and then ``--iters`` more times (median); with
``--grad`` the timed function is forward plus backward (``jax.vjp``). The
outputs (or ``dq``) of ``--rows`` sampled query rows are compared with the
single-GPU run: they agree to float32 rounding of the merges, then bfloat16
rounding. Results are written after every measurement, so a run cut short
keeps what it finished.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec  # noqa: E402

import stream_cqsa_jax as sc  # noqa: E402
from stream_longest import _tokens  # noqa: E402


def _measure(n: int, devices: int, chunks: int, grad: bool, iters: int, rows: np.ndarray) -> tuple[dict, np.ndarray]:
    mesh = Mesh(np.array(jax.devices()[:devices]), ("sp",))
    replicated = NamedSharding(mesh, PartitionSpec())
    shape = (1, n, 8, 64)
    keys = jax.random.split(jax.random.key(0), 4)
    draw = jax.jit(lambda key: jax.random.normal(key, shape, jnp.bfloat16), out_shardings=replicated)
    q, k, v, do = (draw(key) for key in keys)
    plan = sc.plan(q_len=n, num_q_heads=8, head_dim=64, dtype=jnp.bfloat16, is_causal=True, num_chunks=chunks)

    def attend(q, k, v):
        return sc.dot_product_attention(q, k, v, is_causal=True, plan=plan, mesh=mesh, subproblem_axis="sp")

    if grad:
        # dq, dk and dv are all returned (an unused gradient would be compiled away); dq is compared.
        f = jax.jit(lambda q, k, v, do: jax.vjp(attend, q, k, v)[1](do))
        args = (q, k, v, do)
    else:
        f = jax.jit(attend)
        args = (q, k, v)
    start = time.perf_counter()
    out = jax.block_until_ready(f(*args))
    first = time.perf_counter() - start
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        out = jax.block_until_ready(f(*args))
        times.append(time.perf_counter() - start)
    sample = np.asarray((out[0] if grad else out)[:, rows].astype(jnp.float32))
    row = {
        "tokens": n, "devices": devices, "chunks": chunks, "subproblems": len(plan.subproblems), "grad": grad,
        "first_call_s": first, "times_s": times, "seconds": statistics.median(times) if times else first,
    }
    return row, sample


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", default="4M")
    parser.add_argument("--chunks", type=int, default=31)
    parser.add_argument("--devices", type=int, nargs="+", default=None, help="device counts (default: 1 and all)")
    parser.add_argument("--grad", action="store_true")
    parser.add_argument("--iters", type=int, default=1)
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    n = _tokens(args.tokens)
    counts = args.devices or sorted({1, len(jax.devices())})
    rows = np.linspace(0, n - 1, args.rows).astype(int)
    meta = {"jax": jax.__version__, "device": jax.devices()[0].device_kind, "gpus": len(jax.devices()),
            "date": time.strftime("%Y-%m-%d"), "nccl_nvls_enable": os.environ.get("NCCL_NVLS_ENABLE")}
    results, first_sample = [], None
    for devices in counts:
        row, sample = _measure(n, devices, args.chunks, args.grad, args.iters, rows)
        if first_sample is None:
            first_sample = sample
        diff = np.linalg.norm(sample - first_sample) / max(np.linalg.norm(first_sample), 1e-30)
        row["rel_diff_vs_first_count"] = float(diff)
        row["speedup"] = results[0]["seconds"] / row["seconds"] if results else 1.0
        results.append(row)
        print(json.dumps(row), flush=True)
        if args.out:
            with open(args.out, "w") as f:
                json.dump({"meta": meta, "rows": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
