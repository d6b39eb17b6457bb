"""Optimizers that update parameter arrays in place, with exact save/restore for checkpoints."""

import numbers

import numpy as np


def _check_float(owner: str, name: str, value, allowed: str, ok) -> float:
    """Return `value` as a float, or raise naming the parameter, the allowed range and the value."""
    is_real = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if not (is_real and np.isfinite(value) and ok(float(value))):
        raise ValueError(f"The '{name}' parameter of {owner} must be a float {allowed}. Got {value!r} instead.")
    return float(value)


def _positive(owner: str, name: str, value) -> float:
    return _check_float(owner, name, value, "> 0", lambda v: v > 0)


def _unit_interval(owner: str, name: str, value) -> float:
    return _check_float(owner, name, value, "in the range [0, 1)", lambda v: 0 <= v < 1)


def _check_grads(owner: str, params: dict, grads: dict) -> None:
    for key, p in params.items():
        if key not in grads:
            raise ValueError(f"{owner}.step: no gradient for parameter '{key}'; got gradients for {sorted(grads)}")
        if np.shape(grads[key]) != p.shape:
            raise ValueError(
                f"{owner}.step: gradient for '{key}' must have shape {p.shape}; got {np.shape(grads[key])}"
            )


def _split_state(owner: str, d: dict, scalars: tuple[str, ...], slots: tuple[str, ...]):
    """Split a flat state dict into scalar entries and per-slot {param key: array} dicts."""
    missing = [k for k in scalars if k not in d]
    if missing:
        raise ValueError(f"{owner}.load_state_dict: missing keys {missing}; got keys {sorted(d)}")
    buffers: dict[str, dict[str, np.ndarray]] = {slot: {} for slot in slots}
    for key, value in d.items():
        if key in scalars:
            continue
        slot, _, param = key.partition(".")
        if slot not in buffers or not param:
            allowed = list(scalars) + [f"{s}.<param>" for s in slots]
            raise ValueError(f"{owner}.load_state_dict: unexpected key '{key}'; allowed: {allowed}")
        buffers[slot][param] = np.array(value)  # a copy, with the saved dtype
    return buffers


def _scalar(d: dict, key: str):
    """Read a scalar entry; np.load hands scalars back as 0-d arrays."""
    value = d[key]
    return value.item() if isinstance(value, np.ndarray) and value.ndim == 0 else value


class SGD:
    """Stochastic gradient descent with heavy-ball momentum: v = momentum*v + g; p -= lr*v."""

    def __init__(self, lr: float, momentum: float = 0.0):
        self.lr = _positive("SGD", "lr", lr)
        self.momentum = _unit_interval("SGD", "momentum", momentum)
        self.velocity: dict[str, np.ndarray] = {}

    def step(self, params: dict[str, np.ndarray], grads: dict[str, np.ndarray]) -> None:
        """Update every array in `params` in place from the matching entry of `grads`."""
        _check_grads("SGD", params, grads)
        for key, p in params.items():
            g = grads[key]
            if self.momentum:
                v = self.velocity.setdefault(key, np.zeros_like(p))
                v *= self.momentum
                v += g
                g = v
            p -= self.lr * g

    def state_dict(self) -> dict[str, np.ndarray | float | int]:
        state: dict[str, np.ndarray | float | int] = {"lr": self.lr, "momentum": self.momentum}
        state.update({f"velocity.{k}": v.copy() for k, v in self.velocity.items()})
        return state

    def load_state_dict(self, d: dict) -> None:
        """Restore hyperparameters and momentum buffers saved by `state_dict`."""
        buffers = _split_state("SGD", d, ("lr", "momentum"), ("velocity",))
        lr = _positive("SGD", "lr", _scalar(d, "lr"))
        momentum = _unit_interval("SGD", "momentum", _scalar(d, "momentum"))
        self.lr, self.momentum, self.velocity = lr, momentum, buffers["velocity"]


class Adam:
    """Adam (Kingma & Ba, 2015) with bias-corrected first and second moments."""

    def __init__(self, lr: float, beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8):
        self._set_hyper(lr, beta1, beta2, eps)
        self.t = 0
        self.m: dict[str, np.ndarray] = {}
        self.v: dict[str, np.ndarray] = {}

    def _set_hyper(self, lr, beta1, beta2, eps) -> None:
        checked = (
            _positive("Adam", "lr", lr),
            _unit_interval("Adam", "beta1", beta1),
            _unit_interval("Adam", "beta2", beta2),
            _positive("Adam", "eps", eps),
        )
        self.lr, self.beta1, self.beta2, self.eps = checked  # all or nothing

    def step(self, params: dict[str, np.ndarray], grads: dict[str, np.ndarray]) -> None:
        """Update every array in `params` in place from the matching entry of `grads`."""
        _check_grads("Adam", params, grads)
        self.t += 1
        correction1 = 1.0 - self.beta1**self.t
        correction2 = 1.0 - self.beta2**self.t
        for key, p in params.items():
            g = grads[key]
            m = self.m.setdefault(key, np.zeros_like(p))
            v = self.v.setdefault(key, np.zeros_like(p))
            m *= self.beta1
            m += (1.0 - self.beta1) * g
            v *= self.beta2
            v += (1.0 - self.beta2) * g * g
            p -= self.lr * (m / correction1) / (np.sqrt(v / correction2) + self.eps)

    def state_dict(self) -> dict[str, np.ndarray | float | int]:
        state: dict[str, np.ndarray | float | int] = {
            "lr": self.lr, "beta1": self.beta1, "beta2": self.beta2, "eps": self.eps, "t": self.t,
        }
        state.update({f"m.{k}": a.copy() for k, a in self.m.items()})
        state.update({f"v.{k}": a.copy() for k, a in self.v.items()})
        return state

    def load_state_dict(self, d: dict) -> None:
        """Restore hyperparameters, step count and moment buffers saved by `state_dict`."""
        buffers = _split_state("Adam", d, ("lr", "beta1", "beta2", "eps", "t"), ("m", "v"))
        t = _scalar(d, "t")
        if isinstance(t, bool) or not isinstance(t, numbers.Integral) or t < 0:
            raise ValueError(f"The 't' entry of Adam's state must be an int >= 0. Got {t!r} instead.")
        if sorted(buffers["m"]) != sorted(buffers["v"]):
            raise ValueError(
                f"Adam.load_state_dict: 'm' and 'v' must cover the same parameters; "
                f"got m for {sorted(buffers['m'])}, v for {sorted(buffers['v'])}"
            )
        self._set_hyper(*(_scalar(d, k) for k in ("lr", "beta1", "beta2", "eps")))
        self.t, self.m, self.v = int(t), buffers["m"], buffers["v"]


_OPTIMIZERS = {"adam": Adam, "sgd": SGD}


def build_optimizer(kind: str, **kwargs) -> SGD | Adam:
    """Return an optimizer for 'sgd' or 'adam', built from its hyperparameter keyword arguments."""
    if kind not in _OPTIMIZERS:
        raise ValueError(f"optimizer '{kind}' is not supported; allowed: {', '.join(sorted(_OPTIMIZERS))}")
    return _OPTIMIZERS[kind](**kwargs)
