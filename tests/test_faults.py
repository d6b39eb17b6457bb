"""Fault injection: the failpoint module, and one real kill, full disk, corrupt manifest and killed key-holder
service, each resumed."""

import errno
import os
import re
import subprocess
import sys
import timeit
from pathlib import Path

import pytest

from hetrain.core import failpoints, store
from hetrain.core.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def armed(monkeypatch):
    """Arm HETRAIN_FAILPOINTS for one test; disarmed (and hit counts reset) afterwards."""
    def arm(spec: str) -> None:
        monkeypatch.setenv(failpoints.ENV, spec)
        failpoints.reload()

    yield arm
    monkeypatch.delenv(failpoints.ENV, raising=False)
    failpoints.reload()


# ---- the failpoint module --------------------------------------------------------------------


def test_unset_failpoints_do_nothing_and_count_nothing(monkeypatch):
    # Prepare
    monkeypatch.delenv(failpoints.ENV, raising=False)
    failpoints.reload()
    # Execute
    for _ in range(3):
        failpoints.failpoint("checkpoint.tmp_write")
    # Assert
    assert failpoints.hits() == {}


def test_unset_failpoint_costs_under_a_microsecond(monkeypatch):
    # Prepare
    monkeypatch.delenv(failpoints.ENV, raising=False)
    failpoints.reload()
    # Execute
    seconds = min(timeit.repeat(lambda: failpoints.failpoint("round.after_reveal"), number=100_000, repeat=3))
    # Assert: generous for a shared machine; `hetrain bench --faults` reports the measured figure
    assert seconds / 100_000 < 1e-6


def test_enospc_fires_on_the_named_hit_only_and_names_the_path(armed, tmp_path):
    # Prepare
    armed("checkpoint.tmp_write=enospc@2")
    target = tmp_path / "params.npz"
    # Execute
    failpoints.failpoint("checkpoint.tmp_write", target)
    with pytest.raises(OSError) as caught:
        failpoints.failpoint("checkpoint.tmp_write", target)
    failpoints.failpoint("checkpoint.tmp_write", target)
    failpoints.failpoint("owner.blob_written")
    # Assert
    assert caught.value.errno == errno.ENOSPC and caught.value.filename == str(target)
    assert failpoints.hits() == {"checkpoint.tmp_write": 3, "owner.blob_written": 1}


def test_a_trailing_plus_keeps_failing_on_every_later_hit(armed):
    # Prepare
    armed("owner.before_manifest=enospc@2+")
    # Execute
    outcomes = []
    for _ in range(4):
        try:
            failpoints.failpoint("owner.before_manifest")
            outcomes.append("ok")
        except OSError:
            outcomes.append("ENOSPC")
    # Assert
    assert outcomes == ["ok", "ENOSPC", "ENOSPC", "ENOSPC"]


@pytest.mark.parametrize("spec, message", [
    ("checkpoint.tmp_wrte=kill@1", r"unknown failpoint 'checkpoint.tmp_wrte'; known: keyholder\.after_key_write"),
    ("checkpoint.tmp_write=explode@1", r"action 'explode' must be one of kill, enospc"),
    ("checkpoint.tmp_write=kill@0", r"the hit number must be an int >= 1 .* Got '0' instead"),
    ("checkpoint.tmp_write=kill", r"the hit number must be an int >= 1 .* Got '' instead"),
])
def test_a_bad_spec_is_refused_naming_the_entry_and_what_is_allowed(armed, spec, message):
    # Prepare
    armed(spec)
    # Execute / Assert
    with pytest.raises(ConfigError, match=rf"HETRAIN_FAILPOINTS entry '{re.escape(spec)}': {message}"):
        failpoints.failpoint("checkpoint.tmp_write")


def test_kill_sends_sigkill_to_its_own_process_on_the_named_hit():
    # Prepare
    code = ("from hetrain.core.failpoints import failpoint\n"
            "for i in range(3):\n    failpoint('train.after_round')\n    print('hit', i + 1, flush=True)\n")
    env = {**os.environ, failpoints.ENV: "train.after_round=kill@2"}
    # Execute
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    # Assert
    assert out.returncode == -9
    assert out.stdout.split("\n")[:-1] == ["hit 1"]
    assert "hetrain failpoint train.after_round: SIGKILL on hit 2" in out.stderr


def test_every_failpoint_in_the_code_is_declared_and_every_declared_one_is_used():
    # Prepare
    sources = [p for d in ("flows", "mpc_ops", "participants") for p in (REPO / d).rglob("*.py")]
    # Execute
    used = {m for p in sources for m in re.findall(r'failpoint\("([^"]+)"', p.read_text())}
    # Assert
    assert used == set(failpoints.POINTS)


def test_a_failed_atomic_write_names_its_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    # Prepare: the kernel's ENOSPC from write()/fsync() carries no file name
    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(store.os, "fsync", full)
    # Execute
    with pytest.raises(OSError) as caught:
        store.write_bytes(tmp_path / "state.json", b"{}")
    # Assert
    assert caught.value.errno == errno.ENOSPC and caught.value.filename == str(tmp_path / "state.json")
    assert list(tmp_path.iterdir()) == []


# ---- the harness's bookkeeping -----------------------------------------------------------------


def test_missing_hostile_catalogue_gives_null_figures_and_a_note(tmp_path, monkeypatch):
    # Prepare: as on a branch without bench/hostile.py
    from hetrain.bench.harness import faults

    monkeypatch.setitem(sys.modules, "hetrain.bench.harness.hostile", None)
    # Execute
    result = faults.hostile_inputs(tmp_path, 0)
    # Assert
    assert result["note"] == "hostile-input catalogue not available"
    assert result["bad_inputs_tried"] is None and result["distinct_bad_inputs"] is None


def test_a_placeholder_fault_is_reported_as_not_run_and_not_counted():
    # Prepare: a fault the machine cannot inject (a tmpfs needs root)
    from hetrain.bench.harness import fault_report, faults

    done = {"name": "kill-01", "kind": "sigkill", "kill_point": "x=kill@1", "injected": True, "counted": True,
            "recovered": True, "data_loss": False, "torn_checkpoints_read": 0, "segfaults": 0}
    placeholder = {"name": "enospc-tmpfs", "kind": "enospc", "status": "not run", "injected": False, "counted": False,
                   "note": "cannot mount a tmpfs here (CalledProcessError); needs root", "segfaults": 0}
    # Execute
    figures = faults.totals([done, placeholder], {"bad_inputs_tried": None, "bad_inputs_rejected_cleanly": None,
                                                  "distinct_bad_inputs": None, "segfaults": None})
    # Assert
    assert (figures["faults_injected"], figures["faults_recovered"]) == (1, 1)
    assert placeholder["status"] == "not run" and placeholder["counted"] is False
    report = fault_report.markdown({
        **figures, "seconds": 1.0, "machine": {"cpus": 2}, "config": {"parallel_fault_runs": 1, "rounds": 2, "seed": 7},
        "hostile_inputs": {"note": "hostile-input catalogue not available"},
        "reference": {"test_accuracy": 0.98, "second_run_test_accuracy": 0.97,
                      "weight_gap_between_two_uninterrupted_runs": 0.2},
        "tolerance": {"test_accuracy_abs": 0.03}, "faults": [], "not_run": [placeholder],
        "failpoint_cost": {"ns_per_call_unset": 40.0, "ns_per_empty_lambda": 30.0, "hits_per_round": 60,
                           "round_seconds": 1.5, "fraction_of_round": 2e-6},
    })
    assert "- **enospc** (`enospc-tmpfs`): cannot mount a tmpfs here (CalledProcessError); needs root" in report


# ---- real faults in real `hetrain` processes (slow) --------------------------------------------


@pytest.fixture(scope="module")
def fault_setup(tmp_path_factory):
    """One `prefect server`, the demo data, and an uninterrupted 2-round reference run (and it one round on)."""
    from hetrain.bench.harness import faults
    from hetrain.bench.harness.fault_env import PrefectServer

    work = tmp_path_factory.mktemp("faults")
    with PrefectServer(work / "prefect-home") as server:
        yield faults.prepare(work, server, rounds=2)


@pytest.mark.e2e  # training runs, killed and resumed
@pytest.mark.slow
def test_kill_during_a_checkpoint_write_resumes_from_the_intact_previous_one(fault_setup):
    # Prepare / Execute: round 2's checkpoint is complete under its temporary name when the process dies
    from hetrain.bench.harness import fault_scenarios as sc

    record = sc.sigkill(fault_setup, "kill-before-rename", failpoints="checkpoint.before_rename=kill@2")
    # Assert
    assert record["injected"] and record["first"]["signal"] == "SIGKILL"
    assert record["phase"] == "checkpoint write of round 2"
    assert record["resume"]["returncode"] == 0 and record["problems"] == {}
    assert record["data_loss"] is False and record["torn_checkpoints_read"] == 0
    assert record["twin_identical"] and record["within_tolerance"] and record["recovered"]


@pytest.mark.e2e  # training runs, killed and resumed
@pytest.mark.slow
def test_full_disk_during_a_checkpoint_fails_cleanly_keeps_the_previous_one_and_resumes(fault_setup):
    # Prepare / Execute
    from hetrain.bench.harness import fault_scenarios as sc

    record = sc.enospc_failpoint(fault_setup, "enospc")
    # Assert
    assert record["first"]["returncode"] == 1 and record["clean_error"]
    assert record["error_line"].startswith("hetrain: error: OSError: [Errno 28] No space left on device: ")
    assert "the newest complete checkpoint is round-00001" in record["error_line"]
    assert record["previous_checkpoint_intact"] and record["temp_dirs_left"] == []
    assert record["resume"]["returncode"] == 0 and record["problems"] == {} and record["recovered"]


@pytest.mark.e2e  # training runs, killed and resumed
@pytest.mark.slow
def test_manifest_with_a_wrong_digest_is_refused_by_name_and_nothing_written_is_lost(fault_setup):
    # Prepare / Execute
    from hetrain.bench.harness import fault_scenarios as sc

    record = sc.corrupt_manifest(fault_setup, "manifest-wrong-sha", "wrong sha256")
    # Assert: the trainer refuses it by name, so does the CLI (one line), and after the owner
    # re-publishes, the run continues with every earlier checkpoint, audit entry and bundle intact
    assert record["trainer_refusal"].startswith("DigestMismatch: owner 'clinic_b': blob ")
    assert record["cli_outcome"].startswith("refused: hetrain: error: DigestMismatch: owner 'clinic_b'")
    assert record["clean_error"] and record["resume"]["returncode"] == 0
    assert record["data_loss"] is False and record["problems"] == {} and record["recovered"]


@pytest.mark.e2e  # the key-holder service and training runs
@pytest.mark.slow
def test_killed_key_holder_service_stops_the_trainer_cleanly_and_the_run_resumes_once_it_is_back(fault_setup):
    # Prepare / Execute: the service is SIGKILLed right after round 1's checkpoint
    from hetrain.bench.harness import fault_scenarios as sc

    record = sc.unreachable_key_holder(fault_setup, "unreachable", delay=0.0, after_round=1)
    # Assert: retries used up, one error line naming the resume, no traceback; nothing lost; resumed
    assert record["injected"] and record["first"]["returncode"] == 1 and record["phase"] == "round 2"
    assert record["error_line"].startswith("hetrain: error: KeyHolderUnreachable: key holder at http://127.0.0.1:")
    assert record["attempts"] == sc.UNREACHABLE_CLIENT["retries"] + 1 and record["clean_error"]
    assert record["audit_after_the_kill"] == "verifies"
    assert record["resume"]["returncode"] == 0 and record["problems"] == {}
    assert record["data_loss"] is False and record["torn_checkpoints_read"] == 0 and record["recovered"]
