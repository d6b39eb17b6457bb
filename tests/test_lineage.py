"""Retrain generations: which checkpoint is newest, what a new generation records, what resume continues."""

import json

import numpy as np
import pytest

from hetrain.checkpoint import save_checkpoint
from hetrain.lineage import checkpoint_digest, generations, newest_checkpoint, open_generation
from hetrain.runtime import generation_dir


def _checkpoint(folder, round_no: int):
    return save_checkpoint(folder, round_no, params={"w": np.full(3, float(round_no))}, optimizer_state={"t": round_no},
                           rng_state={}, lineage={}, extra={})


def test_newest_checkpoint_prefers_the_newest_generation_that_has_one(tmp_path):
    # Prepare: a plain run, generation 1 with two rounds, generation 2 with none yet (crashed early)
    _checkpoint(tmp_path / "checkpoints", 3)
    _checkpoint(generation_dir(tmp_path, 1) / "checkpoints", 1)
    newest = _checkpoint(generation_dir(tmp_path, 1) / "checkpoints", 2)
    (generation_dir(tmp_path, 2) / "checkpoints").mkdir(parents=True)
    # Execute / Assert
    assert newest_checkpoint(tmp_path) == newest


def test_newest_checkpoint_falls_back_to_the_run_directorys_own(tmp_path):
    # Prepare
    own = _checkpoint(tmp_path / "checkpoints", 5)
    # Execute / Assert
    assert newest_checkpoint(tmp_path) == own
    assert newest_checkpoint(tmp_path / "empty") is None


def test_a_warm_start_generation_records_the_newest_checkpoint_and_its_digest(tmp_path):
    # Prepare
    parent = _checkpoint(tmp_path / "checkpoints", 4)
    # Execute
    number, recorded = open_generation(tmp_path, resume=False, warm_start=True)
    # Assert
    assert number == 1
    assert recorded == {"path": str(parent), "sha256": checkpoint_digest(parent)}
    on_disk = json.loads((generation_dir(tmp_path, 1) / "parent.json").read_text())
    assert on_disk == {"generation": 1, "warm_start": True, "checkpoint": recorded}


def test_a_cold_generation_records_no_parent_even_when_checkpoints_exist(tmp_path):
    # Prepare
    _checkpoint(tmp_path / "checkpoints", 4)
    # Execute
    number, recorded = open_generation(tmp_path, resume=False, warm_start=False)
    # Assert
    assert (number, recorded) == (1, None)
    assert json.loads((generation_dir(tmp_path, 1) / "parent.json").read_text())["checkpoint"] is None


def test_resume_continues_the_newest_generation_with_the_parent_it_started_from(tmp_path):
    # Prepare: generation 1 warm-started from round 4; later generation 1 itself gained a checkpoint
    first_parent = _checkpoint(tmp_path / "checkpoints", 4)
    open_generation(tmp_path, resume=False, warm_start=True)
    _checkpoint(generation_dir(tmp_path, 1) / "checkpoints", 1)
    # Execute
    resumed = open_generation(tmp_path, resume=True, warm_start=True)
    new = open_generation(tmp_path, resume=False, warm_start=True)
    # Assert
    assert resumed == (1, {"path": str(first_parent), "sha256": checkpoint_digest(first_parent)})
    assert new[0] == 2 and new[1]["path"] == str(generation_dir(tmp_path, 1) / "checkpoints" / "round-00001")
    assert generations(tmp_path) == [1, 2]


def test_a_generation_made_meanwhile_by_another_run_is_not_overwritten(tmp_path, monkeypatch):
    # Prepare: another run creates generation 1 between our listing and our rename
    from hetrain import lineage

    monkeypatch.setattr(lineage, "generations", lambda root: [])
    other = generation_dir(tmp_path, 1)
    other.mkdir(parents=True)
    (other / "parent.json").write_text('{"generation": 1}')
    # Execute / Assert
    with pytest.raises(OSError):
        open_generation(tmp_path, resume=False, warm_start=False)
    assert (other / "parent.json").read_text() == '{"generation": 1}'
