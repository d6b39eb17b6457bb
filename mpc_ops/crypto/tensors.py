"""Containers that cross role boundaries: encrypted batches and encrypted layer outputs (bytes only)."""

from dataclasses import dataclass, field

import numpy as np


@dataclass
class OwnerPart:
    """One owner's share of a batch: ciphertext blobs in both layouts and which features they hold."""

    owner: str
    feature_index: np.ndarray  # positions of this owner's features in the model's input
    rows: list[bytes]  # one blob per chunk, rows layout
    cols: list[bytes]  # one blob per chunk, cols layout
    column: list[bytes] = field(default_factory=list)  # column layout: chunk-major, one blob per feature


@dataclass
class EncryptedBatch:
    """A batch of n samples, encrypted by one owner (horizontal) or by several (vertical)."""

    batch_id: str
    n: int
    parts: list[OwnerPart]
    rows: list[str] = field(default_factory=list)  # sample pseudonyms, in batch order

    @property
    def n_bytes(self) -> int:
        return sum(len(b) for p in self.parts for b in p.rows + p.cols + p.column)


@dataclass
class PlainBatch:
    """The plaintext twin of an EncryptedBatch: the standardised features it encrypts."""

    batch_id: str
    x: np.ndarray


@dataclass
class EncryptedTensor:
    """A layer output in ciphertext: blob b's meaningful values, times gains[b], sit at slots
    stride*t, t < counts[b].

    `placement[b]` says where blob b's values land in the plaintext result of `shape`:
    a (row slice, column) pair, values running down the rows.
    """

    kind: str  # "activation" or "gradient"
    layer: str
    shape: tuple[int, int]
    blobs: list[bytes]
    stride: list[int]
    counts: list[int]
    placement: list[tuple[np.ndarray, int]]
    aggregate: int  # samples summed into each gradient value, or features into each activation
    gains: list[float] | None = None  # plaintext scale-up per blob, divided out in `assemble`
    meta: dict = field(default_factory=dict)

    @property
    def n_bytes(self) -> int:
        return sum(len(b) for b in self.blobs)

    def assemble(self, values: list[np.ndarray]) -> np.ndarray:
        """Place each blob's revealed values into the plaintext result."""
        out = np.zeros(self.shape)
        gains = self.gains or [1.0] * len(values)
        for (rows, col), vals, gain in zip(self.placement, values, gains):
            out[rows, col] = vals / gain
        return out
