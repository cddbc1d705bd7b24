"""Predicted time of a streaming run (`stream_attention`), stage by stage, from measured rates.

The streaming executor (`streaming.py`) keeps three lanes busy at once:

* the producer thread: build the quorum's tables, gather its chunks from the
  host arrays, `device_put` them;
* the device: the kernel;
* the main thread: copy the partial state back, merge it into the host
  accumulators.

In steady state a subproblem takes as long as its slowest lane. `Rates` holds
the throughputs of one machine; `calibrate` measures them with small
synthetic runs (never the plan's own subproblems), so a prediction can be
checked against a measurement (examples/billion_tokens.py).
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np

from . import memory_model

# How long each calibration measurement runs at least (seconds).
_CALIBRATION_SECONDS = 0.3


@dataclasses.dataclass(frozen=True)
class Rates:
    """Throughputs of one machine for one kind of plan.

    Attributes:
      kernel_flops: forward kernel FLOP/s, counting every chunk pair whole
        (``4 * B * N * H * cq * ck`` per pair, masked parts included).
      table_entries: quorum-table entries built per second (``M * M`` per subproblem).
      gather: bytes per second copied from host arrays into send buffers.
      host_to_device, device_to_host: bytes per second over the link.
      merge: bytes of float32 partial state merged into host accumulators per second.
      source: where the numbers come from.
    """

    kernel_flops: float
    table_entries: float
    gather: float
    host_to_device: float
    device_to_host: float
    merge: float
    source: str = ""


@dataclasses.dataclass(frozen=True)
class StageSeconds:
    """Seconds of one subproblem's stages, and of the lanes they run in."""

    tables: float
    gather: float
    put: float
    kernel: float
    fetch: float
    merge: float

    @property
    def producer(self) -> float:
        return self.tables + self.gather + self.put

    @property
    def consumer(self) -> float:
        return self.fetch + self.merge

    @property
    def step(self) -> float:
        """Steady-state seconds per subproblem: the slowest lane."""
        return max(self.producer, self.kernel, self.consumer)

    @property
    def serial(self) -> float:
        return self.producer + self.kernel + self.consumer


@dataclasses.dataclass(frozen=True)
class SubproblemBytes:
    """What one subproblem of a streaming plan moves: gathered inputs and its partial state."""

    gathered: int  # q, k, v chunks, padded to the cover size (bytes)
    state: int  # float32 partial state (acc, m, l) of all query slots (bytes)
    table_entries: int  # M * M


def subproblem_bytes(plan) -> SubproblemBytes:
    """The sizes the device-memory model counts (`memory_model.stream_input_bytes` and
    `stream_partial_bytes`), split the way the host stages see them."""
    p, lay = plan.problem, plan.stream_layout
    tables = memory_model.stream_table_bytes(lay)
    gathered = memory_model.stream_input_bytes(p, lay) - tables
    return SubproblemBytes(gathered, memory_model.stream_partial_bytes(p, lay), lay.q_slots * lay.kv_slots)


def pair_flops(plan) -> int:
    """FLOPs of one whole chunk pair (both matmuls)."""
    return 4 * plan.batch * plan.num_q_heads * plan.head_dim * plan.q_chunk * plan.kv_chunk


def subproblem_seconds(plan, num_pairs: int, num_q: int, rates: Rates) -> StageSeconds:
    """Predicted stage times of a subproblem of `plan` owning `num_pairs` chunk pairs over
    `num_q` query chunks."""
    size = subproblem_bytes(plan)
    merged = size.state * num_q / plan.cover.size
    return StageSeconds(
        tables=size.table_entries / rates.table_entries,
        gather=size.gathered / rates.gather,
        put=size.gathered / rates.host_to_device,
        kernel=num_pairs * pair_flops(plan) / rates.kernel_flops,
        fetch=size.state / rates.device_to_host,
        merge=merged / rates.merge,
    )


def run_seconds(plan, rates: Rates) -> float:
    """Predicted seconds of a whole streaming run: every quorum at the mean pairs per quorum."""
    c = plan.num_chunks
    mean = subproblem_seconds(plan, plan.num_pairs / c, plan.cover.size, rates)
    return c * mean.step


# -- calibration ------------------------------------------------------------------------


def _rate(amount: float, run) -> float:
    """amount / seconds of `run()`, repeated until `_CALIBRATION_SECONDS` have passed (one warm-up)."""
    run()
    count, start = 0, time.perf_counter()
    while True:
        run()
        count += 1
        elapsed = time.perf_counter() - start
        if elapsed >= _CALIBRATION_SECONDS:
            return amount * count / elapsed


def calibration_plan(plan, max_cover: int = 1024):
    """A smaller streaming plan of the same shapes per chunk (chunk sizes, tiles, heads, head
    dim, dtype, masking) whose cover has at most `max_cover` elements."""
    from .plan import plan as make_plan
    from .quorum import singer_numbers, singer_q

    p = plan.problem
    m = min(plan.cover.size, max_cover)
    c = max(n for n in singer_numbers(max(7, m * m)) if singer_q(n) + 1 <= m) if m >= 3 else 7
    return make_plan(
        q_len=plan.q_chunk * c,
        kv_len=plan.kv_chunk * c,
        num_q_heads=p.num_q_heads,
        num_kv_heads=p.num_kv_heads,
        head_dim=p.head_dim,
        dtype=p.dtype,
        batch=p.batch,
        is_causal=plan.is_causal,
        local_window_size=plan.window,
        num_chunks=c,
        implementation=plan.implementation,
        block_q=plan.block_q,
        block_kv=plan.block_kv,
        memory_budget=1 << 62,
        executor="stream",
    )


def calibrate(plan, seed: int = 0) -> Rates:
    """Measures `Rates` on this machine for plans shaped like `plan`.

    The kernel runs one subproblem of `calibration_plan(plan)` on random data;
    the host stages gather, send, fetch and merge buffers of `plan`'s chunk
    sizes and cover size. Takes a few seconds plus one kernel compilation.
    """
    import jax

    from . import executor, stream_inputs, streaming
    from .host_state import HostState, StateLayout

    small = calibration_plan(plan)
    p = plan.problem
    rng = np.random.default_rng(seed)
    dtype = memory_model._numpy_dtype(p.dtype)
    b, m, cq = p.batch, plan.cover.size, plan.q_chunk

    def tokens(length, heads):
        return rng.standard_normal((b, length, heads, p.head_dim), np.float32).astype(dtype)

    # The kernel, on a subproblem of the smaller plan (a middle quorum: it owns pairs).
    sm = small.cover.size
    tables = small.quorum_tables(small.num_chunks // 2)
    args = jax.device_put(
        (tokens(sm * small.q_chunk, p.num_q_heads), tokens(sm * small.kv_chunk, p.num_kv_heads),
         tokens(sm * small.kv_chunk, p.num_kv_heads)) + tables.kernel_tables()
    )
    run = streaming.subproblem_kernel(small.implementation, executor.kernel_config(small, p.head_dim**-0.5))
    kernel = _rate(tables.num_pairs * pair_flops(small), lambda: jax.block_until_ready(run(*args)))
    table_rate = _rate(sm * sm, lambda: small.quorum_tables(small.num_chunks // 3))

    # Host stages at the plan's own sizes: m chunks of cq tokens, gathered from a source twice as long.
    source = tokens(2 * m * cq, p.num_q_heads)
    chunk_ids = np.sort(rng.permutation(2 * m)[:m])
    gathered = stream_inputs.gather(source, chunk_ids, cq, m)
    gather = _rate(gathered.nbytes, lambda: stream_inputs.gather(source, chunk_ids, cq, m))
    put = _rate(gathered.nbytes, lambda: jax.block_until_ready(jax.device_put(gathered)))
    state = jax.device_put(
        (rng.standard_normal((b, m * cq, p.num_q_heads, p.head_dim), np.float32),
         rng.standard_normal((b, p.num_q_heads, m * cq), np.float32),
         rng.random((b, p.num_q_heads, m * cq), np.float32) + 1)
    )
    state_bytes = sum(x.nbytes for x in state)
    fetch = _rate(state_bytes, lambda: [np.asarray(x) for x in streaming.start_fetch([y + 0 for y in state])])
    fetched = [np.asarray(x) for x in state]
    acc = HostState.in_memory(StateLayout(b, cq, p.num_q_heads, p.head_dim, m, m))
    acc.merge(np.arange(m), *fetched)  # every slot seen: later merges read and write them all
    merge = _rate(state_bytes, lambda: acc.merge(np.arange(m), *fetched))
    device = jax.devices()[0]
    return Rates(
        kernel_flops=kernel,
        table_entries=table_rate,
        gather=gather,
        host_to_device=put,
        device_to_host=fetch,
        merge=merge,
        source=f"calibrate() on {device.device_kind}; kernel on a {small.num_chunks}-chunk plan ({sm}-chunk quorums)",
    )
