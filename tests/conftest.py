"""Shared fixtures: one Prefect test harness per session, under a temporary PREFECT_HOME.

`make test` runs the suite on two pytest-xdist workers (`-n 2 --dist loadfile`, see pyproject.toml).
Each worker is its own session: it imports this file, so it gets its own PREFECT_HOME and its own
harness. The hooks below keep every module on one worker (module fixtures run once), keep the
modules that share `bc_run` together (the 4-round run is trained once), and send the longest
modules first so the two workers finish together.
"""

import os
import tempfile
import warnings
from pathlib import Path

import pytest
import yaml

_PREFECT_HOME = tempfile.mkdtemp(prefix="hetrain-prefect-home-")
os.environ["PREFECT_HOME"] = _PREFECT_HOME
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_LOGGING_LEVEL", "CRITICAL")
os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "WARNING")

REPO = Path(__file__).resolve().parent.parent

# Test modules, longest first (seconds per module with `-n 2` on 2 cores; the rest take under ~15 s
# each and follow in their usual order). The modules using `bc_run` are one unit, BC_RUN.
LONGEST_FIRST = [
    "test_policy_runs",           # ~220 s
    "BC_RUN",                     # ~210 s
    "test_faults",                # ~150 s
    "test_operations_e2e",        # ~110 s
    "test_bench",                 # ~105 s
    "test_strict_flooding",       # ~80 s
    "test_bench_hostile",         # ~80 s
    "test_key_holder_service",    # ~75 s
    "test_exchange_url",          # ~60 s
    "test_dask",                  # ~45 s
    "test_key_holder",            # ~35 s
    "test_tiled_net",             # ~35 s
    "test_serve",                 # ~30 s
    "test_hostile_inputs",        # ~20 s
    "test_reveal_ledger",         # ~15 s
    "test_tutorial_lr",           # ~15 s
]
BC_RUN_MODULES = {"test_cli", "test_flows", "test_retrain", "test_trainer"}  # run on one worker, so `bc_run` is trained once


def _group(module: str) -> str:
    return "BC_RUN" if module in BC_RUN_MODULES else module


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """Put the longest modules first (each worker collects, and the scheduler keeps this order)."""
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(_group(item.module.__name__), len(rank)))  # stable
    unlisted = {item.module.__name__ for item in items if "bc_run" in getattr(item, "fixturenames", ())} - BC_RUN_MODULES
    if unlisted:
        warnings.warn(pytest.PytestWarning(f"add {sorted(unlisted)} to BC_RUN_MODULES in tests/conftest.py, "
                                           "or each xdist worker trains bc_run once"))


def pytest_xdist_make_scheduler(config, log):
    """`--dist loadfile`, with the BC_RUN_MODULES as one unit (xdist_group marks are not honoured with
    pytest 9.2: xdist tags them onto item._nodeid, which pytest no longer reads)."""
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class ModuleGroups(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return _group(Path(nodeid.split("::", 1)[0]).stem)

    return ModuleGroups(config, log)


@pytest.fixture(scope="session")
def prefect_harness():
    """A throwaway Prefect API for every test that runs flows (started once: it takes seconds)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory) -> Path:
    """The bundled demo tables, written once per session."""
    from hetrain.participants.demo_data import write_demo_data

    out = tmp_path_factory.mktemp("demo")
    write_demo_data(out)
    return out


@pytest.fixture(scope="session")
def ckks_keys(tmp_path_factory):
    """A key holder with the default parameters and a permissive demo policy, plus its public context."""
    from hetrain.mpc_ops.crypto import ckks
    from hetrain.core.config import PolicyConfig
    from hetrain.mpc_ops.crypto.params import CkksParams
    from hetrain.mpc_ops.reveal.policy import LayerShape
    from hetrain.participants.key_holder import KeyHolder

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
    from hetrain.train_flow import train

    tmp = tmp_path_factory.mktemp("bc")
    config = write_config(tmp, demo_data, rounds=4)
    result = train(str(config), str(tmp / "run"))
    return tmp / "run", result
