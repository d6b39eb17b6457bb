"""Run hetrain's own rounds without Prefect (the Trainer with its PlainRunner), for timing."""

import json
import shutil
from pathlib import Path

import numpy as np
import yaml

from hetrain.runtime import Runtime
from hetrain.trainer import PlainRunner, Trainer

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
    """Key holder and every owner's bundle, with no Prefect; returns preparation seconds."""
    import time

    if fresh:
        shutil.rmtree(run_dir, ignore_errors=True)
    start = time.perf_counter()
    trainer = Trainer(config, run_dir, resume=True)
    trainer.open(PlainRunner())
    owners = trainer.runner.prepare_owners(trainer)
    rt = trainer.rt
    return {"prepare_seconds": time.perf_counter() - start, "owners": owners,
            "forward_layout": rt.plan.forward, "seg": rt.plan.seg}


def open_trainer(config: Path, run_dir: Path) -> Trainer:
    """A prepared run directory's Trainer, opened with no Prefect and restored from its newest checkpoint."""
    trainer = Trainer(config, run_dir, resume=True)
    trainer.open(PlainRunner())
    trainer.restore()
    return trainer


def rounds(config: Path, run_dir: Path, first: int, last: int) -> list[dict]:
    """Rounds first..last as plain function calls (round first - 1 must be the newest checkpoint)."""
    trainer = open_trainer(config, run_dir)
    return [trainer.run_round(r) for r in range(first, last + 1)]


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
