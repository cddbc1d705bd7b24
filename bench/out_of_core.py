"""Out-of-core attention: query, key, value and output in pinned host memory, next to cuDNN in-core.

    PYTHONPATH=. python bench/out_of_core.py --tokens 1M --budget 1GiB \
        --modes cudnn incore pipelined jit --out bench/results/out_of_core_1m.json
    PYTHONPATH=. python bench/out_of_core.py --tokens 1M --budget 2GiB --grad \
        --modes cudnn incore pipelined jit --out bench/results/out_of_core_1m_grad.json

Each measurement runs in a fresh process (so its device peak, from
``memory_stats()["peak_bytes_in_use"]``, is its own): inputs are drawn on the
device in 64 MiB blocks with a fixed seed (the same in every process), and
for the out-of-core modes gathered on the host block by block, so the input
generation never holds more than a block on the device (the peak it reached
is reported as ``peak_bytes_after_inputs``). Modes:

* ``cudnn``: `jax.nn.dot_product_attention(..., implementation="cudnn")`, all on the device;
* ``incore``: this library with everything on the device and no budget (one subproblem);
* ``pipelined``: this library on host-resident arrays under ``--budget``, called outside `jit`;
* ``jit``: the same call traced inside `jax.jit`.

Times are the median of ``--iters`` runs after one warm-up run (with
``--iters 0``, the first call's time, compilation included). With
``--rows R`` the pipelined output is checked on R query rows against float64.
B=1, causal, bfloat16.

With ``--grad`` every mode times the forward and backward together:
``jax.vjp`` of the attention, applied to a fixed random bfloat16 cotangent
``do`` of the output's shape (drawn like the inputs, in the inputs' memory),
blocking until dq, dk and dv are ready; for the host modes they come back in
pinned host memory. The host modes also report the backward plan
(``backward_*``, from ``plan.backward()``), and ``--rows R`` checks the
pipelined dq on R query rows against float64 (dk and dv would need every
query row; the CPU tests check them).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from stream_longest import _reference_dq_rows, _reference_rows, _tokens  # noqa: E402  ("1M" is 2**20 tokens)

_BLOCK_BYTES = 64 << 20


def _inputs(n: int, heads: int, head_dim: int, memory: str, count: int = 3):
    """`count` arrays (q, k, v, then do) [1, n, heads, head_dim] bfloat16, standard normal, in `memory`
    ("device" or "pinned_host"); array i is drawn with seed i.

    Drawn on the device one block at a time; for host memory each block comes
    home through pinned memory into one NumPy array, which is then moved to
    pinned host memory whole, so the device never holds more than a block.
    """
    import jax
    import jax.numpy as jnp

    dev = jax.devices()[0]
    where = jax.sharding.SingleDeviceSharding(dev, memory_kind=memory)
    pinned = jax.sharding.SingleDeviceSharding(dev, memory_kind="pinned_host")
    block = max(1, min(n, _BLOCK_BYTES // (heads * head_dim * 2)))
    draw = jax.jit(lambda key: jax.random.normal(key, (1, block, heads, head_dim), jnp.float32).astype(jnp.bfloat16))
    out = []
    for seed in range(count):
        key = jax.random.key(seed)
        whole = np.empty((1, n, heads, head_dim), jnp.bfloat16)
        for lo in range(0, n, block):
            key, sub = jax.random.split(key)
            hi = min(n, lo + block)
            whole[:, lo:hi] = np.asarray(jax.device_put(draw(sub), pinned))[:, : hi - lo]
        out.append(jax.block_until_ready(jax.device_put(whole, where)))
        del whole
    return out


def _plan_fields(plan, prefix: str = "") -> dict:
    return {prefix + key: value for key, value in dict(
        num_chunks=plan.num_chunks, cover_size=plan.cover.size, chunk=plan.q_chunk, inputs=plan.inputs,
        accumulators=plan.accumulators, order=plan.order, estimated_peak_bytes=plan.estimated_peak_bytes,
    ).items()}


def _child(args) -> dict:
    import jax

    import stream_cqsa_jax as sc

    n = _tokens(args.tokens[0])
    mode = args.child
    if mode == "cudnn" and jax.default_backend() != "gpu":
        return {"mode": mode, "tokens": n, "error": f"cuDNN needs a GPU; the backend is {jax.default_backend()}"}
    host = mode in ("pipelined", "jit")
    if host and args.transfer:
        from stream_cqsa_jax._src import offload

        offload.INPUT_TRANSFER = args.transfer
    arrays = _inputs(n, args.heads, args.head_dim, "pinned_host" if host else "device", 4 if args.grad else 3)
    q, k, v = arrays[:3]
    peak_inputs = (jax.devices()[0].memory_stats() or {}).get("peak_bytes_in_use")
    if mode == "cudnn":
        attend = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")
    elif mode == "incore":
        attend = lambda q, k, v: sc.dot_product_attention(q, k, v, is_causal=True)
    else:
        plan = sc.plan(q_len=n, num_q_heads=args.heads, head_dim=args.head_dim, dtype="bfloat16", is_causal=True,
                       memory_budget=args.budget, executor="offload", order=args.order)
        attend = lambda q, k, v: sc.dot_product_attention(q, k, v, is_causal=True, plan=plan)
    if args.grad:  # forward and backward: (dq, dk, dv) for the cotangent do
        call = lambda q, k, v, do: jax.vjp(attend, q, k, v)[1](do)
    else:
        call = attend
    f = call if mode == "pipelined" else jax.jit(call)
    result = {"mode": mode, "tokens": n, "heads": args.heads, "head_dim": args.head_dim, "budget": args.budget}
    if args.grad:
        result["grad"] = True
    if host:
        result.update(_plan_fields(plan), transfer=args.transfer or "view")
        if args.grad:
            result.update(_plan_fields(plan.backward(), "backward_"))
    t0 = time.perf_counter()
    out = jax.block_until_ready(f(*arrays))
    result["first_call_s"] = time.perf_counter() - t0
    times = []
    for _ in range(args.iters):
        del out
        t0 = time.perf_counter()
        out = jax.block_until_ready(f(*arrays))
        times.append(time.perf_counter() - t0)
    result["times_s"] = times
    # With --iters 0 the one call is the measurement (compilation included).
    result["seconds"] = float(np.median(times)) if times else result["first_call_s"]
    if args.grad:
        result["gradient_memory"] = out[0].sharding.memory_kind
    else:
        result["output_memory"] = out.sharding.memory_kind
    stats = jax.devices()[0].memory_stats() or {}
    result["peak_bytes_in_use"] = stats.get("peak_bytes_in_use")
    result["peak_bytes_after_inputs"] = peak_inputs  # what making the inputs alone reached
    if args.rows and mode == "pipelined":
        rows = np.unique(np.linspace(0, n - 1, args.rows).astype(np.int64))
        scale = 1.0 / np.sqrt(args.head_dim)
        if args.grad:
            ref = _reference_dq_rows(*(np.asarray(x) for x in arrays), rows, scale)
            got = np.asarray(out[0])[0, rows].astype(np.float64)
        else:
            ref = _reference_rows(np.asarray(q), np.asarray(k), np.asarray(v), rows, scale)
            got = np.asarray(out)[0, rows].astype(np.float32)
        prefix = "dq_" if args.grad else ""
        result["rows_checked"] = int(len(rows))
        result[prefix + "rel_error"] = float(np.linalg.norm(got - ref) / np.linalg.norm(ref))
        rounded = ref.astype(np.float32).astype(q.dtype).astype(np.float64)
        result[prefix + "bf16_rounding_error"] = float(np.linalg.norm(rounded - ref) / np.linalg.norm(ref))
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", nargs="+", default=["1M"])
    ap.add_argument("--budget", default="1GiB")
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--modes", nargs="+", default=["cudnn", "incore", "pipelined", "jit"])
    ap.add_argument("--transfer", default=None, help="offload.INPUT_TRANSFER for the host modes")
    ap.add_argument("--order", default=None, choices=["quorums", "query_rows"],
                    help="the host modes' order (default: the planner's choice)")
    ap.add_argument("--iters", type=int, default=2)
    ap.add_argument("--rows", type=int, default=0)
    ap.add_argument("--grad", action="store_true", help="time forward and backward (jax.vjp) together")
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--out", default=None)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print("RESULT " + json.dumps(_child(args)), flush=True)
        return
    results = []
    for tokens in args.tokens:
        for mode in args.modes:
            cmd = [sys.executable, os.path.abspath(__file__), "--child", mode, "--tokens", tokens,
                   "--budget", args.budget, "--heads", str(args.heads), "--head-dim", str(args.head_dim),
                   "--iters", str(args.iters), "--rows", str(args.rows)]
            if args.transfer:
                cmd += ["--transfer", args.transfer]
            if args.order:
                cmd += ["--order", args.order]
            if args.grad:
                cmd.append("--grad")
            t0 = time.perf_counter()
            try:
                done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
                lines = [l for l in done.stdout.splitlines() if l.startswith("RESULT ")]
                row = json.loads(lines[-1][7:]) if lines else {
                    "mode": mode, "tokens": tokens, "error": (done.stderr or done.stdout)[-1500:]}
            except subprocess.TimeoutExpired:
                row = {"mode": mode, "tokens": tokens, "error": f"timed out after {args.timeout} s"}
            row["process_s"] = time.perf_counter() - t0
            print(json.dumps(row), flush=True)
            results.append(row)
            if args.out:
                with open(args.out, "w") as f:
                    json.dump({"results": results}, f, indent=1)


if __name__ == "__main__":
    main()
