"""The policy benchmark: one model, three policies (strict, hybrid, hybrid + encrypted labels), two data sets.

Each policy runs the same model definition for the same number of epochs (the policy only moves
where data is revealed). A row: seconds per round, bytes per round between roles, decryptions
per round, test accuracy, plaintext-twin accuracy. Strict rounds on digits are slow, so the
strict row may train on a subset of each epoch's batches (`strict_batches`, reported).
"""

import time
from pathlib import Path

import numpy as np

from hetrain.participants.demo_data import write_demo_data

from hetrain.bench import pipeline

# The shared model per data set: every activation is a polynomial, so every policy can run it.
MODELS = {
    "breast_cancer": {"layers": [{"kind": "linear", "name": "enc1", "out_features": 4},
                                 {"kind": "poly_tanh", "degree": 3, "range": 4.0},
                                 {"kind": "linear", "name": "out", "out_features": 1}],
                      "loss": "binary_cross_entropy"},
    # degree 3 would need depth 7 in strict multiclass (6 fit the 128-bit bound at N=16384)
    "digits_vertical": {"layers": [{"kind": "linear", "name": "enc1", "out_features": 12}, {"kind": "square"},
                                   {"kind": "linear", "name": "out", "out_features": 10}],
                        "loss": "softmax_cross_entropy"},
}
LR = {"breast_cancer": 0.02, "digits_vertical": 0.03}

POLICIES = {
    "strict": {"cipher_layers": ["enc1", "out"], "reveals": {}, "labels": "encrypted"},
    "hybrid": {"cipher_layers": ["enc1"], "reveals": {"enc1": {"allow_invertible": False}}, "labels": "reveal"},
    "hybrid_encrypted_labels": {"cipher_layers": ["enc1"], "reveals": {"enc1": {"allow_invertible": False}},
                                "labels": "encrypted"},
}


# Per-key decryption budgets: enough for the run, no more (σ grows with sqrt(τ))
BUDGETS = {("breast_cancer", "strict"): 160, ("digits_vertical", "strict"): 512,
           ("breast_cancer", "hybrid_encrypted_labels"): 1024, ("digits_vertical", "hybrid_encrypted_labels"): 4096}


def _config(work: Path, data: Path, base: str, policy: str, epochs: int) -> Path:
    from hetrain.bench.workloads import _owner_paths

    tiled = policy != "hybrid"
    return pipeline.write_config(
        work / f"{base}-{policy}.yaml", base, name=f"bench_{base}_{policy}", data=_owner_paths(base, data),
        model=MODELS[base],
        train={"rounds": epochs, "batch_size": 64, "optimizer": {"kind": "adam", "lr": LR[base]}, "workers": 1},
        policy={"min_batch": 32, "mask_bound": 64.0, **POLICIES[policy],
                "flooding": {"security_bits": 30, "budget": BUDGETS.get((base, policy), 65536)}},
        ckks={"auto": True} if tiled else {"poly_modulus_degree": 8192, "coeff_mod_bit_sizes": [60, 50, 60],
                                           "scale_bits": 50},
        report={"plaintext_twin": True},
    )


def _row(rows: list[dict], extra: dict) -> dict:
    final = rows[-1]
    bytes_ = [r["bytes_from_owners"] + r["bytes_to_key_holder"] + r["bytes_from_key_holder"] for r in rows]
    return {
        "seconds_per_round": round(float(np.mean([r["seconds"] for r in rows])), 3),
        "bytes_per_round": int(np.mean(bytes_)),
        "decryptions_per_round": round(float(np.mean([r["decryptions"] for r in rows])), 1),
        "test_accuracy": final["test_accuracy"], "twin_test_accuracy": final["twin_test_accuracy"],
        "accuracy_per_round": [r["test_accuracy"] for r in rows], **extra,
    }


def run_policy(work: Path, data: Path, base: str, policy: str, epochs: int, strict_batches: int | None) -> dict:
    config = _config(work, data, base, policy, epochs)
    run_dir = work / f"{base}-{policy}-run"
    if policy == "hybrid":
        prep = pipeline.prepare(config, run_dir)
        rows = pipeline.rounds(config, run_dir, 1, epochs)
        return _row(rows, {"engine": "hybrid (rows/column, depth 1)", "prepare_seconds": round(prep["prepare_seconds"], 2),
                           "batches_per_round": None})
    import shutil

    from hetrain.trainer import Trainer

    start = time.perf_counter()
    batches = strict_batches if policy == "strict" else None
    shutil.rmtree(run_dir, ignore_errors=True)
    result = Trainer(config, run_dir, max_batches=batches).run()  # no Prefect: the PlainRunner
    rows = result["rounds"]
    prepare_seconds = time.perf_counter() - start - sum(r["seconds"] for r in rows)
    return _row(rows, {"engine": "tiled", "prepare_seconds": round(prepare_seconds, 2),
                       "batches_per_round": rows[-1]["batches"], "circuit_depth": result["final"]["circuit_depth"],
                       "ckks": result["final"]["ckks"], "sigma": result["final"]["sigma"]})


def policies(work: Path, epochs: dict, strict_batches: dict, datasets=("breast_cancer", "digits_vertical"), log=print) -> dict:
    """Every policy on every data set; the four headline keys are computed on digits (bc if digits is absent)."""
    data = work / "data"
    write_demo_data(data)
    out = {}
    for base in datasets:
        out[base] = {}
        for policy in POLICIES:
            log(f"  {base} / {policy} …")
            out[base][policy] = run_policy(work, data, base, policy, epochs[base], strict_batches.get(base))
    key = "digits_vertical" if "digits_vertical" in out else datasets[0]
    rows = out[key]
    strict, hybrid = rows["strict"], rows["hybrid"]
    # strict may train on a subset of batches: compare per-batch cost, scaled to a full epoch
    strict_scale = _full_epoch_scale(work, key, strict)
    return {
        "rows": out, "headline_dataset": key,
        "hybrid_vs_strict_time_ratio": round(strict["seconds_per_round"] * strict_scale / hybrid["seconds_per_round"], 2),
        "hybrid_vs_strict_bytes_ratio": round(strict["bytes_per_round"] * strict_scale / hybrid["bytes_per_round"], 2),
        "strict_accuracy_gap_points": round(100 * (strict["twin_test_accuracy"] - strict["test_accuracy"]), 2),
        "hybrid_accuracy_gap_points": round(100 * (hybrid["twin_test_accuracy"] - hybrid["test_accuracy"]), 2),
        "strict_full_epoch_scale": round(strict_scale, 3),
        "epochs": epochs, "strict_batches_per_round": strict_batches,
    }


def _full_epoch_scale(work: Path, base: str, strict: dict) -> float:
    """Full-epoch batches ÷ batches the strict row ran (1 when it ran whole epochs)."""
    if not strict.get("batches_per_round"):
        return 1.0
    from hetrain.runtime import Runtime
    from hetrain.mpc_ops.exchange.tiled_bundle import TiledStore
    from hetrain.mpc_ops.layers.tiled import tiling_for

    rt = Runtime(work / f"{base}-strict.yaml", work / f"{base}-strict-run")
    full = len(TiledStore(rt.paths.exchange, rt.cfg, rt.key_id, tiling_for(rt.cfg)).batches("train"))
    return full / strict["batches_per_round"]
