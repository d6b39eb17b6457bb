"""Lineage: retrain generations of a run directory, checkpoint digests, and the parent chain.

A checkpoint's digest is the SHA-256 of its `state.json`, which holds the SHA-256 of its weights
and optimizer state, so one digest pins the whole checkpoint. Every checkpoint records its parent
(the previous round, or for round 1 of a warm-started retrain the checkpoint it started from), so
following parents walks back across generations and run directories.
"""

import json
import os
import re
import secrets
from pathlib import Path

from hetrain.core import store
from hetrain.core.errors import CheckpointError

from hetrain.checkpoint import latest_checkpoint
from hetrain.runtime import PARENT_FILE, generation_dir

_GENERATION = re.compile(r"gen-(\d{4,})")


def checkpoint_digest(path: str | Path) -> str:
    """SHA-256 of a checkpoint's state.json (which holds its files' digests)."""
    return store.sha256_file(Path(path) / "state.json")


def generations(root: Path) -> list[int]:
    """The generation numbers under RUN_DIR/generations/, oldest first."""
    folder = Path(root) / "generations"
    if not folder.is_dir():
        return []
    return sorted(int(m.group(1)) for p in folder.iterdir() if (m := _GENERATION.fullmatch(p.name)) and p.is_dir())


def newest_checkpoint(root: Path) -> Path | None:
    """The newest complete checkpoint of a run directory: its newest generation that has one, else its own."""
    for generation in reversed(generations(root)):
        found = latest_checkpoint(generation_dir(root, generation) / "checkpoints")
        if found is not None:
            return found
    return latest_checkpoint(Path(root) / "checkpoints")


def open_generation(root: Path, *, resume: bool, warm_start: bool) -> tuple[int, dict | None]:
    """The generation a retrain writes to, and the parent checkpoint it starts from ({path, sha256} or None).

    A new generation records its parent in parent.json when it is made, so a resumed generation keeps
    the parent it started with. `resume` continues the newest generation instead of making a new one.
    """
    existing = generations(root)
    if resume and existing:
        folder = generation_dir(root, existing[-1])
        return existing[-1], json.loads((folder / PARENT_FILE).read_text())["checkpoint"]
    parent_path = newest_checkpoint(root) if warm_start else None
    parent = {"path": str(parent_path), "sha256": checkpoint_digest(parent_path)} if parent_path else None
    number = (existing[-1] if existing else 0) + 1
    folder = generation_dir(root, number)
    # Made under a temporary name and renamed, so a generation folder always holds its parent.json;
    # the rename fails if another run made the same generation meanwhile.
    tmp = folder.with_name(f".{folder.name}.tmp-{secrets.token_hex(4)}")
    store.write_json(tmp / PARENT_FILE, {"generation": number, "warm_start": warm_start, "checkpoint": parent})
    os.rename(tmp, folder)
    store.fsync_dir(folder.parent)
    return number, parent


def read_record(path: Path) -> dict:
    """One checkpoint's lineage entry, read from its state.json only (no weights are loaded)."""
    state_file = Path(path) / "state.json"
    try:
        state = json.loads(state_file.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {path}: {state_file.name} is missing or unreadable: {exc}") from None
    history = state.get("extra", {}).get("history") or [{}]
    return {"path": str(path), "sha256": store.sha256_file(state_file), "round": state["round"],
            "test_accuracy": history[-1].get("test_accuracy"), "lineage": state.get("lineage", {})}


def chain(start: Path, limit: int = 100_000) -> list[dict]:
    """The checkpoint at `start` and its ancestors, newest first.

    Each entry carries `parent_ok`: False when the parent's digest no longer matches the one recorded
    (the parent was rewritten), None when the parent is gone, True otherwise. The walk stops there.
    """
    records, path = [], Path(start)
    while path is not None and len(records) < limit:
        record = read_record(path)
        records.append(record)
        parent = record["lineage"].get("parent_checkpoint")
        if not parent:
            break
        expected = record["lineage"].get("parent_checkpoint_sha256")
        if not (Path(parent) / "state.json").is_file():
            record["parent_ok"] = None
            break
        record["parent_ok"] = expected is None or checkpoint_digest(parent) == expected
        path = Path(parent) if record["parent_ok"] else None
    return records


def format_chain(records: list[dict]) -> str:
    """The chain for a human: a header per run directory and generation, then one line per checkpoint."""
    lines = []
    for i, r in enumerate(records):
        lin, before = r["lineage"], records[i - 1]["lineage"] if i else None
        if before is None or _group(before) != _group(lin):
            gen = f"generation {lin['generation']}" if lin.get("generation") else "no generation"
            lines += [""] if lines else []
            lines += [f"{lin.get('run_dir') or Path(r['path']).parent.parent}  ({gen})",
                      f"  config   {lin.get('config_path')}  sha256 {_short(lin.get('config_sha256'))}",
                      f"  key id   {_short(lin.get('key_id'))}",
                      f"  train    flow run {lin.get('train_flow_run_id') or '-'}"]
            lines += [f"  owner    {owner}: manifest sha256 {_short(digest)}, bundle key "
                      f"{_short((lin.get('manifests') or {}).get(owner))}"
                      for owner, digest in sorted((lin.get("manifest_sha256") or {}).items())]
        acc = "" if r["test_accuracy"] is None else f"  test acc {r['test_accuracy']:.4f}"
        lines.append(f"  round {r['round']:>4}  checkpoint sha256 {_short(r['sha256'])}{acc}  "
                     f"round flow run {lin.get('flow_run_id') or '-'}")
        parent = lin.get("parent_checkpoint")
        if r.get("parent_ok") is False:
            lines.append(f"  !! parent {parent} was rewritten: its digest is no longer "
                         f"{_short(lin.get('parent_checkpoint_sha256'))}")
        elif parent and r.get("parent_ok") is None:
            lines.append(f"  !! parent {parent} is missing")
        elif not parent:
            lines.append("  (fresh start: no parent)")
        elif i + 1 < len(records) and _group(records[i + 1]["lineage"]) != _group(lin):
            lines.append(f"  warm start from {parent}")
    return "\n".join(lines)


def _group(lineage: dict) -> tuple:
    return lineage.get("run_dir"), lineage.get("generation")


def _short(digest: str | None) -> str:
    return f"{digest[:12]}…" if digest else "-"
