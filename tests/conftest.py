"""Shared fixtures: one Prefect test harness per session, under a temporary PREFECT_HOME."""

import os
import tempfile
from pathlib import Path

import pytest
import yaml

_PREFECT_HOME = tempfile.mkdtemp(prefix="hetrain-prefect-home-")
os.environ["PREFECT_HOME"] = _PREFECT_HOME
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_LOGGING_LEVEL", "CRITICAL")
os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "WARNING")

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def prefect_harness():
    """A throwaway Prefect API for every test that runs flows (started once: it takes seconds)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory) -> Path:
    """The bundled demo tables, written once per session."""
    from participants.demo_data import write_demo_data

    out = tmp_path_factory.mktemp("demo")
    write_demo_data(out)
    return out


@pytest.fixture(scope="session")
def ckks_keys(tmp_path_factory):
    """A key holder with the default parameters and a permissive demo policy, plus its public context."""
    from mpc_ops import ckks
    from mpc_ops.config import PolicyConfig
    from mpc_ops.params import CkksParams
    from mpc_ops.policy import LayerShape
    from participants.key_holder import KeyHolder

    policy = PolicyConfig(cipher_layers=["enc1"], reveals={"enc1": {}}, min_batch=32)
    holder = KeyHolder.open_or_create(tmp_path_factory.mktemp("kh") / "key_holder", CkksParams(), policy,
                                      {"enc1": LayerShape(64, 8)})
    public = ckks.load_public_context(holder.public_context(), expected_key_id=holder.key_id)
    return holder, public


def write_config(tmp_path: Path, demo: Path, name: str = "breast_cancer", **train) -> Path:
    """A copy of a shipped config pointing at the session's demo tables, with train overrides."""
    raw = yaml.safe_load((REPO / "configs" / f"{name}.yaml").read_text())
    folder = "breast_cancer" if name == "breast_cancer" else "digits"
    for owner in raw["data"]["owners"]:
        owner["path"] = str(demo / folder / Path(owner["path"]).name)
    raw["train"].update(train)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture(scope="session")
def bc_run(prefect_harness, demo_data, tmp_path_factory):
    """One breast_cancer run of 4 rounds, shared by the assertions of several modules (never modified:
    tests that change a run copy it first)."""
    from flows.train_flow import train

    tmp = tmp_path_factory.mktemp("bc")
    config = write_config(tmp, demo_data, rounds=4)
    result = train(str(config), str(tmp / "run"))
    return tmp / "run", result
