"""Quickstart: exact causal attention under a memory budget, checked against float64.

    python examples/quickstart.py                  # CPU-sized default
    python examples/quickstart.py --seq-len 65536 --budget 256MiB --dtype bfloat16
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

import stream_cqsa_jax as sc


def dense_reference(q, k, v, rows):
    """float64 causal attention for the query rows `rows` (NumPy)."""
    q, k, v = (np.asarray(x.astype(jnp.float32), np.float64) for x in (q, k, v))
    scale = 1.0 / np.sqrt(q.shape[-1])
    g = q.shape[2] // k.shape[2]
    k, v = np.repeat(k, g, axis=2), np.repeat(v, g, axis=2)
    out = np.zeros((q.shape[0], len(rows), q.shape[2], q.shape[3]))
    for n, i in enumerate(rows):
        logits = np.einsum("bnh,bsnh->bns", q[:, i], k[:, : i + 1]) * scale
        p = np.exp(logits - logits.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        out[:, n] = np.einsum("bns,bsnh->bnh", p, v[:, : i + 1])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq-len", type=int, default=4099, help="sequence length (any value)")
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=2, help="grouped-query attention")
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--budget", default="6MiB", help="device memory the call may add")
    parser.add_argument("--check-rows", type=int, default=64, help="query rows checked against float64")
    args = parser.parse_args()

    keys = jax.random.split(jax.random.key(0), 3)
    dtype = jnp.dtype(args.dtype)
    q = jax.random.normal(keys[0], (1, args.seq_len, args.heads, args.head_dim), dtype)
    k = jax.random.normal(keys[1], (1, args.seq_len, args.kv_heads, args.head_dim), dtype)
    v = jax.random.normal(keys[2], (1, args.seq_len, args.kv_heads, args.head_dim), dtype)

    p = sc.plan(
        q_len=args.seq_len,
        num_q_heads=args.heads,
        num_kv_heads=args.kv_heads,
        head_dim=args.head_dim,
        dtype=dtype,
        is_causal=True,
        memory_budget=args.budget,
    )
    print(p.summary())

    start = time.perf_counter()
    out = sc.dot_product_attention(q, k, v, is_causal=True, plan=p).block_until_ready()
    elapsed = time.perf_counter() - start
    print(f"\ncomputed {out.shape} in {elapsed:.2f} s (first call, compilation included) on {jax.devices()[0]}")

    rows = np.unique(np.linspace(0, args.seq_len - 1, args.check_rows).astype(int))
    ref = dense_reference(q, k, v, rows)
    got = np.asarray(out[:, rows].astype(jnp.float32), np.float64)
    err = np.linalg.norm(got - ref) / np.linalg.norm(ref)
    print(f"relative error vs float64 on {len(rows)} query rows: {err:.2e}")


if __name__ == "__main__":
    main()
