"""The tiled slot layout of strict, mixed and encrypted-label runs.

A batch of m ≤ n samples (n a power of two) and d features fills `slots / n` blocks of n slots:

* replicated column j ("rep"): feature j of the m samples, repeated in every block. A linear
  layer is then Σ_j W[j, k]·rep_j, ciphertext × scalar with no rotation, and every value the
  network computes from it (activations, deltas, encrypted labels) stays replicated too.
* block ("block"): feature j in block j, one ciphertext for all features. The first layer's
  weight gradient for every feature at once is block ⊙ δ_k followed by one rotate-and-sum
  inside the blocks (log2 n rotations), which leaves G[j, k] in slot j·n.

A spare block after the last feature holds ones (added by the trainer in plaintext), so the
same sum yields the bias gradient. Hence d + 1 ≤ slots / n.
"""

from dataclasses import dataclass

import numpy as np

from hetrain.core import shapes
from hetrain.core.errors import ConfigError


@dataclass(frozen=True)
class Tiling:
    slots: int
    n: int  # block width: samples per batch, padded to a power of two

    def __post_init__(self):
        if self.n < 1 or self.n & (self.n - 1) or self.n > self.slots:
            raise ConfigError(f"tiled block width must be a power of two in [1, {self.slots}]; got {self.n}")

    @property
    def blocks(self) -> int:
        return self.slots // self.n

    def check_width(self, width: int, what: str) -> None:
        """A block gradient needs width + 1 blocks (the ones block for the bias)."""
        if width + 1 > self.blocks:
            raise ConfigError(
                f"{what}: {width} inputs + 1 bias block need {width + 1} blocks of {self.n} slots, but "
                f"{self.slots} slots hold only {self.blocks}; lower train.batch_size or raise "
                f"ckks.poly_modulus_degree")

    def rep(self, values: np.ndarray) -> np.ndarray:
        """One value per sample, replicated in every block."""
        values = np.asarray(values, dtype=np.float64)
        if values.ndim != 1 or len(values) > self.n:
            raise ConfigError(f"a replicated vector holds at most {self.n} samples; got shape {values.shape}")
        block = np.zeros(self.n)
        block[: len(values)] = values
        return np.tile(block, self.blocks)

    def block(self, x: np.ndarray, offset: int = 0) -> np.ndarray:
        """Column j of x (m samples × width) in block offset + j."""
        x = np.asarray(x, dtype=np.float64)
        if x.ndim != 2 or x.shape[0] > self.n or offset + x.shape[1] > self.blocks:
            raise ConfigError(f"a block vector holds at most {self.n} samples × {self.blocks} columns; "
                              f"got shape {x.shape} at offset {offset}")
        out = np.zeros((self.blocks, self.n))
        out[offset : offset + x.shape[1], : x.shape[0]] = x.T
        return out.reshape(-1)

    def mask(self, block: int, m: int) -> np.ndarray:
        """Ones on the m sample slots of one block."""
        out = np.zeros(self.slots)
        out[block * self.n : block * self.n + m] = 1.0
        return out

    def read(self, slots: np.ndarray, count: int) -> np.ndarray:
        """Block sums as left by a rotate-and-sum: slot j·n for j < count."""
        return np.asarray(slots)[: self.n * count : self.n]


def tiling_for(cfg) -> Tiling:
    """The configured run's tiling, after checking that the input and every layer's output fit its blocks."""
    tiling = Tiling(shapes.slots(cfg), shapes.block_width(cfg.train.batch_size))
    for what, width in shapes.tiled_widths(cfg).items():
        tiling.check_width(width, what)
    return tiling
