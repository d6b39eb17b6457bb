"""The configured network: an input Linear (computed by the front) and a plaintext body.

The trainer's engine (hetrain.engine) trains it; depth_plan runs one step of it to count the
circuit's depth, so it lives below both.
"""

import numpy as np

from hetrain.core import shapes
from hetrain.core.config import RunConfig
from hetrain.mpc_ops.layers.plain_layers import BinaryCrossEntropy, Linear, Sequential, SoftmaxCrossEntropy
from hetrain.mpc_ops.layers.polyact import activation_for


class Model:
    """The configured network: an input Linear (computed by the front) and a plaintext body."""

    def __init__(self, cfg: RunConfig):
        rng = np.random.default_rng(cfg.seed)
        width = shapes.input_width(cfg)
        layers = []
        for spec in cfg.model.layers:
            if spec.kind == "linear":
                layers.append(Linear(width, spec.out_features, rng, spec.name))
                width = spec.out_features
            else:
                layers.append(activation_for(spec))
        self.input: Linear = layers[0]
        self.body = Sequential(layers[1:])
        self.loss = BinaryCrossEntropy() if cfg.model.loss == "binary_cross_entropy" else SoftmaxCrossEntropy()

    def parameters(self) -> dict[str, np.ndarray]:
        own = {f"{self.input.name}.{k}": v for k, v in self.input.parameters().items()}
        return {**own, **self.body.parameters()}

    def grads(self) -> dict[str, np.ndarray]:
        own = {f"{self.input.name}.{k}": v for k, v in self.input.grads().items()}
        return {**own, **self.body.grads()}

    def load(self, params: dict[str, np.ndarray]) -> None:
        """Copy saved parameters into the live arrays (optimizers keep their references)."""
        live = self.parameters()
        missing = sorted(set(live) - set(params))
        if missing:
            raise ValueError(f"saved parameters lack {missing}")
        for key, target in live.items():
            if params[key].shape != target.shape:
                raise ValueError(f"parameter '{key}': saved shape {params[key].shape}, model has {target.shape}")
            target[...] = params[key]
