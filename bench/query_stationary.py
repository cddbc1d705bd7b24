"""An out-of-core schedule to compare with the quorum one: a block of queries stays on the device
while the key/value blocks it sees stream past it.

    PYTHONPATH=. python bench/query_stationary.py --tokens 1M --block 64K --rows 256 \\
        --out bench/results/query_stationary_1m.json

Causal, B=1, bfloat16, q, k, v in pinned host memory (drawn as in
`out_of_core.py`, then cut into blocks of ``--block`` tokens, each its own
pinned array). For query block g: the block goes to the device, key/value
blocks 0..g follow one ahead of the compute (`jax.device_put` before the
current step is dispatched), each step runs this library's kernel on the
(query block, key block) pair, the diagonal one causal, and folds its float32
softmax state into the block's; the finished block goes home as bfloat16.

Each key/value byte crosses the link once per query block that sees it
(about ``G / 2`` times for ``G`` blocks, causal), against about once per quorum
member (14 times at 1M under 1 GiB) in the quorum schedule, and the softmax
state never leaves the device. Device memory holds one query block, its
float32 state, the kernel's state for one pair and three key/value blocks.
Prints the time, the device peak and, with ``--rows``, the error on sampled
rows against float64.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import stream_cqsa_jax as sc  # noqa: E402
from out_of_core import _inputs  # noqa: E402
from stream_cqsa_jax._src import executor, merge  # noqa: E402
from stream_longest import _reference_rows, _tokens  # noqa: E402


def _blocks(x: jax.Array, block: int, pinned) -> list[jax.Array]:
    """`x` [1, n, N, H] in pinned host memory cut into blocks of `block` tokens, each its own pinned array."""
    whole = np.asarray(x)  # a view of the pinned buffer
    return [jax.device_put(whole[:, lo : lo + block], pinned) for lo in range(0, whole.shape[1], block)]


def _step_programs(block: int, heads: int, head_dim: int):
    """(step(state, q, k, v, causal), finish(state)) as jitted programs on one query block."""
    scale = head_dim**-0.5
    plans = {
        causal: sc.plan(q_len=block, num_q_heads=heads, head_dim=head_dim, dtype=jnp.bfloat16,
                        is_causal=causal, num_chunks=1)
        for causal in (False, True)
    }

    def step(state, q, k, v, causal: bool):
        part = executor.forward(plans[causal], scale, q, k, v, executor.MaskArrays())
        return merge.merge_states(state, merge.rows_of(part, 0, block))

    step = jax.jit(step, static_argnames="causal", donate_argnums=0)
    finish = jax.jit(lambda state: merge.finalize(state, block)[0].astype(jnp.bfloat16))
    return step, finish


def attend(q_blocks, k_blocks, v_blocks, step, finish, device, pinned) -> list[jax.Array]:
    """Causal attention of the blocks; the output blocks in pinned host memory."""
    on_device = jax.sharding.SingleDeviceSharding(device, memory_kind="device")
    _, block, heads, head_dim = q_blocks[0].shape
    work = [(g, j) for g in range(len(q_blocks)) for j in range(g + 1)]
    put = lambda g, j: (  # noqa: E731
        jax.device_put(q_blocks[g], on_device) if j == 0 else None,
        jax.device_put(k_blocks[j], on_device),
        jax.device_put(v_blocks[j], on_device),
    )
    out, ahead, q, state = [], put(*work[0]), None, None
    for i, (g, j) in enumerate(work):
        q_new, k, v = ahead
        if i + 1 < len(work):
            ahead = put(*work[i + 1])  # the next step's blocks travel while this one computes
        if j == 0:
            q = q_new
            state = merge.empty_state(1, block, heads, head_dim, jnp.float32)
        state = step(state, q, k, v, causal=j == g)
        if j == g:
            out.append(jax.device_put(finish(state), pinned))
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", default="1M")
    parser.add_argument("--block", default="64K", help="tokens per block (divides --tokens)")
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--iters", type=int, default=2)
    parser.add_argument("--rows", type=int, default=0)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    n, block = _tokens(args.tokens), _tokens(args.block)
    if n % block:
        parser.error(f"--block ({block} tokens) must divide --tokens ({n} tokens)")
    device = jax.devices()[0]
    pinned = jax.sharding.SingleDeviceSharding(device, memory_kind="pinned_host")
    q, k, v = _inputs(n, args.heads, args.head_dim, "pinned_host")
    q_blocks, k_blocks, v_blocks = (_blocks(x, block, pinned) for x in (q, k, v))
    step, finish = _step_programs(block, args.heads, args.head_dim)

    def run():
        return jax.block_until_ready(attend(q_blocks, k_blocks, v_blocks, step, finish, device, pinned))

    start = time.perf_counter()
    out = run()
    result = {"tokens": n, "block": block, "heads": args.heads, "head_dim": args.head_dim,
              "first_call_s": time.perf_counter() - start}
    times = []
    for _ in range(args.iters):
        del out
        start = time.perf_counter()
        out = run()
        times.append(time.perf_counter() - start)
    result["times_s"] = times
    result["seconds"] = float(np.median(times)) if times else result["first_call_s"]
    stats = device.memory_stats() or {}
    result["peak_bytes_in_use"] = stats.get("peak_bytes_in_use")
    if args.rows:
        rows = np.unique(np.linspace(0, n - 1, args.rows).astype(np.int64))
        ref = _reference_rows(np.asarray(q), np.asarray(k), np.asarray(v), rows, args.head_dim**-0.5)
        got = np.concatenate([np.asarray(o) for o in out], axis=1)[0, rows].astype(np.float64)
        rounded = ref.astype(np.float32).astype(q.dtype).astype(np.float64)
        result["rows_checked"] = int(len(rows))
        result["rel_error"] = float(np.linalg.norm(got - ref) / np.linalg.norm(ref))
        result["bf16_rounding_error"] = float(np.linalg.norm(rounded - ref) / np.linalg.norm(ref))
    result.update(jax=jax.__version__, device=device.device_kind, date=time.strftime("%Y-%m-%d"))
    print(json.dumps(result), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
