"""A data owner under `policy.trainer: untrusted`: column-packed features, owner-made masks, MAC tags.

Per chunk of up to `slots` samples the owner encrypts one ciphertext per feature (slot i = sample i) and,
if it is the chunk's mask owner (the label owner of a vertical split, every owner of a horizontal one),
one mask Enc(r) at scale Δ² per output of the ciphertext layer. It publishes the ciphertexts, the masks'
plaintexts r (for the trainer, to unmask), pseudonyms and, under `labels: reveal`, labels. It tags every
ciphertext with the key holder's MAC key and returns the tags, which go to the key holder only.
"""

import json
import os
import shutil
from pathlib import Path

import numpy as np
import tenseal as ts

from hetrain.core import shapes, store
from hetrain.core.config import OwnerConfig, RunConfig
from hetrain.core.failpoints import failpoint
from hetrain.mpc_ops.crypto import ckks, flooding, ring
from hetrain.mpc_ops.reveal import verified
from hetrain.core.errors import BundleError
from hetrain.mpc_ops.exchange.bundle import MAX_MANIFEST_BYTES
from hetrain.participants import pseudonyms
from hetrain.participants.data_owner import _npy, _write, load_split

MANIFEST = "manifest.json"
TAGS_FILE = "verified_tags.json"  # in the owner's own folder: what it sent the key holder, to send again
FORMAT = 1


def chunks(n: int, slots: int) -> list[slice]:
    """Consecutive chunks of at most `slots` samples, near-equal in size."""
    count = max(1, -(-n // slots))
    bounds = np.linspace(0, n, count + 1).round().astype(int)
    return [slice(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]


def masks_owner(cfg: RunConfig, owner: OwnerConfig) -> bool:
    """Who makes a chunk's masks: each owner of a horizontal split for its own chunks; the label owner of a
    vertical split (its chunks are shared by every owner)."""
    return cfg.data.partition == "horizontal" or owner.label


def prepare(cfg: RunConfig, owner: OwnerConfig, public_context: bytes, mac_key: np.ndarray,
            exchange_dir: Path, local_dir: Path) -> tuple[dict, dict]:
    """Encrypt, mask and tag one owner's table; write its bundle; return (manifest, tags for the key holder).

    An unchanged table under the same key keeps its bundle: the key holder fixed its tags and may have
    revealed its chunks already. Its tags come back from `local_dir` (the owner's own, never published).
    """
    params = cfg.ckks.params()
    context = ckks.load_public_context(public_context, params=params)
    key_id, slots = ckks.key_id(context), params.slots
    layer = cfg.model.layers[0].name
    outputs = cfg.model.layers[0].out_features
    offset = shapes.feature_offset(cfg, owner.name)
    out, local = Path(exchange_dir) / owner.name, Path(local_dir)
    layout = {"kind": "verified", "slots": slots, "layer": layer, "outputs": outputs, "offset": offset}
    data_sha256 = store.sha256_file(owner.path) if owner.path.is_file() else ""
    id_key = pseudonyms.fingerprint(pseudonyms.owner_key(cfg, owner))  # new pseudonyms mean new chunks
    kept = _reusable(out, local, key_id, layout, owner.features, data_sha256, id_key)
    if kept is not None:
        return kept
    split = load_split(cfg, owner)
    primes = ring.coeff_modulus(params.poly_modulus_degree, params.coeff_mod_bit_sizes)[:-1]
    generation = f"g-verified-{os.urandom(4).hex()}"
    manifest = {"format": FORMAT, "owner": owner.name, "key_id": key_id, "features": owner.features,
                "layout": layout, "data_sha256": split.data_sha256, "pseudonym_key": id_key, "chunks": {}}
    tags: dict = {}
    mask_scale = 2.0 ** (2 * params.scale_bits)
    for part in ("train", "test"):
        x, ids, y = split.x[part], split.ids[part], split.y.get(part)
        for sl in chunks(len(x), slots):
            published = split.published(ids[sl])
            chunk = verified.chunk_id(None if cfg.data.partition == "vertical" else owner.name, part, key_id,
                                      published)
            n = sl.stop - sl.start
            entry = {"split": part, "n": n, "features": {}, "masks": {}, "mask_values": None, "labels": None,
                     "ids": _write(out, generation, f"{chunk}/ids.json", json.dumps(published).encode())}
            tag_entry = {"n": n, "features": {}, "masks": {}}
            for j in range(x.shape[1]):
                column = np.zeros(slots)
                column[:n] = x[sl, j]
                blob = ckks.encrypt(context, column)
                entry["features"][str(offset + j)] = _write(out, generation, f"{chunk}/f{offset + j:04d}.ct", blob)
                tag_entry["features"][str(offset + j)] = ring.tag(ring.read(blob, slots).coeffs, mac_key, primes)
            if masks_owner(cfg, owner):
                r = (flooding.uniform(outputs * slots).reshape(outputs, slots) * 2.0 - 1.0) * cfg.policy.mask_bound
                entry["mask_values"] = _write(out, generation, f"{chunk}/masks.npy", _npy(r[:, :n]))
                tag_entry["masks"][layer] = {}
                for k in range(outputs):
                    blob = ts.ckks_vector(context, r[k].tolist(), scale=mask_scale).serialize()
                    entry["masks"][str(k)] = _write(out, generation, f"{chunk}/m{k:04d}.ct", blob)
                    tag_entry["masks"][layer][str(k)] = ring.tag(ring.read(blob, slots).coeffs, mac_key, primes)
            if y is not None and cfg.policy.labels == "reveal":
                entry["labels"] = _write(out, generation, f"{chunk}/labels.npy", _npy(y[sl]))
            manifest["chunks"][chunk] = entry
            tags[chunk] = tag_entry
    store.write_json(local / TAGS_FILE, {"key_id": key_id, "data_sha256": split.data_sha256, "tags": tags}, mode=0o600)
    failpoint("owner.before_manifest")
    store.write_json(out / MANIFEST, manifest)  # last: a manifest only ever names complete blobs
    for old in out.glob("g-*"):
        if old.name != generation:
            shutil.rmtree(old, ignore_errors=True)
    return manifest, tags


def _reusable(out: Path, local: Path, key_id: str, layout: dict, features: list[str],
              data_sha256: str, id_key: str) -> tuple[dict, dict] | None:
    """(manifest, tags) of the existing bundle if it was made from the same table, key, pseudonym key and
    layout, else None (anything odd in the published manifest means: encrypt again)."""
    try:
        manifest = store.parse_json(store.read_bounded(out / MANIFEST, MAX_MANIFEST_BYTES, "manifest", BundleError),
                                    "manifest", BundleError)
        kept = json.loads((local / TAGS_FILE).read_text())
        same = (manifest.get("key_id"), manifest.get("layout"), manifest.get("features"), manifest.get("data_sha256"),
                manifest.get("pseudonym_key"))
        if same != (key_id, layout, features, data_sha256, id_key) or kept.get("key_id") != key_id \
                or kept.get("data_sha256") != data_sha256 or set(kept["tags"]) != set(manifest["chunks"]):
            return None
        entries = [e for c in manifest["chunks"].values() for e in
                   [c["ids"], *c["features"].values(), *c["masks"].values()] + [c["mask_values"], c["labels"]] if e]
        if not all((out / e["file"]).is_file() and (out / e["file"]).stat().st_size == e["bytes"] for e in entries):
            return None
    except (BundleError, OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    manifest["reused"] = True
    return manifest, kept["tags"]


def bundle_summary(manifest: dict) -> dict:
    """What the run summary shows per owner."""
    entries = [e for c in manifest["chunks"].values() for e in list(c["features"].values()) + list(c["masks"].values())]
    n = {part: sum(c["n"] for c in manifest["chunks"].values() if c["split"] == part) for part in ("train", "test")}
    return {"owner": manifest["owner"], "reused": bool(manifest.get("reused")), "bytes": sum(e["bytes"] for e in entries),
            "ciphertexts": len(entries), "n_train": n["train"], "n_test": n["test"]}
