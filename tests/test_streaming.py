"""stream_attention over NumPy arrays and memory-mapped files; streaming plans.

Exactness against the float64 reference, bitwise-identical results across
accumulator placements, checkpoint resume (in-process interruption and a real
SIGKILL of a subprocess), refusal of mismatched checkpoints and bad input,
the progress bar, and plans of a billion tokens.
"""

import fcntl
import os
import random
import re
import subprocess
import sys
import threading
import time

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import stream_cqsa_jax as sc
from reference import attention, rel_error, schedule_tables
from stream_cqsa_jax._src import checkpoint, executor, memory_model, streaming
from stream_cqsa_jax._src import plan as plan_module

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
from stream_worker import CALL as WORKER_CALL  # noqa: E402

# One shape shared by several tests (one kernel compilation): B=2, T=S=300, N=4, K=2, H=16, causal.
SHAPE = dict(b=2, t=300, s=300, n=4, kh=2, h=16)
BUDGET = 400 * 1024


def _inputs(seed, b, t, s, n, kh, h, dtype=np.float32):
    rng = np.random.default_rng(seed)
    shapes = ((b, t, n, h), (b, s, kh, h), (b, s, kh, h))
    return tuple(rng.standard_normal(shape).astype(dtype) for shape in shapes)


def _memmap(path, x, mode="r"):
    """Writes `x` to a raw file and maps it again with `mode`."""
    np.memmap(path, dtype=x.dtype, mode="w+", shape=x.shape)[:] = x
    return np.memmap(path, dtype=x.dtype, mode=mode, shape=x.shape)


# -- streaming plans --------------------------------------------------------------------------


stream_plans = st.builds(
    lambda t, s, chunks, depth, causal, window, executor_name: sc.plan(
        q_len=t,
        kv_len=s,
        num_q_heads=2,
        head_dim=8,
        num_chunks=chunks,
        depth=depth,
        is_causal=causal,
        local_window_size=window,
        executor=executor_name,
    ),
    t=st.integers(1, 600),
    s=st.integers(1, 600),
    chunks=st.sampled_from([1, 2, 5, 7, 13, 21]),
    depth=st.sampled_from([1, 1, 2]),
    causal=st.booleans(),
    window=st.one_of(st.none(), st.integers(0, 150), st.tuples(st.integers(0, 100), st.integers(0, 100))),
    executor_name=st.sampled_from(["scan", "stream"]),
)


@settings(max_examples=30)
@given(stream_plans)
def test_quorum_tables_are_the_schedule_rows_padded_to_the_cover_size(p):
    """Built one at a time in O(C), the tables equal the rows of a schedule built pair by pair
    with plain loops (zeros beyond), and `Plan.schedule` equals that schedule."""
    want_tables = schedule_tables(p)
    for name, want in want_tables.items():
        got = getattr(p.schedule, name)
        assert got.dtype == want.dtype and got.shape == want.shape, name
        np.testing.assert_array_equal(got, want, err_msg=name)
    sched = p.schedule
    row_of = {int(i): r for r, i in enumerate(sched.quorums)}
    total = 0
    for i in range(p.num_chunks):
        t = p.quorum_tables(i)
        total += t.num_pairs
        if i not in row_of:
            assert t.num_pairs == 0
            continue
        r = row_of[i]
        for name in ("q_slots", "kv_slots", "pair_count", "pair_kv", "pair_full", "kv_pair_count", "kv_pair_q"):
            got, want = getattr(t, name), getattr(sched, name)[r]
            assert got.shape[0] == p.cover.size and got.dtype == want.dtype
            region = tuple(slice(0, n) for n in want.shape)
            np.testing.assert_array_equal(got[region], want, err_msg=name)
            rest = got.copy()
            rest[region] = 0
            assert not rest.any(), name
        assert p.quorum_subproblem(i).pairs == p.subproblems[r].pairs
    assert total == p.num_pairs == len(p.pairs())


def test_billion_token_plan_takes_seconds():
    kwargs = dict(q_len=10**9, num_q_heads=8, head_dim=64, dtype="bfloat16", is_causal=True, memory_budget="4GiB")
    start = time.perf_counter()
    p = sc.plan(**kwargs, executor="stream")
    assert time.perf_counter() - start < 30
    assert p.executor == "stream" and p.num_chunks > plan_module.MAX_CHUNKS
    assert p.estimated_peak_bytes <= 4 * 2**30 and p.estimated_resident_bytes == 0
    assert p.cover.size**2 < 1.1 * p.num_chunks  # m ~ sqrt(C)
    real = -(-p.q_len // p.q_chunk)  # chunks holding real tokens; causal: pairs (a, b <= a)
    assert p.num_pairs == real * (real + 1) // 2
    hash(p)

    quorum = p.num_chunks // 3
    start = time.perf_counter()
    pairs = p.quorum_tables(quorum).pairs()
    assert time.perf_counter() - start < 30
    assert len(pairs) > 0 and np.all(pairs[:, 0] >= pairs[:, 1])
    assert set(np.unique(pairs)) <= set(p.cover.quorum(quorum).tolist())
    np.testing.assert_array_equal(p.cover.owner(pairs[:, 0], pairs[:, 1]), quorum)

    text = p.summary()
    assert "streaming executor" in text and f"C = {p.num_chunks}" in text and "host" in text
    with pytest.raises(ValueError, match="quorum_tables"):
        p.schedule
    with pytest.raises(ValueError, match="forward pass only"):
        p.backward()
    start = time.perf_counter()
    with pytest.raises(ValueError, match="executor='stream'"):
        sc.plan(**kwargs)  # device-resident accumulators cannot fit
    assert time.perf_counter() - start < 30


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(q_len=4096, num_q_heads=4, num_kv_heads=2, head_dim=64, is_causal=True, memory_budget="6MiB"),
        dict(q_len=3000, kv_len=5000, num_q_heads=8, num_kv_heads=1, head_dim=32, batch=2, local_window_size=100,
             memory_budget="8MiB"),
    ],
)
def test_subproblem_memory_stays_within_the_model(kwargs):
    """XLA's own accounting of one subproblem (inputs, outputs, temporaries) against the model."""
    p = sc.plan(executor="stream", **kwargs)
    assert p.num_chunks > 7 and p.estimated_peak_bytes <= sc.parse_budget(kwargs["memory_budget"])
    zeros = lambda length, heads: np.zeros((p.batch, length, heads, p.head_dim), np.float32)
    args = streaming.gather_subproblem(
        p, p.quorum_tables(1), zeros(p.q_len, p.num_q_heads), zeros(p.kv_len, p.num_kv_heads), zeros(p.kv_len, p.num_kv_heads)
    )
    compiled = streaming.subproblem_kernel(p.implementation, executor.kernel_config(p, 0.1)).lower(*args).compile()
    stats = compiled.memory_analysis()
    used = stats.argument_size_in_bytes + stats.output_size_in_bytes + stats.temp_size_in_bytes
    layout = p.stream_layout
    inputs = memory_model.stream_input_bytes(p.problem, layout)
    partial = memory_model.stream_partial_bytes(p.problem, layout)
    assert used <= inputs + partial + (p.estimated_peak_bytes - inputs - partial - max(inputs, partial)), used


# -- exactness ------------------------------------------------------------------------------------


def _expected(q, k, v, **kwargs):
    return attention(np.asarray(q, np.float64), np.asarray(k, np.float64), np.asarray(v, np.float64), **kwargs)[0]


def test_memmap_inputs_and_output_match_float64(tmp_path):
    """float32 files in, a float32 file out; causal GQA, batch 2, cut into many chunks."""
    q, k, v = _inputs(1, **SHAPE)
    files = [_memmap(tmp_path / f"{name}.f32", x) for name, x in zip("qkv", (q, k, v))]
    out = np.memmap(tmp_path / "out.f32", dtype=np.float32, mode="w+", shape=q.shape)
    p = sc.plan(q_len=300, num_q_heads=4, num_kv_heads=2, head_dim=16, batch=2, is_causal=True,
                memory_budget=BUDGET, executor="stream")
    assert p.num_chunks >= 13
    got = sc.stream_attention(*files, out=out, is_causal=True, memory_budget=BUDGET, progress=False)
    assert got is out
    del out
    on_disk = np.fromfile(tmp_path / "out.f32", dtype=np.float32).reshape(q.shape)
    assert rel_error(on_disk, _expected(q, k, v, is_causal=True)) < 1e-6


def test_bfloat16_unbatched_cross_attention_with_window(tmp_path):
    """bfloat16 memmaps [T, N, H], T > S, a window: rows past S + 4 see no key and are 0."""
    q, k, v = (x[0] for x in _inputs(2, 1, 260, 200, 4, 4, 16, ml_dtypes.bfloat16))
    q, k, v = (_memmap(tmp_path / f"{name}.bf16", x) for name, x in zip("qkv", (q, k, v)))
    got = sc.stream_attention(q, k, v, local_window_size=(4, 4), memory_budget="256KiB", progress=False)
    assert got.shape == q.shape and got.dtype == q.dtype
    want = _expected(q[None], k[None], v[None], window=(4, 4))[0]
    assert rel_error(got.astype(np.float64), want) < 5e-3
    assert not np.asarray(got[205:], np.float32).any() and np.asarray(got[:204], np.float32).any()


def test_float16_npy_paths_dense_gqa_with_scale(tmp_path):
    q, k, v = _inputs(3, 1, 333, 333, 4, 1, 16, np.float16)
    paths = []
    for name, x in zip("qkv", (q, k, v)):
        np.save(tmp_path / f"{name}.npy", x)
        paths.append(str(tmp_path / f"{name}.npy"))
    got = sc.stream_attention(*paths, scale=0.3, memory_budget="200KiB", progress=False)
    assert got.dtype == np.float16
    assert rel_error(got.astype(np.float64), _expected(q, k, v, scale=0.3)) < 1e-3


# -- bitwise reproducibility, checkpoints, resume ----------------------------------------------------------


def _run(q, k, v, **kwargs):
    kwargs = {"is_causal": True, "memory_budget": BUDGET, "progress": False, **kwargs}
    return sc.stream_attention(q, k, v, **kwargs)


def test_accumulators_in_memory_in_files_and_checkpointed_give_the_same_bits(tmp_path, monkeypatch):
    q, k, v = _inputs(4, **SHAPE)
    in_memory = _run(q, k, v)
    assert rel_error(in_memory, _expected(q, k, v, is_causal=True)) < 1e-6
    assert rel_error(_run(q, k, v, memory_budget=None), _expected(q, k, v, is_causal=True)) < 1e-6  # one chunk

    ckpt = tmp_path / "ckpt"
    np.testing.assert_array_equal(_run(q, k, v, checkpoint_dir=ckpt), in_memory)
    assert os.listdir(ckpt) == []  # the checkpoint is gone once the output is written

    monkeypatch.setattr(streaming, "IN_MEMORY_LIMIT_BYTES", 0)
    with pytest.raises(ValueError, match="accumulators need"):
        _run(q, k, v)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = np.memmap(out_dir / "o.f32", dtype=np.float32, mode="w+", shape=q.shape)
    real_in_files = streaming.HostState.in_files
    seen = []
    monkeypatch.setattr(streaming.HostState, "in_files", lambda *a, **kw: seen.append(a[0]) or real_in_files(*a, **kw))
    np.testing.assert_array_equal(_run(q, k, v, out=out), in_memory)
    assert seen and os.path.dirname(seen[0]) == str(out_dir)  # the accumulators went next to `out`
    assert os.listdir(out_dir) == ["o.f32"]  # and were removed


class _Interrupted(Exception):
    pass


def test_interrupted_run_refuses_other_arguments_and_resumes_bitwise(tmp_path, monkeypatch):
    q, k, v = _inputs(5, **SHAPE)
    whole = _run(q, k, v)
    ckpt = str(tmp_path / "ckpt")
    real_commit = checkpoint.Checkpoint.commit
    commits = []

    def commit_then_stop(self, host, done, pairs_done):
        real_commit(self, host, done, pairs_done)
        commits.append(done)
        if len(commits) == 4:
            raise _Interrupted

    monkeypatch.setattr(checkpoint.Checkpoint, "commit", commit_then_stop)
    with pytest.raises(_Interrupted):
        _run(q, k, v, checkpoint_dir=ckpt)
    monkeypatch.setattr(checkpoint.Checkpoint, "commit", real_commit)
    state = checkpoint.read_progress(ckpt)
    assert state is not None and state[0] == commits[-1] and 0 < state[0] < state[1]

    changed = q.copy()
    changed[0, 0, 0, 0] += 1.0
    refusals = [
        (dict(is_causal=False), "call.is_causal"),
        (dict(scale=0.5), "call.scale"),
        (dict(local_window_size=(50, 0)), "call.local_window_size"),
        (dict(memory_budget=2 * BUDGET), "plan.num_chunks"),
    ]
    for kwargs, field in refusals:
        with pytest.raises(ValueError, match=field):
            _run(q, k, v, checkpoint_dir=ckpt, **kwargs)
    with pytest.raises(ValueError, match="data.query"):
        _run(changed, k, v, checkpoint_dir=ckpt)
    with pytest.raises(ValueError, match="call.query"):
        _run(*(x.astype(np.float16) for x in (q, k, v)), checkpoint_dir=ckpt)
    assert checkpoint.read_progress(ckpt) == state  # refusals touch nothing

    commits.clear()
    monkeypatch.setattr(checkpoint.Checkpoint, "commit", lambda self, *a: commits.append(a[1]) or real_commit(self, *a))
    np.testing.assert_array_equal(_run(q, k, v, checkpoint_dir=ckpt), whole)
    assert commits[0] > state[0]  # it continued rather than starting over
    assert os.listdir(ckpt) == []


def test_checkpoint_in_use_is_refused(tmp_path):
    q, k, v = _inputs(6, **SHAPE)
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    fd = os.open(ckpt / checkpoint.LOCK_FILE, os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        with pytest.raises(RuntimeError, match="in use"):
            _run(q, k, v, checkpoint_dir=ckpt)
    finally:
        os.close(fd)


def _worker(data, ckpt, out, budget, delay):
    env = dict(os.environ, STREAM_WORKER_DELAY=str(delay))
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.Popen(
        [sys.executable, os.path.join(HERE, "stream_worker.py"), str(data), str(ckpt), str(out), str(budget)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def _kill_after(proc, commits: int, pause: float) -> list[str]:
    """Reads the worker's lines until it has committed `commits` subproblems, waits `pause`, SIGKILLs it."""
    watchdog = threading.Timer(180, proc.kill)
    watchdog.start()
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line.strip())
            if line.startswith("commit") and int(line.split()[1]) >= commits:
                time.sleep(pause)
                proc.kill()
                break
    finally:
        proc.wait()
        watchdog.cancel()
    assert proc.returncode == -9, (lines, proc.stderr.read())
    return lines


def test_sigkill_mid_run_then_resume_gives_a_bitwise_identical_file(tmp_path):
    seed = int.from_bytes(os.urandom(4), "little")
    rng = random.Random(seed)
    data = tmp_path / "data"
    data.mkdir()
    q, k, v = _inputs(seed, 1, 1200, 1200, 2, 1, 16)
    for name, x in zip("qkv", (q, k, v)):
        np.save(data / f"{name}.npy", x)
    budget = 260 * 1024
    p = sc.plan(q_len=1200, num_q_heads=2, num_kv_heads=1, head_dim=16, memory_budget=budget, executor="stream",
                is_causal=WORKER_CALL["is_causal"], local_window_size=WORKER_CALL["local_window_size"])
    live = [i for i in range(p.num_chunks) if p.quorum_tables(i).num_pairs]
    assert len(live) >= 30, len(live)

    # The uninterrupted run, checkpointed like the worker's.
    reference = np.memmap(tmp_path / "reference.f32", dtype=np.float32, mode="w+", shape=q.shape)
    sc.stream_attention(*(str(data / f"{n}.npy") for n in "qkv"), out=reference, memory_budget=budget,
                        checkpoint_dir=tmp_path / "ckpt_reference", progress=False, **WORKER_CALL)
    del reference
    assert rel_error(np.fromfile(tmp_path / "reference.f32", np.float32).reshape(q.shape),
                     _expected(q, k, v, is_causal=True, window=WORKER_CALL["local_window_size"])) < 1e-6

    ckpt, out = tmp_path / "ckpt", tmp_path / "out.f32"
    delay = 0.06  # per subproblem in the worker, spread over merge, state write and commit
    done = 0  # quorums done, in plan order
    for _ in range(2):  # killed twice at random moments, then run to the end
        left = [i for i in live if i >= done]
        target = left[rng.randint(2, len(left) // 2) - 1] + 1
        lines = _kill_after(_worker(data, ckpt, out, budget, delay), target, rng.uniform(0, delay))
        assert lines[0] == f"start {done}", (seed, lines)
        state = checkpoint.read_progress(ckpt)
        assert state is not None and done < state[0] < p.num_chunks, (seed, state)
        done = state[0]
    proc = _worker(data, ckpt, out, budget, 0)
    stdout, stderr = proc.communicate(timeout=180)
    assert proc.returncode == 0, stderr
    lines = stdout.split("\n")
    assert lines[0] == f"start {done}" and "finished" in lines, (seed, lines)
    assert (tmp_path / "out.f32").read_bytes() == (tmp_path / "reference.f32").read_bytes(), seed
    assert os.listdir(ckpt) == []


# -- bad input -------------------------------------------------------------------------------------------------


def _bad_cases():
    q, k, v = _inputs(7, 1, 64, 64, 4, 2, 16)

    def truncated(tmp):
        x = _memmap(tmp / "q.f32", q)
        os.truncate(tmp / "q.f32", 100)
        return (x, k, v), {}

    def garbage(tmp):
        (tmp / "g.npy").write_bytes(b"not an array")
        return (str(tmp / "g.npy"), k, v), {}

    def read_only_out(tmp):
        _memmap(tmp / "o.f32", np.zeros_like(q))
        return (q, k, v), dict(out=np.memmap(tmp / "o.f32", dtype=np.float32, mode="r", shape=q.shape))

    def copy_on_write_out(tmp):
        _memmap(tmp / "o.f32", np.zeros_like(q))
        return (q, k, v), dict(out=np.memmap(tmp / "o.f32", dtype=np.float32, mode="c", shape=q.shape))

    def file_as_checkpoint(tmp):
        (tmp / "file").write_bytes(b"")
        return (q, k, v), dict(checkpoint_dir=tmp / "file")

    fixed = lambda args, kwargs=None: (lambda tmp: (args, kwargs or {}))
    return [
        (fixed((q, k[..., :8], v[..., :8])), ValueError, "head_dim"),
        (fixed((q, k, v[:, :32])), ValueError, "key and value must have the same shape"),
        (fixed((q[:, :, :3], k, v)), ValueError, "multiple of the number of key/value heads"),
        (fixed((np.concatenate([q, q]), k, v)), ValueError, "batch size"),
        (fixed((q[0, 0], k[0, 0], v[0, 0])), ValueError, "rank 4"),
        (fixed((q, k, v), dict(out=np.zeros((1, 64, 4, 8), np.float32))), ValueError, "out must have the query's shape"),
        (fixed((q, k, v), dict(out=np.zeros(q.shape, np.float16))), TypeError, "out must have the query's dtype"),
        (fixed((q, k, v), dict(out=q)), ValueError, "out must not overlap query"),
        (fixed((q, k, v), dict(out=[0.0])), TypeError, "out must be None"),
        (read_only_out, ValueError, "out must be writeable"),
        (copy_on_write_out, ValueError, "copy-on-write"),
        (fixed((q.astype(np.int32), k.astype(np.int32), v.astype(np.int32))), TypeError, "floating-point"),
        (fixed((q.astype(np.float64), k.astype(np.float64), v.astype(np.float64))), TypeError, "float64"),
        (fixed((q, k.astype(np.float16), v.astype(np.float16))), TypeError, "share one dtype"),
        (fixed((jnp.asarray(q), k, v)), TypeError, "query must be a NumPy array"),
        (fixed(("/nonexistent/q.npy", k, v)), ValueError, "query: cannot read"),
        (garbage, ValueError, "query: cannot read"),
        (truncated, ValueError, "truncated"),
        (file_as_checkpoint, ValueError, "not a directory"),
        (fixed((q, k, v), dict(scale=float("inf"))), ValueError, "scale must be finite"),
        (fixed((q, k, v), dict(is_causal=1)), TypeError, "is_causal"),
        (fixed((q, k, v), dict(progress="yes")), TypeError, "progress"),
        (fixed((q, k, v), dict(local_window_size=-2)), ValueError, "local_window_size"),
        (fixed((q, k, v), dict(memory_budget="1KiB")), ValueError, "smallest budget that works"),
    ]


@pytest.mark.parametrize("case, error, message", _bad_cases())
def test_bad_input_is_refused_before_any_work(tmp_path, case, error, message):
    args, kwargs = case(tmp_path)
    kwargs = {"checkpoint_dir": tmp_path / "ckpt", "progress": False, **kwargs}
    out = kwargs.get("out")
    before = None if not isinstance(out, np.ndarray) else np.array(out)
    with pytest.raises(error, match=message):
        sc.stream_attention(*args, **kwargs)
    assert not (tmp_path / "ckpt").exists()
    if before is not None:
        np.testing.assert_array_equal(np.asarray(out), before)


# -- progress ------------------------------------------------------------------------------------------------------


def test_progress_bar_reports_throughput_and_silence_is_silent(capfd):
    q, k, v = _inputs(8, **SHAPE)
    _run(q, k, v, progress=True)
    captured = capfd.readouterr()
    assert "stream_attention" in captured.err and "pair/s" in captured.err and "100%" in captured.err
    _run(q, k, v, progress=False)
    captured = capfd.readouterr()
    assert captured.out == "" and captured.err == ""


# -- the billion-token procedure ----------------------------------------------------------------------------------


def _example():
    import importlib.util

    spec = importlib.util.spec_from_file_location("example_billion_tokens", os.path.join(ROOT, "examples", "billion_tokens.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_billion_token_example_samples_and_extrapolates(capsys):
    example = _example()
    example.main(["--q-len", "64k", "--heads", "1", "--head-dim", "16", "--budget", "1MiB", "--samples", "2"])
    out = capsys.readouterr().out
    assert "streaming executor" in out and "calibrated in" in out
    stages = re.findall(r"^ +\d+ +\d+ +((?:[0-9.]+/[0-9.]+ *){6})$", out, re.M)
    assert len(stages) == 2, out
    for needle in ("kernels of 2 subproblems", "pipelined run of 2 subproblems", "device peak", "predicted from the"):
        assert needle in out, needle
    ratio = float(re.search(r"pipelined run of 2 subproblems +[0-9.]+s +[0-9.]+s +([0-9.]+)", out).group(1))
    assert 0.1 < ratio < 10, out  # a prediction, not a guess off by orders of magnitude


def test_billion_token_example_end_to_end_is_exact(tmp_path, capsys):
    example = _example()
    example.main(["--end-to-end", "3000", "--heads", "2", "--kv-heads", "1", "--head-dim", "16", "--dtype", "float32",
                  "--budget", "300KiB", "--workdir", str(tmp_path), "--checkpoint-dir", str(tmp_path / "ckpt")])
    out = capsys.readouterr().out
    error = float(re.search(r"worst relative error ([0-9.e+-]+)", out).group(1))
    assert error < 1e-5 and "3000 tokens in" in out


# -- host threads and the cost model --------------------------------------------------------------


@pytest.mark.parametrize("count, min_items", [(0, 1), (1, 1), (7, 1), (1000, 3), (5, 100)])
def test_host_ranges_cover_every_item_once_and_raise_errors(count, min_items):
    from stream_cqsa_jax._src import host_threads

    seen = np.zeros(count, np.int64)

    def work(lo, hi):
        assert hi - lo >= min(min_items, count)
        seen[lo:hi] += 1

    host_threads.for_ranges(count, work, min_items=min_items)
    assert (seen == 1).all()

    def fail(lo, hi):
        raise KeyError("boom")

    if count:
        with pytest.raises(KeyError, match="boom"):
            host_threads.for_ranges(count, fail, min_items=min_items)


def test_cost_model_predicts_each_lane_from_its_rate():
    from stream_cqsa_jax._src import cost_model

    p = sc.plan(q_len=2**16, num_q_heads=4, num_kv_heads=2, head_dim=32, dtype="bfloat16", is_causal=True,
                memory_budget="2MiB", executor="stream")
    rates = cost_model.Rates(kernel_flops=1e12, table_entries=1e8, gather=1e10, host_to_device=2e10,
                             device_to_host=4e10, merge=5e9)
    m, cq = p.cover.size, p.q_chunk
    size = cost_model.subproblem_bytes(p)
    assert size.gathered == m * cq * (4 + 2 * 2) * 32 * 2 and size.state == m * cq * 4 * 34 * 4
    s = cost_model.subproblem_seconds(p, 100, m // 2, rates)
    assert s.kernel == pytest.approx(100 * 4 * 4 * 32 * cq * cq / 1e12)
    assert s.producer == pytest.approx(m * m / 1e8 + size.gathered / 1e10 + size.gathered / 2e10)
    assert s.consumer == pytest.approx(size.state / 4e10 + size.state * (m // 2) / m / 5e9)
    assert s.step == max(s.producer, s.kernel, s.consumer) and s.serial > s.step
    whole = cost_model.run_seconds(p, rates)
    mean = cost_model.subproblem_seconds(p, p.num_pairs / p.num_chunks, m, rates)
    assert whole == pytest.approx(p.num_chunks * mean.step)
