"""Reveal policy rules: what the key holder may decrypt, checked before any decryption."""

from hetrain.core.config import PolicyConfig, RevealPoint, RunConfig
from hetrain.core.errors import PolicyRefusal
from hetrain.core.shapes import LinearShape, reveal_shapes
from hetrain.mpc_ops.reveal.protocol import RevealRequest


def rank_limit(point: RevealPoint, shape: LinearShape) -> int | None:
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
    shape = reveal_shapes(cfg)[name]
    limit = rank_limit(cfg.policy.reveals[name], shape)
    return None if limit is None else limit // shape.out_features - 1


def check_reveal(policy: PolicyConfig, shapes: dict[str, LinearShape], request: RevealRequest) -> None:
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
