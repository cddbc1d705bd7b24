"""Memory budgets: parsing user input and reading the device's free memory."""

from __future__ import annotations

import os
import re

_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
_PATTERN = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([a-zA-Z]*)\s*$")

# Share of the free device memory that an unbudgeted call plans against: the
# rest is left to the allocator's fragmentation and to the caller's arrays.
FREE_MEMORY_FRACTION = 0.8


def parse_budget(budget: int | float | str | None, name: str = "memory_budget") -> int | None:
    """Returns a budget in bytes, or None when no budget was given.

    Accepts a positive number of bytes (int, or float with no fractional
    bytes) or a string such as "512MiB", "1.5GiB", "2GB" or "1e9".
    """
    if budget is None:
        return None
    if isinstance(budget, bool):
        raise TypeError(f"{name} must be a number of bytes or a string like '1.5GiB', got {budget!r}")
    if isinstance(budget, str):
        match = _PATTERN.match(budget)
        unit = match.group(2).lower() if match else None
        if match is None or unit not in _UNITS:
            raise ValueError(
                f"{name}={budget!r} is not a memory size; expected bytes or a string such as "
                f"'512MiB', '1.5GiB' or '2GB' (units: {', '.join(u for u in _UNITS if u)})"
            )
        value = float(match.group(1)) * _UNITS[unit]
    elif isinstance(budget, (int, float)) or hasattr(budget, "__index__"):
        value = float(budget) if isinstance(budget, float) else int(budget)
    else:
        raise TypeError(f"{name} must be a number of bytes or a string like '1.5GiB', got {type(budget).__name__}")
    if not value > 0 or value != value or value == float("inf"):
        raise ValueError(f"{name} must be a positive, finite number of bytes, got {budget!r}")
    return int(value)


def format_bytes(num_bytes: int | float) -> str:
    """Human-readable size with binary units, e.g. '1.50 GiB'."""
    value = float(num_bytes)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.2f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def device_free_bytes(device=None) -> int:
    """Free memory of `device` (default: JAX's first device), in bytes.

    Accelerators report it through `memory_stats()`; the CPU backend does not,
    so host RAM available to this process is used instead.
    """
    import jax

    device = device if device is not None else jax.devices()[0]
    stats = None
    try:
        stats = device.memory_stats()
    except Exception:  # some backends do not implement memory_stats
        stats = None
    if stats and "bytes_limit" in stats:
        return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return 8 * 2**30
