"""Chunk and tile sizes: how a sequence is cut for a given kernel.

A sequence of ``length`` tokens is cut into ``num_chunks`` chunks of equal
size ``chunk``; each chunk is a whole number of tiles of ``block`` tokens, the
unit a kernel works on. The last chunks may be partly or wholly padding.
Kernels state their tile constraints here, as plain data, so that the planner
can size a plan without importing any kernel.
"""

from __future__ import annotations

import dataclasses
import math

IMPLEMENTATIONS = ("xla", "pallas_triton", "mosaic_gpu")


@dataclasses.dataclass(frozen=True)
class TileRule:
    """Tile constraints of one kernel implementation.

    Attributes:
      max_block_q: largest query tile.
      max_block_kv: largest key/value tile.
      align: every tile is a multiple of this many tokens.
      power_of_two: tiles must be powers of two (Triton-lowered kernels).
    """

    max_block_q: int
    max_block_kv: int
    align: int
    power_of_two: bool = False


TILE_RULES: dict[str, TileRule] = {
    "xla": TileRule(max_block_q=64, max_block_kv=64, align=8),
    "pallas_triton": TileRule(max_block_q=128, max_block_kv=128, align=16, power_of_two=True),
    # A thread block holds 128 query rows (two warpgroups of 64).
    "mosaic_gpu": TileRule(max_block_q=128, max_block_kv=128, align=128),
}
# 32/64-bit inputs in the Triton kernel: 16-token tiles, so that every dot
# product sums at most 16 terms (see kernels/pallas_triton.py).
_WIDE_RULES: dict[str, TileRule] = {
    "pallas_triton": TileRule(max_block_q=16, max_block_kv=16, align=16, power_of_two=True),
    # The Mosaic GPU kernel takes 16-bit inputs only; wider ones run the Triton kernel.
    "mosaic_gpu": TileRule(max_block_q=16, max_block_kv=16, align=16, power_of_two=True),
}


# Inputs the Mosaic GPU kernel takes (others run the Triton kernel).
MOSAIC_GPU_DTYPES = ("bfloat16", "float16")
MOSAIC_GPU_HEAD_DIMS = (64, 128)


def rule_for(implementation: str, dtype: str) -> TileRule:
    """The tile rule of `implementation` for inputs of `dtype` (a dtype name)."""
    if dtype in ("float32", "float64") and implementation in _WIDE_RULES:
        return _WIDE_RULES[implementation]
    return TILE_RULES[implementation]


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def chunk_and_block(length: int, num_chunks: int, rule: TileRule, max_block: int) -> tuple[int, int]:
    """Returns ``(chunk, block)`` for cutting `length` tokens into `num_chunks` chunks.

    ``chunk`` is a multiple of ``block``; ``block`` obeys `rule` and is at most
    `max_block` (itself at least ``rule.align``). Of the allowed tiles no
    smaller than half of `max_block`, the one that pads
    ``ceil(length / num_chunks)`` tokens least wins, then the largest.
    """
    max_block = max(rule.align, max_block)
    need = max(1, math.ceil(length / num_chunks))
    if rule.power_of_two:
        block = min(1 << (max_block.bit_length() - 1), max(rule.align, 1 << (need - 1).bit_length()))
        return _round_up(need, block), block
    largest = min(max_block, _round_up(need, rule.align))
    smallest = max(rule.align, _round_up(largest // 2, rule.align))
    blocks = range(smallest, largest + 1, rule.align)
    chunk, neg_block = min((_round_up(need, b), -b) for b in blocks)
    return chunk, -neg_block


def block_options(rule: TileRule, max_block: int) -> list[int]:
    """Tile limits to try, from `max_block` down to the smallest allowed tile."""
    options, block = [], max(rule.align, max_block)
    while block >= rule.align:
        options.append(block)
        block //= 2
    return options
