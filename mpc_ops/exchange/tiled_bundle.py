"""The trainer's reader of tiled bundles: key id and layout checked once, every blob's digest on read.

Under `labels: encrypted` it has no way to read a plaintext label: the label owner publishes
none, and `labels()` refuses.
"""

import io
import json
from pathlib import Path

import numpy as np

from hetrain.core import store
from hetrain.mpc_ops.exchange.bundle import MAX_BLOB_BYTES, BatchRef, read_owner_manifest
from hetrain.mpc_ops.layers.circuit import CipherOps, Val
from hetrain.core.errors import AlignmentError, BundleError, DigestMismatch
from hetrain.mpc_ops.layers.tiled import Tiling
from hetrain.mpc_ops.layers.tiled_net import Inputs


TiledRef = BatchRef  # a tiled batch is named like any other: split, owners, index


class TiledStore:
    def __init__(self, root: Path, cfg, key_id: str, tiling: Tiling):
        self.root, self.cfg, self.tiling = Path(root), cfg, tiling
        self.bytes_read = 0
        self._ids: dict = {}
        self.manifests = {}
        for o in cfg.data.owners:
            manifest = read_owner_manifest(self.root, o.name, key_id)
            layout = manifest.get("layout", {})
            if layout.get("kind") != "tiled" or layout.get("slots") != tiling.slots or layout.get("n") != tiling.n:
                raise BundleError(f"owner '{o.name}': layout {layout} differs from the tiled plan "
                                  f"(slots {tiling.slots}, block width {tiling.n})")
            if manifest.get("labels_policy") != cfg.policy.labels:
                raise BundleError(f"owner '{o.name}': bundle made for labels: {manifest.get('labels_policy')}, "
                                  f"the policy says labels: {cfg.policy.labels}")
            self.manifests[o.name] = manifest

    def _read(self, owner: str, entry: dict) -> bytes:
        folder = (self.root / owner).resolve()
        path = (folder / entry["file"]).resolve()
        if not path.is_relative_to(folder) or not path.is_file():
            raise BundleError(f"owner '{owner}': blob {entry['file']!r} is missing or outside {folder}")
        data = path.read_bytes()
        if len(data) > MAX_BLOB_BYTES or len(data) != entry["bytes"]:
            raise BundleError(f"owner '{owner}': blob {path} is {len(data)} bytes; the manifest says {entry['bytes']}")
        if store.sha256_bytes(data) != entry["sha256"]:
            raise DigestMismatch(f"owner '{owner}': blob {path} does not match its SHA-256 in the manifest")
        self.bytes_read += len(data)
        return data

    def batches(self, split: str) -> list[TiledRef]:
        if self.cfg.data.partition == "vertical":
            names = tuple(self.manifests)
            return [TiledRef(split, names, b) for b in range(len(self.manifests[names[0]]["splits"][split]["batches"]))]
        return [TiledRef(split, (name,), b) for name, m in self.manifests.items()
                for b in range(len(m["splits"][split]["batches"]))]

    def _entry(self, owner: str, ref: TiledRef) -> dict:
        return self.manifests[owner]["splits"][ref.split]["batches"][ref.index]

    def row_ids(self, ref: TiledRef) -> list[str]:
        owner = ref.owners[0]
        if (owner, ref.split) not in self._ids:
            self._ids[(owner, ref.split)] = json.loads(self._read(owner, self.manifests[owner]["splits"][ref.split]["ids"]))
        batches = self.manifests[owner]["splits"][ref.split]["batches"]
        start = sum(b["n"] for b in batches[: ref.index])
        return self._ids[(owner, ref.split)][start : start + batches[ref.index]["n"]]

    def size(self, ref: TiledRef) -> int:
        sizes = {self._entry(o, ref)["n"] for o in ref.owners}
        if len(sizes) != 1:
            raise AlignmentError(f"batch {ref.batch_id}: owners disagree on its size ({sorted(sizes)})")
        return sizes.pop()

    def load(self, ops: CipherOps, ref: TiledRef, public_labels: bool, features: bool = True) -> Inputs:
        """The batch's ciphertexts as Vals: replicated columns in input order, the summed block vector.
        Without `features` only the labels are read (a frozen layer's outputs are cached)."""
        rep, block, enc = [], None, None
        for owner in ref.owners:
            entry = self._entry(owner, ref)
            if features:
                rep += [ops.load(self._read(owner, e)) for e in entry["rep"]]
            if features and entry["block"] is not None:
                part = ops.load(self._read(owner, entry["block"]))
                block = part if block is None else ops.add(block, part)  # disjoint blocks: a sum joins them
            if entry["labels"]:
                enc = [ops.load(self._read(owner, e)) for e in entry["labels"]]
        labels = self.labels(ref) if public_labels else None
        return Inputs(self.size(ref), rep, block or Val(None, 0, True), labels=labels, enc_labels=enc,
                      rows=self.row_ids(ref), batch_id=ref.batch_id)

    def labels(self, ref: TiledRef) -> np.ndarray:
        """Plaintext labels of a batch: only under policy labels: reveal."""
        if self.cfg.policy.labels != "reveal":
            raise BundleError("policy.labels is 'encrypted': the trainer has no plaintext labels to read")
        owner = next(o.name for o in self.cfg.data.owners if o.label and o.name in ref.owners or
                     (o.label and self.cfg.data.partition == "vertical"))
        entry = self.manifests[owner]["labels"][ref.split]
        labels = np.load(io.BytesIO(self._read(owner, entry)), allow_pickle=False)
        batches = self.manifests[owner]["splits"][ref.split]["batches"]
        start = sum(b["n"] for b in batches[: ref.index])
        return labels[start : start + batches[ref.index]["n"]]
