"""Polynomial activations: the only non-linear functions a ciphertext can go through.

`square` is exact. `poly_tanh` and `poly_sigmoid` are least-squares fits of the named function
on [-range, range]; each fit carries its worst error on that range, which the run summary and
metrics report. The plaintext layer classes here are the twins the ciphertext circuit is
tested against, and also what a plaintext layer runs when a policy puts the activation above
the reveal point, so one model definition means the same function under every policy.
"""

from dataclasses import dataclass

import numpy as np

from hetrain.mpc_ops.layers.plain_layers import sigmoid

POLY_KINDS = ("square", "poly_tanh", "poly_sigmoid")
_TARGETS = {"poly_tanh": np.tanh, "poly_sigmoid": sigmoid}


@dataclass(frozen=True)
class PolyFit:
    """p(z) = Σ coeffs[m]·z^m, fitted to `kind` on [-range, range] with worst error `max_error`."""

    kind: str
    coeffs: tuple[float, ...]
    range: float
    max_error: float

    @property
    def degree(self) -> int:
        return len(self.coeffs) - 1

    def __call__(self, z: np.ndarray) -> np.ndarray:
        return np.polynomial.polynomial.polyval(z, self.coeffs)

    def derivative(self, z: np.ndarray) -> np.ndarray:
        return np.polynomial.polynomial.polyval(z, np.polynomial.polynomial.polyder(self.coeffs))

    def summary(self) -> dict:
        return {"kind": self.kind, "degree": self.degree, "range": self.range,
                "coefficients": [round(c, 8) for c in self.coeffs], "max_error": round(self.max_error, 6)}


def fit(kind: str, degree: int | None = None, range_: float | None = None) -> PolyFit:
    """The activation's polynomial: exact for `square`, a least-squares fit for the others."""
    if kind == "square":
        return PolyFit("square", (0.0, 0.0, 1.0), float(range_ or 0.0), 0.0)
    if kind not in _TARGETS:
        raise ValueError(f"polynomial activation must be one of {POLY_KINDS}; got {kind!r}")
    degree, range_ = int(degree or 3), float(range_ or 4.0)
    if not 1 <= degree <= 3:
        raise ValueError(f"activation '{kind}': degree must be in [1, 3] (depth budget); got {degree}")
    grid = np.linspace(-range_, range_, 4001)
    target = _TARGETS[kind](grid)
    coeffs = np.polynomial.polynomial.polyfit(grid, target, degree)
    if kind == "poly_tanh":  # tanh is odd: keep the fit odd (one multiplication fewer)
        coeffs[0::2] = 0.0
        basis = np.stack([grid**m for m in range(1, degree + 1, 2)], axis=1)
        coeffs[1::2] = np.linalg.lstsq(basis, target, rcond=None)[0]
    error = float(np.abs(np.polynomial.polynomial.polyval(grid, coeffs) - target).max())
    return PolyFit(kind, tuple(float(c) for c in coeffs), range_, error)


def linear_sigmoid(range_: float = 4.0) -> PolyFit:
    """σ(z) ≈ 1/2 + z/4 (the Taylor line at 0): the strict binary loss gradient δ = σ(z) - y."""
    grid = np.linspace(-range_, range_, 4001)
    return PolyFit("linear_sigmoid", (0.5, 0.25), range_, float(np.abs(0.5 + grid / 4 - sigmoid(grid)).max()))


class PolyActivation:
    """Plaintext layer p(z); backward multiplies by p'(z). Same calling convention as plain_layers."""

    def __init__(self, poly: PolyFit):
        self.poly = poly
        self._z: np.ndarray | None = None

    def forward(self, x: np.ndarray) -> np.ndarray:
        self._z = x.copy()
        return self.poly(x)

    def backward(self, grad_out: np.ndarray) -> np.ndarray:
        return grad_out * self.poly.derivative(self._z)

    def parameters(self) -> dict:
        return {}

    def grads(self) -> dict:
        return {}


def activation_for(spec) -> object:
    """The plaintext activation layer of a config layer (polynomial kinds included)."""
    from hetrain.mpc_ops.layers.plain_layers import build_activation

    if spec.kind in POLY_KINDS:
        return PolyActivation(fit(spec.kind, spec.degree, spec.range))
    return build_activation(spec.kind)
