"""Small finite-field arithmetic, enough to build Singer difference sets.

``GF(p**n)`` is represented as polynomials over ``GF(p)`` (coefficient vectors,
lowest degree first) modulo a primitive polynomial ``f`` of degree ``n`` found by a
deterministic search, so the class of ``x`` is a primitive element ``g``.
Multiplication by ``g`` and the Frobenius maps ``y -> y**(p**j)`` are
``GF(p)``-linear, i.e. ``n x n`` matrices over ``GF(p)``; powers ``g**i`` come in
NumPy blocks by repeated doubling.  Log / antilog tables are built on demand for
small fields.

Pure Python + NumPy.
"""

from __future__ import annotations

import functools

import numpy as np

__all__ = ["GaloisField", "galois_field", "is_prime", "prime_factors", "prime_power"]


def _require_int(value: object, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"`{name}` must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"`{name}` must be an int >= {minimum}, got {value}")
    return int(value)


def is_prime(n: int) -> bool:
    """Deterministic primality test by trial division (fine for the sizes used here)."""
    if n < 2:
        return False
    if n % 2 == 0:
        return n == 2
    f = 3
    while f * f <= n:
        if n % f == 0:
            return False
        f += 2
    return True


def prime_factors(n: int) -> tuple[int, ...]:
    """Distinct prime factors of ``n >= 1``, ascending."""
    n = _require_int(n, "n", 1)
    out, f = [], 2
    while f * f <= n:
        if n % f == 0:
            out.append(f)
            while n % f == 0:
                n //= f
        f += 1 if f == 2 else 2
    if n > 1:
        out.append(n)
    return tuple(out)


def prime_power(n: int) -> tuple[int, int] | None:
    """``(p, e)`` with ``n == p**e``, ``p`` prime and ``e >= 1``; ``None`` otherwise."""
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)):
        raise TypeError(f"`n` must be an int, got {type(n).__name__}")
    n = int(n)
    if n < 2:
        return None
    factors = prime_factors(n)
    if len(factors) != 1:
        return None
    p, e = factors[0], 0
    while n > 1:
        n //= p
        e += 1
    return p, e


# -- polynomials over GF(p): coefficient lists, lowest degree first ------------------------


def _poly_mulmod(a: list[int], b: list[int], f: list[int], p: int) -> list[int]:
    """``a * b mod f`` over GF(p); ``f`` monic of degree ``n``; ``a``, ``b`` of length ``n``."""
    n = len(f) - 1
    prod = [0] * (2 * n - 1)
    for i, ai in enumerate(a):
        if ai:
            for j, bj in enumerate(b):
                prod[i + j] += ai * bj
    for d in range(2 * n - 2, n - 1, -1):  # x**d = x**(d-n) * x**n, x**n = -(f_0 + ... )
        c = prod[d] % p
        if c:
            for j in range(n):
                prod[d - n + j] -= c * f[j]
    return [c % p for c in prod[:n]]


def _poly_powmod(base: list[int], exponent: int, f: list[int], p: int) -> list[int]:
    n = len(f) - 1
    result = [1] + [0] * (n - 1)
    while exponent:
        if exponent & 1:
            result = _poly_mulmod(result, base, f, p)
        base = _poly_mulmod(base, base, f, p)
        exponent >>= 1
    return result


def _x(f: list[int], p: int) -> list[int]:
    """The class of ``x`` modulo ``f`` as a coefficient list."""
    n = len(f) - 1
    return [0, 1] + [0] * (n - 2) if n > 1 else [(-f[0]) % p]


def _is_primitive(f: list[int], p: int) -> bool:
    """Whether ``x`` has multiplicative order exactly ``p**n - 1`` modulo ``f``.

    That forces ``GF(p)[x] / f`` to be a field (only then does its unit group have
    ``p**n - 1`` elements), so ``f`` is irreducible and primitive.
    """
    order, one, x = p ** (len(f) - 1) - 1, [1] + [0] * (len(f) - 2), _x(f, p)
    if _poly_powmod(x, order, f, p) != one:
        return False
    return all(_poly_powmod(x, order // r, f, p) != one for r in prime_factors(order))


def _find_primitive_polynomial(p: int, n: int) -> tuple[int, ...]:
    """The first monic primitive polynomial of degree ``n`` over GF(p), in a fixed order.

    Candidates ``x**n + c_{n-1} x**(n-1) + ... + c_0`` are tried by increasing
    ``sum(c_j * p**j)``; returns ``(c_0, ..., c_{n-1}, 1)``.
    """
    for code in range(1, p**n):
        coeffs = [(code // p**j) % p for j in range(n)]
        if coeffs[0] and _is_primitive(coeffs + [1], p):
            return tuple(coeffs + [1])
    raise AssertionError(f"no primitive polynomial of degree {n} over GF({p})")  # impossible


class GaloisField:
    """``GF(p**n)`` with primitive element ``g`` (the class of ``x``).

    Elements are coefficient vectors (int64 ``[..., n]``, lowest degree first) or,
    for the tables, codes ``sum(c_j * p**j)`` in ``[0, p**n)``.

    Attributes:
      p, n, order: characteristic, degree, ``p**n``.
      modulus: the primitive polynomial's coefficients, lowest degree first (monic).
      times_g: int64 ``[n, n]``; ``times_g @ v`` is ``g * v`` (mod ``p``).
    """

    def __init__(self, p: int, n: int):
        p = _require_int(p, "p", 2)
        n = _require_int(n, "n", 1)
        if not is_prime(p):
            raise ValueError(f"`p` must be prime, got {p}")
        self.p, self.n, self.order = p, n, p**n
        self.modulus = _find_primitive_polynomial(p, n)
        self.times_g = np.zeros((n, n), dtype=np.int64)
        for j in range(n - 1):
            self.times_g[j + 1, j] = 1
        self.times_g[:, n - 1] = [(-c) % p for c in self.modulus[:n]]

    def _matpow(self, mat: np.ndarray, e: int) -> np.ndarray:
        out = np.eye(self.n, dtype=np.int64)
        while e:
            if e & 1:
                out = (out @ mat) % self.p
            mat = (mat @ mat) % self.p
            e >>= 1
        return out

    def power_vectors(self, start: int, count: int) -> np.ndarray:
        """int64 ``[count, n]``: coefficient vectors of ``g**start .. g**(start + count - 1)``."""
        vecs = self._matpow(self.times_g, start)[:, :1].T  # g**start
        step = self.times_g  # multiplication by g**len(vecs)
        while len(vecs) < count:
            vecs = np.concatenate([vecs, (vecs @ step.T) % self.p])
            step = (step @ step) % self.p
        return vecs[:count]

    def frobenius(self, j: int) -> np.ndarray:
        """int64 ``[n, n]``: the ``GF(p)``-linear map ``y -> y**(p**j)`` on coefficient vectors."""
        f, p = list(self.modulus), self.p
        xp = _poly_powmod(_x(f, p), p, f, p)  # column i of the p-th power map: (x**i)**p
        cols, col = [], [1] + [0] * (self.n - 1)
        for _ in range(self.n):
            cols.append(col)
            col = _poly_mulmod(col, xp, f, p)
        return self._matpow(np.array(cols, dtype=np.int64).T, j)

    def trace_matrix(self, sub_degree: int) -> np.ndarray:
        """int64 ``[n, n]``: the trace down to ``GF(p**sub_degree)``, ``y + y**s + y**(s*s) + ...``.

        ``s = p**sub_degree``; it is ``GF(s)``-linear and maps onto ``GF(s)``.
        """
        if sub_degree < 1 or self.n % sub_degree:
            raise ValueError(f"`sub_degree` must divide {self.n}, got {sub_degree}")
        frob = self.frobenius(sub_degree)
        total, term = np.zeros_like(frob), np.eye(self.n, dtype=np.int64)
        for _ in range(self.n // sub_degree):
            total, term = (total + term) % self.p, (frob @ term) % self.p
        return total

    # -- tables, for small fields --------------------------------------------------------

    @functools.cached_property
    def codes(self) -> np.ndarray:
        """int64 ``[order - 1]``: the code of ``g**i``."""
        return self.power_vectors(0, self.order - 1) @ (self.p ** np.arange(self.n, dtype=np.int64))

    @functools.cached_property
    def logs(self) -> np.ndarray:
        """int64 ``[order]``: ``logs[codes[i]] == i``; ``logs[0] == -1``."""
        logs = np.full(self.order, -1, dtype=np.int64)
        logs[self.codes] = np.arange(self.order - 1, dtype=np.int64)
        return logs

    def add(self, a: int, b: int) -> int:
        """Sum of two elements given as codes."""
        out, scale = 0, 1
        for _ in range(self.n):
            out += ((a + b) % self.p) * scale
            a, b, scale = a // self.p, b // self.p, scale * self.p
        return out

    def mul(self, a: int, b: int) -> int:
        """Product of two elements given as codes (through the log tables)."""
        if a == 0 or b == 0:
            return 0
        return int(self.codes[(self.logs[a] + self.logs[b]) % (self.order - 1)])


@functools.lru_cache(maxsize=None)
def galois_field(p: int, n: int) -> GaloisField:
    """Cached :class:`GaloisField` ``GF(p**n)``."""
    return GaloisField(p, n)


def singer_exponents(q: int) -> np.ndarray:
    """Exponents ``0 <= i < q*q + q + 1`` with ``Tr(g**i) == 0`` in ``GF(q**3)``, ascending.

    ``Tr`` is the trace down to ``GF(q)``; they form a Singer perfect difference set
    mod ``q*q + q + 1`` (``q + 1`` elements).  Works in blocks, so memory stays small.
    """
    pe = prime_power(q)
    if pe is None:
        raise ValueError(f"`q` must be a prime power, got {q}")
    p, e = pe
    field = galois_field(p, 3 * e)
    trace = field.trace_matrix(e)
    count, block = q * q + q + 1, 1 << 14
    first = field.power_vectors(0, min(block, count))
    jump = field._matpow(field.times_g, len(first))  # multiplication by g**block
    shift = np.eye(field.n, dtype=np.int64)
    out = []
    for start in range(0, count, block):
        vecs = (first[: count - start] @ shift.T) % p  # g**(start + i)
        zero = ~((vecs @ trace.T) % p).any(axis=1)
        out.append(start + np.flatnonzero(zero))
        shift = (jump @ shift) % p
    return np.concatenate(out)
