"""Ciphertext layers and their plaintext twins, with one calling convention.

`forward(x)` caches its input and returns X·W (no bias: the bias is added after the reveal,
in plaintext). `backward(grad_out)` returns the batch-aggregated weight gradient X^T·grad_out.
The ciphertext layer returns EncryptedTensor objects that must be revealed explicitly; the
twin returns numpy arrays. A test runs both on the same batch and compares.
"""

import numpy as np
import tenseal as ts

from . import ckks
from .packing import PackingPlan, gain_for
from .tensors import EncryptedBatch, EncryptedTensor, PlainBatch


class CipherLinear:
    """Encrypted input × plaintext weights: column-packed forward, slot-summed gradient."""

    def __init__(self, name: str, weight: np.ndarray, context: ts.Context, plan: PackingPlan,
                 headroom: float = 512.0, mask_bound: float = 64.0):
        self.name, self.W, self.context, self.plan = name, weight, context, plan
        self.headroom, self.mask_bound = headroom, mask_bound
        self._x: EncryptedBatch | None = None

    def _gain(self, multiplier: np.ndarray) -> float:
        """Scale-up for one plaintext multiplier, undone after the reveal (divides the flooding noise)."""
        return gain_for(float(np.abs(multiplier).sum()), self.headroom, self.mask_bound)

    def _load(self, blob: bytes) -> ts.CKKSVector:
        return ckks.load_vector(self.context, blob, self.plan.slots)

    def forward(self, x: EncryptedBatch) -> EncryptedTensor:
        """z[:, k] = X·W[:, k] for every output k, in the plan's forward layout."""
        self._x = x
        return self._forward_column(x) if self.plan.forward == "column" else self._forward_rows(x)

    def _forward_rows(self, x: EncryptedBatch) -> EncryptedTensor:
        """Rows layout: one ct × plain and one rotate-and-sum per chunk and output."""
        plan, (d_in, h) = self.plan, self.W.shape
        chunks = plan.chunks(x.n)
        rows = [[self._load(b) for b in part.rows] for part in x.parts]
        blobs, counts, placement, gains = [], [], [], []
        for k in range(h):
            gain = self._gain(self.W[:, k])
            for c, sl in enumerate(chunks):
                acc = None
                for part, cts in zip(x.parts, rows):
                    term = ckks.multiply_plain(cts[c], plan.weight_vector(gain * self.W[part.feature_index, k]))
                    acc = term if acc is None else acc.add(term)
                blobs.append(ckks.segment_sum(self.context, acc, plan.seg, plan.slots).serialize())
                counts.append(sl.stop - sl.start)
                placement.append((np.arange(sl.start, sl.stop), k))
                gains.append(gain)
        return EncryptedTensor(
            kind="activation", layer=self.name, shape=(x.n, h), blobs=blobs,
            stride=[plan.seg] * len(blobs), counts=counts, placement=placement, aggregate=d_in, gains=gains,
        )

    def _forward_column(self, x: EncryptedBatch) -> EncryptedTensor:
        """Column layout: z[:, k] = Σ_j W[j, k]·x_j with ciphertext × scalar, no rotation."""
        plan, (d_in, h) = self.plan, self.W.shape
        chunks = plan.column_chunks(x.n)
        columns = []  # per owner: per chunk, that owner's feature ciphertexts
        for part in x.parts:
            width = len(part.feature_index)
            loaded = [self._load(b) for b in part.column]
            columns.append([loaded[c * width : (c + 1) * width] for c in range(len(chunks))])
        blobs, counts, placement, gains = [], [], [], []
        for k in range(h):
            gain = self._gain(self.W[:, k])
            for c, sl in enumerate(chunks):
                acc = None
                for part, per_chunk in zip(x.parts, columns):
                    for j, vector in zip(part.feature_index, per_chunk[c]):
                        term = vector.mul(float(gain * self.W[j, k]))
                        acc = term if acc is None else acc.add_(term)
                blobs.append(acc.serialize())
                counts.append(sl.stop - sl.start)
                placement.append((np.arange(sl.start, sl.stop), k))
                gains.append(gain)
        return EncryptedTensor(
            kind="activation", layer=self.name, shape=(x.n, h), blobs=blobs,
            stride=[1] * len(blobs), counts=counts, placement=placement, aggregate=d_in, gains=gains,
        )

    def backward(self, grad_out: np.ndarray) -> EncryptedTensor:
        """G[:, k] = X^T·grad_out[:, k], summed over the batch inside the ciphertext."""
        x, plan = self._x, self.plan
        if x is None:
            raise RuntimeError(f"layer '{self.name}': backward called before forward")
        d_in, h = self.W.shape
        chunks = plan.chunks(x.n)
        blobs, counts, placement, gains = [], [], [], []
        for part in x.parts:
            cols = [self._load(b) for b in part.cols]
            n_feat = len(part.feature_index)
            for k in range(h):
                gain = self._gain(grad_out[:, k])
                acc = None
                for c, sl in enumerate(chunks):
                    term = ckks.multiply_plain(cols[c], plan.delta_vector(gain * grad_out[sl, k], n_feat))
                    acc = term if acc is None else acc.add(term)
                blobs.append(ckks.segment_sum(self.context, acc, plan.col_seg, plan.slots).serialize())
                counts.append(n_feat)
                placement.append((part.feature_index, k))
                gains.append(gain)
        return EncryptedTensor(
            kind="gradient", layer=self.name, shape=(d_in, h), blobs=blobs,
            stride=[plan.col_seg] * len(blobs), counts=counts, placement=placement, aggregate=x.n, gains=gains,
        )


class PlainInputLinear:
    """The plaintext twin of CipherLinear: the same product on the standardised features."""

    def __init__(self, name: str, weight: np.ndarray):
        self.name, self.W = name, weight
        self._x: np.ndarray | None = None

    def forward(self, x: PlainBatch) -> np.ndarray:
        self._x = x.x
        return x.x @ self.W

    def backward(self, grad_out: np.ndarray) -> np.ndarray:
        if self._x is None:
            raise RuntimeError(f"layer '{self.name}': backward called before forward")
        return self._x.T @ grad_out
