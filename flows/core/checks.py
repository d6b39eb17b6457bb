"""The run config's cross-field rules (pure: they read the validated fields and hetrain.core.shapes only).

RunConfig's model validator calls `check_model`; a ValueError here becomes a ConfigError naming the rule.
"""

from hetrain.core import shapes
from hetrain.core.errors import SecurityParameterError


def check_model(cfg) -> None:
    """Raise ValueError naming the first cross-field rule a validated RunConfig breaks."""
    names = []
    for i, layer in enumerate(cfg.model.layers):
        if layer.kind == "linear" and (layer.name is None or layer.out_features is None):
            raise ValueError(f"model.layers[{i}]: a linear layer needs 'name' and 'out_features'")
        if layer.kind != "linear" and layer.out_features is not None:
            raise ValueError(f"model.layers[{i}]: '{layer.kind}' takes no out_features")
        if layer.kind not in ("poly_tanh", "poly_sigmoid") and (layer.degree is not None or layer.range is not None):
            raise ValueError(f"model.layers[{i}]: '{layer.kind}' takes no degree or range (only poly_tanh, poly_sigmoid)")
        if layer.name:
            names.append(layer.name)
    if len(set(names)) != len(names):
        raise ValueError(f"model.layers: layer names must be unique, got {names}")
    first = cfg.model.layers[0]
    if first.kind != "linear":
        raise ValueError("model.layers[0] must be linear: the encrypted input enters through it")
    _check_policy_split(cfg)
    _check_rank(cfg)
    _check_untrusted(cfg)
    last = [layer for layer in cfg.model.layers if layer.kind == "linear"][-1]
    want = 1 if cfg.model.loss == "binary_cross_entropy" else cfg.data.num_classes
    if last.out_features != want:
        raise ValueError(
            f"model.layers: the last linear layer '{last.name}' must have out_features={want} "
            f"for loss {cfg.model.loss} with num_classes={cfg.data.num_classes}; got {last.out_features}"
        )
    if (cfg.data.task == "binary") != (cfg.model.loss == "binary_cross_entropy"):
        raise ValueError(f"model.loss {cfg.model.loss} does not fit data.task {cfg.data.task}")
    if cfg.train.batch_size & (cfg.train.batch_size - 1):
        raise ValueError(f"train.batch_size must be a power of two in [8, 4096]; got {cfg.train.batch_size}")
    if cfg.policy.min_batch > cfg.train.batch_size:
        raise ValueError(
            f"policy.min_batch={cfg.policy.min_batch} exceeds train.batch_size={cfg.train.batch_size}; "
            f"every gradient reveal would be refused"
        )
    owners = cfg.data.owners
    labelled = [o.name for o in owners if o.label]
    if cfg.data.partition == "vertical" and len(labelled) != 1:
        raise ValueError(f"data.owners: exactly one owner must hold the labels (label: true); got {labelled}")
    if cfg.data.partition == "horizontal":
        if len(labelled) != len(owners):
            raise ValueError("data.owners: in a horizontal split every owner holds labels (label: true)")
        if len({tuple(o.features) for o in owners}) != 1:
            raise ValueError("data.owners: in a horizontal split every owner must declare the same features")
    if len({o.name for o in owners}) != len(owners):
        raise ValueError("data.owners: owner names must be unique")
    deployed = [o.name for o in owners if o.deployment is not None]
    if deployed and cfg.report.plaintext_twin:
        raise ValueError(
            f"report.plaintext_twin must be false when owners run as deployments ({deployed}): the twin needs "
            f"each owner's standardised plaintext on the trainer's side, which a deployed owner never sends"
        )
    _check_depth(cfg)


def _check_policy_split(cfg) -> None:
    """policy.cipher_layers is a prefix of the linear layers; reveals name its top (or nothing: strict);
    the circuit fits the CKKS chain."""
    layers = cfg.model.layers
    linears = [layer.name for layer in layers if layer.kind == "linear"]
    cipher = list(cfg.policy.cipher_layers)
    if cipher != linears[: len(cipher)]:
        raise ValueError(
            f"policy.cipher_layers must be the first linear layers in model order (one of "
            f"{[linears[:k] for k in range(1, len(linears) + 1)]}); got {cipher}")
    top = next(i for i, layer in enumerate(layers) if layer.name == cipher[-1])
    for i, layer in enumerate(layers[:top]):
        if layer.kind not in ("linear", "square", "poly_tanh", "poly_sigmoid"):
            raise ValueError(
                f"model.layers[{i}]: '{layer.kind}' sits below the ciphertext layer '{cipher[-1]}'; only "
                f"polynomial activations (square, poly_tanh, poly_sigmoid) run on ciphertext")
    if not cfg.policy.reveals:
        missing = [name for name in linears if name not in cipher]
        if missing:
            raise ValueError(
                f"policy.reveals is empty (strict mode: no activation is revealed), so every linear layer "
                f"must be in policy.cipher_layers; missing {missing}")
    elif set(cfg.policy.reveals) != {cipher[-1]}:
        raise ValueError(
            f"policy.reveals must name ciphertext layers whose outputs may be revealed (allowed: "
            f"[{cipher[-1]!r}], the last of policy.cipher_layers; or {{}} for strict mode); "
            f"got {sorted(cfg.policy.reveals)}")


def _check_depth(cfg) -> None:
    """The fixed chain is secure and, for the depth-1 hybrid, deep enough. A tiled circuit's depth is
    counted (and a ckks.auto chain picked) by hetrain.configure, which runs one step of the network."""
    if shapes.uses_tiled(cfg) and cfg.policy.dp is not None:
        raise ValueError(
            "policy.dp is not supported with strict, mixed or encrypted-label policies yet (their revealed "
            "gradients carry a gain that would divide the DP noise); remove policy.dp or use the hybrid policy")
    if cfg.ckks.auto:
        return
    depth = 0 if shapes.uses_tiled(cfg) else len(cfg.policy.cipher_layers)  # 0: the bound only, depth counted later
    try:
        cfg.ckks.params().validate(needed_depth=depth)
    except SecurityParameterError as exc:
        raise ValueError(str(exc)) from None


def _check_rank(cfg) -> None:
    for name, shape in shapes.reveal_shapes(cfg).items():
        point = cfg.policy.reveals.get(name)
        if point is None or point.allow_invertible or point.max_rank is None:
            continue
        if not shape.out_features <= point.max_rank < shape.in_features:
            raise ValueError(
                f"policy.reveals.{name}.max_rank must be in [{shape.out_features}, {shape.in_features - 1}] "
                f"(at least out_features, so one reveal fits; below in_features, so the trainer never "
                f"holds full rank); got {point.max_rank}"
            )


def _check_untrusted(cfg) -> None:
    """What policy.trainer: untrusted (verified reveals of the key holder's own first layer) needs."""
    if cfg.policy.trainer != "untrusted":
        return
    first = cfg.model.layers[0]
    where = "policy.trainer: untrusted"
    if cfg.policy.labels != "reveal":
        raise ValueError(f"{where} needs policy.labels: reveal in this version (encrypted labels need products "
                         f"with a non-constant plaintext, which the key holder cannot verify); got {cfg.policy.labels}")
    if cfg.policy.cipher_layers != [first.name] or first.name not in cfg.policy.reveals:
        raise ValueError(f"{where} needs the first layer '{first.name}' as the one ciphertext layer and reveal point "
                         f"(policy.cipher_layers: [{first.name}], policy.reveals: {{{first.name}: {{}}}})")
    if cfg.policy.dp is not None:
        raise ValueError(f"{where} reveals no gradient, so policy.dp (noise on gradient reveals) has nothing to act "
                         f"on; remove it")
    if cfg.report.plaintext_twin:
        raise ValueError(f"{where} forbids report.plaintext_twin: true, which makes the trainer's process read "
                         f"every owner's plaintext")
    if cfg.key_holder.url is not None:
        raise ValueError(f"{where} runs with the in-process key holder in this version: the key-holder service "
                         f"has no verified-reveal endpoint yet (unset key_holder.url)")
    deployed = [o.name for o in cfg.data.owners if o.deployment]
    if deployed:
        raise ValueError(f"{where} prepares owners in-process in this version; owners {deployed} are given by "
                         f"'deployment'")
    d = shapes.input_width(cfg)
    if first.out_features >= d and not cfg.policy.reveals[first.name].allow_invertible:
        raise ValueError(f"{where}: layer '{first.name}' has out_features={first.out_features} >= {d} inputs, so "
                         f"its revealed outputs would give the inputs back; use at most {d - 1} outputs")
