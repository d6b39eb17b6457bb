"""Atomic file writes and digests: nothing half-written is ever read."""

import hashlib
import json
import os
import tempfile
from pathlib import Path


def fsync_dir(path: Path) -> None:
    """Flush a directory entry so a rename inside it survives a crash."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_bytes(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write to a temporary sibling, fsync, then rename over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        if exc.filename is None:  # a failed write() names no file; say which one (e.g. a full disk)
            raise OSError(exc.errno, exc.strerror, str(path)) from exc
        raise
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_json(path: Path, obj, mode: int = 0o644) -> None:
    """Atomically write pretty JSON."""
    write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode(), mode)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_bounded(path: Path, limit: int, what: str, error: type[Exception]) -> bytes:
    """Read a file of at most `limit` bytes; raise `error` naming the file if it is missing or larger."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > limit or not path.is_file():
            raise error(f"{what} {path} is {size} bytes or not a regular file; the limit is {limit} bytes")
        with open(path, "rb") as fh:
            data = fh.read(limit + 1)
    except OSError as exc:
        raise error(f"{what} {path} cannot be read: {exc.strerror or exc}") from None
    if len(data) > limit:
        raise error(f"{what} {path} grew past the limit of {limit} bytes while it was read")
    return data


def parse_json(data: bytes, what: str, error: type[Exception], top: type = dict):
    """Parse JSON bytes whose top level must be a `top`; raise `error` on anything else."""
    try:
        obj = json.loads(data)
    except (ValueError, RecursionError) as exc:  # bad UTF-8, bad JSON, or nesting too deep to parse
        raise error(f"{what} is not valid JSON ({str(exc)[:200] or type(exc).__name__})") from None
    if not isinstance(obj, top):
        raise error(f"{what}: the top level must be a JSON {'object' if top is dict else top.__name__}, "
                    f"got {type(obj).__name__}")
    return obj
