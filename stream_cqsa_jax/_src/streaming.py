"""`stream_attention`: exact attention over NumPy arrays or memory-mapped files.

The plan (``plan(..., executor="stream")``) is driven from Python, one
quorum subproblem at a time, in plan order:

* a producer thread builds the subproblem's tables (``Plan.quorum_tables``,
  O(C)), reads its query and key/value chunks from the host arrays into
  NumPy buffers (zeros past the end), and `jax.device_put`s them, staying at
  most `memory_model.STREAM_IN_FLIGHT` subproblems ahead;
* the main thread dispatches the jitted kernel on them (one compilation per
  plan: every subproblem is padded to the cover size), starts copying the
  partial state back, and meanwhile fetches the *previous* subproblem's
  partial state, frees it on the device, lets the producer send the next
  inputs, and merges it into the host accumulators (`host_state.py`), so
  the device holds what `memory_model.stream_footprint` counts;
* with a checkpoint directory, each merge is committed atomically
  (`checkpoint.py`), so a killed run resumes to the same bits.

The output ``acc / l`` is written at the very end.
"""

from __future__ import annotations

import functools
import os
import queue
import shutil
import tempfile
import threading

import jax
import numpy as np

from . import executor, host_threads, memory_model, stream_inputs
from .checkpoint import Checkpoint, fingerprint
from .host_state import HostState, StateLayout
from .kernels.base import KernelInputs
from .plan import Plan, call_shape, plan as make_plan

# Accumulators in host memory take at most this share of the host's available
# memory; larger ones go to files next to a memory-mapped `out`.
IN_MEMORY_FRACTION = 0.5
# Overrides the limit above (bytes) when set; None: use IN_MEMORY_FRACTION.
IN_MEMORY_LIMIT_BYTES: int | None = None


def stream_attention(
    query,
    key,
    value,
    *,
    out=None,
    is_causal: bool = False,
    scale: float | None = None,
    local_window_size: int | tuple[int, int] | None = None,
    memory_budget: int | float | str | None = None,
    checkpoint_dir=None,
    progress: bool = True,
) -> np.ndarray:
    """Exact softmax attention over host arrays or files, a few chunks at a time on the device.

    Args:
      query: [B, T, N, H] (or [T, N, H]); key, value: [B, S, K, H], N a
        multiple of K (GQA / MQA). NumPy arrays, `np.memmap`s or paths of
        ``.npy`` files; float32, float16 or bfloat16 (ml_dtypes), one dtype.
      out: None, or a writeable array / memmap of the query's shape and dtype
        that receives the result. It is written at the end of the call only:
        its contents are valid once the call returns.
      is_causal, scale, local_window_size: as in `dot_product_attention`.
      memory_budget: device bytes the call may use (int, or e.g. "4GiB");
        default: 80% of the device's free memory. Accumulators are on the host.
      checkpoint_dir: a directory to record progress in. A call killed at any
        moment and repeated with the same arguments resumes there and gives a
        bitwise identical output; other arguments are refused. The
        checkpoint's files are deleted once the output is written.
      progress: show a progress bar (tqdm, on stderr) with throughput and ETA.

    Returns:
      `out` (or a new array) [B, T, N, H] in the inputs' dtype; rows that see
      no key are zeros.

    Raises:
      TypeError / ValueError before any work, naming the argument, for
      malformed arguments, unreadable files, a budget too small (stating the
      smallest that works) or a checkpoint of other arguments.
    """
    spec, q, k, v, out4, ckpt_dir = stream_inputs.validate(
        query,
        key,
        value,
        out,
        scale=scale,
        is_causal=is_causal,
        local_window_size=local_window_size,
        checkpoint_dir=checkpoint_dir,
        progress=progress,
    )
    plan = make_plan(**call_shape(spec), memory_budget=memory_budget, executor="stream")
    result = out if out is not None else np.empty(q.shape[1:] if spec.unbatched else q.shape, q.dtype)
    out4 = out4 if out4 is not None else (result[None] if spec.unbatched else result)
    host, ckpt, scratch, done, pairs_done = _open_state(plan, spec, q, k, v, out, ckpt_dir)
    try:
        run_quorums(plan, spec.scale, q, k, v, host, ckpt, done, pairs_done, progress)
        host.write_output(out4)
        if isinstance(result, np.memmap):
            result.flush()
    finally:
        if ckpt is not None:
            ckpt.close()
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    if ckpt is not None:
        ckpt.remove()
    return result


# -- accumulators -------------------------------------------------------------------------


def _available_host_bytes() -> int:
    """MemAvailable from /proc/meminfo (page cache counts as available), else free pages."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return 8 * 2**30


def _open_state(plan: Plan, spec, q, k, v, out, ckpt_dir):
    """(host state, checkpoint or None, scratch directory or None, done, pairs_done)."""
    spare = plan.cover.size if ckpt_dir is not None else 0
    layout = StateLayout(
        spec.batch, plan.q_chunk, spec.num_q_heads, spec.head_dim, plan.num_chunks, plan.num_chunks + spare
    )
    if ckpt_dir is not None:
        ckpt, host, done, pairs_done = Checkpoint.open(ckpt_dir, fingerprint(spec, plan, q, k, v), layout)
        return host, ckpt, None, done, pairs_done
    limit = IN_MEMORY_LIMIT_BYTES
    if limit is None:
        limit = int(IN_MEMORY_FRACTION * _available_host_bytes())
    if layout.nbytes <= limit:
        return HostState.in_memory(layout), None, None, 0, 0
    if not (isinstance(out, np.memmap) and out.filename):
        raise ValueError(
            f"the float32 accumulators need {layout.nbytes} bytes, more than the {limit} allowed in host memory; "
            "pass out as an np.memmap (they then go to files next to it) or a checkpoint_dir"
        )
    where = os.path.dirname(os.path.abspath(out.filename))
    scratch = tempfile.mkdtemp(prefix=os.path.basename(out.filename) + ".acc-", dir=where)
    try:
        return HostState.in_files(scratch, layout, None, copy_on_write=False), None, scratch, 0, 0
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise


# -- the pipeline -------------------------------------------------------------------------------


@functools.lru_cache(maxsize=16)
def subproblem_kernel(implementation: str, cfg):
    """The jitted kernel of one subproblem: (q, k, v, *tables) -> SoftmaxState (float32)."""
    kernel = executor._KERNELS[implementation]

    def run(q, k, v, *tables):
        return kernel.forward(KernelInputs(q, k, v, *tables), cfg)

    return jax.jit(run)


def gather_subproblem(plan: Plan, tables, q, k, v) -> tuple[np.ndarray, ...]:
    """Host buffers of one subproblem: q [B, M*cq, N, H], k, v [B, M*ck, K, H] and its tables."""
    m = plan.cover.size
    return (
        stream_inputs.gather(q, tables.q_slots[: tables.num_q], plan.q_chunk, m),
        stream_inputs.gather(k, tables.kv_slots[: tables.num_kv], plan.kv_chunk, m),
        stream_inputs.gather(v, tables.kv_slots[: tables.num_kv], plan.kv_chunk, m),
    ) + tables.kernel_tables()


@functools.lru_cache(maxsize=16)
def _pinned_host(device):
    """A sharding in pinned host memory of `device`, or None where that is not the faster way home."""
    if device.platform != "gpu":
        return None
    try:
        kinds = {memory.kind for memory in device.addressable_memories()}
    except (AttributeError, NotImplementedError):  # backends without memory kinds
        return None
    if "pinned_host" not in kinds:
        return None
    return jax.sharding.SingleDeviceSharding(device, memory_kind="pinned_host")


def start_fetch(arrays):
    """Starts copying device arrays (a pytree) to the host; `np.asarray` of the result waits for them.

    On GPUs the copy goes to pinned host memory (about 50 GB/s on an H200, against about
    1.2 GB/s for `np.asarray` of a device array, which copies into pageable memory).
    """
    leaves = jax.tree_util.tree_leaves(arrays)
    sharding = _pinned_host(leaves[0].devices().pop()) if leaves else None
    if sharding is not None:
        return jax.device_put(arrays, sharding)
    for array in leaves:
        array.copy_to_host_async()
    return arrays


class _Stop(Exception):
    pass


def _produce(plan: Plan, quorums, q, k, v, feed: queue.Queue, tokens: threading.Semaphore, stop: threading.Event):
    """Puts (tables, device arguments) of each live subproblem of `quorums` in order, then None."""

    def wait(acquire):
        while not acquire():
            if stop.is_set():
                raise _Stop

    try:
        for i in quorums:
            if stop.is_set():
                return
            tables = plan.quorum_tables(i)
            if tables.num_pairs == 0:
                continue
            wait(lambda: tokens.acquire(timeout=0.1))
            feed.put((tables, jax.device_put(gather_subproblem(plan, tables, q, k, v))))
        feed.put(None)
    except _Stop:
        return
    except BaseException as e:  # handed to the main thread, which raises it
        feed.put(e)


def _progress_bar(plan: Plan, pairs_done: int, enabled: bool):
    from tqdm.auto import tqdm

    per_pair = plan.q_chunk * plan.kv_chunk
    return tqdm(
        total=plan.num_pairs * per_pair,
        initial=pairs_done * per_pair,
        unit="pair",
        unit_scale=True,
        desc="stream_attention",
        disable=not enabled,
        smoothing=0.1,
    ), per_pair


def run_quorums(
    plan: Plan, scale: float, q, k, v, host: HostState, ckpt, done: int, pairs_done: int, progress: bool,
    quorums=None,
) -> None:
    """Runs quorums ``done .. C-1`` (or the given `quorums`, in order) and merges them in order
    into `host` (committing each with a checkpoint)."""
    bar, per_pair = _progress_bar(plan, pairs_done, progress)
    if quorums is None:
        quorums = range(done, plan.num_chunks)
    if len(quorums) == 0:
        bar.close()
        return
    run = subproblem_kernel(plan.implementation, executor.kernel_config(plan, scale))
    feed: queue.Queue = queue.Queue()
    tokens = threading.Semaphore(memory_model.STREAM_IN_FLIGHT)
    stop = threading.Event()
    producer = threading.Thread(target=_produce, args=(plan, quorums, q, k, v, feed, tokens, stop), daemon=True)
    state = {"pairs": pairs_done, "done": done}

    def finish(entry: list) -> None:
        """Fetches and merges the subproblem in `entry` (emptied: its device arrays die here)."""
        tables, partial = entry.pop()
        acc, m, l = (np.asarray(x) for x in partial)
        del partial  # copied home: its device buffers are free ...
        tokens.release()  # ... before the next inputs may come (memory_model.stream_footprint)
        host.merge(tables.q_slots[: tables.num_q], acc, m, l)
        state["pairs"] += tables.num_pairs
        state["done"] = tables.quorum + 1
        if ckpt is not None:
            ckpt.commit(host, state["done"], state["pairs"])
        bar.update(tables.num_pairs * per_pair)

    producer.start()
    pending: list = []  # at most one (tables, partial state) whose merge is due
    try:
        for tables, args in host_threads.drain(feed):
            partial = start_fetch(run(*args))  # device buffers die once copied home
            del args
            if pending:
                finish(pending)
            pending.append((tables, partial))
            del partial
        if pending:
            finish(pending)
        if ckpt is not None and state["done"] < plan.num_chunks:  # trailing quorums without pairs
            ckpt.commit(host, plan.num_chunks, state["pairs"])
    finally:
        stop.set()
        producer.join()
        bar.close()
