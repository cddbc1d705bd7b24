"""Side-by-side timing of attention implementations.

    python -m stream_cqsa_jax.benchmark --seq-lens 16384 65536 --head-dims 64 128 --out results.json
    python -m stream_cqsa_jax.benchmark --quick        # small CPU-sized smoke run

Every case builds fresh random inputs on the device, compiles each
implementation, runs it once to warm up and then `--iters` times, and records
the median wall time, the throughput (FLOPs counted as 4 B N T S H, halved when
causal; forward+backward counted as 3.5 forwards) and XLA's memory accounting
of the compiled program. With ``--interleave`` the implementations of a case
take turns instead (`run_interleaved`): all compiled first, then one run each
per round, every other round in reverse order, so that the card warming up
over a long run does not favour whichever runs first. Ratios are against
cuDNN when it runs (GPU), else against XLA's dense attention. A kernel name
followed by ``:nondeterministic`` (``mosaic_gpu:nondeterministic``) plans with
``deterministic_backward=False``; ``cudnn:deterministic`` is cuDNN compiled with
XLA's ``xla_gpu_deterministic_ops`` (XLA's switch to deterministic kernels;
``bench/repeatability.py`` checks which implementations give the same bits on
every run).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from typing import Callable

import jax

import stream_cqsa_jax as sc
from stream_cqsa_jax._src.plan import default_implementation, resolve_implementation

BASELINES = ("cudnn", "xla_dense")
DETERMINISTIC_CUDNN = "cudnn:deterministic"


@dataclasses.dataclass(frozen=True)
class Case:
    """One benchmark configuration."""

    seq_len: int
    head_dim: int
    causal: bool
    direction: str  # "fwd" or "fwd_bwd"
    batch: int = 1
    heads: int = 8
    dtype: str = "bfloat16"

    def flops(self) -> float:
        f = 4.0 * self.batch * self.heads * self.seq_len * self.seq_len * self.head_dim
        f = f / 2 if self.causal else f
        return f * (3.5 if self.direction == "fwd_bwd" else 1.0)

    def forward_launch(self):
        """The Hopper forward's launch (`mosaic_gpu.default_launch`) for the case run as one subproblem;
        the case's key and value heads are its query heads."""
        from ._src.kernels import mosaic_gpu
        from ._src.masks import Band

        n = self.seq_len
        return mosaic_gpu.default_launch(self.head_dim, self.batch * n * self.heads, Band.of(n, n, self.causal, None))


VARIANTS = ("", "nondeterministic")


def split_variant(impl: str) -> tuple[str, str]:
    """("mosaic_gpu", "nondeterministic") from "mosaic_gpu:nondeterministic"; ("xla", "") from "xla"."""
    kernel, _, variant = impl.partition(":")
    if variant not in VARIANTS:
        raise ValueError(f"implementation {impl!r}: the only variant is ':nondeterministic'")
    return kernel, variant


def is_baseline(impl: str) -> bool:
    """Whether `impl` is one of the baselines (`BASELINES`, or `DETERMINISTIC_CUDNN`)."""
    return impl in BASELINES or impl == DETERMINISTIC_CUDNN


def compiler_options(impl: str) -> dict | None:
    """XLA options `impl`'s programs are compiled with: the deterministic ops for `DETERMINISTIC_CUDNN`."""
    return {"xla_gpu_deterministic_ops": True} if impl == DETERMINISTIC_CUDNN else None


def attention_for(impl: str, case: Case, num_chunks: int | None, **plan_options) -> Callable:
    """f(q, k, v) -> output for implementation `impl` (a baseline or one of this library's kernels)."""
    if is_baseline(impl):
        name = "xla" if impl == "xla_dense" else "cudnn"
        return lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=case.causal, implementation=name)
    impl, variant = split_variant(impl)
    plan = sc.plan(
        q_len=case.seq_len,
        num_q_heads=case.heads,
        head_dim=case.head_dim,
        dtype=case.dtype,
        batch=case.batch,
        is_causal=case.causal,
        num_chunks=num_chunks,
        implementation=impl,
        deterministic_backward=variant != "nondeterministic",
        **plan_options,
    )
    return lambda q, k, v: sc.dot_product_attention(q, k, v, is_causal=case.causal, plan=plan)


def _program(impl: str, case: Case, num_chunks: int | None, **plan_options) -> Callable:
    f = attention_for(impl, case, num_chunks, **plan_options)
    if case.direction == "fwd":
        return jax.jit(f)
    return jax.jit(lambda q, k, v, do: jax.vjp(f, q, k, v)[1](do))


def case_inputs(case: Case, seed: int = 0) -> list:
    """Fresh random q, k, v (and dO for forward plus backward) of the case, on the device."""
    keys = jax.random.split(jax.random.key(seed), 4)
    shape = (case.batch, case.seq_len, case.heads, case.head_dim)
    arrays = [jax.random.normal(kk, shape, case.dtype) for kk in keys]
    return arrays if case.direction == "fwd_bwd" else arrays[:3]


def prepare_case(
    impl: str, case: Case, num_chunks: int | None = None, seed: int = 0, args=None, **plan_options
) -> tuple[dict, Callable[[], None] | None]:
    """(row, run): compiles one implementation for one case; ``run()`` runs it once and waits.

    The row holds the case and XLA's memory accounting of the compiled program; on failure it
    holds ``error`` and `run` is None. `args` are the inputs (default: fresh ones from `seed`);
    `plan_options` (e.g. ``block_q``, ``memory_budget``) go to `stream_cqsa_jax.plan`.
    """
    row = {"implementation": impl, "num_chunks": num_chunks, **dataclasses.asdict(case)}
    try:
        args = case_inputs(case, seed) if args is None else args
        compiled = _program(impl, case, num_chunks, **plan_options).lower(*args).compile(compiler_options(impl))
        mem = compiled.memory_analysis()
        if mem is not None:
            row["temp_bytes"] = int(mem.temp_size_in_bytes)
            row["argument_bytes"] = int(mem.argument_size_in_bytes)
            row["output_bytes"] = int(mem.output_size_in_bytes)
        return row, lambda: jax.block_until_ready(compiled(*args))
    except Exception as err:  # a failed case is data, not the end of the run
        _record_error(row, err)
        return row, None


def error_text(err: Exception) -> str:
    """How a failure is recorded in results: the exception's type and the first line of its message."""
    return f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"


def _record_error(row: dict, err: Exception) -> None:
    row["error"] = error_text(err)


def _timed(run: Callable[[], None]) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def _record_times(row: dict, case: Case, times: list[float]) -> None:
    row["seconds"] = statistics.median(times)
    row["all_seconds"] = times
    row["tflops"] = case.flops() / row["seconds"] / 1e12


def run_case(
    impl: str, case: Case, iters: int, num_chunks: int | None = None, seed: int = 0, **plan_options
) -> dict:
    """Times one implementation on one case, alone (`time_alone`). Errors are recorded, not
    raised. See `prepare_case` for the arguments."""
    return time_alone(*prepare_case(impl, case, num_chunks, seed, **plan_options), case, iters)


def time_alone(row: dict, run: Callable[[], None] | None, case: Case, iters: int) -> dict:
    """Times a prepared program (`prepare_case`): a warm-up run, then `iters` timed runs (median),
    and the process's peak device memory so far. Returns `row`, filled in."""
    if run is None:
        return row
    try:
        run()
        _record_times(row, case, [_timed(run) for _ in range(iters)])
        stats = jax.devices()[0].memory_stats() or {}
        if "peak_bytes_in_use" in stats:
            row["process_peak_bytes"] = int(stats["peak_bytes_in_use"])
    except Exception as err:
        _record_error(row, err)
    return row


def turn_order(count: int, rounds: int) -> list[list[int]]:
    """The order in which `run_interleaved` runs `count` programs in each of `rounds` rounds: as
    given, then reversed, and so on (A B C, C B A, A B C, ...)."""
    forward = list(range(count))
    return [forward if r % 2 == 0 else forward[::-1] for r in range(rounds)]


def run_interleaved(prepared: list[tuple[dict, Callable[[], None] | None]], case: Case, rounds: int) -> list[dict]:
    """Times prepared programs (`prepare_case`) of one case in turns: each warmed up once, then
    `rounds` rounds of one run each, every other round in reverse order (`turn_order`). Under a
    power cap the card's clock drifts as it warms through a long run; in turns, a drift that is
    linear in time weighs on every program alike over two rounds, where timing them one after
    the other gives the first a cooler card. Fills each row's median ``seconds``, ``all_seconds``
    (in round order) and ``tflops``; a program that fails is dropped from later rounds."""
    live = [i for i, (_, run) in enumerate(prepared) if run is not None]
    times: dict[int, list[float]] = {i: [] for i in live}

    def attempt(i: int, timed: bool) -> None:
        row, run = prepared[i]
        try:
            if timed:
                times[i].append(_timed(run))
            else:
                run()
        except Exception as err:
            _record_error(row, err)
            live.remove(i)

    for i in list(live):
        attempt(i, timed=False)
    for order in turn_order(len(prepared), rounds):
        for i in order:
            if i in live:
                attempt(i, timed=True)
    for i in live:
        _record_times(prepared[i][0], case, times[i])
        prepared[i][0]["interleaved_rounds"] = rounds
    return [row for row, _ in prepared]


def run_meta() -> dict:
    """What a results file records about its run: JAX version, backend, device kind, date."""
    return {
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "device": str(jax.devices()[0].device_kind),
        "date": time.strftime("%Y-%m-%d"),
    }


def write_results(path: str, **sections) -> None:
    """Writes ``{"meta": run_meta(), **sections}`` as JSON to `path`."""
    with open(path, "w") as f:
        json.dump({"meta": run_meta(), **sections}, f, indent=1)


def add_ratios(rows: list[dict]) -> None:
    """Adds `ratio_vs_<baseline>` = baseline seconds / seconds, per case."""
    key = lambda r: (r["seq_len"], r["head_dim"], r["causal"], r["direction"], r["batch"], r["heads"], r["dtype"])
    for base in (*BASELINES, DETERMINISTIC_CUDNN):
        times = {key(r): r["seconds"] for r in rows if r["implementation"] == base and "seconds" in r}
        for r in rows:
            if "seconds" in r and key(r) in times:
                r[f"ratio_vs_{base}"] = times[key(r)] / r["seconds"]


def format_table(rows: list[dict]) -> str:
    """A Markdown table of the rows."""
    lines = [
        "| N | D | causal | pass | implementation | chunks | seconds | TFLOP/s | vs cuDNN | temp GiB |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        if "error" in r:
            cells = [r["implementation"], str(r["num_chunks"] or 1), "error: " + r["error"][:60], "", "", ""]
        else:
            ratio = r.get("ratio_vs_cudnn")
            cells = [
                r["implementation"],
                str(r["num_chunks"] or 1),
                f"{r['seconds']:.4f}",
                f"{r['tflops']:.0f}",
                "" if ratio is None else f"{ratio:.2f}x",
                f"{r.get('temp_bytes', 0) / 2**30:.2f}",
            ]
        head = [_tokens(r["seq_len"]), str(r["head_dim"]), "yes" if r["causal"] else "no", r["direction"]]
        lines.append("| " + " | ".join(head + cells) + " |")
    return "\n".join(lines)


def _tokens(n: int) -> str:
    for unit, size in (("M", 2**20), ("K", 2**10)):
        if n % size == 0:
            return f"{n // size}{unit}"
    return str(n)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="stream_cqsa_jax.benchmark", description=__doc__.splitlines()[0])
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[16384, 65536])
    parser.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--causal", choices=["yes", "no", "both"], default="both")
    parser.add_argument("--directions", nargs="+", choices=["fwd", "fwd_bwd"], default=["fwd", "fwd_bwd"])
    parser.add_argument("--implementations", nargs="+", default=None,
                        help="kernels of this library and baselines (cudnn, cudnn:deterministic, xla_dense);"
                        " default: by backend")
    parser.add_argument("--num-chunks", type=int, default=None, help="force this many chunks in our plans")
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--interleave", action="store_true",
                        help="time the implementations of a case in turns (`--iters` rounds), not one after another")
    parser.add_argument("--quick", action="store_true", help="a small run that fits a CPU in seconds")
    parser.add_argument("--out", default=None, help="write the rows as JSON here")
    args = parser.parse_args(argv)

    on_gpu = jax.default_backend() == "gpu"
    if args.quick:
        args.seq_lens, args.head_dims, args.heads, args.iters = [512], [32], 2, 1
        args.dtype = "float32" if not on_gpu else args.dtype
    ours = default_implementation()
    impls = args.implementations or (["cudnn", ours] if on_gpu else ["xla_dense", ours])
    for impl in impls:
        if not is_baseline(impl):
            resolve_implementation(split_variant(impl)[0])  # a bad name fails before any work
    causal = {"yes": [True], "no": [False], "both": [True, False]}[args.causal]
    rows = []
    for n in args.seq_lens:
        for d in args.head_dims:
            for c in causal:
                for direction in args.directions:
                    case = Case(n, d, c, direction, heads=args.heads, dtype=args.dtype)
                    chunks = lambda impl: None if is_baseline(impl) else args.num_chunks
                    if args.interleave:
                        inputs = case_inputs(case)
                        prepared = [prepare_case(impl, case, chunks(impl), args=inputs) for impl in impls]
                        new = run_interleaved(prepared, case, args.iters)
                    else:
                        new = [run_case(impl, case, args.iters, chunks(impl)) for impl in impls]
                    for row in new:
                        print(json.dumps(row), file=sys.stderr, flush=True)
                    rows.extend(new)
    add_ratios(rows)
    print(format_table(rows))
    if args.out:
        write_results(args.out, rows=rows)
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
