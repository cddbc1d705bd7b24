"""Writes the tables and the charts of docs/benchmarks.md from the JSON files in bench/results/.

    python bench/make_tables.py            # prints the generated sections
    python bench/make_tables.py --write    # replaces them in docs/benchmarks.md, writes the charts

Only the parts between the markers in docs/benchmarks.md are generated (one
pair of markers per section, see `SECTIONS`); the charts are the PNG files
named in `CHARTS`.
"""

from __future__ import annotations

import argparse
import functools
import json
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "bench" / "results"
DOC = ROOT / "docs" / "benchmarks.md"
BEGIN, END = "<!-- generated tables: begin -->", "<!-- generated tables: end -->"
CHART = ROOT / "docs" / "benchmarks_kernel.png"
MOSAIC_BEGIN, MOSAIC_END = "<!-- generated Hopper tables: begin -->", "<!-- generated Hopper tables: end -->"
MOSAIC_CHART = ROOT / "docs" / "benchmarks_hopper.png"
# Forward runs of the launch without and with `Launch.values_first`, oldest first.
VALUES_FIRST_FILES = [
    "fwd_values_first_d64.json",
    "fwd_values_first_d128.json",
    "fwd_values_first_d128_nc.json",
    "fwd_values_first_1m_d128_nc.json",
    "fwd_values_first_1m_d128_causal.json",
    "fwd_values_first_1m_d128_nc_again.json",
]
# Forward runs, oldest first: a later run of the same case replaces an earlier one in the table.
MOSAIC_FILES = [
    "mosaic_fwd_bf16.json",
    "mosaic_fwd_f16.json",
    "mosaic_f16_64k_d128_repeat.json",
    "mosaic_tile_order.json",
    "mosaic_fwd_bf16_heavy_64k_256k.json",
    "mosaic_fwd_1m_d64_nc.json",
    "mosaic_fwd_256k_d64_nc_interleaved.json",
    "mosaic_fwd_1m_d64_nc_interleaved.json",
    "mosaic_block_order_1m.json",  # its heads-first rows at B=1, 8 heads (the default launch)
    "cluster_64k_256k.json",  # single blocks and pairs (`Launch.cluster`): the default's choice is shown
    "cluster_1m_d64_nc.json",
    "cluster_1m_d128_nc.json",
    "cluster_512k_d64.json",
    "cluster_1m_d64_causal.json",
    "cluster_1m_d128_causal.json",
    "mosaic_fwd_1m_d64_nc_default.json",
    *VALUES_FIRST_FILES,  # the default launch next to `Launch.values_first`: the default's rows count
]
# Forward runs of single thread blocks next to pairs (`Launch.cluster`), in the order of the table.
CLUSTER_FILES = [
    "cluster_64k_256k.json",
    "cluster_512k_d64.json",
    "cluster_1m_d64_causal.json",
    "cluster_1m_d64_nc.json",
    "cluster_1m_d128_causal.json",
    "cluster_1m_d128_nc.json",
]
CLUSTER_SINGLE_AGAIN = "cluster_1m_d64_nc_single.json"  # single blocks again, the case where pairs gained most
# Forward plus backward runs of the dq kernel's single thread blocks next to pairs (`Launch.dq_cluster`).
DQ_CLUSTER_FILES = [
    "cluster_bwd_64k_d64.json",
    "cluster_bwd_64k_d128.json",
    "cluster_bwd_256k_d64_causal.json",
    "cluster_bwd_256k_d64_nc.json",
    "cluster_bwd_256k_d128_causal.json",
    "cluster_bwd_256k_d128_nc.json",
    "cluster_bwd_1m_d64_nc.json",
]
# Runs on an H100 (the other tables are the H200's): the dk/dv kernel's pairs (`Launch.dkv_cluster`), then
# the forward's single blocks and pairs at 64K and at 512K tokens in a batch of two.
H100_FILES = [
    "h100_dkv_cluster_d64.json",
    "h100_dkv_cluster_d128.json",
    "h100_dkv_cluster_1m_d128.json",
    "h100_fwd_64k_nc.json",
    "h100_fwd_512k_b2_clusters.json",
]
# Runs on an H100: the backward's tensor-core turns (`Launch.dq_turns`; `dkv_turns`, since removed), in order
# of the table, then the dq kernel's pairs at 1M and the forward at lengths of whole and partial last waves.
H100_TURNS_FILES = [
    "h100_turns_d64_nc.json",
    "h100_dqturns_d64.json",
    "h100_dqturns_1m_d64.json",
    "h100_turns_d128_nc.json",
]
H100_DQ_CLUSTER_1M = "h100_dq_cluster_1m_d128.json"
H100_WAVES = "h100_fwd_wave_tail.json"
# Runs on an H100: the forward with each warpgroup's softmax under its own p v (an option since removed),
# with three stages at head dim 128, and the first again with the warpgroups' turns switched off.
H100_FORWARD_LAUNCH_FILES = [
    "h100_fwd_overlap_d64.json",
    "h100_fwd_stages_d128.json",
    "h100_fwd_overlap_noturns_d64.json",
]
# Runs on an H100: the forward with and without `Launch.values_first` at 64K, and forward plus backward with
# dk's ds read from shared memory (an option since removed), each with ptxas's report in a log beside it.
H100_VALUES_FIRST_FILES = ["h100_fwd_values_first_64k_d64.json", "h100_fwd_values_first_64k_d128.json"]
H100_DK_FROM_SMEM_FILES = ["h100_dksmem_d64.json", "h100_dksmem_d128.json"]
H100_Q_REGISTERS_FILES = ["h100_fwd_qregs_64k_d128.json", "h100_fwd_qregs_64k_d64.json"]
H100_NCU_STALLS = "h100_ncu_fwd_d128_nc_stalls.json"
# Runs on an H100: the forward with scores first and turns at a hardware barrier, the first with ptxas's report
# in a log beside it.
H100_FORWARD_TURNS_FILES = [
    "h100_fwd_turns_64k_d128.json",
    "h100_fwd_turns_256k_d128_nc.json",
    "h100_fwd_turns_causal_d128.json",
    "h100_fwd_turns_64k_d64.json",
    "h100_fwd_turns_64k_d64_causal.json",
    "h100_fwd_turns_d128_defaults.json",
]
# Runs on an H100: forward plus backward with the dq kernel in passes over windows of keys (`Launch.dq_pass_keys`)
# and in 32-tile segments, next to the default launch of each head dim.
H100_DQ_PASSES_FILES = ["h100_dq_passes_256k_d128_nc.json", "h100_dq_passes_256k_d64_nc.json"]
# Today's defaults on an H100: the forward, then forward plus backward (the dq kernel's turns at a hardware
# barrier beside the head dim 128 default), then each kernel's counters in forward plus backward.
H100_DEFAULTS_FORWARD = "h100_fwd_defaults.json"
H100_DEFAULTS_BACKWARD_FILES = ["h100_bwd_d128_dqnamed.json", "h100_bwd_256k_d64_nc.json"]
H100_NCU_BACKWARD = "h100_ncu_bwd_d128_nc.json"
# Forward plus backward with 64-key dq tiles (ptxas's report in a log beside each).
DQ_TILE_FILES = ["bwd_dq_tiles_64k_d64.json", "bwd_dq_tiles_64k_d128.json"]
SMS = 132  # streaming multiprocessors of the H100 SXM and the H200, one forward thread block each at a time
# Forward plus backward runs, oldest first: a later run of the same case replaces an earlier one.
MOSAIC_BACKWARD_FILES = [
    "mosaic_bwd_64k_256k.json",
    "mosaic_bwd_1m_d64_causal.json",
    "mosaic_bwd_paired_d64.json",
    "mosaic_bwd_1m_d64_nc.json",
    "mosaic_bwd_1m_d64_causal_paired.json",
    "mosaic_bwd_1m_d128_causal.json",
    "mosaic_bwd_1m_d128_nc.json",
    "mosaic_bwd_1m_d64_nondeterministic.json",
    "mosaic_bwd_16k_256k.json",
    "mosaic_bwd_1m_d128.json",
    "pallas_triton_bwd_16k_256k.json",
    "pallas_triton_bwd_1m_d128.json",
    "pallas_triton_bwd_1m_d64.json",
    "mosaic_bwd_dq_segments_256k_d128.json",
    "mosaic_bwd_dq_segments_256k_d64.json",
    "mosaic_bwd_1m_d64_nc_interleaved.json",
    "mosaic_bwd_1m_d128_nc_interleaved.json",
    "mosaic_decomposed_bwd_d64.json",  # their rows of one subproblem
    "mosaic_decomposed_bwd_d128.json",
    "mosaic_bwd_d128_flush_default.json",  # 128-key dq tiles, segments in memory: the head dim 128 default
    "mosaic_bwd_1m_d128_nc_flush_default.json",
    *DQ_CLUSTER_FILES,  # only their rows that ran today's default launches count (`_default_now`)
    "bwd_values_first_d128_nc.json",
]
MOSAIC_GRAD_ACCURACY_FILES = [
    "accuracy_8k_grads_d64.json",
    "accuracy_8k_grads_d128.json",
    "accuracy_1m_grads_d64.json",
    "accuracy_1m_grads_d128.json",
]
SCALING_BEGIN, SCALING_END = "<!-- generated scaling tables: begin -->", "<!-- generated scaling tables: end -->"
SCALING_CHART = ROOT / "docs" / "benchmarks_scaling.png"
SCALING_FILES = ["scaling_4m_fwd.json", "scaling_1m_fwd_bwd.json", "scaling_4m_fwd_bwd.json"]
# Runs of the portable kernel, oldest first: a later run of the same case replaces an earlier one.
KERNEL_FILES = [
    "pallas_triton_16k_256k.json",
    "pallas_triton_1m_fwd.json",
    "pallas_triton_1m_fwd_bwd.json",
    "pallas_triton_1m_fwd_bwd_d128.json",
    "pallas_triton_bwd_16k_256k.json",
    "pallas_triton_bwd_1m_d128.json",
    "pallas_triton_bwd_1m_d64.json",
]
KERNEL_GRAD_ACCURACY_FILES = ["accuracy_8k_grads_triton.json"]


def _tokens(n: int) -> str:
    return f"{n // 2**20}M" if n % 2**20 == 0 else f"{n // 2**10}K"


def _load_rows(files: list[str]) -> list[dict]:
    rows = []
    for name in files:
        rows += json.loads((RESULTS / name).read_text())["rows"]
    return rows


def _ours_and_cudnn(files: list[str], fields: tuple[str, ...], implementation: str | None = None):
    """(our timed rows, timed cuDNN rows by the values of `fields`); ours are the rows of
    `implementation`, or of every implementation but cuDNN."""
    rows = [r for r in _load_rows(files) if "seconds" in r]
    if implementation is None:
        ours = [r for r in rows if r["implementation"] != "cudnn"]
    else:
        ours = [r for r in rows if r["implementation"] == implementation]
    return ours, {tuple(r[f] for f in fields): r for r in rows if r["implementation"] == "cudnn"}


_KERNEL_FIELDS = ("seq_len", "head_dim", "causal", "direction")
_MOSAIC_FIELDS = ("seq_len", "head_dim", "causal", "dtype")


def _ratio_chart(ours, base, fields, order, label, path, lines) -> None:
    """Bars of ours / cuDNN throughput: rows sorted by `order`, grouped by `label`, one bar per N."""
    from plot import bar_chart

    groups = {}
    for r in sorted(ours, key=order):
        c = base[tuple(r[f] for f in fields)]
        groups.setdefault(label(r), []).append((_tokens(r["seq_len"]), c["seconds"] / r["seconds"]))
    bar_chart(str(path), list(groups.items()), lines=lines, top=1.1)


def _latest_runs(
    files: list[str], fields, implementation: str, prefer=None, keep=None
) -> dict[tuple, tuple[dict, dict, str]]:
    """(row of `implementation`, cuDNN row of the same file, file name) per case (the values of `fields`);
    a later file replaces an earlier one, and within a file a row `prefer` ranks higher replaces a lower.
    With `keep`, only our rows for which it is true count."""
    latest = {}
    for name in files:
        ours, base = _ours_and_cudnn([name], fields, implementation)
        for r in sorted(filter(keep, ours), key=prefer or (lambda r: 0)):
            key = tuple(r[f] for f in fields)
            latest[key] = (r, base[key], name)
    return latest


def _latest_kernel_runs(files: list[str]) -> dict[tuple, tuple[dict, dict, str]]:
    """The latest run of the portable kernel per case (see `_latest_runs`)."""
    return _latest_runs(files, _KERNEL_FIELDS, "pallas_triton")


def kernel_chart(files: list[str], path) -> None:
    """One group per (head dim, causal, pass), the latest run of each case."""
    runs = _latest_kernel_runs(files).values()
    _ratio_chart(
        [r for r, _, _ in runs], {tuple(r[f] for f in _KERNEL_FIELDS): c for r, c, _ in runs}, _KERNEL_FIELDS,
        order=lambda r: (r["direction"], r["head_dim"], not r["causal"], r["seq_len"]),
        label=lambda r: (
            f"D{r['head_dim']} {'C' if r['causal'] else 'NC'} {'FWD' if r['direction'] == 'fwd' else 'F+B'}"
        ),
        path=path, lines=[0.6, 1.0],
    )


def kernel_table(files: list[str]) -> str:
    runs = _latest_kernel_runs(files)
    lines = [
        "| N | D | causal | pass | cuDNN s | ours s | ours TFLOP/s | ours / cuDNN throughput | ours temp GiB | file |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for key in sorted(runs, key=lambda k: (k[0], k[1], not k[2], k[3])):
        r, c, name = runs[key]
        lines.append(
            f"| {_tokens(r['seq_len'])} | {r['head_dim']} | {'yes' if r['causal'] else 'no'} | {r['direction']} "
            f"| {c['seconds']:.4f} | {r['seconds']:.4f} | {r['tflops']:.0f} | {c['seconds'] / r['seconds']:.2f}x "
            f"| {r.get('temp_bytes', 0) / 2**30:.2f} | `{name}` |"
        )
    return "\n".join(lines)


def accuracy_table(files: list[str], ours: str = "pallas_triton") -> str:
    lines = [
        f"| N | D | causal | rows checked | ours ({ours}) | cuDNN | XLA kernel |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name in files:
        for r in json.loads((RESULTS / name).read_text())["results"]:
            e = r["errors"]
            fmt = lambda x: "" if x is None else (f"{x:.3e}" if isinstance(x, float) else str(x)[:40])
            lines.append(
                f"| {_tokens(r['seq_len'])} | {r['head_dim']} | {'yes' if r['causal'] else 'no'} "
                f"| {r['rows_checked']} | {fmt(e.get(ours))} | {fmt(e.get('cudnn'))} | {fmt(e.get('xla'))} |"
            )
    return "\n".join(lines)


def generated() -> str:
    return "\n\n".join(
        [
            BEGIN,
            "### Kernel speed: one subproblem, all data on the device (B=1, 8 heads, bfloat16)",
            "Each row is the latest run of its case (file named), with cuDNN timed in the same run: "
            "`pallas_triton_16k_256k.json` (3 timed runs after a warm-up, median), `pallas_triton_bwd_16k_256k.json` "
            "(2), the 1M files (1). The forward plus backward rows come from the `pallas_triton_bwd_*` runs, made "
            "with the transposed dk/dv kernel (see below); the older `pallas_triton_1m_fwd_bwd*.json` runs are "
            "kept for the record.",
            kernel_table(KERNEL_FILES),
            f"![ours / cuDNN throughput]({CHART.name})",
            "The chart: ours / cuDNN throughput per group of head dim (D64, D128), causal (C) or not (NC), "
            "forward (FWD) or forward plus backward (F+B); one bar per length (16K to 1M); grey lines at 0.6x "
            "(the portable kernel's target) and 1.0x (cuDNN).",
            "### Accuracy on the device: relative error vs float64 (bfloat16 inputs, 8 heads)",
            "Files: `accuracy_8k.json`, `accuracy_1m.json`.",
            accuracy_table(["accuracy_8k.json", "accuracy_1m.json"]),
            "### Gradient accuracy on the device: relative error vs float64 (bfloat16 inputs, 8 heads)",
            "File: `accuracy_8k_grads_triton.json` (every row; gradients for a random bfloat16 cotangent, "
            "`bench/check_accuracy.py --grads`; the transposed dk/dv kernel).",
            grad_accuracy_table(KERNEL_GRAD_ACCURACY_FILES, ours="pallas_triton"),
            END,
        ]
    )


def _default_forward(r: dict):
    """The forward launch (`mosaic_gpu.Launch`) that today's default picks for the case of row `r` (one
    subproblem of the whole sequence)."""
    fields = (r["seq_len"], r["head_dim"], r["causal"], r["direction"], r.get("batch", 1), r.get("heads", 8))
    return _default_forward_of(*fields)


@functools.lru_cache(maxsize=None)
def _default_forward_of(*case):
    """`_default_forward` of a `benchmark.Case`'s fields, worked out once per case."""
    from stream_cqsa_jax import benchmark

    return benchmark.Case(*case).forward_launch()


def _default_clusters(r: dict) -> tuple[int, int]:
    """(forward `Launch.cluster`, dq `Launch.dq_cluster`) that today's default launches pick for the case of
    row `r` (one subproblem of the whole sequence)."""
    from stream_cqsa_jax._src.kernels import mosaic_gpu_backward

    return _default_forward(r).cluster, mosaic_gpu_backward.default_launch(r["head_dim"]).dq_cluster


def _recorded_flags(r: dict) -> set[str]:
    """The flags of the forward launch that a forward plus backward row names in `forward_launch`, written
    as `bench/mosaic_kernel.py` writes launches (``block_kv,stages[,heavy][,cluster2][,scoresfirst]...``;
    rows of removed options name theirs too, such as ``valuesfirst``)."""
    return set(r["forward_launch"].split(",")[2:])


def _forward_cluster(r: dict) -> int:
    """Thread blocks per cluster of the forward that ran row `r`: the launch it names (forward plus backward
    rows of one subproblem name it from the runs after the dk/dv pairs on), else today's default for a
    forward plus backward row that names a `dkv_cluster` (the first runs of those, made under today's forward
    rule), else 1 (runs made before pairs existed)."""
    if "forward_launch" in r:
        return 2 if "cluster2" in _recorded_flags(r) else 1
    if r.get("direction") == "fwd_bwd" and "dkv_cluster" in r:
        return _default_clusters(r)[0]
    return r.get("cluster", 1)


def _forward_options(r: dict) -> tuple[bool, bool, bool]:
    """(values first, scores first, turns at a hardware barrier) of the forward that ran row `r`: the removed
    `Launch.values_first` (at commit e8b045b), `Launch.scores_first` and `Launch.named_turns` (rows made
    before an option existed ran without it)."""
    if "forward_launch" in r:
        flags = _recorded_flags(r)
        return "valuesfirst" in flags, "scoresfirst" in flags, "namedturns" in flags
    return bool(r.get("values_first")), bool(r.get("scores_first")), bool(r.get("named_turns"))


def _default_options(r: dict) -> tuple[bool, bool, bool]:
    """`_forward_options` of the forward launch that today's default picks for the case of row `r`."""
    launch = _default_forward(r)
    return False, launch.scores_first, launch.named_turns


def _earlier_default_options(r: dict) -> tuple[bool, bool, bool]:
    """`_forward_options` of the default before scores first: values first at head dim 128 without a mask.
    No H200 run has timed today's head dim 128 default yet, so its tables fall back to that one."""
    return r["head_dim"] > 64 and not r["causal"], False, False


def _default_now(r: dict) -> bool:
    """Whether a forward plus backward row of a pairs sweep ran what the default launches pick today (or, for
    the forward's options, what they picked before scores first; `_earlier_default_options`)."""
    if "forward_launch" not in r:
        return True  # rows of runs that time the default launch of their day
    same_forward = _forward_options(r) in (_default_options(r), _earlier_default_options(r))
    return same_forward and (_forward_cluster(r), r.get("dq_cluster", 1)) == _default_clusters(r)


def _options_label(r: dict) -> str:
    """The forward options of row `r` in words, each after a comma ('' for none)."""
    names = ("values first", "scores first", "turns at a hardware barrier")
    return "".join(f", {name}" for name, on in zip(names, _forward_options(r)) if on)


def _heavy_first(r: dict) -> bool:
    """Whether a forward row ran heaviest query tiles first; rows of `bench/forward_shapes.py` (they name
    a block order) ran the default launch, which does."""
    return bool(r.get("heavy_first", "block_order" in r))


def _latest_mosaic_runs(files: list[str]) -> dict[tuple, tuple[dict, dict, str]]:
    """The latest Hopper forward run per case at B=1, 8 heads, in the kernels' own block order (see
    `_latest_runs`); within a file the heaviest-first launch (the default) replaces the in-order one."""
    runs = _latest_runs(
        files, _MOSAIC_FIELDS + ("batch", "heads"), "mosaic_gpu",
        prefer=lambda r: (
            _heavy_first(r), _forward_cluster(r) == _default_clusters(r)[0],
            _forward_options(r) == _default_options(r), _forward_options(r) == _earlier_default_options(r),
        ),
        keep=lambda r: r.get("block_order", "heads_first") == "heads_first",
    )
    return {key[:4]: run for key, run in runs.items() if key[4:] == (1, 8)}


def mosaic_table(files: list[str]) -> str:
    lines = [
        "| N | D | causal | dtype | query tiles | blocks | cuDNN s | ours s | ours TFLOP/s | ours / cuDNN throughput "
        "| file |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    runs = _latest_mosaic_runs(files)
    for key in sorted(runs, key=lambda k: (k[3], k[0], k[1], not k[2])):
        r, c, name = runs[key]
        lines.append(
            f"| {_tokens(r['seq_len'])} | {r['head_dim']} | {'yes' if r['causal'] else 'no'} | {r['dtype']} "
            f"| {'heaviest first' if _heavy_first(r) else 'in order'} "
            f"| {'pairs' if _forward_cluster(r) == 2 else 'single'}{_options_label(r)} "
            f"| {c['seconds']:.4f} "
            f"| {r['seconds']:.4f} | {r['tflops']:.0f} | {c['seconds'] / r['seconds']:.3f}x | `{name}` |"
        )
    return "\n".join(lines)


def mosaic_backward_table(files: list[str]) -> str:
    """Forward plus backward: the latest Hopper run of each case next to cuDNN in the same run, and the
    latest portable run next to cuDNN in its own run."""
    latest = {  # implementation -> case -> (row, cuDNN row of the same file, file name)
        # within a file, the launch with dq segments (the default) replaces the one without
        implementation: _latest_runs(
            files, _KERNEL_FIELDS, implementation, prefer=lambda r: bool(r.get("dq_segment")),
            keep=lambda r: not r.get("num_chunks") and _default_now(r),
        )
        for implementation in ("mosaic_gpu", "mosaic_gpu:nondeterministic", "pallas_triton")
    }
    lines = [
        "| N | D | causal | cuDNN s | Mosaic s | Mosaic / cuDNN | file | nondeterministic / cuDNN | portable / cuDNN "
        "| temp GiB: cuDNN / Mosaic / nondeterministic |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]

    def ratio(implementation, key):
        run = latest[implementation].get(key)
        return f"{run[1]['seconds'] / run[0]['seconds']:.3f}x" if run else "not run"

    def temp(implementation, key):
        run = latest[implementation].get(key)
        return f"{run[0]['temp_bytes'] / 2**30:.2f}" if run else "-"

    for key in sorted(latest["mosaic_gpu"], key=lambda k: (k[0], k[1], not k[2])):
        m, c, name = latest["mosaic_gpu"][key]
        lines.append(
            f"| {_tokens(key[0])} | {key[1]} | {'yes' if key[2] else 'no'} | {c['seconds']:.4f} "
            f"| {m['seconds']:.4f} | {c['seconds'] / m['seconds']:.3f}x | `{name}` "
            f"| {ratio('mosaic_gpu:nondeterministic', key)} | {ratio('pallas_triton', key)} "
            f"| {c['temp_bytes'] / 2**30:.2f} / {temp('mosaic_gpu', key)} / {temp('mosaic_gpu:nondeterministic', key)} |"
        )
    return "\n".join(lines)


def backward_launch_table(name: str) -> str:
    """Forward plus backward with each backward launch (`mosaic_gpu_backward.Launch`) of a sweep."""
    ours, base = _ours_and_cudnn([name], _KERNEL_FIELDS, "mosaic_gpu")
    lines = [
        "| N | D | causal | dq keys, stages | dk/dv rows, stages | paired | dq | Mosaic s | Mosaic / cuDNN |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in ours:
        c = base[tuple(r[f] for f in _KERNEL_FIELDS)]
        dq = "fused, split" if r.get("fused_dq_split") else "fused" if r.get("fused_dq") else "own kernel"
        dq += f", {r['dq_segment']}-tile segments" if r.get("dq_segment") else ""
        dq += " in memory" if r.get("dq_segment") and r.get("dq_flush") else ""
        dq += f", dk/dv {r['dkv_segment']}-step segments" if r.get("dkv_segment") else ""
        dq += ", blocks in pairs" if r.get("dq_cluster", 1) == 2 else ""
        dq += ", turns" if r.get("dq_turns") else ""
        dq += " at a hardware barrier" if r.get("dq_named_turns") else ""
        dq += f", passes of {r['dq_pass_keys'] // 1024}K keys" if r.get("dq_pass_keys") else ""
        dq += ", dk/dv turns" if r.get("dkv_turns") else ""  # a launch option since removed
        dq += ", dk's ds from shared memory" if r.get("dk_from_smem") else ""  # removed too
        lines.append(
            f"| {_tokens(r['seq_len'])} | {r['head_dim']} | {'yes' if r['causal'] else 'no'} "
            f"| {r['dq_block_kv']}, {r['dq_stages']} | {r['dkv_block_q']}, {r['dkv_stages']} "
            f"| {'yes' if r.get('dkv_paired') else 'no'} | {dq} | {r['seconds']:.4f} "
            f"| {c['seconds'] / r['seconds']:.3f}x |"
        )
    return "\n".join(lines)


def grad_accuracy_table(files: list[str], ours: str = "mosaic_gpu", variants: tuple[str, ...] = ()) -> str:
    """Relative errors of dq, dk, dv vs float64: our backward (`ours`, then each of `variants`), cuDNN and
    XLA on the same inputs."""
    variant_heads = "".join(f" {v} |" for v in variants)
    lines = [
        f"| N | D | causal | rows | gradient | ours ({ours}) |{variant_heads} cuDNN | XLA kernel |",
        "| --- " * (8 + len(variants)) + "|",
    ]
    for name in files:
        for r in json.loads((RESULTS / name).read_text())["results"]:
            e = r.get("grad_errors", {})
            if ours not in e or "cudnn" not in e:
                continue  # the run stopped before this case's gradients
            for g in ("dq", "dk", "dv"):
                cells = [f"{e[i][g]:.4e}" if i in e else "" for i in (*variants, "cudnn", "xla")]
                lines.append(
                    f"| {_tokens(r['seq_len'])} | {r['head_dim']} | {'yes' if r['causal'] else 'no'} "
                    f"| {r['rows_checked']} | {g} | {e[ours][g]:.4e} | {' | '.join(cells)} |"
                )
    return "\n".join(lines)


def launch_error_table(runs: list[tuple[str, str]]) -> str:
    """Errors vs float64 (output, dq, dk, dv) per case, one column per launch: `runs` are (file, heading of
    the launch its ``mosaic_gpu`` ran with); cuDNN's from whichever file has them; the rightmost launch a
    case has / cuDNN."""
    headings = list(dict.fromkeys(heading for _, heading in runs))
    cases = {}  # (N, heads, D, causal, seed, rows) -> {heading or "cudnn": {"out", "dq", "dk", "dv"}}
    for name, heading in runs:
        for r in json.loads((RESULTS / name).read_text())["results"]:
            key = (r["seq_len"], r["heads"], r["head_dim"], r["causal"], r.get("seed", 0), r["rows_checked"])
            case = cases.setdefault(key, {})
            for impl, column in (("mosaic_gpu", heading), ("cudnn", "cudnn")):
                if impl in r.get("grad_errors", {}):
                    case[column] = {"out": r["errors"][impl], **r["grad_errors"][impl]}
    lines = [
        "| N | heads | D | causal | seed | rows | error of |" + "".join(f" {h} |" for h in headings)
        + " cuDNN | rightmost / cuDNN |",
        "| --- " * (9 + len(headings)) + "|",
    ]
    for (n, heads, d, causal, seed, rows), case in cases.items():
        for g in ("out", "dq", "dk", "dv"):
            cells = "".join(f" {case[h][g]:.4e} |" if h in case else " - |" for h in headings)
            last = next((case[h] for h in reversed(headings) if h in case), None)
            base = case.get("cudnn")
            base_cell = f"{base[g]:.4e}" if base else "-"
            ratio = f"{last[g] / base[g]:.4f}" if last and base else "-"
            lines.append(
                f"| {_tokens(n)} | {heads} | {d} | {'yes' if causal else 'no'} | {seed} | {rows} | {g} |{cells} "
                f"{base_cell} | {ratio} |"
            )
    return "\n".join(lines)


def clock_probe_table(name: str) -> str:
    """Each part's time from programs run back to back for seconds (`bench/clock_probe.py`): the
    seconds per call of each program, the dq and dk/dv kernels' shares as in `backward_parts_table`,
    and in brackets each part's time per unit of work against the shortest length's (non-causal: work
    grows with the square of the length)."""
    spans = json.loads((RESULTS / name).read_text())["spans"]
    per_call = {(s["seq_len"], s["head_dim"], s["program"]): 1 / s["calls_per_second"] for s in spans}
    cases = sorted({(n, d) for n, d, _ in per_call})
    parts = {}
    for n, d in cases:
        t = lambda program: per_call[(n, d, program)]
        parts[n, d] = {
            "cuDNN fwd+bwd": t("cudnn_fwd_bwd"), "fwd": t("fwd"),
            "dq": t("fwd_bwd") - t("fwd_bwd_without_dq"), "dk/dv": t("fwd_bwd") - t("fwd_bwd_without_dkv"),
        }
    lines = [
        "| N | D | " + " | ".join(parts[cases[0]]) + " | SM MHz, W |",
        "| --- | --- |" + " --- |" * (len(parts[cases[0]]) + 1),
    ]
    for n, d in cases:
        shortest = min(m for m, e in cases if e == d)
        work = (n / shortest) ** 2
        cells = [
            f"{ms * 1e3:.1f} ms" + (f" ({ms / (work * parts[shortest, d][k]):.3f}x)" if n != shortest else "")
            for k, ms in parts[n, d].items()
        ]
        sampled = [s for s in spans if (s["seq_len"], s["head_dim"]) == (n, d) and "sm_mhz" in s]
        span = lambda key: f"{min(s[key] for s in sampled):.0f}-{max(s[key] for s in sampled):.0f}"
        clock = f"{span('sm_mhz')}, {span('watts')}" if sampled else "-"
        lines.append(f"| {_tokens(n)} | {d} | " + " | ".join(cells) + f" | {clock} |")
    return "\n".join(lines)


def backward_parts_table(name: str) -> str:
    """Milliseconds (and TFLOP/s of each part's own products) of the forward and each backward kernel,
    ours and cuDNN's (`bench/mosaic_backward_parts.py`)."""
    lines = [
        "| N | D | causal | block order | cuDNN fwd | cuDNN bwd | fwd | dq | dk/dv | fwd+bwd / cuDNN |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in _load_rows([name]):
        if "parts" not in r:
            continue
        cell = lambda part: f"{r['parts'][part]['ms']:.1f} ms ({r['parts'][part]['tflops']:.0f})"
        lines.append(
            f"| {_tokens(r['seq_len'])} | {r['head_dim']} | {'yes' if r['causal'] else 'no'} "
            f"| {r['block_order'].replace('_', ' ')} | {cell('cudnn_fwd')} | {cell('cudnn_bwd')} | {cell('fwd')} "
            f"| {cell('dq')} | {cell('dkv')} | {r['ratio_vs_cudnn']:.3f}x |"
        )
    return "\n".join(lines)


def decomposition_table(files: list[str]) -> str:
    """The same call as one subproblem and cut into subproblems (`num_chunks`), both on the device, with
    cuDNN in the same run; one row per case and pass."""
    fields = _KERNEL_FIELDS + ("dtype",)
    lines = [
        "| N | D | causal | pass | cuDNN s | one subproblem s | 31 subproblems s | 31 / one (time) "
        "| temp GiB: one / 31 | file |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name in files:
        ours, base = _ours_and_cudnn([name], fields, "mosaic_gpu")
        single = {tuple(r[f] for f in fields): r for r in ours if not r["num_chunks"]}
        for r in sorted((r for r in ours if r["num_chunks"]), key=lambda r: (r["head_dim"], not r["causal"])):
            key = tuple(r[f] for f in fields)
            one, c = single[key], base[key]
            lines.append(
                f"| {_tokens(r['seq_len'])} | {r['head_dim']} | {'yes' if r['causal'] else 'no'} "
                f"| {r['direction'].replace('_', '+')} | {c['seconds']:.4f} | {one['seconds']:.4f} "
                f"| {r['seconds']:.4f} | {r['seconds'] / one['seconds']:.2f}x "
                f"| {one['temp_bytes'] / 2**30:.2f} / {r['temp_bytes'] / 2**30:.2f} | `{name}` |"
            )
    return "\n".join(lines)


def _single_and_pairs(files: list[str], fields: tuple[str, ...], launch_field: str):
    """(file, case, row with single thread blocks, row with pairs, cuDNN seconds) per case of each file,
    the blocks per cluster read from `launch_field` of our rows; cases in order of N, D, causal first."""
    for name in files:
        ours, base = _ours_and_cudnn([name], fields, "mosaic_gpu")
        by_case = {}
        for r in ours:
            by_case.setdefault(tuple(r[f] for f in fields), {})[r[launch_field]] = r
        for key in sorted(by_case, key=lambda k: (k[0], k[1], not k[2])):
            yield name, key, by_case[key][1], by_case[key][2], base[key]["seconds"]


def _ratio_of(name: str) -> str:
    """cuDNN's time over ours, written as in the tables, of a results file with one row of ours."""
    (r,), base = _ours_and_cudnn([name], _MOSAIC_FIELDS, "mosaic_gpu")
    return f"{base[tuple(r[f] for f in _MOSAIC_FIELDS)]['seconds'] / r['seconds']:.3f}x"


def cluster_table(files: list[str]) -> str:
    """The forward with single thread blocks and with pairs (`Launch.cluster`), in turns with cuDNN."""
    lines = [
        "| N | D | causal | cuDNN s | single s | pairs s | single / cuDNN | pairs / cuDNN | default | file |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, key, single, pairs, c in _single_and_pairs(files, _MOSAIC_FIELDS, "cluster"):
        lines.append(
            f"| {_tokens(key[0])} | {key[1]} | {'yes' if key[2] else 'no'} | {c:.4f} | {single['seconds']:.4f} "
            f"| {pairs['seconds']:.4f} | {c / single['seconds']:.3f}x | {c / pairs['seconds']:.3f}x "
            f"| {'pairs' if _default_clusters(single)[0] == 2 else 'single'} | `{name}` |"
        )
    return "\n".join(lines)


def backward_cluster_table(files: list[str], launch_field: str = "dq_cluster") -> str:
    """Forward plus backward with one backward kernel's single thread blocks and with pairs (`launch_field`:
    `Launch.dq_cluster` or `Launch.dkv_cluster`), the rest of the launch the same, in turns with cuDNN."""
    kernel = {"dq_cluster": "dq", "dkv_cluster": "dk/dv"}[launch_field]
    lines = [
        f"| N | D | causal | forward blocks | cuDNN s | {kernel} single s | {kernel} pairs s | single / cuDNN "
        "| pairs / cuDNN | file |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, key, single, pairs, c in _single_and_pairs(files, _KERNEL_FIELDS, launch_field):
        lines.append(
            f"| {_tokens(key[0])} | {key[1]} | {'yes' if key[2] else 'no'} "
            f"| {'pairs' if _forward_cluster(single) == 2 else 'single'} | {c:.4f} | {single['seconds']:.4f} "
            f"| {pairs['seconds']:.4f} | {c / single['seconds']:.3f}x | {c / pairs['seconds']:.3f}x | `{name}` |"
        )
    return "\n".join(lines)


def wave_table(name: str) -> str:
    """The forward at lengths whose thread blocks fill the last wave over the SMs or leave it nearly
    empty (`SMS`; `mosaic_gpu.BLOCK_ROWS` query rows per thread block), in turns with cuDNN."""
    from stream_cqsa_jax._src.kernels.mosaic_gpu import BLOCK_ROWS

    ours, base = _ours_and_cudnn([name], _MOSAIC_FIELDS, "mosaic_gpu")
    lines = [
        "| N | D | thread blocks | waves of 132 | cuDNN s | ours s | ours / cuDNN throughput |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in sorted(ours, key=lambda r: (r["head_dim"], r["seq_len"])):
        c = base[tuple(r[f] for f in _MOSAIC_FIELDS)]["seconds"]
        blocks = r["batch"] * r["heads"] * r["seq_len"] // BLOCK_ROWS
        lines.append(
            f"| {r['seq_len']} | {r['head_dim']} | {blocks} | {blocks / SMS:.2f} | {c:.4f} | {r['seconds']:.4f} "
            f"| {c / r['seconds']:.3f}x |"
        )
    return "\n".join(lines)


def forward_launch_table(name: str) -> str:
    """The forward of each case under each launch of the run, in turns with cuDNN; "overlap" marks rows of
    the removed within-warpgroup overlap (docs/hopper_kernel.md)."""
    ours, base = _ours_and_cudnn([name], _MOSAIC_FIELDS, "mosaic_gpu")
    lines = [
        "| N | D | causal | launch | cuDNN s | ours s | ours / cuDNN throughput |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in sorted(ours, key=lambda r: (r["head_dim"], r["seq_len"], not r["causal"])):
        c = base[tuple(r[f] for f in _MOSAIC_FIELDS)]["seconds"]
        launch = f"{r['block_kv']} keys, {r['stages']} stages" + (", pairs" if r["cluster"] == 2 else "")
        launch += ", overlap" if r.get("overlap") else ""
        launch += _options_label(r)
        launch += ", p through shared memory" if r.get("p_through_smem") else ""  # removed options' rows
        launch += ", query in registers" if r.get("q_in_registers") else ""
        lines.append(
            f"| {_tokens(r['seq_len'])} | {r['head_dim']} | {'yes' if r['causal'] else 'no'} | {launch} | {c:.4f} "
            f"| {r['seconds']:.4f} | {c / r['seconds']:.3f}x |"
        )
    return "\n".join(lines)


def card(name: str) -> str:
    """The GPU that made the results file `name`."""
    return json.loads((RESULTS / name).read_text())["meta"]["device"]


def ncu_table(name: str) -> str:
    """Hardware counters of each attention kernel (`bench/ncu_metrics.py`)."""
    lines = [
        "| N | D | causal | implementation | grid | seconds | DRAM read TB | DRAM % of peak | L2 hit % "
        "| L2 read TB | SM clock MHz |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in _load_rows([name]):
        for k in r.get("kernels", []):
            m = k["metrics"]
            lines.append(
                f"| {_tokens(r['seq_len'])} | {r['head_dim']} | {'yes' if r['causal'] else 'no'} "
                f"| {r['implementation']} | {k['grid']} | {m['gpu__time_duration.sum'] / 1e9:.4f} "
                f"| {m['dram__bytes_read.sum'] / 1e12:.3f} "
                f"| {m['dram__throughput.avg.pct_of_peak_sustained_elapsed']:.1f} "
                f"| {m['lts__t_sector_hit_rate.pct']:.1f} | {m['lts__t_sectors_op_read.sum'] * 32 / 1e12:.2f} "
                f"| {m['sm__cycles_elapsed.avg.per_second'] / 1e6:.0f} |"
            )
    return "\n".join(lines)


# Tensor-core products per score of each Hopper kernel: the forward's two, dk/dv's four, dq's three.
_PRODUCTS = {"forward": 2, "dk/dv": 4, "dq": 3}


def _backward_kernel_names(kernels: list[dict]) -> list[str]:
    """Our three kernels of forward plus backward, which share one name in ncu's report, told apart: the
    forward runs first, and of the two after it the dq kernel holds more shared memory."""
    if len(kernels) != 3:
        raise ValueError(f"expected the forward, dk/dv and dq kernels, got {len(kernels)} kernels")
    smem = [k["metrics"]["launch__shared_mem_per_block_dynamic"] for k in kernels[1:]]
    return ["forward", *(("dk/dv", "dq") if smem[0] < smem[1] else ("dq", "dk/dv"))]


def ncu_backward_table(name: str) -> str:
    """Each of our kernels' counters in forward plus backward (`bench/ncu_metrics.py --direction fwd_bwd` with
    ``dram__bytes_write.sum`` and ``lts__t_sectors_op_red.sum``), with the SM cycles each takes per product,
    scaled to 64K x 64K scores: the same figure at two lengths means the same work per cycle."""
    lines = [
        "| N | D | kernel | seconds | SM clock MHz | M cycles per product (64K scale) | DRAM read GB "
        "| DRAM write GB | L2 hit % | L2 reduce GB |",
        "| --- " * 10 + "|",
    ]
    for r in _load_rows([name]):
        for kernel, k in zip(_backward_kernel_names(r["kernels"]), r["kernels"]):
            m = k["metrics"]
            seconds, clock = m["gpu__time_duration.sum"] / 1e9, m["sm__cycles_elapsed.avg.per_second"]
            scale = (r["seq_len"] / 65536) ** 2
            lines.append(
                f"| {_tokens(r['seq_len'])} | {r['head_dim']} | {kernel} | {seconds:.4f} | {clock / 1e6:.0f} "
                f"| {seconds * clock / _PRODUCTS[kernel] / scale / 1e6:.2f} | {m['dram__bytes_read.sum'] / 1e9:.1f} "
                f"| {m['dram__bytes_write.sum'] / 1e9:.1f} | {m['lts__t_sector_hit_rate.pct']:.1f} "
                f"| {m['lts__t_sectors_op_red.sum'] * 32 / 1e9:.1f} |"
            )
    return "\n".join(lines)


_STALLS = ("long_scoreboard", "wait", "barrier", "dispatch_stall", "not_selected", "short_scoreboard")


def ncu_issue_table(name: str) -> str:
    """Where each kernel's cycles go (`bench/ncu_metrics.py --extra-metrics`): the share of cycles the tensor
    pipe is busy, the share in which a warp scheduler issues, and the warps stalled per issued instruction,
    by reason. Cases that ncu did not finish are left out."""
    lines = [
        "| N | D | implementation | seconds | SM clock MHz | tensor pipe busy % | issuing % | "
        + " | ".join(f"stalled: {reason.replace('_', ' ')}" for reason in _STALLS) + " |",
        "| --- " * (7 + len(_STALLS)) + "|",
    ]
    for r in _load_rows([name]):
        for k in r.get("kernels", []):
            m = k["metrics"]
            stalls = (m[f"smsp__average_warps_issue_stalled_{reason}_per_issue_active.ratio"] for reason in _STALLS)
            lines.append(
                f"| {_tokens(r['seq_len'])} | {r['head_dim']} | {r['implementation']} "
                f"| {m['gpu__time_duration.sum'] / 1e9:.4f} | {m['sm__cycles_elapsed.avg.per_second'] / 1e6:.0f} "
                f"| {m['sm__pipe_tensor_cycles_active.avg.pct_of_peak_sustained_active']:.1f} "
                f"| {m['smsp__issue_active.avg.pct_of_peak_sustained_active']:.1f} | "
                + " | ".join(f"{x:.2f}" for x in stalls) + " |"
            )
    return "\n".join(lines)


def tile_order_table(name: str) -> str:
    """The causal forward with query tiles in order and heaviest first (`Launch.heavy_first`)."""
    ours, base = _ours_and_cudnn([name], _MOSAIC_FIELDS, "mosaic_gpu")
    by_order = {(r["seq_len"], r["head_dim"], r["heavy_first"]): r for r in ours}
    lines = [
        "| N | D | cuDNN s | in order s | heaviest first s | ours / cuDNN throughput, in order | heaviest first |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for n, d in sorted({(r["seq_len"], r["head_dim"]) for r in ours}):
        plain, heavy = by_order[n, d, False], by_order[n, d, True]
        c = base[tuple(plain[f] for f in _MOSAIC_FIELDS)]["seconds"]
        lines.append(
            f"| {_tokens(n)} | {d} | {c:.4f} | {plain['seconds']:.4f} | {heavy['seconds']:.4f} "
            f"| {c / plain['seconds']:.2f}x | {c / heavy['seconds']:.2f}x |"
        )
    return "\n".join(lines)


def shapes_table(files: list[str]) -> str:
    """The forward without a causal mask at other shapes, in turns with cuDNN (`bench/forward_shapes.py`)."""
    lines = [
        "| N | heads | batch | D | K and V GiB each | block order | blocks | cuDNN s | ours s "
        "| ours / cuDNN throughput | file |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name in files:
        ours, base = _ours_and_cudnn([name], _MOSAIC_FIELDS + ("batch", "heads"), "mosaic_gpu")
        for r in ours:
            c = base[tuple(r[f] for f in _MOSAIC_FIELDS + ("batch", "heads"))]
            gib = r["seq_len"] * r["heads"] * r["batch"] * r["head_dim"] * 2 / 2**30
            lines.append(
                f"| {_tokens(r['seq_len'])} | {r['heads']} | {r['batch']} | {r['head_dim']} | {gib:g} "
                f"| {r.get('block_order', 'heads first').replace('_', ' ')} "
                f"| {'pairs' if r.get('cluster', 1) == 2 else 'single'} | {c['seconds']:.4f} "
                f"| {r['seconds']:.4f} | {c['seconds'] / r['seconds']:.3f}x | `{name}` |"
            )
    return "\n".join(lines)


def mosaic_chart(files: list[str], path) -> None:
    """One group per (dtype, head dim, causal), the latest run of each case."""
    runs = _latest_mosaic_runs(files).values()
    _ratio_chart(
        [r for r, _, _ in runs], {tuple(r[f] for f in _MOSAIC_FIELDS): c for r, c, _ in runs}, _MOSAIC_FIELDS,
        order=lambda r: (r["dtype"], r["head_dim"], not r["causal"], r["seq_len"]),
        label=lambda r: (
            f"{'BF16' if r['dtype'] == 'bfloat16' else 'F16'} D{r['head_dim']} {'C' if r['causal'] else 'NC'}"
        ),
        path=path, lines=[0.95, 1.0],
    )


def scaling_table(files: list[str]) -> str:
    lines = [
        "| N | pass | GPUs | subproblems | seconds | speedup | rel. difference vs 1 GPU |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in _load_rows(files):
        lines.append(
            f"| {_tokens(r['tokens'])} | {'fwd+bwd' if r['grad'] else 'fwd'} | {r['devices']} | {r['subproblems']} "
            f"| {r['seconds']:.2f} | {r['speedup']:.2f}x | {r['rel_diff_vs_first_count']:.1e} |"
        )
    return "\n".join(lines)


def scaling_chart(files: list[str], path) -> None:
    """Bars of speedup over one GPU, one group per (N, pass), one bar per GPU count."""
    from plot import bar_chart

    groups = {}
    for r in _load_rows(files):
        label = f"{_tokens(r['tokens'])} {'F+B' if r['grad'] else 'FWD'}"
        groups.setdefault(label, []).append((f"{r['devices']}G", r["speedup"]))
    bar_chart(str(path), list(groups.items()), lines=[1.0, 1.8, 2.0], top=2.2)


def generated_mosaic() -> str:
    return "\n\n".join(
        [
            MOSAIC_BEGIN,
            "### Forward speed: one subproblem, all data on the device (B=1, 8 heads)",
            "Each row is the latest run of its case, with cuDNN timed in the same run (2 timed runs after a "
            "warm-up, median; 5 in `mosaic_f16_64k_d128_repeat.json`; in turns with cuDNN, `--interleave`, "
            "6, 4 and 3 rounds in `mosaic_fwd_256k_d64_nc_interleaved.json`, `mosaic_fwd_1m_d64_nc_interleaved.json` "
            "and `mosaic_block_order_1m.json`; 3 and 2 rounds in the `cluster_*.json` runs, 1 in "
            "`mosaic_fwd_1m_d64_nc_default.json`; 5 in `fwd_values_first_d64.json` and `fwd_values_first_d128.json`, "
            "7 in `fwd_values_first_d128_nc.json`, 3 in the 1M `fwd_values_first_*.json` runs). \"query tiles\": "
            "heaviest first "
            "(`Launch.heavy_first`, the default) or in order (runs made before it was the default; without a "
            "causal mask the order changes nothing). \"blocks\": single thread blocks or pairs "
            "(`Launch.cluster`), then the forward's options: \"values first\" (removed since), \"scores first\" and "
            "\"turns at a hardware barrier\"; of a run with several launches, the one the default picks today, "
            "else the one it picked before scores first (no H200 run has timed today's head dim 128 default yet; "
            "its H100 runs are further down). At 64K the single blocks "
            "ran slower in the `cluster_64k_256k.json` run than in the runs before it (head dim 128 without a "
            "mask: 0.0316 s against 0.0273 s in `mosaic_fwd_bf16_heavy_64k_256k.json`, cuDNN 0.0283 s against "
            "0.0275 s) with the same program (`bench/kernel_programs.py` gives the same text for both versions of "
            "the code), a spread between runs we have not explained.",
            mosaic_table(MOSAIC_FILES),
            f"![Mosaic / cuDNN forward throughput]({MOSAIC_CHART.name})",
            "The chart: Mosaic / cuDNN forward throughput per group of dtype (BF16, F16), head dim (D64, D128) "
            "and causal (C) or not (NC); one bar per length; grey lines at 0.95x (the target) and 1.0x.",
            "### Query tile order: causal forward, heaviest query tiles first (the default) or in order",
            "File: `mosaic_tile_order.json` (bfloat16, 2 timed runs after a warm-up, median).",
            tile_order_table("mosaic_tile_order.json"),
            "### Forward without a causal mask at other shapes: what the 1M head dim 64 gap follows",
            "Files: `mosaic_fwd_footprint_d64_nc.json`, `mosaic_block_order_1m.json` (`bench/forward_shapes.py`, "
            "bfloat16, 3 rounds in turns with cuDNN after a warm-up, median). The first three rows do the same "
            "FLOPs. \"block order\": the outermost axis of the kernels' grid, heads (the kernels' own: the "
            "thread blocks running at once are query tiles of one head) or tiles (they cover every head); "
            "see `bench/mosaic_backward_parts.py`.",
            shapes_table(["mosaic_fwd_footprint_d64_nc.json", "mosaic_block_order_1m.json"]),
            "### Hardware counters of the forward without a mask, head dim 64",
            "File: `ncu_fwd_d64_nc.json` (`bench/ncu_metrics.py`: Nsight Compute 2025.3.1 on one run after a "
            "warm-up, the clocks left to the card; B=1, 8 heads, bfloat16; single thread blocks, the default "
            "then). \"L2 read TB\": sectors read from L2 times 32 bytes. cuDNN's kernel is persistent (132 "
            "thread blocks, one per multiprocessor); ours runs a thread block per 128 query rows and head.",
            ncu_table("ncu_fwd_d64_nc.json"),
            "### Thread blocks in pairs: the forward with single blocks and with pairs (`Launch.cluster`)",
            "Files: as named (bfloat16, B=1, 8 heads, in turns with cuDNN after a warm-up, median of 3 rounds "
            "in `cluster_64k_256k.json`, 2 in the others). \"default\": what `mosaic_gpu.default_launch` picks "
            "for the case. A second run of single blocks alone at 1M, head dim 64, without a mask (2 rounds, "
            f"`{CLUSTER_SINGLE_AGAIN}`) gave {_ratio_of(CLUSTER_SINGLE_AGAIN)} cuDNN.",
            cluster_table(CLUSTER_FILES),
            "### Forward plus backward: one subproblem, all data on the device (B=1, 8 heads, bfloat16)",
            "Each row is the latest run of its case (file named), with cuDNN timed in the same run: 2 or 3 "
            "timed runs after a warm-up (median; 3 in `mosaic_bwd_16k_256k.json`) up to 256K, 1 at 1M (in turns "
            "with cuDNN, `--interleave`: 2 rounds in `mosaic_bwd_1m_d*_nc_interleaved.json` and "
            "`mosaic_bwd_1m_d128_nc_flush_default.json`, 3 in `mosaic_bwd_d128_flush_default.json`). Mosaic: "
            "the Hopper forward and backward with its default launch when the run was made (paired dk/dv "
            "products at head dim 64 from `mosaic_bwd_paired_d64.json` on; 128-key dq tiles with segments in "
            "memory at head dim 128 from `mosaic_bwd_d128_flush_default.json` on; thread blocks in pairs as the "
            "defaults pick them from the `cluster_bwd_*.json` runs on, in turns with cuDNN, 5 rounds at 64K, 3 "
            "at 256K, 1 at 1M, only their rows that ran today's defaults, or for the forward's options the defaults "
            "before scores first; with values first at head dim 128 without a mask from "
            "`bwd_values_first_d128_nc.json` on, 5 rounds); nondeterministic: the same "
            "with `deterministic_backward=False` (`mosaic_bwd_1m_d64_nondeterministic.json`; at 64K and 256K see the fused dq table below); "
            "portable: the Triton kernels (`pallas_triton`), from their latest run (`pallas_triton_bwd_*.json`), "
            "next to cuDNN in that run.",
            mosaic_backward_table(MOSAIC_BACKWARD_FILES),
            "### Backward launches: forward plus backward without a causal mask",
            "File: `mosaic_bwd_sweep_nc.json` (bfloat16, 2 timed runs after a warm-up, median; cuDNN in the same "
            "run). \"paired\": `Launch.dkv_paired`.",
            backward_launch_table("mosaic_bwd_sweep_nc.json"),
            "### Fused dq: forward plus backward, dq added up by the dk/dv kernel",
            "File: `mosaic_bwd_fused.json` (bfloat16, 2 timed runs after a warm-up, median; cuDNN in the same "
            "run). \"fused\": `Launch.fused_dq`, which `deterministic_backward=False` picks at head dim 64; "
            "\"fused, split\": a variant for head dim 128 in which each warpgroup added half of dq's columns "
            "for both (not kept: no faster than the two kernels).",
            backward_launch_table("mosaic_bwd_fused.json"),
            "### Where forward plus backward spends its time",
            "Files: `mosaic_backward_parts.json`, `mosaic_block_order.json` (bfloat16, without a causal mask, "
            "`bench/mosaic_backward_parts.py`: 3 and 2 timed runs after a warm-up, median; cuDNN in the same run; "
            "the launches before dq segments). Each cell: milliseconds, then in brackets TFLOP/s of the part's "
            "own products (forward 2 per score, dq 3, dk/dv 4, cuDNN's backward 5). \"block order\": the "
            "outermost axis of the grid, heads (the kernels' own: the blocks running at once are query tiles of "
            "one head) or tiles (they cover every head).",
            backward_parts_table("mosaic_backward_parts.json"),
            backward_parts_table("mosaic_block_order.json"),
            "File: `clock_probe_d128.json` (an H200; no mask, bfloat16, B=1, 8 heads; `bench/clock_probe.py`): each "
            "program ran back to back for 5 s after a warm-up while `nvidia-smi` sampled the SM clock and the power "
            "every 50 ms (the samples stop after the first four programs at 64K). The parts come from the calls per "
            "second as above; in brackets, the part's time per unit of work at 256K against 64K. At the card's power "
            "cap throughout at 64K, the dq kernel still takes 10% longer per unit of work at 256K, and no other part "
            "does. Counted in cycles it does not (Nsight Compute, \"each kernel's counters in forward plus backward\" "
            "below, on an H100): every kernel does the same work per cycle at both lengths, and the dq kernel runs at "
            "the lowest clock at 256K.",
            clock_probe_table("clock_probe_d128.json"),
            "### The dq kernel's thread blocks in pairs: forward plus backward (`Launch.dq_cluster`)",
            "Files: as named (bfloat16, B=1, 8 heads, in turns with cuDNN after a warm-up, median of 5 rounds at "
            "64K, 3 at 256K, 1 at 1M). Each case ran one forward launch (\"forward blocks\") and the default "
            "backward launch of its head dim with the dq kernel's blocks single or in pairs. At 256K, head dim "
            "64, without a mask, the forward ran in pairs, which the default does not pick there.",
            backward_cluster_table(DQ_CLUSTER_FILES),
            "### On an H100: the dk/dv kernel's thread blocks in pairs, the forward at 64K and at 512K x 2",
            f"Card: {card(H100_FILES[0])} (80 GB at a lower memory bandwidth than the H200's; every other table "
            "here is the H200's), bfloat16, in turns with cuDNN after a warm-up. First, forward plus backward "
            "with the dk/dv kernel's blocks single or in pairs (`Launch.dkv_cluster`), the rest of each head "
            "dim's default launch the same (median of 3 rounds; 1 at 1M). Then the forward at 64K without a "
            "mask (median of 7 rounds), and at 512K tokens of 8 heads in a batch of two, single or in pairs "
            "(`bench/forward_shapes.py --clusters`, median of 3 rounds).",
            backward_cluster_table(H100_FILES[:3], "dkv_cluster"),
            cluster_table([H100_FILES[3]]),
            shapes_table([H100_FILES[4]]),
            "### On an H100: the backward's warpgroups taking turns on the tensor cores",
            f"Card: {card(H100_TURNS_FILES[0])}, bfloat16, forward plus backward in turns with cuDNN after a "
            "warm-up, median of 5 rounds (1 at 1M). Each case ran its head dim's default launch of the time "
            "without turns, with the dq kernel's (`Launch.dq_turns`), and in the first and last tables with the "
            "dk/dv kernel's too (a launch option, `dkv_turns`, removed since as slower everywhere). Head dim 128 "
            "also ran paired dk/dv products, which turns in the dk/dv kernel needed. The dq kernel's turns are "
            "the head dim 64 default since these runs; at 128 they lost 6-8%. At 64K, head dim 128, cuDNN's "
            "rounds spread over 0.106-0.126 s, so the paired products' 0.949x there is within that run's noise "
            "(at 256K: the same as unpaired).",
            *(backward_launch_table(name) for name in H100_TURNS_FILES),
            "### On an H100: the dq kernel's pairs at 1M, head dim 128, without a mask",
            f"File: `{H100_DQ_CLUSTER_1M}` (forward plus backward, one round in turns with cuDNN after a warm-up).",
            backward_cluster_table([H100_DQ_CLUSTER_1M]),
            "### On an H100: the forward at 64K with a full last wave",
            f"File: `{H100_WAVES}` (bfloat16, B=1, 8 heads, no mask, default launches, median of 9 rounds in "
            "turns with cuDNN after a warm-up). 64K tokens give 4096 thread blocks of 128 query rows: 31 full "
            "waves over 132 SMs and a last wave of 4 blocks. 67584 tokens give exactly 32 waves, and ran no "
            "closer to cuDNN: the nearly empty last wave is not the gap at 64K.",
            wave_table(H100_WAVES),
            "### On an H100: the softmax under the previous tile's p v, and three stages at head dim 128",
            f"Files: `{H100_FORWARD_LAUNCH_FILES[0]}` (median of 7 rounds), `{H100_FORWARD_LAUNCH_FILES[1]}` "
            f"and `{H100_FORWARD_LAUNCH_FILES[2]}` (5 rounds); bfloat16, B=1, 8 heads, in turns with cuDNN after "
            "a warm-up. \"overlap\": each compute warpgroup issued a tile's scores and the previous tile's p v "
            "together and computed the softmax while p v ran (a launch option, `overlap`, removed since: ptxas "
            "serialized the kernel's tensor-core instructions, docs/hopper_kernel.md). The third table ran with "
            "the two compute warpgroups' turns on the tensor cores switched off (a patched build: the commands "
            "at the top say how), both launches.",
            *(forward_launch_table(name) for name in H100_FORWARD_LAUNCH_FILES),
            "### The forward with values first (`Launch.values_first`)",
            "Files: as named in each table's order: `" + "`, `".join(VALUES_FIRST_FILES) + "` (an H200; 5, 5, 7, "
            "3, 3 and 3 rounds), then `" + "` and `".join(H100_VALUES_FIRST_FILES) + "` (an H100, 5 rounds); "
            "bfloat16, B=1, 8 heads, in turns with cuDNN after a warm-up, median. \"values first\": over the key "
            "tiles no mask cuts, each step issues the previous tile's p v and then its own scores, and waits "
            "once for both. The default at head dim 128 without a mask from these runs until scores first (below); "
            "removed since (`Launch.values_first`, at commit e8b045b).",
            *(forward_launch_table(name) for name in [*VALUES_FIRST_FILES, *H100_VALUES_FIRST_FILES]),
            "### On an H100: the query tile in registers",
            "Files: `" + "` and `".join(H100_Q_REGISTERS_FILES) + "` (an H100; 64K, no mask, bfloat16, B=1, 8 heads, 5 "
            "rounds in turns with cuDNN after a warm-up, median). \"query in registers\": each compute warpgroup "
            "loaded its query tile into registers once and the scores took it from there instead of from shared "
            "memory (a launch option, `q_in_registers`, at commit 2755e21, removed since as slower). ptxas's "
            "report of the same launches at 8K is in `h100_fwd_qregs_8k_d128_ptxas.log` and "
            "`h100_fwd_qregs_8k_d64_ptxas.log`: "
            "the forward spills 352 bytes with it at head dim 128 (with values first), 12 at 64, none without.",
            *(forward_launch_table(name) for name in H100_Q_REGISTERS_FILES),
            "### On an H100: where the forward's cycles go, head dim 128 without a mask",
            f"File: `{H100_NCU_STALLS}` (Nsight Compute around `bench/profile_case.py`, one run of each kernel after "
            "a warm-up, clocks left to the card; bfloat16, B=1, 8 heads; default launches). \"tensor pipe busy\": "
            "`sm__pipe_tensor_cycles_active`, as a share of the active cycles; \"issuing\": "
            "`smsp__issue_active`; the stalls are `smsp__average_warps_issue_stalled_*_per_issue_active` (warps "
            "waiting, per instruction issued). ncu did not finish cuDNN's 64K case within its time limit.",
            ncu_issue_table(H100_NCU_STALLS),
            "### On an H100: scores first and turns at a hardware barrier",
            "Files: `" + "`, `".join(H100_FORWARD_TURNS_FILES) + "` (an H100; bfloat16, B=1, 8 heads, 5 rounds "
            "in turns with cuDNN after a warm-up, median). \"scores first\": over the key tiles no mask cuts, each step "
            "issues its scores and then the previous tile's p v, and computes its probabilities while p v runs "
            "(`Launch.scores_first`); \"turns at a hardware barrier\": the compute warpgroups take turns at "
            "`bar.sync` (`Launch.named_turns`); \"p through shared memory\": p v read p from shared memory (a "
            "launch option, `p_through_smem`, at commit e8b045b, removed since as slower, as was values first). "
            "Scores first with turns at a hardware barrier is the default at head dim 128 since these runs; the "
            "last file times it against both options off at 64K and 256K, causal and not, in one later run. "
            "ptxas's report of the first run is in `h100_fwd_turns_64k_d128_ptxas.log`: no launch has its "
            "tensor-core instructions serialized (C7513), and only p through shared memory spills (24 bytes).",
            *(forward_launch_table(name) for name in H100_FORWARD_TURNS_FILES),
            "### On an H100: the dq kernel in passes over windows of keys, and in 32-tile segments",
            "Files: `" + "` and `".join(H100_DQ_PASSES_FILES) + "` (an H100; 256K, no mask, bfloat16, B=1, 8 heads, "
            "3 rounds in turns with cuDNN after a warm-up, median; each of our programs' three rounds lay within 0.3% "
            "of one another, cuDNN's within 0.9%). The first row of each case is its head dim's default launch. "
            "\"passes of 64K keys\": the dq kernel runs once per 64K-key window of the key array, each launch "
            "adding onto dq (`Launch.dq_pass_keys`); \"32-tile segments\": dq's running sum goes to device memory "
            "every 4096 keys instead of every 1024. Neither is a default: passes gained 0.5% at head dim 128 and "
            "lost 0.6% at 64 (docs/hopper_kernel.md).",
            *(backward_launch_table(name) for name in H100_DQ_PASSES_FILES),
            "### On an H100: today's defaults",
            f"Files: `{H100_DEFAULTS_FORWARD}` (forward, 5 rounds), then `"
            + "` and `".join(H100_DEFAULTS_BACKWARD_FILES) + "` (forward plus backward, 3 rounds); one H100 in one "
            "session, bfloat16, B=1, 8 heads, in turns with cuDNN after a warm-up, median. Each case's first "
            "backward row is its head dim's default launch; the second row at head dim 128 adds the dq kernel's "
            "turns at a hardware barrier (`Launch.dq_turns` with `dq_named_turns`), which are not a default.",
            forward_launch_table(H100_DEFAULTS_FORWARD),
            *(backward_launch_table(name) for name in H100_DEFAULTS_BACKWARD_FILES),
            "### On an H100: each kernel's counters in forward plus backward, head dim 128 without a mask",
            f"File: `{H100_NCU_BACKWARD}` (Nsight Compute around `bench/profile_case.py`, one run after a warm-up, "
            "clocks left to the card; bfloat16, B=1, 8 heads; default launches). \"M cycles per product\": the "
            "kernel's seconds times its SM clock, per tensor-core product per score (forward 2, dk/dv 4, dq 3), "
            "scaled to 64K x 64K scores. \"L2 reduce\": `lts__t_sectors_op_red` in 32-byte sectors, the dq "
            "kernel's additions of its running sums into dq in device memory.",
            ncu_backward_table(H100_NCU_BACKWARD),
            "### Forward plus backward: dk's ds from shared memory, and 64-key dq tiles",
            "Files: `" + "` and `".join(H100_DK_FROM_SMEM_FILES) + "` (an H100), then `" + "` and `".join(DQ_TILE_FILES)
            + "` (an H200); 64K, no mask, bfloat16, B=1, 8 heads, 5 rounds in turns with cuDNN after a warm-up, "
            "median. \"dk's ds from shared memory\": a launch option (`dk_from_smem`) removed since as slower. "
            "ptxas's report of each run is in the log of the same name with `_ptxas.log` (read it with "
            "`bench/ptxas_report.py`).",
            *(backward_launch_table(name) for name in [*H100_DK_FROM_SMEM_FILES, *DQ_TILE_FILES]),
            "### dq in segments: forward plus backward with and without `Launch.dq_segment`",
            "Files: `mosaic_bwd_dq_segments_256k_d128.json`, `mosaic_bwd_dq_segments_256k_d64.json`, "
            "`mosaic_bwd_dq128_segments_256k_d128.json` (bfloat16, 2 timed runs after a warm-up, median; cuDNN in "
            "the same run). The rows with 16-tile segments at head dim 128 and 8-tile segments at 64 were the "
            "default launches then; 128-key dq tiles with segments in registers at head dim 128 (third table) "
            "were slower.",
            backward_launch_table("mosaic_bwd_dq_segments_256k_d128.json"),
            backward_launch_table("mosaic_bwd_dq_segments_256k_d64.json"),
            backward_launch_table("mosaic_bwd_dq128_segments_256k_d128.json"),
            "### dq and dk/dv in segments at head dim 128, in turns",
            "File: `mosaic_bwd_segments_256k_d128_interleaved.json` (bfloat16, 2 rounds in turns with cuDNN after "
            "a warm-up, median). The first row of each case was the default launch then; \"dk/dv N-step segments\": "
            "dk and dv moved into device memory every N steps (a launch option since removed as too slow; "
            "docs/hopper_kernel.md).",
            backward_launch_table("mosaic_bwd_segments_256k_d128_interleaved.json"),
            "### 128-key dq tiles with segments in memory, the head dim 128 default, at 64K",
            "File: `mosaic_bwd_64k_d128_flush_ab.json` (bfloat16, 5 rounds in turns with cuDNN after a warm-up, "
            "median): the default before (64-key dq tiles, 16-tile segments in registers) and now.",
            backward_launch_table("mosaic_bwd_64k_d128_flush_ab.json"),
            "### What the decomposition costs: the same call cut into 31 subproblems, all on the device",
            "Files: `mosaic_decomposed.json` (forward, bfloat16, 2 timed runs after a warm-up, median), "
            "`mosaic_decomposed_bwd_d64.json` and `mosaic_decomposed_bwd_d128.json` (forward plus backward with "
            "the default launches, 2 rounds in turns with cuDNN after a warm-up, median). \"temp GiB\": XLA's "
            "temporary buffers of the compiled program.",
            decomposition_table(
                ["mosaic_decomposed.json", "mosaic_decomposed_bwd_d64.json", "mosaic_decomposed_bwd_d128.json"]
            ),
            "### Accuracy on the device: relative error vs float64 (bfloat16 inputs, 8 heads)",
            "Files: `accuracy_8k_mosaic.json` (every row) and the outputs of the 1M gradient runs below "
            "(`accuracy_1m_grads_d64.json`, `accuracy_1m_grads_d128.json`: 256 rows; an earlier causal head dim "
            "64 run, `accuracy_1m_mosaic.json`, gave the same errors).",
            accuracy_table(
                ["accuracy_8k_mosaic.json", "accuracy_1m_grads_d64.json", "accuracy_1m_grads_d128.json"],
                ours="mosaic_gpu",
            ),
            "### Gradient accuracy on the device: relative error vs float64 (bfloat16 inputs, 8 heads)",
            "Files: `accuracy_8k_grads_d64.json`, `accuracy_8k_grads_d128.json` (every row; gradients for a random "
            "bfloat16 cotangent, `bench/check_accuracy.py --grads`), `accuracy_1m_grads_d64.json`, "
            "`accuracy_1m_grads_d128.json` (256 evenly spaced rows; the cotangent is zero on the other rows, so "
            "every row of dk and dv is checked; at head dim 128 only the causal case finished in its run).",
            grad_accuracy_table(MOSAIC_GRAD_ACCURACY_FILES, variants=("mosaic_gpu:nondeterministic",)),
            "### dq in segments: gradient accuracy at 1M tokens, head dim 128",
            "Files: `accuracy_1m_grads_d128_nc.json` and `accuracy_1m_grads_d128.json` (dq summed over all keys "
            "in the tensor cores' accumulator, and cuDNN), `accuracy_1m_grads_d128_nc_segments.json` and "
            "`accuracy_1m_grads_d128_causal_segments.json` (`Launch.dq_segment`, 1024-key segments of 64-key "
            "tiles, the default until `Launch.dq_flush`), `accuracy_1m_grads_d128_causal_dkv_segments.json` (the same, and dk, dv "
            "moved into device memory every 16 steps) and `accuracy_1m_grads_d128_causal_dq128_flush.json` "
            "(1024-key segments of 128-key tiles, added up in device memory, `Launch.dq_flush`); all on the "
            "same inputs. 256 evenly spaced rows, as above. The rows above were measured before dq segments. "
            "\"rightmost / cuDNN\": the error of the rightmost launch that ran the case, over cuDNN's.",
            launch_error_table(
                [
                    ("accuracy_1m_grads_d128_nc.json", "dq summed in the tensor cores"),
                    ("accuracy_1m_grads_d128_nc_segments.json", "dq in segments"),
                    ("accuracy_1m_grads_d128.json", "dq summed in the tensor cores"),
                    ("accuracy_1m_grads_d128_causal_segments.json", "dq in segments"),
                    ("accuracy_1m_grads_d128_causal_dkv_segments.json", "and dk/dv in 16-step segments"),
                    ("accuracy_1m_grads_d128_causal_dq128_flush.json", "128-key dq tiles, segments in memory"),
                ]
            ),
            "The same check on two more seeds (`accuracy_1m_grads_d128_causal_seeds12.json`, 64-key dq tiles, "
            "the head dim 128 default when it ran); seed 0 is the run above.",
            launch_error_table(
                [
                    ("accuracy_1m_grads_d128_causal_segments.json", "64-key dq tiles"),
                    ("accuracy_1m_grads_d128_causal_seeds12.json", "64-key dq tiles"),
                    ("accuracy_1m_grads_d128_causal_dq128_flush.json", "128-key dq tiles, in memory"),
                ]
            ),
            "### Every row: gradient accuracy against a float64 reference on the device, head dim 128",
            "Files: `accuracy_64k_every_row_d128_causal.json`, `accuracy_64k_every_row_d128_causal_flush.json`, "
            "`accuracy_256k_every_row_d128_causal.json`, `accuracy_1m_every_row_d128_causal.json`, "
            "`accuracy_1m_every_row_d128_nc.json` (`check_accuracy.py --reference device`, bfloat16 inputs). "
            "Every row is checked, with a random bfloat16 cotangent on every row, so each key's dk and dv sum "
            "over every query row that sees it, as in training. \"64-key dq tiles\": segments in registers "
            "(the head dim 128 default before); \"128-key dq tiles, in memory\": `Launch.dq_flush`, the default "
            "now. The float64 reference took 3 s (64K, 2 heads), 8 s (256K, 2 heads), 85 s (1M, 2 heads, "
            "causal) and 82 s (1M, 1 head, no mask).",
            launch_error_table(
                [
                    ("accuracy_64k_every_row_d128_causal.json", "64-key dq tiles"),
                    ("accuracy_64k_every_row_d128_causal_flush.json", "128-key dq tiles, in memory"),
                    ("accuracy_256k_every_row_d128_causal.json", "128-key dq tiles, in memory"),
                    ("accuracy_1m_every_row_d128_causal.json", "128-key dq tiles, in memory"),
                    ("accuracy_1m_every_row_d128_nc.json", "128-key dq tiles, in memory"),
                ]
            ),
            MOSAIC_END,
        ]
    )


def generated_scaling() -> str:
    return "\n\n".join(
        [
            SCALING_BEGIN,
            "Files: `scaling_4m_fwd.json`, `scaling_1m_fwd_bwd.json`, `scaling_4m_fwd_bwd.json` (B=1, 8 heads, "
            "head dim 64, bfloat16, causal, 31 chunks; 1 timed run after the first call, except 4M forward plus "
            "backward: the first call, compilation included, on each GPU count). The 1M forward plus backward ran the "
            "portable backward kernels, the 4M one the Hopper backward.",
            scaling_table(SCALING_FILES),
            f"![speedup over one GPU]({SCALING_CHART.name})",
            "The chart: speedup over one GPU per length and pass (FWD, F+B); grey lines at 1.0x, 1.8x (0.9x the "
            "GPU count, the target) and 2.0x.",
            SCALING_END,
        ]
    )


# (begin marker, end marker, text) of each generated section, and (writer, files, path) of each chart.
SECTIONS = [(BEGIN, END, generated), (MOSAIC_BEGIN, MOSAIC_END, generated_mosaic),
            (SCALING_BEGIN, SCALING_END, generated_scaling)]
CHARTS = [(kernel_chart, KERNEL_FILES, CHART), (mosaic_chart, MOSAIC_FILES, MOSAIC_CHART),
          (scaling_chart, SCALING_FILES, SCALING_CHART)]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args(argv)
    if not args.write:
        print("\n\n".join(make() for _, _, make in SECTIONS))
        return 0
    doc = DOC.read_text()
    for begin, end, make in SECTIONS:
        start, stop = doc.index(begin), doc.index(end) + len(end)
        doc = doc[:start] + make() + doc[stop:]
    DOC.write_text(doc)
    for chart, files, path in CHARTS:
        chart(files, path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
