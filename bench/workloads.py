"""The benchmark's workloads, each measured against its baseline in the same run."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from hetrain.runtime import Runtime
from hetrain.mpc_ops.layers.planner import forward_counts, gradient_counts, packing_shape, plan_layer, price
from hetrain.participants.demo_data import write_demo_data

from hetrain.bench import pipeline
from hetrain.bench.tutorial_lr import run_tutorial_lr


def _epoch_floor(config: Path, run_dir: Path, costs: dict) -> tuple[float, dict]:
    """The op-count floor of one training epoch under the chosen plan, priced with measured costs."""
    rt = Runtime(config, run_dir)
    shape = packing_shape(rt.cfg)
    counts = None
    for ref in rt.store.batches("train"):
        n = rt.store.manifests[ref.owners[0]]["splits"]["train"]["batches"][ref.index]["n"]
        c = forward_counts(rt.plan.forward, shape, n) + gradient_counts("cols", shape, n)
        counts = c if counts is None else counts + c
    return price(counts, costs), dict(counts)


def lr_vs_tutorial(work: Path, costs: dict, epochs: int, tiny: bool = False) -> dict:
    """Logistic regression: hetrain's packed layout against TenSEAL Tutorial 1's per-sample layout."""
    data = work / "data"
    write_demo_data(data)
    config = pipeline.write_config(
        work / "lr.yaml", "breast_cancer", name="bench_lr",
        data=_owner_paths("breast_cancer", data),
        model={"layers": [{"kind": "linear", "name": "enc1", "out_features": 1}], "loss": "binary_cross_entropy"},
        train={"rounds": epochs, "batch_size": 128, "optimizer": {"kind": "adam", "lr": 0.05}},
    )
    run_dir = work / "lr-run"
    prep = pipeline.prepare(config, run_dir)
    rows = pipeline.rounds(config, run_dir, 1, epochs)
    floor, counts = _epoch_floor(config, run_dir, costs)
    x_train, y_train, x_test, y_test = pipeline.twin_arrays(config, run_dir)
    if tiny:
        x_train, y_train = x_train[:24], y_train[:24]
    baseline = run_tutorial_lr(x_train, y_train, x_test, y_test, epochs=epochs)
    hetrain_epoch = float(np.mean([r["train_seconds"] for r in rows]))
    return {
        "epochs": epochs, "n_train": int(len(y_train)), "n_test": int(len(y_test)),
        "hetrain_seconds_per_epoch": round(hetrain_epoch, 4),
        "hetrain_encrypt_seconds": round(prep["prepare_seconds"], 3),
        "hetrain_forward_layout": prep["forward_layout"],
        "lr_test_accuracy": rows[-1]["test_accuracy"],
        "tutorial_layout_seconds_per_epoch": round(baseline["seconds_per_epoch"], 3),
        "tutorial_layout_encrypt_seconds": round(baseline["encrypt_seconds"], 3),
        "tutorial_layout_test_accuracy": round(baseline["test_accuracy"], 6),
        "tutorial_layout_accuracy_per_epoch": [round(a, 4) for a in baseline["accuracy_per_epoch"]],
        "lr_accuracy_per_epoch": [r["test_accuracy"] for r in rows],
        "speedup_vs_tutorial_layout": round(baseline["seconds_per_epoch"] / hetrain_epoch, 1),
        "floor_seconds_per_epoch": round(floor, 4), "floor_ratio": round(hetrain_epoch / floor, 3),
        "floor_op_counts_per_epoch": counts,
        "bytes_per_round": rows[-1]["bytes_from_owners"] + rows[-1]["bytes_to_key_holder"]
        + rows[-1]["bytes_from_key_holder"],
    }


def digits_vs_twin(work: Path, costs: dict, rounds: int) -> dict:
    """digits_vertical (64→32 on ciphertext, then plaintext to 10 classes) against its plaintext twin."""
    data = work / "data"
    write_demo_data(data)
    config = pipeline.write_config(work / "digits.yaml", "digits_vertical",
                                   data=_owner_paths("digits_vertical", data), train={"rounds": rounds})
    run_dir = work / "digits-run"
    prep = pipeline.prepare(config, run_dir)
    rows = pipeline.rounds(config, run_dir, 1, rounds)
    floor, _ = _epoch_floor(config, run_dir, costs)
    elapsed, to_95 = 0.0, None
    for row in rows:
        elapsed += row["seconds"]
        if to_95 is None and row["test_accuracy"] >= 0.95:
            to_95 = elapsed
    final = rows[-1]
    return {
        "rounds": rounds, "forward_layout": prep["forward_layout"],
        "seconds_per_epoch": round(float(np.mean([r["train_seconds"] for r in rows])), 3),
        "seconds_per_round": round(float(np.mean([r["seconds"] for r in rows])), 3),
        "encrypt_seconds": round(prep["prepare_seconds"], 3),
        "test_accuracy": final["test_accuracy"], "twin_test_accuracy": final["twin_test_accuracy"],
        "digits_twin_accuracy_gap_points": round(100 * (final["twin_test_accuracy"] - final["test_accuracy"]), 2),
        "digits_seconds_to_95": round(to_95, 2) if to_95 is not None else None,
        "accuracy_per_round": [r["test_accuracy"] for r in rows],
        "twin_accuracy_per_round": [r["twin_test_accuracy"] for r in rows],
        "floor_ratio": round(float(np.mean([r["train_seconds"] for r in rows])) / floor, 3),
        "decryptions_per_round": final["decryptions"],
        "bytes_per_round": final["bytes_from_owners"] + final["bytes_to_key_holder"] + final["bytes_from_key_holder"],
    }


def _owner_paths(name: str, data: Path) -> dict:
    import yaml

    raw = yaml.safe_load((pipeline.REPO / "configs" / f"{name}.yaml").read_text())["data"]
    folder = "breast_cancer" if name == "breast_cancer" else "digits"
    for owner in raw["owners"]:
        owner["path"] = str(data / folder / Path(owner["path"]).name)
    return raw


def synthetic_table(path: Path, n: int, d: int, seed: int) -> Path:
    """n rows, d features, a label from a noisy linear rule: a table the size we ask for."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d))
    w = rng.normal(size=d)
    y = (x @ w + 0.5 * rng.normal(size=n) > 0).astype(int)
    frame = pd.DataFrame(x, columns=[f"f{j:02d}" for j in range(d)])
    frame.insert(0, "id", [f"s{i:06d}" for i in range(n)])
    frame["label"] = y
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(path, index=False, float_format="%.6f")
    return path


def scaling(work: Path, sizes: list[int], widths: list[int]) -> dict:
    """Seconds per epoch, peak RSS and bytes per round against n, each size in fresh processes."""
    points = []
    for d in widths:
        for n in sizes:
            table = synthetic_table(work / f"synthetic-{n}-{d}.csv", n, d, seed=n + d)
            config = pipeline.write_config(
                work / f"scaling-{n}-{d}.yaml", None, name=f"scaling_{n}_{d}", seed=1,
                data={"partition": "horizontal", "task": "binary", "test_fraction": 0.1,
                      "owners": [{"name": "owner", "path": str(table), "label": True,
                                  "features": [f"f{j:02d}" for j in range(d)]}]},
                model={"layers": [{"kind": "linear", "name": "enc1", "out_features": 8}, {"kind": "tanh"},
                                  {"kind": "linear", "name": "out", "out_features": 1}],
                       "loss": "binary_cross_entropy"},
                train={"rounds": 2, "batch_size": 4096, "optimizer": {"kind": "adam", "lr": 0.01}},
                # a throughput measurement on synthetic data: no rank limit, so that every round
                # is a ciphertext round (under the limit, d=16 with 8 outputs would freeze at once)
                policy={"cipher_layers": ["enc1"], "reveals": {"enc1": {"allow_invertible": True}}, "min_batch": 32,
                        "flooding": {"security_bits": 30, "budget": 65536}},
                report={"plaintext_twin": False},
            )
            run_dir = work / f"scaling-run-{n}-{d}"
            prep = _worker("prepare", config, run_dir)
            train = _worker("train", config, run_dir)
            points.append({"n": n, "d": d, **{f"prepare_{k}": v for k, v in prep.items()}, **train,
                           "bytes_per_sample_feature": round(train["bytes_from_owners"] / (n * d), 1)})
    exponents = {}
    for d in widths:
        pts = [p for p in points if p["d"] == d]
        slope = np.polyfit(np.log([p["n"] for p in pts]), np.log([p["train_seconds"] for p in pts]), 1)[0]
        exponents[d] = round(float(slope), 3)
    big, small = max(sizes), min(sizes)
    rss = {n: max(p["peak_rss_mb"] for p in points if p["n"] == n) for n in sizes}
    return {
        "points": points, "scaling_exponent_by_d": exponents,
        "scaling_exponent": round(float(np.mean(list(exponents.values()))), 3),
        f"peak_rss_mb_at_{big // 1000}k": rss[big], f"peak_rss_mb_at_{small // 1000}k": rss[small],
        "peak_rss_ratio": round(rss[big] / rss[small], 3),
        "bytes_per_sample_feature": round(float(np.mean([p["bytes_per_sample_feature"] for p in points])), 1),
    }


def _worker(mode: str, config: Path, run_dir: Path) -> dict:
    out = subprocess.run([sys.executable, "-m", "hetrain.bench.worker", mode, str(config), str(run_dir)],
                         capture_output=True, text=True, cwd=pipeline.REPO, env=os.environ.copy())
    if out.returncode != 0:
        raise RuntimeError(f"bench worker '{mode}' for {config.name} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def orchestration(work: Path, config_name: str, rounds_: int) -> dict:
    """The same rounds with and without the Prefect engine around them (temporary server, in a worker)."""
    data = work / "data"
    write_demo_data(data)
    config = pipeline.write_config(work / f"orch-{config_name}.yaml", config_name,
                                   data=_owner_paths(config_name, data), train={"rounds": rounds_})
    result = _worker("orchestration", config, work / "orch-run")
    result["orchestration_overhead_fraction"] = round(
        (result["engine_seconds"] - result["plain_seconds"]) / result["engine_seconds"], 4)
    return result


def plan_table(config: Path, costs: dict) -> list[dict]:
    """The planner's candidates for a config's ciphertext layer, priced with this run's costs."""
    return plan_layer(packing_shape(Runtime(config, config.parent / "unused").cfg), costs).table()
