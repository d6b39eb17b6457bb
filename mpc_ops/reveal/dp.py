"""Differential privacy for revealed weight gradients: the Gaussian mechanism and its accounting.

The trainer clips each sample's loss gradient (n·δ_i, a row of the layer's output gradient
times the batch size) to L2 norm `clip`; features are clipped to ±FEATURE_CLIP by the owners.
One sample then moves the revealed sum X^T·δ by at most FEATURE_CLIP·sqrt(d)·clip/n in
Frobenius norm, and the key holder adds N(0, σ²) with σ = noise_multiplier × that bound.
Releases compose in zero-concentrated DP (Bun & Steinke, 2016): each costs ρ = 1/(2z²) for the
samples in it, and ρ converts to (ε, δ) as ε = ρ + 2·sqrt(ρ·ln(1/δ)).
"""

import math

import numpy as np

from hetrain.core.config import DpConfig
from hetrain.mpc_ops.crypto.flooding import gaussian
from hetrain.mpc_ops.layers.packing import FEATURE_CLIP


def sensitivity(in_features: int, clip: float, aggregate: int) -> float:
    """L2 sensitivity of X^T·δ to one sample, for a batch of `aggregate` samples."""
    return FEATURE_CLIP * math.sqrt(in_features) * clip / aggregate


def sigma(dp: DpConfig, in_features: int, aggregate: int) -> float:
    return dp.noise_multiplier * sensitivity(in_features, dp.clip, aggregate)


def clip_rows(grad_out: np.ndarray, clip: float) -> np.ndarray:
    """Clip each sample's loss gradient n·δ_i to L2 norm `clip` (δ carries the 1/n of the mean loss)."""
    n = grad_out.shape[0]
    norms = np.linalg.norm(grad_out * n, axis=1, keepdims=True)
    return grad_out * np.minimum(1.0, clip / np.maximum(norms, 1e-300))


def drop_sparse_columns(grad_out: np.ndarray, min_rows: int) -> np.ndarray:
    """Zero every δ column with fewer than `min_rows` non-zero rows (a ReLU unit active for a few samples).

    The revealed gradient column k is X^T·δ[:, k]: it sums only the samples where δ[:, k] ≠ 0, so a
    column with one non-zero row would reveal that sample's features. The key holder cannot see δ;
    this is the honest trainer's own guard, not a protection against a deviating one.
    """
    sparse = np.count_nonzero(grad_out, axis=0) < min_rows
    return np.where(sparse[None, :], 0.0, grad_out) if sparse.any() else grad_out


def add_noise(values: np.ndarray, scale: float) -> np.ndarray:
    """The Gaussian mechanism, with noise from the CSPRNG."""
    return values + gaussian(values.size, scale).reshape(values.shape)


def epsilon(dp: DpConfig, releases: int) -> float:
    """(ε, δ)-DP spent by a sample that took part in `releases` gradient releases."""
    if releases <= 0:
        return 0.0
    rho = releases / (2.0 * dp.noise_multiplier**2)
    return rho + 2.0 * math.sqrt(rho * math.log(1.0 / dp.delta))
