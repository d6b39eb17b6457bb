"""The faults themselves: SIGKILL (at a failpoint or a random time), a full disk during a checkpoint,
a corrupted owner manifest, and a key-holder service SIGKILLed mid-run. Each injects one fault into a
real `hetrain train` run, resumes it the way a user would, and returns one record for the report."""

import json
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from hetrain.checkpoint import latest_checkpoint, load_checkpoint
from hetrain.core.errors import HetrainError

from hetrain.bench.harness.fault_checks import check_after_resume, deep_verify, exchange_problems, infer_phase, read_whole_store, snapshot
from hetrain.bench.harness.fault_env import HETRAIN, REPO, Outcome, PrefectServer, _free_port, run_hetrain, wait_for_health


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
                    changed_owner: str | None = None, key_dir: Path | None = None) -> dict:
    """Every check on a run that finished after a fault, plus the accuracy against `ref` (uninterrupted).

    `key_dir`: the key holder's folder when it is a service's --key-dir (DIR/key_holder) instead of RUN/key_holder."""
    start = time.perf_counter()
    checks = check_after_resume(config, run_dir, rounds, before, changed_owner, key_dir=key_dir)
    audit_cli = run_hetrain(["audit", "verify", str(Path(key_dir).parent if key_dir else run_dir)], s.server)
    if audit_cli.returncode != 0:
        checks["problems"]["audit_cli"] = [audit_cli.tail()]
    compared = _compare(run_dir, ref, s.tolerance)
    return {**compared, "checks_seconds": round(time.perf_counter() - start, 2), "data_loss": checks["data_loss"],
            "torn_checkpoints_read": checks["torn_checkpoints_read"], "problems": checks["problems"],
            "recovered": checks["ok"] and audit_cli.returncode == 0 and compared["within_tolerance"]
            and compared["twin_identical"]}


def _resume_and_check(s: Setup, run_dir: Path, config: Path, rounds: int, before: dict, ref: dict,
                      changed_owner: str | None = None, key_dir: Path | None = None) -> dict:
    """`hetrain train CONFIG --run-dir RUN --resume` as a user runs it, then every check."""
    resume = run_hetrain(["train", str(config), "--run-dir", str(run_dir), "--resume"], s.server)
    record = {"resume": _process(resume), "processes": [resume]}
    if resume.returncode != 0:
        return {**record, "recovered": False, "data_loss": True, "torn_checkpoints_read": 0,
                "problems": {"resume": [resume.tail()]}}
    return {**record, **_check_finished(s, run_dir, config, rounds, before, ref, changed_owner, key_dir)}


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
    try:
        read_whole_store(config, run_dir)
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


class KeyHolderService:
    """`hetrain key-holder serve CONFIG --key-dir DIR/key_holder` in its own process (own session) on a fixed
    loopback port, so it can be SIGKILLed and started again on the same key directory and address."""

    def __init__(self, s: Setup, folder: Path, port: int):
        self.s, self.folder, self.port = s, folder, port
        self.key_dir, self.token_file = folder / "key_holder", folder / "service.token"
        self.url = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen | None = None
        self.starts: list[float] = []

    def start(self, timeout: float = 120.0) -> "KeyHolderService":
        self.folder.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        with open(self.folder / "service.log", "ab") as log:
            self.proc = subprocess.Popen(
                HETRAIN + ["key-holder", "serve", str(self.s.config), "--key-dir", str(self.key_dir),
                           "--port", str(self.port), "--token-file", str(self.token_file)],
                cwd=REPO, env=self.s.server.env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        took = wait_for_health(self.proc, f"{self.url}/v1/health", start, timeout, 0.2, lambda: RuntimeError(
            f"the key-holder service exited with {self.proc.returncode}: "
            f"{(self.folder / 'service.log').read_text()[-1500:]}"))
        if took is not None:
            self.starts.append(round(took, 2))
            return self
        self.stop()
        raise RuntimeError(f"the key-holder service on port {self.port} did not answer in {timeout:.0f} s")

    def kill(self) -> None:
        """SIGKILL, as a crash or an OOM killer would: no shutdown handler runs."""
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.kill()


UNREACHABLE_CLIENT = {"timeout_s": 10, "retries": 2, "backoff_s": 0.5}


def _service_config(s: Setup, name: str, service: KeyHolderService) -> Path:
    """The harness's config plus a key_holder section pointing at the service (beside it: same data paths)."""
    raw = yaml.safe_load(s.config.read_text())
    raw["key_holder"] = {"url": service.url, "token_file": str(service.token_file), **UNREACHABLE_CLIENT}
    path = s.config.with_name(f"{name}.yaml")
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def _kill_after_checkpoint(service: KeyHolderService, checkpoint: Path, delay: float, stop: threading.Event,
                           record: dict) -> None:
    """Wait for `checkpoint` to be complete, then `delay` s more, then SIGKILL the service."""
    while not stop.is_set() and not (checkpoint / "state.json").is_file():
        time.sleep(0.05)
    if stop.is_set() or stop.wait(delay):
        return
    service.kill()
    record["killed_at"] = time.perf_counter()


def unreachable_key_holder(s: Setup, name: str, *, delay: float = 0.0, after_round: int = 1) -> dict:
    """Train against the key-holder service in its own process; SIGKILL the service `delay` s after round
    `after_round`'s checkpoint is complete. The trainer must retry (key_holder.retries) and stop cleanly with
    KeyHolderUnreachable, one error line naming the resume, no traceback, nothing lost. Then the service is
    started again on the same key directory and port and `hetrain train CONFIG --run-dir RUN --resume`
    must finish within tolerance of the uninterrupted run."""
    from hetrain.participants.audit import AuditError, verify

    run_dir, folder = s.work / "runs" / name, s.work / "key-holders" / name
    service = KeyHolderService(s, folder, _free_port())
    config = _service_config(s, name, service)
    record = {"name": name, "kind": "unreachable key holder", "trigger": "SIGKILL of the key-holder service",
              "kill_point": f"service SIGKILLed {delay:.2f} s after round {after_round}'s checkpoint",
              "where": f"{delay:.2f} s after round {after_round}'s checkpoint", "client": dict(UNREACHABLE_CLIENT),
              "processes": []}
    stop, killed = threading.Event(), {}
    try:
        service.start()
        watcher = threading.Thread(target=_kill_after_checkpoint, daemon=True, args=(
            service, run_dir / "checkpoints" / f"round-{after_round:05d}", delay, stop, killed))
        watcher.start()
        first = run_hetrain(["train", str(config), "--run-dir", str(run_dir)], s.server)
        stop.set()
        watcher.join()
        record["processes"].append(first)
        record["first"] = _process(first)
        phase, round_killed = infer_phase(run_dir, s.rounds, s.owners, service.key_dir)
        record.update(phase=phase, round_killed=round_killed)
        if "killed_at" in killed:
            record["stopped_seconds_after_the_kill"] = round(time.perf_counter() - killed["killed_at"], 2)
        record["injected"] = "killed_at" in killed and first.returncode != 0
        if not record["injected"]:
            record.update(recovered=False, data_loss=False, torn_checkpoints_read=0,
                          note=f"the service was {'killed' if killed else 'not killed'}, the trainer ended with "
                               f"code {first.returncode}: not counted")
            return record
        errors = [line for line in first.stderr.splitlines() if line.startswith("hetrain: error:")]
        attempts = re.search(r"after (\d+) attempt\(s\)", errors[0]) if errors else None
        record["error_line"] = errors[0][:600] if errors else first.tail()
        record["attempts"] = int(attempts.group(1)) if attempts else None
        record["retry_warnings"] = len(re.findall(r"retry \d+ of \d+", first.stderr))
        record["clean_error"] = (first.returncode == 1 and len(errors) == 1 and "KeyHolderUnreachable" in errors[0]
                                 and f"hetrain train {config.resolve()} --run-dir {run_dir.resolve()} --resume"
                                 in errors[0] and "Traceback" not in first.stderr + first.stdout)
        record["retried"] = record["attempts"] == UNREACHABLE_CLIENT["retries"] + 1
        before = snapshot(run_dir, service.key_dir)
        problems = {}
        if before["torn_on_disk"]:
            problems["checkpoints"] = before["torn_on_disk"]
        if f"round-{after_round:05d}" not in before["checkpoints"]:
            problems.setdefault("checkpoints", []).append(f"round-{after_round:05d} is not complete")
        try:
            verify(service.key_dir)
            record["audit_after_the_kill"] = "verifies"
        except AuditError as exc:  # killed between appending an entry and recording it: adopted on restart
            record["audit_after_the_kill"] = str(exc)[:400]
            if "stopped between appending an entry and recording it" not in str(exc):
                problems["audit"] = [f"audit log does not verify after the kill: {exc}"]
        if exchange := exchange_problems(config, run_dir):
            problems["exchange"] = exchange
        service.start()  # the same key directory, token and port
        resumed = _resume_and_check(s, run_dir, config, s.rounds, before, s.reference, key_dir=service.key_dir)
        record["processes"] += resumed.pop("processes")
        resumed["problems"] = {**problems, **resumed.get("problems", {})}
        resumed["data_loss"] = resumed["data_loss"] or bool(problems)
        resumed["recovered"] = resumed["recovered"] and not problems and record["clean_error"] and record["retried"]
        return {**record, **resumed}
    finally:
        stop.set()
        service.stop()
