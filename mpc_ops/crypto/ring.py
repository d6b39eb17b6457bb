"""A CKKS ciphertext as integers: its coefficients mod each prime, exact scalar combinations, and linear MAC tags.

A serialized ciphertext (c0, c1) holds 2 × k × N coefficients in SEAL's NTT form, one block of N per
polynomial and prime. Multiplying by an integer constant and adding are coefficient-wise mod each prime,
in NTT form as in coefficient form, so a linear tag t = <K, c> mod q (K a secret vector per prime) obeys
t(Σ m_j·c_j) = Σ m_j·t(c_j) mod q. The key holder checks that relation before it decrypts: a result the
trainer declares as Σ m_j·c_j + M must be exactly that, or the check fails except with probability 1/q.
"""

import math
import struct
from dataclasses import dataclass

import numpy as np

from hetrain.core.errors import BundleError
from hetrain.mpc_ops.crypto import wire
from hetrain.mpc_ops.crypto.seal_format import HEADER_SIZE, repack, unpack

_META = struct.Struct("<4QB3QdQ")  # parms_id, is_ntt_form, size, N, coeff_modulus_size, scale, correction
_COEFFS = _META.size + HEADER_SIZE + 8  # the coefficient array's own SEAL header and count precede the values
LIMB_BITS = 20  # 60-bit values as three 20-bit limbs: a limb product sum over 2^14 terms stays under 2^54


def _is_prime(n: int) -> bool:
    """Deterministic Miller-Rabin for n < 3.3e24."""
    if n < 2:
        return False
    bases = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41)
    for p in bases:
        if n % p == 0:
            return n == p
    d, r = n - 1, 0
    while d % 2 == 0:
        d, r = d // 2, r + 1
    for a in bases:
        x = pow(a, d, n)
        if x in (1, n - 1):
            continue
        for _ in range(r - 1):
            x = x * x % n
            if x == n - 1:
                break
        else:
            return False
    return True


def coeff_modulus(n: int, bit_sizes: "list[int] | tuple[int, ...]") -> list[int]:
    """SEAL's CoeffModulus::Create: per bit size, the largest primes ≡ 1 mod 2n below 2^bits, handed out
    smallest first (SEAL takes each bit size's list from the back). TenSEAL does not expose the primes."""
    bit_sizes, factor, found = list(bit_sizes), 2 * n, {}
    for bits in sorted(set(bit_sizes)):
        need, value, out = bit_sizes.count(bits), ((1 << bits) - 1) // factor * factor + 1, []
        while len(out) < need and value > 1 << (bits - 1):
            if _is_prime(value):
                out.append(value)
            value -= factor
        found[bits] = out
    return [found[bits].pop() for bits in bit_sizes]


@dataclass(frozen=True)
class RingCiphertext:
    """A serialized ciphertext's coefficients (2, k, N) and what is needed to write it back."""

    coeffs: np.ndarray
    template: bytes  # the original blob: header, metadata, logical size and TenSEAL scale come from it
    scale: float

    @property
    def primes_used(self) -> int:
        return self.coeffs.shape[1]


def read(blob: bytes, slots: int) -> RingCiphertext:
    """The coefficients of a CKKSVector blob (structure checked by the caller's layout check first)."""
    parts = wire.parse(blob, max_slots=slots)
    payload = unpack(parts.seal_ciphertext)
    if len(payload) < _COEFFS:
        raise BundleError("ciphertext blob: the SEAL payload ends inside its metadata")
    *_, size, n, k, _, _ = _META.unpack_from(payload, 0)
    values = np.frombuffer(payload, dtype=np.uint64, offset=_COEFFS)
    if size != 2 or len(values) != 2 * k * n:
        raise BundleError(f"ciphertext blob: {len(values)} coefficients; 2 polynomials × {k} primes × {n} "
                          f"need {2 * k * n}")
    return RingCiphertext(values.reshape(2, k, n).copy(), bytes(blob), parts.scale)


def write(template: RingCiphertext, coeffs: np.ndarray) -> bytes:
    """`coeffs` serialized like `template`: same level, logical size and scales."""
    parts = wire.parse(template.template, max_slots=1 << 20)
    payload = bytearray(unpack(parts.seal_ciphertext))
    if coeffs.shape != template.coeffs.shape:
        raise BundleError(f"coefficients of shape {coeffs.shape}; the template's level needs {template.coeffs.shape}")
    payload[_COEFFS:] = np.ascontiguousarray(coeffs, dtype=np.uint64).tobytes()
    seal = repack(parts.seal_ciphertext, bytes(payload))
    return wire.build(wire.VectorBlob(parts.size, seal, parts.scale))


def encode_scalar(value: float, scale: float, q: int) -> int:
    """SEAL's CKKS encoding of one real number as a constant polynomial, mod q: value·scale in double
    precision, rounded half away from zero (std::round; Python's round() would round half to even)."""
    scaled = float(value) * float(scale)
    coeff = int(math.floor(abs(scaled) + 0.5))
    return (coeff if scaled >= 0 else -coeff) % q


def _limbs(values: np.ndarray) -> list[np.ndarray]:
    mask = np.uint64((1 << LIMB_BITS) - 1)
    return [(values >> np.uint64(LIMB_BITS * i)) & mask for i in range(3)]


def inner_mod(a: np.ndarray, b: np.ndarray, q: int) -> int:
    """<a, b> mod q, exactly, for uint64 vectors of values below 2^60 and length up to 2^14."""
    if a.shape != b.shape or a.ndim != 1 or a.size > 1 << 14:
        raise ValueError(f"inner_mod needs two equal 1-d vectors of at most 2^14 values, got {a.shape}, {b.shape}")
    la, lb = _limbs(a), _limbs(b)
    total = 0
    for i in range(3):
        for j in range(3):
            total += int(np.dot(la[i], lb[j])) << (LIMB_BITS * (i + j))
    return total % q


def tag(coeffs: np.ndarray, mac_key: np.ndarray, primes: list[int]) -> list[int]:
    """The linear MAC of a ciphertext: per prime i, <K_i, (c0_i, c1_i)> mod q_i."""
    k = coeffs.shape[1]
    return [inner_mod(coeffs[:, i, :].ravel(), mac_key[i], primes[i]) for i in range(k)]


def combine_tags(terms: list[tuple[int, list[int]]], primes: list[int]) -> list[int]:
    """Σ m_j·t_j mod each prime, for integer multipliers m_j (already reduced per prime or not)."""
    return [sum(m * t[i] for m, t in terms) % q for i, q in enumerate(primes)]


def combine(terms: list[tuple[list[int], np.ndarray]], primes: list[int]) -> np.ndarray:
    """Σ m_j·c_j mod each prime, exactly (Python integers): terms are (multiplier per prime, coeffs (2, k, N))."""
    k = terms[0][1].shape[1]
    out = np.empty_like(terms[0][1])
    for i in range(k):
        q, acc = primes[i], None
        for mult, coeffs in terms:
            part = coeffs[:, i, :].astype(object) * int(mult[i])
            acc = part if acc is None else acc + part
        out[:, i, :] = (acc % q).astype(np.uint64)
    return out
