"""CKKS parameter sets: the 128-bit security bound, depth and precision checks."""

from dataclasses import dataclass

from hetrain.core.errors import SecurityParameterError

# HomomorphicEncryption.org standard, 128-bit classical security, ternary secret.
MAX_MODULUS_BITS = {1024: 27, 2048: 54, 4096: 109, 8192: 218, 16384: 438, 32768: 881}


@dataclass(frozen=True)
class CkksParams:
    """One CKKS parameter set: ring degree, modulus chain and scale."""

    poly_modulus_degree: int = 8192
    coeff_mod_bit_sizes: tuple[int, ...] = (60, 50, 60)
    scale_bits: int = 50

    @property
    def slots(self) -> int:
        return self.poly_modulus_degree // 2

    @property
    def depth(self) -> int:
        """Multiplicative levels available: primes between the first and the special prime."""
        return len(self.coeff_mod_bit_sizes) - 2

    @property
    def headroom(self) -> float:
        """Largest |value| a depth-1 result can hold and still decrypt correctly."""
        return 2.0 ** (self.coeff_mod_bit_sizes[0] - self.scale_bits - 1)

    @property
    def max_ciphertext_bytes(self) -> int:
        """Upper bound on one serialized CKKSVector: two polynomials of N 64-bit words per data prime
        (a fresh ciphertext; SEAL's compression only shrinks it), plus 4 KiB for the headers."""
        return 2 * self.poly_modulus_degree * (len(self.coeff_mod_bit_sizes) - 1) * 8 + 4096

    def validate(self, needed_depth: int = 1) -> "CkksParams":
        """Refuse insecure or too-shallow parameters with a message naming the limit."""
        n, bits = self.poly_modulus_degree, list(self.coeff_mod_bit_sizes)
        if n not in MAX_MODULUS_BITS:
            raise SecurityParameterError(
                f"ckks.poly_modulus_degree must be one of {sorted(MAX_MODULUS_BITS)}; got {n}"
            )
        if len(bits) < 2 or any(not (17 <= b <= 60) for b in bits):
            raise SecurityParameterError(
                f"ckks.coeff_mod_bit_sizes must hold at least 2 primes of 17..60 bits; got {bits}"
            )
        total, limit = sum(bits), MAX_MODULUS_BITS[n]
        if total > limit:
            raise SecurityParameterError(
                f"ckks.coeff_mod_bit_sizes {bits} total {total} bits, over the 128-bit security "
                f"bound of {limit} bits for poly_modulus_degree={n}; drop a prime or raise the degree"
            )
        if not (20 <= self.scale_bits <= min(bits[1:-1] or [60])):
            raise SecurityParameterError(
                f"ckks.scale_bits must be in [20, {min(bits[1:-1] or [60])}] (the middle primes of "
                f"{bits}); got {self.scale_bits}"
            )
        if bits[0] - self.scale_bits < 5:
            raise SecurityParameterError(
                f"ckks.coeff_mod_bit_sizes[0]={bits[0]} leaves only {bits[0] - self.scale_bits} bits "
                f"above scale_bits={self.scale_bits}; at least 5 are needed for masked values"
            )
        if needed_depth > self.depth:
            raise SecurityParameterError(
                f"the ciphertext layers need multiplicative depth {needed_depth}, which exceeds the "
                f"{self.depth} level(s) of coeff_mod_bit_sizes {bits}"
            )
        return self
