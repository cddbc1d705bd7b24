"""Gathering a subproblem's chunks from a full-length array, on the device or in host memory."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from . import memory_kinds


def gather_chunks(x: jax.Array | None, chunk_ids: jax.Array, chunk: int, axis: int) -> jax.Array | None:
    """Concatenates chunks `chunk_ids` of `x` along `axis`; positions past the end read as 0.

    An `x` in host memory is read one chunk at a time (`_from_host`).
    """
    if x is None:
        return None
    if memory_kinds.is_host(x):
        return _from_host(x, chunk_ids, chunk, axis)
    rows = (chunk_ids[:, None] * chunk + jnp.arange(chunk, dtype=chunk_ids.dtype)).reshape(-1)
    return jnp.take(x, rows, axis=axis, mode="fill", fill_value=0)


def _from_host(x: jax.Array, chunk_ids: jax.Array, chunk: int, axis: int) -> jax.Array:
    """`gather_chunks` for a host-resident `x` inside `jit`: each chunk is sliced in host memory and
    moved to the device on its own, so the device never holds more than the gathered chunks.

    A chunk that runs past the end is read as the last `chunk` rows and shifted into place.
    """
    length = x.shape[axis]
    on_device = memory_kinds.sharding(jax.devices()[0], "device")
    if chunk > length:  # shorter than one chunk: the whole array is smaller than the gathered result
        whole = jax.device_put(x, on_device)
        return gather_chunks(whole, chunk_ids, chunk, axis)

    def one(c):
        start = jnp.minimum(c * chunk, length - chunk)
        block = jax.device_put(lax.dynamic_slice_in_dim(x, start, chunk, axis), on_device)
        if length % chunk:
            block = jnp.roll(block, start - c * chunk, axis)
            shape = [1] * block.ndim
            shape[axis] = chunk
            inside = (c * chunk + jnp.arange(chunk)).reshape(shape) < length
            block = jnp.where(inside, block, jnp.zeros((), block.dtype))
        return block

    blocks = lax.map(one, chunk_ids)  # [M, ..., chunk (at axis + 1), ...]
    blocks = jnp.moveaxis(blocks, 0, axis)
    return blocks.reshape(blocks.shape[:axis] + (-1,) + blocks.shape[axis + 2 :])
