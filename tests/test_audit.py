"""`hetrain audit verify`: the hash chain catches an edited, deleted or truncated audit entry."""

import hashlib
import json

import numpy as np
import pytest

from hetrain.cli import main
from hetrain.mpc_ops.crypto import ckks
from hetrain.core.config import PolicyConfig
from hetrain.core.errors import PolicyRefusal
from hetrain.core.params import CkksParams
from hetrain.core.shapes import LinearShape
from hetrain.mpc_ops.reveal.protocol import RevealRequest
from hetrain.participants.audit import AuditError, verify
from hetrain.participants.key_holder import KeyHolder

pytestmark = pytest.mark.integration  # a key holder's keys


@pytest.fixture
def run_dir(tmp_path):
    """A key holder with three audit entries: allow, refuse (min_batch), allow."""
    policy = PolicyConfig(cipher_layers=["enc1"], reveals={"enc1": {}}, min_batch=32)
    holder = KeyHolder.open_or_create(tmp_path / "key_holder", CkksParams(), policy, {"enc1": LinearShape(64, 8)})
    public = ckks.load_public_context(holder.public_context())
    fresh = ckks.load_vector(public, ckks.encrypt(public, np.zeros(4096)), ckks.fresh_layout(public))
    blob = ckks.multiply_plain(fresh, np.ones(4096)).serialize()  # revealed blobs are products
    rows = [f"{i:024x}" for i in range(8)]
    ok = RevealRequest("a", holder.key_id, "activation", "enc1", 1, [blob], [32], [8], 64, rows[:1], "ab" * 32)
    holder.reveal(ok)
    with pytest.raises(PolicyRefusal):
        holder.reveal(RevealRequest("b", holder.key_id, "gradient", "enc1", 1, [blob], [128], [4], 8, rows))
    holder.reveal(ok)
    return tmp_path


def _rewrite(path, lines):
    path.write_text("".join(line + "\n" for line in lines))


def test_intact_log_verifies_with_its_counts(run_dir, capsys):
    # Execute
    report = verify(run_dir / "key_holder")
    code = main(["audit", "verify", str(run_dir)])
    # Assert
    assert (report.entries, report.allowed, report.refused) == (3, 2, 1)
    assert code == 0 and "current key: audit log verified, 3 entries (2 allowed, 1 refused)" in capsys.readouterr().out


def test_edited_entry_is_detected_at_the_next_line(run_dir):
    # Prepare: turn the refusal into an allow
    log = run_dir / "key_holder" / "audit.jsonl"
    lines = log.read_text().splitlines()
    entry = json.loads(lines[1])
    entry["decision"] = "allow"
    lines[1] = json.dumps(entry, sort_keys=True)
    _rewrite(log, lines)
    # Execute / Assert
    with pytest.raises(AuditError, match=r"line 3 \(seq 3\) does not chain"):
        verify(run_dir / "key_holder")


def test_deleted_middle_entry_is_detected(run_dir):
    # Prepare
    log = run_dir / "key_holder" / "audit.jsonl"
    lines = log.read_text().splitlines()
    _rewrite(log, [lines[0], lines[2]])
    # Execute / Assert
    with pytest.raises(AuditError, match="line 2 .* does not chain"):
        verify(run_dir / "key_holder")


def test_truncated_tail_is_detected_against_the_recorded_head(run_dir, capsys):
    # Prepare
    log = run_dir / "key_holder" / "audit.jsonl"
    _rewrite(log, log.read_text().splitlines()[:2])
    # Execute
    code = main(["audit", "verify", str(run_dir)])
    # Assert
    assert code == 1
    assert "AuditError" in capsys.readouterr().err
    with pytest.raises(AuditError, match="recorded 3 entries"):
        verify(run_dir / "key_holder")


HOSTILE_LINES = {
    "not JSON": (b"{not json", r"line 2 is not valid JSON"),
    "a JSON list": (b"[1, 2, 3]", r"line 2: the top level must be a JSON object, got list"),
    "unhashable decision": (b'{"decision": {"a": 1}}', r"line 2 has decision \{'a': 1\}; allowed: 'allow', 'refuse'"),
    "invalid UTF-8": (b'{"decision": "\xff"}', r"line 2 is not valid JSON"),
    "deeply nested": (b"[" * 30_000 + b"]" * 30_000, r"line 2 is not valid JSON"),
    "overlong line": (b" " * (70 << 10), r"line 2 is longer than 65536 bytes"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_LINES))
def test_a_hostile_audit_line_is_an_audit_error_naming_the_line(run_dir, case):
    # Prepare
    log = run_dir / "key_holder" / "audit.jsonl"
    raw, message = HOSTILE_LINES[case]
    lines = log.read_bytes().splitlines()
    log.write_bytes(b"\n".join([lines[0], raw] + lines[2:]) + b"\n")

    # Execute / Assert
    with pytest.raises(AuditError, match=message):
        verify(run_dir / "key_holder")


@pytest.mark.parametrize("state, message", [
    (b"[]", r"state.json: the top level must be a JSON object, got list"),
    (b"\xff", r"state.json is not valid JSON"),
], ids=["list", "not UTF-8"])
def test_a_hostile_state_file_is_an_audit_error(run_dir, state, message):
    # Prepare
    (run_dir / "key_holder" / "state.json").write_bytes(state)

    # Execute / Assert
    with pytest.raises(AuditError, match=message):
        verify(run_dir / "key_holder")


def test_entries_a_crash_left_unrecorded_are_reported_as_such_and_adopted_on_reopen(run_dir):
    # Prepare: the state.json of before the last entry (the key holder was killed before recording it)
    directory = run_dir / "key_holder"
    state = json.loads((directory / "state.json").read_text())
    lines = (directory / "audit.jsonl").read_text().splitlines()
    state.update(audit_seq=2, audit_head=hashlib.sha256(lines[1].encode()).hexdigest())
    (directory / "state.json").write_text(json.dumps(state))

    # Execute / Assert: not mistaken for removed entries; reopening the key holder adopts the entry
    with pytest.raises(AuditError, match="1 entry after entry 2, the last one the key holder recorded"):
        verify(directory)
    policy = PolicyConfig(cipher_layers=["enc1"], reveals={"enc1": {}}, min_batch=32)
    KeyHolder.open_or_create(directory, CkksParams(), policy, {"enc1": LinearShape(64, 8)})
    assert verify(directory).entries == 3
