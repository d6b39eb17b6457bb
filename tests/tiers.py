"""Test tiers, derived per test at collection, and the guard that keeps the unit tier cheap.

- unit (the default): no TenSEAL context or keys, no Prefect (no harness, no flow or task runs).
- integration: TenSEAL keys/contexts or Prefect, but no full training run.
- e2e: full training runs, `hetrain` subprocesses, servers.

A test's tier is the highest of its explicit `integration`/`e2e` marks (on the test, its class or the
module's `pytestmark`) and the tiers of the fixtures it uses, directly or through other fixtures
(FIXTURE_TIERS). A unit test runs under `unit_guard`: building or loading a TenSEAL context, or running a
Prefect flow, task or test harness, fails it with a message naming the mark it needs.
"""

import sys
from contextlib import contextmanager

import pytest

TIERS = ("unit", "integration", "e2e")
FIXTURE_TIERS = {
    "prefect_harness": "integration",  # a Prefect API
    "ckks_keys": "integration",  # a key holder's keys
    "s3_endpoint": "integration",  # moto's S3 server (test_exchange_url)
    "bc_run": "e2e",  # a 4-round training run
}


def tier_of(item: pytest.Item) -> str:
    """The item's tier: the highest of its marks and of the fixtures it requests."""
    levels = [TIERS.index(mark.name) for mark in item.iter_markers() if mark.name in TIERS]
    levels += [TIERS.index(tier) for name, tier in FIXTURE_TIERS.items() if name in getattr(item, "fixturenames", ())]
    return TIERS[max(levels, default=0)]


def _refuse(nodeid: str, what: str, tier: str):
    def refuse(*args, **kwargs):
        pytest.fail(f"{nodeid} is a unit test but {what}: mark it `pytest.mark.{tier}` "
                    f"(the unit tier makes no TenSEAL contexts and runs no Prefect; see tests/tiers.py)",
                    pytrace=False)
    return refuse


@contextmanager
def unit_guard(nodeid: str):
    """While a unit test runs (setup, call, teardown), TenSEAL contexts and Prefect runs fail it."""
    import tenseal

    with pytest.MonkeyPatch.context() as patch:
        for name in ("context", "context_from"):
            patch.setattr(tenseal, name, _refuse(nodeid, f"called tenseal.{name}()", "integration"))
        # Prefect is imported by the modules under test, if at all; a unit test that has not imported it
        # cannot run a flow, so it is not imported here (that costs a second).
        if (flows := sys.modules.get("prefect.flows")) is not None:
            patch.setattr(flows.Flow, "__call__", _refuse(nodeid, "ran a Prefect flow", "integration"))
        if (tasks := sys.modules.get("prefect.tasks")) is not None:
            patch.setattr(tasks.Task, "__call__", _refuse(nodeid, "ran a Prefect task", "integration"))
        if (testing := sys.modules.get("prefect.testing.utilities")) is not None:
            patch.setattr(testing, "prefect_test_harness", _refuse(nodeid, "started a Prefect harness", "integration"))
        yield
