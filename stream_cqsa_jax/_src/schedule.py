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
    """Tables for every live subproblem of `plan` (those that own a visible pair), in quorum
    order: the rows of `quorum_tables`, cut to the widest live subproblem."""
    live = [t for t in (quorum_tables(plan, i) for i in range(plan.cover.num_chunks)) if t.num_pairs]
    mq = max((t.num_q for t in live), default=1)
    mk = max((t.num_kv for t in live), default=1)
    mp = max((int(t.pair_count.max()) for t in live), default=1)
    mp_kv = max((int(t.kv_pair_count.max()) for t in live), default=1)

    def stack(name: str, dtype, *widths: int) -> np.ndarray:
        if not live:
            return np.zeros((0,) + widths, dtype)
        cut = tuple(slice(0, w) for w in widths)
        return np.stack([getattr(t, name)[cut] for t in live]).astype(dtype, copy=False)

    tables = (
        np.array([t.quorum for t in live], np.int32),
        stack("q_slots", np.int32, mq),
        stack("kv_slots", np.int32, mk),
        stack("pair_count", np.int32, mq),
        stack("pair_kv", np.int32, mq, mp),
        stack("pair_full", bool, mq, mp),
        stack("kv_pair_count", np.int32, mk),
        stack("kv_pair_q", np.int32, mk, mp_kv),
    )
    for table in tables:
        table.setflags(write=False)
    return Schedule(*tables)


# -- one subproblem at a time (streaming plans) -----------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class QuorumTables:
    """One quorum's subproblem as the kernel wants it, padded to the cover size ``M``.

    The same tables as one row of `Schedule` (slots ascending, pairs of a
    query slot ascending by key slot), but every width is ``M``, so one
    compiled kernel serves every subproblem of a plan.

    Attributes:
      quorum: the translate ``i`` of the cover.
      num_q, num_kv: live query / key-value slots (the rest are padding).
      q_slots, kv_slots: int32 [M]; pair_count: int32 [M]; pair_kv: int32 [M, M];
      pair_full: bool [M, M]; kv_pair_count: int32 [M]; kv_pair_q: int32 [M, M].
    """

    quorum: int
    num_q: int
    num_kv: int
    q_slots: np.ndarray
    kv_slots: np.ndarray
    pair_count: np.ndarray
    pair_kv: np.ndarray
    pair_full: np.ndarray
    kv_pair_count: np.ndarray
    kv_pair_q: np.ndarray

    @property
    def num_pairs(self) -> int:
        return int(self.pair_count.sum())

    def kernel_tables(self) -> tuple[np.ndarray, ...]:
        """(q_slots, kv_slots, pair_count, pair_kv, pair_full, kv_pair_count, kv_pair_q)."""
        return (
            self.q_slots,
            self.kv_slots,
            self.pair_count,
            self.pair_kv,
            self.pair_full,
            self.kv_pair_count,
            self.kv_pair_q,
        )

    def pairs(self) -> np.ndarray:
        """int64 [P, 2]: the (query chunk, key chunk) pairs, by query slot then key slot."""
        live = np.arange(self.pair_kv.shape[1])[None, :] < self.pair_count[:, None]
        rows, cols = np.nonzero(live)
        return np.stack([self.q_slots[rows], self.kv_slots[self.pair_kv[rows, cols]]], axis=1).astype(np.int64)

    def subproblem(self):
        from .plan import Subproblem

        pairs = self.pairs()
        return Subproblem(
            index=self.quorum,
            quorum=self.quorum,
            q_chunks=tuple(int(c) for c in self.q_slots[: self.num_q]),
            kv_chunks=tuple(int(c) for c in self.kv_slots[: self.num_kv]),
            pairs=tuple((int(a), int(b)) for a, b in pairs),
        )


@functools.lru_cache(maxsize=8)
def _owned_slot_pairs(cover) -> np.ndarray:
    """bool [M, M]: entry (j1, j2) when ``(e[j1], e[j2])`` is the representative of its
    difference (``e`` the cover's sorted elements). It is the same for every quorum:
    quorum ``i`` owns the chunk pairs ``(i + e[j1], i + e[j2])`` of these entries."""
    elements = np.asarray(cover.elements, dtype=np.int64)
    reps = cover.representatives()
    owned = np.zeros((len(elements), len(elements)), bool)
    owned[np.searchsorted(elements, reps[:, 0]), np.searchsorted(elements, reps[:, 1])] = True
    owned.setflags(write=False)
    return owned


def _left_packed(mask: np.ndarray, width: int, flags: np.ndarray | None = None):
    """Per row of bool `mask` [R, K] (R, K <= width): how many entries are set and their
    column indices, ascending and packed to the left, zero-padded to [width, width]; with
    bool `flags` [R, K], also each packed entry's flag (False in the padding).

    Vectorised as a row sort of ``2 * column + flag`` keys (unset entries sort last),
    so it costs a few passes over R * K entries and no per-entry index arrays.
    """
    rows, cols = mask.shape
    key = np.arange(cols, dtype=np.int32)[None, :] * 2
    if flags is not None:
        key = key + flags.astype(np.int32)
    keyed = np.where(mask, key, np.int32(2 * cols))
    keyed.sort(axis=1)
    count = np.zeros(width, np.int32)
    count[:rows] = np.count_nonzero(mask, axis=1)
    live = np.arange(cols)[None, :] < count[:rows, None]
    packed = np.zeros((width, width), np.int32)
    packed[:rows, :cols] = np.where(live, keyed >> 1, 0)
    if flags is None:
        return count, packed, None
    packed_flags = np.zeros((width, width), bool)
    packed_flags[:rows, :cols] = live & (keyed & 1).astype(bool)
    return count, packed, packed_flags


def quorum_tables(plan, quorum: int) -> QuorumTables:
    """The tables of quorum `quorum`'s subproblem, padded to the cover size; O(M^2) = O(C).

    Query slots are the quorum chunks that own a visible pair as queries, key
    slots those that own one as keys (ascending); pairs the band hides entirely
    are dropped, as in `build_schedule`.
    """
    cover = plan.cover
    if isinstance(quorum, (bool, np.bool_)) or not isinstance(quorum, (int, np.integer)):
        raise TypeError(f"quorum must be an int in [0, {cover.num_chunks}), got {quorum!r}")
    if not 0 <= quorum < cover.num_chunks:
        raise ValueError(f"quorum must be an int in [0, {cover.num_chunks}), got {quorum}")
    width = cover.size
    chunks = cover.add(np.int64(quorum), np.asarray(cover.elements, dtype=np.int64))  # slot j -> chunk
    visible, full = chunk_pair_visibility(plan, chunks[:, None], chunks[None, :])
    owned = _owned_slot_pairs(cover) & visible
    q_rows = np.flatnonzero(owned.any(axis=1))
    kv_cols = np.flatnonzero(owned.any(axis=0))
    q_rows = q_rows[np.argsort(chunks[q_rows], kind="stable")]
    kv_cols = kv_cols[np.argsort(chunks[kv_cols], kind="stable")]
    sub = owned[np.ix_(q_rows, kv_cols)]
    sub_full = full[np.ix_(q_rows, kv_cols)]

    def slots(x):
        out = np.zeros(width, np.int32)
        out[: len(x)] = x
        return out

    pair_count, pair_kv, pair_full = _left_packed(sub, width, sub_full)
    kv_pair_count, kv_pair_q, _ = _left_packed(sub.T, width)
    tables = QuorumTables(
        quorum=int(quorum),
        num_q=len(q_rows),
        num_kv=len(kv_cols),
        q_slots=slots(chunks[q_rows]),
        kv_slots=slots(chunks[kv_cols]),
        pair_count=pair_count,
        pair_kv=pair_kv,
        pair_full=pair_full,
        kv_pair_count=kv_pair_count,
        kv_pair_q=kv_pair_q,
    )
    for table in tables.kernel_tables():
        table.setflags(write=False)
    return tables


def visible_pair_count(plan) -> int:
    """Chunk pairs with at least one visible position pair; O(C), no pair is enumerated.

    The band is convex, so each query chunk sees one contiguous run of key chunks.
    """
    c = plan.num_chunks
    cq, ck = plan.q_chunk, plan.kv_chunk
    start = np.arange(c, dtype=np.int64) * cq
    last = np.minimum(start + cq, plan.q_len) - 1
    lo, hi = plan.band.key_span(start, last, np)
    seen = (last >= start) & (hi >= lo)
    return int(np.where(seen, hi // ck - lo // ck + 1, 0).sum())


# -- the query-row order (full cover, one pair at a time) ----------------------------------


@functools.lru_cache(maxsize=8)
def row_pairs(plan) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(q_chunk, kv_chunk, full): int32 [P], int32 [P], bool [P] for every visible chunk pair,
    by query chunk then key chunk (the order `query_rows` runs them), and whether the
    band leaves the pair unmasked. O(C^2)."""
    c = np.arange(plan.num_chunks, dtype=np.int64)
    visible, full = chunk_pair_visibility(plan, c[:, None], c[None, :])
    rows, cols = np.nonzero(visible)
    out = (rows.astype(np.int32), cols.astype(np.int32), full[rows, cols])
    for x in out:
        x.setflags(write=False)
    return out
