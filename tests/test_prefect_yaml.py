"""The checked-in prefect.yaml: pools, deployments, schedules, concurrency, pull steps and parameters."""

import inspect
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def project() -> dict:
    return yaml.safe_load((REPO / "prefect.yaml").read_text())


def _by_name(project: dict) -> dict:
    return {d["name"]: d for d in project["deployments"]}


def test_prefect_parses_it_with_its_own_deploy_model(project):
    # Prepare
    from prefect.cli.deploy._models import PrefectYamlModel

    # Execute
    model = PrefectYamlModel.model_validate(project)
    # Assert
    assert sorted(d.name for d in model.deployments) == [
        "breast-cancer", "breast-cancer-deployed", "clinic-a", "clinic-b", "digits-vertical"]


def test_train_deployments_are_scheduled_with_a_concurrency_limit_of_one_on_the_local_pool(project):
    # Prepare
    from prefect.client.schemas.schedules import CronSchedule

    deployments = _by_name(project)
    # Execute / Assert
    for name, config in (("breast-cancer", "configs/breast_cancer.yaml"), ("digits-vertical", "configs/digits_vertical.yaml")):
        d = deployments[name]
        assert d["entrypoint"] == "hetrain.train_flow:train"
        assert d["work_pool"]["name"] == "hetrain-local"
        assert d["concurrency_limit"] == {"limit": 1, "collision_strategy": "ENQUEUE"}
        (schedule,) = d["schedules"]
        assert schedule["active"] is True
        CronSchedule(cron=schedule["cron"], timezone=schedule["timezone"])  # a valid cron
        assert d["parameters"]["config_path"] == config and (REPO / config).is_file()
        assert d["parameters"]["retrain"] is True
        assert d["parameters"]["run_dir"].startswith("runs/scheduled/")
    deployed = deployments["breast-cancer-deployed"]
    assert deployed["parameters"]["config_path"] == "configs/breast_cancer_deployed.yaml"
    assert deployed["concurrency_limit"]["limit"] == 1 and "schedules" not in deployed


def test_deployment_parameters_match_the_flows_signatures(project):
    # Prepare
    from hetrain.owner_flow import prepare_owner_bundle
    from hetrain.train_flow import train

    flows = {"hetrain.train_flow:train": train, "hetrain.owner_flow:prepare_owner_bundle": prepare_owner_bundle}
    # Execute / Assert
    for d in project["deployments"]:
        flow = flows[d["entrypoint"]]
        assert set(d["parameters"]) <= set(inspect.signature(flow.fn).parameters), d["name"]
    assert train.name == "train" and prepare_owner_bundle.name == "prepare-owner-bundle"


def test_owner_deployments_run_on_their_own_pools_and_hold_their_table_path(project):
    # Prepare
    from hetrain.configure import load_config

    deployments = _by_name(project)
    cfg, _ = load_config(REPO / "configs" / "breast_cancer_deployed.yaml")
    # Execute / Assert
    for owner in cfg.data.owners:
        flow_name, deployment_name = owner.deployment.split("/")
        d = deployments[deployment_name]
        assert flow_name == "prepare-owner-bundle"
        assert d["work_pool"]["name"] == f"owner-{owner.name.replace('_', '-')}"
        assert d["parameters"] == {"owner": owner.name,
                                   "table_path": f"data/demo/breast_cancer/{owner.name}.csv"}


def test_code_comes_from_the_local_clone_without_remote_storage(project):
    # Execute
    (build,) = project["build"]
    (pull,) = project["pull"]
    # Assert
    assert project["push"] is None
    step = build["prefect.deployments.steps.run_shell_script"]
    assert (step["id"], step["script"]) == ("clone", "pwd")
    assert pull == {"prefect.deployments.steps.set_working_directory": {"directory": "{{ clone.stdout }}"}}
