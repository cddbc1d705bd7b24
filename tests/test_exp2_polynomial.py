"""`exp2_polynomial`: 2^x on the FMA units, checked against float64 (the kernel's use is in test_mosaic_gpu)."""

import os
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from stream_cqsa_jax._src.kernels import exp2_polynomial, mosaic_gpu

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "bench"))
import exp2_polynomial_fit  # noqa: E402


def _relative_error(x: np.ndarray) -> np.ndarray:
    got = exp2_polynomial.exp2(x.astype(np.float32)).astype(np.float64)
    return np.abs(got / np.exp2(x.astype(np.float64)) - 1.0)


def test_relative_error_against_float64_over_the_whole_range():
    """Below 1.6e-7 (as documented) on a fine grid of [-126, 126], on random points, and next to the
    points where the rounding of n changes (f = +-1/2)."""
    rng = np.random.default_rng(0)
    halves = np.arange(-125.5, 126.0, 1.0)
    near_halves = np.concatenate([np.nextafter(halves.astype(np.float32), np.float32(d)) for d in (-np.inf, np.inf)])
    x = np.concatenate([
        np.linspace(-126.0, 126.0, 2_000_001), rng.uniform(-126.0, 126.0, 500_000), rng.uniform(-30.0, 0.0, 500_000),
        halves, near_halves,
    ]).astype(np.float32)
    error = _relative_error(x)
    assert error.max() < 1.6e-7, (x[error.argmax()], error.max())
    assert error.max() > 1e-8  # a polynomial, not the library's exp2


def test_whole_numbers_give_exact_powers_of_two():
    x = np.arange(-126, 127).astype(np.float32)
    np.testing.assert_array_equal(exp2_polynomial.exp2(x), np.exp2(x))


def test_inputs_below_the_range_give_the_least_normal_number_and_nan_stays_nan():
    x = np.array([-126.0, -126.5, -200.0, -3e38, -np.inf, np.nan], np.float32)
    with np.errstate(invalid="ignore"):
        y = exp2_polynomial.exp2(x)
    least = np.float32(2.0**-126)
    np.testing.assert_array_equal(y[:5], least)
    assert np.isnan(y[5])


def test_the_fit_script_gives_these_coefficients():
    """`bench/exp2_polynomial_fit.py` finds the module's coefficients, and its float32 error bound."""
    coefficients, error = exp2_polynomial_fit.tune(exp2_polynomial_fit.fit(len(exp2_polynomial.COEFFICIENTS) - 1))
    assert [float(c) for c in coefficients] == list(exp2_polynomial.COEFFICIENTS)
    assert error < 1.6e-7
    assert exp2_polynomial_fit.float32_error(np.array(exp2_polynomial.COEFFICIENTS[:-1])) > 1e-6  # degree matters


def test_sixteenths_outside_zero_to_sixteen_are_refused():
    with pytest.raises(ValueError, match=r"sixteenths must be in \[0, 16\], got 17"):
        exp2_polynomial.split_exp2(jnp.zeros((64, 128), jnp.float32), 17)
    with pytest.raises(ValueError, match=r"Launch.exp2_on_fma must be in \[0, 16\] \(sixteenths\), got -1"):
        mosaic_gpu.Launch(exp2_on_fma=-1)
