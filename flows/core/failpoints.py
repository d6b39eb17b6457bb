"""Named failpoints for fault injection: a no-op unless the HETRAIN_FAILPOINTS variable arms one.

    HETRAIN_FAILPOINTS="checkpoint.tmp_write=kill@3,owner.before_manifest=enospc@1+"

`kill@N` sends SIGKILL to this process on the N-th hit of the point, `enospc@N` raises
OSError(ENOSPC) there instead; a trailing `+` keeps acting on every later hit too (a disk that stays
full). Hits are counted per process. When the variable is unset a call costs one global lookup.
"""

import errno
import os
import signal
import sys
from dataclasses import dataclass

ENV = "HETRAIN_FAILPOINTS"
ACTIONS = ("kill", "enospc")

# Every failpoint in the code, and where it sits. A test checks that the two lists agree.
POINTS = {
    "keyholder.after_key_write": "the key holder wrote its state.json for a new key, not yet the secret key",
    "keyholder.after_audit_append": "the key holder appended an audit entry; its state.json does not record it yet",
    "owner.blob_written": "a data owner wrote one file of its new generation folder",
    "owner.before_manifest": "a data owner wrote every file of its new generation, not yet manifest.json",
    "cipher.after_forward": "the ciphertext forward X·W of one batch is computed, not yet revealed",
    "cipher.after_backward": "the ciphertext gradient X^T·δ of one batch is computed, not yet revealed",
    "round.after_reveal": "the trainer got one reveal back from the key holder, inside a round",
    "checkpoint.tmp_write": "about to write one file into a checkpoint's temporary directory",
    "checkpoint.before_rename": "every file of a checkpoint is in its temporary directory, not yet renamed",
    "checkpoint.after_rename": "round-NNNNN is renamed into place; its parent directory is not yet fsynced",
    "train.after_round": "a round's flow run returned; metrics.json does not list it yet",
}


@dataclass(frozen=True)
class Rule:
    action: str
    hit: int
    repeat: bool


def parse(spec: str) -> dict[str, Rule]:
    """Parse 'name=action@N[+],…'; raise ConfigError naming the bad entry and what is allowed."""
    from hetrain.core.errors import ConfigError

    rules = {}
    for entry in filter(None, (part.strip() for part in spec.split(","))):
        name, _, rest = entry.partition("=")
        action, _, count = rest.partition("@")
        repeat = count.endswith("+")
        count = count.removesuffix("+")
        if name not in POINTS:
            raise ConfigError(f"{ENV} entry {entry!r}: unknown failpoint {name!r}; known: {', '.join(POINTS)}")
        if action not in ACTIONS:
            raise ConfigError(f"{ENV} entry {entry!r}: action {action!r} must be one of {', '.join(ACTIONS)}")
        if not count.isdigit() or int(count) < 1:
            raise ConfigError(f"{ENV} entry {entry!r}: the hit number must be an int >= 1 (optionally followed "
                              f"by '+'). Got {count!r} instead.")
        rules[name] = Rule(action, int(count), repeat)
    return rules


_spec: str | None = os.environ.get(ENV) or None
_rules: dict[str, Rule] | None = None
_hits: dict[str, int] = {}


def reload() -> None:
    """Re-read HETRAIN_FAILPOINTS and reset the hit counts (tests change the variable in-process)."""
    global _spec, _rules
    _spec, _rules = os.environ.get(ENV) or None, None
    _hits.clear()


def failpoint(name: str, path=None) -> None:
    """Act here if HETRAIN_FAILPOINTS arms `name` for this hit; otherwise return at once."""
    if _spec is None:
        return
    _hit(name, path)


def _hit(name: str, path) -> None:
    global _rules
    if _rules is None:
        _rules = parse(_spec)
    _hits[name] = count = _hits.get(name, 0) + 1
    rule = _rules.get(name)
    if rule is None or count < rule.hit or (count > rule.hit and not rule.repeat):
        return
    if rule.action == "kill":
        sys.stderr.write(f"hetrain failpoint {name}: SIGKILL on hit {count}\n")
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path) if path is not None else f"failpoint {name}")


def hits() -> dict[str, int]:
    """How often each failpoint was reached in this process (only counted while the variable is set)."""
    return dict(_hits)
