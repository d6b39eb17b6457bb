"""An opt-in record of every TenSEAL context a process loads, for end-to-end checks.

When HETRAIN_CONTEXT_RECORD_DIR is set, `record(context, source)` appends one JSON line to
`<dir>/<pid>.jsonl`: the pid, the role (HETRAIN_ROLE, set per process by whoever started it),
where the load happened, whether the context carries a secret key, and its key id. Unset (the
default), it does nothing. A failure to write the record never breaks the load it records.
"""

import json
import os
import time
from pathlib import Path

RECORD_DIR_ENV = "HETRAIN_CONTEXT_RECORD_DIR"
ROLE_ENV = "HETRAIN_ROLE"


def record(context, source: str) -> None:
    """Append one line for a context this process just loaded or created (no-op unless enabled)."""
    folder = os.environ.get(RECORD_DIR_ENV)
    if not folder:
        return
    try:
        from hetrain.mpc_ops.crypto import ckks

        entry = {"pid": os.getpid(), "role": os.environ.get(ROLE_ENV, ""), "source": source,
                 "private": bool(context.is_private()), "key_id": ckks.key_id(context), "time": time.time()}
        path = Path(folder) / f"{os.getpid()}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as sink:  # one short write per line: appends from threads do not interleave
            sink.write(json.dumps(entry) + "\n")
    except Exception:  # noqa: BLE001, S110 - a diagnostic record must never fail a load
        pass


def read_records(folder: str | Path) -> list[dict]:
    """Every record under `folder`, in file order."""
    out = []
    for path in sorted(Path(folder).glob("*.jsonl")):
        out += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return out
