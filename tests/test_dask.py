"""train.compute: dask: the ciphertext jobs of every round run as `cipher-jobs` Prefect tasks on a
Dask cluster (prefect-dask's DaskTaskRunner over a LocalCluster), bytes in and bytes out."""

import asyncio

import pytest
import yaml

from hetrain.configure import parse_config
from hetrain.core.errors import ConfigError
from tests.conftest import REPO, write_config


def test_dask_address_must_be_a_scheduler_url():
    raw = yaml.safe_load((REPO / "configs" / "breast_cancer.yaml").read_text())
    raw["train"].update({"compute": "dask", "dask_address": "localhost:8786"})
    with pytest.raises(ConfigError, match=r"key 'train.dask_address': String should match pattern"):
        parse_config(raw, "cfg.yaml")
    raw["train"]["compute"] = "spark"
    with pytest.raises(ConfigError, match=r"key 'train.compute': Input should be 'processes' or 'dask'"):
        parse_config(raw, "cfg.yaml")


@pytest.mark.e2e  # a full training run on a Dask cluster
@pytest.mark.slow
def test_training_on_a_local_dask_cluster_runs_cipher_jobs_as_tasks(prefect_harness, demo_data, tmp_path):
    # Prepare: 2 rounds of breast_cancer with the ciphertext jobs on Dask (2 worker processes)
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, TaskRunFilter, TaskRunFilterName

    from hetrain.train_flow import train

    config = write_config(tmp_path, demo_data, rounds=2, compute="dask", workers=2)

    # Execute
    result = train(str(config), str(tmp_path / "run"))

    # Assert: the run trains like the process-pool one, and each round's cipher jobs were task runs
    assert result["final"]["test_accuracy"] >= 0.9
    assert result["final"]["policy_refusals"] == 0

    async def cipher_task_runs():
        async with get_client() as client:
            return await client.read_task_runs(task_run_filter=TaskRunFilter(name=TaskRunFilterName(like_="cipher-jobs")))

    runs = [r for r in asyncio.run(cipher_task_runs()) if r.state and r.state.is_completed()]
    # 8 train batches × (forward + gradient) + 2 test batches, each split in 2 groups, per round
    assert len(runs) >= 2 * (8 * 2 + 2) * 2
