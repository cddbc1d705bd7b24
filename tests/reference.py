"""Dense float64 NumPy attention: the reference every path is tested against."""

from __future__ import annotations

import numpy as np


def visibility(
    t: int,
    s: int,
    batch: int,
    *,
    is_causal=False,
    window=None,
    segment_ids=None,
    q_lengths=None,
    kv_lengths=None,
) -> np.ndarray:
    """bool [B, T, S]: which query sees which key (jax.nn.dot_product_attention semantics)."""
    i = np.arange(t)[:, None]
    j = np.arange(s)[None, :]
    vis = np.ones((t, s), bool)
    if is_causal:
        vis &= j <= i
    if window is not None:
        left, right = (window, window) if np.isscalar(window) else window
        vis &= (j >= i - left) & (j <= i + right)
    vis = np.broadcast_to(vis, (batch, t, s)).copy()
    if segment_ids is not None:
        q_ids, kv_ids = segment_ids if isinstance(segment_ids, tuple) else (segment_ids, segment_ids)
        vis &= np.asarray(q_ids)[:, :, None] == np.asarray(kv_ids)[:, None, :]
    if q_lengths is not None:
        vis &= np.arange(t)[None, :, None] < np.asarray(q_lengths)[:, None, None]
    if kv_lengths is not None:
        vis &= np.arange(s)[None, None, :] < np.asarray(kv_lengths)[:, None, None]
    return vis


def _probs(q, k, vis, scale):
    b, t, n, h = q.shape
    kh = k.shape[2]
    k_rep = np.repeat(k, n // kh, axis=2)
    logits = np.einsum("btnh,bsnh->bnts", q, k_rep) * scale
    logits = np.where(vis[:, None], logits, -np.inf)
    row_max = np.max(logits, axis=-1, keepdims=True)
    row_max = np.where(np.isfinite(row_max), row_max, 0.0)
    e = np.exp(logits - row_max)
    denom = e.sum(-1, keepdims=True)
    probs = np.where(denom > 0, e / np.where(denom > 0, denom, 1.0), 0.0)
    lse = np.where(denom[..., 0] > 0, np.log(np.where(denom[..., 0] > 0, denom[..., 0], 1.0)) + row_max[..., 0], -np.inf)
    return probs, lse


def attention(q, k, v, *, scale=None, **mask_kwargs):
    """float64 (out [B, T, N, H], lse [B, N, T]); rows that see no key give 0 and -inf."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    scale = 1.0 / np.sqrt(q.shape[-1]) if scale is None else scale
    vis = visibility(q.shape[1], k.shape[1], q.shape[0], **mask_kwargs)
    probs, lse = _probs(q, k, vis, scale)
    v_rep = np.repeat(v, q.shape[2] // v.shape[2], axis=2)
    return np.einsum("bnts,bsnh->btnh", probs, v_rep), lse


def attention_grads(q, k, v, do, *, scale=None, dlse=None, **mask_kwargs):
    """float64 (dq, dk, dv) of <out, do> + <lse, dlse>."""
    q, k, v, do = (np.asarray(x, np.float64) for x in (q, k, v, do))
    b, t, n, h = q.shape
    kh = k.shape[2]
    g = n // kh
    scale = 1.0 / np.sqrt(h) if scale is None else scale
    vis = visibility(t, k.shape[1], b, **mask_kwargs)
    probs, _ = _probs(q, k, vis, scale)
    k_rep, v_rep = np.repeat(k, g, axis=2), np.repeat(v, g, axis=2)
    out = np.einsum("bnts,bsnh->btnh", probs, v_rep)
    dv_rep = np.einsum("bnts,btnh->bsnh", probs, do)
    dp = np.einsum("btnh,bsnh->bnts", do, v_rep)
    delta = np.einsum("btnh,btnh->bnt", do, out)
    if dlse is not None:
        delta = delta - np.asarray(dlse, np.float64)
    ds = probs * (dp - delta[..., None])
    dq = np.einsum("bnts,bsnh->btnh", ds, k_rep) * scale
    dk_rep = np.einsum("bnts,btnh->bsnh", ds, q) * scale
    fold = lambda x: x.reshape(b, x.shape[1], kh, g, h).sum(axis=3)
    return dq, fold(dk_rep), fold(dv_rep)


def as64(x) -> np.ndarray:
    """Any float array (bfloat16 included) as float64 NumPy."""
    import jax.numpy as jnp

    return np.asarray(jnp.asarray(x).astype(jnp.float32), np.float64)


def random_inputs(seed, b, t, s, n, kh, h, dtype, logit_scale=1.0):
    """Fresh normal q [b, t, n, h], k, v [b, s, kh, h]; q scaled by `logit_scale` (logits grow with it)."""
    import jax.numpy as jnp

    rng = np.random.default_rng(seed)
    q = rng.standard_normal((b, t, n, h)) * logit_scale
    k = rng.standard_normal((b, s, kh, h))
    v = rng.standard_normal((b, s, kh, h))
    return tuple(jnp.asarray(x, dtype) for x in (q, k, v))


def rel_error(x, ref) -> float:
    """Relative Frobenius error ||x - ref|| / ||ref||."""
    x = np.asarray(x, np.float64)
    ref = np.asarray(ref, np.float64)
    assert np.all(np.isfinite(x)), "result has NaN or inf"
    return float(np.linalg.norm(x - ref) / max(np.linalg.norm(ref), 1e-300))


def schedule_tables(plan):
    """A plan's schedule tables built pair by pair, with plain loops (the reference for
    `schedule.build_schedule`): (quorums, q_slots, kv_slots, pair_count, pair_kv, pair_full,
    kv_pair_count, kv_pair_q), each cut to the widest live subproblem."""
    from stream_cqsa_jax._src.schedule import chunk_pair_visibility

    cover = plan.cover
    reps = cover.representatives()
    rows = []
    for i in range(cover.num_chunks):
        a = cover.add(np.int64(i), reps[:, 0])
        b = cover.add(np.int64(i), reps[:, 1])
        visible, full = chunk_pair_visibility(plan, a, b)
        if not visible.any():
            continue
        pa, pb, pf = a[visible], b[visible], full[visible]
        order = np.lexsort((pb, pa))
        rows.append((i, pa[order], pb[order], pf[order]))
    n = len(rows)
    mq = max((len(np.unique(r[1])) for r in rows), default=1)
    mk = max((len(np.unique(r[2])) for r in rows), default=1)
    mp = max((np.unique(r[1], return_counts=True)[1].max() for r in rows), default=1)
    mp_kv = max((np.unique(r[2], return_counts=True)[1].max() for r in rows), default=1)
    out = dict(
        quorums=np.zeros(n, np.int32), q_slots=np.zeros((n, mq), np.int32), kv_slots=np.zeros((n, mk), np.int32),
        pair_count=np.zeros((n, mq), np.int32), pair_kv=np.zeros((n, mq, mp), np.int32),
        pair_full=np.zeros((n, mq, mp), bool), kv_pair_count=np.zeros((n, mk), np.int32),
        kv_pair_q=np.zeros((n, mk, mp_kv), np.int32),
    )
    for s, (i, pa, pb, pf) in enumerate(rows):
        out["quorums"][s] = i
        q_chunks, kv_chunks = np.unique(pa), np.unique(pb)
        out["q_slots"][s, : len(q_chunks)] = q_chunks
        out["kv_slots"][s, : len(kv_chunks)] = kv_chunks
        q_index, kv_index = np.searchsorted(q_chunks, pa), np.searchsorted(kv_chunks, pb)
        for j in range(len(q_chunks)):
            sel = q_index == j
            out["pair_count"][s, j] = sel.sum()
            out["pair_kv"][s, j, : sel.sum()] = kv_index[sel]
            out["pair_full"][s, j, : sel.sum()] = pf[sel]
        for j in range(len(kv_chunks)):
            visitors = np.sort(q_index[kv_index == j])
            out["kv_pair_count"][s, j] = len(visitors)
            out["kv_pair_q"][s, j, : len(visitors)] = visitors
    return out
