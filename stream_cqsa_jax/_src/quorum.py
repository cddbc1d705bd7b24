"""Difference covers and the cyclic-quorum ownership of chunk pairs.

Attention over ``C`` chunks is split into ``C`` subproblems.  A *difference
cover* ``D`` of a finite abelian group ``G`` (``Z_C``, or ``Z_m1 x ... x Z_mk``)
is a set with ``D - D == G``.  Subproblem ``i`` holds the quorum ``D + i``; for
every ``r`` in ``G`` we fix one representative ``(d1(r), d2(r))`` in ``D x D`` with
``d1 - d2 == r`` (``(0, 0)`` for ``r == 0``), and then subproblem ``i`` owns the
``C`` ordered chunk pairs ``(i + d1(r), i + d2(r))``: every pair ``(a, b)`` is owned
by exactly one subproblem, ``a - d1(a - b)``.

Covers come from Singer perfect difference sets (``C = q*q + q + 1``, ``q`` a
prime power; size ``q + 1``, built in ``GF(q**3)``) and, for other ``C``, from a
few constructions (sparse rulers, greedy, products, projected Singer sets) and,
for small ``C``, a deterministic tabu search.  Every cover handed out is verified.

Pure Python + NumPy.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Iterable

import numpy as np

from . import galois
from .galois import prime_power

__all__ = [
    "Cover",
    "cyclic_cover",
    "difference_cover",
    "is_difference_cover",
    "prime_power",
    "product_cover",
    "singer_difference_set",
    "singer_numbers",
    "singer_q",
]


# -- argument checks ---------------------------------------------------------------


def _check_int(value: object, name: str, minimum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        expected = "an int" if minimum is None else f"an int >= {minimum}"
        raise TypeError(f"`{name}` must be {expected}, got {type(value).__name__} {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"`{name}` must be an int >= {minimum}, got {value}")
    return int(value)


def _check_ints(values: object, name: str) -> list[int]:
    """A flat list of Python ints from an iterable of ints (or an integer array)."""
    if isinstance(values, np.ndarray):
        if values.dtype == bool or not np.issubdtype(values.dtype, np.integer):
            raise TypeError(f"`{name}` must contain ints, got an array of dtype {values.dtype}")
        return [int(v) for v in values.ravel()]
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        raise TypeError(f"`{name}` must be an iterable of ints, got {type(values).__name__}")
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise TypeError(f"`{name}` must contain ints, got {type(v).__name__} {v!r}")
        out.append(int(v))
    return out


# -- verification ---------------------------------------------------------------------


def _digits(x: np.ndarray, moduli: tuple[int, ...]) -> list[np.ndarray]:
    """Mixed-radix digits of flat encodings, most significant first."""
    out = []
    for m in reversed(moduli):
        x, d = np.divmod(x, m)
        out.append(d)
    return out[::-1]


def _undigits(digits: list[np.ndarray], moduli: tuple[int, ...]) -> np.ndarray:
    x = np.zeros(np.broadcast(*digits).shape, dtype=np.int64)
    for d, m in zip(digits, moduli):
        x = x * m + d
    return x


def _group_op(x: np.ndarray, y: np.ndarray, moduli: tuple[int, ...], sign: int) -> np.ndarray:
    """``x + sign * y`` in ``Z_m1 x ... x Z_mk`` on flat encodings (int64, broadcasting)."""
    if len(moduli) == 1:
        return (x + sign * y) % moduli[0]
    dx, dy = _digits(x, moduli), _digits(y, moduli)
    return _undigits([(a + sign * b) % m for a, b, m in zip(dx, dy, moduli)], moduli)


def _covers(elements: np.ndarray, moduli: tuple[int, ...]) -> bool:
    """Whether ``elements - elements`` is the whole group (elements distinct, in range)."""
    n, k = math.prod(moduli), len(elements)
    if k == 0 or k * (k - 1) + 1 < n:
        return False
    if k * k <= 8 * n or n > 1 << 22:  # direct, in row blocks to bound memory
        seen = np.zeros(n, dtype=bool)
        step = max(1, (1 << 22) // k)
        for lo in range(0, k, step):
            seen[_group_op(elements[lo : lo + step, None], elements[None, :], moduli, -1)] = True
        return bool(seen.all())
    box = np.zeros(moduli, dtype=np.float64)  # dense sets: autocorrelation by FFT
    box[tuple(_digits(elements, moduli))] = 1.0
    axes = tuple(range(len(moduli)))
    spec = np.fft.rfftn(box, axes=axes)
    counts = np.fft.irfftn(spec * spec.conj(), s=moduli, axes=axes)
    return bool(counts.min() > 0.5)


def is_difference_cover(elements: Iterable[int], num_chunks: int) -> bool:
    """Whether every residue mod ``num_chunks`` is ``d1 - d2`` for some ``d1, d2`` in ``elements``.

    Elements are taken mod ``num_chunks``; duplicates are fine; the empty set is not a cover.
    """
    n = _check_int(num_chunks, "num_chunks", 1)
    values = np.unique(np.asarray(_check_ints(elements, "elements"), dtype=np.int64) % n)
    return _covers(values, (n,))


# -- Singer perfect difference sets ------------------------------------------------------


def singer_q(num_chunks: int) -> int | None:
    """``q`` if ``num_chunks == q*q + q + 1`` with ``q`` a prime power, else ``None``."""
    n = _check_int(num_chunks, "num_chunks")
    if n < 7:
        return None
    root = math.isqrt(4 * n - 3)
    if root * root != 4 * n - 3:
        return None
    q = (root - 1) // 2
    return q if prime_power(q) is not None else None


def singer_numbers(limit: int) -> tuple[int, ...]:
    """All Singer numbers ``q*q + q + 1 <= limit`` (``q`` a prime power), ascending."""
    limit = _check_int(limit, "limit")
    out, q = [], 2
    while q * q + q + 1 <= limit:
        if prime_power(q) is not None:
            out.append(q * q + q + 1)
        q += 1
    return tuple(out)


@functools.lru_cache(maxsize=None)
def singer_difference_set(q: int) -> tuple[int, ...]:
    """Perfect difference set mod ``q*q + q + 1`` of size ``q + 1``, containing 0, sorted.

    Built in ``GF(q**3) = GF(p**(3e))`` with primitive element ``g``: the exponents
    ``0 <= i < q*q + q + 1`` with ``Tr(g**i) == 0`` (trace down to ``GF(q)``, a
    ``GF(q)``-linear functional) form a Singer difference set.  Every nonzero
    residue is checked to occur exactly once as a difference.
    """
    q = _check_int(q, "q")
    pe = prime_power(q)
    if pe is None:
        raise ValueError(f"`q` must be a prime power (p**e, p prime, e >= 1), got {q}")
    n = q * q + q + 1
    exps = galois.singer_exponents(q)
    elements = np.sort((exps - exps[0]) % n)
    counts = np.bincount(((elements[:, None] - elements[None, :]) % n).ravel(), minlength=n)
    if len(elements) != q + 1 or counts[0] != q + 1 or not np.all(counts[1:] == 1):
        raise AssertionError(f"Singer construction failed for q={q}")  # a bug, not bad input
    return tuple(int(x) for x in elements)


# -- covers of Z_C for other C -------------------------------------------------------------


def _lower_bound(n: int) -> int:
    """Smallest ``k`` with ``k * (k - 1) + 1 >= n`` (no cover of ``Z_n`` is smaller)."""
    k = (1 + math.isqrt(max(4 * n - 3, 0))) // 2
    while k * (k - 1) + 1 < n:
        k += 1
    return k


def _uncovered(elements: np.ndarray, n: int) -> np.ndarray:
    """Boolean ``[n]``: residues that are not a difference of ``elements``."""
    seen = np.zeros(n, dtype=bool)
    seen[((elements[:, None] - elements[None, :]) % n).ravel()] = True
    return ~seen


def _gains(elements: np.ndarray, uncovered: np.ndarray, n: int) -> np.ndarray:
    """int64 ``[n]``: how many uncovered residues adding ``y`` would cover, for every ``y``.

    The new differences are ``+-(y - a)``; with ``U`` symmetric this is
    ``2 * #{r in U: y - r in A} - #{r in U: y - r in A and y + r in A}``.
    """
    r = np.flatnonzero(uncovered)
    gain = 2 * np.bincount(((r[:, None] + elements[None, :]) % n).ravel(), minlength=n)
    y, r1 = _midpoints(elements, n)
    hit = uncovered[r1]
    return gain - np.bincount(y[hit], minlength=n)


def _midpoints(elements: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """All ``(y, y - a1)`` with ``2y == a1 + a2`` over ordered pairs ``(a1, a2)`` of elements."""
    a1 = elements[:, None]
    s = a1 + elements[None, :]
    if n % 2:
        y = (s * ((n + 1) // 2)) % n
        return y.ravel(), ((y - a1) % n).ravel()
    even = s % 2 == 0
    y = s[even] // 2
    r = y - np.broadcast_to(a1, s.shape)[even]
    return np.concatenate([y, y + n // 2]) % n, np.concatenate([r, r + n // 2]) % n


def _complete(elements: Iterable[int], n: int) -> np.ndarray:
    """Greedily add elements until the set covers ``Z_n``, then drop redundant ones."""
    e = np.unique(np.asarray(list(elements), dtype=np.int64) % n)
    unc = _uncovered(e, n)
    while unc.any():
        gain = _gains(e, unc, n)
        gain[e] = -1
        e = np.append(e, int(np.argmax(gain)))
        unc = _uncovered(e, n)
    while len(e) > 1:  # prune: drop the largest element that no residue depends on alone
        k = len(e)
        i, j = np.nonzero(~np.eye(k, dtype=bool))
        diff = (e[i] - e[j]) % n
        count = np.bincount(diff, minlength=n)
        mine = np.bincount(np.concatenate([i, j]) * n + np.tile(diff, 2), minlength=k * n).reshape(k, n)
        needed = ((mine == count) & (count > 0)).any(axis=1)
        spare = np.flatnonzero(~needed)
        if not len(spare):
            break
        e = np.delete(e, spare[-1])
    return np.sort(e)


def _wichmann(n: int) -> np.ndarray:
    """A Wichmann sparse ruler covering all distances ``1 .. n // 2`` (so a cover of ``Z_n``)."""
    need, best = n // 2, None
    for r in range(0, math.isqrt(need) + 2):
        s = max(0, -(-(need - 4 * r * r - 8 * r - 3) // (4 * r + 3)))
        if best is None or 4 * r + s < best[0]:
            best = (4 * r + s, r, s)
    _, r, s = best
    gaps = [1] * r + [r + 1] + [2 * r + 1] * r + [4 * r + 3] * s + [2 * r + 2] * (r + 1) + [1] * r
    marks = np.concatenate([[0], np.cumsum(gaps)])
    return np.unique(marks % n)


def _cheap(n: int) -> bool:
    """Whether ``difference_cover(n)`` is quick to build (small, or a Singer number)."""
    return n <= _SEARCH_LIMIT or singer_q(n) is not None


def _products(n: int) -> list[np.ndarray]:
    """``A + a * B`` for ``n = a * b``, ``A`` / ``B`` covers of ``Z_a`` / ``Z_b``: a cover of ``Z_n``.

    (For ``t`` in ``Z_n`` pick ``a1 - a2 == t (mod a)``; then ``t - (a1 - a2) == a * j``
    and ``b1 - b2 == j (mod b)`` finishes it.)  Only cheap factors are used.
    """
    out = []
    for a in range(2, n // 2 + 1):
        if n % a == 0 and _cheap(a) and _cheap(n // a):
            da, db = np.array(difference_cover(a)), np.array(difference_cover(n // a))
            out.append(np.sort((da[:, None] + a * db[None, :]).ravel()))
    return out


def _projections(n: int, rng: np.random.Generator, bound: int) -> list[np.ndarray]:
    """Affine images ``t * S + s`` of the nearest Singer sets, read mod ``n``, completed.

    A Singer set ``S`` mod ``v`` (``v`` near ``n``) read as integers mod ``n`` leaves
    few residues uncovered for the best multiplier ``t`` and shift ``s``; the
    best few images per multiplier are completed greedily, unless they cannot
    beat ``bound`` elements.  Multipliers are taken one per class of ``<q, -1>``
    (the others give translates or mirror images).
    """
    near = [v for v in singer_numbers(2 * n) if n / 1.8 <= v <= 1.6 * n]
    out = []
    for v in sorted(near, key=lambda v: abs(v - n))[:_NEAREST]:
        q = singer_q(v)
        base = np.array(singer_difference_set(q), dtype=np.int64)
        k = len(base)
        i, j = np.triu_indices(k, 1)
        shifts = np.arange(v)
        if v * len(i) > _PROJECTION_WORK:
            shifts = np.sort(rng.choice(v, _PROJECTION_WORK // len(i), replace=False))
        rows = np.arange(len(shifts))[:, None] * (n // 2 + 1)
        for t in _multiplier_classes(v, q, _MULTIPLIERS if v < 1000 else 2):
            sets = (t * base[None, :] + shifts[:, None]) % v % n  # [shifts, k]
            diff = (sets[:, i] - sets[:, j]) % n
            half = np.minimum(diff, n - diff)  # +-r covered together: count r <= n/2
            seen = np.bincount((rows + half).ravel(), minlength=len(shifts) * (n // 2 + 1))
            covered = np.count_nonzero(seen.reshape(len(shifts), -1)[:, 1:], axis=1)
            for s in np.argsort(-covered, kind="stable")[:_KEEP]:
                if _completion_bound(sets[s], n) < bound:
                    out.append(_complete(sets[s], n))
                    bound = min(bound, len(out[-1]))
    return out


def _completion_bound(elements: np.ndarray, n: int) -> int:
    """A quick lower bound on the size ``_complete`` can reach from ``elements`` (before pruning).

    The ``i``-th added element covers at most ``g + 2 * i`` new residues, ``g`` the best
    gain of a single element now.
    """
    e = np.unique(elements)
    unc = _uncovered(e, n)
    left = int(np.count_nonzero(unc))
    if left == 0:
        return len(e)
    g = int(_gains(e, unc, n).max())
    added = 0
    while left > 0:
        left -= g + 2 * added
        added += 1
    return len(e) + added


def _multiplier_classes(v: int, q: int, count: int) -> list[int]:
    """The first ``count`` units mod ``v``, one per coset of the subgroup ``<q, -1>``."""
    seen, out = set(), []
    for t in range(1, v):
        if len(out) == count:
            break
        if math.gcd(t, v) == 1 and t not in seen:
            out.append(t)
            for u in (t, v - t):
                seen.update((u, u * q % v, u * q * q % v))
    return out


def _tabu(n: int, start: np.ndarray, fixed: int, rng: np.random.Generator, iters: int) -> np.ndarray | None:
    """Tabu search for a cover of ``Z_n`` of size ``len(start)``; swaps one element per step.

    Minimises the number of uncovered residues.  Each step scores every swap
    (element ``x`` out, residue ``y`` in) exactly and in bulk: removing ``x`` leaves
    ``U_x`` uncovered and ``y`` then covers ``2 * N1 - O`` of it (see ``_gains``).
    ``start[:fixed]`` never moves; a removed element may not come back for a few steps.
    """
    d = np.array(start, dtype=np.int64)
    k, m = len(d), len(d) - fixed
    pi, pj = np.nonzero(~np.eye(k, dtype=bool))
    owners = np.concatenate([pi, pj]) * n
    movable = np.arange(fixed, k)[:, None]
    tabu_until = np.zeros(n, dtype=np.int64)
    a1, a2 = np.divmod(np.arange(k * k), k)  # ordered pairs, for the O term
    if n % 2 == 0:
        a1, a2 = np.tile(a1, 2), np.tile(a2, 2)
    best, big = n, 1 << 40
    for step in range(iters):
        diff = (d[pi] - d[pj]) % n
        count = np.bincount(diff, minlength=n)
        count[0] = 1
        missing = n - np.count_nonzero(count)
        if missing == 0:
            return np.sort(d)
        best = min(best, missing)
        mine = np.bincount(owners + np.concatenate([diff, diff]), minlength=k * n).reshape(k, n)
        lost = mine[fixed:] == count  # [m, n]: uncovered once element fixed + i is gone
        xi, r = np.nonzero(lost)
        n1 = np.bincount((((r[:, None] + d[None, :]) % n) + (xi * n)[:, None]).ravel(), minlength=m * n)
        n1 -= np.bincount(xi * n + (r + d[xi + fixed]) % n, minlength=m * n)  # a == x itself
        s = d[a1] + d[a2]  # midpoints y of (a1, a2): 2y == a1 + a2, one or two roots
        if n % 2:
            y, ok = (s * ((n + 1) // 2)) % n, slice(None)
        else:
            ok = np.flatnonzero(s % 2 == 0)
            y = (s[ok] // 2 + np.where(ok < k * k, 0, n // 2)) % n
        r1 = (y - d[a1[ok]]) % n
        hx, hp = np.nonzero(lost[:, r1] & (movable != a1[ok]) & (movable != a2[ok]))
        gain = 2 * n1 - np.bincount(hx * n + y[hp], minlength=m * n)
        score = np.count_nonzero(lost, axis=1)[:, None] - gain.reshape(m, n)  # uncovered after swap
        score[:, d] = big
        free = score + np.where(tabu_until > step, big, 0)
        low = free.min()
        if score.min() < min(best, low):  # aspiration: a tabu move that beats the best so far
            free, low = score, score.min()
        options = np.flatnonzero(free.ravel() == low)
        i, y_new = divmod(int(options[rng.integers(len(options))]), n)
        tabu_until[d[i + fixed]] = step + 1 + k // 3 + rng.integers(0, 1 + k // 3)
        d[i + fixed] = y_new
    return None


def _greedy(n: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """``{0, 1}`` grown to ``size`` elements, each time by a residue covering the most
    uncovered differences (ties broken by ``rng``)."""
    e = np.array([0, 1], dtype=np.int64)[:size]
    while len(e) < size:
        unc = _uncovered(e, n)
        gain = _gains(e, unc, n)
        gain[e] = -1
        options = np.flatnonzero(gain == gain.max())
        e = np.append(e, options[rng.integers(len(options))])
    return e


def _search(n: int) -> np.ndarray:
    """A small cover of ``Z_n`` (``n`` not a Singer number), as an int64 array.

    The smallest of: a Wichmann ruler and a greedy cover (both pruned), products of
    covers of the factors of ``n``, and projected Singer sets.  For ``n <= 100`` a
    tabu search then tries sizes upwards from the lower bound (the optimum there is
    the bound or one more).  Budgets are step counts and the generator is seeded by
    ``n``, so the result is deterministic.
    """
    rng = np.random.default_rng(n)
    lb = _lower_bound(n)
    if n > _CONSTRUCT_LIMIT:  # huge groups: the ruler, or a product of cheap covers
        return min([_wichmann(n), *_products(n)], key=len)
    cands = [_complete(_wichmann(n), n), _complete([0, 1], n), *_products(n)]
    cands += _projections(n, rng, min(map(len, cands)))
    best = min(cands, key=len)
    if n <= _SEARCH_LIMIT:
        slack = lb * (lb - 1) + 1 - n  # spare differences at the bound: little slack, rarely feasible
        for size in range(lb, len(best)):
            steps = min(_STEPS, 50 + 10 * slack * slack) if size == lb else _STEPS
            found = _tabu(n, _greedy(n, size, rng), 2, rng, steps)
            if found is not None:
                return found
    return best


_SEARCH_LIMIT = 100  # tabu search up to here; above, constructions only
_STEPS = 600  # tabu steps per size tried
_MULTIPLIERS = 8  # multiplier classes tried per Singer set (v < 1000)
_KEEP = 2  # best images completed per Singer set and multiplier
_NEAREST = 2  # Singer sets projected
_PROJECTION_WORK = 1 << 18  # differences scored per Singer set and multiplier
_CONSTRUCT_LIMIT = 1 << 15  # above: no greedy / projections (too slow), ruler or products


@functools.lru_cache(maxsize=None)
def difference_cover(num_chunks: int) -> tuple[int, ...]:
    """A small difference cover of ``Z_num_chunks``: sorted, distinct, in range, contains 0.

    Singer numbers get a perfect difference set (size ``q + 1``, optimal).  Other sizes
    get the best of a few constructions (see ``_search``), plus a bounded, seeded tabu
    search for ``num_chunks <= 100``; the result is deterministic.  Always verified.
    The size is at least ``k`` with ``k * (k - 1) + 1 >= num_chunks``.
    """
    n = _check_int(num_chunks, "num_chunks", 1)
    if n <= 2:
        return tuple(range(n))
    q = singer_q(n)
    if q is not None:
        return singer_difference_set(q)
    best = _search(n)
    elements = np.sort((best - best[0]) % n)
    if elements[0] != 0 or not _covers(elements, (n,)):
        raise AssertionError(f"difference cover search failed for num_chunks={n}")  # a bug
    return tuple(int(x) for x in elements)


# -- covers of Z_m1 x ... x Z_mk and pair ownership -------------------------------------------


@dataclasses.dataclass(frozen=True)
class Cover:
    """A verified difference cover of the group ``Z_m1 x ... x Z_mk``.

    Group elements are flat ints in mixed radix, most significant digit first:
    ``x = ((d1 * m2 + d2) * m3 + d3) ...``; for one modulus this is the residue.
    ``elements`` is normalised to a sorted tuple of distinct ints; it must contain 0.

    Subproblem ``i`` (``0 <= i < num_chunks``) holds the quorum ``elements + i``
    and owns the pairs ``(i + d1(r), i + d2(r))`` for every ``r``, where
    ``(d1(r), d2(r))`` are the :meth:`representatives`.
    """

    moduli: tuple[int, ...]
    elements: tuple[int, ...]

    def __post_init__(self):
        moduli = self.moduli
        if isinstance(moduli, (int, np.integer)) and not isinstance(moduli, bool):
            moduli = (moduli,)
        moduli = tuple(_check_ints(moduli, "moduli"))
        if not moduli or min(moduli) < 1:
            raise ValueError(f"`moduli` must be a non-empty sequence of ints >= 1, got {self.moduli!r}")
        n = math.prod(moduli)
        elements = sorted(set(_check_ints(self.elements, "elements")))
        if elements and (elements[0] < 0 or elements[-1] >= n):
            got = f"{elements[0]} .. {elements[-1]}"
            raise ValueError(f"`elements` must lie in [0, {n}) (flat encodings), got {got}")
        if 0 not in elements:
            raise ValueError("`elements` must contain 0 (translate the cover so that it does)")
        if not _covers(np.asarray(elements, dtype=np.int64), moduli):
            raise ValueError(f"`elements` is not a difference cover of Z_{' x Z_'.join(map(str, moduli))}")
        object.__setattr__(self, "moduli", moduli)
        object.__setattr__(self, "elements", tuple(elements))

    @property
    def num_chunks(self) -> int:
        """Order of the group (the number of chunks and of subproblems)."""
        return math.prod(self.moduli)

    @property
    def size(self) -> int:
        """Number of elements (chunks held by each subproblem)."""
        return len(self.elements)

    @property
    def depth(self) -> int:
        """Number of cyclic factors."""
        return len(self.moduli)

    def _members(self, x: object, name: str) -> np.ndarray:
        x = np.asarray(x)
        if x.dtype == bool or not np.issubdtype(x.dtype, np.integer):
            raise TypeError(f"`{name}` must be ints (group elements), got dtype {x.dtype}")
        x = x.astype(np.int64)
        if x.size and (x.min() < 0 or x.max() >= self.num_chunks):
            got = f"[{x.min()}, {x.max()}]"
            raise ValueError(f"`{name}` must lie in [0, {self.num_chunks}), got values in {got}")
        return x

    def add(self, x: object, y: object) -> np.ndarray:
        """Group sum of flat encodings; int64, shapes broadcast."""
        return _group_op(self._members(x, "x"), self._members(y, "y"), self.moduli, 1)

    def sub(self, x: object, y: object) -> np.ndarray:
        """Group difference ``x - y`` of flat encodings; int64, shapes broadcast."""
        return _group_op(self._members(x, "x"), self._members(y, "y"), self.moduli, -1)

    def representatives(self) -> np.ndarray:
        """int64 ``[num_chunks, 2]``: row ``r`` is ``(d1, d2)``, both in the cover, ``d1 - d2 == r``.

        ``d1`` is the smallest element with ``d1 - r`` in the cover, so row 0 is
        ``(0, 0)``.  For a product of covers this rule works digit by digit, so
        ownership in a product is ownership in each factor.  Cached; read-only.
        """
        return _representatives(self)

    def owner(self, a: object, b: object) -> np.ndarray:
        """Subproblem owning the chunk pair ``(a, b)``: ``a - d1(a - b)``; int64, broadcasting."""
        a, b = self._members(a, "a"), self._members(b, "b")
        d1 = self.representatives()[_group_op(a, b, self.moduli, -1), 0]
        return _group_op(a, d1, self.moduli, -1)

    def owned_pairs(self, i: int) -> np.ndarray:
        """int64 ``[num_chunks, 2]``: row ``r`` is ``(i + d1(r), i + d2(r))``, owned by subproblem ``i``."""
        i = self._subproblem(i)
        return _group_op(np.int64(i), self.representatives(), self.moduli, 1)

    def quorum(self, i: int) -> np.ndarray:
        """int64 ``[size]``: the chunks ``i + elements`` held by subproblem ``i``, sorted."""
        i = self._subproblem(i)
        return np.sort(_group_op(np.int64(i), np.asarray(self.elements, dtype=np.int64), self.moduli, 1))

    def _subproblem(self, i: object) -> int:
        i = _check_int(i, "i", 0)
        if i >= self.num_chunks:
            raise ValueError(f"`i` must be a subproblem index in [0, {self.num_chunks}), got {i}")
        return i


@functools.lru_cache(maxsize=64)
def _representatives(cover: Cover) -> np.ndarray:
    elements = np.asarray(cover.elements, dtype=np.int64)
    n, k = cover.num_chunks, len(elements)
    first = np.full(n, -1, dtype=np.int64)  # index of d1(r) in elements
    step = max(1, (1 << 22) // k)
    for lo in range(0, k, step):  # ascending d1, so the first hit is the smallest
        diffs = _group_op(elements[lo : lo + step, None], elements[None, :], cover.moduli, -1).ravel()
        r, at = np.unique(diffs, return_index=True)
        new = first[r] < 0
        first[r[new]] = lo + at[new] // k
    d1 = elements[first]
    reps = np.stack([d1, _group_op(d1, np.arange(n, dtype=np.int64), cover.moduli, -1)], axis=1)
    reps.setflags(write=False)
    return reps


@functools.lru_cache(maxsize=None)
def cyclic_cover(num_chunks: int) -> Cover:
    """``Cover((num_chunks,), difference_cover(num_chunks))``."""
    n = _check_int(num_chunks, "num_chunks", 1)
    return Cover((n,), difference_cover(n))


@functools.lru_cache(maxsize=None)
def full_cover(num_chunks: int) -> Cover:
    """``Cover((num_chunks,), range(num_chunks))``: every quorum holds every chunk, and quorum ``i``
    owns exactly the pairs ``(i, b)`` (every difference's representative starts at 0)."""
    n = _check_int(num_chunks, "num_chunks", 1)
    return Cover((n,), tuple(range(n)))


def product_cover(*covers: Cover) -> Cover:
    """Cover of the product group: moduli concatenated, elements all digit-wise combinations."""
    if not covers:
        raise ValueError("`covers` must name at least one Cover")
    for c in covers:
        if not isinstance(c, Cover):
            raise TypeError(f"`covers` must be Cover instances, got {type(c).__name__}")
    elements = np.zeros(1, dtype=np.int64)
    for c in covers:
        digits = np.asarray(c.elements, dtype=np.int64)
        elements = (elements[:, None] * c.num_chunks + digits[None, :]).ravel()
    return Cover(tuple(m for c in covers for m in c.moduli), tuple(int(x) for x in elements))
