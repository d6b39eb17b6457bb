"""`hetrain serve`: the zero-infrastructure schedule, a `flow.serve` runner for the `train` flow.

Schedules are created by the Prefect server's scheduler service, which the temporary server that
`hetrain train` starts does not keep running; serving therefore needs a real `prefect server start`
reached through PREFECT_API_URL.
"""

from pathlib import Path

import httpx

from hetrain.core.errors import HetrainError

START_SERVER = ("start one with `prefect server start` (it listens on http://127.0.0.1:4200), then "
                "`export PREFECT_API_URL=http://127.0.0.1:4200/api` (or `prefect config set PREFECT_API_URL=...`)")


class ServeError(HetrainError):
    """Serving cannot start: no reachable Prefect server, or a bad schedule."""


def check_cron(cron: str) -> None:
    from prefect.client.schemas.schedules import CronSchedule

    try:
        CronSchedule(cron=cron)
        valid = len(cron.split()) == 5
    except ValueError:
        valid = False
    if not valid:
        raise ServeError(f"--cron {cron!r} is not a cron expression of five fields (minute hour day-of-month "
                         f"month day-of-week), e.g. '0 3 * * *' for 03:00 every day")


def check_api_url(needs: str = "schedules need") -> str:
    """The configured PREFECT_API_URL, after checking a server answers there."""
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if not url:
        raise ServeError(f"PREFECT_API_URL is not set: {needs} a running Prefect server, not the temporary "
                         f"one `hetrain train` starts; {START_SERVER}")
    try:
        httpx.get(f"{url.rstrip('/')}/health", timeout=5).raise_for_status()
    except httpx.HTTPError as exc:
        raise ServeError(f"no Prefect server answers at PREFECT_API_URL={url} ({exc}); {START_SERVER}") from None
    return url


def serve(config_path: Path, run_dir: Path, name: str, cron: str, run_name: str) -> None:
    """Register the deployment `train/<name>` and run its scheduled runs until interrupted.

    Each run is a retrain: a new generation of `run_dir` (see hetrain.lineage); at most one runs at a time.
    """
    from prefect.types.entrypoint import EntrypointType

    from hetrain.train_flow import train

    _quiet_interrupted_start()
    try:
        train.serve(name=name, cron=cron, global_limit=1, entrypoint_type=EntrypointType.MODULE_PATH,
                    parameters={"config_path": str(config_path), "run_dir": str(run_dir), "retrain": True,
                                "run_name": run_name},
                    description=f"hetrain scheduled retraining of {config_path.name} into {run_dir}")
    finally:
        _pause(f"{train.name}/{name}")


STOP_GRACE_SECONDS = 30


def arm_stop_watchdog(deployment: str, message: str) -> None:
    """Make Ctrl-C always stop serving: the first SIGINT raises KeyboardInterrupt as usual and starts a
    timer; if Prefect's runner has not shut down within STOP_GRACE_SECONDS (seen once on a loaded CI
    machine), the timer pauses the deployment, prints `message` and ends the process."""
    import os
    import signal
    import threading

    def hard_stop() -> None:
        pauser = threading.Thread(target=_pause, args=(deployment,), daemon=True)
        pauser.start()
        pauser.join(10)
        print(message, flush=True)
        os._exit(0)

    def on_sigint(signum, frame):
        signal.signal(signal.SIGINT, signal.default_int_handler)
        timer = threading.Timer(STOP_GRACE_SECONDS, hard_stop)
        timer.daemon = True
        timer.start()
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, on_sigint)


def _pause(deployment: str) -> None:
    """Pause the served deployment. Prefect does this on a normal shutdown, but not when Ctrl-C
    arrives while its runner is still starting; a paused deployment creates no runs nobody serves."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import DeploymentUpdate
    from prefect.exceptions import ObjectNotFound

    try:
        with get_client(sync_client=True) as client:
            found = client.read_deployment_by_name(deployment)
            if not found.paused:
                client.update_deployment(found.id, DeploymentUpdate(paused=True))
    except (ObjectNotFound, httpx.HTTPError):
        pass  # never registered, or the server is gone: nothing will schedule it


def _quiet_interrupted_start() -> None:
    """Ctrl-C during Prefect's runner start-up leaves a pending asyncio task and an unclosed loop,
    which Python reports at exit with warnings and an "Exception ignored" traceback. Both are
    harmless; drop exactly those."""
    import logging
    import sys
    import warnings

    warnings.filterwarnings("ignore", message=r"coroutine 'Runner\.start' was never awaited", category=RuntimeWarning)
    logging.getLogger("asyncio").addFilter(lambda r: "Task was destroyed but it is pending" not in r.getMessage())
    default_hook = sys.unraisablehook

    def hook(unraisable):
        if "BaseEventLoop.__del__" not in repr(unraisable.object):
            default_hook(unraisable)

    sys.unraisablehook = hook
