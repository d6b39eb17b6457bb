"""End-to-end runs under policy.trainer: untrusted, through the Python API and the `train` flow."""

from pathlib import Path

import numpy as np
import pytest
import yaml

import hetrain
from hetrain.core.errors import ConfigError
from tests.conftest import REPO

pytestmark = pytest.mark.e2e  # full training runs


def _raw(demo: Path, name: str, **train) -> dict:
    raw = yaml.safe_load((REPO / "configs" / f"{name}.yaml").read_text())
    folder = "breast_cancer" if name.startswith("breast_cancer") else "digits"
    for owner in raw["data"]["owners"]:
        owner["path"] = str(demo / folder / Path(owner["path"]).name)
    raw["train"].update(train)
    return raw


@pytest.fixture(scope="module")
def bc_untrusted(prefect_harness, demo_data, tmp_path_factory):
    """breast_cancer_untrusted, 30 rounds, through hetrain.train (the Prefect `train` flow)."""
    run_dir = tmp_path_factory.mktemp("bc_untrusted") / "run"
    return hetrain.train(_raw(demo_data, "breast_cancer_untrusted"), run_dir), run_dir


@pytest.mark.slow
def test_an_untrusted_run_trains_breast_cancer_with_one_verified_reveal_per_chunk_and_output(bc_untrusted):
    result, run_dir = bc_untrusted
    # 2 clinics × (train, test) chunks × 24 outputs, each decrypted once; rounds after the first read nothing
    assert result.decryptions == 2 * 2 * 24 and result.policy_refusals == 0
    assert result.policy_mode == "untrusted trainer, verified reveals"
    assert result.rounds[0].decryptions == 96 and result.decryptions_this_run == 96
    assert result.test_accuracy >= 0.94  # median 0.98 over 16 simulated keys (README "Privacy")
    assert [r.decryptions for r in result.rounds[1:]] == [0] * (len(result.rounds) - 1)
    assert not (run_dir / "owners").exists() or not list((run_dir / "owners").rglob("*.npz"))  # no owner plaintext
    summary = result.summary_path.read_text()
    assert "under the key holder's weights (30 → 24, rank 24, never trained)" in summary
    assert "weight gradients" not in summary


@pytest.mark.slow
def test_a_resumed_untrusted_run_reveals_nothing_again(bc_untrusted, prefect_harness, demo_data):
    # Prepare: the finished run, continued for more rounds
    result, run_dir = bc_untrusted
    before = result.decryptions
    # Execute
    more = hetrain.train(_raw(demo_data, "breast_cancer_untrusted", rounds=33), run_dir, resume=True)
    # Assert: rounds 31..33 ran on the kept X·W; the key holder decrypted nothing more
    assert [r.round for r in more.rounds][-3:] == [31, 32, 33]
    assert more.decryptions == before and [r.decryptions for r in more.rounds[-3:]] == [0, 0, 0]
    assert more.test_accuracy >= 0.93


@pytest.mark.slow
def test_an_untrusted_vertical_run_trains_digits(demo_data, tmp_path):
    from hetrain.trainer import PlainRunner, Trainer

    config = tmp_path / "digits.yaml"
    config.write_text(yaml.safe_dump(_raw(demo_data, "digits_vertical_untrusted")))
    result = Trainer(config, tmp_path / "run").run(PlainRunner())
    assert result["final"]["test_accuracy"] >= 0.93  # min 0.949, median 0.953 over 6 simulated keys
    assert result["final"]["decryptions"] == 2 * 48  # one shared chunk per split (vertical), 48 outputs


@pytest.mark.parametrize("change, message", [
    ({"report": {"plaintext_twin": True}}, "forbids report.plaintext_twin: true"),
    ({"policy": {"labels": "encrypted"}}, "needs policy.labels: reveal in this version"),
    ({"key_holder": {"url": "http://127.0.0.1:8765", "token_file": "kh.token"}},
     "runs with the in-process key holder in this version"),
    ({"model_width": 30}, "has out_features=30 >= 30 inputs"),
])
def test_an_untrusted_config_refuses_what_it_cannot_protect(demo_data, change, message):
    raw = _raw(demo_data, "breast_cancer_untrusted")
    for section, values in change.items():
        if section == "model_width":
            raw["model"]["layers"][0]["out_features"] = values
        else:
            raw.setdefault(section, {}).update(values)
    with pytest.raises(ConfigError, match=message):
        hetrain.load_config(raw)


@pytest.mark.slow
def test_the_key_holders_weights_are_what_the_model_reveals_under(bc_untrusted):
    from hetrain.checkpoint import load_checkpoint

    result, run_dir = bc_untrusted
    params = load_checkpoint(result.checkpoint).params
    w = params["hybrid.enc1.W"]
    assert w.shape == (30, 24)
    assert abs(float(np.std(w)) - 1 / np.sqrt(30)) < 0.05  # N(0, 1/d), drawn by the key holder


def test_the_key_holder_service_refuses_an_untrusted_config_with_one_line(capsys, tmp_path):
    from hetrain import cli

    code = cli.main(["key-holder", "serve", str(REPO / "configs" / "breast_cancer_untrusted.yaml"),
                     "--key-dir", str(tmp_path / "kh")])
    assert code == 2
    assert "the key-holder service has no verified-reveal endpoint yet" in capsys.readouterr().err
    assert not (tmp_path / "kh").exists()  # no key was made
