"""Slot-vector arithmetic in one of two engines, with the multiplicative depth of every value.

The tiled network (mpc_ops/tiled_net.py) is written once against `Ops`; `CipherOps` runs it on
CKKS ciphertexts, `PlainOps` on numpy slot vectors (its twin, and the depth counter the planner
uses: it tracks depth exactly as the ciphertext engine consumes levels). A `Val` is either
public to the trainer (`secret=False`, a numpy vector) or secret (a ciphertext, or its twin).
Mixing the two is what lets one model run under every policy: a revealed activation or a
plaintext prediction enters the same circuit as a public value.
"""

from dataclasses import dataclass

import numpy as np
import tenseal as ts

from hetrain.mpc_ops.crypto import ckks


@dataclass
class Val:
    """One slot vector: `v` is a numpy array (public, or a twin's secret) or a CKKSVector."""

    v: object
    depth: int = 0
    secret: bool = True


def public(values: np.ndarray) -> Val:
    return Val(np.asarray(values, dtype=np.float64), 0, False)


class Ops:
    """Operations on Vals; each says what it costs in depth."""

    slots: int

    # -- engine-specific primitives ----------------------------------------------------------
    def _scale(self, v, s: float): raise NotImplementedError
    def _mul(self, a, b): raise NotImplementedError
    def _mul_plain(self, a, p: np.ndarray): raise NotImplementedError
    def _add(self, a, b): raise NotImplementedError
    def _add_plain(self, a, p: np.ndarray): raise NotImplementedError
    def _neg(self, a): raise NotImplementedError
    def _block_sum(self, a, width: int): raise NotImplementedError

    # -- the circuit vocabulary ---------------------------------------------------------------
    def lin(self, terms: list[tuple[Val, float]], const: float | np.ndarray = 0.0) -> Val:
        """Σ s·v + const: ciphertext × scalar, one level (public terms are free)."""
        acc, depth, plain = None, 0, np.zeros(self.slots) + const
        for val, s in terms:
            if s == 0.0:
                continue
            if not val.secret:
                plain = plain + s * val.v
                continue
            term = self._scale(val.v, float(s))
            acc = term if acc is None else self._add(acc, term)
            depth = max(depth, val.depth + 1)
        if acc is None:
            return public(plain)
        return Val(self._add_plain(acc, plain) if np.any(plain) else acc, depth, True)

    def mul(self, a: Val, b: Val) -> Val:
        """Slot-wise product: ct×ct or ct×plain vector, one level past the deeper factor."""
        if not a.secret and not b.secret:
            return public(a.v * b.v)
        if not a.secret:
            a, b = b, a
        if not b.secret:
            return Val(self._mul_plain(a.v, b.v), a.depth + 1, True)
        return Val(self._mul(a.v, b.v), max(a.depth, b.depth) + 1, True)

    def add(self, a: Val, b: Val) -> Val:
        if not a.secret and not b.secret:
            return public(a.v + b.v)
        if not a.secret:
            a, b = b, a
        if not b.secret:
            return Val(self._add_plain(a.v, b.v), a.depth, True)
        return Val(self._add(a.v, b.v), max(a.depth, b.depth), True)

    def neg(self, a: Val) -> Val:
        return public(-a.v) if not a.secret else Val(self._neg(a.v), a.depth, True)

    def sub(self, a: Val, b: Val) -> Val:
        return self.add(a, self.neg(b))

    def block_sum(self, a: Val, width: int) -> Val:
        """Sum every width-slot block into its first slot (log2(width) rotations, no level)."""
        if not a.secret:
            return public(np.repeat(a.v.reshape(-1, width).sum(axis=1), width) * _first(width, self.slots))
        return Val(self._block_sum(a.v, width), a.depth, True)


def _first(width: int, slots: int) -> np.ndarray:
    out = np.zeros(slots)
    out[::width] = 1.0
    return out


class PlainOps(Ops):
    """The numpy twin: exact arithmetic, the same depth bookkeeping."""

    def __init__(self, slots: int):
        self.slots = slots

    def _scale(self, v, s): return v * s
    def _mul(self, a, b): return a * b
    def _mul_plain(self, a, p): return a * p
    def _add(self, a, b): return a + b
    def _add_plain(self, a, p): return a + p
    def _neg(self, a): return -a

    def _block_sum(self, a, width):
        return np.repeat(a.reshape(-1, width).sum(axis=1), width) * _first(width, self.slots)

    def secret(self, values: np.ndarray) -> Val:
        return Val(np.asarray(values, dtype=np.float64), 0, True)


class CipherOps(Ops):
    """CKKS ciphertexts through TenSEAL (auto rescale, relinearisation and mod-switching)."""

    def __init__(self, context: ts.Context):
        self.context = context
        self.slots = ckks.slot_count(context)
        self._fresh = ckks.fresh_layout(context)

    def _scale(self, v, s): return ckks.multiply_scalar(v, s)
    def _mul(self, a, b): return a.mul(b)
    def _mul_plain(self, a, p): return ckks.multiply_plain(a, p)
    def _add(self, a, b): return a.add(b)
    def _add_plain(self, a, p): return a.add(np.asarray(p, dtype=np.float64).tolist())
    def _neg(self, a): return a.neg()

    def _block_sum(self, a, width):
        # segment_sum leaves each block's sum in its first slot; the other slots hold partial
        # sums, which the reveal never asks for.
        return ckks.segment_sum(self.context, a, width, self.slots)

    def load(self, blob: bytes) -> Val:
        """An owner's fresh ciphertext, checked against the fresh level and scale before TenSEAL sees it."""
        return Val(ckks.load_vector(self.context, blob, self._fresh), 0, True)
