"""What a tiled run reports: its policy mode, what the trainer saw, the circuit, and the run summary."""

import json

from hetrain.mpc_ops.layers.depth_plan import circuit_depth


def mode_name(cfg) -> str:
    if not cfg.policy.reveals:
        return "strict" + (" + encrypted labels" if cfg.policy.labels == "encrypted" else "")
    name = "hybrid" if len(cfg.policy.cipher_layers) == 1 else f"mixed ({len(cfg.policy.cipher_layers)} ciphertext layers)"
    return name + (" + encrypted labels" if cfg.policy.labels == "encrypted" else "")


def fits(cfg) -> dict:
    """The polynomial activations' fits and the strict loss surrogate, with their worst error on range."""
    from hetrain.mpc_ops.layers.polyact import fit, linear_sigmoid

    out = {}
    for i, layer in enumerate(cfg.model.layers):
        if layer.kind in ("square", "poly_tanh", "poly_sigmoid"):
            out[f"layers[{i}]"] = fit(layer.kind, layer.degree, layer.range).summary()
    if not cfg.policy.reveals:
        out["loss_gradient"] = linear_sigmoid().summary() if cfg.data.task == "binary" else \
            {"kind": "least_squares", "note": "δ = z − one_hot(y) (squared loss on the logits)"}
    return out


def final_fields(cfg, audit: dict) -> dict:
    """The tiled run's own entries of metrics.json's `final`: mode, circuit depth, CKKS chain, σ, fits."""
    return {"policy_mode": mode_name(cfg), "circuit_depth": circuit_depth(cfg),
            "ckks": {"poly_modulus_degree": cfg.ckks.poly_modulus_degree,
                     "coeff_mod_bit_sizes": cfg.ckks.coeff_mod_bit_sizes, "scale_bits": cfg.ckks.scale_bits},
            "sigma": audit.get("sigma"), "polynomial_fits": fits(cfg), "max_batches_per_round": None}


def revealed_to_trainer(cfg) -> list[str]:
    """What the policy lets the trainer see, in words (the run summary and the README table)."""
    out = []
    if cfg.policy.reveals:
        out.append(f"pre-activations of '{cfg.policy.cipher_layers[-1]}' (flooded), within the rank limit")
    out.append(f"weight gradients summed over ≥ {cfg.policy.min_batch} samples (flooded)")
    if cfg.policy.labels == "encrypted":
        if cfg.policy.reveals:
            out.append("the batch's summed loss and correct count (aggregates linear in the encrypted labels)")
    else:
        out.append("labels in plaintext")
    if not cfg.policy.reveals:
        out.append("test accuracy computed on the owners' side (an aggregate)")
    return out


def summary_markdown(cfg, final: dict, rounds: list[dict], owners: list[dict], audit: dict) -> str:
    lines = [f"# hetrain run `{cfg.name}` ({final['policy_mode']})", "", "## Result", "", "| metric | value |",
             "| --- | --- |"]
    lines += [f"| {k} | {json.dumps(v) if isinstance(v, (dict, list)) else v} |" for k, v in final.items()]
    lines += ["", "## What was revealed to the trainer", ""] + [f"- {w}" for w in revealed_to_trainer(cfg)]
    lines += ["- the key holder sees masked values only", "", "## Key holder decisions", "",
              f"- reveals allowed: {audit.get('allow', 0)}; refused: {audit.get('refuse', 0)} {audit.get('rules') or ''}",
              f"- decryptions used: {audit.get('decryptions_used', 0)} of budget {audit.get('budget', 0)}", "",
              "## Rounds", "", "| round | test acc | twin acc | s | bytes from owners | to key holder | decryptions |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {r['round']} | {r['test_accuracy']} | {r['twin_test_accuracy']} | {r['seconds']} | "
              f"{r['bytes_from_owners']:,} | {r['bytes_to_key_holder']:,} | {r['decryptions']} |" for r in rounds]
    lines += ["", "## Owners", ""] + [f"- {o['owner']}: {o['ciphertexts']} ciphertexts, {o['bytes']:,} bytes"
                                       for o in owners]
    return "\n".join(lines) + "\n"
