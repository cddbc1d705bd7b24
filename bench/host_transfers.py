"""Device-to-host copy rates of a float32 partial state, by method (for the streaming executor).

    PYTHONPATH=. python bench/host_transfers.py --mib 700

Methods: ``np.asarray`` of a device array; the same after ``copy_to_host_async``
and a wait; ``jax.device_put`` to pinned host memory, then ``np.asarray``.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np


def _seconds(run, repeats: int = 5) -> float:
    run()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mib", type=int, default=700)
    args = parser.parse_args(argv)
    n = args.mib * 2**20 // 4
    device = jax.devices()[0]
    make = jax.jit(lambda i: jnp.arange(n, dtype=jnp.float32).reshape(-1, 64) * i)
    results = {}

    def plain():
        np.asarray(jax.block_until_ready(make(1.0)))

    def compute_only():
        jax.block_until_ready(make(1.0))

    def async_then_read():
        x = jax.block_until_ready(make(1.0))
        x.copy_to_host_async()
        np.asarray(x)

    results["compute_s"] = _seconds(compute_only)
    results["asarray_s"] = _seconds(plain) - results["compute_s"]
    results["copy_to_host_async_s"] = _seconds(async_then_read) - results["compute_s"]
    kinds = {m.kind for m in device.addressable_memories()}
    results["memory_kinds"] = sorted(kinds)
    if "pinned_host" in kinds:
        pinned = jax.sharding.SingleDeviceSharding(device, memory_kind="pinned_host")

        def via_pinned():
            np.asarray(jax.device_put(make(1.0), pinned))

        def via_pinned_no_numpy():
            jax.block_until_ready(jax.device_put(make(1.0), pinned))

        results["pinned_then_asarray_s"] = _seconds(via_pinned) - results["compute_s"]
        results["pinned_only_s"] = _seconds(via_pinned_no_numpy) - results["compute_s"]
    results["bytes"] = n * 4
    results["GB_per_s"] = {k: n * 4 / v / 1e9 for k, v in results.items() if k.endswith("_s") and k != "compute_s" and v > 0}
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
