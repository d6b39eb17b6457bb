"""The test suite's own machinery: the xdist GroupScheduling, the tier of a test, the unit guard, the
durations file."""

import json
from types import SimpleNamespace

import pytest

from tests.schedule import DurationRecorder, GroupScheduling, load_durations
from tests.tiers import tier_of, unit_guard

COLLECTION = [
    "tests/test_a.py::t1", "tests/test_a.py::t2",
    "tests/test_cli.py::t1",
    "tests/test_b.py::t1", "tests/test_b.py::t2", "tests/test_b.py::t3",
    "tests/test_flows.py::t1", "tests/test_flows.py::t2",
    "tests/test_c.py::t1",
]
SECONDS = {"tests/test_a.py": 10, "tests/test_b.py": 30, "tests/test_cli.py": 20, "tests/test_flows.py": 15}


class FakeNode:
    """The part of xdist's WorkerController a scheduler may use."""

    def __init__(self, name):
        self.gateway = SimpleNamespace(id=name)
        self.sent: list[list[int]] = []
        self.shutting_down = False

    def send_runtest_some(self, indices):
        assert not self.shutting_down, "work sent after shutdown"
        self.sent.append(list(indices))

    def shutdown(self):
        self.shutting_down = True


def group(module_file: str) -> str:
    return "BC_RUN" if module_file in ("tests/test_cli.py", "tests/test_flows.py") else module_file


def started(n_nodes=2):
    sched = GroupScheduling(n_nodes, group, SECONDS, log=lambda *a: None)
    nodes = [FakeNode(f"gw{i}") for i in range(n_nodes)]
    for node in nodes:
        sched.add_node(node)
    for node in nodes:
        assert not sched.collection_is_completed
        sched.add_node_collection(node, COLLECTION)
    sched.schedule()
    return sched, nodes


def run_all(sched, nodes):
    """Complete tests in turn on each node until nothing is pending; return the nodeids each node ran."""
    ran = {node.gateway.id: [] for node in nodes}
    while sched.has_pending:
        for node in nodes:
            queued = [i for batch in node.sent for i in batch]
            done = len(ran[node.gateway.id])
            if done < len(queued):
                ran[node.gateway.id].append(COLLECTION[queued[done]])
                sched.mark_test_complete(node, queued[done])
    return ran


def test_the_heaviest_unit_goes_first_and_the_grouped_modules_stay_on_one_worker():
    # Prepare / Execute: BC_RUN (cli 20 + flows 15 = 35 s) outweighs test_b (30 s)
    sched, (gw0, gw1) = started()
    ran = run_all(sched, [gw0, gw1])
    # Assert
    assert [COLLECTION[i] for i in gw0.sent[0]] == ["tests/test_cli.py::t1", "tests/test_flows.py::t1",
                                                    "tests/test_flows.py::t2"]
    assert gw1.sent[0] == [3, 4, 5]  # test_b
    assert sorted(ran["gw0"] + ran["gw1"]) == sorted(COLLECTION)  # each test once
    assert not any(m.startswith(("tests/test_cli", "tests/test_flows")) for m in ran["gw1"])
    assert sched.tests_finished and gw0.shutting_down and gw1.shutting_down


def test_a_module_missing_from_the_durations_weighs_the_default_and_ties_keep_collection_order():
    # Prepare
    sched = GroupScheduling(1, group, {}, log=lambda *a: None)
    node = FakeNode("gw0")
    sched.add_node(node)
    sched.add_node_collection(node, COLLECTION)
    # Execute
    sched.schedule()
    ran = run_all(sched, [node])
    # Assert: BC_RUN counts two default modules; the rest one each, in collection order
    assert ran == {"gw0": [COLLECTION[i] for i in (2, 6, 7, 0, 1, 3, 4, 5, 8)]}


def test_a_worker_is_sent_more_only_when_it_holds_fewer_than_two_tests():
    # Prepare
    sched, (gw0, gw1) = started()
    # Execute: gw1 holds test_b's three tests; completing one leaves two
    sched.mark_test_complete(gw1, 3)
    # Assert
    assert gw1.sent == [[3, 4, 5]]
    sched.mark_test_complete(gw1, 4)
    assert len(gw1.sent) == 2


def test_a_crashed_worker_returns_its_crashing_test_and_its_unstarted_tests_run_elsewhere():
    # Prepare: gw0 holds BC_RUN, whose first test is running
    sched, (gw0, gw1) = started()
    # Execute
    crashed = sched.remove_node(gw0)
    ran = run_all(sched, [gw1])
    # Assert
    assert crashed == "tests/test_cli.py::t1"
    assert {"tests/test_flows.py::t1", "tests/test_flows.py::t2"} <= set(ran["gw1"])
    assert crashed not in ran["gw1"] and sched.tests_finished


def test_workers_that_collected_different_tests_are_refused_naming_the_worker():
    # Prepare
    sched = GroupScheduling(2, group, SECONDS, log=lambda *a: None)
    gw0, gw1 = FakeNode("gw0"), FakeNode("gw1")
    sched.add_node(gw0)
    sched.add_node(gw1)
    sched.add_node_collection(gw0, COLLECTION)
    # Execute / Assert
    with pytest.raises(RuntimeError, match=r"worker gw1 collected different tests.*test_c\.py::t1"):
        sched.add_node_collection(gw1, COLLECTION[:-1])


def item(marks=(), fixtures=()):
    return SimpleNamespace(iter_markers=lambda: [SimpleNamespace(name=m) for m in marks], fixturenames=list(fixtures))


@pytest.mark.parametrize("marks, fixtures, tier", [
    ((), ("tmp_path",), "unit"),
    (("slow",), (), "unit"),
    ((), ("ckks_keys",), "integration"),
    ((), ("prefect_harness", "demo_data"), "integration"),
    (("integration",), ("bc_run",), "e2e"),
    (("e2e",), ("ckks_keys",), "e2e"),
    (("integration", "parametrize"), (), "integration"),
])
def test_a_tests_tier_is_the_highest_of_its_marks_and_its_fixtures(marks, fixtures, tier):
    # Execute / Assert
    assert tier_of(item(marks, fixtures)) == tier


def test_the_unit_guard_fails_a_test_that_builds_a_tenseal_context_and_names_the_mark_it_needs():
    # Prepare
    import tenseal

    original = tenseal.context
    # Execute / Assert
    with unit_guard("tests/test_x.py::t"):
        with pytest.raises(pytest.fail.Exception, match=r"tests/test_x.py::t is a unit test but called "
                                                        r"tenseal.context\(\): mark it `pytest.mark.integration`"):
            tenseal.context(tenseal.SCHEME_TYPE.CKKS, 8192, coeff_mod_bit_sizes=[60, 40, 60])
        with pytest.raises(pytest.fail.Exception, match=r"tenseal.context_from\(\)"):
            tenseal.context_from(b"")
    assert tenseal.context is original  # restored after the test


def test_the_unit_guard_fails_a_prefect_flow_run_when_prefect_is_loaded():
    # Prepare
    import prefect

    @prefect.flow
    def hello():
        return 1

    # Execute / Assert: refused before any API is contacted
    with unit_guard("tests/test_x.py::t"):
        with pytest.raises(pytest.fail.Exception, match="tests/test_x.py::t is a unit test but ran a Prefect flow"):
            hello()


def test_recorded_durations_are_summed_per_module_and_merged_into_the_file_after_a_passing_run(tmp_path):
    # Prepare: an earlier figure for a module that does not run this time
    path = tmp_path / "durations.json"
    path.write_text(json.dumps({"tests/test_old.py": 7.0, "tests/test_a.py": 99.0}))
    recorder = DurationRecorder(path)
    # Execute
    reports = [("tests/test_a.py::t1", 1.25), ("tests/test_a.py::t1", 0.5), ("tests/test_b.py::t[x::y]", 2.0)]
    for nodeid, seconds in reports:
        recorder.pytest_runtest_logreport(SimpleNamespace(nodeid=nodeid, duration=seconds))
    recorder.pytest_sessionfinish(session=None, exitstatus=1)
    unchanged = load_durations(path)
    recorder.pytest_sessionfinish(session=None, exitstatus=0)
    # Assert: a failed run writes nothing
    assert unchanged == {"tests/test_old.py": 7.0, "tests/test_a.py": 99.0}
    assert load_durations(path) == {"tests/test_a.py": 1.8, "tests/test_b.py": 2.0, "tests/test_old.py": 7.0}


def test_a_missing_or_broken_durations_file_weighs_nothing(tmp_path):
    # Prepare
    (tmp_path / "bad.json").write_text("{not json")
    # Execute / Assert
    assert load_durations(tmp_path / "missing.json") == {} == load_durations(tmp_path / "bad.json")


def test_the_shipped_durations_name_existing_modules():
    # Prepare
    from tests.schedule import DURATIONS

    # Execute
    seconds = load_durations()
    # Assert
    assert seconds and all(v >= 0 for v in seconds.values())
    assert all((DURATIONS.parent.parent / module).is_file() for module in seconds), sorted(seconds)
