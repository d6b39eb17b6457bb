"""Processes for the fault harness: one shared `prefect server`, and `hetrain` runs as a user starts them."""

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

HETRAIN = [sys.executable, "-m", "hetrain.cli"]
REPO = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_health(proc: subprocess.Popen, url: str, start: float, timeout: float, interval: float,
                    exited) -> float | None:
    """Poll `url` until it answers 200: the seconds since `start` (perf_counter), or None once `timeout` has
    passed; raises exited() if `proc` ends first."""
    while time.perf_counter() - start < timeout:
        if proc.poll() is not None:
            raise exited()
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return time.perf_counter() - start
        except OSError:
            time.sleep(interval)
    return None


class PrefectServer:
    """`prefect server start` on a free loopback port with its own PREFECT_HOME, for every run of the harness.

    A temporary server per `hetrain` process costs about 6 s each; one shared server costs that once.
    """

    def __init__(self, home: Path, startup_timeout: float = 120.0):
        self.home, self.timeout = Path(home), startup_timeout
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}/api"
        self.proc: subprocess.Popen | None = None
        self.startup_seconds = None

    def env(self) -> dict:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_") and k != "HETRAIN_FAILPOINTS"}
        return {**env, "PREFECT_HOME": str(self.home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}

    def __enter__(self) -> "PrefectServer":
        self.home.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        prefect = Path(sys.executable).with_name("prefect")
        self.log = open(self.home / "server.log", "wb")
        self.proc = subprocess.Popen([str(prefect), "server", "start", "--host", "127.0.0.1", "--port",
                                      str(self.port)], env=self.env(), stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        took = wait_for_health(self.proc, f"{self.url}/health", start, self.timeout, 0.5, lambda: RuntimeError(
            f"prefect server exited with code {self.proc.returncode}; see {self.home}/server.log"))
        if took is not None:
            self.startup_seconds = round(took, 1)
            return self
        self.__exit__(None, None, None)
        raise RuntimeError(f"prefect server on port {self.port} not healthy after {self.timeout:.0f} s")

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)  # its own session: the server and its uvicorn child
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()


@dataclass
class Outcome:
    """How one `hetrain` process ended."""

    argv: list[str]
    returncode: int
    seconds: float
    stdout: str
    stderr: str
    killed_by_harness: bool

    @property
    def signal(self) -> str | None:
        return signal.Signals(-self.returncode).name if self.returncode < 0 else None

    def tail(self, chars: int = 600) -> str:
        return (self.stderr.strip() or self.stdout.strip())[-chars:]


def run_hetrain(args: list[str], server: PrefectServer, *, failpoints: str | None = None,
                kill_after: float | None = None, timeout: float = 300.0) -> Outcome:
    """Run `hetrain ARGS` in a fresh process against the shared server; optionally SIGKILL it after
    `kill_after` seconds of wall-clock time (from the outside, as a crash or an OOM killer would)."""
    env = {**server.env(), "PREFECT_API_URL": server.url}
    if failpoints:
        env["HETRAIN_FAILPOINTS"] = failpoints
    start = time.perf_counter()
    proc = subprocess.Popen(HETRAIN + args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    killed = False
    try:
        out, err = proc.communicate(timeout=kill_after if kill_after is not None else timeout)
    except subprocess.TimeoutExpired:
        if kill_after is None:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            raise RuntimeError(f"hetrain {' '.join(args)} did not finish in {timeout:.0f} s:\n{err[-2000:]}")
        os.killpg(proc.pid, signal.SIGKILL)  # the whole session, so no worker process outlives it
        killed = True
        out, err = proc.communicate()
    return Outcome(args, proc.returncode, round(time.perf_counter() - start, 2), out, err, killed)
