"""A data owner in the tiled layout (strict, mixed and encrypted-label runs).

Per batch the owner encrypts one replicated column per feature and one block vector with its
features at their places in the model's input (mpc_ops/tiled.py). The label owner, under
`labels: encrypted`, encrypts its labels replicated (one-hot: one ciphertext per class) and
publishes no plaintext label at all; under `labels: reveal` it publishes them as before.

Owner-local files (never in the exchange store): the standardised features and, for the label
owner, the labels, used for the plaintext twin and for evaluating the released model on the
owners' side in strict mode (the trainer then learns only the aggregate accuracy).
"""

import io
import json
import os
from pathlib import Path

import numpy as np

from hetrain.mpc_ops.crypto import ckks
from hetrain.core import shapes, store
from hetrain.core.config import OwnerConfig, RunConfig
from hetrain.mpc_ops.layers.tiled import Tiling

from hetrain.participants.data_owner import _npy, _write, load_split

MANIFEST = "manifest.json"


def balanced_slices(n: int, batch_size: int) -> list[slice]:
    """ceil(n / batch_size) batches of near-equal size: none exceeds the block width, and none is a
    small tail (the hybrid's merge of a short tail would overflow a block)."""
    count = max(1, -(-n // batch_size))
    bounds = np.linspace(0, n, count + 1).round().astype(int)
    return [slice(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]


def label_vectors(cfg: RunConfig, tiling: Tiling, y: np.ndarray) -> list[np.ndarray]:
    """Replicated labels: y itself (binary) or one indicator per class (multiclass)."""
    if cfg.data.task == "binary":
        return [tiling.rep(y.astype(np.float64))]
    return [tiling.rep((y == c).astype(np.float64)) for c in range(cfg.data.num_classes)]


def prepare(cfg: RunConfig, owner: OwnerConfig, public_context: bytes, tiling: Tiling,
            exchange_dir: Path, local_dir: Path, encrypt_test: bool = True) -> dict:
    """Validate, standardise and encrypt one owner's table in the tiled layout; return its manifest."""
    context = ckks.load_public_context(public_context)
    key_id = ckks.key_id(context)
    out = Path(exchange_dir) / owner.name
    data = load_split(cfg, owner)
    xs, ys = data.x, data.y
    train_ids, test_ids = data.ids["train"], data.ids["test"]
    label_col = cfg.data.label_column if owner.label else None
    offset = shapes.feature_offset(cfg, owner.name)
    generation = f"g-tiled-{os.urandom(4).hex()}"
    manifest = {"format": 1, "owner": owner.name, "key_id": key_id, "features": owner.features,
                "layout": {"kind": "tiled", "slots": tiling.slots, "n": tiling.n, "offset": offset},
                "labels_policy": cfg.policy.labels, "splits": {}}
    for split, ids in (("train", train_ids), ("test", test_ids)):
        x = xs[split]
        slices = balanced_slices(len(x), cfg.train.batch_size)
        batches = []
        for b, sl in enumerate(slices):
            entry = {"n": sl.stop - sl.start, "rep": [], "block": None, "labels": []}
            if split == "train" or encrypt_test:
                prefix = f"{generation}/{split}"
                entry["rep"] = [_write(out, prefix, f"b{b:04d}-f{j:04d}.rep.ct", ckks.encrypt(context, tiling.rep(x[sl, j])))
                                for j in range(x.shape[1])]
                if split == "train":
                    entry["block"] = _write(out, prefix, f"b{b:04d}.block.ct",
                                            ckks.encrypt(context, tiling.block(x[sl], offset)))
                if label_col and cfg.policy.labels == "encrypted":
                    entry["labels"] = [_write(out, prefix, f"b{b:04d}-y{c:02d}.label.ct", ckks.encrypt(context, v))
                                       for c, v in enumerate(label_vectors(cfg, tiling, ys[split][sl]))]
            batches.append(entry)
        manifest["splits"][split] = {
            "n": len(x), "batches": batches,
            "ids": _write(out, generation, f"{split}/ids.json", json.dumps(data.published(ids)).encode()),
        }
    if label_col and cfg.policy.labels == "reveal":
        manifest["labels"] = {split: _write(out, generation, f"{split}/labels.npy", _npy(ys[split]))
                              for split in ("train", "test")}
    buf = io.BytesIO()
    np.savez(buf, **{f"x_{k}": v for k, v in xs.items()}, **{f"y_{k}": v for k, v in ys.items()})
    store.write_bytes(Path(local_dir) / f"{owner.name}.npz", buf.getvalue(), mode=0o600)
    store.write_json(out / MANIFEST, manifest)
    return manifest
