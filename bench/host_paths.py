"""Ways to move chunks of a pinned-host JAX array to the device, and whether they overlap compute.

The out-of-core executor needs one chunk of a host-resident [B, N, H, D] array
at a time. This script times, for 8 MiB chunks of one array in pinned host
memory:

* ``view``: `jax.device_put` of a NumPy view of the host buffer (``np.asarray``
  of a pinned-host array: is it zero-copy?);
* ``split``: `jax.device_put` of chunks pre-split into their own pinned-host arrays;
* ``program``: a jitted dynamic slice of the host array moved to the device;
* ``eager``: eager indexing of the host array, then `jax.device_put`;

each alone, and fed from a producer thread while the main thread dispatches a
matmul loop of about the same length (overlap = hidden transfer time / transfer
time). It also times ways to assemble an output in pinned host memory from
device chunks. Writes JSON.

    PYTHONPATH=. python bench/host_paths.py --out bench/results/host_paths.json
"""

from __future__ import annotations

import argparse
import json
import queue
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax


def _sync(x):
    jax.block_until_ready(x)
    return x


def _timed(fn, repeats=3):
    fn()  # warm-up / compile
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--chunks", type=int, default=64)
    ap.add_argument("--chunk-mib", type=int, default=8)
    ap.add_argument("--matmul", type=int, default=4096, help="side of the matmuls timed as compute")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    dev = jax.devices()[0]
    on_device = jax.sharding.SingleDeviceSharding(dev)
    pinned = jax.sharding.SingleDeviceSharding(dev, memory_kind="pinned_host")
    heads, dim = 8, 64
    tokens = args.chunk_mib * 2**20 // (heads * dim * 2)
    n = tokens * args.chunks
    host_np = np.random.default_rng(0).standard_normal((1, n, heads, dim), np.float32).astype(jnp.bfloat16)
    x = _sync(jax.device_put(host_np, pinned))
    chunk_bytes = tokens * heads * dim * 2
    total_bytes = chunk_bytes * args.chunks
    res: dict = {"device": str(dev), "jax": jax.__version__, "chunk_bytes": chunk_bytes, "chunks": args.chunks}

    t0 = time.perf_counter()
    view = np.asarray(x)
    res["asarray_s"] = time.perf_counter() - t0
    res["asarray_zero_copy"] = bool(view.ctypes.data == x.unsafe_buffer_pointer())
    res["asarray_equal"] = bool(np.array_equal(view[0, :8].view(np.uint16), host_np[0, :8].view(np.uint16)))

    t0 = time.perf_counter()
    split = [_sync(jax.device_put(np.ascontiguousarray(view[:, c * tokens : (c + 1) * tokens]), pinned)) for c in range(args.chunks)]
    res["split_host_copy_GBps"] = total_bytes / (time.perf_counter() - t0) / 1e9

    fetch = jax.jit(lambda a, c: jax.device_put(lax.dynamic_slice_in_dim(a, c * tokens, tokens, 1), on_device))

    def eager(c):
        return jax.device_put(x[:, c * tokens : (c + 1) * tokens], on_device)

    sources = {
        "view": lambda c: jax.device_put(view[:, c * tokens : (c + 1) * tokens], on_device),
        "split": lambda c: jax.device_put(split[c], on_device),
        "program": lambda c: fetch(x, c),
        "eager": eager,
    }
    # Compute of about the transfers' length: chained bf16 matmuls.
    side = args.matmul
    w = jax.device_put(jnp.ones((side, side), jnp.bfloat16) * 1e-3, on_device)

    @jax.jit
    def work(a, w):
        for _ in range(6):
            a = (a @ w).astype(jnp.bfloat16)
        return a

    a0 = _sync(jnp.ones((side, side), jnp.bfloat16))
    compute_s = _timed(lambda: _sync([work(a0, w) for _ in range(args.chunks)]))
    res["compute_s"] = compute_s
    for name, get in sources.items():
        entry: dict = {}
        try:
            alone = _timed(lambda: _sync([get(c) for c in range(args.chunks)]))
            entry["alone_s"] = alone
            entry["GBps"] = total_bytes / alone / 1e9

            def both():
                feed: queue.Queue = queue.Queue(maxsize=2)

                def produce():
                    for c in range(args.chunks):
                        feed.put(get(c))

                th = threading.Thread(target=produce)
                th.start()
                outs = []
                for _ in range(args.chunks):
                    chunk = feed.get()
                    outs.append(work(a0, w))
                    outs.append(chunk)
                th.join()
                _sync(outs)

            together = _timed(both)
            entry["with_compute_s"] = together
            entry["overlap"] = (alone + compute_s - together) / alone
        except Exception as e:  # record and go on
            entry["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        res[name] = entry

    # Device -> pinned host, overlapped with compute.
    ys = [_sync(jax.device_put(split[c], on_device)) for c in range(args.chunks)]
    d2h = _timed(lambda: _sync([jax.device_put(y, pinned) for y in ys]))
    res["d2h"] = {"alone_s": d2h, "GBps": total_bytes / d2h / 1e9}
    both = _timed(lambda: _sync([(work(a0, w), jax.device_put(y, pinned)) for y in ys]))
    res["d2h"]["with_compute_s"] = both
    res["d2h"]["overlap"] = (d2h + compute_s - both) / d2h

    # Assembling one pinned-host output from device chunks.
    outs = {}
    try:
        concat = jax.jit(lambda *cs: jnp.concatenate(cs, axis=1), out_shardings=pinned)
        hosts = [jax.device_put(y, pinned) for y in ys]
        outs["jit_concat_of_host_chunks_s"] = _timed(lambda: _sync(concat(*hosts)))
        outs["jit_concat_memory"] = str(concat.lower(*hosts).compile().memory_analysis())
    except Exception as e:
        outs["jit_concat_error"] = f"{type(e).__name__}: {str(e)[:300]}"
    try:
        put = jax.jit(
            lambda out, y, c: lax.dynamic_update_slice_in_dim(out, jax.device_put(y, pinned), c * tokens, 1),
            donate_argnums=0,
        )

        def donated():
            out = jax.device_put(jnp.zeros(x.shape, x.dtype, device=on_device), pinned)
            for c, y in enumerate(ys):
                out = put(out, y, c)
            return _sync(out)

        outs["donated_update_s"] = _timed(donated)
    except Exception as e:
        outs["donated_update_error"] = f"{type(e).__name__}: {str(e)[:300]}"
    try:

        def via_numpy():
            buf = np.empty(x.shape, x.dtype)
            hosts = [jax.device_put(y, pinned) for y in ys]
            for c, h in enumerate(hosts):
                buf[:, c * tokens : (c + 1) * tokens] = np.asarray(h)
            return _sync(jax.device_put(buf, pinned))

        outs["numpy_assemble_s"] = _timed(via_numpy)
    except Exception as e:
        outs["numpy_assemble_error"] = f"{type(e).__name__}: {str(e)[:300]}"
    try:
        host_out = _sync(jax.device_put(np.zeros(x.shape, x.dtype), pinned))
        hv = np.asarray(host_out)
        zero_copy_out = hv.ctypes.data == host_out.unsafe_buffer_pointer()

        def into_view():
            hosts = [jax.device_put(y, pinned) for y in ys]
            for c, h in enumerate(hosts):
                hv[:, c * tokens : (c + 1) * tokens] = np.asarray(h)
            return host_out

        outs["write_into_view_s"] = _timed(into_view)
        outs["write_into_view_zero_copy"] = bool(zero_copy_out)
        outs["write_into_view_visible"] = bool(
            np.array_equal(np.asarray(jax.device_put(host_out, on_device))[:, :4].view(np.uint16),
                           np.asarray(ys[0])[:, :4].view(np.uint16))
        )
    except Exception as e:
        outs["write_into_view_error"] = f"{type(e).__name__}: {str(e)[:300]}"
    res["assemble"] = outs
    print(json.dumps(res, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
