"""`hetrain key-holder serve` on a loopback port for the leakage harness: the attacks then cross the wire."""

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Service:
    """The key-holder service for one config, in its own process session; a context manager."""

    def __init__(self, config: Path, folder: Path, startup_timeout: float = 120.0):
        self.config, self.folder, self.timeout = Path(config), Path(folder), startup_timeout
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.token_file = self.folder / "service.token"
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> "Service":
        self.folder.mkdir(parents=True, exist_ok=True)
        log = open(self.folder / "service.log", "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "hetrain.cli", "key-holder", "serve", str(self.config), "--key-dir",
             str(self.folder / "key_holder"), "--port", str(self.port), "--token-file", str(self.token_file)],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the key-holder service exited with {self.proc.returncode}: "
                                   f"{(self.folder / 'service.log').read_text()[-1500:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/v1/health", timeout=2) as response:
                    if response.status == 200:
                        return self
            except OSError:
                time.sleep(0.2)
        self.__exit__()
        raise RuntimeError(f"the key-holder service on port {self.port} did not answer in {self.timeout:.0f} s")

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
