"""Hostile inputs never crash a role: a catalogue of named bad inputs plus random mutations, each
fed to the loader that would see it in production, in a child process.

A child that dies by a signal (a segfault, an abort) counts as a crash, never as a rejection. A case
is rejected cleanly when the loader raised a HetrainError subclass with a non-empty message, the
child did not crash or hang, and no pre-existing file of the setup changed. Children are forked
from a forkserver that has already imported TenSEAL and hetrain, so each costs milliseconds; every
named case runs in its own child, the random mutations in batches of BATCH per child.
"""

import multiprocessing
import resource
import shutil
import signal
import sys
import time
import traceback
from pathlib import Path

from hetrain.core.errors import HetrainError

from hetrain.bench.harness import hostile_fuzz
from hetrain.bench.harness.hostile_catalogue import CASES
from hetrain.bench.harness.hostile_setup import Setup, build_setup

BATCH = 50  # random mutations per child process
CASE_TIMEOUT = 180.0  # seconds per case or mutation; the isolated context loader alone may take 120
CHILD_MEMORY = 4 << 30  # soft address-space limit of a case's process; an allocation bomb fails there


def _outcome(run) -> dict:
    """Run one case; classify what the loader did (in the child)."""
    started = time.perf_counter()
    try:
        verdict = run()
    except HetrainError as exc:
        result = {"outcome": "rejected", "rejected_with": type(exc).__name__, "message": str(exc)[:300]}
    except BaseException as exc:  # the very thing this benchmark hunts for: report it, do not hide it
        tail = traceback.format_exc(limit=-2).strip().splitlines()[-3:]
        result = {"outcome": "uncaught", "rejected_with": None, "message": f"{type(exc).__name__}: {exc}"[:300],
                  "where": tail}
    else:
        result = {"outcome": verdict or "accepted", "rejected_with": None, "message": ""}
    return {**result, "seconds": round(time.perf_counter() - started, 3)}


def _child(setup_file: str, scratch: str, jobs: list[tuple[str, object]], conn) -> None:
    """Run jobs (("case", name) or ("fuzz", spec)) one by one, reporting each on `conn`."""
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (CHILD_MEMORY, hard))  # the soft limit only: probes set their own
    setup = Setup.load(Path(setup_file))
    for index, (kind, item) in enumerate(jobs):
        conn.send(("start", index))
        folder = Path(scratch) / f"{index:04d}"
        folder.mkdir(parents=True)
        if kind == "case":
            result = _outcome(lambda: CASES[item][1](setup, folder))
        else:
            result = _outcome(lambda: hostile_fuzz.run_spec(setup, folder, item))
        shutil.rmtree(folder, ignore_errors=True)
        conn.send(("done", index, result))
    conn.close()


def _snapshot(root: Path) -> dict[str, tuple[int, int, int]]:
    """(size, mtime_ns, inode) of every file under root: a write, a replace or a delete changes it."""
    return {str(p.relative_to(root)): (st.st_size, st.st_mtime_ns, st.st_ino)
            for p in sorted(root.rglob("*")) if p.is_file() and (st := p.stat())}


def _run_jobs(context, setup_file: Path, scratch: Path, jobs: list, setup_root: Path) -> list[dict]:
    """Run jobs in as many children as it takes: a child that crashes or hangs is replaced, and its
    current job is reported as a crash or a hang; returns one result per job."""
    results: list[dict] = []
    while len(results) < len(jobs):
        start, before = len(results), _snapshot(setup_root)
        parent, child = context.Pipe(duplex=False)
        process = context.Process(target=_child, args=(str(setup_file), str(scratch / f"c{start:04d}"),
                                                       jobs[start:], child))
        process.start()
        child.close()
        current, deadline, timed_out = None, time.monotonic() + CASE_TIMEOUT, False
        while True:
            if parent.poll(0.05):
                try:
                    message = parent.recv()
                except EOFError:
                    break
                if message[0] == "start":
                    current, deadline = start + message[1], time.monotonic() + CASE_TIMEOUT
                else:
                    results.append(message[2])
                    current = None
            elif not process.is_alive() and not parent.poll(0):
                break
            elif time.monotonic() > deadline:
                process.kill()
                timed_out = True
                break
        process.join()
        if current is not None or len(results) == start:  # the child died or hung inside a job
            code = process.exitcode or 0
            if timed_out:
                failure = {"outcome": "hang", "signal": 0, "message": f"no answer within {CASE_TIMEOUT:g} s"}
            elif code < 0:
                failure = {"outcome": "crash", "signal": -code, "message": f"killed by {signal.Signals(-code).name}"}
            else:
                failure = {"outcome": "crash", "signal": 0, "message": f"child exited with code {code}"}
            results.append({"rejected_with": None, **failure})
        if _snapshot(setup_root) != before:  # attribute a change to every job of this child
            for result in results[start:]:
                result["modified_setup"] = True
    return results


def _forkserver():
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["hetrain.bench.harness.hostile_catalogue", "hetrain.bench.harness.hostile_fuzz"])
    return context


def run_bad_inputs(workdir: Path, fuzz_examples: int = 200, seed: int = 0) -> dict:
    """Build a small real setup in `workdir`, feed it every named bad input and `fuzz_examples` random
    mutations, and count how many were rejected cleanly (see the module docstring)."""
    workdir = Path(workdir)
    started = time.perf_counter()
    setup = build_setup(workdir)
    setup_root, setup_file, scratch = Path(setup.root), Path(setup.root) / "setup.json", workdir / "scratch"
    context = _forkserver()
    cases = []
    for name, (loader, _) in CASES.items():  # one child per named case
        (result,) = _run_jobs(context, setup_file, scratch, [("case", name)], setup_root)
        cases.append({"name": name, "loader": loader, **result})
    specs = hostile_fuzz.make_specs(fuzz_examples, seed)
    for first in range(0, len(specs), BATCH):
        batch = specs[first:first + BATCH]
        results = _run_jobs(context, setup_file, scratch, [("fuzz", s) for s in batch], setup_root)
        cases += [{"name": f"fuzz_{first + i:04d}_{spec['kind']}", "loader": hostile_fuzz.loader_of(spec),
                   "spec": spec, **r} for i, (spec, r) in enumerate(zip(batch, results))]
    shutil.rmtree(scratch, ignore_errors=True)
    for case in cases:
        case["clean"] = (case["outcome"] == "rejected" and bool(case["message"])
                         and not case.get("modified_setup", False))
    tried = [c for c in cases if c["outcome"] != "equivalent"]  # an edit with no effect is no bad input
    return {
        "bad_inputs_tried": len(tried),
        "bad_inputs_rejected_cleanly": sum(c["clean"] for c in tried),
        "distinct_bad_inputs": len(CASES),
        "segfaults": sum(c["outcome"] == "crash" and c.get("signal", 0) > 0 for c in cases),
        "equivalent_mutations": len(cases) - len(tried),
        "seconds": round(time.perf_counter() - started, 1),
        "cases": cases,
    }


def main(argv: list[str]) -> int:
    """python -m hetrain.bench.harness.hostile WORKDIR [FUZZ_EXAMPLES]: print the summary and any unclean case."""
    report = run_bad_inputs(Path(argv[0]), int(argv[1]) if len(argv) > 1 else 200)
    for case in report["cases"]:
        if not case["clean"] and case["outcome"] != "equivalent":
            print(f"NOT CLEAN {case['name']} [{case['loader']}]: {case['outcome']} {case['message']}")
    print({k: v for k, v in report.items() if k != "cases"})
    return 0 if report["bad_inputs_rejected_cleanly"] == report["bad_inputs_tried"] else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
