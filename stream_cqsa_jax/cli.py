"""Command line: ``python -m stream_cqsa_jax {plan, estimate, visualize, bench}`` (also ``stream-cqsa-jax``).

    stream-cqsa-jax plan --q-len 1000000 --heads 8 --head-dim 64 --dtype bfloat16 --causal --budget 3GiB
    stream-cqsa-jax estimate --q-len 131072 --heads 32 --kv-heads 8 --head-dim 128 --causal --budget 8GiB
    stream-cqsa-jax visualize --q-len 4096 --heads 4 --head-dim 64 --causal --num-chunks 13 -o schedule.png
    stream-cqsa-jax bench --quick
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

from ._src.budget import format_bytes

# Rough sustained attention throughput (TFLOP/s) per backend, used only when
# --tflops is not given. They are assumptions, not measurements.
_ASSUMED_TFLOPS = {"cpu": 0.02, "gpu": 100.0, "cuda": 100.0, "rocm": 100.0, "tpu": 100.0}


def _window(text: str):
    parts = text.split(",")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an int or 'left,right', got {text!r}") from None
    if len(values) == 1:
        return values[0]
    if len(values) == 2:
        return tuple(values)
    raise argparse.ArgumentTypeError(f"expected an int or 'left,right', got {text!r}")


def _add_shape_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("problem")
    g.add_argument("--q-len", type=int, required=True, help="query length T")
    g.add_argument("--kv-len", type=int, default=None, help="key/value length S (default T)")
    g.add_argument("--heads", type=int, required=True, help="query heads N")
    g.add_argument("--kv-heads", type=int, default=None, help="key/value heads K (default N)")
    g.add_argument("--head-dim", type=int, required=True, help="head dimension H")
    g.add_argument("--batch", type=int, default=1)
    g.add_argument("--dtype", default="float32", choices=["bfloat16", "float16", "float32", "float64"])
    g.add_argument("--causal", action="store_true", help="causal masking")
    g.add_argument("--window", type=_window, default=None, help="local window: W or LEFT,RIGHT")
    g = p.add_argument_group("plan")
    g.add_argument("--budget", default=None, help="device memory one call may add, e.g. 3GiB (default: 80%% of free)")
    g.add_argument("--num-chunks", type=int, default=None, help="force this many chunks per level")
    g.add_argument("--depth", type=int, default=None, help="levels of the product cover (with --num-chunks)")
    g.add_argument(
        "--implementation", default=None,
        help="kernel name: xla, pallas_triton or mosaic_gpu (default: the fastest for the backend)",
    )
    g.add_argument(
        "--executor", default="scan", choices=["scan", "offload", "stream"],
        help="scan: inputs on the device; offload: query, key and value as JAX arrays in host memory; "
        "stream: stream_attention over NumPy arrays or files (default scan)",
    )


def _make_plan(args: argparse.Namespace):
    from ._src.plan import plan

    return plan(
        q_len=args.q_len,
        kv_len=args.kv_len,
        num_q_heads=args.heads,
        num_kv_heads=args.kv_heads,
        head_dim=args.head_dim,
        dtype=args.dtype,
        batch=args.batch,
        is_causal=args.causal,
        local_window_size=args.window,
        memory_budget=args.budget,
        num_chunks=args.num_chunks,
        depth=args.depth,
        implementation=args.implementation,
        executor=args.executor,
    )


# -- plan -------------------------------------------------------------------------------------------


def _cmd_plan(args: argparse.Namespace) -> int:
    p = _make_plan(args)
    print(p.summary())
    if args.backward:
        print()
        print(p.backward().summary())
    if args.subproblems:
        print("\nsubproblem  quorum  query chunks  key chunks  pairs")
        for sub in p.subproblems:
            q_ids, kv_ids = _ids(sub.q_chunks), _ids(sub.kv_chunks)
            print(f"{sub.index:10d}  {sub.quorum:6d}  {q_ids:12s}  {kv_ids:10s}  {len(sub.pairs)}")
    return 0


def _ids(chunks: Sequence[int], limit: int = 8) -> str:
    text = ",".join(map(str, chunks[:limit]))
    return text + (",..." if len(chunks) > limit else "")


# -- estimate ---------------------------------------------------------------------------------------


def visible_pairs(q_len: int, kv_len: int, left: int | None, right: int | None) -> int:
    """Exact number of visible (query, key) position pairs under the band ``i - left <= j <= i + right``.

    ``None`` means unbounded on that side; causal masking is ``right = 0``.
    """
    left = q_len + kv_len if left is None else left
    right = q_len + kv_len if right is None else right
    rows = min(q_len, kv_len + left)  # later queries see no key at all
    if rows <= 0:
        return 0
    # Row i sees keys max(0, i - left) .. min(kv_len - 1, i + right).
    # sum of min(kv_len - 1, i + right) + 1: rows below `knee` are i + right + 1, the rest kv_len.
    knee = min(rows, max(0, kv_len - 1 - right))
    upper = knee * (right + 1) + knee * (knee - 1) // 2 + (rows - knee) * kv_len
    # sum of max(0, i - left) for i < rows.
    n = max(0, rows - 1 - left)
    lower = n * (n + 1) // 2
    return int(upper - lower)


def _cmd_estimate(args: argparse.Namespace) -> int:
    import jax

    p = _make_plan(args)
    budget = (
        f"{format_bytes(p.budget_bytes)} ({p.budget_source})"
        if p.memory_budget is None
        else f"{format_bytes(p.memory_budget)} (--budget)"
    )
    print(f"budget             : {budget}")
    _print_peak("forward", p)
    try:
        b = p.backward()
    except ValueError as error:  # the backward holds more per token than the forward
        print(f"backward peak      : does not fit; {error}")
    else:
        _print_peak("backward", b)
        step_peak = max(p.estimated_peak_bytes, b.estimated_peak_bytes)
        print(f"training step peak : {format_bytes(step_peak)} (larger of the two)")

    band = p.band
    pairs = visible_pairs(p.q_len, p.kv_len, band.left, band.right)
    per_pair = p.batch * p.num_q_heads * p.head_dim
    forward_flops = 4 * per_pair * pairs  # q k^T and p v
    backward_flops = 10 * per_pair * pairs  # q k^T again, dv, dp, dq, dk
    platform = jax.devices()[0].platform
    tflops = args.tflops if args.tflops is not None else _ASSUMED_TFLOPS.get(platform, 1.0)
    source = "--tflops" if args.tflops is not None else f"assumed for {platform}; pass --tflops"
    seconds = lambda flops: flops / (tflops * 1e12)  # noqa: E731
    print(
        f"\nROUGH TIME ESTIMATE (not a measurement): {pairs:,} visible logits per head and example;\n"
        f"  forward ~{_seconds(seconds(forward_flops))}, forward + backward "
        f"~{_seconds(seconds(forward_flops + backward_flops))} at {tflops:g} TFLOP/s sustained ({source}).\n"
        f"  It counts matrix-multiply work only: no tile padding, masking or transfers. "
        f"Measure with `stream-cqsa-jax bench`."
    )
    return 0


def _print_peak(name: str, p) -> None:
    print(
        f"{name + ' peak':19s}: {format_bytes(p.estimated_peak_bytes)} ({p.estimated_peak_bytes} bytes): "
        f"accumulators {format_bytes(p.estimated_resident_bytes)}, per step "
        f"{format_bytes(p.estimated_peak_bytes - p.estimated_resident_bytes)}; C = {p.num_chunks}, "
        f"{len(p.subproblems)} subproblems"
    )


def _seconds(value: float) -> str:
    if value < 1e-3:
        return f"{value * 1e6:.0f} us"
    if value < 1:
        return f"{value * 1e3:.1f} ms"
    if value < 600:
        return f"{value:.2f} s"
    return f"{value / 3600:.2f} h"


# -- visualize --------------------------------------------------------------------------------------


def _cmd_visualize(args: argparse.Namespace) -> int:
    from ._src import visualize

    p = _make_plan(args)
    if args.backward:
        p = p.backward()
    image = visualize.ownership_image(p, cell=args.cell)
    visualize.write_png(args.output, image)
    print(p.summary())
    if p.num_chunks <= 40:
        print()
        print(visualize.ownership_text(p))
    amounts = visualize.work(p)
    print("\nsubproblem  quorum  pairs  work")
    top = int(amounts.max()) if len(amounts) else 0
    for sub, amount in zip(p.subproblems, amounts):
        bar = "#" * (0 if top == 0 else max(1, round(30 * int(amount) / top)))
        print(f"{sub.index:10d}  {sub.quorum:6d}  {int(amount):5d}  {bar}")
    print(f"\nwrote {args.output} ({image.shape[1]} x {image.shape[0]} pixels): the chunk-pair ownership matrix "
          "(rows: query chunks, columns: key chunks, colour: subproblem, grey: skipped) above the pairs per subproblem")
    return 0


# -- bench ------------------------------------------------------------------------------------------


def _cmd_bench(args: argparse.Namespace) -> int:
    try:
        benchmark = importlib.import_module(f"{__package__}.benchmark")
    except ModuleNotFoundError as error:
        if error.name != f"{__package__}.benchmark":
            raise
        print("stream-cqsa-jax bench: the benchmark suite (stream_cqsa_jax.benchmark) is missing", file=sys.stderr)
        return 2
    return int(benchmark.main(list(args.bench_args)) or 0)


# -- entry point ------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stream-cqsa-jax",
        description="Plans, memory estimates, schedule pictures and benchmarks for Stream-CQSA attention.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="{plan,estimate,visualize,bench}")

    p = sub.add_parser("plan", help="print the plan for given shapes and budget")
    _add_shape_arguments(p)
    p.add_argument("--backward", action="store_true", help="also print the backward pass's plan")
    p.add_argument("--subproblems", action="store_true", help="list every subproblem")
    p.set_defaults(run=_cmd_plan)

    p = sub.add_parser("estimate", help="predicted peak device memory and a rough time estimate")
    _add_shape_arguments(p)
    p.add_argument("--tflops", type=float, default=None, help="sustained TFLOP/s to assume for the time estimate")
    p.set_defaults(run=_cmd_estimate)

    p = sub.add_parser("visualize", help="write a PNG of the chunk-pair ownership matrix and per-subproblem work")
    _add_shape_arguments(p)
    p.add_argument("-o", "--output", default="schedule.png", help="PNG file to write")
    p.add_argument("--cell", type=int, default=None, help="pixels per chunk pair (default: fit ~480 px)")
    p.add_argument("--backward", action="store_true", help="draw the backward pass's plan")
    p.set_defaults(run=_cmd_visualize)

    p = sub.add_parser("bench", help="run the benchmark suite and print a table (arguments go to it)")
    p.add_argument("bench_args", nargs=argparse.REMAINDER, help="arguments of the benchmark suite, e.g. --quick")
    p.set_defaults(run=_cmd_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Runs one subcommand; returns the exit status (2 for bad arguments)."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:  # everything after `bench` belongs to the benchmark suite
        return _cmd_bench(argparse.Namespace(bench_args=argv[1:]))
    args = parser.parse_args(argv)
    if args.command == "bench":
        return _cmd_bench(args)
    try:
        return args.run(args)
    except (ValueError, TypeError) as error:  # the planner's messages name the argument
        print(f"stream-cqsa-jax {args.command}: error: {error}", file=sys.stderr)
        return 2
