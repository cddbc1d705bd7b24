"""Host accumulators of a streaming run: the float32 softmax state of every query chunk.

The state of query chunk ``c`` is ``acc [B, cq, N, H]``, ``m, l [B, N, cq]``
(``merge.py``). It lives in one of ``S`` physical *slots* of three arrays,
``acc [S, B, cq, N, H]`` and ``m, l [S, B, N, cq]``, held in memory or in
memory-mapped files; ``slot_of[c]`` says which (``-1``: nothing merged yet,
the empty state). With ``copy_on_write`` every merge writes the merged chunk
into a *free* slot and leaves the old one untouched until the new mapping is
committed (`commit`), so a file-backed state is never half-updated: there are
``C + M`` slots, ``M`` the most query chunks one subproblem merges. Without
it, merges overwrite in place (``S = C``).

The merge is a NumPy twin of `merge.merge_states`, in float32, in a fixed
order, so repeated runs give identical bits.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from . import host_threads

FILES = ("acc.f32", "m.f32", "l.f32")
# Query chunks finalised together: enough rows per NumPy call to amortise
# Python overhead when chunks are small.
_FINALIZE_ROWS = 1 << 16
# Query rows per group of chunks merged by one host thread.
_MERGE_ROWS = 1 << 14


@dataclasses.dataclass(frozen=True)
class StateLayout:
    """Shapes of the accumulators: B, chunk size cq, N, H, C chunks and S physical slots."""

    batch: int
    q_chunk: int
    heads: int
    head_dim: int
    num_chunks: int
    num_slots: int

    @property
    def acc_shape(self) -> tuple[int, ...]:
        return (self.num_slots, self.batch, self.q_chunk, self.heads, self.head_dim)

    @property
    def row_shape(self) -> tuple[int, ...]:
        return (self.num_slots, self.batch, self.heads, self.q_chunk)

    @property
    def nbytes(self) -> int:
        return 4 * (int(np.prod(self.acc_shape)) + 2 * int(np.prod(self.row_shape)))

    def file_sizes(self) -> dict[str, int]:
        rows = 4 * int(np.prod(self.row_shape))
        return {FILES[0]: 4 * int(np.prod(self.acc_shape)), FILES[1]: rows, FILES[2]: rows}


def _rows(x: np.ndarray) -> np.ndarray:
    """[..., N, L] -> [..., L, N, 1], to scale [..., L, N, H] rows."""
    return np.swapaxes(x, -1, -2)[..., None]


def merge_states(old, new):
    """`merge.merge_states` in NumPy float32: the state over two disjoint key sets.

    old, new: (acc [..., L, N, H], m [..., N, L], l [..., N, L]).
    """
    (a_acc, a_m, a_l), (b_acc, b_m, b_l) = old, new
    m = np.maximum(a_m, b_m)
    m_ref = np.where(m == -np.inf, np.float32(0), m)
    e_a = np.exp(a_m - m_ref)
    e_b = np.exp(b_m - m_ref)
    acc = _rows(e_a) * a_acc
    acc += _rows(e_b) * b_acc
    return acc, m, e_a * a_l + e_b * b_l


def finalize(acc: np.ndarray, l: np.ndarray) -> np.ndarray:
    """`acc / l` per row (float32); rows that saw no key (``l == 0``) give 0."""
    return acc / _rows(np.where(l > 0, l, np.float32(1)))


class HostState:
    """The accumulators of one run (see the module docstring).

    Args:
      layout: shapes.
      arrays: (acc, m, l) float32 arrays or memmaps of `layout`'s shapes.
      slot_of: int64 [C]: each chunk's slot, -1 for none.
      copy_on_write: merge into free slots (needed when the state is checkpointed).
    """

    def __init__(self, layout: StateLayout, arrays, slot_of: np.ndarray, copy_on_write: bool):
        self.layout = layout
        self.acc, self.m, self.l = arrays
        self.slot_of = np.array(slot_of, dtype=np.int64)
        self.copy_on_write = copy_on_write
        used = np.zeros(layout.num_slots, bool)
        used[self.slot_of[self.slot_of >= 0]] = True
        self._free = np.flatnonzero(~used)[::-1].copy()  # a stack: the smallest slot on top
        self._top = len(self._free)
        self._pending: list[tuple[int, int]] = []  # (chunk, new slot) merged but not committed

    # -- construction ---------------------------------------------------------------

    @classmethod
    def in_memory(cls, layout: StateLayout, copy_on_write: bool = False) -> "HostState":
        arrays = (np.empty(layout.acc_shape, np.float32), np.empty(layout.row_shape, np.float32),
                  np.empty(layout.row_shape, np.float32))
        return cls(layout, arrays, np.full(layout.num_chunks, -1, np.int64), copy_on_write)

    @classmethod
    def in_files(cls, directory: str, layout: StateLayout, slot_of: np.ndarray | None, copy_on_write: bool):
        """Memory-maps the three slot files in `directory`; creates them (sparse) when `slot_of` is None."""
        mode = "w+" if slot_of is None else "r+"
        arrays = []
        for name, shape in zip(FILES, (layout.acc_shape, layout.row_shape, layout.row_shape)):
            path = os.path.join(directory, name)
            if mode == "r+":
                size, want = os.path.getsize(path), layout.file_sizes()[name]
                if size != want:
                    raise ValueError(
                        f"checkpoint file {path!r} has {size} bytes, expected {want}: the checkpoint is damaged; "
                        "delete the checkpoint directory to start over"
                    )
            arrays.append(np.memmap(path, dtype=np.float32, mode=mode, shape=shape))
        if slot_of is None:
            slot_of = np.full(layout.num_chunks, -1, np.int64)
        return cls(layout, tuple(arrays), slot_of, copy_on_write)

    # -- reading and merging --------------------------------------------------------------

    def chunk(self, c: int):
        """(acc [B, cq, N, H], m, l [B, N, cq]) of query chunk `c` (the empty state if never merged)."""
        slot = self.slot_of[c]
        lay = self.layout
        if slot < 0:
            return (
                np.zeros(lay.acc_shape[1:], np.float32),
                np.full(lay.row_shape[1:], -np.inf, np.float32),
                np.zeros(lay.row_shape[1:], np.float32),
            )
        return self.acc[slot], self.m[slot], self.l[slot]

    def merge(self, chunks, acc: np.ndarray, m: np.ndarray, l: np.ndarray) -> None:
        """Merges a subproblem's partial state into the chunks it covers.

        chunks: the distinct query chunk of each slot (slot ``j`` holds rows
        ``j*cq .. (j+1)*cq`` of the partial); acc [B, Lq, N, H], m, l [B, N, Lq].
        Groups of chunks merge on the host thread pool (`host_threads.py`).
        """
        if self._pending:
            raise AssertionError("commit() the previous merge first")  # a bug in the caller
        lay = self.layout
        chunks = np.asarray(chunks, np.int64)
        old_slots = self.slot_of[chunks]
        new_slots = old_slots.copy()
        fresh = (old_slots < 0) | self.copy_on_write
        need = int(fresh.sum())
        if need > self._top:
            raise AssertionError("no free accumulator slot")  # a bug: S = C + M suffices
        new_slots[fresh] = self._free[self._top - need : self._top][::-1]
        self._top -= need
        b, cq, n, h = lay.batch, lay.q_chunk, lay.heads, lay.head_dim
        count = len(chunks)
        # [B, Lq, N, H] -> [chunk, B, cq, N, H]; [B, N, Lq] -> [chunk, B, N, cq]
        new_acc = np.moveaxis(acc[:, : count * cq].reshape(b, count, cq, n, h), 1, 0)
        new_m = np.moveaxis(m[:, :, : count * cq].reshape(b, n, count, cq), 2, 0)
        new_l = np.moveaxis(l[:, :, : count * cq].reshape(b, n, count, cq), 2, 0)

        def work(lo: int, hi: int) -> None:
            old = old_slots[lo:hi]
            seen = old >= 0
            if seen.all():
                old_state = (self.acc[old], self.m[old], self.l[old])
            else:
                old_state = (
                    np.zeros((hi - lo,) + lay.acc_shape[1:], np.float32),
                    np.full((hi - lo,) + lay.row_shape[1:], -np.inf, np.float32),
                    np.zeros((hi - lo,) + lay.row_shape[1:], np.float32),
                )
                for target, source in zip(old_state, (self.acc, self.m, self.l)):
                    target[seen] = source[old[seen]]
            merged = merge_states(old_state, (new_acc[lo:hi], new_m[lo:hi], new_l[lo:hi]))
            slots = new_slots[lo:hi]
            self.acc[slots], self.m[slots], self.l[slots] = merged

        host_threads.for_ranges(count, work, min_items=max(1, _MERGE_ROWS // cq))
        if self.copy_on_write:
            self._pending.extend(zip(chunks.tolist(), new_slots.tolist()))
        else:
            self.slot_of[chunks] = new_slots

    def flush(self) -> None:
        """Writes memory-mapped slots through to their files."""
        for x in (self.acc, self.m, self.l):
            if isinstance(x, np.memmap):
                x.flush()

    def proposed_slots(self) -> np.ndarray:
        """int64 [C]: `slot_of` with the uncommitted merges applied (what `commit` will install)."""
        slot_of = self.slot_of.copy()
        for c, slot in self._pending:
            slot_of[c] = slot
        return slot_of

    def commit(self) -> None:
        """Installs the pending merges; the slots they replaced become free."""
        for c, slot in self._pending:
            old = self.slot_of[c]
            if old >= 0 and old != slot:
                self._free[self._top] = old
                self._top += 1
            self.slot_of[c] = slot
        self._pending.clear()

    # -- the result -------------------------------------------------------------------------

    def write_output(self, out: np.ndarray) -> None:
        """``out[:, rows of chunk c] = acc / l`` for every chunk, cast to ``out.dtype``.

        out: [B, T, N, H]; rows past T (padding) are dropped.
        """
        lay = self.layout
        cq, t = lay.q_chunk, out.shape[1]
        group = max(1, _FINALIZE_ROWS // cq)
        for first in range(0, min(lay.num_chunks, -(-t // cq)), group):
            chunks = np.arange(first, min(first + group, lay.num_chunks, -(-t // cq)))
            slots = self.slot_of[chunks]
            acc = np.zeros((len(chunks),) + lay.acc_shape[1:], np.float32)
            l = np.zeros((len(chunks),) + lay.row_shape[1:], np.float32)
            seen = slots >= 0
            acc[seen], l[seen] = self.acc[slots[seen]], self.l[slots[seen]]
            o = finalize(acc, l)  # [G, B, cq, N, H]
            o = np.moveaxis(o, 0, 1).reshape(lay.batch, len(chunks) * cq, lay.heads, lay.head_dim)
            lo = int(first) * cq
            hi = min(t, lo + len(chunks) * cq)
            out[:, lo:hi] = o[:, : hi - lo].astype(out.dtype)
