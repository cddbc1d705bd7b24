"""What ptxas said about each Mosaic GPU kernel it compiled, from a log of a run with its report on.

    MOSAIC_GPU_DUMP_PTXAS=1 PYTHONPATH=. python bench/mosaic_kernel.py ... > run.log 2>&1
    python bench/ptxas_report.py run.log

One row per kernel compile, in the order of the log (for forward plus backward of one launch: the
forward, the dk/dv kernel, the dq kernel): registers, bytes spilled to local memory (stores and
loads), stack bytes, and how often ptxas reported each numbered note, such as C7513 (every ``wgmma``
of the kernel serialized) or C7519 (a ``warpgroup.arrive`` it added so that a ``wgmma`` can use
registers). A CPU test keeps the parser in step with the report's wording.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import re
import sys

_NAME = re.compile(r"Compiling entry function '([^']+)'")
_REGISTERS = re.compile(r"Used (\d+) registers")
_SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_STACK = re.compile(r"(\d+) bytes cumulative stack size")
_NOTE = re.compile(r"ptxas (?:info|warning)\s*: \((C\d+)\)")


@dataclasses.dataclass
class Compile:
    """What ptxas reported for one kernel compile."""

    name: str = ""
    registers: int = 0
    spill_stores: int = 0
    spill_loads: int = 0
    stack: int = 0
    notes: collections.Counter = dataclasses.field(default_factory=collections.Counter)


def compiles(log: str) -> list[Compile]:
    """The kernel compiles reported in `log`, in order. ptxas prints a kernel's numbered notes and
    warnings before its "Compiling entry function" line, and ends its report with "Compile time", so
    a report runs from the end of the one before to its "Compile time" line."""
    found, current = [], Compile()
    for line in log.splitlines():
        if "ptxas" not in line and "spill stores" not in line:
            continue
        if name := _NAME.search(line):
            current.name = name.group(1)
        elif registers := _REGISTERS.search(line):
            current.registers = int(registers.group(1))
            if stack := _STACK.search(line):
                current.stack = int(stack.group(1))
        elif spills := _SPILLS.search(line):
            current.spill_stores, current.spill_loads = map(int, spills.groups())
        elif note := _NOTE.search(line):
            current.notes[note.group(1)] += 1
        elif "Compile time" in line:
            found.append(current)
            current = Compile()
    return found


def table(found: list[Compile]) -> str:
    """`found` as a markdown table."""
    lines = [
        "| kernel | registers | spill stores | spill loads | stack | notes |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for i, c in enumerate(found):
        notes = ", ".join(f"{code} x{n}" for code, n in sorted(c.notes.items())) or "none"
        lines.append(f"| {i} | {c.registers} | {c.spill_stores} | {c.spill_loads} | {c.stack} | {notes} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("log", help="stdout and stderr of a run with MOSAIC_GPU_DUMP_PTXAS=1")
    args = parser.parse_args(argv)
    with open(args.log) as f:
        found = compiles(f.read())
    if not found:
        print(f"{args.log}: no ptxas report (was MOSAIC_GPU_DUMP_PTXAS=1 set?)", file=sys.stderr)
        return 1
    print(table(found))
    return 0


if __name__ == "__main__":
    sys.exit(main())
