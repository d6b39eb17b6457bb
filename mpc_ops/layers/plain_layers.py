"""Plaintext numpy layers and losses: the twins that ciphertext layers are tested against.

Every layer has `forward(x)` and `backward(grad_out)` side by side; `backward` returns the
gradient w.r.t. the layer's input and uses what `forward` cached. `parameters()` and
`grads()` return the live arrays, so an optimizer that updates them in place is seen here.
"""

import numpy as np


def sigmoid(x: np.ndarray) -> np.ndarray:
    """Logistic function, written as exp(-softplus(-x)) so |x| ~ 1000 neither overflows nor nans."""
    return np.exp(-np.logaddexp(0.0, -x))


def _check_positive_int(owner: str, name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"The '{name}' parameter of {owner} must be an int >= 1. Got {value!r} instead.")
    return int(value)


class Linear:
    """Affine map x @ W + b; W is Glorot-uniform, b starts at zero."""

    def __init__(self, in_features: int, out_features: int, rng: np.random.Generator, name: str):
        owner = f"Linear '{name}'"
        self.in_features = _check_positive_int(owner, "in_features", in_features)
        self.out_features = _check_positive_int(owner, "out_features", out_features)
        self.name = name
        limit = np.sqrt(6.0 / (self.in_features + self.out_features))
        self.W = rng.uniform(-limit, limit, size=(self.in_features, self.out_features))
        self.b = np.zeros(self.out_features)
        self.grad_W = np.zeros_like(self.W)
        self.grad_b = np.zeros_like(self.b)
        self._x: np.ndarray | None = None

    def forward(self, x: np.ndarray) -> np.ndarray:
        if x.ndim != 2 or x.shape[1] != self.in_features:
            raise ValueError(
                f"layer '{self.name}': input must have shape (n, {self.in_features}); got {x.shape}"
            )
        self._x = x.copy()  # the caller may reuse its buffer before backward
        return x @ self.W + self.b

    def backward(self, grad_out: np.ndarray) -> np.ndarray:
        if self._x is None:
            raise RuntimeError(f"layer '{self.name}': backward called before forward")
        self.grad_W = self._x.T @ grad_out
        self.grad_b = grad_out.sum(axis=0)
        return grad_out @ self.W.T

    def parameters(self) -> dict[str, np.ndarray]:
        return {"W": self.W, "b": self.b}

    def grads(self) -> dict[str, np.ndarray]:
        return {"W": self.grad_W, "b": self.grad_b}

    def load(self, params: dict) -> None:
        """Copy W and b from `params` into the existing arrays, so optimizers keep their references."""
        for key, target in self.parameters().items():
            if key not in params:
                raise ValueError(f"layer '{self.name}': load needs key '{key}'; got keys {sorted(params)}")
            value = np.asarray(params[key], dtype=float)
            if value.shape != target.shape:
                raise ValueError(
                    f"layer '{self.name}': parameter '{key}' must have shape {target.shape}; got {value.shape}"
                )
        for key, target in self.parameters().items():
            np.copyto(target, np.asarray(params[key], dtype=float))


class _Activation:
    """Element-wise activation: no parameters, so empty dicts."""

    def parameters(self) -> dict[str, np.ndarray]:
        return {}

    def grads(self) -> dict[str, np.ndarray]:
        return {}


class ReLU(_Activation):
    """max(x, 0)."""

    def forward(self, x: np.ndarray) -> np.ndarray:
        self._mask = x > 0
        return np.where(self._mask, x, 0.0)

    def backward(self, grad_out: np.ndarray) -> np.ndarray:
        return grad_out * self._mask


class Tanh(_Activation):
    """tanh(x)."""

    def forward(self, x: np.ndarray) -> np.ndarray:
        self._y = np.tanh(x)
        return self._y

    def backward(self, grad_out: np.ndarray) -> np.ndarray:
        return grad_out * (1.0 - self._y**2)


class Sigmoid(_Activation):
    """1 / (1 + exp(-x)), computed stably."""

    def forward(self, x: np.ndarray) -> np.ndarray:
        self._y = sigmoid(x)
        return self._y

    def backward(self, grad_out: np.ndarray) -> np.ndarray:
        return grad_out * self._y * (1.0 - self._y)


_ACTIVATIONS = {"relu": ReLU, "sigmoid": Sigmoid, "tanh": Tanh}


def build_activation(kind: str) -> _Activation:
    """Return a fresh activation layer for 'relu', 'sigmoid' or 'tanh'."""
    if kind not in _ACTIVATIONS:
        raise ValueError(f"activation '{kind}' is not supported; allowed: {', '.join(sorted(_ACTIVATIONS))}")
    return _ACTIVATIONS[kind]()


class SoftmaxCrossEntropy:
    """Mean cross-entropy of softmax(logits) against integer labels y of shape (n,)."""

    def forward(self, logits: np.ndarray, y: np.ndarray) -> float:
        n, classes = _check_logits("SoftmaxCrossEntropy", logits, y)
        labels = np.asarray(y)
        if not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0 or labels.max() >= classes:
            raise ValueError(
                f"SoftmaxCrossEntropy: labels must be integers in [0, {classes - 1}]; "
                f"got dtype {labels.dtype}, range [{labels.min()}, {labels.max()}]"
            )
        shifted = logits - logits.max(axis=1, keepdims=True)
        log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
        self._probs, self._y = np.exp(log_probs), labels.copy()
        return float(-log_probs[np.arange(n), labels].mean())

    def backward(self) -> np.ndarray:
        n = self._y.shape[0]
        grad = self._probs.copy()
        grad[np.arange(n), self._y] -= 1.0
        return grad / n

    def predict(self, logits: np.ndarray) -> np.ndarray:
        return logits.argmax(axis=1)


class BinaryCrossEntropy:
    """Mean BCE-with-logits for logits of shape (n, 1) and labels y in {0, 1} of shape (n,)."""

    def forward(self, logits: np.ndarray, y: np.ndarray) -> float:
        _, classes = _check_logits("BinaryCrossEntropy", logits, y)
        labels = np.asarray(y, dtype=float)
        if classes != 1 or not np.isin(labels, (0.0, 1.0)).all():
            raise ValueError(
                f"BinaryCrossEntropy: logits must have shape (n, 1) and labels be 0 or 1; "
                f"got logits {logits.shape}, label values {np.unique(labels)[:5]}"
            )
        z = logits[:, 0]
        self._z, self._y = z.copy(), labels
        # softplus(z) - y*z is -[y log s(z) + (1-y) log(1-s(z))] without forming s(z)
        return float((np.logaddexp(0.0, z) - labels * z).mean())

    def backward(self) -> np.ndarray:
        return ((sigmoid(self._z) - self._y) / self._y.shape[0])[:, None]

    def predict(self, logits: np.ndarray) -> np.ndarray:
        return (logits[:, 0] > 0).astype(int)


def _check_logits(owner: str, logits: np.ndarray, y: np.ndarray) -> tuple[int, int]:
    if logits.ndim != 2 or np.ndim(y) != 1 or logits.shape[0] != np.shape(y)[0] or logits.shape[0] == 0:
        raise ValueError(
            f"{owner}: logits must have shape (n, C) and labels shape (n,) with n >= 1; "
            f"got logits {logits.shape}, labels {np.shape(y)}"
        )
    return logits.shape


class Sequential:
    """Layers applied in order; parameter keys are '<layer name>.<param>'."""

    def __init__(self, layers: list):
        self.layers = list(layers)
        names = [layer.name for layer in self.layers if layer.parameters()]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"Sequential: layer names must be unique; repeated: {duplicates}")

    def forward(self, x: np.ndarray) -> np.ndarray:
        for layer in self.layers:
            x = layer.forward(x)
        return x

    def backward(self, grad_out: np.ndarray) -> np.ndarray:
        for layer in reversed(self.layers):
            grad_out = layer.backward(grad_out)
        return grad_out

    def parameters(self) -> dict[str, np.ndarray]:
        return {f"{layer.name}.{k}": v for layer in self.layers for k, v in layer.parameters().items()}

    def grads(self) -> dict[str, np.ndarray]:
        return {f"{layer.name}.{k}": v for layer in self.layers for k, v in layer.grads().items()}
