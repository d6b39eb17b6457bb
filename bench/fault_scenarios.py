"""The faults themselves: SIGKILL (at a failpoint or a random time), a full disk during a checkpoint,
and a corrupted owner manifest. Each injects one fault into a real `hetrain train` run, resumes it
the way a user would, and returns one record for the report."""

import json
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from flows.checkpoint import latest_checkpoint, load_checkpoint
from mpc_ops.errors import HetrainError

from .fault_checks import check_after_resume, deep_verify, infer_phase, snapshot
from .fault_env import Outcome, PrefectServer, run_hetrain


@dataclass
class Setup:
    """What every scenario shares: the work folder, the server, the configs and the reference result."""

    work: Path
    server: PrefectServer
    config: Path          # train.rounds = rounds
    config_more: Path     # one round more, for runs resumed after they had finished
    rounds: int
    owners: list[str]
    reference: dict       # the uninterrupted run: run_dir, test_accuracy, twin_test_accuracy, params, and
                          # "more": the same for that run continued one round further
    tolerance: float


def final_metrics(run_dir: Path) -> dict:
    final = json.loads((Path(run_dir) / "metrics.json").read_text())["final"]
    return {"test_accuracy": final["test_accuracy"], "twin_test_accuracy": final["plaintext_twin_test_accuracy"]}


def hybrid_params(run_dir: Path) -> dict[str, np.ndarray]:
    ckpt = load_checkpoint(latest_checkpoint(Path(run_dir) / "checkpoints"))
    return {k: v for k, v in ckpt.params.items() if k.startswith("hybrid.")}


def weight_gap(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    """Largest weight difference relative to the largest weight: how far two hybrid runs ended apart."""
    return float(max(np.abs(a[k] - b[k]).max() for k in a) / max(np.abs(b[k]).max() for k in b))


def _compare(run_dir: Path, ref: dict, tolerance: float) -> dict:
    got = final_metrics(run_dir)
    diff = round(got["test_accuracy"] - ref["test_accuracy"], 6)
    return {
        "resumed_test_accuracy": got["test_accuracy"], "uninterrupted_test_accuracy": ref["test_accuracy"],
        "accuracy_diff": diff, "within_tolerance": abs(diff) <= tolerance,
        "resumed_twin_accuracy": got["twin_test_accuracy"], "uninterrupted_twin_accuracy": ref["twin_test_accuracy"],
        "twin_identical": got["twin_test_accuracy"] == ref["twin_test_accuracy"],
        "hybrid_weight_gap": round(weight_gap(hybrid_params(run_dir), ref["params"]), 5),
    }


def _process(outcome: Outcome) -> dict:
    return {"returncode": outcome.returncode, "signal": outcome.signal, "seconds": outcome.seconds}


def _check_finished(s: Setup, run_dir: Path, config: Path, rounds: int, before: dict, ref: dict,
                    changed_owner: str | None = None) -> dict:
    """Every check on a run that finished after a fault, plus the accuracy against `ref` (uninterrupted)."""
    start = time.perf_counter()
    checks = check_after_resume(config, run_dir, rounds, before, changed_owner)
    audit_cli = run_hetrain(["audit", "verify", str(run_dir)], s.server)
    if audit_cli.returncode != 0:
        checks["problems"]["audit_cli"] = [audit_cli.tail()]
    compared = _compare(run_dir, ref, s.tolerance)
    return {**compared, "checks_seconds": round(time.perf_counter() - start, 2), "data_loss": checks["data_loss"],
            "torn_checkpoints_read": checks["torn_checkpoints_read"], "problems": checks["problems"],
            "recovered": checks["ok"] and audit_cli.returncode == 0 and compared["within_tolerance"]
            and compared["twin_identical"]}


def _resume_and_check(s: Setup, run_dir: Path, config: Path, rounds: int, before: dict, ref: dict,
                      changed_owner: str | None = None) -> dict:
    """`hetrain train CONFIG --run-dir RUN --resume` as a user runs it, then every check."""
    resume = run_hetrain(["train", str(config), "--run-dir", str(run_dir), "--resume"], s.server)
    record = {"resume": _process(resume), "processes": [resume]}
    if resume.returncode != 0:
        return {**record, "recovered": False, "data_loss": True, "torn_checkpoints_read": 0,
                "problems": {"resume": [resume.tail()]}}
    return {**record, **_check_finished(s, run_dir, config, rounds, before, ref, changed_owner)}


def sigkill(s: Setup, name: str, *, failpoints: str | None = None, kill_after: float | None = None,
            where: str = "") -> dict:
    """Kill a fresh `hetrain train` (at a failpoint, or after `kill_after` s from outside); resume it."""
    run_dir = s.work / "runs" / name
    first = run_hetrain(["train", str(s.config), "--run-dir", str(run_dir)], s.server, failpoints=failpoints,
                        kill_after=kill_after)
    injected = first.signal == "SIGKILL" and (first.killed_by_harness or "hetrain failpoint" in first.stderr)
    phase, round_killed = infer_phase(run_dir, s.rounds, s.owners)
    record = {"name": name, "kind": "sigkill", "trigger": "failpoint" if failpoints else "random time",
              "kill_point": failpoints or f"after {kill_after:.2f} s", "where": where, "phase": phase,
              "round_killed": round_killed, "injected": injected, "first": _process(first), "processes": [first]}
    if not injected:
        record.update(recovered=False, data_loss=False, torn_checkpoints_read=0,
                      note=f"the run ended by itself (code {first.returncode}) before the kill: not counted")
        return record
    before = snapshot(run_dir)
    resumed = _resume_and_check(s, run_dir, s.config, s.rounds, before, s.reference)
    record["processes"] += resumed.pop("processes")
    return {**record, **resumed}


def enospc_failpoint(s: Setup, name: str) -> dict:
    """The disk is full from round 2's first checkpoint file on (and stays full across the task's retries)."""
    return _disk_full(s, name, "checkpoint.tmp_write=enospc@4+", lambda run_dir: None,
                      "failpoint: OSError(ENOSPC) from round 2's first checkpoint file on")


def enospc_tmpfs(s: Setup, name: str) -> dict:
    """A real full disk: checkpoints/ on a tmpfs with room for one checkpoint; remounted bigger to resume."""
    run_dir = s.work / "runs" / name
    mount = run_dir / "checkpoints"
    mount.mkdir(parents=True)
    size = _one_checkpoint_bytes(s) * 3 // 2
    try:
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)], check=True,
                       capture_output=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as exc:
        return {"name": name, "kind": "enospc", "status": "not run", "injected": False, "counted": False,
                "note": f"cannot mount a tmpfs here ({type(exc).__name__}); needs root"}

    def free_space(run_dir: Path) -> None:
        subprocess.run(["mount", "-o", "remount,size=64m", str(mount)], check=True, capture_output=True)

    try:
        return _disk_full(s, name, None, free_space, f"real: checkpoints/ on a {size}-byte tmpfs")
    finally:
        subprocess.run(["umount", str(mount)], capture_output=True)


def _one_checkpoint_bytes(s: Setup) -> int:
    """Bytes (rounded up to pages) one checkpoint of this config takes, from the reference run."""
    first = s.reference["run_dir"] / "checkpoints" / "round-00001"
    return sum(-(-p.stat().st_size // 4096) * 4096 for p in first.iterdir())


def _disk_full(s: Setup, name: str, failpoints: str | None, free_space, how: str) -> dict:
    run_dir = s.work / "runs" / name
    first = run_hetrain(["train", str(s.config), "--run-dir", str(run_dir)], s.server, failpoints=failpoints)
    error_lines = [line for line in first.stderr.splitlines() if line.startswith("hetrain: error:")]
    ckpts = run_dir / "checkpoints"
    kept = latest_checkpoint(ckpts)
    failed_round = (load_checkpoint(kept).round + 1) if kept else 1
    record = {
        "name": name, "kind": "enospc", "trigger": "failpoint" if failpoints else "tmpfs",
        "kill_point": failpoints or how, "where": how, "phase": f"checkpoint write of round {failed_round}",
        "round_killed": failed_round,
        "injected": first.returncode != 0 and "No space left on device" in first.stderr,
        "first": _process(first), "error_line": error_lines[0][:400] if error_lines else first.tail(),
        "clean_error": first.returncode == 1 and len(error_lines) == 1
        and "Traceback" not in first.stderr + first.stdout,
        "previous_checkpoint_intact": kept is not None and deep_verify(kept) is None,
        "temp_dirs_left": sorted(p.name for p in ckpts.glob(".*")), "processes": [first],
    }
    if not record["injected"]:
        record.update(recovered=False, data_loss=False, torn_checkpoints_read=0,
                      note=f"no ENOSPC failure (code {first.returncode}): not counted")
        return record
    before = snapshot(run_dir)
    free_space(run_dir)
    resumed = _resume_and_check(s, run_dir, s.config, s.rounds, before, s.reference)
    record["processes"] += resumed.pop("processes")
    resumed["recovered"] = resumed["recovered"] and record["clean_error"] and record["previous_checkpoint_intact"] \
        and not record["temp_dirs_left"]
    return {**record, **resumed}


CORRUPTIONS = {
    "bad JSON": lambda text: text.replace("{", "", 1),
    "wrong sha256": lambda text: _wrong_digest(text),
    "truncated": lambda text: text[: len(text) // 2],
}


def _wrong_digest(text: str) -> str:
    manifest = json.loads(text)
    entry = manifest["splits"]["train"]["batches"][0]["rows"][0]
    entry["sha256"] = entry["sha256"][:-1] + ("0" if entry["sha256"][-1] != "0" else "1")
    return json.dumps(manifest, indent=2, sort_keys=True) + "\n"


def _trainer_read(config: Path, run_dir: Path) -> tuple[str, str] | None:
    """What the trainer's reader says about the exchange store: None if every manifest and blob
    verifies, else (error type, message)."""
    from flows.runtime import Runtime

    try:
        rt = Runtime(config, run_dir)
        for split in ("train", "test"):
            for ref in rt.store.batches(split):
                rt.store.load(ref)
                rt.store.labels(ref)
    except HetrainError as exc:
        return type(exc).__name__, str(exc)
    return None


def corrupt_manifest(s: Setup, name: str, how: str) -> dict:
    """Corrupt one owner's manifest in a finished run; the trainer must refuse it by name and nothing
    already written may be lost. The run then goes one round further (the owner re-publishing its
    bundle where needed) and is compared with the same run continued without the fault."""
    run_dir = s.work / "runs" / name
    shutil.copytree(s.reference["run_dir"], run_dir)
    owner = s.owners[-1]
    manifest = run_dir / "exchange" / owner / "manifest.json"
    manifest.write_text(CORRUPTIONS[how](manifest.read_text()))
    before = snapshot(run_dir)
    refusal = _trainer_read(s.config, run_dir)
    record = {"name": name, "kind": "corrupt manifest", "trigger": how,
              "kill_point": f"exchange/{owner}/manifest.json: {how}", "where": "between runs of a finished run",
              "phase": "between runs", "round_killed": None, "injected": True,
              "trainer_refusal": f"{refusal[0]}: {refusal[1]}"[:400] if refusal else None,
              "refused_by_name": refusal is not None and refusal[0] in ("BundleError", "DigestMismatch")
              and f"'{owner}'" in refusal[1]}
    first = run_hetrain(["train", str(s.config_more), "--run-dir", str(run_dir), "--resume"], s.server)
    record.update(first=_process(first), processes=[first])
    errors = [line for line in first.stderr.splitlines() if line.startswith("hetrain: error:")]
    ref = s.reference["more"]
    if first.returncode == 0:
        record["cli_outcome"] = "completed: the owner's preparation found its manifest unusable and re-published"
        resumed = _check_finished(s, run_dir, s.config_more, s.rounds + 1, before, ref, changed_owner=owner)
    else:
        record["clean_error"] = first.returncode == 1 and len(errors) == 1 \
            and "Traceback" not in first.stderr + first.stdout
        record["cli_outcome"] = f"refused: {errors[0][:400] if errors else first.tail()}"
        kept = snapshot(run_dir)["checkpoints"] == before["checkpoints"]
        manifest.unlink()  # the owner publishes again: its next preparation re-encrypts
        resumed = _resume_and_check(s, run_dir, s.config_more, s.rounds + 1, before, ref, changed_owner=owner)
        record["processes"] += resumed.pop("processes")
        resumed["recovered"] = resumed["recovered"] and record["clean_error"] and kept
    resumed["recovered"] = resumed["recovered"] and record["refused_by_name"]
    return {**record, **resumed}


def unreachable_key_holder(s: Setup, name: str) -> dict:
    """PLACEHOLDER, not run: the key-holder HTTP service is being built on another branch. After the
    merge this fault stops that service mid-round and checks the trainer's retries and the resume."""
    return {"name": name, "kind": "unreachable key holder", "status": "not run", "injected": False,
            "counted": False, "note": "waits for the key-holder HTTP service (another branch); not faked"}
