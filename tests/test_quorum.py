"""Tests for difference covers, Singer sets and quorum ownership (stream_cqsa_jax._src.quorum)."""

import itertools
import math
import random
import time
from collections import Counter

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stream_cqsa_jax._src import galois, quorum
from stream_cqsa_jax._src.quorum import (
    Cover,
    cyclic_cover,
    difference_cover,
    is_difference_cover,
    prime_power,
    product_cover,
    singer_difference_set,
    singer_numbers,
    singer_q,
)

SINGER_Q = (2, 3, 4, 5, 7, 8, 9, 11, 13, 16, 17, 19, 23, 25, 27, 29, 31, 32)
PROPERTY = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# -- independent reference helpers (plain Python, no NumPy) ---------------------------------------


def brute_is_cover(elements, n):
    return len({(a - b) % n for a in elements for b in elements}) == n


def brute_lower_bound(n):
    k = 1
    while k * (k - 1) + 1 < n:
        k += 1
    return k


def simple_cover(n):
    """{0..s-1} U {0, s, 2s, ...}: covers every distance 1 .. n // 2, hence Z_n; best s."""
    best = None
    for s in range(1, n + 1):
        multiples = -(-(n // 2) // s)
        elements = {x % n for x in itertools.chain(range(s), range(0, (multiples + 1) * s, s))}
        if best is None or len(elements) < len(best):
            best = elements
    return best


def clear_caches():
    for f in (quorum.difference_cover, quorum.singer_difference_set, quorum.cyclic_cover,
              quorum._representatives, galois.galois_field):
        f.cache_clear()


@pytest.fixture(scope="module")
def covers_to_400():
    clear_caches()
    start = time.perf_counter()
    covers = {n: difference_cover(n) for n in range(1, 401)}
    return covers, time.perf_counter() - start


# -- difference_cover -----------------------------------------------------------------------------


def test_every_cover_up_to_400_is_valid(covers_to_400):
    covers, _ = covers_to_400
    for n, cover in covers.items():
        assert isinstance(cover, tuple) and all(type(x) is int for x in cover), n
        assert cover[0] == 0 and list(cover) == sorted(set(cover)), n
        assert 0 <= min(cover) and max(cover) < n, n
        assert brute_is_cover(cover, n), n
        assert is_difference_cover(cover, n), n


def test_cover_sizes(covers_to_400):
    covers, _ = covers_to_400
    excess = {n: len(c) - brute_lower_bound(n) for n, c in covers.items()}
    assert min(excess.values()) >= 0
    assert all(excess[n] <= 1 for n in range(1, 101)), "the optimum is at most lb + 1 for n <= 100"
    assert max(excess.values()) <= 4
    assert sum(e <= 2 for e in excess.values()) >= 280
    for n, cover in covers.items():
        simple = simple_cover(n)
        assert brute_is_cover(simple, n)
        assert len(cover) <= len(simple), n


def test_known_small_covers():
    assert difference_cover(1) == (0,)
    assert difference_cover(2) == (0, 1)
    assert difference_cover(3) == (0, 1)
    assert [len(difference_cover(n)) for n in range(1, 14)] == [1, 2, 2, 3, 3, 3, 3, 4, 4, 4, 4, 4, 4]


def test_speed_up_to_400(covers_to_400):
    _, elapsed = covers_to_400
    assert elapsed < 60, f"difference_cover(1..400) took {elapsed:.1f}s"


@pytest.mark.parametrize("n", [1056, 2520, 4095, 4096])
def test_speed_large(n):
    start = time.perf_counter()
    cover = difference_cover(n)
    assert time.perf_counter() - start < 10
    assert cover[0] == 0 and is_difference_cover(cover, n)
    assert len(cover) <= len(simple_cover(n))


def test_deterministic():
    sample = (20, 62, 99, 150, 234, 380, 1000)
    first = [difference_cover(n) for n in sample]
    clear_caches()
    assert [difference_cover(n) for n in sample] == first
    assert [difference_cover(n) for n in sample] == first  # cached


# -- Singer sets ----------------------------------------------------------------------------------


@pytest.mark.parametrize("q", SINGER_Q)
def test_singer_sets_are_perfect(q):
    clear_caches()
    start = time.perf_counter()
    cover = singer_difference_set(q)
    assert time.perf_counter() - start < 5
    n = q * q + q + 1
    assert len(cover) == q + 1 and cover[0] == 0 and list(cover) == sorted(set(cover))
    counts = Counter((a - b) % n for a in cover for b in cover if a != b)
    assert sorted(counts) == list(range(1, n)) and set(counts.values()) == {1}
    assert singer_q(n) == q
    assert difference_cover(n) == cover


def test_singer_numbers_and_q():
    assert singer_numbers(100) == (7, 13, 21, 31, 57, 73, 91)
    assert singer_numbers(6) == ()
    expected = tuple(q * q + q + 1 for q in range(2, 40) if prime_power(q) and q * q + q + 1 <= 1200)
    assert singer_numbers(1200) == expected
    for n in (1, 2, 3, 6, 43, 111, 157, 100):  # q = 1, 6, 10, 12 are not prime powers
        assert singer_q(n) is None
    assert singer_q(1057) == 32


def test_prime_power():
    assert prime_power(2) == (2, 1)
    assert prime_power(32) == (2, 5)
    assert prime_power(49) == (7, 2)
    assert prime_power(97) == (97, 1)
    for n in (-4, 0, 1, 6, 12, 100):
        assert prime_power(n) is None
    with pytest.raises(TypeError):
        prime_power(4.0)


@pytest.mark.parametrize("q", [0, 1, 6, 10, 12, -3])
def test_singer_rejects_non_prime_powers(q):
    with pytest.raises(ValueError, match="`q`"):
        singer_difference_set(q)


@pytest.mark.parametrize("p,n", [(2, 2), (2, 3), (3, 2), (5, 1)])
def test_small_fields_are_fields(p, n):
    field = galois.GaloisField(p, n)
    elements = range(field.order)
    for a, b in itertools.product(elements, repeat=2):
        assert field.mul(a, b) == field.mul(b, a)
    for a, b, c in itertools.product(elements, repeat=3):
        assert field.mul(a, field.add(b, c)) == field.add(field.mul(a, b), field.mul(a, c))
        assert field.mul(a, field.mul(b, c)) == field.mul(field.mul(a, b), c)
    assert sorted(field.codes.tolist()) == list(range(1, field.order))  # g is primitive


# -- is_difference_cover --------------------------------------------------------------------------


def test_is_difference_cover_basics():
    assert is_difference_cover([0, 1, 3], 7)
    assert is_difference_cover(np.array([3, 4, 6]), 7)
    assert is_difference_cover([7, 8, 10, 0, 0], 7)  # taken mod 7, duplicates ignored
    assert is_difference_cover(range(10), 10)
    assert is_difference_cover([0], 1) and is_difference_cover([5], 1)
    assert not is_difference_cover([], 1)
    assert not is_difference_cover([], 5)
    for n in range(2, 30):
        assert not is_difference_cover([0], n)
    assert not is_difference_cover([0, 1, 2], 7)


@given(n=st.integers(2, 120), data=st.data())
@PROPERTY
def test_is_difference_cover_rejects_sets_missing_a_difference(n, data):
    missing = data.draw(st.integers(1, n - 1))
    order = data.draw(st.permutations(range(n)))
    chosen = set()
    for x in order:  # keep every difference away from +-missing
        if (x - missing) % n not in chosen and (x + missing) % n not in chosen:
            chosen.add(x)
    assert not brute_is_cover(chosen, n)
    assert not is_difference_cover(chosen, n)
    assert not is_difference_cover(list(chosen) + [x + n for x in chosen], n)


@given(n=st.integers(1, 60), seed=st.integers(0, 2**32 - 1), density=st.floats(0.05, 0.6))
@PROPERTY
def test_is_difference_cover_matches_brute_force(n, seed, density):
    rng = random.Random(seed)
    elements = [x for x in range(n) if rng.random() < density]
    assert is_difference_cover(elements, n) == (bool(elements) and brute_is_cover(elements, n))


@pytest.mark.parametrize(
    "elements,num_chunks,error,name",
    [
        ([0], 0, ValueError, "num_chunks"),
        ([0], -3, ValueError, "num_chunks"),
        ([0], 2.0, TypeError, "num_chunks"),
        ([0], True, TypeError, "num_chunks"),
        ([0], "7", TypeError, "num_chunks"),
        ([0], None, TypeError, "num_chunks"),
        ([0, 0.5], 7, TypeError, "elements"),
        ([0, True], 7, TypeError, "elements"),
        (["a"], 7, TypeError, "elements"),
        ("013", 7, TypeError, "elements"),
        (5, 7, TypeError, "elements"),
        (None, 7, TypeError, "elements"),
        (np.array([0.0, 1.0]), 7, TypeError, "elements"),
    ],
)
def test_is_difference_cover_bad_arguments(elements, num_chunks, error, name):
    with pytest.raises(error, match=f"`{name}`"):
        is_difference_cover(elements, num_chunks)


@pytest.mark.parametrize(
    "bad,error", [(0, ValueError), (-1, ValueError), (2.0, TypeError), (True, TypeError), ("3", TypeError)]
)
def test_difference_cover_bad_arguments(bad, error):
    with pytest.raises(error, match="`num_chunks`"):
        difference_cover(bad)
    with pytest.raises(error, match="`num_chunks`"):
        cyclic_cover(bad)


# -- Cover: ownership ----------------------------------------------------------------------------


@st.composite
def cyclic_covers(draw, max_n):
    """A random cover of Z_n: a unit multiple of a translate of difference_cover(n) plus extras."""
    n = draw(st.integers(1, max_n))
    unit = draw(st.sampled_from([u for u in range(1, n + 1) if math.gcd(u, n) == 1]))
    shift = draw(st.integers(0, n - 1))
    extra = draw(st.lists(st.integers(0, n - 1), max_size=3))
    elements = {(unit * x + shift) % n for x in difference_cover(n)} | set(extra)
    anchor = draw(st.sampled_from(sorted(elements)))
    return Cover((n,), tuple(sorted((x - anchor) % n for x in elements)))


@st.composite
def covers(draw):
    depth = draw(st.integers(1, 3))
    if depth == 1:
        return draw(cyclic_covers(60))
    return product_cover(*[draw(cyclic_covers(7 if depth == 3 else 14)) for _ in range(depth)])


def check_ownership(cover):
    n = cover.num_chunks
    elements = set(cover.elements)
    reps = cover.representatives()
    assert reps.shape == (n, 2) and reps.dtype == np.int64
    assert tuple(reps[0]) == (0, 0)
    assert set(reps.ravel().tolist()) <= elements
    assert np.array_equal(cover.sub(reps[:, 0], reps[:, 1]), np.arange(n))
    a, b = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    owners = cover.owner(a, b)
    assert owners.shape == (n, n) and owners.min() >= 0 and owners.max() < n
    assert np.array_equal(np.bincount(owners.ravel(), minlength=n), np.full(n, n))  # C pairs each
    for i in range(n):
        pairs = cover.owned_pairs(i)
        assert pairs.shape == (n, 2) and pairs.dtype == np.int64
        assert np.all(owners[pairs[:, 0], pairs[:, 1]] == i)  # with the counts: owner == i <=> listed
        assert np.array_equal(cover.sub(pairs[:, 0], pairs[:, 1]), np.arange(n))  # row r has a - b == r
        quorum_i = cover.quorum(i)
        assert quorum_i.dtype == np.int64 and list(quorum_i) == sorted(set(quorum_i.tolist()))
        assert len(quorum_i) == cover.size and np.isin(pairs, quorum_i).all()
    return owners


@given(cover=covers())
@PROPERTY
def test_every_pair_has_exactly_one_owner(cover):
    check_ownership(cover)


@given(factors=st.lists(cyclic_covers(9), min_size=2, max_size=3))
@PROPERTY
def test_product_ownership_is_digitwise(factors):
    cover = product_cover(*factors)
    assert cover.moduli == tuple(m for f in factors for m in f.moduli)
    assert cover.depth == len(factors) and cover.size == math.prod(f.size for f in factors)
    assert cover.num_chunks == math.prod(f.num_chunks for f in factors)
    n = cover.num_chunks
    a, b = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    digits_a = np.unravel_index(a, cover.moduli)
    digits_b = np.unravel_index(b, cover.moduli)
    expected = np.ravel_multi_index(
        [f.owner(da, db) for f, da, db in zip(factors, digits_a, digits_b)], cover.moduli
    )
    assert np.array_equal(cover.owner(a, b), expected)


@given(cover=covers(), data=st.data())
@PROPERTY
def test_group_operations(cover, data):
    n, moduli = cover.num_chunks, cover.moduli
    x = np.array(data.draw(st.lists(st.integers(0, n - 1), min_size=1, max_size=20)))
    y = np.array(data.draw(st.lists(st.integers(0, n - 1), min_size=len(x), max_size=len(x))))
    dx, dy = np.unravel_index(x, moduli), np.unravel_index(y, moduli)
    plus = np.ravel_multi_index([(p + q) % m for p, q, m in zip(dx, dy, moduli)], moduli)
    minus = np.ravel_multi_index([(p - q) % m for p, q, m in zip(dx, dy, moduli)], moduli)
    assert np.array_equal(cover.add(x, y), plus)
    assert np.array_equal(cover.sub(x, y), minus)
    assert cover.add(x[:, None], y[None, :]).shape == (len(x), len(y))
    assert np.array_equal(cover.add(cover.sub(x, y), y), x)


def test_cover_of_seven():
    cover = cyclic_cover(7)
    assert cover == Cover((7,), (0, 1, 3)) and (cover.num_chunks, cover.size, cover.depth) == (7, 3, 1)
    assert cover.representatives().tolist() == [[0, 0], [1, 0], [3, 1], [3, 0], [0, 3], [1, 3], [0, 1]]
    assert cover.owner(2, 5).item() == 2 and cover.quorum(2).tolist() == [2, 3, 5]  # 2 - 5 = 4 = 0 - 3
    assert cover.quorum(6).tolist() == [0, 2, 6]
    assert cover.owned_pairs(0).tolist() == cover.representatives().tolist()
    assert Cover((7,), [3, 1, 0, 3]) == cover  # normalised
    assert hash(Cover((7,), (0, 1, 3))) == hash(cover)
    check_ownership(product_cover(cover, cover))


def test_representatives_deterministic_and_read_only():
    cover = product_cover(cyclic_cover(13), cyclic_cover(3))
    first = cover.representatives().copy()
    quorum._representatives.cache_clear()
    again = Cover(cover.moduli, cover.elements).representatives()
    assert np.array_equal(first, again)
    with pytest.raises(ValueError):
        again[0, 0] = 1


def test_cover_rejects_bad_input():
    with pytest.raises(ValueError, match="contain 0"):
        Cover((7,), (1, 2, 4))
    with pytest.raises(ValueError, match="not a difference cover"):
        Cover((7,), (0, 1))
    with pytest.raises(ValueError, match="not a difference cover"):
        Cover((3, 3), (0, 1, 3))
    with pytest.raises(ValueError, match="`elements`"):
        Cover((7,), (0, 1, 3, 9))
    with pytest.raises(ValueError, match="`moduli`"):
        Cover((), (0,))
    with pytest.raises(ValueError, match="`moduli`"):
        Cover((0,), (0,))
    with pytest.raises(TypeError, match="`elements`"):
        Cover((7,), (0, 1.5, 3))
    with pytest.raises(TypeError, match="`moduli`"):
        Cover((7.0,), (0, 1, 3))
    with pytest.raises(ValueError, match="`covers`"):
        product_cover()
    with pytest.raises(TypeError, match="`covers`"):
        product_cover((7,))
    cover = cyclic_cover(7)
    for bad in (7, -1):
        with pytest.raises(ValueError, match="`i`"):
            cover.quorum(bad)
        with pytest.raises(ValueError, match="`i`"):
            cover.owned_pairs(bad)
    with pytest.raises(TypeError, match="`i`"):
        cover.quorum(1.0)
    with pytest.raises(ValueError, match="`a`"):
        cover.owner(7, 0)
    with pytest.raises(ValueError, match="`b`"):
        cover.owner(0, -1)
    with pytest.raises(TypeError, match="`x`"):
        cover.add(0.5, 1)
    with pytest.raises(TypeError, match="`y`"):
        cover.sub(1, np.array([True]))
