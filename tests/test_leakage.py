"""`hetrain bench --leakage`: the deviating trainer's attacks, per trainer mode, with their measured verdicts."""

import json

import pytest

from hetrain import cli

pytestmark = [pytest.mark.e2e, pytest.mark.slow]  # two small trained runs and their attacks (~30 s)


@pytest.fixture(scope="module")
def leakage(tmp_path_factory):
    out = tmp_path_factory.mktemp("leakage") / "leakage.json"
    assert cli.main(["bench", "--leakage", "--out", str(out)]) == 0
    return json.loads(out.read_text()), out


def _outcomes(summary, mode):
    return {o["attack"]: o for o in summary["modes"][mode]["outcomes"]}


def test_against_a_semi_honest_key_holder_the_harness_recovers_the_key_and_raw_features(leakage):
    summary, _ = leakage
    mode = "semi_honest (hybrid)"
    found = _outcomes(summary, mode)
    assert summary["secret_key_recovered"][mode] is True
    assert found["secret_key_two_crafted_reveals"]["measure"]["key_coefficients_recovered"] == 8192
    assert found["unit_vector_weights"]["verdict"] == "leaked"
    assert found["unit_vector_weights"]["measure"]["features_exposed"] == 25
    assert found["unit_vector_weights"]["measure"]["feature_r2"] > 0.99
    assert found["one_hot_delta_gradient"]["measure"]["feature_r2"] > 0.99
    assert summary["raw_values_recovered"][mode] > 1000
    assert found["reused_weights_digest"]["measure"]["features_exposed"] == 30
    assert found["reused_weights_digest"]["measure"]["feature_r2"] > 0.99
    assert found["raw_owner_ciphertext_as_gradient"]["verdict"] == "leaked"
    # fixed for both modes: pseudonyms keyed by the owners' secret, flooding before the range check, no twin
    assert found["invert_pseudonyms"]["verdict"] == "blocked"
    assert found["headroom_binary_search"]["verdict"] == "blocked"
    assert found["headroom_binary_search"]["measure"]["spread"] > 1e-6  # the flooding's, not 1e-11
    assert found["read_twin_plaintext"]["verdict"] == "blocked"


def test_against_a_verifying_key_holder_every_deviating_attack_is_blocked(leakage):
    summary, _ = leakage
    mode = "untrusted (verified)"
    found = _outcomes(summary, mode)
    assert summary["secret_key_recovered"][mode] is False
    assert summary["raw_values_recovered"][mode] == 0
    assert {k: v["verdict"] for k, v in found.items()} == {k: "blocked" for k in found}
    assert summary["deviating_attacks_blocked"][mode] == summary["deviating_attacks_tried"][mode] == 10
    assert "'unverified'" in found["unit_vector_weights"]["refusal"]
    assert "'unverified'" in found["forged_verified_reveal"]["refusal"]
    assert "'already_revealed'" in found["repeated_reveal_averaging"]["refusal"]


def test_the_honest_trainers_reconstruction_is_reported_per_mode_with_a_readable_report(leakage):
    summary, out = leakage
    assert set(summary["honest_trainer_feature_r2"]) == {"semi_honest (hybrid)", "untrusted (verified)"}
    for r2 in summary["honest_trainer_feature_r2"].values():
        assert -1.0 <= r2 <= 1.0
    report = out.with_suffix(".md").read_text()
    assert "## untrusted (verified)" in report and "| secret_key_two_crafted_reveals | blocked |" in report


def test_over_the_key_holder_service_the_same_attacks_get_the_same(leakage):
    summary, _ = leakage
    mode = "semi_honest (hybrid, key-holder service)"
    found = _outcomes(summary, mode)
    assert summary["secret_key_recovered"][mode] is True
    assert found["reused_weights_digest"]["measure"]["features_exposed"] == 30
    assert {k: v["verdict"] for k, v in found.items()} == \
        {k: v["verdict"] for k, v in _outcomes(summary, "semi_honest (hybrid)").items()}
