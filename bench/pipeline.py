"""Run hetrain's own rounds without the Prefect engine (tasks called as plain functions), for timing."""

import json
import shutil
from pathlib import Path

import numpy as np
import yaml

from hetrain.runtime import Runtime, forget_key_holders
from hetrain.tasks import ENGINE, encrypt_owner_table, set_up_key_holder
from hetrain.train_flow import run_round

REPO = Path(__file__).resolve().parent.parent


def write_config(path: Path, base: str | None = None, **overrides) -> Path:
    """A config file from a shipped one (or from scratch), with nested overrides like train={...}."""
    raw = yaml.safe_load((REPO / "configs" / f"{base}.yaml").read_text()) if base else {}
    if base and not base.endswith("_deployed"):  # the bench measures against the twin (public demo data)
        raw["report"] = {**raw.get("report", {}), "plaintext_twin": True}
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(raw.get(key), dict):
            raw[key] = {**raw[key], **value}
        else:
            raw[key] = value
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def prepare(config: Path, run_dir: Path, fresh: bool = True) -> dict:
    """Key holder and every owner's bundle, with no Prefect engine; returns preparation seconds."""
    import time

    if fresh:
        shutil.rmtree(run_dir, ignore_errors=True)
    forget_key_holders()
    token = ENGINE.set(False)
    try:
        start = time.perf_counter()
        rt = Runtime(config, run_dir)
        set_up_key_holder.fn(rt)
        owners = [encrypt_owner_table.fn(rt, o.name) for o in rt.cfg.data.owners]
        return {"prepare_seconds": time.perf_counter() - start, "owners": owners,
                "forward_layout": rt.plan.forward, "seg": rt.plan.seg}
    finally:
        ENGINE.reset(token)


def rounds(config: Path, run_dir: Path, first: int, last: int) -> list[dict]:
    """Rounds first..last as plain function calls."""
    token = ENGINE.set(False)
    try:
        return [run_round(str(config), str(run_dir), r) for r in range(first, last + 1)]
    finally:
        ENGINE.reset(token)


def twin_arrays(config: Path, run_dir: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The exact standardised train/test features and labels hetrain trained on (horizontal owners)."""
    rt = Runtime(config, run_dir)
    xs = {"train": [], "test": []}
    ys = {"train": [], "test": []}
    for owner in rt.cfg.data.owners:
        manifest = json.loads((rt.paths.exchange / owner.name / "manifest.json").read_text())
        with np.load(rt.paths.owners / owner.name / f"{owner.name}.npz") as twin:
            for split in ("train", "test"):
                xs[split].append(twin[split])
                ys[split].append(np.load(rt.paths.exchange / owner.name / manifest["labels"][split]["file"]))
    return (np.concatenate(xs["train"]), np.concatenate(ys["train"]),
            np.concatenate(xs["test"]), np.concatenate(ys["test"]))
