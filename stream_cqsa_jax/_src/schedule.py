"""Schedule tables: a plan's subproblems as small, padded integer arrays.

For subproblem ``s`` (in plan order) the executor reads:

* ``q_slots[s, :]``: the query chunks it gathers, ascending (unused slots hold 0);
* ``kv_slots[s, :]``: the key/value chunks it gathers, ascending (unused: 0);
* ``pair_count[s, j]``: how many key chunks query slot ``j`` visits;
* ``pair_kv[s, j, :]``: which key/value *slots* those are, ascending (unused: 0);
* ``pair_full[s, j, :]``: whether that chunk pair needs no in-tile mask;
* ``kv_pair_count[s, j]`` and ``kv_pair_q[s, j, :]``: the same pairs seen
  from key/value slot ``j``: how many query slots visit it, and which.

Every array is int32 (bool for ``pair_full``) and built once per plan with
NumPy, never traced.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np


@dataclasses.dataclass(frozen=True, eq=False)
class Schedule:
    quorums: np.ndarray
    q_slots: np.ndarray
    kv_slots: np.ndarray
    pair_count: np.ndarray
    pair_kv: np.ndarray
    pair_full: np.ndarray
    kv_pair_count: np.ndarray
    kv_pair_q: np.ndarray

    @property
    def num_subproblems(self) -> int:
        return int(self.quorums.shape[0])

    @property
    def max_q_slots(self) -> int:
        return int(self.q_slots.shape[1])

    @property
    def max_kv_slots(self) -> int:
        return int(self.kv_slots.shape[1])

    @property
    def max_pairs(self) -> int:
        return int(self.pair_kv.shape[2])

    def subproblem_pairs(self, s: int) -> np.ndarray:
        """int64 [P, 2]: the (query chunk, key chunk) pairs of subproblem `s`."""
        rows = []
        for j in range(self.max_q_slots):
            count = int(self.pair_count[s, j])
            kv = self.kv_slots[s, self.pair_kv[s, j, :count]]
            rows.append(np.stack([np.full(count, self.q_slots[s, j]), kv], axis=1))
        return np.concatenate(rows).astype(np.int64)

    def subproblems(self):
        from .plan import Subproblem

        out = []
        for s in range(self.num_subproblems):
            pairs = self.subproblem_pairs(s)
            out.append(
                Subproblem(
                    index=s,
                    quorum=int(self.quorums[s]),
                    q_chunks=tuple(int(c) for c in np.unique(pairs[:, 0])),
                    kv_chunks=tuple(int(c) for c in np.unique(pairs[:, 1])),
                    pairs=tuple((int(a), int(b)) for a, b in pairs),
                )
            )
        return tuple(out)

    def all_pairs(self) -> np.ndarray:
        """int64 [P, 2]: every scheduled pair, subproblem by subproblem."""
        if self.num_subproblems == 0:
            return np.zeros((0, 2), np.int64)
        return np.concatenate([self.subproblem_pairs(s) for s in range(self.num_subproblems)])


def chunk_pair_visibility(plan, a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(any visible, all visible) for query chunks `a` against key chunks `b` (broadcasting)."""
    cq, ck = plan.q_chunk, plan.kv_chunk
    return plan.band.range_visibility(a * cq, a * cq + cq, b * ck, b * ck + ck, np)


@functools.lru_cache(maxsize=32)
def build_schedule(plan) -> Schedule:
    """Tables for every live subproblem of `plan` (those that own a visible pair)."""
    cover = plan.cover
    num_chunks = cover.num_chunks
    reps = cover.representatives()
    quorum = np.arange(num_chunks, dtype=np.int64)[:, None]
    a = cover.add(quorum, reps[None, :, 0])
    b = cover.add(quorum, reps[None, :, 1])
    visible, full = chunk_pair_visibility(plan, a, b)

    rows = []
    for i in range(num_chunks):
        keep = visible[i]
        if not keep.any():
            continue
        pa, pb, pf = a[i][keep], b[i][keep], full[i][keep]
        order = np.lexsort((pb, pa))
        rows.append((i, pa[order], pb[order], pf[order]))

    n = len(rows)
    mq = max((len(np.unique(r[1])) for r in rows), default=1)
    mk = max((len(np.unique(r[2])) for r in rows), default=1)
    mp = max((np.max(np.unique(r[1], return_counts=True)[1]) for r in rows), default=1)
    mp_kv = max((np.max(np.unique(r[2], return_counts=True)[1]) for r in rows), default=1)
    quorums = np.zeros(n, np.int32)
    q_slots = np.zeros((n, mq), np.int32)
    kv_slots = np.zeros((n, mk), np.int32)
    pair_count = np.zeros((n, mq), np.int32)
    pair_kv = np.zeros((n, mq, mp), np.int32)
    pair_full = np.zeros((n, mq, mp), bool)
    kv_pair_count = np.zeros((n, mk), np.int32)
    kv_pair_q = np.zeros((n, mk, mp_kv), np.int32)
    for s, (i, pa, pb, pf) in enumerate(rows):
        quorums[s] = i
        q_chunks = np.unique(pa)
        kv_chunks = np.unique(pb)
        q_slots[s, : len(q_chunks)] = q_chunks
        kv_slots[s, : len(kv_chunks)] = kv_chunks
        q_index = np.searchsorted(q_chunks, pa)
        kv_index = np.searchsorted(kv_chunks, pb)
        for j in range(len(q_chunks)):
            sel = q_index == j
            count = int(sel.sum())
            pair_count[s, j] = count
            pair_kv[s, j, :count] = kv_index[sel]
            pair_full[s, j, :count] = pf[sel]
        for j in range(len(kv_chunks)):
            visitors = np.sort(q_index[kv_index == j])
            kv_pair_count[s, j] = len(visitors)
            kv_pair_q[s, j, : len(visitors)] = visitors
    tables = (quorums, q_slots, kv_slots, pair_count, pair_kv, pair_full, kv_pair_count, kv_pair_q)
    for table in tables:
        table.setflags(write=False)
    return Schedule(*tables)
