"""Owners given by deployment: the trainer triggers each owner's own deployment with the exchange and
public-context locations only, waits for it, and reads the bundle it published."""

from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent


def deployed_config(tmp_path: Path, **train) -> Path:
    raw = yaml.safe_load((REPO / "configs" / "breast_cancer_deployed.yaml").read_text())
    raw["train"].update(train)
    path = tmp_path / "breast_cancer_deployed.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def fake_deployments(monkeypatch, tables: dict[str, dict]) -> list:
    """Stand in for the owners' workers: run_deployment runs the owner's flow here, with the
    deployment's own parameters (owner, table_path) merged under the trainer's, as Prefect does."""
    from hetrain import owner_flow

    calls = []

    def run_deployment(name, parameters, timeout):
        calls.append((name, parameters, timeout))
        state = owner_flow.prepare_owner_bundle(**tables[name], **parameters, return_state=True)
        return SimpleNamespace(id=state.state_details.flow_run_id)

    monkeypatch.setattr(owner_flow, "run_deployment", run_deployment)
    return calls


@pytest.mark.e2e  # a full training run
def test_training_with_deployed_owners_passes_no_raw_path_and_uses_their_bundles(prefect_harness, demo_data,
                                                                                tmp_path, monkeypatch):
    # Prepare
    from hetrain.train_flow import train

    config = deployed_config(tmp_path, rounds=1)
    tables = {f"prepare-owner-bundle/clinic-{c}": {"owner": f"clinic_{c}",
                                                   "table_path": str(demo_data / "breast_cancer" / f"clinic_{c}.csv")}
              for c in "ab"}
    calls = fake_deployments(monkeypatch, tables)
    run_dir = tmp_path / "run"
    # Execute
    result = train(str(config), str(run_dir))
    # Assert: each deployment triggered once without waiting (timeout=0), with locations only
    assert [name for name, _, _ in calls] == sorted(tables)
    for _, parameters, timeout in calls:
        assert timeout == 0
        assert sorted(parameters) == ["config", "exchange_dir", "public_context"]
        assert parameters["exchange_dir"] == str(run_dir / "exchange")
        assert parameters["public_context"] == str(run_dir / "exchange" / "public_context.bin")
        assert ".csv" not in repr(parameters)
    assert result["final"]["test_accuracy"] >= 0.9
    assert result["final"]["plaintext_twin_test_accuracy"] is None
    assert not (run_dir / "owners").exists()
    assert set(result["lineage"]["manifest_sha256"]) == {"clinic_a", "clinic_b"}
    summary = (run_dir / "summary.md").read_text()
    assert "| clinic_a | 9 |" in summary and "| clinic_b | 9 |" in summary


def test_a_failed_owner_deployment_names_the_owner_and_its_state(prefect_harness, demo_data, tmp_path, monkeypatch):
    # Prepare: clinic_b's deployment points at a table that lacks a declared column
    import pandas as pd

    from hetrain.owner_flow import prepare_deployed_owners
    from hetrain.runtime import Runtime
    from hetrain.core.errors import OwnerDeploymentError

    bad = tmp_path / "clinic_b.csv"
    pd.read_csv(demo_data / "breast_cancer" / "clinic_b.csv").drop(columns=["mean_area"]).to_csv(bad, index=False)
    fake_deployments(monkeypatch, {
        "prepare-owner-bundle/clinic-a": {"owner": "clinic_a", "table_path": str(demo_data / "breast_cancer" / "clinic_a.csv")},
        "prepare-owner-bundle/clinic-b": {"owner": "clinic_b", "table_path": str(bad)}})
    rt = Runtime(deployed_config(tmp_path), tmp_path / "run")
    rt.publish_public_context()
    # Execute
    with pytest.raises(OwnerDeploymentError) as exc_info:
        prepare_deployed_owners(rt)
    # Assert
    message = str(exc_info.value)
    assert "owner 'clinic_b': deployment 'prepare-owner-bundle/clinic-b' ended Failed" in message
    assert "mean_area" in message and "no bundle was published" in message


def test_a_missing_owner_deployment_says_to_deploy(prefect_harness, tmp_path):
    # Prepare: the harness's server has no deployments at all
    from hetrain.owner_flow import prepare_deployed_owners
    from hetrain.runtime import Runtime
    from hetrain.core.errors import OwnerDeploymentError

    rt = Runtime(deployed_config(tmp_path), tmp_path / "run")
    # Execute / Assert
    with pytest.raises(OwnerDeploymentError, match=r"owner 'clinic_a': deployment 'prepare-owner-bundle/clinic-a' "
                                                    r"does not exist on the Prefect server; run `prefect deploy --all`"):
        prepare_deployed_owners(rt)
