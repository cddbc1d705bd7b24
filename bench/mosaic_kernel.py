"""The Mosaic GPU kernels next to cuDNN and the portable kernel, all data on the device.

    PYTHONPATH=. python bench/mosaic_kernel.py --seq-lens 65536 262144 1048576 --head-dims 64 128 \\
        --out bench/results/mosaic_fwd.json
    PYTHONPATH=. python bench/mosaic_kernel.py --seq-lens 65536 --launches 128,4 128,2 64,4 ...
    PYTHONPATH=. python bench/mosaic_kernel.py --seq-lens 262144 --decomposed 31 ...
    PYTHONPATH=. python bench/mosaic_kernel.py --seq-lens 65536 --backward-launches 128,2,64,2 64,2,64,2 ...

Each launch is written ``block_kv,stages`` (``block_kv,stages,heavy`` takes the
query tiles in reverse order, heaviest first when causal; a trailing ``,cluster2`` pairs
thread blocks that share their key and value copies, ``,scoresfirst`` and ``,namedturns``
set `mosaic_gpu.Launch.scores_first` and ``named_turns``, ``,exp2fmaN`` sets ``exp2_on_fma`` to N
sixteenths and ``,wg3`` three compute warpgroups, ``warpgroups``); every launch given is timed on the single-subproblem
plan (kernel speed alone) and, with ``--decomposed C``, on a plan forced to ``C`` chunks (C
subproblems, all on the device), which measures what the decomposition itself costs.
``--portable`` adds the Triton kernel, ``--cudnn-deterministic`` cuDNN compiled with XLA's
deterministic ops (``cudnn:deterministic`` in `stream_cqsa_jax.benchmark`; ratios against it are
``ratio_vs_cudnn:deterministic``, as `benchmark.add_ratios` names them). All programs of a case are
compiled first, on the same inputs; then each is timed after the other, or, with ``--interleave``, in turns
(`benchmark.run_interleaved`: a long run warms the card, which favours
whichever runs first).

With ``--backward-launches`` the pass timed is forward plus backward (cuDNN's
too; with ``--decomposed``, on both plans), once per backward launch, written
``dq_block_kv,dq_stages,dkv_block_q,dkv_stages``
(`mosaic_gpu_backward.Launch`; trailing ``,paired``, ``,fused``, ``,segN``, ``,flush``,
``,cluster2``, ``,dkvcluster2``, ``,dqturns``, ``,dqnamed``, ``,passN`` and ``,kvregs`` set ``dkv_paired``,
``fused_dq``, ``dq_segment``, ``dq_flush``, ``dq_cluster``, ``dkv_cluster``, ``dq_turns``, ``dq_named_turns``,
``dq_pass_keys`` and ``dkv_kv_in_registers``),
with the forward's own launch or ``--forward-launch``.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import sys

import launches
from stream_cqsa_jax import benchmark
from stream_cqsa_jax._src.kernels import mosaic_gpu, mosaic_gpu_backward


def _numbered(flags: set[str], *prefixes: str) -> dict[str, list[str]]:
    """Per prefix, the flags that are it followed by a number (``seg8`` for ``seg``)."""
    return {p: [f for f in flags if f.startswith(p) and f[len(p):].isdigit()] for p in prefixes}


def _number(numbered: dict[str, list[str]], prefix: str) -> int:
    """The number of `prefix`'s flag in `numbered` (`_numbered`), or 0 without one."""
    return int(numbered[prefix][0][len(prefix):]) if numbered[prefix] else 0


def forward_launch(text: str) -> mosaic_gpu.Launch:
    """``block_kv,stages``, then optionally ``,heavy`` (query tiles in reverse order), ``,cluster2``
    (`Launch.cluster` = 2), ``,scoresfirst`` (`Launch.scores_first`), ``,namedturns``
    (`Launch.named_turns`), ``,exp2fmaN`` (`Launch.exp2_on_fma` = N) and ``,wg3`` (`Launch.warpgroups` = 3)."""
    parts = text.split(",")
    flags = set(parts[2:])
    known = ("heavy", "cluster2", "scoresfirst", "namedturns", "wg3")
    numbered = _numbered(flags, "exp2fma")
    if flags - set(known) - set(numbered["exp2fma"]) or len(numbered["exp2fma"]) > 1:
        raise ValueError(
            f"forward launch {text!r}: flags after the numbers are {', '.join(map(repr, known))} and one 'exp2fmaN'"
        )
    return mosaic_gpu.Launch(
        block_kv=int(parts[0]), stages=int(parts[1]), heavy_first="heavy" in flags,
        cluster=2 if "cluster2" in flags else 1, scores_first="scoresfirst" in flags,
        named_turns="namedturns" in flags, exp2_on_fma=_number(numbered, "exp2fma"),
        warpgroups=3 if "wg3" in flags else 2,
    )


def launch_text(launch: mosaic_gpu.Launch) -> str:
    """The forward launch written as `forward_launch` reads it."""
    return (
        f"{launch.block_kv},{launch.stages}" + (",heavy" if launch.heavy_first else "")
        + (",cluster2" if launch.cluster == 2 else "") + (",scoresfirst" if launch.scores_first else "")
        + (",namedturns" if launch.named_turns else "")
        + (f",exp2fma{launch.exp2_on_fma}" if launch.exp2_on_fma else "") + (",wg3" if launch.warpgroups == 3 else "")
    )


def backward_launch(text: str) -> mosaic_gpu_backward.Launch:
    """``dq_block_kv,dq_stages,dkv_block_q,dkv_stages``, then optionally ``,paired``
    (`Launch.dkv_paired`), ``,fused`` (`Launch.fused_dq`), ``,segN`` (`Launch.dq_segment` = N),
    ``,flush`` (`Launch.dq_flush`), ``,cluster2`` (`Launch.dq_cluster` = 2), ``,dkvcluster2``
    (`Launch.dkv_cluster` = 2), ``,dqturns`` (`Launch.dq_turns`), ``,dqnamed``
    (`Launch.dq_named_turns`), ``,passN`` (`Launch.dq_pass_keys` = N) and ``,kvregs``
    (`Launch.dkv_kv_in_registers`)."""
    parts = text.split(",")
    dq_block_kv, dq_stages, dkv_block_q, dkv_stages = (int(x) for x in parts[:4])
    flags = set(parts[4:])
    numbered = _numbered(flags, "seg", "pass")
    known = {"paired", "fused", "flush", "cluster2", "dkvcluster2", "dqturns", "dqnamed", "kvregs"}
    unknown = flags - known - set(itertools.chain(*numbered.values()))
    if unknown or any(len(found) > 1 for found in numbered.values()):
        raise ValueError(
            f"backward launch {text!r}: flags after the numbers are 'paired', 'fused', 'flush', 'cluster2',"
            " 'dkvcluster2', 'dqturns', 'dqnamed', 'kvregs', one 'segN' and one 'passN'"
        )
    return mosaic_gpu_backward.Launch(
        dq_block_kv, dq_stages, dkv_block_q, dkv_stages, dkv_paired="paired" in flags, fused_dq="fused" in flags,
        dq_segment=_number(numbered, "seg"), dq_flush="flush" in flags,
        dq_cluster=2 if "cluster2" in flags else 1, dkv_cluster=2 if "dkvcluster2" in flags else 1,
        dq_turns="dqturns" in flags, dq_named_turns="dqnamed" in flags, dq_pass_keys=_number(numbered, "pass"),
        dkv_kv_in_registers="kvregs" in flags,
    )


def _report(row: dict, label: str) -> None:
    """Prints a timed row with its ratios against the baselines (`benchmark.add_ratios`)."""
    if "seconds" not in row:
        text = row.get("error", "?")
    else:
        text = f"{row['seconds']:.4f} s, {row['tflops']:.0f} TFLOP/s"
        for base, name in (("cudnn", "cuDNN"), (benchmark.DETERMINISTIC_CUDNN, "deterministic cuDNN")):
            if f"ratio_vs_{base}" in row:
                text += f", {row[f'ratio_vs_{base}']:.3f}x {name}"
    print(f"{label}: {text}", flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[65536])
    parser.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--causal", choices=["yes", "no", "both"], default="both")
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16"])
    parser.add_argument("--launches", nargs="+", default=None, help="block_kv,stages (default: the kernel's own)")
    parser.add_argument("--decomposed", type=int, default=None, help="also time a plan forced to this many chunks")
    parser.add_argument("--backward-launches", nargs="+", default=None,
                        help="time forward plus backward with these dq_block_kv,dq_stages,dkv_block_q,dkv_stages")
    parser.add_argument("--forward-launch", default=None,
                        help="with --backward-launches: the forward's launch (default: the kernel's own)")
    parser.add_argument("--portable", action="store_true", help="also time the Triton kernel")
    parser.add_argument("--cudnn-deterministic", action="store_true",
                        help="also time cuDNN compiled with XLA's deterministic ops (cudnn:deterministic)")
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--interleave", action="store_true",
                        help="time the programs of a case in turns (`--iters` rounds; benchmark.run_interleaved)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    causal = {"yes": [True], "no": [False], "both": [True, False]}[args.causal]
    direction = "fwd_bwd" if args.backward_launches else "fwd"
    rows = []
    chunk_counts = (None, args.decomposed) if args.decomposed else (None,)  # None: one subproblem
    for n, d, c, dtype in itertools.product(args.seq_lens, args.head_dims, causal, args.dtypes):
        case = benchmark.Case(n, d, c, direction, dtype=dtype)
        label = f"N={n} D={d} causal={c} {dtype} {direction}"
        inputs = benchmark.case_inputs(case)
        # (label, row, run) per program; each compiled with its launch patched in
        programs = [(f"{label} cudnn", *benchmark.prepare_case("cudnn", case, args=inputs))]
        if args.cudnn_deterministic:
            name = benchmark.DETERMINISTIC_CUDNN
            programs.append((f"{label} {name}", *benchmark.prepare_case(name, case, args=inputs)))
        if args.portable:
            programs.append((f"{label} pallas_triton", *benchmark.prepare_case("pallas_triton", case, args=inputs)))
        # one subproblem's own forward launch (the runs' key and value heads are their query heads)
        own_forward = case.forward_launch()
        if args.backward_launches:
            forward = forward_launch(args.forward_launch) if args.forward_launch else None
            for launch in map(backward_launch, args.backward_launches):
                with launches.forward_launch_as(forward), launches.backward_launch_as(launch):
                    for chunks in chunk_counts:
                        row, run = benchmark.prepare_case("mosaic_gpu", case, chunks, args=inputs)
                        row.update(dataclasses.asdict(launch))
                        if args.forward_launch or not chunks:  # cut into chunks, each subproblem picks its own
                            row["forward_launch"] = args.forward_launch or launch_text(own_forward)
                        what = f" chunks={chunks}" if chunks else ""
                        programs.append((f"{label} mosaic_gpu backward {launch}{what}", row, run))
        else:
            for given in [forward_launch(x) for x in args.launches] if args.launches else [None]:
                # None: the kernel's own choice (`mosaic_gpu.default_launch`), per subproblem
                launch = given or own_forward
                with launches.forward_launch_as(given):
                    for chunks in chunk_counts:
                        row, run = benchmark.prepare_case("mosaic_gpu", case, chunks, args=inputs)
                        row.update(dataclasses.asdict(launch))
                        if given is None and chunks:
                            del row["cluster"]  # the subproblems' own choice, which their key arrays' sizes decide
                        what = launch_text(launch) + (f" chunks={chunks}" if chunks else "")
                        programs.append((f"{label} mosaic_gpu {what}", row, run))
        prepared = [(row, run) for _, row, run in programs]
        if args.interleave:
            benchmark.run_interleaved(prepared, case, args.iters)
        else:
            for row, run in prepared:
                benchmark.time_alone(row, run, case, args.iters)
        benchmark.add_ratios([row for _, row, _ in programs])
        for text, row, _ in programs:
            _report(row, text)
            rows.append(row)
        if args.out:  # after every case, so that a run stopped at a time limit keeps the cases it finished
            benchmark.write_results(args.out, rows=rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
