"""Test-module scheduling for pytest-xdist: whole groups of modules per worker, longest group first.

`GroupScheduling` implements xdist's public scheduler protocol (`xdist.scheduler.protocol.Scheduling`,
returned from the `pytest_xdist_make_scheduler` hook) on its own; it subclasses no xdist scheduler and
calls only the worker controller's public `send_runtest_some`, `shutdown` and `shutting_down`.

A work unit is a group of test modules: each module is its own group, except the modules named in
`groups` (e.g. those sharing the session fixture `bc_run`), which form one. Units go out heaviest first,
weighed by the seconds per module in tests/durations.json (`DurationRecorder` rewrites that file).
"""

import json
from collections.abc import Callable, Sequence
from pathlib import Path

DURATIONS = Path(__file__).with_name("durations.json")
DEFAULT_SECONDS = 5.0  # a module missing from durations.json
PREFETCH = 2  # tests queued on a worker: the one running and the next (a worker waits to know the next one)


def module_of(nodeid: str) -> str:
    """'tests/test_cli.py::test_x[1]' -> 'tests/test_cli.py'."""
    return nodeid.split("::", 1)[0]


def load_durations(path: Path = DURATIONS) -> dict[str, float]:
    """Seconds per module file; a missing or unreadable file gives {} (every module then weighs the default)."""
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return {str(k): float(v) for k, v in raw.items() if isinstance(v, (int, float))}


class GroupScheduling:
    """One unit (a module, or a named group of modules) at a time per worker, heaviest unit first."""

    def __init__(self, numnodes: int, group_of: Callable[[str], str], seconds: dict[str, float], log) -> None:
        self.numnodes = numnodes
        self._group_of = group_of  # module file -> group name
        self._seconds = seconds
        self._log = log
        self._collections: dict = {}  # node -> its collected nodeids
        self._pending: dict = {}  # node -> [item index, ...] sent and not yet complete, in order
        self._queue: list[list[str]] | None = None  # units not yet sent; None until schedule()

    @property
    def nodes(self) -> list:
        return list(self._pending)

    @property
    def collection_is_completed(self) -> bool:
        return len(self._collections) >= self.numnodes

    @property
    def tests_finished(self) -> bool:
        return (self.collection_is_completed and self._queue is not None and not self._queue
                and all(len(p) < PREFETCH for p in self._pending.values()))

    @property
    def has_pending(self) -> bool:
        return bool(self._queue) or any(self._pending.values())

    def add_node(self, node) -> None:
        assert node not in self._pending, node
        self._pending[node] = []

    def add_node_collection(self, node, collection: Sequence[str]) -> None:
        assert node in self._pending, node
        reference = next(iter(self._collections.values()), None)
        if reference is not None and list(collection) != reference:
            missing = sorted(set(reference) ^ set(collection))[:5]
            raise RuntimeError(f"worker {node.gateway.id} collected different tests than the others "
                               f"(first differences: {missing}); test collection must be deterministic")
        self._collections[node] = list(collection)

    def schedule(self) -> None:
        assert self.collection_is_completed
        if self._queue is None:
            self._queue = self._units(next(iter(self._collections.values())))
            self._log(f"{len(self._queue)} units, heaviest first: {[self._unit_name(u) for u in self._queue[:5]]}")
        for node in self.nodes:
            self._refill(node)

    def mark_test_complete(self, node, item_index: int, duration: float = 0) -> None:
        self._pending[node].remove(item_index)
        self._refill(node)

    def remove_node(self, node):
        """A worker left: at shutdown nothing is pending; after a crash its unsent tests go back first."""
        pending = self._pending.pop(node)
        if not pending or self._queue is None:
            return None
        collection = self._collections[node]
        crashed, rest = collection[pending[0]], [collection[i] for i in pending[1:]]
        if rest:
            self._queue.insert(0, rest)
        for other in self.nodes:
            self._refill(other)
        return crashed

    def mark_test_pending(self, item: str) -> None:
        raise NotImplementedError("GroupScheduling does not re-run tests")

    def remove_pending_tests_from_node(self, node, indices: Sequence[int]) -> None:
        raise NotImplementedError("GroupScheduling never steals tests")

    def _units(self, collection: list[str]) -> list[list[str]]:
        units: dict[str, list[str]] = {}
        for nodeid in collection:
            units.setdefault(self._group_of(module_of(nodeid)), []).append(nodeid)
        return sorted(units.values(), key=self._weight, reverse=True)  # stable: ties keep collection order

    def _weight(self, unit: list[str]) -> float:
        return sum(self._seconds.get(m, DEFAULT_SECONDS) for m in dict.fromkeys(map(module_of, unit)))

    def _unit_name(self, unit: list[str]) -> str:
        return self._group_of(module_of(unit[0]))

    def _refill(self, node) -> None:
        if node.shutting_down or self._queue is None:
            return
        while len(self._pending[node]) < PREFETCH and self._queue:
            unit = self._queue.pop(0)
            index = {nodeid: i for i, nodeid in enumerate(self._collections[node])}
            indices = [index[nodeid] for nodeid in unit]
            self._pending[node].extend(indices)
            node.send_runtest_some(indices)
        if not self._queue:
            node.shutdown()  # the worker runs what it holds, then stops


class DurationRecorder:
    """Plugin for the controlling process: sums each module's setup, call and teardown seconds and, at the
    end of a passing session, merges them into tests/durations.json (modules that did not run keep theirs)."""

    def __init__(self, path: Path = DURATIONS) -> None:
        self.path = path
        self.seconds: dict[str, float] = {}

    def pytest_runtest_logreport(self, report) -> None:
        module = module_of(report.nodeid)
        self.seconds[module] = self.seconds.get(module, 0.0) + report.duration

    def pytest_sessionfinish(self, session, exitstatus) -> None:
        if exitstatus != 0 or not self.seconds:
            return  # a failed or interrupted run may have stopped part-way through a module
        merged = load_durations(self.path) | {m: round(s, 1) for m, s in self.seconds.items()}
        self.path.write_text(json.dumps(dict(sorted(merged.items())), indent=1) + "\n")
