"""What the fault harness checks after every fault: torn checkpoints, data loss, the audit chain,
metrics.json and the exchange store's manifests. Each check re-derives its answer from the files."""

import json
import re
from pathlib import Path

import numpy as np

from hetrain.checkpoint import load_checkpoint
from hetrain.core import store
from hetrain.core.errors import HetrainError

CHECKPOINT_FILES = {"params.npz", "optimizer.npz", "state.json"}
_ROUND = re.compile(r"round-(\d{5,})")


def deep_verify(path: Path) -> str | None:
    """None if the checkpoint directory is complete and every byte checks out, else the reason.

    Independent of the loader: the file set, each file's SHA-256 against state.json, every array
    loadable, the round number; then the loader's own verification on top."""
    try:
        names = {p.name for p in path.iterdir()}
        if names != CHECKPOINT_FILES:
            return f"{path.name}: files {sorted(names)}, expected {sorted(CHECKPOINT_FILES)}"
        state = json.loads((path / "state.json").read_text())
        for fname in ("params.npz", "optimizer.npz"):
            if store.sha256_file(path / fname) != state["sha256"][fname]:
                return f"{path.name}: {fname} does not match its digest in state.json"
            with np.load(path / fname, allow_pickle=False) as npz:
                for key in npz.files:
                    npz[key]
        if int(_ROUND.fullmatch(path.name).group(1)) != state["round"]:
            return f"{path.name}: state.json says round {state['round']}"
        load_checkpoint(path)
    except (OSError, ValueError, KeyError, TypeError, AttributeError, HetrainError) as exc:
        return f"{path.name}: {type(exc).__name__}: {exc}"
    return None


def _digests(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): store.sha256_file(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def snapshot(run_dir: Path, key_dir: Path | None = None) -> dict:
    """What is on disk now and must survive the next run: complete checkpoints, the audit log, bundles.

    `key_dir` is the key holder's folder when it is not RUN/key_holder (a `hetrain key-holder serve` service)."""
    root = Path(run_dir)
    ckpts = root / "checkpoints"
    rounds = sorted(p for p in ckpts.glob("round-*") if p.is_dir()) if ckpts.is_dir() else []
    exchange = root / "exchange"
    audit = Path(key_dir or root / "key_holder") / "audit.jsonl"
    return {
        "checkpoints": {p.name: _digests(p) for p in rounds if deep_verify(p) is None},
        "torn_on_disk": [reason for p in rounds if (reason := deep_verify(p))],
        "temp_dirs": sorted(p.name for p in ckpts.glob(".*")) if ckpts.is_dir() else [],
        "audit": audit.read_bytes() if audit.exists() else b"",
        "owners": {p.name: _digests(p) for p in sorted(exchange.glob("*")) if (p / "manifest.json").is_file()},
    }


def infer_phase(run_dir: Path, rounds: int, owners: list[str], key_dir: Path | None = None) -> tuple[str, int | None]:
    """Where a killed run stopped, read off its files: (phase, round being trained or None).

    `key_dir`: the key holder's folder when it is not RUN/key_holder (a service's --key-dir)."""
    root = Path(run_dir)
    if not (Path(key_dir or root / "key_holder") / "secret_context.bin").exists():
        return "key set-up", None
    if not all((root / "exchange" / o / "manifest.json").is_file() for o in owners):
        return "data owner upload", None
    snap = snapshot(root)
    done = max((int(_ROUND.fullmatch(n).group(1)) for n in snap["checkpoints"]), default=0)
    if any(n.startswith(".round-") for n in snap["temp_dirs"]):
        return f"checkpoint write of round {done + 1}", done + 1
    if done >= rounds:
        return "after the last round (metrics, summary)", None
    return f"round {done + 1}", done + 1


def _lineage_problems(root: Path, rounds: int, resumed_after: int) -> tuple[list[str], int]:
    """Problems in the checkpoint chain, and how many checkpoints the resumed run read that were torn."""
    problems, torn_read = [], 0
    for r in range(1, rounds + 1):
        path = root / "checkpoints" / f"round-{r:05d}"
        if not path.is_dir():
            problems.append(f"round-{r:05d} is missing")
            continue
        if reason := deep_verify(path):
            problems.append(f"torn checkpoint on disk: {reason}")
            continue
        lineage = load_checkpoint(path).lineage
        parent = root / "checkpoints" / f"round-{r - 1:05d}"
        if r == 1:
            continue
        if Path(lineage.get("parent_checkpoint") or "").name != parent.name:
            problems.append(f"round-{r:05d} names parent {lineage.get('parent_checkpoint')!r}, not {parent.name}")
        if r > resumed_after:  # written by the resumed process: what did it read?
            read_ok = deep_verify(parent) is None and \
                lineage.get("parent_state_sha256") == store.sha256_file(parent / "state.json")
            torn_read += not read_ok
    return problems, torn_read


def _metrics_problems(root: Path, rounds: int) -> list[str]:
    try:
        metrics = json.loads((root / "metrics.json").read_text())
    except (OSError, ValueError) as exc:
        return [f"metrics.json unreadable: {exc}"]
    listed = [row["round"] for row in metrics.get("rounds", [])]
    problems = [] if listed == list(range(1, rounds + 1)) else [f"metrics.json lists rounds {listed}"]
    if (metrics.get("final") or {}).get("rounds") != rounds:
        problems.append(f"metrics.json final.rounds is {(metrics.get('final') or {}).get('rounds')}, not {rounds}")
    last = root / "checkpoints" / f"round-{rounds:05d}"
    if last.is_dir() and deep_verify(last) is None:
        history = load_checkpoint(last).extra.get("history", [])
        if [(h["round"], h["test_accuracy"]) for h in history] != \
                [(m["round"], m["test_accuracy"]) for m in metrics.get("rounds", [])]:
            problems.append("metrics.json rounds differ from the last checkpoint's history")
    return problems


def _audit_problems(key_dir: Path, before: bytes) -> list[str]:
    from hetrain.participants.audit import verify

    try:
        verify(key_dir)
    except (HetrainError, OSError, ValueError) as exc:
        return [f"audit log does not verify: {exc}"]
    after = (key_dir / "audit.jsonl").read_bytes()
    committed = before[: before.rfind(b"\n") + 1]  # a torn last line was never acknowledged
    return [] if after.startswith(committed) else ["audit log lost or changed entries written before the fault"]


def read_whole_store(config: Path, run_dir: Path) -> None:
    """Open the exchange store as the trainer does and read every blob and label file (digest-checked)."""
    from hetrain.runtime import Runtime

    rt = Runtime(config, run_dir)
    for split in ("train", "test"):
        for ref in rt.store.batches(split):
            rt.store.load(ref)
            rt.store.labels(ref)


def exchange_problems(config: Path, run_dir: Path) -> list[str]:
    """Everything wrong with the exchange store as the trainer reads it (empty when it all verifies)."""
    try:
        read_whole_store(config, run_dir)
    except (HetrainError, OSError, ValueError) as exc:
        return [f"exchange store: {type(exc).__name__}: {exc}"]
    return []


def check_after_resume(config: Path, run_dir: Path, rounds: int, before: dict,
                       changed_owner: str | None = None, key_dir: Path | None = None) -> dict:
    """Every check, after a run resumed from the state in `before` (a snapshot) should have finished.

    `changed_owner` is the owner whose bundle the fault itself damaged: it may be re-published.
    `key_dir` is the key holder's folder when it is not RUN/key_holder (a service's --key-dir)."""
    root = Path(run_dir)
    resumed_after = max((int(_ROUND.fullmatch(n).group(1)) for n in before["checkpoints"]), default=0)
    chain, torn_read = _lineage_problems(root, rounds, resumed_after)
    lost = [f"{name} changed or vanished" for name, files in before["checkpoints"].items()
            if not (root / "checkpoints" / name).is_dir() or _digests(root / "checkpoints" / name) != files]
    lost += [f"exchange/{owner} changed" for owner, files in before["owners"].items()
             if owner != changed_owner and _digests(root / "exchange" / owner) != files]
    leftovers = sorted(p.name for p in (root / "checkpoints").glob(".*"))
    problems = {
        "checkpoints": chain + ([f"temporary directories left: {leftovers}"] if leftovers else []),
        "lost": lost,
        "metrics": _metrics_problems(root, rounds),
        "audit": _audit_problems(Path(key_dir or root / "key_holder"), before["audit"]),
        "exchange": exchange_problems(config, root),
    }
    loss = bool(problems["lost"] or problems["metrics"] or problems["audit"] or problems["exchange"]
                or any("missing" in p or "torn" in p for p in problems["checkpoints"]))
    return {"ok": not any(problems.values()), "data_loss": loss, "torn_checkpoints_read": torn_read,
            "problems": {k: v for k, v in problems.items() if v}}
