"""Where an array lives: device memory or host memory, for concrete arrays and tracers alike."""

from __future__ import annotations

import functools

import jax

HOST_KINDS = ("pinned_host", "unpinned_host")


def memory_kind(x) -> str | None:
    """"device", a host kind ("pinned_host", "unpinned_host"), or None when unknown (NumPy, Python).

    Inside `jit` the memory space is read from the tracer's abstract value
    (``jax.typeof(x).memory_space``); outside, from the array's sharding.
    """
    if isinstance(x, jax.core.Tracer):
        space = getattr(_typeof(x), "memory_space", None)
        name = getattr(space, "name", str(space)).lower() if space is not None else ""
        return "pinned_host" if name == "host" else "device"
    if isinstance(x, jax.Array):
        kind = getattr(x.sharding, "memory_kind", None)
        return "device" if kind is None else kind
    return None


def _typeof(x):
    typeof = getattr(jax, "typeof", None)  # jax >= 0.6
    return typeof(x) if typeof is not None else x.aval


def is_host(x) -> bool:
    return memory_kind(x) in HOST_KINDS


def device_of(x) -> jax.Device:
    """The single device of a concrete array (or the default device for anything else)."""
    if isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer):
        devices = x.devices()
        if len(devices) != 1:
            raise ValueError(f"arrays in host memory must sit on one device, got {len(devices)} devices")
        return next(iter(devices))
    return jax.devices()[0]


@functools.lru_cache(maxsize=32)
def sharding(device: jax.Device, kind: str) -> jax.sharding.SingleDeviceSharding:
    """`device`'s memory of kind `kind` ("device", "pinned_host", ...) as a sharding."""
    return jax.sharding.SingleDeviceSharding(device, memory_kind=kind)


def to_memory(x, kind: str, device: jax.Device | None = None):
    """`x` (an array or a pytree of arrays, traced or not) moved to memory `kind` of `device`.

    Inside `jit` this uses the default device's memory.
    """
    device = device or jax.devices()[0]
    return jax.device_put(x, sharding(device, kind))
