"""Bar charts as PNG images for docs/benchmarks.md, with no plotting library.

Text uses a 3 x 5 pixel font (upper case, digits and a few signs), scaled up.
"""

from __future__ import annotations

import numpy as np

from stream_cqsa_jax._src.visualize import palette, write_png

_GLYPHS = {
    "0": ("111", "101", "101", "101", "111"), "1": ("010", "110", "010", "010", "111"),
    "2": ("111", "001", "111", "100", "111"), "3": ("111", "001", "111", "001", "111"),
    "4": ("101", "101", "111", "001", "001"), "5": ("111", "100", "111", "001", "111"),
    "6": ("111", "100", "111", "101", "111"), "7": ("111", "001", "010", "010", "010"),
    "8": ("111", "101", "111", "101", "111"), "9": ("111", "101", "111", "001", "111"),
    "A": ("010", "101", "111", "101", "101"), "B": ("110", "101", "110", "101", "110"),
    "C": ("011", "100", "100", "100", "011"), "D": ("110", "101", "101", "101", "110"),
    "E": ("111", "100", "110", "100", "111"), "F": ("111", "100", "110", "100", "100"),
    "K": ("101", "101", "110", "101", "101"), "L": ("100", "100", "100", "100", "111"),
    "M": ("101", "111", "111", "101", "101"), "N": ("110", "101", "101", "101", "101"),
    "O": ("111", "101", "101", "101", "111"), "R": ("110", "101", "110", "101", "101"),
    "S": ("011", "100", "010", "001", "110"), "U": ("101", "101", "101", "101", "111"),
    "W": ("101", "101", "111", "111", "101"), "X": ("101", "101", "010", "101", "101"),
    ".": ("000", "000", "000", "000", "010"), "+": ("000", "010", "111", "010", "000"),
    "=": ("000", "111", "000", "111", "000"), "/": ("001", "001", "010", "100", "100"),
    " ": ("000", "000", "000", "000", "000"),
}


def text(image: np.ndarray, x: int, y: int, label: str, colour=(0, 0, 0), scale: int = 2) -> None:
    """Draws `label` (upper-cased) with its top-left corner at (x, y)."""
    for i, ch in enumerate(label.upper()):
        glyph = _GLYPHS.get(ch, _GLYPHS[" "])
        for row, bits in enumerate(glyph):
            for col, bit in enumerate(bits):
                if bit == "1":
                    top, left = y + row * scale, x + (4 * i + col) * scale
                    image[top : top + scale, left : left + scale] = colour


def bar_chart(path: str, groups: list[tuple[str, list[tuple[str, float]]]], lines: list[float], top: float) -> None:
    """Writes a chart of grouped bars: groups of (label, [(bar label, value)]), horizontal
    reference lines at `lines`, values from 0 to `top`."""
    bar, gap, height, margin = 22, 18, 300, 40
    span = lambda label, bars: max(len(bars) * bar, 8 * len(label))  # noqa: E731 (label: 4 px per char, x2)
    width = margin + sum(span(label, bars) + gap for label, bars in groups) + margin
    image = np.full((height + 3 * margin, width, 3), 255, np.uint8)
    base = margin + height
    colours = palette(max(len(bars) for _, bars in groups))
    y_of = lambda value: base - int(round(height * min(value, top) / top))
    for value in lines:
        image[y_of(value), margin // 2 : width - margin // 2] = (150, 150, 150)
        text(image, 2, y_of(value) - 5, f"{value:.1f}", (90, 90, 90))
    x = margin
    for label, bars in groups:
        for i, (name, value) in enumerate(bars):
            image[y_of(value) : base, x + i * bar + 2 : x + (i + 1) * bar - 2] = colours[i]
            text(image, x + i * bar + 2, base + 6, name, scale=1)
        text(image, x, base + 18, label)
        x += span(label, bars) + gap
    image[base, margin // 2 : width - margin // 2] = 0
    write_png(path, image)
