"""A real `prefect server start` for end-to-end tests: a free loopback port, a temporary PREFECT_HOME.

    with prefect_server(tmp_path) as server:
        server.run("prefect", "work-pool", "create", "hetrain-local", "--type", "process")
        with server.background("prefect", "worker", "start", "--pool", "hetrain-local"):
            server.run("prefect", "deployment", "run", "train/breast-cancer", "--watch")

Every command runs from the repository root with this venv's executables and the server's
environment (PREFECT_HOME, PREFECT_API_URL). Processes are stopped with SIGINT, then SIGTERM,
then SIGKILL, each in its own process group, so nothing outlives the test.
"""

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(proc: subprocess.Popen, grace: float = 15.0) -> None:
    """SIGINT the process group (a clean shutdown), then SIGTERM, then SIGKILL."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGKILL):
        if proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=grace)


@dataclass
class PrefectServer:
    url: str
    home: Path
    logs: Path

    @property
    def env(self) -> dict:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
        env.update(PREFECT_HOME=str(self.home), PREFECT_API_URL=self.url, PREFECT_SERVER_ANALYTICS_ENABLED="false",
                   PREFECT_CLI_PROMPT="false")
        return env

    def run(self, *argv: str, timeout: float = 600) -> subprocess.CompletedProcess:
        """Run a command to completion; raise with its output if it fails."""
        out = subprocess.run([str(BIN / argv[0]), *argv[1:]], cwd=REPO, env=self.env, capture_output=True,
                             text=True, timeout=timeout)
        if out.returncode != 0:
            raise AssertionError(f"{' '.join(argv)} exited {out.returncode}:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
        return out

    @contextlib.contextmanager
    def background(self, *argv: str):
        """Run a long-lived command (a worker) for the duration of the block; its output goes to logs/."""
        log = self.logs / f"{'-'.join(a.strip('-') for a in argv[:5])}.log"
        with open(log, "w") as sink:
            proc = subprocess.Popen([str(BIN / argv[0]), *argv[1:]], cwd=REPO, env=self.env, stdout=sink,
                                    stderr=subprocess.STDOUT, start_new_session=True)
            try:
                yield proc
            finally:
                _stop(proc)


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"prefect server exited with {proc.returncode} before it was healthy")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        time.sleep(0.5)
    raise TimeoutError(f"prefect server at {url} not healthy after {timeout:.0f} s")


@contextlib.contextmanager
def prefect_server(tmp_path: Path, startup_timeout: float = 120):
    """Start `prefect server start` on a free port under tmp_path; yield a PrefectServer; stop it."""
    home, logs = tmp_path / "prefect-home", tmp_path / "logs"
    home.mkdir(parents=True), logs.mkdir(parents=True)
    port = free_port()
    server = PrefectServer(url=f"http://127.0.0.1:{port}/api", home=home, logs=logs)
    with open(logs / "server.log", "w") as sink:
        proc = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                                cwd=REPO, env=server.env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_healthy(server.url, proc, startup_timeout)
            yield server
        finally:
            _stop(proc)
