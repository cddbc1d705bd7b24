"""Sizing a billion-token attention call: plan it, run a sample of its subproblems, extrapolate.

    python examples/billion_tokens.py            # CPU-sized plan, a few subproblems (well under a minute)
    python examples/billion_tokens.py --full     # the 10**9-token plan (8 heads, head dim 64, causal,
                                                 # bfloat16, 4 GiB budget): meant for a GPU
    python examples/billion_tokens.py --end-to-end 32M --heads 2 --workdir /scratch/run
                                                 # a whole stream_attention run over memory-mapped files

Sampled mode builds the streaming plan (``executor="stream"``), measures this
machine's rates with small synthetic runs (`cost_model.calibrate`: never the
plan's own subproblems) and predicts each stage from them. It then picks
random quorums and runs each subproblem stage by stage on random data (tables,
host gather, transfer, kernel, copy back, float32 merge into host
accumulators), then the same subproblems through the streaming pipeline with
the lanes overlapped as in `stream_attention`, and prints prediction next to
measurement (stage times, pipelined time, device peak from ``memory_stats()``
where the backend has it) and the whole run extrapolated. Chunks of random
data come from a small pool, so the gather costs a copy (like a page-cached
file), not a random number generator.

End-to-end mode writes random inputs of the given length to raw files, runs
`stream_attention` on them (progress bar, optional checkpoint), reports the
time and throughput, and checks a few output rows against float64.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import jax
import ml_dtypes
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import stream_cqsa_jax as sc  # noqa: E402
from stream_cqsa_jax._src import cost_model, executor, streaming  # noqa: E402
from stream_cqsa_jax._src.budget import format_bytes  # noqa: E402
from stream_cqsa_jax._src.host_state import HostState, StateLayout  # noqa: E402

FULL = dict(q_len=10**9, heads=8, head_dim=64, dtype="bfloat16", budget="4GiB", samples=4)
SMALL = dict(q_len=2**20, heads=2, head_dim=32, dtype="float32", budget="24MiB", samples=3)
_DTYPES = {"bfloat16": ml_dtypes.bfloat16, "float16": np.float16, "float32": np.float32}


def _tokens(text: str) -> int:
    scale = {"k": 10**3, "m": 2**20, "g": 2**30, "b": 10**9}
    text = text.strip().lower()
    return int(float(text[:-1]) * scale[text[-1]]) if text[-1] in scale else int(text)


class PooledTokens:
    """A read-only stand-in for an array [B, L, heads, H] of random values, any length.

    Slicing ``x[:, lo:hi]`` returns rows of a small pool of random tokens
    (row ``j`` is pool row ``j % pool``), so reading costs a copy.
    """

    def __init__(self, batch, length, heads, head_dim, dtype, seed, pool=1 << 16):
        rng = np.random.default_rng(seed)
        self.shape = (batch, length, heads, head_dim)
        self.dtype = np.dtype(dtype)
        self._pool = rng.standard_normal((batch, 2 * pool, heads, head_dim), np.float32).astype(dtype)
        self._size = pool

    def __getitem__(self, index):
        rows = index[1]
        lo, hi = rows.start, min(rows.stop, self.shape[1])
        if hi <= lo:
            return self._pool[:, :0]
        out = []
        while lo < hi:
            start = lo % self._size
            take = min(hi - lo, self._size)
            out.append(self._pool[:, start : start + take])
            lo += take
        return np.concatenate(out, axis=1)


def _device_memory():
    try:
        stats = jax.devices()[0].memory_stats()
    except Exception:  # backends without memory statistics
        return None
    return stats or None


def _timed(fn):
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start


class SampleState(HostState):
    """Host accumulators for one subproblem's query chunks, reused by every sampled subproblem.

    Every slot starts merged (so each merge reads and writes its slots, as in a
    real run past its first subproblems); chunk ids are mapped to slots in order.
    """

    def __init__(self, p):
        m = p.cover.size
        layout = StateLayout(p.batch, p.q_chunk, p.num_q_heads, p.head_dim, m, m)
        arrays = (np.zeros(layout.acc_shape, np.float32), np.full(layout.row_shape, -np.inf, np.float32),
                  np.zeros(layout.row_shape, np.float32))
        super().__init__(layout, arrays, np.arange(m), copy_on_write=False)

    def merge(self, chunks, acc, m, l):
        super().merge(np.arange(len(chunks)), acc, m, l)


def _choose(p, count: int, seed: int) -> list[int]:
    """`count` distinct random quorums that own at least one visible pair."""
    rng = np.random.default_rng(seed)
    chosen: list[int] = []
    while len(chosen) < count:
        i = int(rng.integers(0, p.num_chunks))
        if i not in chosen and p.quorum_tables(i).num_pairs > 0:
            chosen.append(i)
    return chosen


def sample(args) -> None:
    size = FULL if args.full else SMALL
    get = lambda name: getattr(args, name) if getattr(args, name) is not None else size[name]
    heads = get("heads")
    kv_heads = args.kv_heads or heads
    dtype = get("dtype")
    p, plan_s = _timed(
        lambda: sc.plan(
            q_len=get("q_len"), num_q_heads=heads, num_kv_heads=kv_heads, head_dim=get("head_dim"), dtype=dtype,
            is_causal=True, memory_budget=get("budget"), implementation=args.implementation, executor="stream",
        )
    )
    print(p.summary())
    print(f"planned in {plan_s:.1f} s")
    rates, calibrate_s = _timed(lambda: cost_model.calibrate(p, seed=args.seed))
    print(f"calibrated in {calibrate_s:.1f} s: {_rates_text(rates)}")
    q = PooledTokens(p.batch, p.q_len, heads, p.head_dim, _DTYPES[dtype], args.seed)
    k = PooledTokens(p.batch, p.kv_len, kv_heads, p.head_dim, _DTYPES[dtype], args.seed + 1)
    v = PooledTokens(p.batch, p.kv_len, kv_heads, p.head_dim, _DTYPES[dtype], args.seed + 2)
    run = streaming.subproblem_kernel(p.implementation, executor.kernel_config(p, p.head_dim**-0.5))
    samples = get("samples")
    warmup, *chosen = _choose(p, samples + 1, args.seed)

    # Stage by stage, one subproblem at a time (the warm-up one compiles the kernel).
    acc = SampleState(p)
    rows = []
    for n, i in enumerate([warmup] + chosen):
        tables, t_tables = _timed(lambda: p.quorum_tables(i))
        host, t_gather = _timed(lambda: streaming.gather_subproblem(p, tables, q, k, v))
        dev, t_put = _timed(lambda: jax.block_until_ready(jax.device_put(host)))
        partial, t_kernel = _timed(lambda: jax.block_until_ready(run(*dev)))
        fetched, t_fetch = _timed(lambda: [np.asarray(x) for x in streaming.start_fetch(partial)])
        del dev, partial
        _, t_merge = _timed(lambda: acc.merge(tables.q_slots[: tables.num_q], *fetched))
        if n == 0:
            print(f"warm-up (compilation included): kernel {t_kernel:.2f} s")
            continue
        measured = cost_model.StageSeconds(t_tables, t_gather, t_put, t_kernel, t_fetch, t_merge)
        predicted = cost_model.subproblem_seconds(p, tables.num_pairs, tables.num_q, rates)
        rows.append((i, tables.num_pairs, predicted, measured))
    _report_stages(rows)

    # The same subproblems through the streaming pipeline, lanes overlapped as in stream_attention.
    _, wall = _timed(lambda: streaming.run_quorums(p, p.head_dim**-0.5, q, k, v, acc, None, 0, 0, False, chosen))
    after = _device_memory()
    _report(p, rows, wall, rates, after)


def _rates_text(r) -> str:
    return (
        f"kernel {r.kernel_flops / 1e12:.3g} TFLOP/s, tables {r.table_entries / 1e6:.0f} M entries/s, gather "
        f"{r.gather / 1e9:.1f} GB/s, to device {r.host_to_device / 1e9:.1f} GB/s, to host "
        f"{r.device_to_host / 1e9:.1f} GB/s, merge {r.merge / 1e9:.1f} GB/s"
    )


_STAGES = ("tables", "gather", "put", "kernel", "fetch", "merge")


def _report_stages(rows) -> None:
    print("stage seconds, predicted / measured (one subproblem at a time):")
    print(f"{'quorum':>10} {'pairs':>9} " + " ".join(f"{name:>15}" for name in _STAGES))
    for i, pairs, predicted, measured in rows:
        cells = " ".join(f"{getattr(predicted, s):7.3f}/{getattr(measured, s):<7.3f}" for s in _STAGES)
        print(f"{i:>10} {pairs:>9} {cells}")


def _pipeline_seconds(stages) -> float:
    """Predicted wall time of subproblems run through the three-lane pipeline, in order."""
    first, last = stages[0], stages[-1]
    return first.producer + first.kernel + last.consumer + sum(s.step for s in stages[1:])


def _report(p, rows, wall: float, rates, after) -> None:
    """Prediction next to measurement for the sampled subproblems, then the whole run extrapolated."""
    predicted = [r[2] for r in rows]
    measured = [r[3] for r in rows]
    expected_wall = _pipeline_seconds(predicted)
    kernel_pred = sum(s.kernel for s in predicted)
    kernel_meas = sum(s.kernel for s in measured)
    print()
    print(f"{'':34s} {'predicted':>12} {'measured':>12} {'ratio':>7}")
    line = lambda name, a, b, unit="s": print(f"{name:34s} {a:11.3f}{unit} {b:11.3f}{unit} {b / a:7.3f}")
    line(f"kernels of {len(rows)} subproblems", kernel_pred, kernel_meas)
    line(f"pipelined run of {len(rows)} subproblems", expected_wall, wall)
    line("per subproblem, pipelined", expected_wall / len(rows), wall / len(rows))
    if after and "peak_bytes_in_use" in after:
        gib = 2**30
        line("device peak (GiB, whole process)", p.estimated_peak_bytes / gib, after["peak_bytes_in_use"] / gib, " ")
    else:
        print("device peak: n/a (this backend reports no memory statistics)")
    print(f"host accumulators of the whole run: {format_bytes(p.host_footprint.accumulators)} (not allocated here)")
    total = cost_model.run_seconds(p, rates)
    scale = wall / expected_wall
    print()
    print(f"whole run: {p.num_chunks} subproblems, {p.num_pairs} chunk pairs, "
          f"{p.num_pairs * cost_model.pair_flops(p):.3e} FLOPs (whole chunk pairs)")
    print(f"  predicted from the calibrated rates    {_duration(total)}")
    print(f"  scaled by the sample's measured/predicted {_duration(total * scale)}")


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:10.1f} s"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:10.2f} h"
    return f"{seconds / 86400:10.1f} days"


def end_to_end(args) -> None:
    t = _tokens(args.end_to_end)
    heads = args.heads or 2
    kv_heads = args.kv_heads or heads
    h = args.head_dim or 64
    dtype = _DTYPES[args.dtype or "bfloat16"]
    workdir = args.workdir or tempfile.mkdtemp(prefix="stream-e2e-")
    os.makedirs(workdir, exist_ok=True)
    rng = np.random.default_rng(args.seed)
    arrays = {}
    block = 1 << 20
    for name, n in (("q", heads), ("k", kv_heads), ("v", kv_heads)):
        path = os.path.join(workdir, f"{name}.raw")
        x = np.memmap(path, dtype=dtype, mode="w+", shape=(1, t, n, h))
        for lo in range(0, t, block):
            x[:, lo : lo + block] = rng.standard_normal((1, min(block, t - lo), n, h), np.float32).astype(dtype)
        x.flush()
        arrays[name] = np.memmap(path, dtype=dtype, mode="r", shape=(1, t, n, h))
    out = np.memmap(os.path.join(workdir, "out.raw"), dtype=dtype, mode="w+", shape=(1, t, heads, h))
    p = sc.plan(q_len=t, num_q_heads=heads, num_kv_heads=kv_heads, head_dim=h, dtype=np.dtype(dtype).name,
                is_causal=True, memory_budget=args.budget, executor="stream")
    print(p.summary())
    start = time.perf_counter()
    sc.stream_attention(arrays["q"], arrays["k"], arrays["v"], out=out, is_causal=True, memory_budget=args.budget,
                        checkpoint_dir=args.checkpoint_dir, progress=True)
    wall = time.perf_counter() - start
    flops = 4 * heads * h * p.num_pairs * p.q_chunk * p.kv_chunk
    print(f"{t} tokens in {wall:.1f} s ({t / wall:.3e} query tokens/s, {flops / wall:.3e} FLOP/s over whole "
          "chunk pairs)")
    _spot_check(arrays, out, rng, h)
    if not args.keep and args.workdir is None:
        import shutil

        shutil.rmtree(workdir, ignore_errors=True)


def _spot_check(arrays, out, rng, h, rows: int = 8, block: int = 1 << 20) -> None:
    """float64 attention for a few query rows (causal), streamed over the keys; max relative error."""
    q, k, v = arrays["q"], arrays["k"], arrays["v"]
    t, n, kh = q.shape[1], q.shape[2], k.shape[2]
    worst = 0.0
    for i in sorted(rng.integers(0, t, rows)):
        qi = np.asarray(q[0, i], np.float64).reshape(kh, n // kh, h) / np.sqrt(h)
        m = np.full((kh, n // kh), -np.inf)
        l = np.zeros((kh, n // kh))
        acc = np.zeros((kh, n // kh, h))
        for lo in range(0, i + 1, block):
            hi = min(i + 1, lo + block)
            kk, vv = np.asarray(k[0, lo:hi], np.float64), np.asarray(v[0, lo:hi], np.float64)
            s = np.einsum("kgh,skh->kgs", qi, kk)
            m_new = np.maximum(m, s.max(axis=-1))
            e = np.exp(s - m_new[..., None])
            scale = np.exp(m - m_new)
            l = l * scale + e.sum(axis=-1)
            acc = acc * scale[..., None] + np.einsum("kgs,skh->kgh", e, vv)
            m = m_new
        want = (acc / l[..., None]).reshape(n, h)
        got = np.asarray(out[0, i], np.float64)
        worst = max(worst, float(np.linalg.norm(got - want) / np.linalg.norm(want)))
    print(f"spot check: {rows} rows against float64, worst relative error {worst:.2e}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--full", action="store_true", help="the 10**9-token plan (for a GPU)")
    parser.add_argument("--end-to-end", default=None, metavar="TOKENS", help="run stream_attention on TOKENS (e.g. 32M)")
    parser.add_argument("--q-len", type=_tokens, default=None)
    parser.add_argument("--heads", type=int, default=None)
    parser.add_argument("--kv-heads", type=int, default=None)
    parser.add_argument("--head-dim", type=int, default=None)
    parser.add_argument("--dtype", choices=sorted(_DTYPES), default=None)
    parser.add_argument("--budget", default=None, help="device memory budget, e.g. 4GiB")
    parser.add_argument("--samples", type=int, default=None, help="subproblems to measure")
    parser.add_argument("--implementation", default=None, help="kernel (default: the backend's fastest)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", default=None, help="end-to-end: where the input and output files go")
    parser.add_argument("--checkpoint-dir", default=None, help="end-to-end: checkpoint (resumable run)")
    parser.add_argument("--keep", action="store_true", help="end-to-end: keep a temporary workdir")
    args = parser.parse_args(argv)
    for name in ("heads", "kv_heads", "head_dim", "samples", "q_len"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be positive")
    if args.end_to_end is not None:
        end_to_end(args)
    else:
        sample(args)


if __name__ == "__main__":
    main()
