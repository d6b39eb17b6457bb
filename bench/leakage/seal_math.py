"""What a trainer can compute about SEAL's rings from the public parameters alone: the primes, SEAL's NTT
points, and the inverse of the CKKS slot embedding (used to turn decrypted slots back into a polynomial)."""

import numpy as np

from hetrain.mpc_ops.crypto.ring import coeff_modulus  # noqa: F401 - SEAL's primes, re-exported for the attacks


def minimal_root(n: int, q: int) -> int:
    """SEAL's NTT root: the smallest primitive 2n-th root of unity mod q."""
    for g in range(2, q):
        root = pow(g, (q - 1) // (2 * n), q)
        if pow(root, n, q) == q - 1:
            break
    square, current, best = root * root % q, root, root
    for _ in range(n):
        best = min(best, current)
        current = current * square % q
    return best


def bit_reverse(i: int, bits: int) -> int:
    return int(format(i, f"0{bits}b")[::-1], 2)


def ntt_monomial(n: int, q: int, t: int, coeff: int = 1) -> np.ndarray:
    """SEAL's NTT form of coeff·X^t mod q: entry j is coeff·ψ^((2·bitrev(j)+1)·t)."""
    psi, bits = minimal_root(n, q), n.bit_length() - 1
    return np.array([coeff * pow(psi, (2 * bit_reverse(j, bits) + 1) * t, q) % q for j in range(n)],
                    dtype=np.uint64)


def ntt_eval(coeffs: np.ndarray, q: int, j: int) -> int:
    """One entry of SEAL's NTT form of an integer polynomial (a spot check against a stored key)."""
    n = len(coeffs)
    psi, bits = minimal_root(n, q), n.bit_length() - 1
    point = pow(psi, 2 * bit_reverse(j, bits) + 1, q)
    acc, power = 0, 1
    for c in coeffs.tolist():
        acc = (acc + int(c) * power) % q
        power = power * point % q
    return acc


def slot_roots(n: int) -> np.ndarray:
    """The odd exponent e_j (root ζ^e_j, ζ = exp(iπ/n)) that SEAL's CKKS slot j evaluates: e_j = 3^j mod 2n."""
    return np.array([pow(3, j, 2 * n) for j in range(n // 2)], dtype=np.int64)


def polynomial_from_slots(values: np.ndarray, n: int) -> np.ndarray:
    """Real coefficients of the polynomial whose evaluations at the slot roots are `values` (complex, n/2).

    The other n/2 evaluations are the conjugates (a real polynomial); an inverse DFT over all n odd roots
    gives the coefficients, and averages the noise on the slots down by about sqrt(2/n).
    """
    evals = np.zeros(n, dtype=np.complex128)
    exps = slot_roots(n)
    evals[(exps - 1) // 2] = values
    evals[(2 * n - exps - 1) // 2] = np.conj(values)
    k = np.arange(n)
    # s_k = (1/n) Σ_t E_t ζ^{-(2t+1)k} = ζ^{-k}/n · Σ_t E_t e^{-2πi tk/n}
    return np.real(np.exp(-1j * np.pi * k / n) * np.fft.fft(evals) / n)


def _cyclic_ntt(a: list[int], w: int, q: int) -> list[int]:
    """Σ_m a_m w^(mk) mod q for every k (radix-2, Python integers)."""
    n = len(a)
    if n == 1:
        return a
    even, odd = _cyclic_ntt(a[0::2], w * w % q, q), _cyclic_ntt(a[1::2], w * w % q, q)
    out, t = [0] * n, 1
    for k in range(n // 2):
        x = odd[k] * t % q
        out[k], out[k + n // 2] = (even[k] + x) % q, (even[k] - x) % q
        t = t * w % q
    return out


def ntt(coeffs: list[int], q: int) -> list[int]:
    """SEAL's NTT form of an integer polynomial: entry j is a(ψ^(2·bitrev(j)+1))."""
    n = len(coeffs)
    psi, bits = minimal_root(n, q), n.bit_length() - 1
    twisted, t = [], 1
    for c in coeffs:
        twisted.append(int(c) % q * t % q)
        t = t * psi % q
    natural = _cyclic_ntt(twisted, psi * psi % q, q)  # entry m: a(ψ^(2m+1))
    return [natural[bit_reverse(j, bits)] for j in range(n)]


def intt(values: list[int], q: int) -> list[int]:
    """The coefficients (mod q, in [0, q)) of a polynomial given in SEAL's NTT form."""
    n = len(values)
    psi, bits = minimal_root(n, q), n.bit_length() - 1
    natural = [int(values[bit_reverse(m, bits)]) for m in range(n)]
    d = _cyclic_ntt(natural, pow(psi, -2, q), q)
    inv_n, inv_psi, out, t = pow(n, -1, q), pow(psi, -1, q), [], 1
    for k in range(n):
        out.append(d[k] * inv_n % q * t % q)
        t = t * inv_psi % q
    return out
