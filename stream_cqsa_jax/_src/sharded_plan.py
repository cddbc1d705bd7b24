"""Static side of sharded execution: which device runs which subproblem, and what moves.

Subproblems are independent, so a plan's subproblems can be spread over the
``D`` devices of one mesh axis and computed without communication. Causal
and windowed plans have unequal subproblems, so they are assigned by work:
the number of (query tile, key tile) visits the kernel makes for each
subproblem (`subproblem_work`), with a greedy longest-first rule
(`assign`). Every device then runs the same number of scan steps
(``steps``); a device with fewer subproblems is topped up with empty ones
(no pairs: nothing computed, nothing merged).

After the subproblems, each device holds partial results over the full
sequence. They are combined once, by a ring reduce-scatter along the
sequence: device ``d`` ends up owning rows ``[d * R, (d + 1) * R)`` with
``R = ceil(T / D)``. `CommunicationVolume` gives the bytes each device sends.
Everything here is NumPy and static; `sharded.py` runs it.
"""

from __future__ import annotations

import dataclasses
import functools

import jax.numpy as jnp
import numpy as np

from .budget import format_bytes
from .kernels.base import accumulator_dtype


def slot_work(plan) -> np.ndarray:
    """int64 [n, Mq]: (query tile, key tile) visits of each live subproblem's query slots.

    It mirrors the kernels' tile walk (``kernels/tiles.py``): a query tile
    holding real rows visits the key tiles of its chunk pairs that the static
    band allows. Pairs visible everywhere cost every tile; the few partly
    masked pairs (diagonal, window edges, padding) are counted tile by tile.
    Segment ids and per-example lengths are data and are not counted.
    """
    sched = plan.schedule
    n = sched.num_subproblems
    if n == 0:
        return np.zeros((0, sched.max_q_slots), np.int64)
    cq, ck, bq, bk = plan.q_chunk, plan.kv_chunk, plan.block_q, plan.block_kv
    q_tiles, kv_tiles = cq // bq, ck // bk
    live = np.arange(sched.max_pairs)[None, None, :] < sched.pair_count[:, :, None]
    q_chunk = np.broadcast_to(sched.q_slots[:, :, None].astype(np.int64), live.shape)
    kv_chunk = np.take_along_axis(sched.kv_slots[:, None, :], sched.pair_kv.reshape(n, 1, -1), axis=2)
    kv_chunk = kv_chunk.reshape(live.shape).astype(np.int64)
    # Pairs visible everywhere: every key tile, for each query tile with a real row.
    real_q_tiles = np.clip(-(-(plan.q_len - q_chunk * cq) // bq), 0, q_tiles)
    work = np.where(live & sched.pair_full, real_q_tiles * kv_tiles, 0).sum(axis=2)

    s, j, p = np.nonzero(live & ~sched.pair_full)
    a, b = q_chunk[s, j, p][:, None], kv_chunk[s, j, p][:, None]
    start = a * cq + np.arange(q_tiles, dtype=np.int64)[None, :] * bq
    q_last = np.minimum(start + bq, plan.q_len) - 1
    lo, hi = plan.band.key_span(start, q_last, np)
    hi = np.minimum(hi, plan.kv_len - 1)
    empty = (q_last < start) | (hi < lo)
    first = np.clip((lo - b * ck) // bk, 0, kv_tiles)
    last = np.clip((hi - b * ck) // bk + 1, 0, kv_tiles)
    np.add.at(work, (s, j), np.where(empty, 0, np.maximum(last - first, 0)).sum(axis=1))
    return work.astype(np.int64)


def subproblem_work(plan) -> np.ndarray:
    """int64 [n]: tile visits of each live subproblem, in plan order (see `slot_work`)."""
    return slot_work(plan).sum(axis=1)


Piece = tuple  # (subproblem index, first query slot, stop query slot)


def _piece_tables(schedule, piece: Piece) -> tuple[np.ndarray, ...]:
    """One schedule row restricted to query slots ``[first, stop)``; -1 as index: an empty row."""
    s, first, stop = piece
    names = ("q_slots", "kv_slots", "pair_count", "pair_kv", "pair_full", "kv_pair_count", "kv_pair_q")
    if s < 0:
        return tuple(np.zeros(getattr(schedule, name).shape[1:], getattr(schedule, name).dtype) for name in names)
    q_slots, kv_slots, pair_count, pair_kv, pair_full, kv_pair_count, kv_pair_q = (
        getattr(schedule, name)[s].copy() for name in names
    )
    keep = (np.arange(len(pair_count)) >= first) & (np.arange(len(pair_count)) < stop)
    pair_count[~keep] = 0
    pair_kv[~keep] = 0
    pair_full[~keep] = False
    for j in range(len(kv_pair_count)):
        visitors = kv_pair_q[j, : kv_pair_count[j]]
        visitors = visitors[(visitors >= first) & (visitors < stop)]
        kv_pair_q[j] = 0
        kv_pair_q[j, : len(visitors)] = visitors
        kv_pair_count[j] = len(visitors)
    return q_slots, kv_slots, pair_count, pair_kv, pair_full, kv_pair_count, kv_pair_q


@dataclasses.dataclass(frozen=True, eq=False)
class DeviceAssignment:
    """Work per device along one mesh axis.

    Attributes:
      num_devices: D.
      pieces: for each device, its pieces ``(subproblem, first, stop)`` in
        plan order: subproblem ``subproblem`` restricted to its query slots
        ``first <= j < stop`` (usually all of them).
      work: int64 [D]: tile visits per device (see `slot_work`).
    """

    num_devices: int
    pieces: tuple[tuple[Piece, ...], ...]
    work: np.ndarray

    @property
    def steps(self) -> int:
        """Scan steps every device runs: the most pieces any device holds (at least 1)."""
        return max(1, max(len(p) for p in self.pieces))

    @property
    def split_subproblems(self) -> int:
        """Subproblems whose query slots are spread over more than one device."""
        seen = [{p[0] for p in dev if p[0] >= 0} for dev in self.pieces]
        return sum(1 for s in set().union(*seen) if sum(s in dev for dev in seen) > 1)

    @property
    def balance(self) -> float:
        """max / mean of the per-device work (1.0 is perfect; 1.0 when there is no work)."""
        mean = float(self.work.mean())
        return float(self.work.max()) / mean if mean > 0 else 1.0

    def tables(self, schedule) -> tuple[np.ndarray, ...]:
        """The executor's tables stacked per device: each [D, steps, ...].

        Same order as `executor.schedule_tables`; devices with fewer pieces
        are topped up with empty rows (zero pairs).
        """
        rows = []
        for dev in self.pieces:
            padded = list(dev) + [(-1, 0, 0)] * (self.steps - len(dev))
            rows.append([_piece_tables(schedule, p) for p in padded])
        return tuple(np.stack([np.stack([r[i] for r in dev]) for dev in rows]) for i in range(7))


def _check_devices(num_devices) -> int:
    if isinstance(num_devices, bool) or not isinstance(num_devices, (int, np.integer)) or num_devices < 1:
        raise ValueError(f"num_devices must be a positive int, got {num_devices!r}")
    return int(num_devices)


@functools.lru_cache(maxsize=64)
def assign(plan, num_devices: int) -> DeviceAssignment:
    """Spreads `plan`'s work evenly over `num_devices` devices (deterministic).

    The subproblems' query slots, in plan order, are cut into `num_devices`
    contiguous runs of nearly equal work (McNaughton's wrap-around rule): each
    cut falls on the query-slot boundary closest to an exact multiple of the
    mean. A device's load is then within one query slot's work of the mean,
    and at most ``num_devices - 1`` subproblems are shared by two devices
    (each computes some of its query slots; the pairs stay disjoint).
    """
    num_devices = _check_devices(num_devices)
    work = slot_work(plan)
    n, mq = work.shape
    count = plan.schedule.pair_count
    units = [(s, j) for s in range(n) for j in range(mq) if count[s, j] > 0]
    unit_work = np.array([work[s, j] for s, j in units], np.int64)
    ends = np.cumsum(unit_work)
    total = int(ends[-1]) if len(ends) else 0
    bounds = np.concatenate([[0], ends])
    # cuts[d]: index of the first unit of device d.
    cuts = [0]
    for d in range(1, num_devices):
        target = total * d / num_devices
        cut = int(np.argmin(np.abs(bounds - target)))
        cuts.append(max(cut, cuts[-1]))
    cuts.append(len(units))
    pieces, load = [], np.zeros(num_devices, np.int64)
    for d in range(num_devices):
        mine = units[cuts[d] : cuts[d + 1]]
        load[d] = unit_work[cuts[d] : cuts[d + 1]].sum()
        dev: list[Piece] = []
        for s, j in mine:
            if dev and dev[-1][0] == s:
                dev[-1] = (s, dev[-1][1], j + 1)
            else:
                dev.append((s, j, j + 1))
        # A piece holding every live slot of its subproblem is the whole subproblem.
        dev = [(s, 0, mq) if all(count[s, i] == 0 or first <= i < stop for i in range(mq)) else (s, first, stop)
               for s, first, stop in dev]
        pieces.append(tuple(dev))
    load.setflags(write=False)
    return DeviceAssignment(num_devices, tuple(pieces), load)


def owned_rows(length: int, num_devices: int) -> int:
    """Rows each device owns after the reduce-scatter: ``ceil(length / num_devices)``."""
    return -(-length // num_devices)


@dataclasses.dataclass(frozen=True)
class CommunicationVolume:
    """Bytes each device sends in one call (ring algorithms, ``D`` devices).

    Attributes:
      forward: the merge of softmax states (ring reduce-scatter of acc, m, l).
      backward: the sum of dq, dk, dv (ring reduce-scatter).
      backward_inputs: the all-gather of dO and the row statistics (m, l,
        delta) that the backward needs on every device when they arrive
        sharded along the sequence, as the forward leaves them.
      allreduce_forward, allreduce_backward: the same merges done as a full
        all-reduce of full-length accumulators on every device, for comparison.
    """

    forward: int
    backward: int
    backward_inputs: int
    allreduce_forward: int
    allreduce_backward: int


def communication_volume(plan, num_devices: int) -> CommunicationVolume:
    """Per-device bytes sent by sharded execution of `plan` over `num_devices` devices."""
    d = _check_devices(num_devices)
    f = jnp.dtype(accumulator_dtype(plan.dtype)).itemsize
    it = jnp.dtype(plan.dtype).itemsize
    b, n, kh, h = plan.batch, plan.num_q_heads, plan.num_kv_heads, plan.head_dim
    tr, sr = d * owned_rows(plan.q_len, d), d * owned_rows(plan.kv_len, d)
    share = (d - 1) / d  # a ring reduce-scatter or all-gather sends this share; an all-reduce twice it
    state = b * n * (h + 2) * f
    grads = b * (plan.q_len * n * h + 2 * plan.kv_len * kh * h) * f
    return CommunicationVolume(
        forward=int(share * tr * state),
        backward=int(share * b * (tr * n * h + 2 * sr * kh * h) * f),
        backward_inputs=int(share * tr * b * n * (h * it + 3 * f)),
        allreduce_forward=int(2 * share * plan.q_len * state),
        allreduce_backward=int(2 * share * grads),
    )


@dataclasses.dataclass(frozen=True, eq=False)
class ShardedPlan:
    """A plan spread over ``num_devices`` devices: the assignment of both passes and the traffic.

    Attributes:
      plan: the forward plan.
      num_devices: devices along the subproblem axis.
      forward, backward: `DeviceAssignment` of the forward plan and of `plan.backward()`.
      communication: `CommunicationVolume` per device.
    """

    plan: object
    num_devices: int
    forward: DeviceAssignment
    backward: DeviceAssignment
    communication: CommunicationVolume

    @property
    def balance(self) -> float:
        """max / mean per-device work of the forward pass."""
        return self.forward.balance

    def summary(self) -> str:
        c, fwd, bwd = self.communication, self.forward, self.backward
        lines = [
            self.plan.summary(),
            f"Sharded over {self.num_devices} devices (subproblems balanced by tile work)",
            f"  forward    : {fwd.steps} subproblems per device, work max/mean {fwd.balance:.3f}; merge sends "
            f"{format_bytes(c.forward)} per device (all-reduce: {format_bytes(c.allreduce_forward)})",
            f"  backward   : {bwd.steps} subproblems per device, work max/mean {bwd.balance:.3f}; sum sends "
            f"{format_bytes(c.backward)} per device (all-reduce: {format_bytes(c.allreduce_backward)}), "
            f"gathering dO and row statistics {format_bytes(c.backward_inputs)}",
        ]
        return "\n".join(lines)


def shard_plan(plan, num_devices: int) -> ShardedPlan:
    """How `plan` runs over `num_devices` devices: per-device work, balance and communication."""
    num_devices = _check_devices(num_devices)
    return ShardedPlan(
        plan, num_devices, assign(plan, num_devices), assign(plan.backward(), num_devices),
        communication_volume(plan, num_devices),
    )
