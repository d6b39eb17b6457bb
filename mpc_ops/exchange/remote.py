"""The exchange store at a path or an fsspec URL: owners publish to it, the trainer mirrors from it.

With `exchange.url` unset, owners write straight into RUN_DIR/exchange and nothing here runs. With
it set (a shared folder such as /mnt/shared/hetrain, or file://, s3://, gs://, az://, memory://, …):

- an owner prepares its bundle in a local outbox, then `publish_owner` uploads every blob its
  manifest names and uploads the manifest last, so a reader never sees a manifest naming a blob that
  is not there yet; generation folders older than the previous manifest's are then removed;
- the trainer's `mirror_owner` copies an owner's bundle into RUN_DIR/exchange, its local cache:
  the manifest is read first (bounded), every blob is checked for size before it is fetched and for
  SHA-256 after, and the manifest is written locally last. A round reads every blob of every batch,
  so reading from the local cache costs a disk read, not a round trip; an unchanged bundle costs one
  manifest read per round. ExchangeStore then checks key id, layout and digests as for a local run.

Everything read from the URL is untrusted: sizes are bounded, file names must stay inside the
owner's folder, and a bad entry stops the mirror before anything local is replaced.
"""

import os
import re
import shutil
from pathlib import Path, PurePosixPath

from hetrain.core import store
from hetrain.mpc_ops.exchange.bundle import MAX_BLOB_BYTES, MAX_MANIFEST_BYTES
from hetrain.core.errors import BundleError, DigestMismatch, ExchangeUnavailable, HetrainError

MANIFEST = "manifest.json"
PUBLIC_CONTEXT = "public_context.bin"
_HEX64 = re.compile(r"[0-9a-f]{64}")


def check_url(url: str) -> None:
    """Raise ValueError unless fsspec knows the URL's protocol and its package is installed."""
    import fsspec
    from fsspec.utils import get_protocol

    if "::" in url:
        raise ValueError(f"exchange.url must be a single path or URL, not a chained fsspec URL; got {url!r}")
    protocol = get_protocol(url)
    known = fsspec.available_protocols()
    if protocol not in known:
        raise ValueError(f"exchange.url {url!r}: protocol {protocol!r} is not one fsspec knows "
                         f"(for example file, memory, s3, gs, az, sftp, smb; all: {', '.join(sorted(known))})")
    try:
        fsspec.get_filesystem_class(protocol)
    except ImportError as exc:
        raise ValueError(f"exchange.url {url!r}: protocol {protocol!r} needs a package that is not installed "
                         f"({exc}); install it in every environment that runs a trainer or an owner") from None


class RemoteExchange:
    """One exchange store at `url`, read and written through fsspec."""

    def __init__(self, url: str, storage_options: dict | None = None):
        from fsspec.core import url_to_fs

        self.url = url.rstrip("/")
        try:
            self.fs, self.root = url_to_fs(url, **(storage_options or {}))
        except Exception as exc:  # an unknown storage option, a malformed URL for that protocol
            raise ExchangeUnavailable(f"exchange store {self.url}: cannot open it with storage_options "
                                      f"{sorted(storage_options or {})} ({type(exc).__name__}: {str(exc)[:300]})") from None
        self.root = self.root.rstrip("/")
        self.local = type(self.fs).__name__ == "LocalFileSystem"
        self.bytes_fetched = self.bytes_published = 0

    def where(self, rel: str) -> str:
        return f"{self.url}/{rel}"

    def _path(self, rel: str) -> str:
        return f"{self.root}/{rel}"

    # ---- reading -------------------------------------------------------------------------------

    def _do(self, what: str, fn, *args, **kwargs):
        """One filesystem call; anything but a missing file becomes ExchangeUnavailable naming the URL."""
        try:
            return fn(*args, **kwargs)
        except (FileNotFoundError, HetrainError):
            raise
        except Exception as exc:  # fsspec backends raise their own types (botocore, aiohttp, paramiko, …)
            raise ExchangeUnavailable(
                f"exchange store {self.url}: {what} failed ({type(exc).__name__}: {str(exc)[:300]}); check "
                f"exchange.url, exchange.storage_options and the store's credentials in this environment") from None

    def size(self, rel: str) -> int | None:
        try:
            return int(self._do(f"size of {rel}", self.fs.size, self._path(rel)))
        except FileNotFoundError:
            return None

    def read(self, rel: str, limit: int, what: str) -> bytes:
        """The object at `rel`, refused before download if it is missing or larger than `limit`."""
        size = self.size(rel)
        if size is None:
            raise BundleError(f"{what}: nothing at {self.where(rel)}")
        if size > limit:
            raise BundleError(f"{what} {self.where(rel)} is {size} bytes; the limit is {limit} bytes")
        try:
            data = self._do(f"reading {rel}", self.fs.cat_file, self._path(rel))
        except FileNotFoundError:
            raise BundleError(f"{what} {self.where(rel)} disappeared while it was read (is it being republished?)") from None
        if len(data) > limit:
            raise BundleError(f"{what} {self.where(rel)} grew past the limit of {limit} bytes while it was read")
        self.bytes_fetched += len(data)
        return data

    def manifest_bytes(self, owner: str) -> bytes | None:
        """An owner's published manifest, or None if it has published nothing yet."""
        if self.size(f"{owner}/{MANIFEST}") is None:
            return None
        return self.read(f"{owner}/{MANIFEST}", MAX_MANIFEST_BYTES, f"owner '{owner}': manifest")

    # ---- writing -------------------------------------------------------------------------------

    def write(self, rel: str, data: bytes) -> None:
        """Put one object whole: object stores replace atomically; a folder gets a temporary name and a rename."""
        try:
            self._write(rel, data)
        except FileNotFoundError as exc:  # a folder that cannot be made there
            raise ExchangeUnavailable(f"exchange store {self.url}: writing {rel} failed ({exc})") from None
        self.bytes_published += len(data)

    def _write(self, rel: str, data: bytes) -> None:
        path = self._path(rel)
        self._do(f"writing {rel}", self.fs.makedirs, path.rsplit("/", 1)[0], exist_ok=True)
        if self.local:
            tmp = f"{path}.tmp-{os.urandom(4).hex()}"
            self._do(f"writing {rel}", self.fs.pipe_file, tmp, data)
            self._do(f"writing {rel}", self.fs.mv, tmp, path)
        else:
            self._do(f"writing {rel}", self.fs.pipe_file, path, data)

    def publish_public_context(self, data: bytes) -> None:
        if self.size(PUBLIC_CONTEXT) != len(data) or self.read(PUBLIC_CONTEXT, len(data), "public context") != data:
            self.write(PUBLIC_CONTEXT, data)

    def publish_owner(self, outbox: Path, owner: str) -> dict:
        """Upload the bundle in `outbox` (the owner's folder: manifest.json and its generation folders).

        Blobs first, manifest last; returns how many files and bytes were uploaded.
        """
        self.fs.invalidate_cache()  # another process may have written since this filesystem listed anything
        data = (Path(outbox) / MANIFEST).read_bytes()
        entries = blob_entries(store.parse_json(data, f"owner '{owner}': manifest", BundleError), owner)
        previous = self.manifest_bytes(owner)
        uploaded = [0, 0]
        for entry in entries:
            rel = f"{owner}/{entry['file']}"
            if self.size(rel) == entry["bytes"]:  # generation folders are never rewritten in place
                continue
            blob = (Path(outbox) / entry["file"]).read_bytes()
            self.write(rel, blob)
            uploaded[0] += 1
            uploaded[1] += len(blob)
        if previous != data:
            self.write(f"{owner}/{MANIFEST}", data)
        keep = _generations(entries)
        if previous is not None and previous != data:  # a trainer may still be mirroring the previous one
            try:
                keep |= _generations(blob_entries(store.parse_json(previous, "old manifest", BundleError), owner))
            except BundleError:
                pass
        self._remove_generations(owner, keep)
        return {"files": uploaded[0], "bytes": uploaded[1]}

    def _remove_generations(self, owner: str, keep: set[str]) -> None:
        try:
            listed = self._do(f"listing {owner}/", self.fs.ls, self._path(owner), detail=False)
        except FileNotFoundError:
            return
        for path in listed:
            name = PurePosixPath(path).name
            if name.startswith("g-") and name not in keep:
                self._do(f"removing {owner}/{name}", self.fs.rm, path, recursive=True)

    # ---- the trainer's mirror ------------------------------------------------------------------

    def mirror_owner(self, owner: str, local_root: Path) -> dict:
        """Copy an owner's published bundle into local_root/<owner>; returns files and bytes fetched.

        Nothing local changes unless every blob arrived with the size and SHA-256 its manifest gives.
        """
        self.fs.invalidate_cache()  # owners publish from other processes: sizes must not come from old listings
        data = self.manifest_bytes(owner)
        if data is None:
            raise BundleError(f"owner '{owner}': no manifest at {self.where(f'{owner}/{MANIFEST}')}; "
                              f"run the owner's preparation first")
        entries = blob_entries(store.parse_json(data, f"owner '{owner}': manifest {self.where(owner)}", BundleError),
                               owner)
        folder = Path(local_root) / owner
        manifest_path = folder / MANIFEST
        if manifest_path.is_file() and manifest_path.read_bytes() == data and all(
                _local_ok(folder / e["file"], e, check_digest=False) for e in entries):
            return {"files": 0, "bytes": 0}
        fetched = [0, 0]
        for entry in entries:
            target = folder / entry["file"]
            if _local_ok(target, entry, check_digest=True):
                continue
            rel = f"{owner}/{entry['file']}"
            size = self.size(rel)
            if size != entry["bytes"]:
                raise BundleError(
                    f"owner '{owner}': blob {self.where(rel)} is "
                    f"{'missing' if size is None else f'{size} bytes'}; its manifest says {entry['bytes']} bytes "
                    f"(a torn or tampered upload, or the owner is publishing again: rerun)")
            blob = self.read(rel, entry["bytes"], f"owner '{owner}': blob")
            actual = store.sha256_bytes(blob)
            if actual != entry["sha256"]:
                raise DigestMismatch(
                    f"owner '{owner}': blob {self.where(rel)} has SHA-256 {actual}, its manifest says "
                    f"{entry['sha256']}; refusing a tampered or torn ciphertext (the owner must publish again)")
            store.write_bytes(target, blob)
            fetched[0] += 1
            fetched[1] += len(blob)
        store.write_bytes(manifest_path, data)  # last: the local manifest only ever names complete blobs
        keep = _generations(entries)
        for old in folder.glob("g-*"):
            if old.name not in keep:
                shutil.rmtree(old, ignore_errors=True)
        return {"files": fetched[0], "bytes": fetched[1]}


def blob_entries(manifest: dict, owner: str) -> list[dict]:
    """Every {file, sha256, bytes} entry anywhere in a manifest, each checked to name a file inside the owner's folder."""
    found: list[dict] = []

    def walk(node, depth: int) -> None:
        if depth > 8:
            raise BundleError(f"owner '{owner}': manifest nests deeper than a bundle manifest does")
        if isinstance(node, dict):
            if "file" in node and "sha256" in node:
                found.append(_checked(node, owner))
                return
            for value in node.values():
                walk(value, depth + 1)
        elif isinstance(node, list):
            for value in node:
                walk(value, depth + 1)

    walk(manifest, 0)
    return found


def _checked(entry: dict, owner: str) -> dict:
    name, size, digest = entry.get("file"), entry.get("bytes"), entry.get("sha256")
    parts = PurePosixPath(name).parts if isinstance(name, str) else ()
    if (not isinstance(name, str) or not 0 < len(name) <= 512 or "\0" in name or "\\" in name
            or name.startswith("/") or not parts or any(p in ("..", ".") for p in parts) or not parts[0].startswith("g-")):
        raise BundleError(f"owner '{owner}': manifest names the file {name!r:.80}; allowed: a relative path of "
                          f"1..512 characters inside a generation folder (g-…), without '..'")
    if not (isinstance(size, int) and not isinstance(size, bool) and 0 < size <= MAX_BLOB_BYTES) \
            or not (isinstance(digest, str) and _HEX64.fullmatch(digest)):
        raise BundleError(f"owner '{owner}': manifest entry {name!r:.80} needs bytes in [1, {MAX_BLOB_BYTES}] and a "
                          f"sha256 of 64 hex digits")
    return entry


def _generations(entries: list[dict]) -> set[str]:
    return {PurePosixPath(e["file"]).parts[0] for e in entries}


def _local_ok(path: Path, entry: dict, check_digest: bool) -> bool:
    try:
        if not path.is_file() or path.stat().st_size != entry["bytes"]:
            return False
        return not check_digest or store.sha256_file(path) == entry["sha256"]
    except OSError:
        return False

