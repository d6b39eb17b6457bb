"""The verified reveal (`policy.trainer: untrusted`): the key holder decrypts only what it can check.

Owners encrypt each input feature column-packed (one ciphertext per feature and chunk of up to `slots`
samples) and, for every chunk and output of the ciphertext layer, a mask Enc(r) at scale Δ². For every
ciphertext they publish they send the key holder a linear MAC tag <K, c> mod q (mpc_ops/crypto/ring.py),
never to the exchange store. The trainer computes output k of a chunk as

    c = Σ_j m_jk · ct_j + M_k,    m_jk = round(W_jk · Δ)  (W: the key holder's own weights, see below)

and sends c. The key holder recomputes the tag it must have from its own W and the owners' tags, checks
<K, c>, and only then decrypts, floods and returns the chunk's live slots. A crafted ciphertext, a raw
owner ciphertext, other multipliers or another mask fail the check (probability 1/q per prime of a
forgery passing). Each (chunk, output) is revealed once per key, so averaging cannot remove the flooding.
The layer's weights are drawn by the key holder from its CSPRNG and never train: the trainer cannot pick
unit vectors, and every sample is revealed under one W of rank h < d.
"""

import hashlib
import uuid
from dataclasses import dataclass

import numpy as np

from hetrain.core.errors import BundleError, PolicyRefusal
from hetrain.mpc_ops.crypto import ring, wire
from hetrain.mpc_ops.crypto.seal_format import CiphertextLayout, check_ciphertext

KIND = "verified_activation"
MAX_CHUNK_ID = 96


@dataclass
class VerifiedRevealRequest:
    """Output `output` of layer `layer` for the samples of `chunk`, computed as the module docstring says."""

    request_id: str
    key_id: str
    layer: str
    chunk: str
    output: int
    blob: bytes

    @property
    def n_bytes(self) -> int:
        return len(self.blob)


def new_request(key_id: str, layer: str, chunk: str, output: int, blob: bytes) -> VerifiedRevealRequest:
    return VerifiedRevealRequest(uuid.uuid4().hex, key_id, layer, chunk, int(output), bytes(blob))


def chunk_id(owner: str | None, split: str, key_id: str, pseudonyms: list[str]) -> str:
    """A chunk's name: its split and a digest of the key and its samples' pseudonyms, so the owners of a vertical
    split (owner None) name their shared chunks alike, and new data or a new key never reuses a name (the key
    holder fixes each chunk's tags and reveals each output once)."""
    digest = hashlib.sha256("\n".join([key_id, *pseudonyms]).encode()).hexdigest()[:16]
    return f"{split}-{digest}" if owner is None else f"{owner}-{split}-{digest}"


def check_fields(request: VerifiedRevealRequest, outputs: int) -> None:
    """Types and ranges of a request, before any tag is computed (BundleError names the field)."""
    if not isinstance(request, VerifiedRevealRequest):
        raise BundleError(f"verified reveal: expected a VerifiedRevealRequest, got {type(request).__name__}")
    for name, limit in (("request_id", 128), ("key_id", 64), ("layer", 64), ("chunk", MAX_CHUNK_ID)):
        value = getattr(request, name)
        if not isinstance(value, str) or not 0 < len(value) <= limit or not value.isprintable():
            raise BundleError(f"verified reveal: '{name}' must be 1..{limit} printable characters, got {value!r:.80}")
    if not isinstance(request.output, int) or isinstance(request.output, bool) or not 0 <= request.output < outputs:
        raise BundleError(f"verified reveal: 'output' must be an int in [0, {outputs - 1}], got {request.output!r:.40}")
    if not isinstance(request.blob, (bytes, bytearray)):
        raise BundleError(f"verified reveal: 'blob' must be bytes, got {type(request.blob).__name__}")


def layout(context, params) -> CiphertextLayout:
    """What a verified result is: the fresh level (every prime but the special one), SEAL scale Δ²."""
    level = context.seal_context().data.first_context_data()
    return CiphertextLayout("verified", level.parms().poly_modulus_degree(), tuple(level.parms_id()),
                            level.chain_index() + 1, float(2.0 ** (2 * params.scale_bits)))


def read_checked(blob: bytes, result_layout: CiphertextLayout, tenseal_scale: float) -> np.ndarray:
    """The coefficients of a verified result, after its structure, level and scale were checked."""
    limit = 2 * result_layout.payload_size + 4096
    if len(blob) > limit:
        raise BundleError(f"verified reveal: the blob has {len(blob)} bytes, over the limit of {limit}")
    parts = wire.parse(blob, max_slots=result_layout.slots)
    if parts.size != result_layout.slots or parts.scale != tenseal_scale:
        raise BundleError(f"verified reveal: logical size {parts.size} and TenSEAL scale {parts.scale!r}; a verified "
                          f"result has {result_layout.slots} slots and scale {tenseal_scale!r}")
    check_ciphertext(parts.seal_ciphertext, result_layout)
    return ring.read(blob, result_layout.slots).coeffs


def multipliers(weights: np.ndarray, output: int, scale: float, primes: list[int]) -> list[list[int]]:
    """m_jk per input feature j and prime: SEAL's encoding of W[j, output] at `scale`."""
    return [[ring.encode_scalar(float(w), scale, q) for q in primes] for w in weights[:, output]]


def expected_tag(feature_tags: list[list[int]], mask_tag: list[int], mults: list[list[int]],
                 primes: list[int]) -> list[int]:
    """Σ_j m_jk·t_j + t_M mod each prime: what <K, c> must be for an honestly computed c."""
    return [(sum(m[i] * t[i] for m, t in zip(mults, feature_tags)) + mask_tag[i]) % q for i, q in enumerate(primes)]


def check_tag(coeffs: np.ndarray, mac_key: np.ndarray, expected: list[int], primes: list[int],
              where: str) -> None:
    """Refuse (PolicyRefusal 'unverified') a ciphertext whose MAC differs from the expected one."""
    if ring.tag(coeffs, mac_key, primes) != expected:
        raise PolicyRefusal("unverified", f"{where}: the ciphertext is not the declared combination of the owners' "
                                          f"tagged ciphertexts and mask (its MAC tag does not match); nothing was "
                                          f"decrypted")


def draw_weights(seed: bytes, d: int, h: int) -> np.ndarray:
    """The ciphertext layer's weights, N(0, 1/d), from a seed of the key holder's (drawn from os.urandom).
    The weights are public; what matters is that the trainer cannot choose them."""
    if len(seed) < 32:
        raise ValueError("the weight seed must hold at least 32 bytes")
    rng = np.random.Generator(np.random.PCG64(int.from_bytes(seed[:32], "big")))
    return rng.normal(0.0, 1.0 / np.sqrt(d), size=(d, h))
