"""Facts about JAX's default device that decide which kernel runs."""

from __future__ import annotations

import functools


@functools.cache
def gpu_capability() -> float | None:
    """The compute capability of JAX's default device (e.g. 9.0) if it is an NVIDIA GPU, else None."""
    import jax

    device = jax.devices()[0]
    if device.platform != "gpu":
        return None
    try:
        return float(getattr(device, "compute_capability", "0"))
    except ValueError:
        return 0.0


def on_hopper() -> bool:
    """Whether JAX's default device is an NVIDIA GPU of compute capability 9.x."""
    capability = gpu_capability()
    return capability is not None and 9.0 <= capability < 10.0
