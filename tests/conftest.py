"""Shared fixtures, test tiers and the xdist schedule.

Each test has a tier (tests/tiers.py): `unit` (the default: no TenSEAL contexts, no Prefect),
`integration` (TenSEAL keys or Prefect, no full training run) or `e2e` (full training runs, `hetrain`
subprocesses, servers). The collection hook below derives it from the test's `integration`/`e2e` marks
and the fixtures it uses (tiers.FIXTURE_TIERS: `prefect_harness`, `ckks_keys`: integration; `bc_run`:
e2e), and adds it as a mark, so `-m unit` selects the unit tier (`make test-unit`). Unit tests run under
a guard that fails them if they build a TenSEAL context or run Prefect, so a mislabelled test is caught
rather than slowing the tier.

`make test` runs the suite on two pytest-xdist workers (`-n 2 --dist loadfile`, see pyproject.toml).
Each worker is its own session: it imports this file, so it gets its own PREFECT_HOME and its own
harness. For `--dist loadfile` the `pytest_xdist_make_scheduler` hook returns tests/schedule.py's
GroupScheduling, which implements xdist's public scheduler protocol itself (no xdist class is subclassed,
no private method overridden). It sends one module at a time to a worker (module fixtures run once),
keeps the BC_RUN_MODULES together as one unit (they share `bc_run`, whose 4-round run is then trained
once), and sends the longest unit first, by the seconds per module in tests/durations.json, so the two
workers finish together. `make test-durations` (`pytest --store-durations`) rewrites that file from a
full run. Why not the alternatives: xdist's own `--dist loadgroup` with `xdist_group` marks does not work
with pytest 9.2.0 and pytest-xdist 3.8.0 (the newest): xdist tags the group onto `item._nodeid`, which
pytest 9 no longer reads (`Node.nodeid` is `_id`), so every test would be its own unit. A file-locked,
disk-cached `bc_run` would make plain `loadfile` enough, but the second worker would sit idle waiting
for the first one's training, and the run's files would live in that worker's temporary directory.
"""

import os
import tempfile
import warnings
from pathlib import Path

import pytest
import yaml

from tests.schedule import DurationRecorder, GroupScheduling, load_durations
from tests.tiers import tier_of, unit_guard

_PREFECT_HOME = tempfile.mkdtemp(prefix="hetrain-prefect-home-")
os.environ["PREFECT_HOME"] = _PREFECT_HOME
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_LOGGING_LEVEL", "CRITICAL")
os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "WARNING")

REPO = Path(__file__).resolve().parent.parent

BC_RUN_MODULES = {"test_cli", "test_flows", "test_retrain"}  # one xdist unit, so `bc_run` is trained once


def _group(module_file: str) -> str:
    stem = Path(module_file).stem
    return "BC_RUN" if stem in BC_RUN_MODULES else module_file


def pytest_addoption(parser):
    parser.addoption("--store-durations", action="store_true",
                     help="write each module's seconds to tests/durations.json (the xdist schedule reads it); "
                          "whole modules only, so not with -m or -k")


def pytest_configure(config):
    if not config.getoption("store_durations") or hasattr(config, "workerinput"):
        return  # workers send their reports to the controller, which records them
    if config.getoption("markexpr") or config.getoption("keyword") or any("::" in arg for arg in config.args):
        raise pytest.UsageError("--store-durations records whole modules: run it without -m, -k or test ids")
    config.pluginmanager.register(DurationRecorder(), "hetrain-durations")


@pytest.hookimpl(tryfirst=True)  # before the -m deselection, which reads the tier marks added here
def pytest_collection_modifyitems(config, items):
    """Mark each test with its tier; warn when a module using `bc_run` is not in BC_RUN_MODULES."""
    for item in items:
        item.add_marker(tier_of(item))
    unlisted = {item.module.__name__ for item in items if "bc_run" in getattr(item, "fixturenames", ())} - BC_RUN_MODULES
    if unlisted:
        warnings.warn(pytest.PytestWarning(f"add {sorted(unlisted)} to BC_RUN_MODULES in tests/conftest.py, "
                                           "or each xdist worker trains bc_run once"))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """Run unit tests (setup, call and teardown) under tests/tiers.py's unit_guard."""
    if item.get_closest_marker("unit") is None:
        return (yield)
    with unit_guard(item.nodeid):
        return (yield)


def pytest_xdist_make_scheduler(config, log):
    """`--dist loadfile` as GroupScheduling: whole modules, the BC_RUN_MODULES as one unit, longest first."""
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.workermanage import parse_tx_spec_config

    return GroupScheduling(len(parse_tx_spec_config(config)), _group, load_durations(), log)


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
    from hetrain.core.params import CkksParams
    from hetrain.core.shapes import LinearShape
    from hetrain.participants.key_holder import KeyHolder

    policy = PolicyConfig(cipher_layers=["enc1"], reveals={"enc1": {}}, min_batch=32)
    holder = KeyHolder.open_or_create(tmp_path_factory.mktemp("kh") / "key_holder", CkksParams(), policy,
                                      {"enc1": LinearShape(64, 8)})
    public = ckks.load_public_context(holder.public_context(), expected_key_id=holder.key_id)
    return holder, public


def write_config(tmp_path: Path, demo: Path, name: str = "breast_cancer", **train) -> Path:
    """A copy of a shipped config pointing at the session's demo tables, with train overrides and the
    plaintext twin on (the shipped configs leave it off)."""
    raw = yaml.safe_load((REPO / "configs" / f"{name}.yaml").read_text())
    folder = "breast_cancer" if name == "breast_cancer" else "digits"
    for owner in raw["data"]["owners"]:
        owner["path"] = str(demo / folder / Path(owner["path"]).name)
    raw["train"].update(train)
    raw.setdefault("report", {})["plaintext_twin"] = True  # tests compare the encrypted run with its twin
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
