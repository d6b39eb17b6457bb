"""`hetrain serve` refuses to start without a reachable Prefect server or with a bad schedule."""

from pathlib import Path

import pytest

from hetrain.cli import main

REPO = Path(__file__).resolve().parent.parent
CONFIG = str(REPO / "configs" / "breast_cancer.yaml")


@pytest.fixture
def no_api_url():
    """PREFECT_API_URL unset, even if the session's test harness set it."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        yield


def test_serve_without_an_api_url_says_which_server_to_start(no_api_url, capsys, monkeypatch):
    # Prepare: serving must never be reached
    from hetrain import serve

    monkeypatch.setattr(serve, "serve", lambda *a, **k: pytest.fail("served without a server"))
    # Execute
    code = main(["serve", CONFIG, "--cron", "0 3 * * *"])
    # Assert
    err = capsys.readouterr().err
    assert code == 2
    assert "PREFECT_API_URL is not set" in err and "schedules need a running Prefect server" in err
    assert "prefect server start" in err and "Traceback" not in err


def test_serve_with_an_unreachable_server_names_the_url(capsys, monkeypatch):
    # Prepare: a port nothing listens on
    import socket

    from prefect.settings import PREFECT_API_URL, temporary_settings

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/api"
    # Execute
    with temporary_settings(updates={PREFECT_API_URL: url}):
        code = main(["serve", CONFIG, "--cron", "0 3 * * *"])
    # Assert
    err = capsys.readouterr().err
    assert code == 2
    assert f"no Prefect server answers at PREFECT_API_URL={url}" in err


@pytest.mark.parametrize("cron", ["61 3 * * *", "daily", "0 3 * * * *"])
def test_serve_refuses_a_bad_cron_before_contacting_a_server(cron, no_api_url, capsys):
    # Execute
    code = main(["serve", CONFIG, "--cron", cron])
    # Assert
    err = capsys.readouterr().err
    assert code == 2
    assert f"--cron {cron!r} is not a cron expression of five fields" in err


def test_training_with_deployed_owners_needs_a_server(no_api_url, tmp_path, capsys):
    # Execute
    code = main(["train", str(REPO / "configs" / "breast_cancer_deployed.yaml"), "--run-dir", str(tmp_path / "run")])
    # Assert
    err = capsys.readouterr().err
    assert code == 2
    assert "owners ['clinic_a', 'clinic_b'] run as their own deployments" in err and "PREFECT_API_URL" in err
    assert not (tmp_path / "run").exists()


@pytest.mark.e2e  # `hetrain serve` in a subprocess, with a Prefect server
@pytest.mark.slow
def test_ctrl_c_stops_serving_cleanly_and_pauses_the_schedule(tmp_path):
    # Prepare: a real server; `hetrain serve` in its own process group, as a terminal runs it
    import os
    import signal
    import subprocess
    import time

    from tests.prefect_server import BIN, prefect_server

    with prefect_server(tmp_path) as server:
        proc = subprocess.Popen([str(BIN / "hetrain"), "serve", CONFIG, "--cron", "0 3 * * *", "--run-dir",
                                 str(tmp_path / "run"), "--name", "nightly"], cwd=REPO, env=server.env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        deadline, seen = time.monotonic() + 120, ""
        while "being served" not in seen and time.monotonic() < deadline and proc.poll() is None:
            seen += proc.stdout.readline()
        # Execute
        os.killpg(proc.pid, signal.SIGINT)
        rest, _ = proc.communicate(timeout=60)
        paused = server.run("prefect", "deployment", "inspect", "train/nightly").stdout
    # Assert
    output = seen + rest
    assert "being served" in seen
    assert proc.returncode == 0
    assert "hetrain: stopped serving train/nightly" in output and "Traceback" not in output
    assert "'paused': True" in paused


def test_ctrl_c_stops_serving_even_when_the_runner_does_not_shut_down(tmp_path):
    # Prepare: a stand-in for a runner that swallows KeyboardInterrupt and never returns
    import os
    import signal
    import subprocess
    import sys
    import time

    script = (
        "import time\n"
        "from hetrain import serve\n"
        "serve.STOP_GRACE_SECONDS = 1\n"
        "serve._pause = lambda deployment: print('paused', deployment, flush=True)\n"
        "serve.arm_stop_watchdog('train/x', 'hetrain: stopped serving train/x')\n"
        "ready = False\n"
        "while True:\n"
        "    try:\n"
        "        if not ready:  # inside the try: the test's SIGINT may arrive right after 'ready' is written\n"
        "            ready = True\n"
        "            print('ready', flush=True)\n"
        "        time.sleep(0.1)\n"
        "    except KeyboardInterrupt:\n"
        "        pass  # a runner stuck in its shutdown\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.stdout.readline().strip() == "ready"
    # Execute
    started = time.monotonic()
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=30)
    # Assert: the watchdog paused the deployment, said so, and ended the process with 0 after the grace time
    assert proc.returncode == 0
    assert out.splitlines() == ["paused train/x", "hetrain: stopped serving train/x"]
    assert 1 <= time.monotonic() - started < 20
