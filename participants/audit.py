"""Verify the key holder's hash-chained audit log: an edited, deleted or truncated entry is found."""

import hashlib
from dataclasses import dataclass
from pathlib import Path

from hetrain.core import store
from hetrain.core.errors import HetrainError

GENESIS = "0" * 64
MAX_LINE_BYTES = 64 << 10  # an entry is a few hundred bytes; a refusal message at most a few KB
MAX_STATE_BYTES = 1 << 20


class AuditError(HetrainError):
    """The audit log does not verify: it was edited, truncated or reordered."""


@dataclass(frozen=True)
class AuditReport:
    entries: int
    allowed: int
    refused: int
    head: str


def _lines(log: Path):
    """(number, raw line without its newline) for each line of the log, each at most MAX_LINE_BYTES."""
    if not log.exists():
        return
    with open(log, "rb") as fh:
        number = 0
        while line := fh.readline(MAX_LINE_BYTES + 1):
            number += 1
            if len(line) > MAX_LINE_BYTES:
                raise AuditError(f"{log}: line {number} is longer than {MAX_LINE_BYTES} bytes; the key holder "
                                 f"never writes such a line")
            yield number, line.removesuffix(b"\n")


def _entry(log: Path, number: int, raw: bytes) -> dict:
    entry = store.parse_json(raw, f"{log}: line {number}", AuditError)
    if entry.get("decision") not in ("allow", "refuse"):
        raise AuditError(f"{log}: line {number} has decision {entry.get('decision')!r:.60}; allowed: 'allow', 'refuse'")
    return entry


def verify(key_holder_dir: Path) -> AuditReport:
    """Walk audit.jsonl: every `prev` must be the SHA-256 of the line before, every `seq` the next
    number, and the last line's hash must equal the head recorded in state.json."""
    directory = Path(key_holder_dir)
    log, state_path = directory / "audit.jsonl", directory / "state.json"
    if not state_path.is_file():
        raise AuditError(f"{state_path} is missing: not a key holder directory")
    state = store.parse_json(store.read_bounded(state_path, MAX_STATE_BYTES, "key holder state", AuditError),
                             f"{state_path}", AuditError)
    prev, counts, hashes = GENESIS, {"allow": 0, "refuse": 0}, [GENESIS]
    for number, raw in _lines(log):
        entry = _entry(log, number, raw)
        if entry.get("prev") != prev:
            raise AuditError(
                f"{log}: line {number} (seq {entry.get('seq')!r:.40}) does not chain to the line before: "
                f"an entry before it was edited, deleted or reordered"
            )
        if entry.get("seq") != number:
            raise AuditError(f"{log}: line {number} has seq {entry.get('seq')!r:.40}, expected {number}")
        counts[entry["decision"]] += 1
        prev = hashlib.sha256(raw).hexdigest()
        hashes.append(prev)
    entries = len(hashes) - 1
    seq, head = state.get("audit_seq", 0), state.get("audit_head", GENESIS)
    if isinstance(seq, int) and not isinstance(seq, bool) and 0 <= seq < entries and hashes[seq] == head:
        extra = entries - seq
        raise AuditError(
            f"{log}: {extra} {'entry' if extra == 1 else 'entries'} after entry {seq}, the last one the key holder "
            f"recorded: it stopped between appending an entry and recording it (a crash or a kill); the chain is intact and "
            f"the key holder adopts them the next time it opens {directory} (e.g. `hetrain train … --resume`)"
        )
    if prev != head or entries != seq:
        raise AuditError(
            f"{log}: ends at entry {entries} with hash {prev[:16]}…, but the key holder recorded "
            f"{seq!r:.40} entries ending in {str(head)[:16]}…: "
            f"the last entries were removed or edited"
        )
    return AuditReport(entries, counts["allow"], counts["refuse"], prev)
