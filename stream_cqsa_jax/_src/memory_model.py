"""The device-memory model behind every plan (see docs/memory_model.md).

The budget covers what one attention call adds to device memory: its
temporaries. Arrays the caller passes in and the arrays it gets back are the
caller's and are not counted (when they live in host memory they cost the
device nothing at all). Two terms make up the estimate:

* resident: float32 accumulators that live for the whole pass;
* working: what one subproblem step holds (gathered chunks, kernel tiles,
  partial results, merge buffers).

All sizes are in bytes and are upper bounds for the executor in
``executor.py`` and the XLA kernel in ``kernels/xla.py``.
"""

from __future__ import annotations

import dataclasses

import numpy as np

# Fixed allowance for scalars and allocator rounding.
SLACK_BYTES = 1 << 16


@dataclasses.dataclass(frozen=True)
class Problem:
    """Static description of one attention call: shapes and dtype."""

    batch: int
    q_len: int
    kv_len: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    dtype: str

    @property
    def itemsize(self) -> int:
        return np.dtype(_numpy_dtype(self.dtype)).itemsize

    @property
    def acc_itemsize(self) -> int:
        """Accumulators are float32, or float64 for float64 inputs."""
        return max(4, self.itemsize)

    @property
    def groups(self) -> int:
        return self.num_q_heads // self.num_kv_heads


@dataclasses.dataclass(frozen=True)
class Layout:
    """How a plan cuts the problem, as the memory model needs it.

    Attributes:
      num_chunks: C.
      q_slots, kv_slots: most query / key-value chunks one subproblem holds.
      q_chunk, kv_chunk: chunk sizes in tokens.
      block_q, block_kv: kernel tile sizes in tokens.
      gathers: False when the single subproblem reads the inputs in place.
    """

    num_chunks: int
    q_slots: int
    kv_slots: int
    q_chunk: int
    kv_chunk: int
    block_q: int
    block_kv: int
    gathers: bool = True


@dataclasses.dataclass(frozen=True)
class Footprint:
    """Estimated device bytes of one pass."""

    resident: int
    working: int

    tables: int = 0

    @property
    def total(self) -> int:
        return self.resident + self.working + self.tables + SLACK_BYTES


def _table_bytes(lay: Layout) -> int:
    """The schedule tables (int32 slots and pair lists, bool pair kinds), one row per chunk at most."""
    pairs = lay.q_slots * lay.kv_slots
    return lay.num_chunks * (4 * (2 * lay.q_slots + lay.kv_slots) + 5 * pairs)


def _tile_bytes(p: Problem, lay: Layout, score_buffers: int, row_buffers: int) -> int:
    """Kernel temporaries for one (query tile, key tile) step."""
    f = p.acc_itemsize
    scores = score_buffers * p.batch * p.num_q_heads * lay.block_q * lay.block_kv * f
    mask = 2 * p.batch * lay.block_q * lay.block_kv
    rows = row_buffers * p.batch * lay.block_q * p.num_q_heads * p.head_dim * f
    kv_tiles = 2 * p.batch * lay.block_kv * p.num_kv_heads * p.head_dim * f
    stats = 4 * p.batch * p.num_q_heads * lay.block_q * f
    return scores + mask + rows + kv_tiles + stats


def forward_footprint(p: Problem, lay: Layout) -> Footprint:
    """Forward pass: inputs q, k, v; accumulated softmax state (acc, m, l).

    A plan that reads the inputs in place computes the state directly; one
    that gathers also holds one subproblem's chunks and partial state.
    """
    f, it = p.acc_itemsize, p.itemsize
    q_row = p.num_q_heads * p.head_dim
    state_row = q_row + 2 * p.num_q_heads  # acc, m, l per token
    kv_row = p.num_kv_heads * p.head_dim
    resident = p.batch * lay.num_chunks * lay.q_chunk * state_row * f
    working = _tile_bytes(p, lay, score_buffers=3, row_buffers=3)
    if lay.gathers:
        q_tokens = lay.q_slots * lay.q_chunk
        kv_tokens = lay.kv_slots * lay.kv_chunk
        gathered = p.batch * (q_tokens * q_row + 2 * kv_tokens * kv_row) * it
        positions = 4 * p.batch * (q_tokens + kv_tokens) * 2
        working += gathered + positions
        if lay.num_chunks > 1:  # one subproblem's state is the result itself
            partial = p.batch * q_tokens * state_row * f
            merge = 2 * p.batch * lay.q_chunk * state_row * f
            working += partial + merge
    return Footprint(resident=resident, working=working, tables=_table_bytes(lay))


def backward_footprint(p: Problem, lay: Layout) -> Footprint:
    """Backward pass: the forward's residuals (o in the accumulator dtype, m, l), delta and
    accumulators dq, dk, dv; a gathering plan also holds one subproblem's chunks and gradients."""
    f, it = p.acc_itemsize, p.itemsize
    q_row = p.num_q_heads * p.head_dim
    kv_row = p.num_kv_heads * p.head_dim
    residuals = p.batch * p.q_len * (q_row + 3 * p.num_q_heads) * f  # o, m, l, delta
    accumulators = p.batch * lay.num_chunks * (lay.q_chunk * q_row + lay.kv_chunk * 2 * kv_row) * f
    working = _tile_bytes(p, lay, score_buffers=5, row_buffers=4)
    if lay.gathers:
        q_tokens = lay.q_slots * lay.q_chunk
        kv_tokens = lay.kv_slots * lay.kv_chunk
        gathered = p.batch * (2 * q_tokens * q_row + 2 * kv_tokens * kv_row) * it
        stats = 3 * p.batch * p.num_q_heads * q_tokens * f
        positions = 4 * p.batch * (q_tokens + kv_tokens) * 2
        working += gathered + stats + positions
        if lay.num_chunks > 1:  # one subproblem's gradients are the result itself
            partial = p.batch * (q_tokens * q_row + 2 * kv_tokens * kv_row) * f
            merge = 2 * p.batch * max(lay.q_chunk * q_row, 2 * lay.kv_chunk * kv_row) * f
            working += partial + merge
    return Footprint(resident=residuals + accumulators, working=working, tables=_table_bytes(lay))


def _numpy_dtype(name: str):
    if name == "bfloat16":
        import ml_dtypes

        return ml_dtypes.bfloat16
    return np.dtype(name)


# -- the streaming executor (streaming.py) ----------------------------------------------

# Subproblems whose inputs the streaming executor keeps on the device at once:
# one whose kernel runs while the next one's chunks arrive.
STREAM_IN_FLIGHT = 2


def stream_table_bytes(lay: Layout) -> int:
    """One subproblem's tables, padded to the plan's slot counts: int32 slots and counts,
    int32 pair lists both ways and bool pair kinds (``kv_slots`` pairs per query slot at most)."""
    return 8 * (lay.q_slots + lay.kv_slots) + lay.q_slots * lay.kv_slots * (4 + 1) + lay.kv_slots * lay.q_slots * 4


def stream_input_bytes(p: Problem, lay: Layout) -> int:
    """Device bytes of one subproblem's inputs: gathered q, k, v chunks and its tables."""
    q_tokens = lay.q_slots * lay.q_chunk
    kv_tokens = lay.kv_slots * lay.kv_chunk
    gathered = p.batch * (q_tokens * p.num_q_heads + 2 * kv_tokens * p.num_kv_heads) * p.head_dim * p.itemsize
    return gathered + stream_table_bytes(lay)


def stream_partial_bytes(p: Problem, lay: Layout) -> int:
    """Device bytes of one subproblem's partial softmax state (acc, m, l in the accumulator dtype)."""
    q_tokens = lay.q_slots * lay.q_chunk
    return p.batch * q_tokens * (p.num_q_heads * p.head_dim + 2 * p.num_q_heads) * p.acc_itemsize


def stream_unit_bytes(p: Problem, lay: Layout) -> int:
    """Device bytes of one subproblem: its inputs and its partial state."""
    return stream_input_bytes(p, lay) + stream_partial_bytes(p, lay)


def stream_footprint(p: Problem, lay: Layout) -> Footprint:
    """Streaming executor: the softmax accumulators live in host memory (resident 0 on the device).

    The executor frees a subproblem's partial state before it lets the next
    inputs onto the device (`streaming.py`), so at most either two inputs and
    one partial state (a kernel runs while the next inputs arrive) or one input
    and two partial states (a kernel runs while the previous state is copied
    back) are live, plus one kernel's tile temporaries.
    """
    inputs, partial = stream_input_bytes(p, lay), stream_partial_bytes(p, lay)
    working = inputs + partial + max(inputs, partial) + _tile_bytes(p, lay, score_buffers=3, row_buffers=3)
    return Footprint(resident=0, working=working, tables=0)


@dataclasses.dataclass(frozen=True)
class HostFootprint:
    """Host bytes of a streaming run (not part of the device budget).

    Attributes:
      accumulators: float32 softmax state of every (padded) query token, plus
        one spare slot per query slot of a subproblem (copy-on-write merges).
      buffers: gathered chunks and partial states in flight on the host.
    """

    accumulators: int
    buffers: int

    @property
    def total(self) -> int:
        return self.accumulators + self.buffers


def stream_host_footprint(p: Problem, lay: Layout) -> HostFootprint:
    """Host memory of a streaming run: accumulators (in memory or in files) and per-step buffers."""
    state_row = p.num_q_heads * p.head_dim + 2 * p.num_q_heads
    slots = lay.num_chunks + lay.q_slots
    accumulators = p.batch * slots * lay.q_chunk * state_row * 4
    buffers = (STREAM_IN_FLIGHT + 1) * stream_unit_bytes(p, lay)
    return HostFootprint(accumulators=accumulators, buffers=buffers)


# -- the out-of-core executor (offload.py) -----------------------------------------------------

# Subproblems whose input chunks the out-of-core pipeline keeps on the device at
# once: the one computing and the next one arriving.
OFFLOAD_IN_FLIGHT = 2


def state_row_bytes(p: Problem) -> int:
    """Softmax-state bytes per query token: acc [N, H], m and l [N] in the accumulator dtype."""
    return (p.num_q_heads * p.head_dim + 2 * p.num_q_heads) * p.acc_itemsize


def chunk_bytes(p: Problem, lay: Layout) -> tuple[int, int]:
    """(one query chunk, one key chunk plus its value chunk) in the inputs' dtype."""
    q_chunk = p.batch * lay.q_chunk * p.num_q_heads * p.head_dim * p.itemsize
    return q_chunk, 2 * p.batch * lay.kv_chunk * p.num_kv_heads * p.head_dim * p.itemsize


def output_bytes(p: Problem, lay: Layout) -> int:
    """The output of every padded query token in the inputs' dtype, with its float32 log-sum-exp."""
    return p.batch * lay.num_chunks * lay.q_chunk * p.num_q_heads * (p.head_dim * p.itemsize + 4)


def device_state_bytes(p: Problem, lay: Layout) -> int:
    """Full-length softmax accumulators held on the device: every padded query token."""
    return p.batch * lay.num_chunks * lay.q_chunk * state_row_bytes(p)


def offload_footprint(p: Problem, lay: Layout, accumulators: str) -> Footprint:
    """Out-of-core forward with q, k, v in host memory; `accumulators` is "device" or "host".

    The pipeline (outside `jit`) holds the chunks of `OFFLOAD_IN_FLIGHT`
    subproblems (one computing, the next arriving), the computing one's chunks
    once more side by side for the kernel, its partial state and the merge
    buffers. Host accumulators visit the device one query chunk's slice at a
    time, inside the step (`host_accumulators.merge`); device accumulators
    live on the device for the whole pass (``resident``). The jitted scan (a call traced inside `jit`)
    holds less: one subproblem's gathered chunks, one chunk in transit, the
    partial state, the merge, and at the end the output before it goes home.
    """
    inputs, partial = stream_input_bytes(p, lay), stream_partial_bytes(p, lay)
    chunk_state = p.batch * lay.q_chunk * state_row_bytes(p)
    merge = 2 * chunk_state
    finalize = p.batch * lay.q_chunk * p.num_q_heads * (p.head_dim * (p.acc_itemsize + p.itemsize) + 4)
    tiles = _tile_bytes(p, lay, score_buffers=3, row_buffers=3)
    pipeline = (OFFLOAD_IN_FLIGHT + 1) * inputs + partial + merge + tiles + finalize
    if accumulators == "host":  # slices are read, merged and written back one query chunk at a time
        return Footprint(resident=0, working=pipeline + chunk_state, tables=0)
    resident = device_state_bytes(p, lay)
    chunk_in = p.batch * max(lay.q_chunk * p.num_q_heads, lay.kv_chunk * p.num_kv_heads) * p.head_dim * p.itemsize
    traced = max(inputs + chunk_in + partial + merge + tiles, output_bytes(p, lay))
    return Footprint(resident=resident, working=max(pipeline, traced), tables=0)


def offload_backward_footprint(p: Problem, lay: Layout, accumulators: str) -> Footprint:
    """Backward with q, k, v, dO, the float32 output and the row statistics in host memory
    (the scan executor, jitted): one subproblem's gathered q, dO, k, v chunks and row
    statistics, one chunk in transit, its partial gradients, the accumulate buffers and
    kernel tiles; the float32 gradient accumulators dq, dk, dv on the device for the whole
    pass (``accumulators="device"``, plus the gradients cast for the caller) or in host
    memory, visiting a chunk at a time."""
    f, it = p.acc_itemsize, p.itemsize
    q_row, kv_row = p.num_q_heads * p.head_dim, p.num_kv_heads * p.head_dim
    q_tokens, kv_tokens = lay.q_slots * lay.q_chunk, lay.kv_slots * lay.kv_chunk
    gathered = p.batch * (2 * q_tokens * q_row + 2 * kv_tokens * kv_row) * it
    in_transit = p.batch * max(lay.q_chunk * q_row, lay.kv_chunk * kv_row) * f
    stats = 3 * p.batch * p.num_q_heads * q_tokens * f
    partial = p.batch * (q_tokens * q_row + 2 * kv_tokens * kv_row) * f
    accumulate = 2 * p.batch * max(lay.q_chunk * q_row, lay.kv_chunk * kv_row) * f
    working = gathered + in_transit + stats + partial + accumulate + _tile_bytes(p, lay, score_buffers=5, row_buffers=4)
    if accumulators == "host":
        return Footprint(resident=0, working=working, tables=_table_bytes(lay))
    padded_q, padded_kv = lay.num_chunks * lay.q_chunk, lay.num_chunks * lay.kv_chunk
    resident = p.batch * (padded_q * q_row + 2 * padded_kv * kv_row) * f
    cast = p.batch * (p.q_len * q_row + 2 * p.kv_len * kv_row) * it
    return Footprint(resident=resident, working=working + cast, tables=_table_bytes(lay))


# -- the query-row order of the out-of-core executor (query_rows.py) ----------------------------


def query_rows_footprint(p: Problem, lay: Layout) -> Footprint:
    """Out-of-core forward in query-row order (``lay``: one query and one key/value chunk per step).

    The row's float32 state stays on the device for the whole row
    (``resident``); next to it the program holds the query chunk and either one
    pair's key/value chunks with the kernel's partial state, or, when the row
    ends, its output chunk on the way home (output, its float32 copy for the
    backward, log-sum-exp).
    """
    q_chunk, kv_chunks = chunk_bytes(p, lay)
    chunk_state = p.batch * lay.q_chunk * state_row_bytes(p)
    finalize = p.batch * lay.q_chunk * p.num_q_heads * (p.head_dim * (p.acc_itemsize + p.itemsize) + 4)
    tiles = _tile_bytes(p, lay, score_buffers=3, row_buffers=3)
    working = q_chunk + max(kv_chunks + chunk_state, finalize) + tiles
    return Footprint(resident=chunk_state, working=working, tables=0)


def query_rows_moved_bytes(p: Problem, lay: Layout, visible_pairs: int) -> int:
    """Host <-> device bytes of a query-row pass: every query chunk once, the key/value chunk of
    every visible chunk pair, and the output with its log-sum-exp home once."""
    q_chunk, kv_chunks = chunk_bytes(p, lay)
    return lay.num_chunks * q_chunk + visible_pairs * kv_chunks + output_bytes(p, lay)


def quorum_moved_bytes(p: Problem, lay: Layout, accumulators: str) -> int:
    """Host <-> device bytes of a quorum pass, at most: each of the C subproblems sends its
    query and key/value chunks (``lay.q_slots`` of each), and with host accumulators reads
    and writes back the state of its query chunks; then the output goes home once."""
    q_chunk, kv_chunks = chunk_bytes(p, lay)
    per_subproblem = lay.q_slots * q_chunk + lay.kv_slots * kv_chunks
    if accumulators == "host":
        per_subproblem += 2 * lay.q_slots * p.batch * lay.q_chunk * state_row_bytes(p)
    return lay.num_chunks * per_subproblem + output_bytes(p, lay)


def query_rows_backward_footprint(p: Problem, lay: Layout) -> Footprint:
    """Backward in query-row order: two passes, each holding one chunk's float32 gradient
    accumulators for its whole row (or column) of pairs.

    The dq pass holds a query chunk with its dO, row statistics (log-sum-exp,
    ones, delta) and float32 dq, and per pair the key/value chunks and the
    pair's partial dq; the dk/dv pass holds a key/value chunk with float32 dk
    and dv, and per pair a query chunk with its dO and statistics and the
    pair's partial dk and dv; each casts its finished chunk for the caller.
    """
    f, it = p.acc_itemsize, p.itemsize
    q_chunk = p.batch * lay.q_chunk * p.num_q_heads * p.head_dim
    kv_chunk = p.batch * lay.kv_chunk * p.num_kv_heads * p.head_dim
    stats = 3 * p.batch * p.num_q_heads * lay.q_chunk * f
    tiles = _tile_bytes(p, lay, score_buffers=5, row_buffers=4)
    dq_pass = 2 * q_chunk * it + stats + 2 * q_chunk * f + 2 * kv_chunk * it + q_chunk * it
    dkv_pass = 2 * kv_chunk * it + 4 * kv_chunk * f + 2 * q_chunk * it + stats + 2 * kv_chunk * it
    return Footprint(resident=0, working=max(dq_pass, dkv_pass) + tiles, tables=0)
