"""Pictures of a plan: who owns which chunk pair, and how much work each subproblem does.

NumPy only. `encode_png` is a minimal PNG writer (8-bit RGB, zlib, no
filtering), so pictures need no plotting library.
"""

from __future__ import annotations

import colorsys
import struct
import zlib

import numpy as np

SKIPPED = -1  # owner value of a chunk pair that masking removes from the schedule
_BACKGROUND = (255, 255, 255)
_SKIPPED_RGB = (225, 225, 225)
_GRID_RGB = (255, 255, 255)


def ownership(plan) -> np.ndarray:
    """int32 [C, C]: the plan-order index of the subproblem computing each (query chunk, key chunk) pair.

    Pairs that no subproblem computes (hidden by masking) hold `SKIPPED`.
    """
    c = plan.num_chunks
    owner = np.full((c, c), SKIPPED, np.int32)
    sched = plan.schedule
    for s in range(sched.num_subproblems):
        pairs = sched.subproblem_pairs(s)
        owner[pairs[:, 0], pairs[:, 1]] = s
    return owner


def work(plan) -> np.ndarray:
    """int64 [num_subproblems]: chunk pairs computed by each subproblem, in plan order."""
    return plan.schedule.pair_count.sum(axis=1).astype(np.int64)


def palette(n: int) -> np.ndarray:
    """uint8 [n, 3]: n well-separated colours (golden-ratio hues)."""
    colours = []
    for i in range(n):
        hue = (i * 0.618033988749895) % 1.0
        light = 0.45 + 0.15 * ((i // 7) % 2)
        colours.append([round(255 * x) for x in colorsys.hls_to_rgb(hue, light, 0.75)])
    return np.asarray(colours, np.uint8).reshape(n, 3)


def ownership_image(plan, cell: int | None = None, bar_height: int = 120, gap: int = 12) -> np.ndarray:
    """uint8 [height, width, 3]: the ownership matrix above a bar chart of per-subproblem work.

    Matrix: row = query chunk, column = key chunk, one `cell` x `cell` square
    per pair coloured by its subproblem (grey: skipped). Bars: one per
    subproblem, in plan order and the same colours, height proportional to
    the pairs it computes. Above 1024 chunks the matrix is subsampled.
    """
    owner = ownership(plan)
    c = owner.shape[0]
    step = max(1, -(-c // 1024))
    owner = owner[::step, ::step]
    rows = owner.shape[0]
    if cell is None:
        cell = max(1, min(24, 480 // rows))
    if cell < 1:
        raise ValueError(f"cell must be a positive number of pixels, got {cell}")
    colours = palette(max(1, plan.schedule.num_subproblems))
    matrix = np.where(owner[..., None] >= 0, colours[np.maximum(owner, 0)], np.asarray(_SKIPPED_RGB, np.uint8))
    matrix = np.repeat(np.repeat(matrix, cell, axis=0), cell, axis=1)
    if cell >= 4:  # thin grid lines between cells
        matrix[::cell, :] = _GRID_RGB
        matrix[:, ::cell] = _GRID_RGB

    amounts = work(plan)
    n = len(amounts)
    width = max(matrix.shape[1], 2 * n)
    bar_w = max(1, width // max(n, 1))
    bars = np.full((bar_height, width, 3), _BACKGROUND, np.uint8)
    top = int(amounts.max()) if n else 0
    for s, amount in enumerate(amounts):
        h = 0 if top == 0 else max(1, round(bar_height * int(amount) / top))
        x0 = s * bar_w
        x1 = x0 + max(1, bar_w - (1 if bar_w > 2 else 0))
        bars[bar_height - h :, x0:x1] = colours[s]

    image = np.full((matrix.shape[0] + gap + bar_height, width, 3), _BACKGROUND, np.uint8)
    image[: matrix.shape[0], : matrix.shape[1]] = matrix
    image[matrix.shape[0] + gap :] = bars
    return image


def encode_png(rgb: np.ndarray) -> bytes:
    """PNG bytes of an 8-bit RGB image uint8 [height, width, 3]."""
    rgb = np.asarray(rgb)
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3 or min(rgb.shape[:2]) < 1:
        raise ValueError(f"rgb must be a non-empty uint8 array [height, width, 3], got {rgb.dtype} {rgb.shape}")
    height, width = rgb.shape[:2]

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8 bits, RGB, deflate, no filter, no interlace
    raw = np.concatenate([np.zeros((height, 1), np.uint8), rgb.reshape(height, 3 * width)], axis=1)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw.tobytes(), 9)) + chunk(
        b"IEND", b""
    )


def write_png(path: str, rgb: np.ndarray) -> None:
    """Writes `rgb` (uint8 [height, width, 3]) to `path` as a PNG file."""
    with open(path, "wb") as f:
        f.write(encode_png(rgb))


def ownership_text(plan) -> str:
    """The ownership matrix as text: one symbol per subproblem, '.' for skipped pairs (small plans)."""
    symbols = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
    owner = ownership(plan)
    lines = ["query chunk \\ key chunk"]
    for row in owner:
        lines.append(" ".join("." if s < 0 else (symbols[s] if s < len(symbols) else "#") for s in row))
    return "\n".join(lines)
