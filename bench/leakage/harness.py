"""`hetrain bench --leakage`: train a small run per trainer mode, attack its key holder as the trainer, and
measure what an honest-but-curious trainer can reconstruct from what the policy reveals. JSON and markdown."""

import json
import shutil
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import yaml

from hetrain.bench.leakage import attacks
from hetrain.bench.leakage.service import Service
from hetrain.bench.leakage.targets import Target
from hetrain.core import store
from hetrain.participants.demo_data import write_demo_data

REPO_CONFIGS = Path(__file__).resolve().parents[2] / "configs"
MODES = {"semi_honest (hybrid)": ("breast_cancer", {"rounds": 6}),
         "semi_honest (hybrid, key-holder service)": ("breast_cancer", {"rounds": 6}),
         "untrusted (verified)": ("breast_cancer_untrusted", {"rounds": 3})}
SERVICE_MODES = {"semi_honest (hybrid, key-holder service)"}  # attacks over HTTP, against `hetrain key-holder serve`
KNOWN_FRACTION = 0.05  # rows whose features the honest-but-curious attacker is assumed to know
DRAWS = 20


def _config(work: Path, demo: Path, name: str, train: dict) -> Path:
    raw = yaml.safe_load((REPO_CONFIGS / f"{name}.yaml").read_text())
    for owner in raw["data"]["owners"]:
        owner["path"] = str(demo / "breast_cancer" / Path(owner["path"]).name)
    raw["train"].update(train)
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def honest_r2(z: np.ndarray, weights: np.ndarray, x: np.ndarray, seed: int = 0) -> dict:
    """The honest trainer's best reconstructions of X: least squares from Z = X·W with W known, and a linear
    regression from Z to X fitted on the 5% of rows it is assumed to know (scored on the rest)."""
    lsq = z @ np.linalg.pinv(weights, rcond=1e-2)  # small singular values would only amplify the flooding
    rng = np.random.default_rng(seed)
    design = np.hstack([z, np.ones((len(z), 1))])
    scores = []
    for _ in range(DRAWS):  # which rows the attacker knows matters with so few: the mean over draws
        known = rng.random(len(x)) < KNOWN_FRACTION
        coef, *_ = np.linalg.lstsq(design[known], x[known], rcond=None)
        scores.append(attacks.r2(design[~known] @ coef, x[~known]))
    return {"least_squares_r2": round(attacks.r2(lsq, x), 4), "regression_r2": round(float(np.mean(scores)), 4),
            "revealed_rank": int(np.linalg.matrix_rank(weights)), "features": int(x.shape[1])}


def run_mode(work: Path, demo: Path, mode: str) -> dict:
    """Attacks on a run whose owners published (before any training, so the rank ledger is fresh), and the
    honest trainer's view of a run trained to the end (a second run directory, a second key)."""
    name, train = MODES[mode]
    config = _config(work, demo, name, train)
    if mode in SERVICE_MODES:
        with Service(config, work / "service") as service:
            raw = yaml.safe_load(config.read_text())
            raw["key_holder"] = {"url": service.url, "token_file": str(service.token_file)}
            remote = work / f"{name}-service.yaml"
            remote.write_text(yaml.safe_dump(raw, sort_keys=False))
            return _attack(remote, work / "service-runs", mode, honest_run=False)
    return _attack(config, work, mode)


def _attack(config: Path, work: Path, mode: str, honest_run: bool = True) -> dict:
    """Without `honest_run` (the service mode: one key, one ledger) only the attacks run; the honest view is the
    in-process mode's (the same policy and data)."""
    from hetrain.runtime import forget_key_holders
    from hetrain.trainer import PlainRunner, Trainer

    name = config.stem
    honest = None
    if honest_run:
        trained = Trainer(config, work / f"trained-{name}")
        trained.run(PlainRunner())
        honest = honest_r2(*Target(trained).honest_views())
    if mode.startswith("untrusted"):
        fresh = trained  # every reveal of the trained run was verified; attacks then meet its full ledger
    else:
        fresh = Trainer(config, work / f"attacked-{name}")
        fresh.open(PlainRunner())
        fresh.owners = fresh.runner.prepare_owners(fresh)
        fresh.revealer.start_round(1)
    target = Target(fresh)
    outcomes = [attack(target) for attack in attacks.CATALOGUE]
    forget_key_holders()  # close the service's client before the service stops
    return {"outcomes": [asdict(o) for o in outcomes], "honest": honest}


def summarise(results: dict) -> dict:
    """The headline figures the issue asks for, across modes."""
    out = {"modes": results, "deviating_attacks_tried": {}, "deviating_attacks_blocked": {},
           "secret_key_recovered": {}, "raw_values_recovered": {}, "honest_trainer_feature_r2": {},
           "honest_trainer_label_accuracy": {"labels: encrypted": None}}
    for mode, res in results.items():
        outcomes = res["outcomes"]
        out["deviating_attacks_tried"][mode] = len(outcomes)
        out["deviating_attacks_blocked"][mode] = sum(o["verdict"] == "blocked" for o in outcomes)
        out["secret_key_recovered"][mode] = any(o["attack"].startswith("secret_key") and o["verdict"] == "leaked"
                                                for o in outcomes)
        out["raw_values_recovered"][mode] = sum(o["measure"].get("raw_values_recovered", 0) for o in outcomes
                                                if o["verdict"] == "leaked")
        if res["honest"] is not None:
            out["honest_trainer_feature_r2"][mode] = res["honest"]["regression_r2"]
    return out


def report(summary: dict) -> str:
    lines = ["# hetrain leakage harness", "", "Each deviating attack runs as the trainer against the key holder of a "
             "breast_cancer run: in-process, or over HTTP to `hetrain key-holder serve`. `blocked`: refused or "
             "nothing usable; `leaked`: the measure says what came out.", ""]
    for mode, res in summary["modes"].items():
        lines += [f"## {mode}", "", "| attack | verdict | measure | refusal |", "| --- | --- | --- | --- |"]
        for o in res["outcomes"]:
            lines.append(f"| {o['attack']} | {o['verdict']} | {json.dumps(o['measure'])} | "
                         f"{(o['refusal'] or '').replace('|', '/')[:120]} |")
        h = res["honest"]
        if h is None:
            lines += ["", "The attacks crossed the wire to `hetrain key-holder serve`; the honest view is the same as "
                          "in-process.", ""]
            continue
        lines += ["", f"Honest-but-curious trainer: least-squares R² {h['least_squares_r2']}, regression R² "
                      f"{h['regression_r2']} (5% of rows known), revealed rank {h['revealed_rank']} of "
                      f"{h['features']} features.", ""]
    return "\n".join(lines) + "\n"


def main(out: str | None = None) -> int:
    missing = [n for n, _ in MODES.values() if not (REPO_CONFIGS / f"{n}.yaml").is_file()]
    if missing:
        print(f"hetrain: error: the leakage harness trains the shipped configs {missing}, which are not beside this "
              f"installation ({REPO_CONFIGS}); run `hetrain bench --leakage` from a clone of the repository",
              file=sys.stderr)
        return 1
    out_path = Path(out or "bench/out/leakage.json")
    work = Path(tempfile.mkdtemp(prefix="hetrain-leakage-"))
    start = time.perf_counter()
    try:
        demo = work / "demo"
        write_demo_data(demo)
        results = {mode: run_mode(work, demo, mode) for mode in MODES}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    summary = {**summarise(results), "seconds": round(time.perf_counter() - start, 1)}
    store.write_json(out_path, summary)
    store.write_bytes(out_path.with_suffix(".md"), report(summary).encode())
    for mode in MODES:
        print(f"{mode}: {summary['deviating_attacks_blocked'][mode]} of {summary['deviating_attacks_tried'][mode]} "
              f"attacks blocked; secret key recovered: {summary['secret_key_recovered'][mode]}; raw values "
              f"recovered: {summary['raw_values_recovered'][mode]}; honest-trainer R² "
              f"{summary['honest_trainer_feature_r2'].get(mode, 'as in-process')}")
    print(f"wrote {out_path} and {out_path.with_suffix('.md')}")
    return 0
