"""Shared by the kernel suites: data masks for a case, and XLA's own error on it (the bar a kernel meets)."""

import jax
import jax.numpy as jnp
import numpy as np

from reference import as64, rel_error


def data_masks(kind, b, t, s, rng):
    """(keywords for the API, keywords for the reference) for `kind`: "segments", "lengths" or None."""
    if kind == "segments":
        ids = np.sort(rng.integers(0, 4, size=(b, t)), axis=1).astype(np.int32)
        return dict(segment_ids=ids), dict(segment_ids=ids)
    if kind == "lengths":
        q_len = np.array([t, t // 3], np.int32)
        kv_len = np.array([s, s // 2], np.int32)
        return (
            dict(query_seq_lengths=q_len, key_value_seq_lengths=kv_len),
            dict(q_lengths=q_len, kv_lengths=kv_len),
        )
    return {}, {}


def xla_errors(q, k, v, do, vis, structured, extra, ref_out, ref_grads):
    """XLA's forward and gradient errors; rows that see no key are zeroed (XLA averages them)."""
    kwargs = {key: val for key, val in {**structured, **extra}.items() if key != "segment_ids"}
    if "segment_ids" in extra:
        kwargs = dict(mask=jnp.asarray(vis[:, None]))
    seen = jnp.asarray(vis.any(-1))[:, :, None, None]
    f = lambda q, k, v: jnp.where(seen, jax.nn.dot_product_attention(q, k, v, implementation="xla", **kwargs), 0)
    out, vjp = jax.vjp(f, q, k, v)
    return rel_error(as64(out), ref_out), [rel_error(as64(g), r) for g, r in zip(vjp(do), ref_grads)]
