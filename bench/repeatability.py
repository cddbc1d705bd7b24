"""Whether forward plus backward gives the same bits on every run, per implementation.

    PYTHONPATH=. python bench/repeatability.py --seq-lens 65536 --head-dims 128 --runs 5 \\
        --implementations cudnn cudnn:deterministic mosaic_gpu mosaic_gpu:nondeterministic \\
        --out bench/results/repeatability.json

Per case and implementation (`stream_cqsa_jax.benchmark` names, ``cudnn:deterministic``
included): the program is compiled once and run `--runs` times on the same inputs; each run's
output and gradients are compared bit for bit with the first run's. Reported per array: how many
runs differed from the first, and the largest difference relative to the array's largest
magnitude. A timing benchmark says how fast; this says what a backward's speed is bought with.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import sys

import jax
import jax.numpy as jnp

from stream_cqsa_jax import benchmark

ARRAYS = ("out", "dq", "dk", "dv")


def _program(impl: str, case: benchmark.Case):
    """jit(q, k, v, do) -> (out, dq, dk, dv), compiled with `impl`'s XLA options."""
    f = benchmark.attention_for(impl, case, None)

    def both(q, k, v, do):
        out, vjp = jax.vjp(f, q, k, v)
        return (out, *vjp(do))

    return both


def _bits(x: jax.Array) -> jax.Array:
    """`x`'s floating-point words as unsigned integers of the same width."""
    return jax.lax.bitcast_convert_type(x, jnp.dtype(f"uint{x.dtype.itemsize * 8}"))


def _compare(first, other) -> list[tuple[bool, float]]:
    """(same bits, largest difference over the largest magnitude) per array."""
    result = []
    for a, b in zip(first, other):
        same = bool(jnp.array_equal(_bits(a), _bits(b)))
        a32, b32 = a.astype(jnp.float32), b.astype(jnp.float32)
        scale = float(jnp.max(jnp.abs(a32)))
        result.append((same, float(jnp.max(jnp.abs(a32 - b32))) / scale if scale else 0.0))
    return result


def check(impl: str, case: benchmark.Case, runs: int) -> dict:
    """One implementation's row: per array, the runs that differed from the first and the largest
    relative difference."""
    row = {"implementation": impl, **dataclasses.asdict(case), "runs": runs}
    try:
        inputs = benchmark.case_inputs(case)
        compiled = jax.jit(_program(impl, case)).lower(*inputs).compile(benchmark.compiler_options(impl))
        first = jax.block_until_ready(compiled(*inputs))
        differing = {name: 0 for name in ARRAYS}
        largest = {name: 0.0 for name in ARRAYS}
        for _ in range(runs - 1):
            for name, (same, diff) in zip(ARRAYS, _compare(first, jax.block_until_ready(compiled(*inputs)))):
                differing[name] += not same
                largest[name] = max(largest[name], diff)
        row["runs_differing"] = differing
        row["largest_relative_difference"] = largest
    except Exception as err:  # a failed case is data, not the end of the run
        row["error"] = benchmark.error_text(err)
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[65536])
    parser.add_argument("--head-dims", type=int, nargs="+", default=[128])
    parser.add_argument("--causal", choices=["yes", "no", "both"], default="no")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--implementations", nargs="+", default=["cudnn", benchmark.DETERMINISTIC_CUDNN])
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if args.runs < 2:
        parser.error(f"--runs must be at least 2 (the others are compared with the first), got {args.runs}")
    causal = {"yes": [True], "no": [False], "both": [True, False]}[args.causal]
    rows = []
    for n, d, c, impl in itertools.product(args.seq_lens, args.head_dims, causal, args.implementations):
        case = benchmark.Case(n, d, c, "fwd_bwd", heads=args.heads, dtype=args.dtype)
        row = check(impl, case, args.runs)
        rows.append(row)
        what = row.get("error") or ", ".join(
            f"{name} {row['runs_differing'][name]}/{args.runs - 1} differ"
            f" (up to {row['largest_relative_difference'][name]:.1e})"
            for name in ARRAYS
        )
        print(f"N={n} D={d} causal={c} {impl}: {what}", flush=True)
    if args.out:
        benchmark.write_results(args.out, rows=rows)
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
