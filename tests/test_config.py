"""Run configuration: the bundled configs validate, and every bad value is refused with what, where and what is allowed."""

import copy
import re
from pathlib import Path

import pytest
import yaml

from hetrain.configure import load_config, parse_config
from hetrain.core.errors import ConfigError, SecurityParameterError
from hetrain.core.params import CkksParams

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
    ((), "colour", "ckks, data, exchange, key_holder, model, name, packing, policy, report, seed, train"),
    (("train",), "epochs", "batch_size, compute, dask_address, optimizer, patience, rounds, target_accuracy, warm_start, workers"),
    (("data", "owners", 0), "colour", "deployment, features, label, name, path, pseudonym_key_file"),
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


# ---- key_holder ------------------------------------------------------------------------------


def test_key_holder_defaults_to_in_process(horizontal):
    # Execute
    cfg = parse_config(horizontal, "cfg.yaml")

    # Assert
    assert (cfg.key_holder.url, cfg.key_holder.token_file, cfg.key_holder.retries) == (None, None, 3)


def test_key_holder_service_config_resolves_its_files_beside_the_config(horizontal, tmp_path):
    # Prepare
    horizontal["key_holder"] = {"url": "https://kh.example.org:8443/", "token_file": "secrets/kh.token",
                                "tls_ca": "ca.pem", "tls_cert": "client.pem", "tls_key": "client.key",
                                "timeout_s": 5, "retries": 1}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(horizontal))

    # Execute
    cfg, _ = load_config(path)

    # Assert
    kh = cfg.key_holder
    assert (kh.url, kh.timeout_s, kh.retries) == ("https://kh.example.org:8443/", 5.0, 1)
    assert (kh.token_file, kh.tls_ca, kh.tls_cert, kh.tls_key) == (
        tmp_path / "secrets/kh.token", tmp_path / "ca.pem", tmp_path / "client.pem", tmp_path / "client.key")


@pytest.mark.parametrize("url", [
    "127.0.0.1:8765", "ftp://127.0.0.1:8765", "http://127.0.0.1", "http://127.0.0.1:0", "http://127.0.0.1:70000",
    "http://127.0.0.1:8765/v1", "http://user:pw@127.0.0.1:8765", "http://127.0.0.1:8765?x=1", "http://:8765",
], ids=["no-scheme", "ftp", "no-port", "port-0", "port-too-big", "path", "userinfo", "query", "no-host"])
def test_key_holder_url_that_is_not_http_host_port_is_refused_with_the_form_allowed(horizontal, url):
    # Prepare
    horizontal["key_holder"] = {"url": url, "token_file": "kh.token"}

    # Execute
    message = refusal(horizontal)

    # Assert
    assert message == (f"cfg.yaml: key 'key_holder': key_holder.url must be http://HOST:PORT or https://HOST:PORT "
                       f"(e.g. http://127.0.0.1:8765); got {url!r}")


@pytest.mark.parametrize("section, message", [
    ({"url": "http://127.0.0.1:8765"}, r"key_holder.token_file is required when key_holder.url is set"),
    ({"token_file": "kh.token"}, r"key_holder.url is required when key_holder sets \['token_file'\]"),
    ({"url": "http://127.0.0.1:8765", "token_file": "t", "tls_ca": "ca.pem"},
     r"key_holder \['tls_ca'\] need an https:// url; got 'http://127.0.0.1:8765'"),
    ({"url": "https://127.0.0.1:8765", "token_file": "t", "tls_cert": "c.pem"},
     r"key_holder.tls_cert and key_holder.tls_key go together"),
], ids=["url-without-token", "token-without-url", "tls-over-http", "cert-without-key"])
def test_inconsistent_key_holder_section_is_refused_naming_the_keys(horizontal, section, message):
    # Prepare
    horizontal["key_holder"] = section

    # Execute / Assert
    assert re.search(message, refusal(horizontal))


def test_unknown_key_in_key_holder_lists_the_allowed_keys(horizontal):
    # Prepare
    horizontal["key_holder"] = {"host": "127.0.0.1"}

    # Execute / Assert
    assert refusal(horizontal) == ("cfg.yaml: unknown key 'key_holder.host' (allowed here: backoff_s, retries, "
                                   "timeout_s, tls_ca, tls_cert, tls_key, token_file, url)")


def test_environment_sets_the_key_holder_url_and_token_file(horizontal, tmp_path, monkeypatch):
    # Prepare: a deployment points an unchanged config at a service; the token path is relative to the cwd
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(horizontal))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HETRAIN_KEY_HOLDER_URL", "http://127.0.0.1:9000")
    monkeypatch.setenv("HETRAIN_KEY_HOLDER_TOKEN_FILE", "run/kh.token")

    # Execute
    cfg, _ = load_config(path)

    # Assert
    assert (cfg.key_holder.url, cfg.key_holder.token_file) == ("http://127.0.0.1:9000", tmp_path / "run/kh.token")


def test_environment_url_is_validated_like_the_config(horizontal, tmp_path, monkeypatch):
    # Prepare
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(horizontal))
    monkeypatch.setenv("HETRAIN_KEY_HOLDER_URL", "localhost")

    # Execute / Assert
    with pytest.raises(ConfigError, match=r"key_holder.url must be http://HOST:PORT .*; got 'localhost'"):
        load_config(path)


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


# ---- hostile files: bounded, no aliases, no crash --------------------------------------------

HOSTILE_YAML = {
    "alias bomb": ("a: &a [x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\n"
                   "c: [*b, *b, *b, *b, *b, *b, *b, *b, *b]\n", r"line 1: YAML anchors \(&name\) are not allowed"),
    "deep nesting": ("a: " + "[" * 5000 + "]" * 5000 + "\n", r"not valid YAML \(nested too deeply\)"),
    "not UTF-8": (b"name: \xff\xfe\n", r"not UTF-8 text \(byte 6\)"),
    "over the size limit": ("# " + "x" * (1 << 20) + "\n", r"config file .* is 1048579 bytes or not a regular file; "
                                                           r"the limit is 1048576 bytes"),
    "python tag": ("name: !!python/object/apply:os.system ['true']\n", r"not valid YAML \(could not determine a constructor"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_YAML))
def test_hostile_yaml_is_refused_with_a_config_error(tmp_path, case):
    # Prepare
    text, message = HOSTILE_YAML[case]
    path = tmp_path / "hostile.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())

    # Execute / Assert
    with pytest.raises(ConfigError, match=message):
        load_config(path)


def test_a_huge_bad_value_is_quoted_only_in_part(horizontal):
    # Prepare
    horizontal["name"] = "x" * 100_000

    # Execute
    message = refusal(horizontal)

    # Assert
    assert "key 'name'" in message and len(message) < 1000


# ---- the schema at the bottom, the loader above it -------------------------------------------


def test_an_auto_chain_is_picked_by_the_loader_into_a_new_config_the_schema_result_unchanged():
    # Prepare: the strict config asks the planner for its chain (ckks.auto), so the schema leaves the default
    from hetrain.configure import check_loaded
    from hetrain.core.config import validate_config

    raw = yaml.safe_load((REPO / "configs" / "breast_cancer_strict.yaml").read_text())
    validated = validate_config(raw, "cfg.yaml")
    before = validated.model_dump()

    # Execute
    checked = check_loaded(validated, "cfg.yaml")

    # Assert: a new config with the counted chain; the validated (frozen) one is as it was
    assert checked is not validated
    assert checked.ckks.coeff_mod_bit_sizes == [60, 50, 50, 50, 50, 50, 50, 60] and checked.ckks.auto
    assert validated.model_dump() == before and validated.ckks.coeff_mod_bit_sizes == [60, 50, 60]


def test_importing_the_config_schema_loads_nothing_above_hetrain_core():
    # Execute: a fresh interpreter, so modules other tests imported do not count
    import ast
    import subprocess
    import sys

    code = "import sys, hetrain.core.config; print(sorted(m for m in sys.modules if m.startswith('hetrain')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout

    # Assert
    loaded = ast.literal_eval(out)
    assert loaded and all(m == "hetrain" or m.startswith("hetrain.core") for m in loaded), loaded
