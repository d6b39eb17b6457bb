"""The network's shapes, derived from the config in one place (pure: no numpy, nothing above hetrain.core).

The key holder's policy rules, the planner, the tiled layout, the owners' feature offsets and
the exchange-store reader all read the layer widths from here, never from a request or a bundle.
"""

from dataclasses import dataclass


@dataclass(frozen=True)
class LinearShape:
    """Declared input and output width of a linear layer, as the policy rules read it from the config."""

    in_features: int
    out_features: int


def owner_widths(cfg) -> tuple[int, ...]:
    """Feature count per owner whose ciphertexts meet in one batch: every owner (vertical) or one (horizontal)."""
    if cfg.data.partition == "vertical":
        return tuple(len(o.features) for o in cfg.data.owners)
    return (len(cfg.data.owners[0].features),)


def input_width(cfg) -> int:
    """The model's input width: all owners' features side by side (vertical) or one owner's (horizontal)."""
    return sum(owner_widths(cfg))


def feature_offsets(cfg) -> dict[str, int]:
    """Where each owner's features start in the model's input (vertical: after earlier owners'; horizontal: 0)."""
    offsets, offset = {}, 0
    for owner in cfg.data.owners:
        offsets[owner.name] = offset
        if cfg.data.partition == "vertical":
            offset += len(owner.features)
    return offsets


def feature_offset(cfg, owner: str) -> int:
    """One owner's offset in the model's input; ValueError for an owner the config does not declare."""
    offsets = feature_offsets(cfg)
    if owner not in offsets:
        raise ValueError(f"owner '{owner}' is not declared in data.owners (declared: {sorted(offsets)})")
    return offsets[owner]


def linear_shapes(cfg) -> dict[str, LinearShape]:
    """Every linear layer's (in_features, out_features), in model order."""
    shapes, width = {}, input_width(cfg)
    for layer in cfg.model.layers:
        if layer.kind == "linear":
            shapes[layer.name] = LinearShape(width, layer.out_features)
            width = layer.out_features
    return shapes


def cipher_layer_shapes(cfg) -> dict[str, LinearShape]:
    """Shapes of the ciphertext layers declared by the config (never taken from a request)."""
    return {name: shape for name, shape in linear_shapes(cfg).items() if name in cfg.policy.cipher_layers}


def reveal_shapes(cfg) -> dict[str, LinearShape]:
    """The layers the key holder may reveal something of, with the shape its rules use.

    A reveal point (the top ciphertext layer named in policy.reveals) is measured against the
    model's input: its outputs are h combinations of the d input features per set of weights,
    however many ciphertext layers lie below. Any other ciphertext layer may release its
    aggregated weight gradient; with encrypted labels so may every plaintext layer, since its
    delta is a ciphertext too.
    """
    d_in, out = input_width(cfg), {}
    for name, shape in linear_shapes(cfg).items():
        if name in cfg.policy.reveals:
            out[name] = LinearShape(d_in, shape.out_features)
        elif name in cfg.policy.cipher_layers or cfg.policy.labels == "encrypted":
            out[name] = shape
    return out


def uses_tiled(cfg) -> bool:
    """Whether the run needs the tiled engine (see policy_uses_tiled); the one test of it."""
    return policy_uses_tiled(cfg.policy)


def policy_uses_tiled(policy) -> bool:
    """Whether a policy needs the tiled engine: more than the first layer on ciphertext (config validation
    makes cipher_layers a prefix of the model), no activation reveal (strict), or encrypted labels.
    Otherwise the depth-1 hybrid path runs. The key holder, which sees only the policy, asks this too."""
    return len(policy.cipher_layers) > 1 or not policy.reveals or policy.labels == "encrypted"


def block_width(batch_size: int) -> int:
    """The tiled layout's block: samples per batch, padded to a power of two."""
    return 1 << max(0, batch_size - 1).bit_length()


def slots(cfg) -> int:
    """CKKS slots of the configured ring (half the polynomial modulus degree)."""
    return cfg.ckks.poly_modulus_degree // 2


def tiled_widths(cfg) -> dict[str, int]:
    """Each width the tiled layout must fit in its blocks: the model input and every linear layer's output."""
    widths = {"model input": input_width(cfg)}
    widths.update({f"layer '{name}'": shape.out_features for name, shape in linear_shapes(cfg).items()})
    return widths
