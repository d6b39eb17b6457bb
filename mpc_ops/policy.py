"""Reveal policy rules: what the key holder may decrypt, checked before any decryption."""

from dataclasses import dataclass

from .config import PolicyConfig, RevealPoint, RunConfig
from .errors import PolicyRefusal
from .reveal import RevealRequest


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
    name, shape = next(iter(cipher_layer_shapes(cfg).items()))
    limit = rank_limit(cfg.policy.reveals[name], shape)
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
        raise PolicyRefusal("unknown_kind", f"reveal kind must be 'activation' or 'gradient', got {request.kind!r}")
