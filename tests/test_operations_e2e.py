"""The operations issue end to end: a real Prefect server, prefect.yaml deployed, a process worker for the
trainer's pool and one per data owner's pool, the key holder as its own service, and
train/breast-cancer-deployed run through the Prefect API, then retrained by the scheduler after one
owner's table changed.

What it checks (see each block's comment):
- the run's artifacts (metrics table, progress, summary with the lineage table), read back through the client;
- every TenSEAL context a trainer or owner process loaded was public; only the key-holder service loaded a
  private one (mpc_ops/context_record.py records each load when HETRAIN_CONTEXT_RECORD_DIR is set);
- the key-holder directory is given to no process but the service (what we passed, plus /proc/<pid>/cmdline
  and /proc/<pid>/environ of every worker, server and flow-run process seen while the runs went on), and the
  trainer's run directory holds no key_holder/ folder;
- each owner's CSV path is in that owner's deployment's parameters only;
- train/breast-cancer's cron schedule is on the deployment; a schedule added with a near-future anchor makes
  the scheduler create a run that the trainer's worker picks up and runs to Completed;
- that scheduled retrain re-encrypts only the owner whose table changed, and `hetrain lineage` shows its parent;
- one quick bad-token request to the service (the full 4xx matrix is tests/test_key_holder_service.py).

The fast unit tests of the recording hook are at the bottom (not slow-marked).
"""

import contextlib
import datetime
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pandas as pd
import pytest
import yaml

from hetrain.mpc_ops.crypto.context_record import RECORD_DIR_ENV, ROLE_ENV, read_records
from tests.prefect_server import (
    BIN,
    REPO,
    PrefectServer,
    _stop,
    free_port,
    wait_healthy,
)

TRAIN = "train/breast-cancer-deployed"
OWNERS = {"clinic_a": "prepare-owner-bundle/clinic-a", "clinic_b": "prepare-owner-bundle/clinic-b"}
ROUNDS = 2
FAST = {  # a short scheduler loop and worker poll, so a scheduled run fires and is picked up within seconds
    "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "1",
    "PREFECT_WORKER_QUERY_SECONDS": "1",
    "PREFECT_WORKER_PREFETCH_SECONDS": "5",
    "PREFECT_SERVER_LOGGING_LEVEL": "WARNING",
}


class _Server(PrefectServer):
    extra: dict | None = None

    @property
    def env(self) -> dict:
        return {**super().env, **FAST, **(self.extra or {})}


@contextlib.contextmanager
def _prefect_server(tmp_path: Path, record_dir: Path):
    """tests.prefect_server.prefect_server with the FAST settings (and the context record) in every environment."""
    home, logs = tmp_path / "prefect-home", tmp_path / "logs"
    home.mkdir(parents=True), logs.mkdir(parents=True)
    port = free_port()
    server = _Server(url=f"http://127.0.0.1:{port}/api", home=home, logs=logs)
    server.extra = {RECORD_DIR_ENV: str(record_dir), ROLE_ENV: "prefect-server"}
    with open(logs / "server.log", "w") as sink:
        proc = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                                cwd=REPO, env=server.env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_healthy(server.url, proc, 120)
            yield server, proc
        finally:
            _stop(proc)


class _Processes:
    """Every long-lived process the test starts, with what it was given; stopped (process group) on exit."""

    def __init__(self, logs: Path):
        self.logs, self.started = logs, {}  # role -> (Popen, argv, env we passed)

    def start(self, role: str, argv: list[str], env: dict) -> subprocess.Popen:
        with open(self.logs / f"{role}.log", "w") as sink:
            proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=sink, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        self.started[role] = (proc, argv, env)
        return proc

    def stop_all(self) -> None:
        """Stop all at once (each one's SIGINT → SIGTERM → SIGKILL runs in its own thread), then wait."""
        threads = [threading.Thread(target=_stop, args=(proc,), kwargs={"grace": 10})
                   for proc, _, _ in self.started.values()]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for proc, _, _ in self.started.values():
            assert proc.poll() is not None


def _proc_read(pid: int, name: str) -> str:
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/{name}").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    return ""


class _ProcScanner(threading.Thread):
    """Samples /proc every 0.2 s: cmdline and environ of each root process and all its descendants."""

    def __init__(self, roots: dict[str, int]):
        super().__init__(daemon=True)
        self.roots, self.seen, self.halt = roots, {}, threading.Event()  # seen: pid -> (root role, cmdline, environ)

    def _parents(self) -> dict[int, int]:
        out = {}
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                stat = _proc_read(int(entry), "stat")
                if stat:
                    out[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
        return out

    def sample(self) -> None:
        parents = self._parents()
        for pid in parents:
            p, chain = pid, []
            while p in parents and p not in self.roots.values() and p > 1:
                chain.append(p)
                p = parents[p]
            role = next((r for r, root in self.roots.items() if root == p), None)
            if role is not None and pid not in self.seen:
                cmdline, environ = _proc_read(pid, "cmdline"), _proc_read(pid, "environ")
                if cmdline:
                    self.seen[pid] = (role, cmdline, environ)

    def run(self) -> None:
        while not self.halt.wait(0.25):
            with contextlib.suppress(Exception):
                self.sample()


_T0: list[float] = []


def _mark(what: str) -> None:
    """Stage timings on stderr (shown with -s or on failure)."""
    _T0[:] = [time.monotonic()] if what == "start" or not _T0 else _T0
    print(f"[{time.monotonic() - _T0[0]:6.1f} s] {what}", file=sys.stderr)


def _wait_run(client, run_id, timeout: float):
    deadline = time.monotonic() + timeout
    while True:
        run = client.read_flow_run(run_id)
        if run.state is not None and run.state.is_final():
            return run
        assert time.monotonic() < deadline, f"flow run {run_id} still {run.state.name if run.state else None}"
        time.sleep(1)


def _latest_artifact(client, key: str):
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.client.schemas.sorting import ArtifactSort

    found = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])),
                                  sort=ArtifactSort.CREATED_DESC, limit=1)
    assert found, f"no artifact with key {key}"
    return found[0]


def _owner_rows(summary: str) -> dict[str, str]:
    """owner -> its 're-encrypted' cell in the summary's Data owners table."""
    rows = {}
    for line in summary.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 6 and cells[0] in OWNERS:
            rows[cells[0]] = cells[5]
    return rows


@pytest.mark.slow
@pytest.mark.e2e  # a Prefect server, workers and the key-holder service
def test_operations_end_to_end_on_a_real_server(tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import DeploymentUpdate, WorkPoolCreate
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
    from prefect.client.schemas.schedules import IntervalSchedule
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from hetrain.participants.demo_data import write_demo_data

    # ---- Prepare: the owners' tables (temp copies), a 2-round config, the folders each party gets ----
    started_at = time.monotonic()
    _mark("start")
    if not (REPO / "data" / "demo" / "breast_cancer" / "clinic_a.csv").is_file():
        write_demo_data(REPO / "data" / "demo")
    tables = {o: tmp_path / f"owner-{o}" / f"{o}.csv" for o in OWNERS}  # each owner's own folder
    for owner, path in tables.items():
        path.parent.mkdir()
        shutil.copy(REPO / "data" / "demo" / "breast_cancer" / path.name, path)
    raw = yaml.safe_load((REPO / "configs" / "breast_cancer_deployed.yaml").read_text())
    raw["train"]["rounds"] = ROUNDS
    shared = tmp_path / "shared-exchange"  # the exchange store both sides reach, given as a URL
    raw["exchange"] = {"url": f"file://{shared}"}
    config = tmp_path / "trainer" / "breast_cancer_deployed.yaml"
    config.parent.mkdir()
    config.write_text(yaml.safe_dump(raw))
    run_dir = tmp_path / "trainer" / "run"
    key_dir = tmp_path / "key-holder-secret" / "key_holder"  # only the service is ever given this
    token_file = tmp_path / "token" / "kh.token"
    token_file.parent.mkdir()
    records = tmp_path / "context-records"
    kh_port = free_port()
    kh_url = f"http://127.0.0.1:{kh_port}"

    with _prefect_server(tmp_path, records) as (server, server_proc):
        procs = _Processes(server.logs)
        scanner = None
        try:
            _mark("server up")
            with temporary_settings(updates={PREFECT_API_URL: server.url}), get_client(sync_client=True) as client:
                for pool in ("hetrain-local", "owner-clinic-a", "owner-clinic-b"):  # = prefect work-pool create
                    client.create_work_pool(WorkPoolCreate(name=pool, type="process"))
            # ---- the key holder as its own process, then one worker per pool ----
            base = {**server.env, RECORD_DIR_ENV: str(records)}
            service = procs.start("key-holder", [str(BIN / "hetrain"), "key-holder", "serve", str(config), "--key-dir",
                                                 str(key_dir), "--port", str(kh_port), "--token-file", str(token_file)],
                                  {**base, ROLE_ENV: "key-holder"})
            worker = [str(BIN / "prefect"), "worker", "start", "--type", "process", "--pool"]
            procs.start("trainer", [*worker, "hetrain-local"],
                        {**base, ROLE_ENV: "trainer", "HETRAIN_KEY_HOLDER_URL": kh_url,
                         "HETRAIN_KEY_HOLDER_TOKEN_FILE": str(token_file)})
            for owner in OWNERS:
                procs.start(f"owner-{owner}", [*worker, f"owner-{owner.replace('_', '-')}"],
                            {**base, ROLE_ENV: f"owner-{owner}"})
            scanner = _ProcScanner({"server": server_proc.pid,
                                    **{role: p.pid for role, (p, _, _) in procs.started.items()}})
            scanner.start()
            # deploy while the workers and the service start up
            server.run("prefect", "--no-prompt", "deploy", "--all")
            _mark("deployed")
            deadline = time.monotonic() + 60
            while True:
                assert service.poll() is None, (server.logs / "key-holder.log").read_text()
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(f"{kh_url}/v1/health", timeout=2).status_code == 200:
                        break
                assert time.monotonic() < deadline, "the key-holder service did not come up"
                time.sleep(0.3)
            # the service refuses a bad token with 401 and keeps serving (full matrix: test_key_holder_service.py)
            bad = httpx.get(f"{kh_url}/v1/public-context", headers={"Authorization": "Bearer nope"}, timeout=10)
            assert bad.status_code == 401 and bad.json()["error"] == "Unauthorized"
            assert httpx.get(f"{kh_url}/v1/health", timeout=10).status_code == 200

            with temporary_settings(updates={PREFECT_API_URL: server.url}), get_client(sync_client=True) as client:
                # ---- point the deployments at this test's files (as an operator would edit prefect.yaml) ----
                train_dep = client.read_deployment_by_name(TRAIN)
                client.update_deployment(train_dep.id, DeploymentUpdate(parameters={
                    **train_dep.parameters, "config_path": str(config), "run_dir": str(run_dir)}))
                for owner, name in OWNERS.items():
                    dep = client.read_deployment_by_name(name)
                    client.update_deployment(dep.id, DeploymentUpdate(
                        parameters={**dep.parameters, "table_path": str(tables[owner]),
                                    "outbox_dir": str(tables[owner].parent / "outbox")}))

                # ---- the schedule is on train/breast-cancer, as prefect.yaml says; then paused here, so a
                # test that happens to run at 03:00 UTC never starts a real nightly run ----
                nightly = client.read_deployment_by_name("train/breast-cancer")
                assert [(s.schedule.cron, s.schedule.timezone, s.active) for s in nightly.schedules] == \
                    [("0 3 * * *", "UTC", True)]
                assert nightly.global_concurrency_limit.limit == 1 and nightly.work_pool_name == "hetrain-local"
                for name in ("train/breast-cancer", "train/digits-vertical"):
                    dep = client.read_deployment_by_name(name)
                    for s in dep.schedules:
                        client.update_deployment_schedule(dep.id, s.id, active=False)

                # ---- each owner's CSV path is in its own deployment's parameters only ----
                deployments = client.read_deployments()
                assert {f"{client.read_flow(d.flow_id).name}/{d.name}" for d in deployments} >= {TRAIN, *OWNERS.values()}
                for owner, name in OWNERS.items():
                    holders = {f"{client.read_flow(d.flow_id).name}/{d.name}" for d in deployments
                               if str(tables[owner]) in json.dumps(d.parameters)
                               or f"{owner}.csv" in json.dumps(d.parameters)}
                    assert holders == {name}, (owner, holders)
                assert ".csv" not in config.read_text()
                assert ".csv" not in (REPO / "configs" / "breast_cancer_deployed.yaml").read_text()

                # ---- Execute 1: a run triggered through the API, to Completed ----
                first = run_deployment(TRAIN, timeout=0)
                first = _wait_run(client, first.id, 300)
                _mark("first run final")
                assert first.state.is_completed(), (first.state, (server.logs / "trainer.log").read_text()[-4000:])
                metrics = json.loads(_latest_artifact(client, "breast-cancer-deployed-metrics").data)
                progress = _latest_artifact(client, "breast-cancer-deployed-progress").data
                summary1 = _latest_artifact(client, "breast-cancer-deployed-summary").data

                # ---- Execute 2: clinic_b's table changes; a schedule with a near-future anchor fires a retrain ----
                table = pd.read_csv(tables["clinic_b"])
                table.loc[0, "mean_radius"] += 0.5
                table.to_csv(tables["clinic_b"], index=False)
                # the scheduler only makes runs for future slots: 15 s leaves a loaded server's scheduler time
                # to reach the first one (the next slot is an hour away)
                anchor = datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=15)
                [schedule] = client.create_deployment_schedules(
                    train_dep.id, [(IntervalSchedule(interval=datetime.timedelta(hours=1), anchor_date=anchor), True)])
                assert any(s.id == schedule.id for s in client.read_deployment(train_dep.id).schedules)
                deadline, scheduled = time.monotonic() + 75, []
                while not scheduled:
                    runs = client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[train_dep.id])))
                    scheduled = [r for r in runs if r.auto_scheduled and r.id != first.id
                                 and r.expected_start_time <= anchor + datetime.timedelta(seconds=1)]
                    assert time.monotonic() < deadline, "the scheduler made no run for the new schedule"
                    time.sleep(0.5)
                _mark("scheduled run created")
                second = _wait_run(client, scheduled[0].id, 300)
                _mark("scheduled run final")
                client.delete_deployment_schedule(train_dep.id, schedule.id)
                assert second.state.is_completed(), (second.state, (server.logs / "trainer.log").read_text()[-4000:])
                assert second.work_pool_name == "hetrain-local"
                summary2 = _latest_artifact(client, "breast-cancer-deployed-summary").data
            assert service.poll() is None, "the key-holder service went down"
        finally:
            if scanner is not None:
                scanner.halt.set()
                scanner.join(5)
            procs.stop_all()
    lineage = subprocess.run([str(BIN / "hetrain"), "lineage", str(run_dir)], capture_output=True, text=True,
                             timeout=60, cwd=REPO, check=False)
    elapsed = time.monotonic() - started_at

    # ---- Assert: artifacts of the first run ----
    assert [r["round"] for r in metrics] == list(range(1, ROUNDS + 1))
    assert metrics[-1]["test_accuracy"] >= 0.9
    assert float(progress) == pytest.approx(100.0)
    assert "## Lineage" in summary1 and "| parent checkpoint | none (fresh start) |" in summary1
    assert f"`{run_dir.resolve()}" in summary1 or str(run_dir) in summary1
    assert _owner_rows(summary1) == {"clinic_a": "yes", "clinic_b": "yes"}

    # ---- Assert: the scheduled retrain re-encrypted clinic_b only and warm-started from generation 1 ----
    assert _owner_rows(summary2) == {"clinic_a": "no (reused)", "clinic_b": "yes"}
    parent = json.loads((run_dir / "generations" / "gen-0002" / "parent.json").read_text())["checkpoint"]["path"]
    assert "/generations/gen-0001/checkpoints/round-" in parent
    assert f"| parent checkpoint | `{parent}` sha256" in summary2
    assert lineage.returncode == 0 and "Traceback" not in lineage.stdout + lineage.stderr
    assert f"warm start from {parent}" in lineage.stdout
    assert "(generation 2)" in lineage.stdout and "(generation 1)" in lineage.stdout

    # ---- Assert: the owners published to the exchange URL from their own outboxes; the trainer mirrored it ----
    for owner in OWNERS:
        published = (shared / owner / "manifest.json").read_bytes()
        assert published == (tables[owner].parent / "outbox" / owner / "manifest.json").read_bytes()
        assert published == (run_dir / "exchange" / owner / "manifest.json").read_bytes()
    assert not (run_dir / "outbox").exists()  # no owner prepared anything on the trainer's side

    # ---- Assert: every context the trainer and the owners loaded was public; only the service's was private ----
    loads = read_records(records)
    by_role = {}
    for r in loads:
        by_role.setdefault(r["role"], []).append(r)
    assert {"trainer", "owner-clinic_a", "owner-clinic_b", "key-holder"} <= set(by_role), sorted(by_role)
    assert all(not r["private"] for role in ("trainer", "owner-clinic_a", "owner-clinic_b") for r in by_role[role])
    private = [r for r in loads if r["private"]]
    service_pid = procs.started["key-holder"][0].pid
    assert private and {r["pid"] for r in private} == {service_pid}
    assert {r["role"] for r in private} == {"key-holder"}
    assert len({r["key_id"] for r in loads}) == 1  # one key throughout: the service's
    assert len({r["pid"] for r in by_role["trainer"]}) >= 2  # one flow-run process per run

    # ---- Assert: the key holder's directory was given to the service only ----
    secret = str(key_dir)
    for role, (_, argv, env) in procs.started.items():
        given = " ".join(argv) + " " + " ".join(f"{k}={v}" for k, v in env.items())
        assert (secret in given) == (role == "key-holder"), role
    assert secret not in " ".join(f"{k}={v}" for k, v in server.env.items())
    # every trainer and owner process that loaded a context (the flow-run processes the workers started)
    # was among the processes scanned, under its own worker
    roots = {r: p.pid for r, (p, _, _) in procs.started.items()}
    loaders = {(r["pid"], r["role"]) for r in loads if r["role"] != "key-holder"}
    assert all(pid != roots[role] for pid, role in loaders)  # loaded in the flow-run children, not the workers
    assert {(pid, scanner.seen.get(pid, ("unseen",))[0]) for pid, _ in loaders} == loaders, \
        {pid: scanner.seen.get(pid, ("unseen", ""))[:2] for pid, _ in loaders}
    for pid, (role, cmdline, environ) in scanner.seen.items():
        if role != "key-holder":
            assert secret not in cmdline and secret not in environ, (pid, role, cmdline)
            assert "key-holder-secret" not in cmdline + environ, (pid, role)
    assert not (run_dir / "key_holder").exists()
    assert not list(run_dir.rglob("key_holder")) and not list(run_dir.rglob("secret_context.bin"))
    assert (key_dir / "secret_context.bin").is_file()

    # ---- Assert: the owners' tables were read by their own processes only (no CSV path in the trainer's env) ----
    trainer_env = procs.started["trainer"][2]
    assert not any(str(t) in json.dumps(trainer_env) for t in tables.values())
    assert elapsed < 600, elapsed


# ---- the recording hook (fast) -----------------------------------------------------------------


def test_context_record_writes_one_line_per_load_with_role_and_privacy(ckks_keys, tmp_path, monkeypatch):
    # Prepare
    from hetrain.mpc_ops.crypto import ckks

    holder, _ = ckks_keys
    monkeypatch.setenv(RECORD_DIR_ENV, str(tmp_path / "rec"))
    monkeypatch.setenv(ROLE_ENV, "trainer")
    # Execute: one public load through load_public_context, one refused private load
    ckks.load_public_context(holder.public_context(), isolate=False)
    with pytest.raises(Exception, match="secret key"):
        ckks.load_public_context(holder._context.serialize(save_secret_key=True), isolate=False)
    # Assert
    loads = read_records(tmp_path / "rec")
    assert [(r["role"], r["source"], r["private"]) for r in loads] == \
        [("trainer", "load_public_context", False), ("trainer", "load_public_context", True)]
    assert {r["pid"] for r in loads} == {os.getpid()} and {r["key_id"] for r in loads} == {holder.key_id}
    assert (tmp_path / "rec" / f"{os.getpid()}.jsonl").is_file()


@pytest.mark.integration  # TenSEAL keys
def test_context_record_is_off_without_the_variable_and_records_the_key_holders_own_load(tmp_path, monkeypatch):
    # Prepare
    from hetrain.core.config import PolicyConfig
    from hetrain.core.params import CkksParams
    from hetrain.core.shapes import LinearShape
    from hetrain.participants.key_holder import KeyHolder

    policy, shapes = PolicyConfig(cipher_layers=["enc1"], reveals={"enc1": {}}, min_batch=32), {"enc1": LinearShape(64, 8)}
    monkeypatch.delenv(RECORD_DIR_ENV, raising=False)
    KeyHolder.open_or_create(tmp_path / "kh", CkksParams(), policy, shapes)  # created, not recorded
    monkeypatch.setenv(RECORD_DIR_ENV, str(tmp_path / "rec"))
    monkeypatch.setenv(ROLE_ENV, "key-holder")
    # Execute
    holder = KeyHolder.open_or_create(tmp_path / "kh", CkksParams(), policy, shapes)
    # Assert
    assert [(r["role"], r["source"], r["private"], r["key_id"]) for r in read_records(tmp_path / "rec")] == \
        [("key-holder", "key_holder.load", True, holder.key_id)]
