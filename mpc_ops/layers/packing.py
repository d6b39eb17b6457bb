"""Slot packing: how a batch of samples is laid out in CKKS slots, and the plain vectors that go with it.

Two layouts share one segment width `seg` (a power of two >= the widest owner's feature count):

* rows (sample-major): slot ``i*seg + j`` holds sample i, feature j. The forward product
  X·W[:, k] is one ciphertext × plain vector followed by a rotate-and-sum inside each
  seg-wide segment, which leaves z[i, k] in slot ``i*seg``.
* cols (feature-major): slot ``j*T + i`` holds feature j of sample i, with T = slots/seg.
  The gradient X^T·delta[:, k] is one ciphertext × plain vector followed by a
  rotate-and-sum inside each T-wide segment, which leaves G[j, k] in slot ``j*T``.

Both layouts hold ``slots/seg`` samples per ciphertext, so a batch chunk c covers the same
samples in either layout, and in every owner's bundle.
"""

from dataclasses import dataclass

import numpy as np

from hetrain.core.errors import ConfigError


FEATURE_CLIP = 4.0  # owners clip standardised features to ±FEATURE_CLIP: the bound behind every gain
MAX_GAIN = 64.0  # largest plaintext gain; measured to keep the product error below the rotation error


def gain_for(l1: float, headroom: float, mask_bound: float) -> float:
    """Largest gain c ≤ MAX_GAIN such that c·FEATURE_CLIP·l1 + mask_bound stays within half the headroom.

    `l1` is the L1 norm of the plaintext multiplier (a weight column or a delta column), so
    every slot and every partial sum of the product is bounded by FEATURE_CLIP·l1. Scaling it
    up before the reveal, and down after, divides the flooding noise by c at no cost in
    CKKS error (which the rotations dominate).
    """
    room = headroom / 2 - mask_bound
    if room <= 0:
        raise ConfigError(f"policy.mask_bound={mask_bound} leaves no room under the headroom {headroom}")
    if l1 <= 0:
        return MAX_GAIN
    return float(min(MAX_GAIN, room / (FEATURE_CLIP * l1)))


def next_pow2(n: int) -> int:
    """Smallest power of two >= n (n >= 1)."""
    return 1 << max(0, int(n) - 1).bit_length()


FORWARD_LAYOUTS = ("rows", "column")


@dataclass(frozen=True)
class PackingPlan:
    """Segment width, slot count and forward layout shared by every owner's bundle in a run.

    `forward` is "rows" (sample-major segments, one rotate-and-sum per output) or "column"
    (one ciphertext per feature holding up to `slots` samples, ciphertext × scalar, no
    rotation). The gradient always uses the feature-major "cols" layout.
    """

    slots: int
    seg: int
    forward: str = "rows"

    def __post_init__(self):
        if self.seg < 1 or self.seg & (self.seg - 1) or self.seg > self.slots:
            raise ConfigError(f"packing seg must be a power of two in [1, {self.slots}], got {self.seg}")
        if self.forward not in FORWARD_LAYOUTS:
            raise ConfigError(f"packing forward layout must be one of {FORWARD_LAYOUTS}, got {self.forward!r}")

    @classmethod
    def for_features(cls, feature_counts: list[int], slots: int, forward: str = "rows") -> "PackingPlan":
        """The narrowest plan that fits the widest owner."""
        widest = max(feature_counts)
        if widest > slots:
            raise ConfigError(f"an owner has {widest} features; at most {slots} fit in one ciphertext")
        return cls(slots=slots, seg=next_pow2(widest), forward=forward)

    def column_chunks(self, n: int) -> list[slice]:
        """Sample ranges of the column layout: up to `slots` samples per ciphertext."""
        return [slice(s, min(s + self.slots, n)) for s in range(0, n, self.slots)]

    def column_vectors(self, chunk: np.ndarray) -> list[np.ndarray]:
        """One slot vector per feature: the chunk's samples of that feature, zero-padded."""
        chunk = np.asarray(chunk, dtype=np.float64)
        if chunk.ndim != 2 or chunk.shape[0] > self.slots:
            raise ConfigError(f"a column chunk must be at most {self.slots} samples × d, got shape {chunk.shape}")
        out = np.zeros((chunk.shape[1], self.slots))
        out[:, : chunk.shape[0]] = chunk.T
        return list(out)

    @property
    def samples_per_ct(self) -> int:
        return self.slots // self.seg

    @property
    def col_seg(self) -> int:
        """Length T of a feature segment in the cols layout."""
        return self.slots // self.seg

    def chunks(self, n: int) -> list[slice]:
        """Sample ranges held by each ciphertext of an n-sample batch."""
        spc = self.samples_per_ct
        return [slice(s, min(s + spc, n)) for s in range(0, n, spc)]

    def _check(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] > self.seg or x.shape[0] > self.samples_per_ct:
            raise ConfigError(
                f"a chunk must be at most {self.samples_per_ct} samples × {self.seg} features, "
                f"got shape {x.shape}"
            )
        return x

    def rows_vector(self, chunk: np.ndarray) -> np.ndarray:
        """Plain slots for one chunk in the rows layout."""
        chunk = self._check(chunk)
        out = np.zeros((self.samples_per_ct, self.seg))
        out[: chunk.shape[0], : chunk.shape[1]] = chunk
        return out.reshape(-1)

    def cols_vector(self, chunk: np.ndarray) -> np.ndarray:
        """Plain slots for one chunk in the cols layout."""
        chunk = self._check(chunk)
        out = np.zeros((self.seg, self.col_seg))
        out[: chunk.shape[1], : chunk.shape[0]] = chunk.T
        return out.reshape(-1)

    def weight_vector(self, w_col: np.ndarray) -> np.ndarray:
        """W[:, k] for one owner's features, tiled once per sample (rows layout)."""
        seg_vals = np.zeros(self.seg)
        seg_vals[: len(w_col)] = w_col
        return np.tile(seg_vals, self.samples_per_ct)

    def delta_vector(self, delta_chunk: np.ndarray, n_features: int) -> np.ndarray:
        """delta[chunk, k] tiled once per feature segment (cols layout)."""
        seg_vals = np.zeros(self.col_seg)
        seg_vals[: len(delta_chunk)] = delta_chunk
        out = np.zeros((self.seg, self.col_seg))
        out[:n_features] = seg_vals
        return out.reshape(-1)

    def rows_result_slots(self, n: int) -> tuple[int, int]:
        """(stride, count) of the slots that hold z[i, k] after the rows rotate-and-sum."""
        return self.seg, n

    def cols_result_slots(self, n_features: int) -> tuple[int, int]:
        """(stride, count) of the slots that hold G[j, k] after the cols rotate-and-sum."""
        return self.col_seg, n_features
