"""The blinded reveal, trainer side: mask, ask the key holder, unmask.

The trainer adds a fresh uniform mask r to every slot of every ciphertext, so the key holder
decrypts only masked values; it returns the requested slots plus flooding noise, and the
trainer subtracts r. The key holder never sees true activations or gradients, and the
trainer never sees anything but the requested slots.
"""

import uuid
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import tenseal as ts

from . import ckks, flooding
from .tensors import EncryptedTensor


@dataclass
class RevealRequest:
    """What the trainer sends: masked ciphertexts and which slots it wants back."""

    request_id: str
    key_id: str
    kind: str
    layer: str
    round: int
    blobs: list[bytes]
    stride: list[int]
    counts: list[int]
    aggregate: int
    rows: list[str] = field(default_factory=list)  # pseudonyms of the samples in the batch
    weights: str = ""  # SHA-256 of the plaintext weights an activation was computed under

    @property
    def n_bytes(self) -> int:
        return sum(len(b) for b in self.blobs)


@dataclass
class RevealResponse:
    """What the key holder returns: the flooded, masked values of the requested slots."""

    request_id: str
    values: list[np.ndarray]
    sigma: float
    decryptions_used: int = 0
    extra: dict = field(default_factory=dict)


class KeyHolderClient(Protocol):
    """What the trainer calls: the in-process key holder (flows.runtime.LocalKeyHolderClient) or the
    key-holder service (mpc_ops.key_holder_client.HttpKeyHolderClient)."""

    def public_context(self) -> bytes: ...

    def reveal(self, request: RevealRequest) -> RevealResponse: ...

    def audit_summary(self) -> dict: ...

    @property
    def decryptions_used(self) -> int: ...


def _mask(slots: int, bound: float) -> np.ndarray:
    """Uniform in [-bound, bound) from the CSPRNG."""
    return (flooding.uniform(slots) * 2.0 - 1.0) * bound


def blind(enc: EncryptedTensor, context: ts.Context, *, key_id: str, round_no: int,
          mask_bound: float) -> tuple[RevealRequest, list[np.ndarray]]:
    """Mask every slot of every blob; return the request and the masks to subtract later."""
    slots = ckks.slot_count(context)
    blobs, masks = [], []
    for blob, stride, count in zip(enc.blobs, enc.stride, enc.counts):
        r = _mask(slots, mask_bound)
        vector = ckks.load_vector(context, blob, slots)
        blobs.append(ckks.add_plain(vector, r).serialize())
        masks.append(r[: stride * count : stride])
    request = RevealRequest(
        request_id=uuid.uuid4().hex, key_id=key_id, kind=enc.kind, layer=enc.layer, round=round_no,
        blobs=blobs, stride=list(enc.stride), counts=list(enc.counts), aggregate=enc.aggregate,
        rows=list(enc.meta.get("rows", [])), weights=enc.meta.get("weights", ""),
    )
    return request, masks


def unblind(enc: EncryptedTensor, response: RevealResponse, masks: list[np.ndarray]) -> np.ndarray:
    """Subtract the masks and assemble the plaintext result."""
    return enc.assemble([v - r for v, r in zip(response.values, masks)])
