"""One process of the two-process check in `test_sharded.py` (CPU, localhost).

Usage: python multiprocess_worker.py PROCESS_ID NUM_PROCESSES PORT OUT_DIR CASE_JSON

CASE_JSON holds "data" (`make_case` arguments), "plan" (`stream_cqsa_jax.plan`
arguments) and "call" (further `dot_product_attention` arguments).

Each process owns 2 CPU devices; `jax.distributed.initialize` joins them
into one global mesh whose subproblem axis spans both processes. Every
process builds the same inputs (seeded), runs the sharded value-and-gradient
twice, and process 0 writes the results (replicated to every device) to
OUT_DIR/result.npz.
"""

from __future__ import annotations

import json
import os
import sys

LOCAL_DEVICES = 2


def make_case(seed: int, b: int, t: int, s: int, n: int, kh: int, h: int):
    """float32 NumPy (q [B,T,N,H], k, v [B,S,K,H], w [B,T,N,H], u [B,N,T]): inputs and loss weights."""
    import numpy as np

    rng = np.random.default_rng(seed)
    shapes = ((b, t, n, h), (b, s, kh, h), (b, s, kh, h), (b, t, n, h), (b, n, t))
    return tuple(rng.standard_normal(shape).astype(np.float32) for shape in shapes)


def value_and_grad_fn(mesh=None, axis=None, **call):
    """(q, k, v, w, u) -> (o, lse, dq, dk, dv) of ``sum(o * w) + sum(lse * u)``.

    `call` goes to `dot_product_attention` (plan, masks, ...); with `mesh`,
    the call is sharded over `axis`.
    """
    import jax
    import jax.numpy as jnp

    import stream_cqsa_jax as sc

    def loss(q, k, v, w, u):
        o, lse = sc.dot_product_attention(q, k, v, return_residuals=True, mesh=mesh, subproblem_axis=axis, **call)
        return jnp.sum(o * w) + jnp.sum(lse * u), (o, lse)

    def fn(q, k, v, w, u):
        (_, (o, lse)), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v, w, u)
        return (o, lse) + grads

    return fn


def main(process_id: int, num_processes: int, port: int, out_dir: str, case: dict) -> None:
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={LOCAL_DEVICES}"
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax

    jax.distributed.initialize(
        coordinator_address=f"127.0.0.1:{port}", num_processes=num_processes, process_id=process_id
    )
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import stream_cqsa_jax as sc

    assert jax.process_count() == num_processes and jax.device_count() == LOCAL_DEVICES * num_processes
    mesh = Mesh(np.array(jax.devices()), ("sp",))
    replicated = NamedSharding(mesh, P())
    arrays = make_case(**case["data"])
    arrays = tuple(jax.make_array_from_callback(x.shape, replicated, lambda idx, x=x: x[idx]) for x in arrays)
    plan = sc.plan(**case["plan"])
    fn = jax.jit(value_and_grad_fn(mesh, "sp", plan=plan, **case["call"]), out_shardings=replicated)
    first = fn(*arrays)
    second = fn(*arrays)
    local = lambda tree: [np.asarray(x.addressable_data(0)) for x in jax.tree.leaves(tree)]
    first, second = local(first), local(second)
    if process_id == 0:
        np.savez(
            os.path.join(out_dir, "result.npz"),
            *first,
            repeatable=np.array(all(np.array_equal(a, b) for a, b in zip(first, second))),
            devices=np.array(jax.device_count()),
            processes=np.array(jax.process_count()),
        )
    jax.distributed.shutdown()


if __name__ == "__main__":
    pid, nproc, port, out = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    main(pid, nproc, port, out, json.loads(sys.argv[5]))
