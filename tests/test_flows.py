"""End to end: the Prefect `train` flow on the demo data, resume after a crash, role boundaries."""

import json

import numpy as np
import pytest
import tenseal as ts
import yaml

from tests.conftest import write_config

pytestmark = pytest.mark.e2e  # full training runs


def test_train_flow_writes_metrics_with_documented_keys(bc_run):
    # Prepare
    run_dir, _ = bc_run
    # Execute
    metrics = json.loads((run_dir / "metrics.json").read_text())
    # Assert
    assert [r["round"] for r in metrics["rounds"]] == [1, 2, 3, 4]
    for row in metrics["rounds"]:
        assert {"round", "loss", "test_accuracy", "seconds", "bytes_from_owners",
                "bytes_to_key_holder"} <= set(row)
        assert row["bytes_from_owners"] > 0 and row["bytes_to_key_holder"] > 0
    assert {"test_accuracy", "plaintext_twin_test_accuracy", "decryptions", "policy_refusals"} <= set(metrics["final"])
    assert metrics["final"]["policy_refusals"] == 0
    assert metrics["final"]["decryptions"] > 0
    summary = (run_dir / "summary.md").read_text()
    assert summary.startswith("# hetrain run")
    # 4 training rounds, each under new weights, × 5 outputs; the key holder's limit is d - 1 = 29
    assert ("the trainer holds at most 20 noisy linear combinations of any sample's 30 features "
            "(4 distinct weights × out_features), against a limit of 29") in summary
    assert (run_dir / "plots" / "training.png").read_bytes()[:4] == b"\x89PNG"


def test_encrypted_breast_cancer_matches_its_plaintext_twin(bc_run):
    # Prepare / Execute
    _, result = bc_run
    final = result["final"]
    # Assert: the bar is >= 0.95 and within 1.0 point of the twin (at the configured
    # 12 rounds); after 4 rounds we check the same bar with 2 points of slack for flooding noise.
    assert final["test_accuracy"] >= 0.95
    assert abs(final["test_accuracy"] - final["plaintext_twin_test_accuracy"]) <= 0.02


def test_secret_key_lives_only_under_key_holder(bc_run):
    # Prepare
    run_dir, _ = bc_run
    private_elsewhere, public_seen = [], 0
    # Execute: every file outside key_holder/ that parses as a TenSEAL context must be public
    for path in run_dir.rglob("*"):
        if path.is_dir() or "key_holder" in path.relative_to(run_dir).parts:
            continue
        try:
            context = ts.context_from(path.read_bytes())
        except Exception:
            continue
        public_seen += 1
        if context.is_private():
            private_elsewhere.append(str(path))
    # Assert
    assert private_elsewhere == []
    assert public_seen == 1  # exchange/public_context.bin
    assert ts.context_from((run_dir / "key_holder" / "secret_context.bin").read_bytes()).is_private()


def test_trainer_runtime_holds_only_a_public_context(bc_run, demo_data, tmp_path):
    # Prepare
    from hetrain.runtime import Runtime

    run_dir, _ = bc_run
    config = write_config(tmp_path, demo_data, rounds=4)
    # Execute
    rt = Runtime(config, run_dir)
    # Assert
    assert not rt.context.is_private()
    assert rt.context.has_galois_keys()


def test_checkpoints_record_lineage(bc_run):
    # Prepare
    from hetrain.checkpoint import latest_checkpoint, load_checkpoint

    run_dir, _ = bc_run
    # Execute
    ckpt = load_checkpoint(latest_checkpoint(run_dir / "checkpoints"))
    # Assert
    assert ckpt.round == 4
    assert set(ckpt.lineage) >= {"config_sha256", "key_id", "manifests", "parent_checkpoint", "flow_run_id"}
    assert ckpt.lineage["parent_checkpoint"].endswith("round-00003")
    assert set(ckpt.lineage["manifests"]) == {"clinic_a", "clinic_b"}


def test_rerun_without_resume_is_refused_and_keeps_checkpoints(bc_run, demo_data, tmp_path):
    # Prepare
    from hetrain.train_flow import train
    from hetrain.core.errors import CheckpointError

    run_dir, _ = bc_run
    config = write_config(tmp_path, demo_data, rounds=4)
    before = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    # Execute / Assert
    with pytest.raises(CheckpointError, match="already holds checkpoints.*--resume"):
        train(str(config), str(run_dir))
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == before


def test_run_resumed_after_a_crash_completes_like_an_uninterrupted_one(prefect_harness, demo_data, tmp_path,
                                                                        monkeypatch):
    # Prepare: crash inside round 3, after rounds 1 and 2 were checkpointed
    from hetrain import engine
    from hetrain.checkpoint import latest_checkpoint, load_checkpoint
    from hetrain.train_flow import train

    config = write_config(tmp_path, demo_data, rounds=3)
    real_step, calls = engine.Learner.train_batch, {"n": 0}

    def crashing_step(self, x, y):
        calls["n"] += 1
        if calls["n"] == 2 * 16 + 3:  # 8 hybrid + 8 twin batches per round; crash in round 3
            raise KeyboardInterrupt("simulated crash")
        return real_step(self, x, y)

    monkeypatch.setattr(engine.Learner, "train_batch", crashing_step)
    with pytest.raises(KeyboardInterrupt, match="simulated crash"):
        train(str(config), str(tmp_path / "run"))
    monkeypatch.setattr(engine.Learner, "train_batch", real_step)
    assert latest_checkpoint(tmp_path / "run" / "checkpoints").name == "round-00002"
    (tmp_path / "run" / "checkpoints" / ".round-00003.tmp-deadbeef").mkdir()  # a torn write
    # Execute
    resumed = train(str(config), str(tmp_path / "run"), resume=True)
    straight = train(str(config), str(tmp_path / "straight"))
    # Assert: same rounds, the twin (deterministic) is bit-identical, the hybrid reaches the bar
    assert [r["round"] for r in resumed["rounds"]] == [1, 2, 3]
    a = load_checkpoint(tmp_path / "run" / "checkpoints" / "round-00003")
    b = load_checkpoint(tmp_path / "straight" / "checkpoints" / "round-00003")
    for key in (k for k in a.params if k.startswith("twin.")):
        np.testing.assert_array_equal(a.params[key], b.params[key])
    assert resumed["final"]["test_accuracy"] >= 0.95
    assert abs(resumed["final"]["test_accuracy"] - straight["final"]["test_accuracy"]) <= 0.02
    assert not any(p.name.startswith(".round") for p in (tmp_path / "run" / "checkpoints").iterdir())


def test_rounds_past_the_rank_limit_freeze_the_cipher_layer_and_run_in_plaintext(bc_run, demo_data, tmp_path):
    # Prepare: continue the shared 4-round run (all training rounds allowed by the rank limit of
    # 29 with 5 outputs) for 2 more rounds, in which enc1 must be frozen
    import json
    import shutil

    from hetrain.checkpoint import load_checkpoint
    from hetrain.train_flow import train

    run_dir, _ = bc_run
    shutil.copytree(run_dir, tmp_path / "run")
    config = write_config(tmp_path, demo_data, rounds=6)

    # Execute
    result = train(str(config), str(tmp_path / "run"), resume=True)

    # Assert: no refusal; round 5 reveals only activations under the frozen weights, round 6 nothing
    rounds = {r["round"]: r for r in result["rounds"]}
    assert result["final"]["policy_refusals"] == 0
    assert [rounds[r]["input_frozen"] for r in (4, 5, 6)] == [False, True, True]
    train_batches, test_batches = 8, 2  # two clinics, each with 4 train batches and 1 test batch
    assert rounds[5]["decryptions"] == (train_batches + test_batches) * 5  # one ciphertext per output, no gradients
    assert rounds[6]["decryptions"] == 0 and rounds[6]["bytes_to_key_holder"] == 0
    # round 6 reads no ciphertext, only the label and ID files (a few kB against MBs)
    assert rounds[6]["bytes_from_owners"] < rounds[4]["bytes_from_owners"] / 100
    ckpt = {r: load_checkpoint(tmp_path / "run" / "checkpoints" / f"round-{r:05d}") for r in (4, 5, 6)}
    for r in (5, 6):
        np.testing.assert_array_equal(ckpt[r].params["hybrid.enc1.W"], ckpt[4].params["hybrid.enc1.W"])
        assert not np.array_equal(ckpt[r].params["hybrid.out.W"], ckpt[4].params["hybrid.out.W"])
    assert sum(k.startswith("frozen_cache.") for k in ckpt[6].params) == train_batches + test_batches
    ledger = json.loads((tmp_path / "run" / "key_holder" / "reveal_ledger.json").read_text())["weights"]["enc1"]
    assert max(len(v) for v in ledger.values()) == 5  # 5 distinct weights × 5 outputs = 25 <= 29
    assert result["final"]["test_accuracy"] >= 0.95


def test_dp_run_reports_the_epsilon_spent(prefect_harness, demo_data, tmp_path):
    # Prepare: DP noise on the enc1 gradients, 2 rounds
    from hetrain.train_flow import train
    from hetrain.mpc_ops.reveal import dp
    from hetrain.core.config import DpConfig

    config = write_config(tmp_path, demo_data, rounds=2)
    raw = yaml.safe_load(config.read_text())
    raw["policy"]["dp"] = {"noise_multiplier": 1.0, "clip": 1.0, "delta": 1e-5}
    config.write_text(yaml.safe_dump(raw))

    # Execute
    result = train(str(config), str(tmp_path / "run"))

    # Assert: each training sample took part in 2 releases; ε as zCDP composition gives it
    expected = round(dp.epsilon(DpConfig(noise_multiplier=1.0, clip=1.0, delta=1e-5), 2), 4)
    assert result["final"]["dp_epsilon"] == expected
    summary = (tmp_path / "run" / "summary.md").read_text()
    assert f"each sample took part in at most 2 releases, (ε, δ) = ({expected}, 1e-05)" in summary
    audit = [json.loads(line) for line in (tmp_path / "run" / "key_holder" / "audit.jsonl").read_text().splitlines()]
    assert all(e["dp_sigma"] > 0 for e in audit if e["kind"] == "gradient")


@pytest.mark.slow
def test_a_tiled_checkpoint_records_the_same_lineage_as_a_hybrid_one(bc_run, demo_data, tmp_path):
    # Prepare: a 1-round encrypted-label run through the `train` flow, and the shared hybrid run
    from hetrain.checkpoint import latest_checkpoint, load_checkpoint
    from hetrain.train_flow import train

    from tests.test_policy_runs import config

    path = config(tmp_path, demo_data, "breast_cancer_encrypted_labels", train={"rounds": 1},
                  report={"plaintext_twin": False})
    # Execute
    result = train(str(path), str(tmp_path / "run"))
    # Assert
    tiled = load_checkpoint(latest_checkpoint(tmp_path / "run" / "checkpoints"))
    hybrid = load_checkpoint(latest_checkpoint(bc_run[0] / "checkpoints"))
    assert sorted(tiled.lineage) == sorted(hybrid.lineage)
    assert tiled.lineage["flow_run_id"] and tiled.lineage["train_flow_run_id"]
    assert set(tiled.lineage["manifest_sha256"]) == {"clinic_a", "clinic_b"}
    assert sorted(result["lineage"]) == sorted(bc_run[1]["lineage"])
    assert tiled.extra["engine"] == "tiled" and tiled.extra["input_rounds_trained"] == 1
