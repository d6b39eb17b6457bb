"""prefect.yaml on a real server: deploy, a process worker, and train/breast-cancer run to Completed."""

import json

import pytest

from tests.prefect_server import REPO, prefect_server


@pytest.mark.slow
def test_breast_cancer_deployment_runs_to_completed_on_a_process_worker(tmp_path):
    # Prepare: the demo tables the deployment's config points at, a server, the pool, the deployments
    from participants.demo_data import write_demo_data

    if not (REPO / "data" / "demo" / "breast_cancer" / "clinic_a.csv").is_file():
        write_demo_data(REPO / "data" / "demo")
    run_dir = tmp_path / "scheduled"
    with prefect_server(tmp_path) as server:
        server.run("prefect", "work-pool", "create", "hetrain-local", "--type", "process")
        server.run("prefect", "--no-prompt", "deploy", "--name", "breast-cancer")
        # Execute: one run, with the run directory moved out of the repository and 2 rounds
        with server.background("prefect", "worker", "start", "--pool", "hetrain-local"):
            out = server.run("prefect", "deployment", "run", "train/breast-cancer", "--watch", "--watch-timeout", "600",
                             "-p", f"run_dir={json.dumps(str(run_dir))}")
    # Assert
    assert "Flow run finished successfully in 'Completed'" in out.stdout
    metrics = json.loads((run_dir / "generations" / "gen-0001" / "metrics.json").read_text())
    assert metrics["final"]["generation"] == 1 and metrics["lineage"]["deployment_id"]
    assert metrics["lineage"]["config_path"] == str(REPO / "configs" / "breast_cancer.yaml")
