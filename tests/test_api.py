"""The Python API: `import hetrain`, `hetrain.load_config`, `hetrain.train` -> RunResult, and the wheel's layout."""

import os
import shutil
import subprocess
import sys
import textwrap
import uuid
import zipfile
from pathlib import Path

import pytest
import yaml

import hetrain
from hetrain.core.errors import ConfigError
from tests.conftest import REPO, write_config


def _raw(demo: Path) -> dict:
    """The shipped breast_cancer config as a mapping, owners pointing at the session's demo tables, twin on."""
    raw = yaml.safe_load((REPO / "configs" / "breast_cancer.yaml").read_text())
    for owner in raw["data"]["owners"]:
        owner["path"] = str(demo / "breast_cancer" / Path(owner["path"]).name)
    raw["report"]["plaintext_twin"] = True  # the run is compared with its twin
    return raw


def test_import_hetrain_loads_neither_prefect_nor_tenseal():
    # Execute
    out = subprocess.run([sys.executable, "-c", "import sys, hetrain; print(hetrain.__all__); "
                          "print(sorted(m for m in ('prefect', 'tenseal', 'numpy') if m in sys.modules))"],
                         capture_output=True, text=True, timeout=60)
    # Assert
    assert out.returncode == 0, out.stderr
    assert "'train'" in out.stdout and "'load_config'" in out.stdout
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_unknown_attribute_of_hetrain_is_an_attribute_error_naming_it():
    with pytest.raises(AttributeError, match="no attribute 'trian'"):
        hetrain.trian  # noqa: B018


def test_load_config_from_a_mapping_resolves_relative_paths_against_base_dir(tmp_path):
    # Prepare
    raw = yaml.safe_load((REPO / "configs" / "breast_cancer.yaml").read_text())
    raw["data"]["owners"][0]["path"] = "tables/a.csv"
    raw["data"]["owners"][0]["pseudonym_key_file"] = "secrets/pseudonym.key"
    before = yaml.safe_dump(raw)
    # Execute
    cfg = hetrain.load_config(raw, base_dir=tmp_path)
    # Assert: the same resolution as a YAML file's (hetrain.configure.resolve_paths)
    assert cfg.data.owners[0].path == (tmp_path / "tables" / "a.csv").resolve()
    assert cfg.data.owners[0].pseudonym_key_file == (tmp_path / "secrets" / "pseudonym.key").resolve()
    assert yaml.safe_dump(raw) == before  # the caller's mapping is left unchanged
    assert hetrain.load_config(cfg) is cfg


def test_load_config_from_a_file_matches_the_cli_loader():
    cfg = hetrain.load_config(REPO / "configs" / "breast_cancer.yaml")
    assert cfg.name == "breast_cancer"
    assert cfg.data.owners[0].path == (REPO / "data" / "demo" / "breast_cancer" / "clinic_a.csv").resolve()


def test_load_config_lists_every_problem_of_a_mapping():
    raw = yaml.safe_load((REPO / "configs" / "breast_cancer.yaml").read_text())
    raw["train"]["rounds"] = 0
    raw["train"]["batch_sise"] = 64
    with pytest.raises(ConfigError) as info:
        hetrain.load_config(raw)
    assert "train.rounds" in str(info.value) and "batch_sise" in str(info.value)


@pytest.mark.parametrize("bad", [42, ["a"], None])
def test_load_config_refuses_what_is_neither_a_path_nor_a_mapping(bad):
    with pytest.raises(ConfigError, match=f"expected a path to a YAML file, a mapping or a RunConfig, got "
                                          f"{type(bad).__name__}"):
        hetrain.load_config(bad)


def test_a_mapping_config_is_written_into_the_run_dir_under_its_digest_and_reads_back_equal(tmp_path, demo_data):
    # Prepare
    from hetrain.api import config_file

    raw = _raw(demo_data)
    # Execute
    first = config_file(raw, tmp_path / "run")
    again = config_file(raw, tmp_path / "run")
    raw["train"]["rounds"] = 3
    other = config_file(raw, tmp_path / "run")
    # Assert
    assert first == again and first.name.startswith("config-") and first.parent == tmp_path / "run"
    assert other != first and first.is_file()  # a changed config never overwrites the earlier one
    assert hetrain.load_config(first) == hetrain.load_config(_raw(demo_data))
    assert hetrain.load_config(other).train.rounds == 3


@pytest.mark.e2e  # a full training run
@pytest.mark.slow
def test_train_from_a_mapping_returns_a_typed_run_result(prefect_harness, demo_data, tmp_path):
    # Prepare
    raw = _raw(demo_data)
    raw["train"]["rounds"] = 2
    # Execute
    result = hetrain.train(raw, tmp_path / "run")
    # Assert
    assert isinstance(result, hetrain.RunResult)
    assert [r.round for r in result.rounds] == [1, 2]
    assert result.test_accuracy == result.rounds[-1].test_accuracy
    assert result.test_accuracy >= 0.85 and abs(result.test_accuracy - result.twin_test_accuracy) <= 0.05
    assert result.policy_mode == "hybrid" and result.stop_reason == "train.rounds=2 rounds done"
    assert result.metrics_path.is_file() and result.summary_path.is_file()
    assert result.checkpoint is not None and result.checkpoint.name == "round-00002"
    assert result.config_path.parent == (tmp_path / "run").resolve()
    assert result.lineage["config_path"] == str(result.config_path)
    assert result.rounds[0].decryptions > 0 and result.rounds[0].bytes_moved > 0


SCRIPT = """
import hetrain
cfg = hetrain.load_config({config!r})
cfg = cfg.model_copy(update={{"train": cfg.train.model_copy(update={{"workers": 2, "rounds": 1}})}})
result = hetrain.train(cfg, {run_dir!r})
print("ACCURACY", result.test_accuracy)
"""


@pytest.mark.e2e  # a training run in a subprocess
@pytest.mark.slow
def test_a_script_without_a_main_guard_trains_with_two_workers_and_leaves_no_process(demo_data, tmp_path):
    # Prepare: no `if __name__ == "__main__":` guard, two ciphertext worker processes, Prefect's temporary server
    config = write_config(tmp_path, demo_data)
    script = tmp_path / "train_script.py"
    script.write_text(textwrap.dedent(SCRIPT.format(config=str(config), run_dir=str(tmp_path / "run"))))
    marker = uuid.uuid4().hex
    env = {**os.environ, "HETRAIN_TEST_MARKER": marker, "PREFECT_HOME": str(tmp_path / "prefect-home")}
    env.pop("PREFECT_API_URL", None)
    # Execute
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, env=env,
                         cwd=tmp_path)
    # Assert
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.count("ACCURACY") == 1, out.stdout  # trained once, not again in each worker
    assert float(out.stdout.split("ACCURACY")[1].split()[0]) >= 0.8
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    assert _processes_with(marker) == [], "the script left processes running (a Prefect server or workers)"


def _processes_with(marker: str) -> list[str]:
    """Command lines of live processes whose environment carries the marker."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if marker.encode() in (proc / "environ").read_bytes():
                found.append((proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"))
        except (OSError, ValueError):
            continue
    return found


@pytest.mark.e2e  # builds and installs the wheel in subprocesses
@pytest.mark.slow
def test_the_wheel_installs_one_hetrain_package_without_the_harnesses(tmp_path):
    # Execute: build the wheel as `pip install hetrain` would get it, from a copy (pip builds in the source tree)
    source = tmp_path / "source"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(".git", ".venv", "runs", "data", "build", "*.egg-info",
                                                                "__pycache__", "bench/out"))
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(tmp_path),
                            str(source)], capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr[-3000:]
    wheel = next(tmp_path.glob("hetrain-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    # Assert: one top-level package, no generic names, no test infrastructure
    tops = {n.split("/")[0] for n in names}
    assert tops == {"hetrain", next(t for t in tops if t.endswith(".dist-info"))}, tops
    assert "hetrain/__init__.py" in names and "hetrain/mpc_ops/crypto/ckks.py" in names
    assert "hetrain/participants/key_holder.py" in names and "hetrain/bench/runner.py" in names
    assert "hetrain/bench/leakage/harness.py" in names  # users can measure the privacy claims themselves
    assert not [n for n in names if "/harness/" in n or n.startswith("hetrain/tests")]
    # and it imports from the unpacked wheel, not from this clone
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    probe = subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(site)!r}); import hetrain; "
                            "print(hetrain.__file__); print(hetrain.train.__module__)"],
                           capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.splitlines() == [str(site / "hetrain" / "__init__.py"), "hetrain.api"]


def test_bench_faults_without_the_harness_says_to_run_it_from_a_clone(monkeypatch, capsys):
    # Prepare: an installed wheel has no bench/harness/
    from hetrain import cli

    monkeypatch.setitem(sys.modules, "hetrain.bench.harness.faults", None)
    # Execute
    code = cli.main(["bench", "--faults"])
    # Assert
    assert code == 1
    assert "not in the installed package; run `hetrain bench --faults` from a clone" in capsys.readouterr().err


def test_bench_leakage_without_the_shipped_configs_says_to_run_it_from_a_clone(monkeypatch, capsys, tmp_path):
    # Prepare: an installed wheel has no configs/ beside it
    from hetrain import cli
    from hetrain.bench.leakage import harness

    monkeypatch.setattr(harness, "REPO_CONFIGS", tmp_path / "no-configs")
    # Execute
    code = cli.main(["bench", "--leakage", "--out", str(tmp_path / "leakage.json")])
    # Assert: one line, nothing written
    assert code == 1
    assert "run `hetrain bench --leakage` from a clone of the repository" in capsys.readouterr().err
    assert not (tmp_path / "leakage.json").exists()
