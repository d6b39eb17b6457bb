"""A small real run directory for the hostile-input benchmark: every file a role reads from another party.

It is built with the production code paths (KeyHolder, data_owner.prepare, save_checkpoint, reveals
that fill the audit log), so the bad inputs are edits of genuine artifacts.
"""

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import yaml

from hetrain.checkpoint import save_checkpoint
from hetrain.runtime import PUBLIC_CONTEXT, RunPaths, packing_plan
from hetrain.mpc_ops.crypto import ckks
from hetrain.core import store
from hetrain.configure import load_config
from hetrain.core.config import RunConfig
from hetrain.core.errors import PolicyRefusal
from hetrain.core.params import CkksParams
from hetrain.core.shapes import cipher_layer_shapes
from hetrain.mpc_ops.reveal.protocol import RevealRequest
from hetrain.participants import data_owner
from hetrain.participants.key_holder import KeyHolder

OWNER = "clinic"
FEATURES = ["f0", "f1", "f2", "f3"]
REVEALED = 8  # slots a benchmark reveal asks for
SMALL_PARAMS = CkksParams(4096, (40, 30, 39), 30)  # valid, but not the config's parameters

CONFIG = {
    "name": "hostile", "seed": 3,
    "data": {"partition": "horizontal", "task": "binary", "test_fraction": 0.2,
             "owners": [{"name": OWNER, "path": "table.csv", "label": True, "features": FEATURES}]},
    "model": {"layers": [{"kind": "linear", "name": "enc1", "out_features": 2}, {"kind": "tanh"},
                         {"kind": "linear", "name": "out", "out_features": 1}], "loss": "binary_cross_entropy"},
    "train": {"rounds": 1, "batch_size": 64, "workers": 1},
    # security_bits 0 keeps the flooding noise at ~1e-5, so a benign edit can be told from a harmful one
    "policy": {"cipher_layers": ["enc1"], "reveals": {"enc1": {}}, "min_batch": 32,
               "flooding": {"security_bits": 0, "budget": 65536}},
    "report": {"plaintext_twin": False},
}


@dataclass(frozen=True)
class Setup:
    """Paths of the genuine artifacts (as strings, so the setup crosses process boundaries as JSON)."""

    root: str
    config: str
    run: str
    product: str  # a ciphertext after one ct × plain product, as the key holder receives it
    values: str  # what `product` decrypts to
    foreign_product: str  # the same, under another key holder's key
    foreign_context: str  # another key holder's public context (valid, wrong key)
    small_context: str  # a valid public context with other CKKS parameters

    @property
    def paths(self) -> RunPaths:
        return RunPaths(Path(self.run))

    def cfg(self) -> RunConfig:
        return load_config(self.config)[0]

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps(asdict(self)))

    @classmethod
    def load(cls, path: Path) -> "Setup":
        return cls(**json.loads(Path(path).read_text()))


def open_key_holder(setup: Setup, directory: Path) -> KeyHolder:
    """The setup's key holder, opened from `directory` (a copy of run/key_holder, or the original)."""
    cfg = setup.cfg()
    return KeyHolder.open_or_create(directory, cfg.ckks.params(), cfg.policy, cipher_layer_shapes(cfg))


def product_blob(public, values: np.ndarray) -> bytes:
    """Encrypt `values` and pass them through one ct × plain product, the level every revealed blob has."""
    fresh = ckks.load_vector(public, ckks.encrypt(public, values), ckks.fresh_layout(public))
    return ckks.multiply_plain(fresh, np.ones(len(values))).serialize()


def request(key_id: str, blob: bytes, **changes) -> RevealRequest:
    """A reveal request the policy allows (a gradient over 64 samples), with `changes` applied."""
    fields = dict(request_id="bench", key_id=key_id, kind="gradient", layer="enc1", round=1, blobs=[blob],
                  stride=[1], counts=[REVEALED], aggregate=64, rows=[f"{i:024x}" for i in range(64)])
    return RevealRequest(**{**fields, **changes})


def _table(path: Path, rows: int = 200) -> None:
    rng = np.random.default_rng(5)
    x = rng.normal(size=(rows, len(FEATURES)))
    label = (x[:, 0] + 0.5 * x[:, 1] > 0).astype(int)
    lines = ["id," + ",".join(FEATURES) + ",label"]
    lines += [f"p-{i:04d}," + ",".join(f"{v:.6f}" for v in x[i]) + f",{label[i]}" for i in range(rows)]
    path.write_text("\n".join(lines) + "\n")


def _foreign(root: Path, cfg: RunConfig, values: np.ndarray) -> tuple[bytes, bytes, bytes]:
    """Another key holder's public context and product blob, and a context with other parameters."""
    other = KeyHolder.open_or_create(root / "other_key_holder", cfg.ckks.params(), cfg.policy, cipher_layer_shapes(cfg))
    other_public = other.public_context()
    small = KeyHolder.open_or_create(root / "small_key_holder", SMALL_PARAMS, cfg.policy, cipher_layer_shapes(cfg))
    public = ckks.load_public_context(other_public, isolate=False)  # our own key holder's bytes
    return other_public, product_blob(public, values), small.public_context()


def build_setup(workdir: Path) -> Setup:
    """Write the config, key, public context, owner bundle, a checkpoint and an audit log under workdir/setup."""
    root = Path(workdir) / "setup"
    root.mkdir(parents=True, exist_ok=True)
    _table(root / "table.csv")
    (root / "config.yaml").write_text(yaml.safe_dump(CONFIG, sort_keys=False))
    cfg = load_config(root / "config.yaml")[0]
    paths = RunPaths(root / "run")
    holder = KeyHolder.open_or_create(paths.key_holder, cfg.ckks.params(), cfg.policy, cipher_layer_shapes(cfg))
    public_bytes = holder.public_context()
    store.write_bytes(paths.exchange / PUBLIC_CONTEXT, public_bytes)
    data_owner.prepare(cfg, cfg.data.owners[0], public_bytes, packing_plan(cfg), paths.exchange)
    public = ckks.load_public_context(public_bytes, isolate=False)  # the key holder's own bytes

    values = np.linspace(-2.0, 2.0, cfg.ckks.params().slots)
    product = product_blob(public, values)
    store.write_bytes(root / "product.ct", product)
    np.save(root / "values.npy", values)
    holder.reveal(request(holder.key_id, product))  # the audit log gets an allow ...
    try:
        holder.reveal(request(holder.key_id, product, aggregate=2))  # ... and a min_batch refusal
    except PolicyRefusal:
        pass
    other_public, foreign_product, small_public = _foreign(root, cfg, values)
    store.write_bytes(root / "foreign_context.bin", other_public)
    store.write_bytes(root / "foreign_product.ct", foreign_product)
    store.write_bytes(root / "small_context.bin", small_public)

    rng = np.random.default_rng(0)
    save_checkpoint(paths.checkpoints, 1, params={"hybrid.enc1.W": rng.normal(size=(4, 2)), "hybrid.enc1.b": np.zeros(2)},
                    optimizer_state={"lr": 0.02, "t": 3, "m.enc1.W": np.zeros((4, 2))},
                    rng_state=rng.bit_generator.state, lineage={"key_id": holder.key_id}, extra={"round_loss": 0.5})
    setup = Setup(str(root), str(root / "config.yaml"), str(paths.root), str(root / "product.ct"),
                  str(root / "values.npy"), str(root / "foreign_product.ct"), str(root / "foreign_context.bin"),
                  str(root / "small_context.bin"))
    setup.save(root / "setup.json")
    return setup
