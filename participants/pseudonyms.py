"""Sample pseudonyms keyed by a secret the data owners share and the trainer never holds.

The owners publish HMAC-SHA256(key, id) pseudonyms (row ids in the exchange store and in reveal
requests' `rows`) and order each split by them. Keyed by the config's public seed, anyone who
knows the config could invert them by guessing the ids; keyed by this secret, they cannot.

The key is 32 random bytes in an owner-side file of mode 0600: `pseudonym_key_file` of the owner's
config section, else `pseudonym.key` beside the first owner's table (created on first use). It
must never sit in RUN_DIR's trainer-readable parts. The owners of one vertical split must share
it, since the trainer aligns their samples on equal pseudonyms.
"""

import hashlib
import hmac
import os
import secrets
from pathlib import Path

import numpy as np

from hetrain.core.config import OwnerConfig, RunConfig
from hetrain.core.errors import ConfigError

KEY_FILE = "pseudonym.key"
KEY_BYTES = 32


def key_path(cfg: RunConfig, owner: OwnerConfig) -> Path:
    """The owner's key file: its own `pseudonym_key_file`, else the shared default beside the first table."""
    if owner.pseudonym_key_file is not None:
        return Path(owner.pseudonym_key_file)
    tables = [o.path for o in cfg.data.owners if o.path is not None] or [owner.path]
    if tables[0] is None:
        raise ConfigError(f"owner '{owner.name}': set data.owners[].pseudonym_key_file (the owners' shared "
                          f"pseudonym key); there is no table to put the default {KEY_FILE} beside")
    return Path(tables[0]).parent / KEY_FILE


def load_or_create(path: Path) -> bytes:
    """The key in `path`; a new random one (mode 0600) if the file does not exist yet."""
    path = Path(path)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(secrets.token_bytes(KEY_BYTES))
            fh.flush()
            os.fsync(fh.fileno())
        try:
            os.link(tmp, path)  # atomic: a complete key or none; another owner's made first wins
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        raise ConfigError(f"pseudonym key {path}: mode {mode:04o} lets others read it; allowed: 0600 "
                          f"(chmod 600 {path})")
    key = path.read_bytes()
    if len(key) != KEY_BYTES:
        raise ConfigError(f"pseudonym key {path}: must hold {KEY_BYTES} bytes, got {len(key)}")
    return key


def fingerprint(key: bytes) -> str:
    """A short public digest of the key: equal keys, equal fingerprints (the key itself stays secret)."""
    return hmac.new(key, b"hetrain pseudonym key fingerprint", hashlib.sha256).hexdigest()[:16]


def owner_key(cfg: RunConfig, owner: OwnerConfig) -> bytes:
    """The owner's pseudonym key; under a vertical split, refused unless every other owner's existing
    key file holds the same key (they must publish equal pseudonyms for the same sample)."""
    path = key_path(cfg, owner)
    key = load_or_create(path)
    if cfg.data.partition != "vertical":
        return key
    for other in cfg.data.owners:
        if other.name == owner.name or (other.path is None and other.pseudonym_key_file is None):
            continue
        other_path = key_path(cfg, other)
        if other_path.resolve() == path.resolve() or not other_path.exists():
            continue
        if not hmac.compare_digest(load_or_create(other_path), key):
            raise ConfigError(
                f"owners '{owner.name}' ({path}) and '{other.name}' ({other_path}) use different pseudonym keys; "
                f"the owners of a vertical split must share one (copy one file over the other, mode 0600)")
    return key


def pseudonyms(ids: np.ndarray, key: bytes) -> list[str]:
    """HMAC-SHA256(key, id) pseudonyms of IDs (24 hex digits), published so the trainer can align owners."""
    return [hmac.new(key, f"id:{v}".encode(), hashlib.sha256).hexdigest()[:24] for v in ids]


def keyed_order(ids: np.ndarray, key: bytes) -> np.ndarray:
    """`ids` sorted by their pseudonyms: an order the trainer cannot recompute from the public seed."""
    names = pseudonyms(ids, key)
    return np.array([v for _, v in sorted(zip(names, ids), key=lambda pair: pair[0])], dtype=object)
