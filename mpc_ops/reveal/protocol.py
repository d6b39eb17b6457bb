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

from hetrain.mpc_ops.crypto import ckks, wire
from hetrain.mpc_ops.crypto import flooding
from hetrain.core.errors import BundleError
from hetrain.mpc_ops.crypto.seal_format import CiphertextLayout
from hetrain.mpc_ops.crypto.tensors import EncryptedTensor

MAX_REQUEST_BLOBS = 4096  # a layer has at most 4096 outputs (config), each one blob per chunk and owner
_TEXT_FIELDS = {"request_id": 128, "key_id": 64, "kind": 32, "layer": 64}


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


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def check_request(request: RevealRequest, layout: "CiphertextLayout | list[CiphertextLayout]") -> None:
    """Raise BundleError unless every field of a reveal request has the type and range the key holder
    relies on, and every blob is one ciphertext of `layout` (or of one of several allowed levels);
    nothing here decrypts or charges the budget."""
    layouts = layout if isinstance(layout, list) else [layout]
    layout = layouts[0]
    if not isinstance(request, RevealRequest):
        raise BundleError(f"reveal request: expected a RevealRequest, got {type(request).__name__}")
    for name, limit in _TEXT_FIELDS.items():
        value = getattr(request, name)
        if not isinstance(value, str) or not 0 < len(value) <= limit:
            raise BundleError(f"reveal request: '{name}' must be a string of 1..{limit} characters, got {value!r:.80}")
    for name, high in (("round", 10**9), ("aggregate", 2**31)):
        value = getattr(request, name)
        if not _is_int(value) or not 0 <= value <= high:
            raise BundleError(f"reveal request: '{name}' must be an int in [0, {high}], got {value!r:.80}")
    blobs, stride, counts = request.blobs, request.stride, request.counts
    if not all(isinstance(v, list) for v in (blobs, stride, counts)):
        raise BundleError("reveal request: 'blobs', 'stride' and 'counts' must be lists, got "
                          f"{type(blobs).__name__}, {type(stride).__name__}, {type(counts).__name__}")
    n = len(blobs)
    if not (len(stride) == len(counts) == n) or not 1 <= n <= MAX_REQUEST_BLOBS:
        raise BundleError(f"reveal request: {n} blobs but {len(stride)} strides and {len(counts)} counts "
                          f"(allowed: equal lengths of 1..{MAX_REQUEST_BLOBS})")
    slots = layout.slots
    for b, (s, c) in enumerate(zip(stride, counts)):
        if not (_is_int(s) and _is_int(c)) or s < 1 or c < 1 or s * (c - 1) >= slots:
            raise BundleError(f"reveal request: blob {b}: stride {s!r:.40} × count {c!r:.40} does not fit "
                              f"{slots} slots (needs ints >= 1 with stride × (count - 1) < {slots})")
    for b, blob in enumerate(blobs):
        _check_blob(b, blob, layouts)


def _check_blob(b: int, blob: bytes, layouts: list[CiphertextLayout]) -> None:
    """The blob is a ciphertext of one of `layouts` (the levels a revealed result may sit at)."""
    try:
        wire.check_any(blob, layouts)
    except BundleError as exc:
        allowed = ", ".join(str(lay.coeff_modulus_size) for lay in layouts)
        suffix = f" (allowed numbers of primes: {allowed})" if len(layouts) > 1 else ""
        raise BundleError(f"reveal request: blob {b}: {exc}{suffix}") from None


class KeyHolderClient(Protocol):
    """What the trainer calls: the in-process key holder (hetrain.runtime.LocalKeyHolderClient) or the
    key-holder service (hetrain.mpc_ops.reveal.http_client.HttpKeyHolderClient)."""

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
    blobs, masks, layout = [], [], ckks.revealed_layouts(context)  # depth 1 (hybrid) up to the chain's depth (tiled)
    for blob, stride, count in zip(enc.blobs, enc.stride, enc.counts):
        r = _mask(slots, mask_bound)
        vector = ckks.load_vector(context, blob, layout)
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
