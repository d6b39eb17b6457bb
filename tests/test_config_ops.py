"""Config fields for operations: owners given by deployment, train.warm_start, the deployed variant."""

from pathlib import Path

import pytest
import yaml

from hetrain.configure import load_config, parse_config
from hetrain.core.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def raw() -> dict:
    return yaml.safe_load((REPO / "configs" / "breast_cancer.yaml").read_text())


def refusal(raw: dict) -> str:
    with pytest.raises(ConfigError) as exc_info:
        parse_config(raw, "cfg.yaml")
    return str(exc_info.value)


def test_an_owner_with_both_path_and_deployment_is_refused(raw):
    # Prepare
    raw["data"]["owners"][0]["deployment"] = "prepare-owner-bundle/clinic-a"
    # Execute
    message = refusal(raw)
    # Assert
    assert "key 'data.owners.0'" in message
    assert "owner 'clinic_a': set exactly one of 'path'" in message and "got both" in message


def test_an_owner_with_neither_path_nor_deployment_is_refused(raw):
    # Prepare
    del raw["data"]["owners"][1]["path"]
    # Execute
    message = refusal(raw)
    # Assert
    assert "key 'data.owners.1'" in message and "owner 'clinic_b'" in message and "got neither" in message


@pytest.mark.parametrize("name", ["clinic-a", "a/b/c", "flow/ dep", ""])
def test_a_deployment_name_must_be_flow_slash_deployment(raw, name):
    # Prepare
    owner = raw["data"]["owners"][0]
    del owner["path"]
    owner["deployment"] = name
    raw["report"]["plaintext_twin"] = False
    # Execute
    message = refusal(raw)
    # Assert
    assert "key 'data.owners.0.deployment'" in message and "should match pattern" in message
    assert repr(name) in message


def test_the_plaintext_twin_is_refused_with_deployed_owners(raw):
    # Prepare
    owner = raw["data"]["owners"][0]
    del owner["path"]
    owner["deployment"] = "prepare-owner-bundle/clinic-a"
    raw["report"]["plaintext_twin"] = True  # the shipped configs leave it off
    # Execute
    message = refusal(raw)
    # Assert
    assert "report.plaintext_twin must be false" in message and "['clinic_a']" in message


@pytest.mark.parametrize("value", ["sometimes", 2, [True]])
def test_warm_start_must_be_a_boolean(raw, value):
    # Prepare
    raw["train"]["warm_start"] = value
    # Execute
    message = refusal(raw)
    # Assert
    assert "key 'train.warm_start'" in message and "valid boolean" in message and repr(value) in message


def test_warm_start_defaults_to_false_and_the_shipped_configs_turn_it_on(raw):
    # Prepare
    del raw["train"]["warm_start"]
    # Execute
    default = parse_config(raw)
    shipped = [load_config(REPO / "configs" / f"{n}.yaml")[0] for n in ("breast_cancer", "digits_vertical")]
    # Assert
    assert default.train.warm_start is False
    assert all(cfg.train.warm_start for cfg in shipped)


def test_the_deployed_variant_names_owner_deployments_and_holds_no_raw_path():
    # Prepare
    path = REPO / "configs" / "breast_cancer_deployed.yaml"
    # Execute
    cfg, _ = load_config(path)
    # Assert
    assert [(o.name, o.path, o.deployment) for o in cfg.data.owners] == [
        ("clinic_a", None, "prepare-owner-bundle/clinic-a"), ("clinic_b", None, "prepare-owner-bundle/clinic-b")]
    assert ".csv" not in path.read_text()
    assert cfg.report.plaintext_twin is False
    in_process, _ = load_config(REPO / "configs" / "breast_cancer.yaml")
    assert cfg.model == in_process.model and cfg.policy == in_process.policy and cfg.train == in_process.train


def test_the_plaintext_twin_is_off_by_default_and_in_every_shipped_config(raw):
    # Prepare: the twin makes the trainer's process read every owner's plaintext
    del raw["report"]
    # Execute
    cfg = parse_config(raw, "cfg.yaml")
    shipped = {p.name: yaml.safe_load(p.read_text())["report"]["plaintext_twin"]
               for p in sorted((REPO / "configs").glob("*.yaml")) if "report" in yaml.safe_load(p.read_text())}
    # Assert
    assert cfg.report.plaintext_twin is False
    assert shipped and set(shipped.values()) == {False}, shipped
