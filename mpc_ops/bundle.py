"""The trainer's view of the exchange store: manifests checked once, blobs checked on every read."""

import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import store
from .config import RunConfig
from .errors import AlignmentError, BundleError, DigestMismatch, ForeignKeyError
from .packing import PackingPlan
from .tensors import EncryptedBatch, OwnerPart, PlainBatch

MAX_BLOB_BYTES = 8 << 20


@dataclass(frozen=True)
class BatchRef:
    """One training or test batch: which owners' batch index b it is made of."""

    split: str
    owners: tuple[str, ...]
    index: int

    @property
    def batch_id(self) -> str:
        return f"{self.split}/{'+'.join(self.owners)}/b{self.index:04d}"


def _check_structure(owner: str, path: Path, manifest: dict) -> None:
    """Every split, batch and blob entry has the fields the reader relies on."""
    def blob_ok(e) -> bool:
        return isinstance(e, dict) and isinstance(e.get("file"), str) and isinstance(e.get("sha256"), str) \
            and isinstance(e.get("bytes"), int)

    splits = manifest.get("splits")
    for split in ("train", "test"):
        s = splits.get(split) if isinstance(splits, dict) else None
        if not isinstance(s, dict) or not isinstance(s.get("n"), int) or not blob_ok(s.get("ids")) \
                or not isinstance(s.get("batches"), list):
            raise BundleError(f"owner '{owner}': manifest {path} lacks a well-formed '{split}' split "
                              f"(needs n, ids and batches)")
        for b, batch in enumerate(s["batches"]):
            if not isinstance(batch, dict) or not isinstance(batch.get("n"), int) or batch["n"] < 1 \
                    or not all(blob_ok(e) for e in batch.get("rows", [None]) + batch.get("cols", [])
                               + batch.get("column", [])):
                raise BundleError(f"owner '{owner}': manifest {path}, {split} batch {b} is malformed "
                                  f"(needs n >= 1 and rows/cols entries with file, sha256, bytes)")
    labels = manifest.get("labels")
    if labels is not None and not (isinstance(labels, dict) and all(blob_ok(labels.get(s)) for s in ("train", "test"))):
        raise BundleError(f"owner '{owner}': manifest {path} has malformed label entries")


class ExchangeStore:
    """Reads owners' bundles from RUN_DIR/exchange after checking key id, layout and alignment."""

    def __init__(self, root: Path, cfg: RunConfig, key_id: str, plan: PackingPlan):
        self.root, self.cfg, self.plan = Path(root), cfg, plan
        self.bytes_read = 0
        self._labels: dict[tuple[str, str], np.ndarray] = {}
        self.manifests = {o.name: self._manifest(o.name, key_id) for o in cfg.data.owners}
        self.feature_index, offset = {}, 0
        for o in cfg.data.owners:
            width = len(o.features)
            self.feature_index[o.name] = np.arange(offset, offset + width)
            if cfg.data.partition == "vertical":
                offset += width
        if cfg.data.partition == "vertical":
            self._check_alignment()

    def _manifest(self, owner: str, key_id: str) -> dict:
        path = self.root / owner / "manifest.json"
        if not path.is_file():
            raise BundleError(f"owner '{owner}': no manifest at {path}; run the owner's preparation first")
        try:
            manifest = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise BundleError(f"owner '{owner}': manifest {path} is not valid JSON ({exc})") from None
        if manifest.get("key_id") != key_id:
            raise ForeignKeyError(
                f"owner '{owner}': bundle was encrypted under key id {manifest.get('key_id')!r}, "
                f"but the key holder's key id is {key_id!r}; the owner must re-encrypt"
            )
        want = {"slots": self.plan.slots, "seg": self.plan.seg, "samples_per_ct": self.plan.samples_per_ct,
                "forward": self.plan.forward}
        if manifest.get("layout") != want:
            raise BundleError(f"owner '{owner}': layout {manifest.get('layout')} differs from the plan {want}")
        declared = next(o for o in self.cfg.data.owners if o.name == owner)
        if manifest.get("owner") != owner or manifest.get("features") != declared.features:
            raise BundleError(
                f"owner '{owner}': manifest {path} is for owner {manifest.get('owner')!r} with features "
                f"{manifest.get('features')}, but the config declares {declared.features}"
            )
        _check_structure(owner, path, manifest)
        return manifest

    def _check_alignment(self) -> None:
        names = list(self.manifests)
        for split in ("train", "test"):
            ids = {n: json.loads(self._read(n, self.manifests[n]["splits"][split]["ids"])) for n in names}
            ref = ids[names[0]]
            for other in names[1:]:
                if ids[other] != ref:
                    missing = len(set(ref) - set(ids[other]))
                    extra = len(set(ids[other]) - set(ref))
                    raise AlignmentError(
                        f"owners '{names[0]}' and '{other}' do not hold the same IDs in the {split} split: "
                        f"{len(ref)} vs {len(ids[other])} IDs, {missing} of '{names[0]}' missing at "
                        f"'{other}', {extra} of '{other}' unknown to '{names[0]}'; vertical partitions "
                        f"must share every ID"
                    )

    def _read(self, owner: str, entry: dict) -> bytes:
        folder = (self.root / owner).resolve()
        path = (folder / entry["file"]).resolve()
        if not path.is_relative_to(folder):
            raise BundleError(f"owner '{owner}': manifest names {entry['file']!r}, outside the owner's folder {folder}")
        if not path.is_file():
            raise BundleError(f"owner '{owner}': blob {path} named in the manifest is missing")
        size = path.stat().st_size
        if size > MAX_BLOB_BYTES or size != entry["bytes"]:
            raise BundleError(
                f"owner '{owner}': blob {path} is {size} bytes; the manifest says {entry['bytes']} "
                f"(limit {MAX_BLOB_BYTES})"
            )
        data = path.read_bytes()
        actual = store.sha256_bytes(data)
        if actual != entry["sha256"]:
            raise DigestMismatch(  # whole digests: a manifest edited in its last digits must not look equal
                f"owner '{owner}': blob {path} has SHA-256 {actual}, the manifest says {entry['sha256']}; refusing a tampered or torn ciphertext (the owner must publish "
                f"its bundle again: remove {self.root / owner / 'manifest.json'} and rerun, and it re-encrypts)"
            )
        self.bytes_read += size
        return data

    def batches(self, split: str) -> list[BatchRef]:
        """Every batch of a split, owner by owner (horizontal) or across owners (vertical)."""
        if self.cfg.data.partition == "vertical":
            names = tuple(self.manifests)
            count = len(self.manifests[names[0]]["splits"][split]["batches"])
            return [BatchRef(split, names, b) for b in range(count)]
        return [BatchRef(split, (name,), b) for name, m in self.manifests.items()
                for b in range(len(m["splits"][split]["batches"]))]

    def load(self, ref: BatchRef) -> EncryptedBatch:
        """Read and verify the ciphertexts of one batch."""
        parts, n = [], None
        for owner in ref.owners:
            entry = self.manifests[owner]["splits"][ref.split]["batches"][ref.index]
            n = entry["n"] if n is None else n
            if entry["n"] != n:
                raise AlignmentError(f"batch {ref.batch_id}: owners disagree on its size ({n} vs {entry['n']})")
            parts.append(OwnerPart(
                owner, self.feature_index[owner],
                [self._read(owner, e) for e in entry["rows"]],
                [self._read(owner, e) for e in entry["cols"]],
                [self._read(owner, e) for e in entry.get("column", [])],
            ))
        return EncryptedBatch(ref.batch_id, n, parts)

    def labels(self, ref: BatchRef) -> np.ndarray:
        """Plaintext labels of one batch, revealed to the trainer by policy `labels: reveal`.

        Each owner's label file is read and verified once per store, not once per batch.
        """
        vertical = self.cfg.data.partition == "vertical"
        owner = next(o.name for o in self.cfg.data.owners if o.label and (vertical or o.name in ref.owners))
        key = (owner, ref.split)
        if key not in self._labels:
            entry = self.manifests[owner]["labels"][ref.split]
            self._labels[key] = np.load(io.BytesIO(self._read(owner, entry)), allow_pickle=False)
        return self._labels[key][self._slice(owner, ref)]

    def _slice(self, owner: str, ref: BatchRef) -> slice:
        batches = self.manifests[owner]["splits"][ref.split]["batches"]
        start = sum(b["n"] for b in batches[: ref.index])
        return slice(start, start + batches[ref.index]["n"])

    def twin_batch(self, twin_dir: Path, ref: BatchRef) -> PlainBatch:
        """One owner's plaintext twin features for a batch, from its twin file (diagnostic only)."""
        (owner,) = ref.owners
        with np.load(Path(twin_dir) / f"{owner}.npz") as data:
            return PlainBatch(ref.batch_id, data[ref.split][self._slice(owner, ref)])
