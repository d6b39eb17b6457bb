"""Prefect settings for a command-line run, set in the environment before Prefect is imported.

Used by the CLI and by the benchmark's worker processes (which must not import the CLI).
"""

import os

QUIET_PREFECT = {
    # Prefect's own console output would fight the progress bar; run logs still reach the API/UI.
    "PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL": "CRITICAL",
    "PREFECT_LOGGING_HANDLERS_CONSOLE_FLOW_RUNS_LEVEL": "CRITICAL",
    "PREFECT_LOGGING_HANDLERS_CONSOLE_TASK_RUNS_LEVEL": "CRITICAL",
    # The temporary server's shutdown races ("database is locked", "Error flushing events") are
    # logged by its services at ERROR with tracebacks; they are harmless for a finished run.
    "PREFECT_SERVER_LOGGING_LEVEL": "CRITICAL",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    # Flow runs wait for the API log batch to flush when they end; 2 s (the default) per round is
    # too much for rounds of a few seconds.
    "PREFECT_LOGGING_TO_API_BATCH_INTERVAL": "0.25",
    # The temporary server starts in ~6 s, but Prefect gives up after 20 s, which a loaded 2-core machine
    # exceeds ("Timed out while attempting to connect to ephemeral Prefect API server").
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
}


def quiet_prefect(verbose: bool = False) -> None:
    """Set QUIET_PREFECT in the environment where unset (verbose: keep Prefect's console logging)."""
    for key, value in QUIET_PREFECT.items():
        if not verbose or "LOGGING_HANDLERS" not in key and "SERVER_LOGGING" not in key:
            os.environ.setdefault(key, value)
