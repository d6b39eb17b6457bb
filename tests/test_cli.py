"""The `hetrain` command: bad inputs give one clear error line, exit non-zero, and lose nothing."""

import shutil

import pytest
import yaml

from hetrain.cli import main
from tests.conftest import write_config


def test_unknown_config_key_is_named_with_the_allowed_keys(tmp_path, demo_data, capsys):
    # Prepare
    config = write_config(tmp_path, demo_data)
    raw = yaml.safe_load(config.read_text())
    raw["train"]["epochs"] = 3
    config.write_text(yaml.safe_dump(raw))
    # Execute
    code = main(["train", str(config), "--run-dir", str(tmp_path / "run")])
    # Assert
    err = capsys.readouterr().err
    assert code == 2
    assert "unknown key 'train.epochs'" in err and "rounds" in err
    assert "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_parameters_over_the_security_bound_are_refused(tmp_path, demo_data, capsys):
    # Prepare
    config = write_config(tmp_path, demo_data)
    raw = yaml.safe_load(config.read_text())
    raw["ckks"]["coeff_mod_bit_sizes"] = [60, 60, 60, 60]
    config.write_text(yaml.safe_dump(raw))
    # Execute
    code = main(["train", str(config), "--run-dir", str(tmp_path / "run")])
    # Assert
    err = capsys.readouterr().err
    assert code == 2
    assert "240 bits" in err and "218" in err
    assert not (tmp_path / "run").exists()


def test_missing_column_fails_cleanly_without_a_checkpoint(prefect_harness, tmp_path, demo_data, capsys):
    # Prepare: clinic_b's table loses a declared column
    import pandas as pd

    config = write_config(tmp_path, demo_data)
    raw = yaml.safe_load(config.read_text())
    bad = tmp_path / "clinic_b.csv"
    pd.read_csv(raw["data"]["owners"][1]["path"]).drop(columns=["mean_texture"]).to_csv(bad, index=False)
    raw["data"]["owners"][1]["path"] = str(bad)
    config.write_text(yaml.safe_dump(raw))
    # Execute
    code = main(["train", str(config), "--run-dir", str(tmp_path / "run")])
    # Assert
    err = capsys.readouterr().err
    assert code == 1
    assert "SchemaError" in err and "mean_texture" in err and "clinic_b" in err
    assert not any((tmp_path / "run" / "checkpoints").glob("round-*"))


def test_tampered_ciphertext_stops_the_resumed_run_and_keeps_checkpoints(bc_run, tmp_path, demo_data, capsys):
    # Prepare: copy a finished run, ask for more rounds, flip one byte of one training blob
    from hetrain.checkpoint import latest_checkpoint

    run_dir, _ = bc_run
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    config = write_config(tmp_path, demo_data, rounds=6)
    blob = sorted((copy / "exchange" / "clinic_a").glob("g-*/train/*.rows.ct"))[0]
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0xFF
    blob.write_bytes(bytes(data))
    before = latest_checkpoint(copy / "checkpoints")
    # Execute
    code = main(["train", str(config), "--run-dir", str(copy), "--resume"])
    # Assert
    err = capsys.readouterr().err
    assert code == 1
    assert "DigestMismatch" in err and blob.name in err
    assert latest_checkpoint(copy / "checkpoints") == before


@pytest.mark.parametrize("argv", [["train"], ["nonsense"]])
def test_bad_command_lines_exit_with_usage(argv, capsys):
    # Execute / Assert
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert "usage: hetrain" in capsys.readouterr().err


def test_rotated_key_is_replaced_on_resume_and_owners_re_encrypt(bc_run, tmp_path, demo_data, capsys):
    # Prepare: a finished 4-round run, copied, its key retired
    import json

    from hetrain.checkpoint import latest_checkpoint, load_checkpoint

    run_dir, _ = bc_run
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    old_key = json.loads((copy / "key_holder" / "state.json").read_text())["key_id"]
    config = write_config(tmp_path, demo_data, rounds=5)
    # Execute
    rotated = main(["rotate-key", str(copy)])
    resumed = main(["train", str(config), "--run-dir", str(copy), "--resume"])
    # Assert: a new key, a fresh budget, owners' bundles under it, the old log kept and verifiable
    assert (rotated, resumed) == (0, 0)
    state = json.loads((copy / "key_holder" / "state.json").read_text())
    assert state["key_id"] != old_key
    assert not (copy / "key_holder" / "retired" / old_key / "secret_context.bin").exists()
    assert (copy / "key_holder" / "retired" / old_key / "audit.jsonl").exists()
    manifest = json.loads((copy / "exchange" / "clinic_a" / "manifest.json").read_text())
    assert manifest["key_id"] == state["key_id"]
    ckpt = load_checkpoint(latest_checkpoint(copy / "checkpoints"))
    assert ckpt.round == 5 and ckpt.lineage["key_id"] == state["key_id"]
    assert main(["audit", "verify", str(copy)]) == 0
    out = capsys.readouterr().out
    assert f"retired key {old_key}: audit log verified" in out and "current key: audit log verified" in out


def test_rotating_a_run_without_a_key_is_a_clear_error(tmp_path, capsys):
    # Execute
    code = main(["rotate-key", str(tmp_path)])
    # Assert
    assert code == 1
    assert "there is no key to rotate" in capsys.readouterr().err


def test_resume_with_a_changed_model_is_refused_and_keeps_checkpoints(bc_run, tmp_path, demo_data, capsys):
    # Prepare: the finished run, resumed with a wider ciphertext layer
    from hetrain.checkpoint import latest_checkpoint

    run_dir, _ = bc_run
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    config = write_config(tmp_path, demo_data, rounds=6)
    raw = yaml.safe_load(config.read_text())
    raw["model"]["layers"][0]["out_features"] = 4
    config.write_text(yaml.safe_dump(raw))
    before = latest_checkpoint(copy / "checkpoints")
    # Execute
    code = main(["train", str(config), "--run-dir", str(copy), "--resume"])
    # Assert
    err = capsys.readouterr().err
    assert code == 1
    assert "CheckpointError" in err and "does not fit the current config" in err
    assert latest_checkpoint(copy / "checkpoints") == before


@pytest.mark.e2e  # `hetrain train` in a subprocess
@pytest.mark.slow
def test_a_failed_run_prints_one_error_line_and_no_traceback_in_a_fresh_process(tmp_path, demo_data):
    # Prepare: the user's view: a fresh `hetrain` process (Prefect configures its logging at
    # import, so only a new process shows what the CLI's quiet settings do)
    import os
    import subprocess
    import sys

    import pandas as pd

    config = write_config(tmp_path, demo_data, rounds=1)
    raw = yaml.safe_load(config.read_text())
    bad = tmp_path / "clinic_a.csv"
    frame = pd.read_csv(raw["data"]["owners"][0]["path"], dtype=str)
    frame.loc[3, "mean_area"] = "n/a"
    frame.to_csv(bad, index=False)
    raw["data"]["owners"][0]["path"] = str(bad)
    config.write_text(yaml.safe_dump(raw))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_LOGGING")}
    env["PREFECT_HOME"] = str(tmp_path / "prefect-home")
    # Execute
    out = subprocess.run([sys.executable, "-m", "hetrain.cli", "train", str(config), "--run-dir", str(tmp_path / "run")],
                         capture_output=True, text=True, env=env, timeout=300)
    # Assert
    assert out.returncode == 1
    assert "hetrain: error: SchemaError" in out.stderr and "mean_area" in out.stderr
    assert "Traceback" not in out.stderr + out.stdout
    assert not any((tmp_path / "run" / "checkpoints").glob("round-*"))


@pytest.mark.e2e  # `hetrain train` in a subprocess
@pytest.mark.slow
def test_a_successful_run_prints_results_and_no_traceback_in_a_fresh_process(tmp_path, demo_data):
    # Prepare: a fresh `hetrain` process on the temporary server, whose shutdown can log
    # "database is locked" / "Error flushing events" tracebacks unless the CLI quiets them
    import os
    import subprocess
    import sys

    config = write_config(tmp_path, demo_data, rounds=2)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env["PREFECT_HOME"] = str(tmp_path / "prefect-home")
    # Execute
    out = subprocess.run([sys.executable, "-m", "hetrain.cli", "train", str(config), "--run-dir", str(tmp_path / "run")],
                         capture_output=True, text=True, env=env, timeout=300)
    # Assert
    assert out.returncode == 0, out.stderr[-2000:]
    assert "Traceback" not in out.stderr + out.stdout
    assert "hetrain: run 'breast_cancer' finished" in out.stdout and "prefect server start" in out.stdout
    assert (tmp_path / "run" / "metrics.json").exists()
