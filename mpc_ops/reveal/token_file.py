"""The bearer token shared by the key-holder service and the trainer: one file, readable by its owner only."""

import os
import re
import secrets
import stat
from pathlib import Path

from hetrain.core.errors import ConfigError

_TOKEN = re.compile(r"^[A-Za-z0-9_\-.~+/=]{32,512}$")


def create_token(path: str | Path) -> bool:
    """Write a fresh random token to `path` (mode 0600) unless the file exists; True if it was created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as fh:
        fh.write(secrets.token_urlsafe(32) + "\n")
    return True


def read_token(path: str | Path) -> str:
    """The token in `path`; refuse a missing file, a file others can read, or a malformed token."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"token file {path} does not exist; create one with `hetrain key-holder token {path}`")
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise ConfigError(f"token file {path} has mode {mode:04o}; it must be readable by its owner only "
                          f"(mode 0600): run `chmod 600 {path}`")
    token = path.read_text().strip()
    if not _TOKEN.match(token):
        raise ConfigError(f"token file {path} must hold one token of 32 to 512 URL-safe characters "
                          f"(as `hetrain key-holder token` writes); got {len(token)} characters")
    return token
