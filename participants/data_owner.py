"""A data owner: load and validate its own table, standardise, encrypt, publish a bundle.

Only the bundle (ciphertexts, a manifest, keyed-hash IDs and, under `labels: reveal`, the
labels) leaves the owner, written to RUN_DIR/exchange/<owner>/. The plaintext twin file
is written to the owner's own folder, and only when the config asks for the twin.
"""

import hashlib
import io
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hetrain.mpc_ops.crypto import ckks
from hetrain.core import store
from hetrain.mpc_ops.exchange.bundle import MAX_MANIFEST_BYTES
from hetrain.core.config import OwnerConfig, RunConfig
from hetrain.core.errors import SchemaError
from hetrain.core.failpoints import failpoint
from hetrain.mpc_ops.layers.packing import FEATURE_CLIP, PackingPlan

from hetrain.participants import pseudonyms
from hetrain.participants.table import Standardizer, batches, load_table, split_ids

MANIFEST = "manifest.json"
FORMAT_VERSION = 1


def _batch_slices(n: int, batch_size: int, min_batch: int) -> list[slice]:
    """Batches of the canonical order; a tail smaller than min_batch joins the previous batch."""
    slices = batches(n, batch_size)
    if len(slices) > 1 and slices[-1].stop - slices[-1].start < min_batch:
        slices[-2:] = [slice(slices[-2].start, slices[-1].stop)]
    return slices


@dataclass(frozen=True)
class OwnerSplit:
    """One owner's table, validated, split by keyed hash and standardised on its training rows."""

    x: dict  # split -> (n, features) standardised and clipped
    ids: dict  # split -> IDs in the published order (keyed by the owners' pseudonym key)
    y: dict  # split -> labels (label owner only, else empty)
    data_sha256: str
    pseudonym_key: bytes  # the owners' secret: published IDs are HMACs under it

    def published(self, ids: np.ndarray) -> list[str]:
        """The pseudonyms of `ids` as the owner publishes them (never invertible without the key)."""
        return pseudonyms.pseudonyms(ids, self.pseudonym_key)


def load_split(cfg: RunConfig, owner: OwnerConfig) -> OwnerSplit:
    """Load and validate the owner's table, split it (seed-keyed) and order each split under the owners'
    pseudonym key; standardise its features with statistics from its training rows."""
    label_col = cfg.data.label_column if owner.label else None
    frame = load_table(owner.path, owner=owner.name, id_column=cfg.data.id_column,
                       feature_columns=owner.features, label_column=label_col)
    id_key = pseudonyms.owner_key(cfg, owner)
    train_ids, test_ids = split_ids(frame[cfg.data.id_column], seed=cfg.seed, test_fraction=cfg.data.test_fraction)
    train_ids, test_ids = pseudonyms.keyed_order(train_ids, id_key), pseudonyms.keyed_order(test_ids, id_key)
    indexed = frame.set_index(cfg.data.id_column)
    parts = {"train": indexed.loc[list(train_ids)], "test": indexed.loc[list(test_ids)]}
    scaler = Standardizer.fit(parts["train"], owner.features, clip=FEATURE_CLIP)
    if label_col and cfg.data.task == "multiclass":
        bad = int(indexed[label_col].max())
        if bad >= cfg.data.num_classes:
            raise SchemaError(
                f"owner '{owner.name}': label {bad} in {owner.path} is outside [0, {cfg.data.num_classes - 1}] "
                f"(data.num_classes={cfg.data.num_classes})"
            )
    return OwnerSplit(
        x={s: scaler.transform(p)[owner.features].to_numpy(np.float64) for s, p in parts.items()},
        ids={"train": np.asarray(train_ids), "test": np.asarray(test_ids)},
        y={s: p[label_col].to_numpy(np.int64) for s, p in parts.items()} if label_col else {},
        data_sha256=store.sha256_file(owner.path) if owner.path.is_file() else "", pseudonym_key=id_key)


def bundle_key(cfg: RunConfig, owner: OwnerConfig, plan: PackingPlan, key_id: str, data_sha256: str,
               pseudonym_key: bytes = b"") -> str:
    """Everything the bundle depends on; an unchanged key means the bundle can be reused."""
    spec = {
        "format": FORMAT_VERSION, "key_id": key_id, "data_sha256": data_sha256, "seed": cfg.seed,
        "pseudonym_key": pseudonyms.fingerprint(pseudonym_key),
        "features": owner.features, "label": owner.label, "batch_size": cfg.train.batch_size,
        "min_batch": cfg.policy.min_batch, "test_fraction": cfg.data.test_fraction,
        "slots": plan.slots, "seg": plan.seg, "forward": plan.forward, "labels": cfg.policy.labels,
        "label_column": cfg.data.label_column, "id_column": cfg.data.id_column,
        "task": cfg.data.task, "num_classes": cfg.data.num_classes,
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


def prepare(cfg: RunConfig, owner: OwnerConfig, public_context: bytes, plan: PackingPlan,
            exchange_dir: Path, twin_dir: Path | None = None) -> dict:
    """Validate, standardise and encrypt one owner's table; return its manifest.

    Re-encrypts only if the table, the key or the layout changed since the last bundle.
    """
    context = ckks.load_public_context(public_context, params=cfg.ckks.params())
    key_id = ckks.key_id(context)
    out = Path(exchange_dir) / owner.name
    data_sha256 = store.sha256_file(owner.path) if owner.path.is_file() else ""
    id_key = pseudonyms.owner_key(cfg, owner)
    key = bundle_key(cfg, owner, plan, key_id, data_sha256, id_key)
    reusable = _reusable(out, key, twin_dir, owner.name)
    if reusable is not None:
        return reusable

    split = load_split(cfg, owner)
    x_train, x_test = split.x["train"], split.x["test"]
    train_ids, test_ids = split.ids["train"], split.ids["test"]

    # Blobs go into a fresh generation folder; the manifest (written last, atomically) switches
    # readers over, so a failed re-encryption never leaves a manifest naming half-written blobs.
    generation = f"g-{key[:12]}-{os.urandom(3).hex()}"
    manifest = {
        "format": FORMAT_VERSION, "owner": owner.name, "key_id": key_id, "bundle_key": key,
        "data_sha256": data_sha256, "features": owner.features,
        "layout": {"slots": plan.slots, "seg": plan.seg, "samples_per_ct": plan.samples_per_ct,
                   "forward": plan.forward},
        "splits": {}, "labels": None, "reused": False,
    }
    for part, x, ids in (("train", x_train, train_ids), ("test", x_test, test_ids)):
        slices = _batch_slices(len(x), cfg.train.batch_size, cfg.policy.min_batch)
        manifest["splits"][part] = {
            "n": len(x),
            "ids": _write(out, generation, f"{part}/ids.json", json.dumps(split.published(ids)).encode()),
            "batches": [_encrypt_batch(context, plan, x[sl], out, f"{generation}/{part}", b,
                                       with_cols=(part == "train")) for b, sl in enumerate(slices)],
        }
    if owner.label:
        manifest["labels"] = {part: _write(out, generation, f"{part}/labels.npy", _npy(split.y[part]))
                              for part in ("train", "test")}
    if twin_dir is not None:
        buf = io.BytesIO()
        np.savez(buf, train=x_train, test=x_test)
        store.write_bytes(twin_dir / f"{owner.name}.npz", buf.getvalue())
        manifest["twin_sha256"] = store.sha256_bytes(buf.getvalue())
    failpoint("owner.before_manifest")
    store.write_json(out / MANIFEST, manifest)  # last: a manifest only ever names complete blobs
    for old in out.glob("g-*"):
        if old.name != generation:
            shutil.rmtree(old, ignore_errors=True)
    return manifest


def _reusable(out: Path, key: str, twin_dir: Path | None, owner: str) -> dict | None:
    """The existing manifest if it was made from the same inputs and all its files are intact."""
    try:  # the exchange store is untrusted: anything odd in the old manifest means "re-encrypt"
        manifest = store.parse_json(store.read_bounded(out / MANIFEST, MAX_MANIFEST_BYTES, "manifest", SchemaError),
                                    "manifest", SchemaError)
        if manifest.get("bundle_key") != key:
            return None
        entries = ciphertext_entries(manifest)
        entries += [s["ids"] for s in manifest["splits"].values()] + list((manifest.get("labels") or {}).values())
        if not all((out / e["file"]).is_file() and (out / e["file"]).stat().st_size == e["bytes"] for e in entries):
            return None
    except (SchemaError, OSError, KeyError, TypeError, AttributeError, ValueError):
        return None
    if twin_dir is not None:
        twin = twin_dir / f"{owner}.npz"
        if not twin.is_file() or store.sha256_file(twin) != manifest.get("twin_sha256"):
            return None
    manifest["reused"] = True
    return manifest


def bundle_summary(manifest: dict, reused: bool) -> dict:
    """What the run summary shows per owner: sizes and whether the bundle was reused."""
    blobs = ciphertext_entries(manifest)
    return {"owner": manifest["owner"], "reused": reused, "bytes": sum(e["bytes"] for e in blobs),
            "ciphertexts": len(blobs), "n_train": manifest["splits"]["train"]["n"],
            "n_test": manifest["splits"]["test"]["n"]}


def ciphertext_entries(manifest: dict) -> list[dict]:
    """Every ciphertext blob entry of a manifest, in all layouts and splits."""
    return [e for s in manifest["splits"].values() for b in s["batches"]
            for e in b["rows"] + b["cols"] + b.get("column", [])]


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def _write(out: Path, generation: str, name: str, data: bytes) -> dict:
    store.write_bytes(out / generation / name, data)
    failpoint("owner.blob_written")
    return {"file": f"{generation}/{name}", "sha256": store.sha256_bytes(data), "bytes": len(data)}


def _encrypt_batch(context, plan: PackingPlan, x: np.ndarray, out: Path, prefix: str, b: int,
                   with_cols: bool) -> dict:
    """Encrypt one batch in the plan's forward layout and (for training) the cols layout."""
    entry = {"n": len(x), "rows": [], "cols": [], "column": []}
    if plan.forward == "column":
        for c, sl in enumerate(plan.column_chunks(len(x))):
            for j, vector in enumerate(plan.column_vectors(x[sl])):
                entry["column"].append(_write(out, prefix, f"b{b:04d}-c{c:02d}-f{j:04d}.column.ct",
                                              ckks.encrypt(context, vector)))
    for c, sl in enumerate(plan.chunks(len(x))):
        if plan.forward == "rows":
            entry["rows"].append(_write(out, prefix, f"b{b:04d}-c{c:02d}.rows.ct",
                                        ckks.encrypt(context, plan.rows_vector(x[sl]))))
        if with_cols:
            entry["cols"].append(_write(out, prefix, f"b{b:04d}-c{c:02d}.cols.ct",
                                        ckks.encrypt(context, plan.cols_vector(x[sl]))))
    return entry
