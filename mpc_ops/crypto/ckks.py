"""Explicit CKKS calls on public material: encrypt, load, rotate-and-sum within segments, mask.

Nothing here can decrypt: it only ever sees public contexts (see participants/key_holder.py).
"""

import hashlib

import numpy as np
import tenseal as ts

from hetrain.mpc_ops.crypto import context_record, isolation, wire
from hetrain.core.errors import BundleError, ForeignKeyError, SecurityParameterError
from hetrain.core.params import CkksParams
from hetrain.mpc_ops.crypto.seal_format import CiphertextLayout


def key_id(context: ts.Context) -> str:
    """Digest of the public key: the identity every bundle and reveal is checked against."""
    public = context.serialize(
        save_public_key=True, save_secret_key=False, save_galois_keys=False, save_relin_keys=False
    )
    return "k-" + hashlib.sha256(public).hexdigest()[:32]


MAX_CONTEXT_BYTES = 512 << 20  # N=16384 with every Galois key is ~250 MB


def load_public_context(data: bytes, *, expected_key_id: str | None = None, params: CkksParams | None = None,
                        isolate: bool = True) -> ts.Context:
    """Load a context that must be public; refuse one that carries a secret key or other parameters.

    The first load of untrusted bytes runs in a memory-limited child process (hetrain.mpc_ops.crypto.isolation), so a
    context that crashes TenSEAL or exhausts memory is refused instead of killing this process. Pass
    isolate=False only for bytes this process serialized itself.
    """
    if not isinstance(data, (bytes, bytearray)) or not 0 < len(data) <= MAX_CONTEXT_BYTES:
        size = len(data) if isinstance(data, (bytes, bytearray)) else type(data).__name__
        raise BundleError(f"public context: must be 1..{MAX_CONTEXT_BYTES} bytes, got {size}")
    if isolate:
        _check_facts(isolation.probe_context(bytes(data)), params)
    try:
        context = ts.context_from(bytes(data))
    except Exception as exc:  # TenSEAL raises bare ValueError/RuntimeError on junk
        raise BundleError(f"public context: cannot be parsed ({exc})") from None
    context_record.record(context, "load_public_context")  # before the checks: a private load is recorded too
    _check_facts(isolation.context_facts(context), params)
    if expected_key_id is not None and key_id(context) != expected_key_id:
        raise ForeignKeyError(
            f"public context has key id {key_id(context)}, expected {expected_key_id}"
        )
    return context


def _check_facts(facts: isolation.ContextFacts, params: CkksParams | None) -> None:
    if facts.private:
        raise BundleError(
            "public context: it carries a secret key; only the key holder may load a private context"
        )
    if params is None:
        return
    want = (params.poly_modulus_degree, params.coeff_mod_bit_sizes, 2.0**params.scale_bits, True)
    got = (facts.poly_modulus_degree, facts.coeff_mod_bit_sizes, facts.global_scale, facts.galois_keys)
    if got != want:
        raise BundleError(
            f"public context: poly_modulus_degree {got[0]}, coeff_mod_bit_sizes {list(got[1])}, scale {got[2]}, "
            f"Galois keys {got[3]}; the config needs {want[0]}, {list(want[1])}, 2^{params.scale_bits} and Galois keys"
        )


def fresh_layout(context: ts.Context) -> CiphertextLayout:
    """A ciphertext as an owner encrypts it: every prime but the special one, scale 2^scale_bits."""
    return _layout("fresh", context, context.seal_context().data.first_context_data())


def product_layout(context: ts.Context) -> CiphertextLayout:
    """A ciphertext after one plaintext product and rescale (what the key holder decrypts): one prime fewer."""
    level = context.seal_context().data.first_context_data().next_context_data()
    if level is None:
        raise SecurityParameterError("the CKKS context has no level left after one multiplication")
    return _layout("product", context, level)


def revealed_layouts(context: ts.Context) -> list[CiphertextLayout]:
    """Every level a circuit's result can sit at after one or more products: the product level down
    to the last prime (the tiled engine reveals results of depth 1 to the chain's depth)."""
    layouts, level = [], context.seal_context().data.first_context_data().next_context_data()
    while level is not None:
        layouts.append(_layout(f"depth {len(layouts) + 1}", context, level))
        level = level.next_context_data()
    return layouts


def _layout(name: str, context: ts.Context, level) -> CiphertextLayout:
    return CiphertextLayout(name, level.parms().poly_modulus_degree(), tuple(level.parms_id()),
                            level.chain_index() + 1, float(context.global_scale))


def slot_count(context: ts.Context) -> int:
    """Number of CKKS slots (N/2) of a context."""
    return context.seal_context().data.key_context_data().parms().poly_modulus_degree() // 2


def encrypt(context: ts.Context, values: np.ndarray) -> bytes:
    """Encrypt a full slot vector under the public key and return the serialized ciphertext."""
    return ts.ckks_vector(context, np.asarray(values, dtype=np.float64).tolist()).serialize()


def load_vector(context: ts.Context, blob: bytes, layout: "CiphertextLayout | list[CiphertextLayout]") -> ts.CKKSVector:
    """Check a ciphertext blob's structure, level and scale against `layout` (or the first of several
    allowed layouts it matches), then deserialize it."""
    wire.check_any(blob, layout if isinstance(layout, list) else [layout])
    try:
        return ts.ckks_vector_from(context, bytes(blob))
    except (RuntimeError, ValueError, TypeError) as exc:  # SEAL's own checks, e.g. a coefficient >= its prime
        raise BundleError(f"ciphertext blob: TenSEAL refused it ({exc})") from None


def segment_sum(context: ts.Context, vector: ts.CKKSVector, seg: int, slots: int) -> ts.CKKSVector:
    """Sum every seg-wide slot segment into its first slot (log2(seg) rotations, all segments at once)."""
    if seg == 1:
        return vector
    resized = ts.ckks_vector_from(context, wire.with_size(vector.serialize(), seg, max_slots=slots))
    summed = resized.sum()
    return ts.ckks_vector_from(context, wire.with_size(summed.serialize(), slots, max_slots=slots))


def multiply_plain(vector: ts.CKKSVector, plain: np.ndarray) -> ts.CKKSVector:
    """Ciphertext × plain slot vector (one multiplication level), an all-zero vector included."""
    plain = np.asarray(plain, dtype=np.float64)
    return vector.mul(plain.tolist()) if plain.any() else zero_product(vector)


def multiply_scalar(vector: ts.CKKSVector, scalar: float) -> ts.CKKSVector:
    """Ciphertext × plain scalar (one multiplication level), zero included."""
    return vector.mul(float(scalar)) if scalar != 0 else zero_product(vector)


def zero_product(vector: ts.CKKSVector) -> ts.CKKSVector:
    """vector × 0 at the level and scale of a product: a fresh encryption of zero, one level down.

    TenSEAL skips the rescale of a product with an all-zero plaintext (it encodes to nothing), so
    `vector.mul(0)` stays a level too high and its reveal is refused (a dead ReLU's δ column of
    zeros). (x + Enc(0))·1 − x·1 is zero and sits where x·p would; x·1 − x·1 would be transparent.
    """
    ones = [1.0] * vector.size()
    fresh_zero = ts.ckks_vector(vector.context(), [0.0] * vector.size())
    return (vector + fresh_zero).mul(ones).sub_(vector.mul(ones))


def add_plain(vector: ts.CKKSVector, plain: np.ndarray) -> ts.CKKSVector:
    """Ciphertext + plain slot vector (used to blind before a reveal)."""
    return vector.add(np.asarray(plain, dtype=np.float64).tolist())
