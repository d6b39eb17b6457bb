"""Scheduled retraining: a new generation re-encrypts only a changed owner, warm-starts from the
newest checkpoint, and every checkpoint, summary and event records its lineage."""

import json
import shutil

import numpy as np
import pandas as pd
import pytest

from tests.conftest import write_config


def _owner_files(run_dir) -> dict[str, dict[str, int]]:
    """Per owner: every bundle file (relative path) with its inode, to tell rewritten files apart."""
    out = {}
    for owner in ("clinic_a", "clinic_b"):
        folder = run_dir / "exchange" / owner
        out[owner] = {str(p.relative_to(folder)): p.stat().st_ino for p in folder.rglob("*") if p.is_file()}
    return out


@pytest.fixture(scope="module")
def retrained(bc_run, demo_data, tmp_path_factory):
    """The session's 4-round run (copied), then clinic_b's table changes and a 1-round retrain warm-starts."""
    from hetrain import train_flow

    tmp = tmp_path_factory.mktemp("retrain")
    tables = tmp / "tables"
    shutil.copytree(demo_data / "breast_cancer", tables / "breast_cancer")
    run_dir = tmp / "run"
    shutil.copytree(bc_run[0], run_dir)
    first = bc_run[1]
    before = _owner_files(run_dir)
    table = pd.read_csv(tables / "breast_cancer" / "clinic_b.csv")
    table.loc[0, "mean_radius"] += 0.5  # one new measurement at clinic_b
    table.to_csv(tables / "breast_cancer" / "clinic_b.csv", index=False)
    events = []
    with pytest.MonkeyPatch.context() as mp:
        real = train_flow.emit_event
        mp.setattr(train_flow, "emit_event", lambda **kw: (events.append(kw), real(**kw))[1])
        config_one_round = write_config(tmp, tables, rounds=1)
        second = train_flow.train(str(config_one_round), str(run_dir), retrain=True)
    return {"run_dir": run_dir, "first": first, "second": second, "before": before,
            "after": _owner_files(run_dir), "events": events}


def test_retrain_re_encrypts_only_the_owner_whose_table_changed(retrained):
    # Prepare
    before, after = retrained["before"], retrained["after"]
    owners = {o["owner"]: o for o in _summary_owners(retrained)}
    # Execute
    generations = {o: {f.split("/")[0] for f in after[o] if f.startswith("g-")} for o in after}
    rewritten = {o: sum(1 for f, ino in after[o].items() if before[o].get(f) != ino) for o in after}
    # Assert: clinic_a's bundle is byte-for-byte the same files; clinic_b has one new generation
    assert after["clinic_a"] == before["clinic_a"]
    assert rewritten == {"clinic_a": 0, "clinic_b": len(after["clinic_b"])}
    assert {o: len(g) for o, g in generations.items()} == {"clinic_a": 1, "clinic_b": 1}
    old_b = {f.split("/")[0] for f in before["clinic_b"] if f.startswith("g-")}
    assert generations["clinic_b"].isdisjoint(old_b)
    assert (owners["clinic_a"]["reused"], owners["clinic_b"]["reused"]) == (True, False)
    first, second = retrained["first"]["lineage"], retrained["second"]["lineage"]
    assert first["manifests"]["clinic_a"] == second["manifests"]["clinic_a"]
    assert first["manifests"]["clinic_b"] != second["manifests"]["clinic_b"]
    assert first["key_id"] == second["key_id"]


def _summary_owners(retrained) -> list[dict]:
    """The owner rows of the retrain's summary.md table, parsed back."""
    summary = (retrained["run_dir"] / "generations" / "gen-0001" / "summary.md").read_text()
    rows = [line.split("|")[1:-1] for line in summary.splitlines() if line.startswith("| clinic_")]
    return [{"owner": r[0].strip(), "reused": r[5].strip() == "no (reused)"} for r in rows]


def test_warm_start_records_the_parent_and_continues_its_optimizer(retrained):
    # Prepare
    from hetrain.checkpoint import load_checkpoint
    from hetrain.lineage import checkpoint_digest

    run_dir = retrained["run_dir"]
    parent_path = run_dir / "checkpoints" / "round-00004"
    # Execute
    parent = load_checkpoint(parent_path)
    child = load_checkpoint(run_dir / "generations" / "gen-0001" / "checkpoints" / "round-00001")
    recorded = json.loads((run_dir / "generations" / "gen-0001" / "parent.json").read_text())
    # Assert
    assert recorded == {"generation": 1, "warm_start": True,
                        "checkpoint": {"path": str(parent_path), "sha256": checkpoint_digest(parent_path)}}
    assert child.lineage["parent_checkpoint"] == str(parent_path)
    assert child.lineage["parent_checkpoint_sha256"] == checkpoint_digest(parent_path)
    batches_per_round = parent.optimizer_state["hybrid.t"] // parent.round  # Adam counts one step per batch
    assert child.optimizer_state["hybrid.t"] == parent.optimizer_state["hybrid.t"] + batches_per_round
    assert [r["round"] for r in child.extra["history"]] == [1]


def test_warm_start_loads_the_parents_weights_and_optimizer_state(retrained, demo_data, tmp_path):
    # Prepare: the learners round 1 of generation 1 builds, before any training step
    from hetrain.checkpoint import load_checkpoint
    from hetrain.runtime import Runtime
    from hetrain.engines import unprefixed as _unprefixed
    from hetrain.trainer import Trainer

    run_dir = retrained["run_dir"]
    config = write_config(tmp_path, demo_data, rounds=1)
    trainer = Trainer(config, run_dir, resume=True, retrain=True)  # generation 1, as before its first round
    trainer.latest = None
    trainer.open()
    hybrid, twin = trainer.engine.hybrid, trainer.engine.twin
    fresh = {k: v.copy() for k, v in hybrid.model.parameters().items()}
    parent = load_checkpoint(run_dir / "checkpoints" / "round-00004")
    # Execute
    first = trainer.restore()
    # Assert
    assert first == 1 and trainer.parent_checkpoint == str(parent.path)
    for prefix, learner in (("hybrid", hybrid), ("twin", twin)):
        saved = _unprefixed(prefix, parent.params)
        live = learner.model.parameters()
        assert sorted(saved) == sorted(live)
        for key in saved:
            np.testing.assert_array_equal(live[key], saved[key])
        state = learner.optimizer.state_dict()
        for key, value in _unprefixed(prefix, parent.optimizer_state).items():
            np.testing.assert_array_equal(state[key], value)
    assert any(not np.array_equal(fresh[k], saved_v) for k, saved_v in _unprefixed("hybrid", parent.params).items())


def test_a_warm_started_retrain_keeps_the_layer_its_ancestors_froze_and_the_rank_limit_refuses_nothing(
        retrained, demo_data, tmp_path):
    # Prepare: the run whose ciphertext layer trained its 4 rounds (the limit: floor(29 / 5) - 1), then a
    # 1-round generation; a second scheduled retrain of 3 rounds follows, as a nightly schedule would run it
    from hetrain import train_flow
    from hetrain.checkpoint import load_checkpoint
    from hetrain.mpc_ops.reveal.policy import input_train_rounds

    run_dir = tmp_path / "run"
    shutil.copytree(retrained["run_dir"], run_dir)
    config = write_config(tmp_path, demo_data, rounds=3)
    # Execute
    third = train_flow.train(str(config), str(run_dir), retrain=True)
    # Assert: every round of both retrains kept the layer frozen, so no sample saw new weights and the key
    # holder refused nothing; the count of training rounds carries across generations
    from hetrain.configure import load_config

    limit = input_train_rounds(load_config(config)[0])
    assert limit == 4
    gen1 = load_checkpoint(run_dir / "generations" / "gen-0001" / "checkpoints" / "round-00001")
    assert gen1.extra["input_rounds_trained"] == limit and gen1.extra["history"][0]["input_frozen"] is True
    assert [r["input_frozen"] for r in third["rounds"]] == [True, True, True]
    assert third["final"]["policy_refusals"] == 0 and third["final"]["test_accuracy"] >= 0.9
    gen2 = run_dir / "generations" / "gen-0002" / "checkpoints"
    assert [load_checkpoint(gen2 / f"round-{r:05d}").extra["input_rounds_trained"] for r in (1, 2, 3)] == [limit] * 3
    parent = load_checkpoint(run_dir / "generations" / "gen-0001" / "checkpoints" / "round-00001")
    child = load_checkpoint(gen2 / "round-00003")
    np.testing.assert_array_equal(child.params["hybrid.enc1.W"], parent.params["hybrid.enc1.W"])


def test_every_checkpoint_and_the_run_summary_record_lineage(retrained):
    # Prepare
    from hetrain.checkpoint import load_checkpoint
    from hetrain.lineage import checkpoint_digest

    run_dir = retrained["run_dir"]
    gen = run_dir / "generations" / "gen-0001"
    # Execute
    ckpts = [load_checkpoint(p) for p in (run_dir / "checkpoints" / "round-00001", run_dir / "checkpoints" / "round-00004",
                                          gen / "checkpoints" / "round-00001")]
    metrics = json.loads((gen / "metrics.json").read_text())
    summary = (gen / "summary.md").read_text()
    # Assert
    keys = {"config_path", "config_sha256", "key_id", "manifests", "manifest_sha256", "run_dir", "generation",
            "parent_checkpoint", "parent_checkpoint_sha256", "flow_run_id", "train_flow_run_id"}
    for ckpt in ckpts:
        assert keys <= set(ckpt.lineage)
        assert set(ckpt.lineage["manifest_sha256"]) == {"clinic_a", "clinic_b"}
        assert len(ckpt.lineage["config_sha256"]) == 64 and ckpt.lineage["flow_run_id"]
    assert ckpts[0].lineage["parent_checkpoint"] is None
    assert ckpts[1].lineage["parent_checkpoint"].endswith("checkpoints/round-00003")  # as recorded in bc_run
    assert [c.lineage["generation"] for c in ckpts] == [None, None, 1]
    assert len({c.lineage["train_flow_run_id"] for c in ckpts}) == 2  # one per train run
    lineage = metrics["lineage"]
    assert lineage["parent_checkpoint"] == str(ckpts[1].path)
    assert lineage["checkpoint"] == str(ckpts[2].path) and lineage["checkpoint_sha256"] == checkpoint_digest(ckpts[2].path)
    assert lineage["flow_run_id"] == ckpts[2].lineage["train_flow_run_id"]
    assert "## Lineage" in summary and lineage["config_sha256"] in summary
    assert all(d in summary for d in lineage["manifest_sha256"].values())
    assert f"`{ckpts[1].path}` sha256 `{checkpoint_digest(ckpts[1].path)}`" in summary
    assert metrics["final"]["generation"] == 1


def test_round_and_checkpoint_events_carry_the_lineage_fields(retrained):
    # Prepare
    events = retrained["events"]
    run_dir = str(retrained["run_dir"])
    # Execute
    by_name = {}
    for e in events:
        by_name.setdefault(e["event"], []).append(e)
    # Assert
    assert sorted(by_name) == ["hetrain.checkpoint.written", "hetrain.round.completed", "hetrain.run.completed"]
    for name in ("hetrain.round.completed", "hetrain.checkpoint.written"):
        (event,) = by_name[name]
        payload = event["payload"]
        assert {"run_dir", "generation", "round", "test_accuracy", "checkpoint", "checkpoint_sha256",
                "config_sha256", "key_id", "parent_checkpoint", "flow_run_id"} <= set(payload)
        assert (payload["run_dir"], payload["generation"], payload["round"]) == (run_dir, 1, 1)
        assert event["resource"]["hetrain.run-dir"] == run_dir and event["resource"]["hetrain.generation"] == "1"
    (done,) = by_name["hetrain.run.completed"]
    assert done["payload"]["checkpoint"].endswith("gen-0001/checkpoints/round-00001")


def test_hetrain_lineage_prints_the_chain_newest_first_across_generations(retrained, capsys):
    # Prepare
    from hetrain.cli import main

    run_dir = retrained["run_dir"]
    # Execute
    code_text = main(["lineage", str(run_dir)])
    text = capsys.readouterr().out
    code_json = main(["lineage", str(run_dir), "--json"])
    data = json.loads(capsys.readouterr().out)
    # Assert
    assert (code_text, code_json) == (0, 0)
    assert text.index("(generation 1)") < text.index("(no generation)")
    assert "warm start from " + str(run_dir / "checkpoints" / "round-00004") in text
    assert text.rstrip().endswith("(fresh start: no parent)")
    assert [(r["lineage"]["generation"], r["round"]) for r in data["chain"]] == [(1, 1), (None, 4), (None, 3),
                                                                                 (None, 2), (None, 1)]
    assert [r["parent_ok"] for r in data["chain"][:2]] == [True, True]
    assert data["chain"][0]["lineage"]["parent_checkpoint"] == data["chain"][1]["path"]


def _reseal(state_file) -> None:
    import json

    from hetrain import checkpoint as ckpt
    from hetrain.core import store

    state = json.loads(state_file.read_text())
    state["self_sha256"] = store.sha256_bytes(ckpt._canonical(state))
    state_file.write_text(json.dumps(state))


def test_hetrain_lineage_flags_a_rewritten_parent(retrained, tmp_path, capsys):
    # Prepare: a copy whose parent checkpoint's state.json was rewritten after the child recorded it
    from hetrain.cli import main

    copy = tmp_path / "run"
    shutil.copytree(retrained["run_dir"], copy)
    child = copy / "generations" / "gen-0001" / "checkpoints" / "round-00001" / "state.json"
    child.write_text(child.read_text().replace(str(retrained["run_dir"]), str(copy)))
    _reseal(child)  # a moved run directory: the child's own digest is made to match its new paths
    parent = copy / "checkpoints" / "round-00004" / "state.json"
    parent.write_text(parent.read_text().replace('"round": 4', '"round": 4 '))
    # Execute
    code = main(["lineage", str(copy)])
    # Assert
    out = capsys.readouterr().out
    assert code == 0
    assert f"!! parent {copy / 'checkpoints' / 'round-00004'} was rewritten" in out


def test_hetrain_lineage_of_a_folder_without_checkpoints_is_a_clear_error(tmp_path, capsys):
    # Prepare
    from hetrain.cli import main

    # Execute
    code = main(["lineage", str(tmp_path)])
    # Assert
    assert code == 1
    assert "holds no complete checkpoint" in capsys.readouterr().err
