"""One training step of a network whose lower layers run on ciphertext, written once for both engines.

The policy decides where the data is revealed: `cipher` leading linear layers run on the
tiled layout (mpc_ops/tiled.py) with polynomial activations between them; if the policy
declares a reveal point, the last ciphertext layer's pre-activations are revealed and the
rest runs in plaintext, otherwise (strict) the loss gradient is computed on ciphertext too.
Labels are public (`labels: reveal`) or encrypted by the label owner; then δ at the top is
p − Enc(y) and stays ciphertext through every layer, and only aggregates are revealed:
weight gradients (block sums over the batch) and the batch's loss and correct count.

Revealed weight gradients are GAIN × the batch mean (the sum over the batch / 8 at m = 64), metrics
are means: the factor is folded into a public multiplier (a block mask, a weight, a polynomial
coefficient) at no extra level and divided out after the reveal. The CKKS error of a reveal is a
part relative to the values (≈ 2^-29·|v|, growing with depth) plus the rotations' key-switching
noise (≈ 2^-28, absolute); values of a few units balance the two, which keeps B, hence σ,
smallest relative to the signal (mpc_ops/crypto/flooding.py).

Depth (levels consumed) of each value is tracked by `circuit.Val`; `circuit_depth` runs a
step on the numpy engine to count it, which is what the planner checks against the chain.
"""

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from hetrain.mpc_ops.layers.circuit import Ops, Val, public
from hetrain.mpc_ops.layers.plain_layers import Linear, sigmoid
from hetrain.mpc_ops.layers.polyact import PolyActivation, PolyFit, linear_sigmoid
from hetrain.mpc_ops.layers.tiled import Tiling

SIGMOID_LINE = linear_sigmoid()
GAIN = 8.0  # revealed gradients are GAIN × batch means


@dataclass
class Inputs:
    """A batch in the tiled layout: per-feature replicated values, the block vector, labels."""

    m: int
    rep: list[Val]
    block: Val
    labels: np.ndarray | None = None  # public labels (policy labels: reveal)
    enc_labels: list[Val] | None = None  # encrypted labels: one replicated vector per class (1 for binary)
    rows: list[str] = field(default_factory=list)
    batch_id: str = ""


@dataclass
class Reveal:
    """What the net asks to see: `vals` hold the values at slot stride·t, t < count."""

    kind: str  # "activation", "gradient" or "metric"
    layer: str
    vals: list[Val]
    stride: int
    count: int
    aggregate: int


@dataclass
class Outcome:
    loss: float | None  # summed over the batch, None when nothing reveals it (strict)
    correct: int | None
    m: int
    logits: np.ndarray | None = None


# ---- polynomials on Vals -------------------------------------------------------------------

def poly_forward(ops: Ops, poly: PolyFit, z: Val) -> Val:
    """p(z) in depth +1 (square, degree 1) or +2 (degree 2 and 3), folding coefficients into products."""
    c = list(poly.coeffs) + [0.0] * (4 - len(poly.coeffs))
    if poly.kind == "square":
        return ops.mul(z, z)
    if poly.degree <= 1:
        return ops.lin([(z, c[1])], c[0])
    if poly.degree == 2:
        return ops.add(ops.mul(ops.lin([(z, c[2])], c[1]), z), public(np.full(ops.slots, c[0])))
    z2 = ops.mul(z, z)
    return ops.add(ops.mul(ops.lin([(z, c[3])], c[2]), z2), ops.lin([(z, c[1])], c[0]))


def poly_derivative(ops: Ops, poly: PolyFit, z: Val, scale: float = 1.0) -> Val:
    """scale·p'(z): the scale (a weight) is folded into the coefficients, free of extra depth."""
    c = [scale * x for x in list(poly.coeffs) + [0.0] * (4 - len(poly.coeffs))]
    if poly.kind == "square" and scale == 1.0:
        return ops.add(z, z)
    if poly.degree <= 1:
        return public(np.full(ops.slots, c[1]))
    if poly.degree == 2:
        return ops.lin([(z, 2 * c[2])], c[1])
    return ops.lin([(ops.mul(z, z), 3 * c[3]), (z, 2 * c[2])], c[1])


# ---- the network ----------------------------------------------------------------------------

class TiledNet:
    """A configured stack of Linear and activation layers, split by the policy into ciphertext and plaintext."""

    def __init__(self, layers: list, cipher: int, reveal_point: bool, task: str, tiling: Tiling):
        self.layers, self.cipher, self.reveal_point = layers, cipher, reveal_point
        self.task, self.tiling = task, tiling
        self.linears = [i for i, layer in enumerate(layers) if isinstance(layer, Linear)]
        # index of the last ciphertext linear layer in `layers`
        self.top_cipher = self.linears[cipher - 1]
        for i in range(self.top_cipher):
            layer = layers[i]
            if not isinstance(layer, (Linear, PolyActivation)):
                raise ValueError(f"layer {i} ({type(layer).__name__}) runs on ciphertext and must be polynomial")
        self.frozen = False

    def _linear(self, ops: Ops, layer: Linear, h: list[Val], scale: float = 1.0, shift: float = 0.0) -> list[Val]:
        return [ops.lin([(h[j], scale * layer.W[j, k]) for j in range(len(h))], scale * layer.b[k] + shift)
                for k in range(layer.W.shape[1])]

    # -- forward on ciphertext ------------------------------------------------------------------
    def cipher_forward(self, ops: Ops, x: Inputs) -> tuple[list[list[Val]], list[list[Val]]]:
        """Inputs and pre-activations of each ciphertext linear layer (strict binary: the top is σ_line(z))."""
        h, hs, zs = x.rep, [], []
        for i in range(self.top_cipher + 1):
            layer = self.layers[i]
            if isinstance(layer, Linear):
                hs.append(h)
                top_strict = i == self.top_cipher and not self.reveal_point and self.task == "binary"
                # strict binary: fold σ ≈ 1/2 + z/4 into the top layer's weights (no extra level)
                z = self._linear(ops, layer, h, 0.25, 0.5) if top_strict else self._linear(ops, layer, h)
                zs.append(z)
                h = z
            else:
                h = [poly_forward(ops, layer.poly, v) for v in h]
        return hs, zs

    # -- one step --------------------------------------------------------------------------------
    def step(self, ops: Ops, x: Inputs, reveal: Callable[[Reveal], np.ndarray],
             cached_z: np.ndarray | None = None, train: bool = True) -> tuple[Outcome, np.ndarray | None]:
        """Forward, loss, backward; set every Linear's grad_W/grad_b (batch means). Returns the outcome
        and the revealed pre-activations at the reveal point (for the frozen cache)."""
        t, m = self.tiling, x.m
        hs, zs, z_revealed = [], [], None
        if cached_z is None or not self.frozen:
            hs, zs = self.cipher_forward(ops, x)
        if not self.reveal_point:
            outcome, deltas = self._strict_top(ops, x, zs[-1])
            scaled = False
        else:
            if cached_z is not None and self.frozen:
                z_revealed = cached_z
            else:
                z_revealed = reveal(Reveal("activation", self.layers[self.top_cipher].name, zs[-1], 1, m,
                                           self.layers[self.top_cipher].W.shape[0]))
            outcome, deltas, scaled = self._plain_top(ops, x, z_revealed, reveal, train)
        if not train:
            return outcome, z_revealed
        if not (self.frozen and self.reveal_point):
            self._cipher_backward(ops, x, hs, zs, deltas, reveal, scaled)
        return outcome, z_revealed

    def _strict_top(self, ops: Ops, x: Inputs, top: list[Val]) -> tuple[Outcome, list[Val]]:
        """δ on ciphertext: σ_line(z) − y (binary) or z − Y (multiclass least-squares surrogate)."""
        if x.enc_labels is not None:
            y = x.enc_labels
        elif self.task == "binary":
            y = [public(self.tiling.rep(x.labels))]
        else:
            y = [public(self.tiling.rep((x.labels == c).astype(float))) for c in range(len(top))]
        return Outcome(None, None, x.m), [ops.sub(z, yc) for z, yc in zip(top, y)]

    def _plain_top(self, ops: Ops, x: Inputs, z: np.ndarray, reveal, train: bool) -> tuple[Outcome, list[Val], bool]:
        """Plaintext layers above the reveal point; δ comes back as public or encrypted values, and
        whether it already carries the batch's 1/m."""
        t, m = self.tiling, x.m
        acts = z
        for layer in self.layers[self.top_cipher + 1 :]:
            acts = layer.forward(acts)
        logits = acts
        if self.task == "binary":
            p = sigmoid(logits[:, 0])[:, None]
            pred = (logits[:, 0] > 0).astype(int)
        else:
            shifted = logits - logits.max(axis=1, keepdims=True)
            p = np.exp(shifted) / np.exp(shifted).sum(axis=1, keepdims=True)
            pred = logits.argmax(axis=1)
        if x.enc_labels is None:
            y = x.labels
            onehot = y[:, None].astype(float) if self.task == "binary" else np.eye(p.shape[1])[y]
            if self.task == "binary":
                loss = float(-(onehot * np.log(np.clip(p, 1e-4, 1)) + (1 - onehot) * np.log(np.clip(1 - p, 1e-4, 1))).sum())
            else:
                loss = float(-(onehot * np.log(np.clip(p, 1e-4, 1))).sum())
            outcome = Outcome(loss, int((pred == y).sum()), m, logits)
            if not train:
                return outcome, [], True
            delta = GAIN * self._plain_backward((p - onehot) / m)
            return outcome, [public(t.rep(delta[:, k])) for k in range(delta.shape[1])], True
        outcome = Outcome(*self._encrypted_metrics(ops, x, p, pred, reveal), m, logits)
        if not train:
            return outcome, [], True
        deltas = [ops.sub(public(t.rep(p[:, c])), x.enc_labels[c]) for c in range(p.shape[1])]
        return (outcome, *self._encrypted_plain_backward(ops, x, deltas, reveal))

    def _encrypted_metrics(self, ops: Ops, x: Inputs, p: np.ndarray, pred: np.ndarray, reveal) -> tuple[float, int]:
        """Loss and correct count, both linear in the encrypted labels: block 0 sums −log p(y), block 1 [pred = y]."""
        t, m = self.tiling, x.m
        # block 0: the loss sum / GAIN (each term clipped at −log 1e-4, so the sum fits the headroom);
        # block 1: the correct count itself (≤ m; the flooding noise is far below the 0.5 of a rounding)
        scale = np.array([1.0 / GAIN, 1.0])
        logp = np.log(np.clip(p, 1e-4, 1.0))
        if self.task == "binary":
            log1m = np.log(np.clip(1 - p[:, 0], 1e-4, 1.0))
            # −[y log p + (1−y) log(1−p)] = −y (log p − log(1−p)) − log(1−p);  [pred=y] = y(2 pred − 1) + 1 − pred
            coeff = t.block(np.stack([-(logp[:, 0] - log1m), 2 * pred - 1.0], axis=1) * scale)
            acc = ops.mul(x.enc_labels[0], public(coeff))
            const = np.array([-log1m.sum(), float((1 - pred).sum())])
        else:
            acc = None
            for c in range(p.shape[1]):
                coeff = t.block(np.stack([-logp[:, c], (pred == c).astype(float)], axis=1) * scale)
                term = ops.mul(x.enc_labels[c], public(coeff))
                acc = term if acc is None else ops.add(acc, term)
            const = np.zeros(2)
        values = reveal(Reveal("metric", "metrics", [ops.block_sum(acc, t.n)], t.n, 2, m))[:, 0] / scale + const
        return float(values[0]), int(round(values[1]))

    def _plain_backward(self, delta: np.ndarray) -> np.ndarray:
        """Backward through the plaintext layers (numpy); returns δ at the reveal point (batch sums)."""
        for layer in reversed(self.layers[self.top_cipher + 1 :]):
            delta = layer.backward(delta)
        return delta

    def _encrypted_plain_backward(self, ops: Ops, x: Inputs, deltas: list[Val], reveal) -> tuple[list[Val], bool]:
        """Backward through plaintext layers with an encrypted δ: ciphertext × public, gradients block-summed."""
        t, m, scaled = self.tiling, x.m, False
        upper = self.layers[self.top_cipher + 1 :]
        # public inputs of each plaintext Linear and pre-activations of each activation, from forward
        for pos in range(len(upper) - 1, -1, -1):
            layer = upper[pos]
            if isinstance(layer, Linear):
                a = layer._x  # the public input the forward pass cached
                f = 1.0 if scaled else GAIN / m  # GAIN × the batch mean, folded into public multipliers
                a_block = public(f * (t.block(a) + t.mask(a.shape[1], x.m)))
                grads = reveal(Reveal("gradient", layer.name, [ops.block_sum(ops.mul(a_block, d), t.n) for d in deltas],
                                      t.n, a.shape[1] + 1, x.m)) / GAIN
                layer.grad_W, layer.grad_b = grads[:-1], grads[-1]
                act = upper[pos - 1] if pos > 0 else None
                deriv = _plain_derivative(act, a.shape) if act is not None else np.ones(a.shape)
                # fold W[k, c]·act'(z_k) into one public vector per (k, c): one level for the whole layer
                deltas = [_sum(ops, [ops.mul(d, public(t.rep(f * layer.W[k, c] * deriv[:, k]))) for c, d in enumerate(deltas)])
                          for k in range(layer.W.shape[0])]
                scaled = True
        return deltas, scaled

    def _cipher_backward(self, ops: Ops, x: Inputs, hs, zs, deltas: list[Val], reveal, scaled: bool) -> None:
        t, m = self.tiling, x.m
        cipher_linears = self.linears[: self.cipher]
        for level in range(self.cipher - 1, -1, -1):
            i = cipher_linears[level]
            layer, h = self.layers[i], hs[level]
            f, post = (1.0 if scaled else GAIN / m), 1.0 / GAIN
            if level == 0:
                # Xblock + ones block (bias): one ct×ct and one rotate-and-sum per output unit
                a_block = ops.add(x.block, public(t.mask(len(h), x.m)))
                if not scaled:  # a one-layer strict net: no public multiplier to fold the gain into
                    post, f = 1.0 / m, 1.0
            else:
                parts = [ops.mul(v, public(f * t.mask(j, x.m))) for j, v in enumerate(h)]
                a_block = ops.add(_sum(ops, parts), public(f * t.mask(len(h), x.m)))
            grads = post * reveal(Reveal("gradient", layer.name, [ops.block_sum(ops.mul(a_block, d), t.n) for d in deltas],
                                         t.n, len(h) + 1, x.m))
            layer.grad_W, layer.grad_b = grads[:-1], grads[-1]
            if level == 0:
                break
            act = self.layers[i - 1]
            z_below = zs[level - 1]
            g = 1.0 if scaled else GAIN / m
            if len(deltas) == 1:  # fold (1/m)·W[k]·p'(z_k) into one polynomial: one level fewer
                deltas = [ops.mul(deltas[0], poly_derivative(ops, act.poly, z_below[k], g * layer.W[k, 0]))
                          for k in range(layer.W.shape[0])]
            else:
                deltas = [ops.mul(ops.lin([(d, g * layer.W[k, c]) for c, d in enumerate(deltas)]),
                                  poly_derivative(ops, act.poly, z_below[k])) for k in range(layer.W.shape[0])]
            scaled = True


def _sum(ops: Ops, vals: list[Val]) -> Val:
    acc = vals[0]
    for v in vals[1:]:
        acc = ops.add(acc, v)
    return acc


def _plain_derivative(act, shape) -> np.ndarray:
    """act'(z) of a plaintext activation layer, from what its forward pass cached."""
    if isinstance(act, PolyActivation):
        return act.poly.derivative(act._z)
    y = getattr(act, "_y", None)
    if y is not None and type(act).__name__ == "Tanh":
        return 1.0 - y**2
    if y is not None and type(act).__name__ == "Sigmoid":
        return y * (1.0 - y)
    if hasattr(act, "_mask"):
        return act._mask.astype(float)
    raise ValueError(f"no derivative for plaintext activation {type(act).__name__}")


class TiledLearner:
    """A TiledNet, its parameters' optimizer and the explicit reveal: one object per engine."""

    def __init__(self, model, optimizer, net: TiledNet, ops: Ops, reveal: Callable[[Reveal], np.ndarray]):
        self.model, self.optimizer, self.net, self.ops, self.reveal = model, optimizer, net, ops, reveal
        self.frozen_cache: dict[str, np.ndarray] = {}

    def _cipher_keys(self) -> list[str]:
        names = [self.net.layers[i].name for i in self.net.linears[: self.net.cipher]]
        return [f"{n}.{p}" for n in names for p in ("W", "b")]

    def train_batch(self, x: Inputs) -> Outcome:
        cached = self.frozen_cache.get(x.batch_id)
        out, z = self.net.step(self.ops, x, self.reveal, cached, train=True)
        if self.net.frozen and z is not None:
            self.frozen_cache[x.batch_id] = z
        params, grads = self.model.parameters(), self.model.grads()
        if self.net.frozen:
            for key in self._cipher_keys():
                params.pop(key), grads.pop(key)
        self.optimizer.step(params, grads)  # every gradient is already a batch mean
        return out

    def eval_batch(self, x: Inputs) -> Outcome:
        out, z = self.net.step(self.ops, x, self.reveal, self.frozen_cache.get(x.batch_id), train=False)
        if self.net.frozen and z is not None:
            self.frozen_cache[x.batch_id] = z
        return out


def plain_reveal(tiling: Tiling) -> Callable[[Reveal], np.ndarray]:
    """The twin's reveal: read the requested slots of numpy values (no key holder involved)."""
    def reveal(r: Reveal) -> np.ndarray:
        return np.stack([np.asarray(v.v)[: r.stride * r.count : r.stride] for v in r.vals], axis=1)
    return reveal


def build_net(cfg, model, tiling: Tiling) -> TiledNet:
    """The configured model, split by the policy: `cipher` leading linear layers on ciphertext."""
    layers = [model.input] + list(model.body.layers)
    return TiledNet(layers, len(cfg.policy.cipher_layers), bool(cfg.policy.reveals), cfg.data.task, tiling)
