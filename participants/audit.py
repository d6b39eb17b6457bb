"""Verify the key holder's hash-chained audit log: an edited, deleted or truncated entry is found."""

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from mpc_ops.errors import HetrainError

GENESIS = "0" * 64


class AuditError(HetrainError):
    """The audit log does not verify: it was edited, truncated or reordered."""


@dataclass(frozen=True)
class AuditReport:
    entries: int
    allowed: int
    refused: int
    head: str


def verify(key_holder_dir: Path) -> AuditReport:
    """Walk audit.jsonl: every `prev` must be the SHA-256 of the line before, every `seq` the next
    number, and the last line's hash must equal the head recorded in state.json."""
    directory = Path(key_holder_dir)
    log, state_path = directory / "audit.jsonl", directory / "state.json"
    if not state_path.is_file():
        raise AuditError(f"{state_path} is missing: not a key holder directory")
    state = json.loads(state_path.read_text())
    lines = log.read_text().splitlines() if log.exists() else []
    prev, counts, hashes = GENESIS, {"allow": 0, "refuse": 0}, [GENESIS]
    for number, line in enumerate(lines, start=1):
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            raise AuditError(f"{log}: line {number} is not JSON") from None
        if entry.get("prev") != prev:
            raise AuditError(
                f"{log}: line {number} (seq {entry.get('seq')}) does not chain to the line before: "
                f"an entry before it was edited, deleted or reordered"
            )
        if entry.get("seq") != number:
            raise AuditError(f"{log}: line {number} has seq {entry.get('seq')}, expected {number}")
        counts[entry.get("decision")] = counts.get(entry.get("decision"), 0) + 1
        prev = hashlib.sha256(line.encode()).hexdigest()
        hashes.append(prev)
    seq, head = state.get("audit_seq", 0), state.get("audit_head", GENESIS)
    if len(lines) > seq and hashes[seq] == head:
        extra = len(lines) - seq
        raise AuditError(
            f"{log}: {extra} {'entry' if extra == 1 else 'entries'} after entry {seq}, the last one the key holder "
            f"recorded: it stopped between appending an entry and recording it (a crash or a kill); the chain is intact and "
            f"the key holder adopts them the next time it opens {directory} (e.g. `hetrain train … --resume`)"
        )
    if prev != head or len(lines) != seq:
        raise AuditError(
            f"{log}: ends at entry {len(lines)} with hash {prev[:16]}…, but the key holder recorded "
            f"{state.get('audit_seq', 0)} entries ending in {str(state.get('audit_head'))[:16]}…: "
            f"the last entries were removed or edited"
        )
    return AuditReport(len(lines), counts["allow"], counts["refuse"], prev)
