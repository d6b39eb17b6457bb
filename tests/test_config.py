"""Run configuration: the bundled configs validate, and every bad value is refused with what, where and what is allowed."""

import copy
import re
from pathlib import Path

import pytest
import yaml

from mpc_ops.config import load_config, parse_config
from mpc_ops.errors import ConfigError, SecurityParameterError
from mpc_ops.params import CkksParams

REPO = Path(__file__).resolve().parent.parent
BREAST_CANCER = REPO / "configs" / "breast_cancer.yaml"
DIGITS_VERTICAL = REPO / "configs" / "digits_vertical.yaml"


@pytest.fixture
def horizontal() -> dict:
    return yaml.safe_load(BREAST_CANCER.read_text())


@pytest.fixture
def vertical() -> dict:
    return yaml.safe_load(DIGITS_VERTICAL.read_text())


def refusal(raw: dict) -> str:
    """The ConfigError message parse_config raises for `raw` (fails the test if it is accepted)."""
    with pytest.raises(ConfigError) as exc_info:
        parse_config(raw, "cfg.yaml")
    return str(exc_info.value)


# ---- the bundled configs ---------------------------------------------------------------------


def test_breast_cancer_config_loads_with_owner_paths_resolved_beside_it():
    # Execute
    cfg, path = load_config(BREAST_CANCER)

    # Assert
    assert path == BREAST_CANCER.resolve()
    assert (cfg.name, cfg.data.partition, cfg.policy.cipher_layers) == ("breast_cancer", "horizontal", ["enc1"])
    assert [o.path for o in cfg.data.owners] == [
        (REPO / "data/demo/breast_cancer" / f"clinic_{c}.csv").resolve() for c in "ab"
    ]
    assert all(len(o.features) == 30 for o in cfg.data.owners)
    cfg.ckks.params().validate()


def test_digits_vertical_config_loads_with_one_label_owner():
    # Execute
    cfg, _ = load_config(DIGITS_VERTICAL)

    # Assert
    assert (cfg.data.partition, cfg.data.task, cfg.data.num_classes) == ("vertical", "multiclass", 10)
    assert [(o.name, o.label, len(o.features)) for o in cfg.data.owners] == [("bank", False, 32), ("telco", True, 32)]
    assert cfg.policy.flooding.budget == 32768
    cfg.ckks.params().validate()


def test_parse_config_leaves_the_raw_mapping_unchanged(horizontal):
    # Prepare
    before = copy.deepcopy(horizontal)

    # Execute
    parse_config(horizontal, "cfg.yaml")

    # Assert
    assert horizontal == before


# ---- unknown keys and wrong values -----------------------------------------------------------


@pytest.mark.parametrize("where, key, allowed", [
    ((), "colour", "ckks, data, model, name, packing, policy, report, seed, train"),
    (("train",), "epochs", "batch_size, optimizer, patience, rounds, target_accuracy, workers"),
    (("data", "owners", 0), "colour", "features, label, name, path"),
    (("policy", "flooding"), "epsilon", "budget, security_bits"),
], ids=["top", "train", "owner", "flooding"])
def test_unknown_key_is_refused_with_the_keys_allowed_there(horizontal, where, key, allowed):
    # Prepare
    node = horizontal
    for part in where:
        node = node[part]
    node[key] = 1
    dotted = ".".join(str(p) for p in (*where, key))

    # Execute
    message = refusal(horizontal)

    # Assert
    assert message == f"cfg.yaml: unknown key '{dotted}' (allowed here: {allowed})"


def test_unknown_key_inside_a_reveal_point_lists_the_reveal_point_keys(horizontal):
    # Prepare
    horizontal["policy"]["reveals"]["enc1"]["allow_everything"] = True

    # Execute
    message = refusal(horizontal)

    # Assert
    assert message == "cfg.yaml: unknown key 'policy.reveals.enc1.allow_everything' (allowed here: allow_invertible, max_rank)"


@pytest.mark.parametrize("path, value, allowed", [
    (("data", "partition"), "diagonal", "'horizontal' or 'vertical'"),
    (("train", "optimizer", "kind"), "rmsprop", "'sgd' or 'adam'"),
    (("policy", "labels"), "hide", "'reveal' or 'encrypted'"),
], ids=["partition", "optimizer", "labels"])
def test_wrong_enum_value_names_the_key_the_allowed_values_and_the_value_received(horizontal, path, value, allowed):
    # Prepare
    node = horizontal
    for part in path[:-1]:
        node = node[part]
    node[path[-1]] = value

    # Execute
    message = refusal(horizontal)

    # Assert
    assert message == f"cfg.yaml: key '{'.'.join(path)}': Input should be {allowed}; got {value!r}"


def test_out_of_range_number_names_the_key_the_range_and_the_value(horizontal):
    # Prepare
    horizontal["policy"]["flooding"]["security_bits"] = 200

    # Execute
    message = refusal(horizontal)

    # Assert
    assert message == "cfg.yaml: key 'policy.flooding.security_bits': Input should be less than or equal to 128; got 200"


def test_every_problem_is_listed_one_per_line(horizontal):
    # Prepare
    horizontal["train"]["epochs"] = 3
    horizontal["data"]["partition"] = "diagonal"

    # Execute
    lines = refusal(horizontal).splitlines()

    # Assert
    assert len(lines) == 2
    assert any("unknown key 'train.epochs'" in line for line in lines)
    assert any("key 'data.partition'" in line for line in lines)


# ---- cross-checks ----------------------------------------------------------------------------


def test_ckks_parameters_over_the_security_bound_are_refused_by_validate():
    # Prepare
    params = CkksParams(8192, (60, 60, 60, 60), 50)

    # Execute / Assert
    with pytest.raises(SecurityParameterError, match=(
        r"ckks.coeff_mod_bit_sizes \[60, 60, 60, 60\] total 240 bits, over the 128-bit security bound of 218 "
        r"bits for poly_modulus_degree=8192; drop a prime or raise the degree"
    )):
        params.validate()


def test_config_with_ckks_parameters_over_the_security_bound_is_refused(horizontal):
    # Prepare
    horizontal["ckks"]["coeff_mod_bit_sizes"] = [60, 60, 60, 60]

    # Execute
    message = refusal(horizontal)

    # Assert
    assert "total 240 bits, over the 128-bit security bound of 218 bits for poly_modulus_degree=8192" in message


def test_a_second_cipher_layer_is_refused_for_lack_of_depth(horizontal):
    # Prepare: both layers on ciphertext (a polynomial activation between them), the reveal after 'out'
    horizontal["model"]["layers"][1] = {"kind": "square"}
    horizontal["policy"]["cipher_layers"] = ["enc1", "out"]
    horizontal["policy"]["reveals"] = {"out": {"allow_invertible": True}}

    # Execute
    message = refusal(horizontal)

    # Assert: the message names the depth the counted circuit needs and the levels the modulus chain has
    assert re.search(r"multiplicative depth 4, which exceeds the 1 level(\(s\))? of coeff_mod_bit_sizes "
                     r"\[60, 50, 60\]", message), message


def test_min_batch_above_the_batch_size_is_refused(horizontal):
    # Prepare
    horizontal["policy"]["min_batch"] = 128

    # Execute
    message = refusal(horizontal)

    # Assert
    assert "policy.min_batch=128 exceeds train.batch_size=64; every gradient reveal would be refused" in message


@pytest.mark.parametrize("batch_size", [100, 48])
def test_batch_size_that_is_not_a_power_of_two_is_refused(horizontal, batch_size):
    # Prepare
    horizontal["train"]["batch_size"] = batch_size

    # Execute
    message = refusal(horizontal)

    # Assert
    assert f"train.batch_size must be a power of two in [8, 4096]; got {batch_size}" in message


@pytest.mark.parametrize("labels, got", [((False, False), "[]"), ((True, True), "['bank', 'telco']")],
                         ids=["no_label_owner", "two_label_owners"])
def test_vertical_split_needs_exactly_one_label_owner(vertical, labels, got):
    # Prepare
    for owner, label in zip(vertical["data"]["owners"], labels):
        owner["label"] = label

    # Execute
    message = refusal(vertical)

    # Assert
    assert f"data.owners: exactly one owner must hold the labels (label: true); got {got}" in message


def test_cross_check_error_does_not_dump_the_whole_config(horizontal):
    # Prepare
    horizontal["train"]["batch_size"] = 100

    # Execute
    message = refusal(horizontal)

    # Assert
    assert message.count("; got ") == 1
    assert "mean_radius" not in message


# ---- files -----------------------------------------------------------------------------------


def test_missing_config_file_is_refused(tmp_path):
    # Prepare
    missing = tmp_path / "nope.yaml"

    # Execute / Assert
    with pytest.raises(ConfigError, match=rf"^config file {missing} does not exist$"):
        load_config(missing)


def test_config_file_that_is_not_yaml_is_refused(tmp_path):
    # Prepare
    path = tmp_path / "bad.yaml"
    path.write_text("name: [unclosed\n")

    # Execute / Assert
    with pytest.raises(ConfigError, match=rf"^{path}: not valid YAML"):
        load_config(path)


def test_config_whose_top_level_is_not_a_mapping_is_refused(tmp_path):
    # Prepare
    path = tmp_path / "list.yaml"
    path.write_text("- a\n- b\n")

    # Execute / Assert
    with pytest.raises(ConfigError, match=rf"^{path}: the top level must be a mapping of keys, got list$"):
        load_config(path)
