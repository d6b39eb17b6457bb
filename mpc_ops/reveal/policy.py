"""Reveal policy rules: what the key holder may decrypt, checked before any decryption."""

from dataclasses import dataclass

from hetrain.core.config import PolicyConfig, RevealPoint, RunConfig
from hetrain.core.errors import PolicyRefusal
from hetrain.mpc_ops.reveal.protocol import RevealRequest


@dataclass(frozen=True)
class LayerShape:
    """Declared shape of a ciphertext layer, as the key holder reads it from the config."""

    in_features: int
    out_features: int


def cipher_layer_shapes(cfg: RunConfig) -> dict[str, LayerShape]:
    """Shapes of the ciphertext layers declared by the config (never taken from a request)."""
    d_in = sum(len(o.features) for o in cfg.data.owners) if cfg.data.partition == "vertical" \
        else len(cfg.data.owners[0].features)
    shapes, width = {}, d_in
    for layer in cfg.model.layers:
        if layer.kind != "linear":
            continue
        if layer.name in cfg.policy.cipher_layers:
            shapes[layer.name] = LayerShape(width, layer.out_features)
        width = layer.out_features
    return shapes


def reveal_shapes(cfg: RunConfig) -> dict[str, LayerShape]:
    """The layers the key holder may reveal something of, with the shape its rules use.

    A reveal point (the top ciphertext layer named in policy.reveals) is measured against the
    model's input: its outputs are h combinations of the d input features per set of weights,
    however many ciphertext layers lie below. Any other ciphertext layer may release its
    aggregated weight gradient; with encrypted labels so may every plaintext layer, since its
    delta is a ciphertext too.
    """
    shapes = cipher_layer_shapes(cfg)
    d_in = next(iter(shapes.values())).in_features
    out, width = {}, d_in
    for layer in cfg.model.layers:
        if layer.kind != "linear":
            continue
        if layer.name in cfg.policy.reveals:
            out[layer.name] = LayerShape(d_in, layer.out_features)
        elif layer.name in shapes or cfg.policy.labels == "encrypted":
            out[layer.name] = LayerShape(width, layer.out_features)
        width = layer.out_features
    return out


def rank_limit(point: RevealPoint, shape: LayerShape) -> int | None:
    """How many feature combinations of one sample the trainer may hold (None: unlimited)."""
    if point.allow_invertible:
        return None
    return point.max_rank if point.max_rank is not None else shape.in_features - 1


def input_train_rounds(cfg: RunConfig) -> int | None:
    """Rounds in which the ciphertext layer's weights train before they freeze (None: never).

    Each training sample is revealed under new weights in every round in which they train, and
    once more under the frozen weights; the rank limit allows floor(limit / out_features)
    distinct weights per sample.
    """
    if not cfg.policy.reveals:
        return None  # strict: no activation is ever revealed
    name = next(iter(cfg.policy.reveals))
    limit = rank_limit(cfg.policy.reveals[name], reveal_shapes(cfg)[name])
    shape = reveal_shapes(cfg)[name]
    return None if limit is None else limit // shape.out_features - 1


def check_reveal(policy: PolicyConfig, shapes: dict[str, LayerShape], request: RevealRequest) -> None:
    """Raise PolicyRefusal naming the broken rule, or return if the reveal is allowed."""
    if request.kind == "activation":
        point = policy.reveals.get(request.layer)
        if point is None:
            raise PolicyRefusal(
                "undeclared_reveal_point",
                f"layer '{request.layer}' is not a declared reveal point "
                f"(allowed: {sorted(policy.reveals)})",
            )
        shape = shapes[request.layer]
        if shape.out_features >= shape.in_features and not point.allow_invertible:
            raise PolicyRefusal(
                "invertible_reveal",
                f"layer '{request.layer}' has out_features={shape.out_features} >= "
                f"in_features={shape.in_features}, so its output would let the trainer solve for "
                f"the inputs; set policy.reveals.{request.layer}.allow_invertible: true to permit it",
            )
    elif request.kind == "metric":
        if policy.labels != "encrypted":
            raise PolicyRefusal(
                "undeclared_reveal_point",
                f"a metric reveal (aggregated loss and accuracy) is only allowed under policy.labels: encrypted; "
                f"the policy has labels: {policy.labels}")
        if request.aggregate < policy.min_batch:
            raise PolicyRefusal(
                "min_batch",
                f"metrics aggregate {request.aggregate} samples, fewer than policy.min_batch={policy.min_batch}")
    elif request.kind == "gradient":
        if request.layer not in shapes:
            raise PolicyRefusal(
                "undeclared_reveal_point",
                f"layer '{request.layer}' is not a ciphertext layer (allowed: {sorted(shapes)})",
            )
        if request.aggregate < policy.min_batch:
            raise PolicyRefusal(
                "min_batch",
                f"layer '{request.layer}': the gradient aggregates {request.aggregate} samples, "
                f"fewer than policy.min_batch={policy.min_batch}",
            )
    else:
        raise PolicyRefusal("unknown_kind", f"reveal kind must be 'activation', 'gradient' or 'metric', got {request.kind!r}")
