"""The trainer's reader of verified bundles (`policy.trainer: untrusted`): manifests checked once, with
bounds; every blob's size and SHA-256 on read; vertical chunks aligned on the owners' pseudonyms."""

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hetrain.core import npyfile, shapes, store
from hetrain.core.config import RunConfig
from hetrain.core.errors import AlignmentError, BundleError, DigestMismatch
from hetrain.mpc_ops.exchange.bundle import MAX_BLOB_BYTES, MAX_SAMPLES, _blob_ok, _is_int, read_owner_manifest

MAX_CHUNKS = 4096


@dataclass(frozen=True)
class Chunk:
    """One chunk of samples: its id, split, size and the owners whose ciphertexts make it up."""

    chunk: str
    split: str
    n: int
    owners: tuple[str, ...]
    mask_owner: str


class VerifiedStore:
    """Reads owners' verified bundles from RUN_DIR/exchange."""

    def __init__(self, root: Path, cfg: RunConfig, key_id: str):
        self.root, self.cfg = Path(root), cfg
        self.bytes_read = 0
        self.layer, self.outputs = cfg.model.layers[0].name, cfg.model.layers[0].out_features
        self.offsets = shapes.feature_offsets(cfg)
        self.manifests = {o.name: self._manifest(o.name, key_id) for o in cfg.data.owners}
        self.chunks = self._chunks()

    def _manifest(self, owner: str, key_id: str) -> dict:
        path = self.root / owner / "manifest.json"
        manifest = read_owner_manifest(self.root, owner, key_id)
        declared = next(o for o in self.cfg.data.owners if o.name == owner)
        want = {"kind": "verified", "slots": self.cfg.ckks.params().slots, "layer": self.layer,
                "outputs": self.outputs, "offset": self.offsets[owner]}
        if manifest.get("layout") != want or manifest.get("features") != declared.features:
            raise BundleError(f"owner '{owner}': layout {manifest.get('layout')!s:.200} or features differ from the "
                              f"config's verified plan {want}")
        chunks = manifest.get("chunks")
        if not isinstance(chunks, dict) or not 1 <= len(chunks) <= MAX_CHUNKS:
            raise BundleError(f"owner '{owner}': manifest {path} needs 1..{MAX_CHUNKS} chunks")
        for chunk, entry in chunks.items():
            self._check_chunk(owner, path, chunk, entry, declared)
        return manifest

    def _check_chunk(self, owner: str, path: Path, chunk: str, entry, declared) -> None:
        where = f"owner '{owner}': manifest {path}, chunk {chunk!r:.60}"
        slots = self.cfg.ckks.params().slots
        if not isinstance(entry, dict) or entry.get("split") not in ("train", "test") or not _is_int(entry.get("n")) \
                or not 1 <= entry["n"] <= min(slots, MAX_SAMPLES) or not _blob_ok(entry.get("ids")):
            raise BundleError(f"{where} is malformed (needs split train/test, n in [1, {slots}] and ids)")
        features = entry.get("features")
        want = {str(self.offsets[owner] + j) for j in range(len(declared.features))}
        if not isinstance(features, dict) or set(features) != want or not all(map(_blob_ok, features.values())):
            raise BundleError(f"{where}: 'features' must name one blob per feature {sorted(want, key=int)}")
        masks = entry.get("masks")
        if masks:
            if not isinstance(masks, dict) or set(masks) != {str(k) for k in range(self.outputs)} \
                    or not all(map(_blob_ok, masks.values())) or not _blob_ok(entry.get("mask_values")):
                raise BundleError(f"{where}: 'masks' must name one blob per output 0..{self.outputs - 1}, "
                                  f"with their values")
        if declared.label and not _blob_ok(entry.get("labels")):
            raise BundleError(f"{where}: the label owner's chunk lacks its labels")

    def _chunks(self) -> dict[str, Chunk]:
        """Every chunk with its owners; vertical chunks must be shared by all owners, on the same pseudonyms."""
        out: dict[str, Chunk] = {}
        owners = [o.name for o in self.cfg.data.owners]
        if self.cfg.data.partition == "horizontal":
            for o in owners:
                for chunk, e in self.manifests[o]["chunks"].items():
                    if not e.get("masks"):
                        raise BundleError(f"owner '{o}': chunk '{chunk}' has no masks; each horizontal owner masks "
                                          f"its own chunks")
                    out[chunk] = Chunk(chunk, e["split"], e["n"], (o,), o)
            return out
        label = next(o.name for o in self.cfg.data.owners if o.label)
        for chunk, e in self.manifests[label]["chunks"].items():
            for o in owners:
                other = self.manifests[o]["chunks"].get(chunk)
                if other is None or other["n"] != e["n"] or other["split"] != e["split"]:
                    raise AlignmentError(f"chunk '{chunk}': owner '{o}' does not hold the same {e['n']} "
                                         f"{e['split']} samples as the label owner '{label}'")
                if self._ids(o, chunk) != self._ids(label, chunk):
                    raise AlignmentError(f"chunk '{chunk}': owners '{o}' and '{label}' hold different samples "
                                         f"(their pseudonyms differ); both must align on data.id_column")
            out[chunk] = Chunk(chunk, e["split"], e["n"], tuple(owners), label)
        return out

    def _read(self, owner: str, entry: dict) -> bytes:
        folder = (self.root / owner).resolve()
        path = (folder / entry["file"]).resolve()
        if not path.is_relative_to(folder) or not path.is_file():
            raise BundleError(f"owner '{owner}': blob {entry['file']!r:.200} is missing or outside {folder}")
        size = path.stat().st_size
        if size > MAX_BLOB_BYTES or size != entry["bytes"]:
            raise BundleError(f"owner '{owner}': blob {path} is {size} bytes; the manifest says {entry['bytes']}")
        data = path.read_bytes()
        if store.sha256_bytes(data) != entry["sha256"]:
            raise DigestMismatch(f"owner '{owner}': blob {path} does not match its SHA-256 in the manifest")
        self.bytes_read += len(data)
        return data

    def _ids(self, owner: str, chunk: str) -> list[str]:
        ids = store.parse_json(self._read(owner, self.manifests[owner]["chunks"][chunk]["ids"]),
                               f"owner '{owner}': ids of chunk '{chunk}'", BundleError, top=list)
        return ids

    def chunk_list(self, split: str) -> list[Chunk]:
        return [c for c in self.chunks.values() if c.split == split]

    def features(self, chunk: Chunk) -> list[bytes]:
        """The chunk's feature ciphertexts in the model's input order."""
        blobs = {}
        for o in chunk.owners:
            for j, entry in self.manifests[o]["chunks"][chunk.chunk]["features"].items():
                blobs[int(j)] = self._read(o, entry)
        return [blobs[j] for j in range(len(blobs))]

    def mask(self, chunk: Chunk, output: int) -> bytes:
        return self._read(chunk.mask_owner, self.manifests[chunk.mask_owner]["chunks"][chunk.chunk]["masks"][str(output)])

    def mask_values(self, chunk: Chunk) -> np.ndarray:
        entry = self.manifests[chunk.mask_owner]["chunks"][chunk.chunk]["mask_values"]
        values = npyfile.read_npy(self._read(chunk.mask_owner, entry), f"masks of chunk '{chunk.chunk}'", BundleError)
        if values.shape != (self.outputs, chunk.n) or not np.all(np.isfinite(values)):
            raise BundleError(f"chunk '{chunk.chunk}': mask values of shape {values.shape}; expected "
                              f"({self.outputs}, {chunk.n}) finite values")
        return values

    def labels(self, chunk: Chunk) -> np.ndarray:
        owner = next(o.name for o in self.cfg.data.owners if o.label and o.name in chunk.owners)
        entry = self.manifests[owner]["chunks"][chunk.chunk]["labels"]
        labels = npyfile.read_npy(self._read(owner, entry), f"labels of chunk '{chunk.chunk}'", BundleError)
        if labels.shape != (chunk.n,):
            raise BundleError(f"chunk '{chunk.chunk}': {labels.shape} labels for {chunk.n} samples")
        return labels.astype(np.int64)

    def digest(self) -> str:
        """What the data of this run is: the digest of every owner's manifest."""
        return store.sha256_bytes(json.dumps({o: self.manifests[o] for o in sorted(self.manifests)},
                                             sort_keys=True).encode())
