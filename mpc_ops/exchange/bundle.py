"""The trainer's view of the exchange store: manifests checked once, blobs checked on every read."""

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hetrain.core import npyfile, shapes, store
from hetrain.core.config import RunConfig
from hetrain.core.errors import AlignmentError, BundleError, DigestMismatch, ForeignKeyError
from hetrain.mpc_ops.layers.packing import PackingPlan
from hetrain.mpc_ops.crypto.tensors import EncryptedBatch, OwnerPart, PlainBatch

MAX_BLOB_BYTES = 8 << 20
MAX_MANIFEST_BYTES = 16 << 20
MAX_SAMPLES = 10**7
_HEX64 = re.compile(r"[0-9a-f]{64}")
_ID = re.compile(r"[0-9a-f]{24}")


@dataclass(frozen=True)
class BatchRef:
    """One training or test batch: which owners' batch index b it is made of."""

    split: str
    owners: tuple[str, ...]
    index: int

    @property
    def batch_id(self) -> str:
        return f"{self.split}/{'+'.join(self.owners)}/b{self.index:04d}"


def _blob_ok(e) -> bool:
    return isinstance(e, dict) and isinstance(e.get("file"), str) and 0 < len(e["file"]) <= 512 \
        and "\0" not in e["file"] and isinstance(e.get("sha256"), str) and _HEX64.fullmatch(e["sha256"]) is not None \
        and _is_int(e.get("bytes")) and 0 < e["bytes"] <= MAX_BLOB_BYTES


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_structure(owner: str, path: Path, manifest: dict, plan: PackingPlan, cfg: RunConfig) -> None:
    """Every split, batch and blob entry has the fields, counts and sizes the reader and the layers rely on."""
    declared = next(o for o in cfg.data.owners if o.name == owner)
    splits = manifest.get("splits")
    for split in ("train", "test"):
        s = splits.get(split) if isinstance(splits, dict) else None
        if not isinstance(s, dict) or not _is_int(s.get("n")) or not 1 <= s["n"] <= MAX_SAMPLES \
                or not _blob_ok(s.get("ids")) or not isinstance(s.get("batches"), list) \
                or not 1 <= len(s["batches"]) <= s["n"]:
            raise BundleError(f"owner '{owner}': manifest {path} lacks a well-formed '{split}' split "
                              f"(needs n in [1, {MAX_SAMPLES}], ids, and 1..n batches)")
        for b, batch in enumerate(s["batches"]):
            _check_batch(owner, path, split, b, batch, plan, cfg, len(declared.features))
        total = sum(batch["n"] for batch in s["batches"])
        if total != s["n"]:
            raise BundleError(f"owner '{owner}': manifest {path}, {split} batches hold {total} samples but the "
                              f"split declares n={s['n']}")
    labels = manifest.get("labels")
    if declared.label and not (isinstance(labels, dict) and all(_blob_ok(labels.get(s)) for s in ("train", "test"))):
        raise BundleError(f"owner '{owner}': manifest {path} has malformed or missing label entries "
                          f"(the config says this owner holds the labels)")


def _check_batch(owner: str, path: Path, split: str, b: int, batch, plan: PackingPlan, cfg: RunConfig,
                 n_features: int) -> None:
    """One batch entry: n in range, and exactly as many blobs per layout as the plan needs for n samples."""
    where = f"owner '{owner}': manifest {path}, {split} batch {b}"
    largest = 2 * cfg.train.batch_size  # a short tail joins the batch before it
    if not isinstance(batch, dict) or not _is_int(batch.get("n")) or not 1 <= batch["n"] <= largest:
        raise BundleError(f"{where} is malformed (needs n in [1, {largest}])")
    n = batch["n"]
    want = {"rows": len(plan.chunks(n)) if plan.forward == "rows" else 0,
            "cols": len(plan.chunks(n)) if split == "train" else 0,
            "column": len(plan.column_chunks(n)) * n_features if plan.forward == "column" else 0}
    for layout, count in want.items():
        entries = batch.get(layout, [])
        if not isinstance(entries, list) or len(entries) != count:
            got = len(entries) if isinstance(entries, list) else type(entries).__name__
            raise BundleError(f"{where}: '{layout}' must list {count} blob entries for {n} samples; got {got}")
        bad = next((i for i, e in enumerate(entries) if not _blob_ok(e)), None)
        if bad is not None:
            raise BundleError(f"{where} is malformed: '{layout}' entry {bad} needs a file name of 1..512 characters, "
                              f"a sha256 of 64 hex digits and bytes in [1, {MAX_BLOB_BYTES}]")


def read_owner_manifest(root: Path, owner: str, key_id: str) -> dict:
    """An owner's manifest from the exchange store: present, bounded, a JSON object, under this key id
    (every layout's reader starts here, then checks its own layout)."""
    path = Path(root) / owner / "manifest.json"
    if not path.exists():
        raise BundleError(f"owner '{owner}': no manifest at {path}; run the owner's preparation first")
    data = store.read_bounded(path, MAX_MANIFEST_BYTES, f"owner '{owner}': manifest", BundleError)
    manifest = store.parse_json(data, f"owner '{owner}': manifest {path}", BundleError)
    if manifest.get("key_id") != key_id:
        raise ForeignKeyError(
            f"owner '{owner}': bundle was encrypted under key id {manifest.get('key_id')!r:.80}, "
            f"but the key holder's key id is {key_id!r}; the owner must re-encrypt"
        )
    return manifest


class ExchangeStore:
    """Reads owners' bundles from RUN_DIR/exchange after checking key id, layout and alignment."""

    def __init__(self, root: Path, cfg: RunConfig, key_id: str, plan: PackingPlan):
        self.root, self.cfg, self.plan = Path(root), cfg, plan
        self.bytes_read = 0
        self._labels: dict[tuple[str, str], np.ndarray] = {}
        self._id_cache: dict[tuple[str, str], list[str]] = {}
        self.manifests = {o.name: self._manifest(o.name, key_id) for o in cfg.data.owners}
        offsets = shapes.feature_offsets(cfg)
        self.feature_index = {o.name: np.arange(offsets[o.name], offsets[o.name] + len(o.features))
                              for o in cfg.data.owners}
        if cfg.data.partition == "vertical":
            self._check_alignment()

    def _manifest(self, owner: str, key_id: str) -> dict:
        path = self.root / owner / "manifest.json"
        manifest = read_owner_manifest(self.root, owner, key_id)
        want = {"slots": self.plan.slots, "seg": self.plan.seg, "samples_per_ct": self.plan.samples_per_ct,
                "forward": self.plan.forward}
        if manifest.get("layout") != want:
            raise BundleError(f"owner '{owner}': layout {manifest.get('layout')!s:.200} differs from the plan {want}")
        declared = next(o for o in self.cfg.data.owners if o.name == owner)
        if manifest.get("owner") != owner or manifest.get("features") != declared.features:
            raise BundleError(
                f"owner '{owner}': manifest {path} is for owner {manifest.get('owner')!r:.80} with features "
                f"{manifest.get('features')!s:.200}, but the config declares {declared.features}"
            )
        _check_structure(owner, path, manifest, self.plan, self.cfg)
        return manifest

    def _ids(self, owner: str, split: str) -> list[str]:
        """An owner's keyed-hash pseudonyms of one split: a JSON list of n 24-digit hex strings."""
        entry = self.manifests[owner]["splits"][split]
        what = f"owner '{owner}': {split} ids {entry['ids']['file']!r}"
        ids = store.parse_json(self._read(owner, entry["ids"]), what, BundleError, list)
        if len(ids) != entry["n"] or not all(isinstance(i, str) and _ID.fullmatch(i) for i in ids):
            raise BundleError(f"{what}: must list {entry['n']} pseudonyms of 24 hex digits; got {len(ids)} entries")
        return ids

    def _check_alignment(self) -> None:
        names = list(self.manifests)
        for split in ("train", "test"):
            ids = {n: self._ids(n, split) for n in names}
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
            sizes = {n: [b["n"] for b in self.manifests[n]["splits"][split]["batches"]] for n in names}
            for other in names[1:]:
                if sizes[other] != sizes[names[0]]:
                    raise AlignmentError(
                        f"owners '{names[0]}' and '{other}' cut the {split} split into different batches "
                        f"({sizes[names[0]][:8]} vs {sizes[other][:8]}…); vertical partitions must batch alike"
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
                [self._read(owner, e) for e in entry.get("rows", [])],
                [self._read(owner, e) for e in entry.get("cols", [])],
                [self._read(owner, e) for e in entry.get("column", [])],
            ))
        return EncryptedBatch(ref.batch_id, n, parts, self.row_ids(ref))

    def row_ids(self, ref: BatchRef) -> list[str]:
        """The pseudonyms of a batch's samples (every owner's are equal: checked at alignment)."""
        owner = ref.owners[0]
        key = (owner, ref.split)
        if key not in self._id_cache:
            self._id_cache[key] = self._ids(owner, ref.split)
        return self._id_cache[key][self._slice(owner, ref)]

    def labels(self, ref: BatchRef) -> np.ndarray:
        """Plaintext labels of one batch, revealed to the trainer by policy `labels: reveal`.

        Each owner's label file is read and verified once per store, not once per batch.
        """
        vertical = self.cfg.data.partition == "vertical"
        owner = next(o.name for o in self.cfg.data.owners if o.label and (vertical or o.name in ref.owners))
        key = (owner, ref.split)
        if key not in self._labels:
            self._labels[key] = self._read_labels(owner, ref.split)
        return self._labels[key][self._slice(owner, ref)]

    def _read_labels(self, owner: str, split: str) -> np.ndarray:
        """One label file: n integer labels in [0, num_classes), checked before numpy allocates anything."""
        entry, n = self.manifests[owner]["labels"][split], self.manifests[owner]["splits"][split]["n"]
        what = f"owner '{owner}': {split} labels {entry['file']!r}"
        labels = npyfile.read_npy(self._read(owner, entry), what, BundleError, kinds="iu")
        classes = self.cfg.data.num_classes
        if labels.shape != (n,) or (n and (labels.min() < 0 or labels.max() >= classes)):
            raise BundleError(f"{what}: must hold {n} integer labels in [0, {classes - 1}]; got shape {labels.shape}"
                              f"{f', range [{labels.min()}, {labels.max()}]' if labels.size else ''}")
        return labels.astype(np.int64)

    def _slice(self, owner: str, ref: BatchRef) -> slice:
        batches = self.manifests[owner]["splits"][ref.split]["batches"]
        start = sum(b["n"] for b in batches[: ref.index])
        return slice(start, start + batches[ref.index]["n"])

    def twin_batch(self, twin_dir: Path, ref: BatchRef) -> PlainBatch:
        """One owner's plaintext twin features for a batch, from its twin file (diagnostic only)."""
        (owner,) = ref.owners
        with np.load(Path(twin_dir) / f"{owner}.npz") as data:
            return PlainBatch(ref.batch_id, data[ref.split][self._slice(owner, ref)])
