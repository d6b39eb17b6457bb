"""Noise flooding for revealed CKKS decryptions (Li–Micciancio countermeasure), from a CSPRNG."""

import math
import os

import numpy as np


TILED_FACTOR = 6.0  # tiled-engine reveals: sums over every input in every slot, deeper products
DEPTH_GROWTH = 1.35  # B's factor per level past the first, tiled engine


def error_bound(scale_bits: int, poly_modulus_degree: int, segment: int, depth: int = 1, tiled: bool = False) -> float:
    """Worst-case absolute CKKS error of a revealed value: a depth-1 ct×plain product followed by a
    rotate-and-sum over `segment` slots (log2(segment) rotations).

    Measured on N=8192, scale 2^50: the key-switching noise of the rotations dominates, it varies
    with the key, and it is largest in slot 0: over 20 keys the worst value reached 2^-28.1
    (typical 2^-30.5), whatever the plaintext gain up to MAX_GAIN (the product alone stays below
    2^-33.5). The bound takes 2^(23 - scale_bits) (2^-27 at scale 2^50, a 2x margin over the worst
    key seen), grows with sqrt(N) and linearly in the number of rotations past 7.
    tests/test_flooding.py checks measured errors against it.

    The tiled engine (strict, mixed and encrypted-label policies; `tiled`) reveals values whose
    error has a part relative to their size (≈ 2^-29·|v|: each slot sums a ct×scalar over every
    input, and products compound the encoding errors) on top of the rotations' noise. Its
    revealed values are kept to a few units (mpc_ops/tiled_net.GAIN); measured on N=16384,
    scale 2^50, over 3 keys and weights up to 1.5x their initial size, the worst errors were
    2^-26.1 (depth 1, activations), 2^-27.7 (depth 2), 2^-25.1 (depth 5) and 2^-24.7 (depth 6).
    Its bound is TILED_FACTOR times the rows bound, times DEPTH_GROWTH per level past the first:
    2^-23.9 at depth 1, 2^-23.5 at depth 2, 2^-22.2 at depth 5, 2^-21.7 at depth 6, at least a
    4x margin over every measurement (tests/test_strict_flooding.py checks it).
    The key holder reads the depth from the ciphertext's level.
    """
    rotations = max(1, int(segment).bit_length() - 1)
    base = 2.0 ** (23 - scale_bits) * math.sqrt(poly_modulus_degree / 8192) * max(1.0, rotations / 7)
    if not tiled:
        return base
    return base * TILED_FACTOR * DEPTH_GROWTH ** max(0, depth - 1)


def flood_sigma(security_bits: int, budget: int, bound: float) -> float:
    """σ = 2^(s/2)·sqrt(12·τ)·B."""
    return 2.0 ** (security_bits / 2) * math.sqrt(12 * budget) * bound


def uniform(n: int) -> np.ndarray:
    """n uniform floats in [0, 1) with 53 random bits each, from os.urandom."""
    raw = np.frombuffer(os.urandom(8 * n), dtype=np.uint64)
    return (raw >> np.uint64(11)).astype(np.float64) / 2.0**53


def gaussian(n: int, sigma: float) -> np.ndarray:
    """n Gaussian samples with standard deviation sigma, from os.urandom (Box–Muller)."""
    if n == 0:
        return np.zeros(0)
    m = (n + 1) // 2
    u = uniform(2 * m).reshape(2, m)
    u1 = u[0] + 2.0**-53  # in (0, 1]: log(u1) is finite
    u2 = u[1]
    r = np.sqrt(-2.0 * np.log(u1))
    z = np.concatenate([r * np.cos(2 * np.pi * u2), r * np.sin(2 * np.pi * u2)])
    return z[:n] * sigma


def grid_step(sigma: float) -> float:
    """Round revealed values to a power-of-two grid well below σ, hiding the low bits."""
    return 2.0 ** math.floor(math.log2(sigma)) / 16 if sigma > 0 else 0.0


def flood(values: np.ndarray, sigma: float) -> np.ndarray:
    """Add N(0, σ²) noise from the CSPRNG, then round to the grid."""
    noisy = values + gaussian(values.size, sigma).reshape(values.shape)
    step = grid_step(sigma)
    return np.round(noisy / step) * step if step else noisy
