"""The `hetrain` command: bad inputs give one clear error line, exit non-zero, and lose nothing."""

import shutil

import pytest
import yaml

from flows.cli import main
from tests.test_flows import bc_run, write_config  # noqa: F401  (shared module fixture)


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
    from flows.checkpoint import latest_checkpoint

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
