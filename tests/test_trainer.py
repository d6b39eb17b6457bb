"""The one Trainer for every policy: tiled runs resume after a kill, honour train.patience, and write
checkpoints with the same lineage as hybrid ones."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.test_policy_runs import config

pytestmark = pytest.mark.e2e  # full training runs, killed and resumed in subprocesses

MAX_BATCHES = 2  # per round: keeps a tiled run of a few rounds under a minute


def run_plain(path, run_dir, **kwargs) -> dict:
    from hetrain.trainer import Trainer

    return Trainer(path, run_dir, max_batches=MAX_BATCHES, **kwargs).run()


def killed_run(path, run_dir, hit: int) -> subprocess.CompletedProcess:
    """The same plain run in a child process, SIGKILLed on the `hit`-th reveal (HETRAIN_FAILPOINTS)."""
    code = (f"from hetrain.trainer import Trainer; "
            f"Trainer({str(path)!r}, {str(run_dir)!r}, max_batches={MAX_BATCHES}).run()")
    env = {**os.environ, "HETRAIN_FAILPOINTS": f"round.after_reveal=kill@{hit}"}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["breast_cancer_strict", "breast_cancer_encrypted_labels"])
def test_a_tiled_run_killed_mid_round_resumes_to_the_same_end_as_an_uninterrupted_one(demo_data, tmp_path, name):
    # Prepare: an uninterrupted 2-round run, and the same run killed at the second reveal of round 2
    from hetrain.checkpoint import latest_checkpoint, load_checkpoint

    path = config(tmp_path, demo_data, name, train={"rounds": 2})
    straight = run_plain(path, tmp_path / "straight")
    hit = straight["rounds"][0]["reveals"] + 2
    killed = killed_run(path, tmp_path / "run", hit)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert latest_checkpoint(tmp_path / "run" / "checkpoints").name == "round-00001"
    # Execute
    resumed = run_plain(path, tmp_path / "run", resume=True)
    # Assert: the same rounds and stop reason; the twin (deterministic, restored too) is bit-identical
    assert [r["round"] for r in resumed["rounds"]] == [1, 2]
    assert resumed["final"]["rounds"] == straight["final"]["rounds"] == 2
    assert resumed["final"]["stop_reason"] == straight["final"]["stop_reason"]
    assert resumed["rounds"][1]["twin_test_accuracy"] == straight["rounds"][1]["twin_test_accuracy"]
    a = load_checkpoint(tmp_path / "run" / "checkpoints" / "round-00002")
    b = load_checkpoint(tmp_path / "straight" / "checkpoints" / "round-00002")
    twin_keys = [k for k in a.params if k.startswith("twin.")]
    assert twin_keys and sorted(a.params) == sorted(b.params)
    for key in twin_keys:
        np.testing.assert_array_equal(a.params[key], b.params[key])
    assert a.optimizer_state["hybrid.t"] == b.optimizer_state["hybrid.t"] == 2 * MAX_BATCHES
    assert abs(resumed["final"]["test_accuracy"] - straight["final"]["test_accuracy"]) <= 0.05
    assert a.lineage["parent_checkpoint"].endswith("round-00001")


@pytest.mark.slow
def test_a_tiled_run_stops_on_train_patience(demo_data, tmp_path):
    # Prepare: a learning rate too small to move the test accuracy, so no round improves on round 1 (strict:
    # the owners evaluate the plaintext weights, so no reveal noise moves it either)
    path = config(tmp_path, demo_data, "breast_cancer_strict", report={"plaintext_twin": False},
                  train={"rounds": 5, "patience": 1, "optimizer": {"kind": "adam", "lr": 1e-9}})
    # Execute
    result = run_plain(path, tmp_path / "run")
    # Assert
    assert [r["round"] for r in result["rounds"]] == [1, 2]
    assert result["final"]["stop_reason"] == "no test-accuracy gain in train.patience=1 rounds"
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["final"]["rounds"] == 2 and metrics["lineage"]["checkpoint"].endswith("round-00002")
