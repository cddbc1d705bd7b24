"""Writes the tables and the chart of docs/benchmarks.md from the JSON files in bench/results/.

    python bench/make_tables.py            # prints the generated section
    python bench/make_tables.py --write    # replaces it in docs/benchmarks.md, writes the chart

Only the part between the markers in docs/benchmarks.md is generated; the
chart is docs/benchmarks_kernel.png.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "bench" / "results"
DOC = ROOT / "docs" / "benchmarks.md"
BEGIN, END = "<!-- generated tables: begin -->", "<!-- generated tables: end -->"
CHART = ROOT / "docs" / "benchmarks_kernel.png"
KERNEL_FILES = [
    "pallas_triton_16k_256k.json",
    "pallas_triton_1m_fwd.json",
    "pallas_triton_1m_fwd_bwd.json",
    "pallas_triton_1m_fwd_bwd_d128.json",
]


def _tokens(n: int) -> str:
    return f"{n // 2**20}M" if n % 2**20 == 0 else f"{n // 2**10}K"


def _kernel_rows(files: list[str]):
    """(our rows, cuDNN rows by (seq_len, head_dim, causal, direction))."""
    rows = []
    for name in files:
        rows += json.loads((RESULTS / name).read_text())["rows"]
    ours = [r for r in rows if r["implementation"] != "cudnn" and "seconds" in r]
    base = {
        (r["seq_len"], r["head_dim"], r["causal"], r["direction"]): r
        for r in rows
        if r["implementation"] == "cudnn" and "seconds" in r
    }
    return ours, base


def kernel_chart(files: list[str], path) -> None:
    """Bars of ours / cuDNN throughput, one group per (head dim, causal, pass), one bar per N."""
    from plot import bar_chart

    ours, base = _kernel_rows(files)
    groups = {}
    for r in sorted(ours, key=lambda r: (r["direction"], r["head_dim"], not r["causal"], r["seq_len"])):
        c = base[(r["seq_len"], r["head_dim"], r["causal"], r["direction"])]
        label = f"D{r['head_dim']} {'C' if r['causal'] else 'NC'} {'FWD' if r['direction'] == 'fwd' else 'F+B'}"
        groups.setdefault(label, []).append((_tokens(r["seq_len"]), c["seconds"] / r["seconds"]))
    bar_chart(str(path), list(groups.items()), lines=[0.6, 1.0], top=1.1)


def kernel_table(files: list[str]) -> str:
    ours, base = _kernel_rows(files)
    lines = [
        "| N | D | causal | pass | cuDNN s | ours s | ours TFLOP/s | ours / cuDNN throughput | ours temp GiB |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in sorted(ours, key=lambda r: (r["seq_len"], r["head_dim"], not r["causal"], r["direction"])):
        c = base[(r["seq_len"], r["head_dim"], r["causal"], r["direction"])]
        lines.append(
            f"| {_tokens(r['seq_len'])} | {r['head_dim']} | {'yes' if r['causal'] else 'no'} | {r['direction']} "
            f"| {c['seconds']:.4f} | {r['seconds']:.4f} | {r['tflops']:.0f} | {c['seconds'] / r['seconds']:.2f}x "
            f"| {r.get('temp_bytes', 0) / 2**30:.2f} |"
        )
    return "\n".join(lines)


def accuracy_table(files: list[str]) -> str:
    lines = [
        "| N | D | causal | rows checked | ours (pallas_triton) | cuDNN | XLA kernel |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name in files:
        for r in json.loads((RESULTS / name).read_text())["results"]:
            e = r["errors"]
            fmt = lambda x: "" if x is None else (f"{x:.3e}" if isinstance(x, float) else str(x)[:40])
            lines.append(
                f"| {_tokens(r['seq_len'])} | {r['head_dim']} | {'yes' if r['causal'] else 'no'} "
                f"| {r['rows_checked']} | {fmt(e.get('pallas_triton'))} | {fmt(e.get('cudnn'))} | {fmt(e.get('xla'))} |"
            )
    return "\n".join(lines)


def generated() -> str:
    return "\n\n".join(
        [
            BEGIN,
            "### Kernel speed: one subproblem, all data on the device (B=1, 8 heads, bfloat16)",
            "Files: `pallas_triton_16k_256k.json` (3 timed runs, median), `pallas_triton_1m_fwd.json`, "
            "`pallas_triton_1m_fwd_bwd.json` and `pallas_triton_1m_fwd_bwd_d128.json` (1 timed run after a "
            "warm-up).",
            kernel_table(KERNEL_FILES),
            f"![ours / cuDNN throughput]({CHART.name})",
            "The chart: ours / cuDNN throughput per group of head dim (D64, D128), causal (C) or not (NC), "
            "forward (FWD) or forward plus backward (F+B); one bar per length (16K to 1M); grey lines at 0.6x "
            "(the portable kernel's target) and 1.0x (cuDNN).",
            "### Accuracy on the device: relative error vs float64 (bfloat16 inputs, 8 heads)",
            "Files: `accuracy_8k.json`, `accuracy_1m.json`.",
            accuracy_table(["accuracy_8k.json", "accuracy_1m.json"]),
            END,
        ]
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args(argv)
    text = generated()
    if not args.write:
        print(text)
        return 0
    doc = DOC.read_text()
    start, end = doc.index(BEGIN), doc.index(END) + len(END)
    DOC.write_text(doc[:start] + text + doc[end:])
    kernel_chart(KERNEL_FILES, CHART)
    return 0


if __name__ == "__main__":
    sys.exit(main())
