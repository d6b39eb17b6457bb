"""The Python API: `hetrain.load_config` and `hetrain.train`, which the `hetrain train` command also calls.

    import hetrain
    cfg = hetrain.load_config("configs/breast_cancer.yaml")      # or a dict
    result = hetrain.train(cfg, "runs/bc")                       # a RunResult
    print(result.test_accuracy, result.summary_path)

It works from a plain script (no `if __name__ == "__main__":` guard needed: ciphertext worker processes
never re-run the caller's script) and from a notebook. Each call runs the Prefect `train` flow; with no
Prefect server configured, Prefect's temporary server starts for the call and stops with it.
"""

import os
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping

import yaml

from hetrain.core import store
from hetrain.configure import load_config as _load_file, parse_config, resolve_paths
from hetrain.core.config import RunConfig
from hetrain.core.errors import ConfigError
from hetrain.prefect_settings import quiet_prefect

def load_config(source: "str | os.PathLike | Mapping[str, Any] | RunConfig", *,
                base_dir: "str | os.PathLike | None" = None) -> RunConfig:
    """A validated run config from a YAML file, a mapping (as the YAML would parse), or a RunConfig.

    File paths inside a YAML file are relative to its folder; inside a mapping, to `base_dir` (default:
    the current directory). Raises ConfigError listing every problem.
    """
    if isinstance(source, RunConfig):
        return source
    if isinstance(source, (str, os.PathLike)):
        return _load_file(source)[0]
    if not isinstance(source, Mapping):
        raise ConfigError(f"config: expected a path to a YAML file, a mapping or a RunConfig, got "
                          f"{type(source).__name__}")
    return resolve_paths(parse_config(dict(source), "config"), Path(base_dir or Path.cwd()))


def config_file(config: "str | os.PathLike | Mapping[str, Any] | RunConfig", run_dir: Path) -> Path:
    """The YAML file a run reads: the given file, or the config written into RUN_DIR under its digest.

    Prefect flows take paths, not objects, and lineage records the config's SHA-256, so a config given as
    a mapping or object is written once as `RUN_DIR/config-<sha256[:12]>.yaml` (never overwriting another).
    """
    if isinstance(config, (str, os.PathLike)):
        _load_file(config)  # every problem is reported before Prefect starts
        return Path(config).resolve()
    cfg = load_config(config)
    text = yaml.safe_dump(cfg.model_dump(mode="json", exclude_defaults=True), sort_keys=False).encode()
    path = run_dir / f"config-{store.sha256_bytes(text)[:12]}.yaml"
    if not path.is_file():
        run_dir.mkdir(parents=True, exist_ok=True)
        store.write_bytes(path, text)
    _load_file(path)  # what was written reads back as the same config
    return path


@dataclass(frozen=True)
class RoundResult:
    """One training round's figures (metrics.json keeps every field; these are the ones most read)."""

    round: int
    test_accuracy: float
    test_loss: float | None
    loss: float | None
    train_accuracy: float | None
    twin_test_accuracy: float | None
    seconds: float
    decryptions: int
    bytes_moved: int
    input_frozen: bool

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> "RoundResult":
        return cls(round=row["round"], test_accuracy=row["test_accuracy"], test_loss=row.get("test_loss"),
                   loss=row.get("loss"), train_accuracy=row.get("train_accuracy"),
                   twin_test_accuracy=row.get("twin_test_accuracy"), seconds=row["seconds"],
                   decryptions=row.get("decryptions", 0),
                   bytes_moved=row["bytes_from_owners"] + row["bytes_to_key_holder"] + row["bytes_from_key_holder"],
                   input_frozen=bool(row.get("input_frozen")))


@dataclass(frozen=True)
class RunResult:
    """What a `hetrain.train` call produced: the final figures, each round, and where the files are."""

    name: str
    run_dir: Path
    out_dir: Path
    generation: int | None
    policy_mode: str
    test_accuracy: float
    twin_test_accuracy: float | None
    stop_reason: str
    rounds: tuple[RoundResult, ...]
    decryptions: int
    decryptions_this_run: int
    policy_refusals: int
    mean_seconds_per_round: float
    mean_bytes_per_round: int
    key_id: str
    config_path: Path
    lineage: Mapping[str, Any] = field(repr=False)
    details: Mapping[str, Any] = field(repr=False)  # every figure of metrics.json's "final"

    @property
    def metrics_path(self) -> Path:
        return self.out_dir / "metrics.json"

    @property
    def summary_path(self) -> Path:
        return self.out_dir / "summary.md"

    @property
    def plot_path(self) -> Path | None:
        path = self.out_dir / "plots" / "training.png"
        return path if path.is_file() else None

    @property
    def checkpoint(self) -> Path | None:
        """The newest checkpoint this run wrote (what `--resume` and a warm-started retrain continue from)."""
        path = self.lineage.get("checkpoint")
        return Path(path) if path else None

    @classmethod
    def from_flow(cls, name: str, config_path: Path, result: Mapping[str, Any]) -> "RunResult":
        final, rounds = result["final"], result["rounds"]
        return cls(
            name=name, run_dir=Path(result["run_dir"]), out_dir=Path(result["out_dir"]),
            generation=result["generation"], policy_mode=final.get("policy_mode", "hybrid"),
            test_accuracy=final["test_accuracy"], twin_test_accuracy=final.get("plaintext_twin_test_accuracy"),
            stop_reason=final["stop_reason"], rounds=tuple(RoundResult.from_row(r) for r in rounds),
            decryptions=final["decryptions"],
            decryptions_this_run=final.get("decryptions_this_run", sum(r.get("decryptions", 0) for r in rounds)),
            policy_refusals=final["policy_refusals"], mean_seconds_per_round=final["mean_seconds_per_round"],
            mean_bytes_per_round=final["mean_bytes_per_round"], key_id=final["key_id"], config_path=config_path,
            lineage=MappingProxyType(dict(result.get("lineage") or {})), details=MappingProxyType(dict(final)))


def train(config: "str | os.PathLike | Mapping[str, Any] | RunConfig", run_dir: "str | os.PathLike | None" = None,
          *, resume: bool = False, retrain: bool = False, progress: bool = False,
          verbose: bool = False) -> RunResult:
    """Train a model under the config's policy; return its RunResult.

    config:  a YAML path, a mapping (as the YAML would parse) or a RunConfig from `load_config`.
    run_dir: where keys, bundles, checkpoints and metrics go (default runs/<config name>).
    resume:  continue from the newest complete checkpoint of run_dir.
    retrain: a new generation of run_dir that reuses its key and unchanged owners' bundles.
    progress: show the rounds and batches bar on stderr (as `hetrain train` does).
    Raises a HetrainError subclass (ConfigError, PolicyRefusal, CheckpointError, ...) naming the problem.
    """
    cfg = load_config(config) if not isinstance(config, (str, os.PathLike)) else _load_file(config)[0]
    run_path = Path(run_dir or f"runs/{cfg.name}").resolve()
    path = config_file(config, run_path)
    deployed = [o.name for o in cfg.data.owners if o.deployment]
    if deployed:
        from hetrain.serve import check_api_url

        check_api_url(f"owners {deployed} run as their own deployments, which need")
    quiet_prefect(verbose)
    from hetrain.train_flow import train as train_flow

    def call() -> dict:
        return train_flow(str(path), str(run_path), resume=resume, run_name=cfg.name, retrain=retrain)

    if progress:
        from hetrain.console import TrainProgress

        with TrainProgress(cfg.name):
            result = call()
    else:
        result = call()
    return RunResult.from_flow(cfg.name, path, result)
