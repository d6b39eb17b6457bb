"""Ciphertext layers and their plaintext twins, with one calling convention.

`forward(x)` caches its input and returns X·W (no bias: the bias is added after the reveal,
in plaintext). `backward(grad_out)` returns the batch-aggregated weight gradient X^T·grad_out.
The ciphertext layer returns EncryptedTensor objects that must be revealed explicitly; the
twin returns numpy arrays. A test runs both on the same batch and compares.
"""

import hashlib

import numpy as np
import tenseal as ts

from hetrain.core.failpoints import failpoint
from hetrain.mpc_ops.crypto.jobs import JobRunner
from hetrain.mpc_ops.layers.packing import PackingPlan, gain_for
from hetrain.mpc_ops.crypto.tensors import EncryptedBatch, EncryptedTensor, PlainBatch


def weights_digest(weight: np.ndarray) -> str:
    """SHA-256 of the weights an activation is computed under, declared in its reveal request."""
    return hashlib.sha256(np.ascontiguousarray(weight, dtype=np.float64).tobytes()).hexdigest()


class CipherLinear:
    """Encrypted input × plaintext weights: packed forward, slot-summed gradient."""

    def __init__(self, name: str, weight: np.ndarray, context: ts.Context, plan: PackingPlan,
                 headroom: float = 512.0, mask_bound: float = 64.0, runner: JobRunner | None = None,
                 gradient_gain_cap: float | None = None):
        self.name, self.W, self.context, self.plan = name, weight, context, plan
        self.headroom, self.mask_bound = headroom, mask_bound
        # With DP noise on gradients, a gain > 1 would divide that noise too: cap it at 1.
        self.gradient_gain_cap = gradient_gain_cap
        self.runner = runner or JobRunner(context, plan.slots)
        self._x: EncryptedBatch | None = None

    def _gain(self, multiplier: np.ndarray) -> float:
        """Scale-up for one plaintext multiplier, undone after the reveal (divides the flooding noise)."""
        return gain_for(float(np.abs(multiplier).sum()), self.headroom, self.mask_bound)

    def forward(self, x: EncryptedBatch) -> EncryptedTensor:
        """z[:, k] = X·W[:, k] for every output k, in the plan's forward layout."""
        self._x = x
        plan, (d_in, h) = self.plan, self.W.shape
        blobs, jobs, counts, placement, gains = [], [], [], [], []
        if plan.forward == "column":
            # one ciphertext per feature; z[:, k] = Σ_j W[j, k]·x_j, ciphertext × scalar, no rotation
            chunks, index = plan.column_chunks(x.n), []
            for part in x.parts:
                width = len(part.feature_index)
                index.append([[len(blobs) + c * width + j for j in range(width)] for c in range(len(chunks))])
                blobs += part.column
            width, stride = 1, 1
        else:
            # rows layout: one ct × plain per owner, then one rotate-and-sum per chunk and output
            chunks, index = plan.chunks(x.n), []
            for part in x.parts:
                index.append(list(range(len(blobs), len(blobs) + len(part.rows))))
                blobs += part.rows
            width, stride = plan.seg, plan.seg
        for k in range(h):
            gain = self._gain(self.W[:, k])
            for c, sl in enumerate(chunks):
                terms = []
                for part, idx in zip(x.parts, index):
                    w = gain * self.W[part.feature_index, k]
                    if plan.forward == "column":
                        terms += [(i, float(wj)) for i, wj in zip(idx[c], w)]
                    else:
                        terms.append((idx[c], plan.weight_vector(w)))
                jobs.append((terms, width))
                counts.append(sl.stop - sl.start)
                placement.append((np.arange(sl.start, sl.stop), k))
                gains.append(gain)
        out = EncryptedTensor(
            kind="activation", layer=self.name, shape=(x.n, h), blobs=self.runner.run(blobs, jobs),
            stride=[stride] * len(jobs), counts=counts, placement=placement, aggregate=d_in, gains=gains,
            meta={"rows": list(x.rows), "weights": weights_digest(self.W)},
        )
        failpoint("cipher.after_forward")
        return out

    def backward(self, grad_out: np.ndarray) -> EncryptedTensor:
        """G[:, k] = X^T·grad_out[:, k], summed over the batch inside the ciphertext."""
        x, plan = self._x, self.plan
        if x is None:
            raise RuntimeError(f"layer '{self.name}': backward called before forward")
        d_in, h = self.W.shape
        chunks = plan.chunks(x.n)
        blobs, jobs, counts, placement, gains = [], [], [], [], []
        for part in x.parts:
            first, n_feat = len(blobs), len(part.feature_index)
            blobs += part.cols
            for k in range(h):
                gain = self._gain(grad_out[:, k])
                if self.gradient_gain_cap is not None:
                    gain = min(gain, self.gradient_gain_cap)
                terms = [(first + c, plan.delta_vector(gain * grad_out[sl, k], n_feat)) for c, sl in enumerate(chunks)]
                jobs.append((terms, plan.col_seg))
                counts.append(n_feat)
                placement.append((part.feature_index, k))
                gains.append(gain)
        out = EncryptedTensor(
            kind="gradient", layer=self.name, shape=(d_in, h), blobs=self.runner.run(blobs, jobs),
            stride=[plan.col_seg] * len(jobs), counts=counts, placement=placement, aggregate=x.n, gains=gains,
            meta={"rows": list(x.rows)},
        )
        failpoint("cipher.after_backward")
        return out


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
