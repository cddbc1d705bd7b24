"""Attention over inputs in host memory, at a size the device budget cannot hold.

    python examples/out_of_core.py                                  # CPU-sized: 32K tokens, 2 MiB budget
    python examples/out_of_core.py --tokens 8M --heads 8 --head-dim 64 --dtype bfloat16 --budget 2GiB
                                                                    # GPU-sized (about a minute on an H200)

The query, key and value are NumPy arrays in host memory. Under the budget,
device-resident attention (`dot_product_attention`, whose float32 accumulators
live on the device) is refused before any work, with the smallest budget it
would need; `stream_attention` keeps the accumulators on the host and sends
the device a few chunks at a time. Then the same inputs as JAX arrays in
pinned host memory go through `dot_product_attention` itself, which plans
where everything lives from the budget, and through `jax.grad` of a loss of
its output. A few output rows are checked against float64 attention.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import stream_cqsa_jax as sc  # noqa: E402

_DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}


def _tokens(text: str) -> int:
    scale = {"k": 2**10, "m": 2**20}
    text = text.strip().lower()
    return int(float(text[:-1]) * scale[text[-1]]) if text[-1] in scale else int(text)


def causal_rows_float64(q, k, v, rows) -> np.ndarray:
    """Causal attention of query rows `rows` in float64, one row at a time: [R, N, H]."""
    n, kv_heads, h = q.shape[2], k.shape[2], q.shape[3]
    out = []
    for i in rows:
        qi = np.asarray(q[0, i], np.float64).reshape(kv_heads, n // kv_heads, h) / np.sqrt(h)
        kk, vv = np.asarray(k[0, : i + 1], np.float64), np.asarray(v[0, : i + 1], np.float64)
        s = np.einsum("kgh,skh->kgs", qi, kk)
        p = np.exp(s - s.max(axis=-1, keepdims=True))
        out.append((np.einsum("kgs,skh->kgh", p, vv) / p.sum(axis=-1)[..., None]).reshape(n, h))
    return np.stack(out)


def main(argv=None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=_tokens, default=32 * 2**10)
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--kv-heads", type=int, default=None)
    parser.add_argument("--head-dim", type=int, default=32)
    parser.add_argument("--dtype", choices=sorted(_DTYPES), default="float32")
    parser.add_argument("--budget", default="2MiB", help="device memory budget, e.g. 2GiB")
    parser.add_argument("--rows", type=int, default=8, help="output rows checked against float64")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    t, n, h = args.tokens, args.heads, args.head_dim
    kv_heads = args.kv_heads or n
    dtype = _DTYPES[args.dtype]

    rng = np.random.default_rng(args.seed)
    q = rng.standard_normal((1, t, n, h), np.float32).astype(dtype)
    k = rng.standard_normal((1, t, kv_heads, h), np.float32).astype(dtype)
    v = rng.standard_normal((1, t, kv_heads, h), np.float32).astype(dtype)
    host_bytes = q.nbytes + k.nbytes + v.nbytes
    print(f"{t} tokens, {n} heads ({kv_heads} kv heads), head dim {h}, {args.dtype}: "
          f"{host_bytes / 2**20:.1f} MiB of inputs in host memory; device budget {args.budget}")

    shape = dict(q_len=t, num_q_heads=n, num_kv_heads=kv_heads, head_dim=h, dtype=args.dtype, is_causal=True,
                 memory_budget=args.budget)
    try:
        sc.plan(**shape)
        print("device-resident attention would fit this budget too")
    except ValueError as e:
        print(f"device-resident attention refused: {e}")
    p = sc.plan(executor="stream", **shape)
    print(p.summary())

    start = time.perf_counter()
    out = sc.stream_attention(q, k, v, is_causal=True, memory_budget=args.budget, progress=True)
    seconds = time.perf_counter() - start
    rows = np.sort(rng.choice(t, size=min(args.rows, t), replace=False))
    want = causal_rows_float64(q, k, v, rows)
    error = float(np.linalg.norm(np.asarray(out[0, rows], np.float64) - want) / np.linalg.norm(want))
    print(f"stream_attention: {seconds:.1f} s; relative error of {len(rows)} rows against float64: {error:.2e}")

    # The same inputs as JAX arrays in host memory: dot_product_attention plans their residency.
    device = jax.devices()[0]
    host = jax.sharding.SingleDeviceSharding(device, memory_kind="pinned_host")
    hq, hk, hv = (jax.device_put(x, host) for x in (q, k, v))
    print(sc.plan(executor="offload", **shape).summary())
    attend = lambda q, k, v: sc.dot_product_attention(q, k, v, is_causal=True, memory_budget=args.budget)
    start = time.perf_counter()
    out = attend(hq, hk, hv)
    seconds = time.perf_counter() - start
    host_error = float(np.linalg.norm(np.asarray(out)[0, rows].astype(np.float64) - want) / np.linalg.norm(want))
    print(f"dot_product_attention on host arrays: {seconds:.1f} s, output in {out.sharding.memory_kind} memory; "
          f"relative error of {len(rows)} rows against float64: {host_error:.2e}")
    on_device = jax.sharding.SingleDeviceSharding(device, memory_kind="device")
    loss = lambda q, k, v: jnp.mean(jax.device_put(attend(q, k, v), on_device).astype(jnp.float32) ** 2)
    start = time.perf_counter()
    grads = jax.grad(loss, argnums=(0, 1, 2))(hq, hk, hv)
    seconds = time.perf_counter() - start
    finite = all(bool(np.isfinite(np.asarray(g, np.float32)).all()) for g in grads)
    print(f"jax.grad through it: {seconds:.1f} s, gradients in {grads[0].sharding.memory_kind} memory, "
          f"all finite: {finite}")
    return max(error, host_error)


if __name__ == "__main__":
    main()
