"""Explicit CKKS calls on public material: encrypt, load, rotate-and-sum within segments, mask.

Nothing here can decrypt: it only ever sees public contexts (see participants/key_holder.py).
"""

import hashlib

import numpy as np
import tenseal as ts

from . import wire
from .errors import BundleError, ForeignKeyError


def key_id(context: ts.Context) -> str:
    """Digest of the public key: the identity every bundle and reveal is checked against."""
    public = context.serialize(
        save_public_key=True, save_secret_key=False, save_galois_keys=False, save_relin_keys=False
    )
    return "k-" + hashlib.sha256(public).hexdigest()[:32]


def load_public_context(data: bytes, *, expected_key_id: str | None = None) -> ts.Context:
    """Load a context that must be public; refuse one that carries a secret key."""
    try:
        context = ts.context_from(data)
    except Exception as exc:  # TenSEAL raises bare ValueError/RuntimeError on junk
        raise BundleError(f"public context: cannot be parsed ({exc})") from None
    if context.is_private():
        raise BundleError(
            "public context: it carries a secret key; only the key holder may load a private context"
        )
    if expected_key_id is not None and key_id(context) != expected_key_id:
        raise ForeignKeyError(
            f"public context has key id {key_id(context)}, expected {expected_key_id}"
        )
    return context


def slot_count(context: ts.Context) -> int:
    """Number of CKKS slots (N/2) of a context."""
    return context.seal_context().data.key_context_data().parms().poly_modulus_degree() // 2


def encrypt(context: ts.Context, values: np.ndarray) -> bytes:
    """Encrypt a full slot vector under the public key and return the serialized ciphertext."""
    return ts.ckks_vector(context, np.asarray(values, dtype=np.float64).tolist()).serialize()


def load_vector(context: ts.Context, blob: bytes, slots: int) -> ts.CKKSVector:
    """Validate a ciphertext blob's structure, then deserialize it against `context`."""
    wire.parse(blob, max_slots=slots)
    return ts.ckks_vector_from(context, blob)


def segment_sum(context: ts.Context, vector: ts.CKKSVector, seg: int, slots: int) -> ts.CKKSVector:
    """Sum every seg-wide slot segment into its first slot (log2(seg) rotations, all segments at once)."""
    if seg == 1:
        return vector
    resized = ts.ckks_vector_from(context, wire.with_size(vector.serialize(), seg, max_slots=slots))
    summed = resized.sum()
    return ts.ckks_vector_from(context, wire.with_size(summed.serialize(), slots, max_slots=slots))


def multiply_plain(vector: ts.CKKSVector, plain: np.ndarray) -> ts.CKKSVector:
    """Ciphertext × plain slot vector (one multiplication level)."""
    return vector.mul(np.asarray(plain, dtype=np.float64).tolist())


def add_plain(vector: ts.CKKSVector, plain: np.ndarray) -> ts.CKKSVector:
    """Ciphertext + plain slot vector (used to blind before a reveal)."""
    return vector.add(np.asarray(plain, dtype=np.float64).tolist())
