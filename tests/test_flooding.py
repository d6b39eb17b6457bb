"""Noise flooding: σ's formula, the CSPRNG Gaussian, the output grid, and the error bound B against measured CKKS errors."""

import math

import numpy as np
import pytest
import tenseal as ts

from hetrain.mpc_ops.crypto import ckks
from hetrain.mpc_ops.crypto import flooding
from hetrain.mpc_ops.layers import packing
from hetrain.core.params import CkksParams

PARAMS = CkksParams()  # N=8192, [60, 50, 60], scale 2^50: what the key holder and the configs use


# ---- σ and B ---------------------------------------------------------------------------------


@pytest.mark.parametrize("security_bits, budget, bound, expected", [
    (0, 1, 1.0, math.sqrt(12)),
    (2, 3, 0.5, 2 * 6 * 0.5),
    (30, 65536, 2.0**-33, math.sqrt(12) * 2.0**-10),  # the demo policy: 2^15 · 256·sqrt(12) · 2^-33
])
def test_flood_sigma_is_two_to_the_half_s_times_sqrt_12_tau_times_b(security_bits, budget, bound, expected):
    assert flooding.flood_sigma(security_bits, budget, bound) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("scale_bits, n, segment, expected", [
    (50, 8192, 128, 2.0**-27),  # 7 rotations: the calibration point
    (50, 8192, 32, 2.0**-27),  # fewer rotations are charged as 7
    (50, 8192, 4096, 2.0**-27 * 12 / 7),  # 12 rotations
    (50, 32768, 128, 2.0**-26),  # sqrt(N / 8192)
    (40, 8192, 128, 2.0**-17),
])
def test_error_bound_scales_with_scale_ring_degree_and_rotations(scale_bits, n, segment, expected):
    assert flooding.error_bound(scale_bits, n, segment) == pytest.approx(expected, rel=1e-12)


# ---- the Gaussian ----------------------------------------------------------------------------


def test_gaussian_has_mean_zero_and_the_requested_standard_deviation():
    # Prepare
    n, sigma = 200_000, 3.0

    # Execute
    z = flooding.gaussian(n, sigma)

    # Assert: 5 standard errors on the mean (false alarm ~6e-7); the sample std of 200k draws is
    # within 0.16% of σ at 1 standard error, so 2% is far outside chance
    assert z.shape == (n,)
    assert abs(z.mean()) < 5 * sigma / math.sqrt(n)
    assert z.std() == pytest.approx(sigma, rel=0.02)


@pytest.mark.parametrize("n", [0, 1, 7])
def test_gaussian_returns_exactly_n_samples(n):
    assert flooding.gaussian(n, 1.0).shape == (n,)


def test_gaussian_draws_its_randomness_from_os_urandom(monkeypatch):
    # Prepare: a deterministic stand-in for the CSPRNG that records what it was asked for
    requests = []

    def fake_urandom(seed):
        def urandom(k):
            requests.append(k)
            return np.random.default_rng(seed).bytes(k)
        return urandom

    # Execute
    monkeypatch.setattr(flooding.os, "urandom", fake_urandom(1))
    first, again = flooding.gaussian(5, 2.0), flooding.gaussian(5, 2.0)
    monkeypatch.setattr(flooding.os, "urandom", fake_urandom(2))
    other = flooding.gaussian(5, 2.0)

    # Assert: the output is a function of the urandom bytes alone (16 bytes per pair of samples)
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)
    assert requests == [48, 48, 48]


def test_gaussian_is_box_muller_of_the_urandom_bytes(monkeypatch):
    # Prepare: all-zero bytes give u1 = 2^-53 and u2 = 0, so z = (sqrt(106 ln 2), 0) · σ
    monkeypatch.setattr(flooding.os, "urandom", lambda k: bytes(k))

    # Execute
    z = flooding.gaussian(2, 0.5)

    # Assert
    np.testing.assert_allclose(z, [0.5 * math.sqrt(106 * math.log(2)), 0.0], rtol=1e-12, atol=1e-15)


# ---- the flood -------------------------------------------------------------------------------


@pytest.mark.parametrize("sigma, step", [(1.0, 1 / 16), (0.0034, 2.0**-13), (5.0, 0.25)])
def test_grid_step_is_the_power_of_two_below_sigma_over_16(sigma, step):
    assert flooding.grid_step(sigma) == step


def test_flood_adds_noise_and_rounds_every_value_to_the_grid():
    # Prepare
    values = np.random.default_rng(0).normal(size=(40, 5))
    before = values.copy()
    sigma = 0.0034
    step = flooding.grid_step(sigma)

    # Execute
    out = flooding.flood(values, sigma)

    # Assert
    assert out.shape == values.shape
    np.testing.assert_array_equal(out / step, np.round(out / step))
    assert np.abs(out - values).max() < 8 * sigma + step  # noise within 8σ, rounding within step/2
    assert not np.array_equal(out, values)
    np.testing.assert_array_equal(values, before)


def test_flood_rounds_the_noisy_value_to_the_nearest_grid_point(monkeypatch):
    # Prepare: zero bytes make the noise exactly (sqrt(106 ln 2)·σ, 0)
    monkeypatch.setattr(flooding.os, "urandom", lambda k: bytes(k))
    sigma = 1.0
    values = np.array([0.01, 0.04])

    # Execute
    out = flooding.flood(values, sigma)

    # Assert
    noisy = values + np.array([math.sqrt(106 * math.log(2)), 0.0])
    np.testing.assert_array_equal(out, np.round(noisy * 16) / 16)


def test_flood_with_zero_sigma_returns_the_values_unrounded():
    values = np.array([0.123456789, -2.5])
    np.testing.assert_array_equal(flooding.flood(values, 0.0), values)


# ---- B checked against measured CKKS errors ----------------------------------------------------

TRIALS = 4  # ciphertexts per key and case: 4096/terms segment sums each
KEYS = 4  # the worst-case error varies with the key, so measure several


def make_contexts():
    """A test-only private context and its public twin, with the key holder's parameters."""
    private = ts.context(ts.SCHEME_TYPE.CKKS, PARAMS.poly_modulus_degree,
                         coeff_mod_bit_sizes=list(PARAMS.coeff_mod_bit_sizes))
    private.global_scale = 2.0**PARAMS.scale_bits
    private.generate_galois_keys()
    public = ckks.load_public_context(private.serialize(save_secret_key=False))
    return private, public


@pytest.fixture(scope="module")
def measured_error():
    """Largest |decrypted - exact| of encrypt → ct×plain → segment_sum, as the layers do it, over
    several keys, for the rows (32-slot) and cols (128-slot) segments, at gain 1 and at the largest
    gain the headroom admits (the plaintext multiplier scaled up to MAX_GAIN)."""
    rng, worst = np.random.default_rng(7), {}
    for _ in range(KEYS):
        private, public = make_contexts()
        for terms in (32, 128):
            for gain in (1.0, packing.MAX_GAIN):
                for _ in range(TRIALS):
                    x = rng.normal(size=PARAMS.slots).clip(-4, 4)  # standardised, clipped features
                    w = gain * rng.normal(scale=0.3 / terms, size=PARAMS.slots)  # deltas carry 1/batch
                    vector = ckks.load_vector(public, ckks.encrypt(public, x), ckks.fresh_layout(public))
                    summed = ckks.segment_sum(public, ckks.multiply_plain(vector, w), terms, PARAMS.slots)
                    got = np.asarray(ts.ckks_vector_from(private, summed.serialize()).decrypt())[::terms]
                    err = np.abs(got - (x * w).reshape(-1, terms).sum(axis=1)).max()
                    worst[terms] = max(worst.get(terms, 0.0), err)
    return worst


@pytest.mark.integration  # TenSEAL keys
@pytest.mark.parametrize("terms", [32, 128])
def test_measured_ckks_error_of_product_and_segment_sum_stays_below_the_error_bound(measured_error, terms):
    # Prepare
    bound = flooding.error_bound(PARAMS.scale_bits, PARAMS.poly_modulus_degree, terms)

    # Assert
    assert measured_error[terms] < bound, (
        f"{terms} terms: measured 2^{math.log2(measured_error[terms]):.2f} > bound 2^{math.log2(bound):.2f}"
    )


@pytest.mark.integration  # TenSEAL keys
@pytest.mark.parametrize("terms", [32, 128])
def test_measured_ckks_error_is_far_below_the_1e_6_the_layer_tests_allow(measured_error, terms):
    # Assert: the worst key seen (25 keys × 8 ciphertexts) gave 2^-28.7 ≈ 2.3e-9, so 1e-7 leaves 40x margin
    assert measured_error[terms] < 1e-7, f"measured 2^{math.log2(measured_error[terms]):.2f}"
