"""Fits the coefficients of `exp2_polynomial`: 2^f on [-1/2, 1/2] by a polynomial with constant term 1.

    python bench/exp2_polynomial_fit.py [--degree 5]

Weighted least squares, reweighted by each point's error (Lawson's method), approaches the polynomial of
least maximum relative error; its coefficients are then rounded to float32 and moved one unit in the
last place at a time while that lowers the maximum error of the float32 evaluation (Horner's rule with
one rounding per FMA, as the kernel computes it). Prints the coefficients as `float.hex` strings and the
error. No GPU needed.
"""

from __future__ import annotations

import argparse

import numpy as np


def fit(degree: int, nodes: int = 4001, rounds: int = 3000) -> np.ndarray:
    """Coefficients c[1:] (c[0] = 1) in float64 of the near-minimax relative fit."""
    f = 0.5 * np.cos(np.linspace(0.0, np.pi, nodes))
    y = np.exp2(f)
    basis = f[:, None] ** np.arange(1, degree + 1)[None, :] / y[:, None]
    target = 1.0 - 1.0 / y  # (1 + f q(f)) / y - 1 = basis @ c - target
    weights = np.full(nodes, 1.0 / nodes)
    for _ in range(rounds):
        root = np.sqrt(weights)
        c, *_ = np.linalg.lstsq(basis * root[:, None], target * root, rcond=None)
        weights = weights * np.abs(basis @ c - target)
        weights /= weights.sum()
    return np.concatenate([[1.0], c])


def float32_error(coefficients: np.ndarray, points: int = 400_001) -> float:
    """Largest relative error of Horner's rule in float32 with fused multiply-adds, over [-1/2, 1/2]."""
    f = np.linspace(-0.5, 0.5, points).astype(np.float32).astype(np.float64)
    p = np.full_like(f, coefficients[-1])
    for c in coefficients[-2::-1]:
        p = (p * f + c).astype(np.float32).astype(np.float64)  # float32 products are exact in float64
    return float(np.max(np.abs(p / np.exp2(f) - 1.0)))


def tune(coefficients: np.ndarray) -> tuple[np.ndarray, float]:
    """Float32 coefficients (c[0] kept at 1) after moving each by one unit in the last place while the
    float32 error falls."""
    best = coefficients.astype(np.float32)
    error = float32_error(best)
    improved = True
    while improved:
        improved = False
        for k in range(1, len(best)):
            for toward in (np.float32(np.inf), np.float32(-np.inf)):
                candidate = best.copy()
                candidate[k] = np.nextafter(candidate[k], toward)
                candidate_error = float32_error(candidate)
                if candidate_error < error:
                    best, error, improved = candidate, candidate_error, True
    return best, error


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--degree", type=int, default=5)
    args = parser.parse_args(argv)
    coefficients, error = tune(fit(args.degree))
    print("coefficients:", ", ".join(repr(float(c).hex()) for c in coefficients))
    print(f"largest relative error in float32: {error:.4g} ({error / 2.0**-23:.3f} units in the last place)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
