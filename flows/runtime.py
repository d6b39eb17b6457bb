"""Wiring for one run directory: paths, the config, the public context and the key-holder client.

The key holder runs in-process (LocalKeyHolderClient, the default) or as its own service
(`hetrain key-holder serve`, reached through HttpKeyHolderClient when key_holder.url is set).
With a service, the trainer's process never imports hetrain.participants.key_holder.

Layout of RUN_DIR:
  key_holder/   secret context, budget state, audit log (only the key holder reads it)
  exchange/     public context and each owner's bundle (what owners send); with exchange.url set, the
                trainer's local mirror of the store at that URL
  outbox/       with exchange.url set: bundles of in-process owners, prepared here, then published to the URL
  owners/       owner-local files: the plaintext twin's features (only with report.plaintext_twin)
  checkpoints/  one directory per round
  metrics.json, summary.md, plots/
  generations/gen-NNNN/  one per retrain (`train(..., retrain=True)`): its own parent.json, checkpoints/,
                metrics.json, summary.md and plots/; the key holder, exchange and owners/ above are shared,
                so an owner whose table did not change keeps its bundle
"""

import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import tenseal as ts

from hetrain.mpc_ops.crypto import ckks
from hetrain.core import store
from hetrain.mpc_ops.exchange.bundle import ExchangeStore
from hetrain.configure import load_config
from hetrain.core.config import KeyHolderConfig, RunConfig
from hetrain.core.errors import BundleError
from hetrain.mpc_ops.exchange.remote import RemoteExchange
from hetrain.mpc_ops.reveal.http_client import HttpKeyHolderClient
from hetrain.mpc_ops.layers.packing import PackingPlan
from hetrain.mpc_ops.layers.planner import packing_shape, plan_layer
from hetrain.core.shapes import reveal_shapes
from hetrain.mpc_ops.reveal.protocol import KeyHolderClient, RevealRequest, RevealResponse

PUBLIC_CONTEXT = "public_context.bin"
PARENT_FILE = "parent.json"


@dataclass(frozen=True)
class RunPaths:
    root: Path
    generation: int | None = None  # None: the run directory's own checkpoints (a plain `hetrain train`)

    @property
    def out(self) -> Path:
        """Where this run's checkpoints, metrics, summary and plots go."""
        return self.root if self.generation is None else generation_dir(self.root, self.generation)

    @property
    def key_holder(self) -> Path:
        return self.root / "key_holder"

    @property
    def exchange(self) -> Path:
        return self.root / "exchange"

    @property
    def outbox(self) -> Path:
        return self.root / "outbox"

    @property
    def owners(self) -> Path:
        return self.root / "owners"

    @property
    def checkpoints(self) -> Path:
        return self.out / "checkpoints"

    @property
    def public_context(self) -> Path:
        return self.exchange / PUBLIC_CONTEXT

    @property
    def metrics(self) -> Path:
        return self.out / "metrics.json"

    @property
    def summary(self) -> Path:
        return self.out / "summary.md"

    @property
    def plot(self) -> Path:
        return self.out / "plots" / "training.png"


def generation_dir(root: Path, generation: int) -> Path:
    return Path(root) / "generations" / f"gen-{generation:04d}"


def packing_plan(cfg: RunConfig, costs: dict | None = None) -> PackingPlan:
    """The slot layout every owner encrypts in, chosen by the planner from the declared shapes."""
    shape = packing_shape(cfg)
    return plan_layer(shape, costs, cfg.packing.forward).packing(shape)


class LocalKeyHolderClient:
    """In-process stand-in for the key-holder service: the trainer sees only `reveal` and the public context."""

    _open: dict[Path, object] = {}

    def __init__(self, cfg: RunConfig, directory: Path):
        from hetrain.participants.key_holder import KeyHolder  # the only import of the key holder on this side

        directory = Path(directory).resolve()
        holder = self._open.get(directory)
        if holder is None or holder.policy != cfg.policy:
            holder = KeyHolder.open_or_create(directory, cfg.ckks.params(), cfg.policy, reveal_shapes(cfg))
            self._open[directory] = holder
        self._holder = holder

    def public_context(self) -> bytes:
        return self._holder.public_context()

    def reveal(self, request: RevealRequest) -> RevealResponse:
        return self._holder.reveal(request)

    def audit_summary(self) -> dict:
        return self._holder.audit_summary()

    def reveal_verified(self, request) -> RevealResponse:
        return self._holder.reveal_verified(request)

    def input_weights(self, layer: str):
        """The key holder's weights of the reveal point (policy.trainer: untrusted); public."""
        return self._holder.input_weights(layer)

    def owner_channel(self):
        """What an in-process owner sends its MAC tags through, and gets the MAC key from (never the trainer)."""
        return self._holder

    @property
    def decryptions_used(self) -> int:
        return self._holder.decryptions_used

    @classmethod
    def forget(cls) -> None:
        """Drop cached key holders (tests and key rotation)."""
        cls._open.clear()


_remote: dict[tuple[KeyHolderConfig, str], HttpKeyHolderClient] = {}


def remote_key_holder(cfg: KeyHolderConfig, resume_hint: str) -> HttpKeyHolderClient:
    """One HTTP client per service for the whole run: rounds reuse its connection and token."""
    key = (cfg, resume_hint)
    if key not in _remote:
        _remote[key] = HttpKeyHolderClient.from_config(cfg, resume_hint=resume_hint)
    return _remote[key]


def forget_key_holders() -> None:
    """Drop cached in-process key holders and HTTP clients (a new run, tests, key rotation)."""
    LocalKeyHolderClient.forget()
    for client in _remote.values():
        client.close()
    _remote.clear()


class Runtime:
    """Everything the trainer needs for a round, opened from paths (Prefect passes only paths)."""

    def __init__(self, config_path: str | Path, run_dir: str | Path, generation: int | None = None):
        self.cfg, self.config_path = load_config(config_path)
        self.paths = RunPaths(Path(run_dir).resolve(), generation)
        self.plan = packing_plan(self.cfg)

    @cached_property
    def warm_start_from(self) -> Path | None:
        """The checkpoint round 1 starts from: a retrain's recorded parent (parent.json), else None."""
        if self.paths.generation is None:
            return None
        parent = json.loads((self.paths.out / PARENT_FILE).read_text())["checkpoint"]
        return Path(parent["path"]) if parent else None

    @cached_property
    def context(self) -> ts.Context:
        """The public context: the trainer never holds a secret key."""
        data = store.read_bounded(self.paths.public_context, ckks.MAX_CONTEXT_BYTES, "public context", BundleError)
        return ckks.load_public_context(data, params=self.cfg.ckks.params())

    @cached_property
    def key_id(self) -> str:
        return ckks.key_id(self.context)

    @cached_property
    def key_holder(self) -> KeyHolderClient:
        """In-process by default; the service's HTTP client when key_holder.url is set."""
        if self.cfg.key_holder.url is None:
            return LocalKeyHolderClient(self.cfg, self.paths.key_holder)
        return remote_key_holder(self.cfg.key_holder,
                                 f"hetrain train {self.config_path} --run-dir {self.paths.root} --resume")

    @cached_property
    def remote(self) -> RemoteExchange | None:
        """The exchange store at exchange.url, or None when it is the local folder RUN_DIR/exchange."""
        url = self.cfg.exchange.url
        return None if url is None else RemoteExchange(url, self.cfg.exchange.storage_options)

    @property
    def owner_dir(self) -> Path:
        """Where an in-process owner prepares its bundle: the exchange folder, or the outbox it publishes from."""
        return self.paths.exchange if self.remote is None else self.paths.outbox

    def publish_owner(self, owner: str) -> None:
        """After an in-process owner prepared its bundle: upload it to exchange.url (nothing to do without one)."""
        if self.remote is not None:
            self.remote.publish_owner(self.paths.outbox / owner, owner)

    def mirror_exchange(self) -> dict:
        """Bring RUN_DIR/exchange up to date with exchange.url: files and bytes fetched per owner."""
        if self.remote is None:
            return {}
        return {o.name: self.remote.mirror_owner(o.name, self.paths.exchange) for o in self.cfg.data.owners}

    @cached_property
    def store(self) -> ExchangeStore:
        self.mirror_exchange()
        return ExchangeStore(self.paths.exchange, self.cfg, self.key_id, self.plan)

    def publish_public_context(self) -> str:
        """Write the key holder's public context to the exchange store (and exchange.url); return its key id."""
        data = self.key_holder.public_context()
        if not self.paths.public_context.exists() or self.paths.public_context.read_bytes() != data:
            store.write_bytes(self.paths.public_context, data)
        if self.remote is not None:
            self.remote.publish_public_context(data)
        return self.key_id

    def _bundle_keys(self, manifests: dict | None) -> dict[str, str]:
        """Each owner's bundle key (a tiled bundle, which has none, is named by its manifest's digest)."""
        manifests = self.store.manifests if manifests is None else manifests
        return {name: m.get("bundle_key") or store.sha256_file(self.paths.exchange / name / "manifest.json")
                for name, m in manifests.items()}

    def data_digest(self, manifests: dict | None = None) -> str:
        """One digest of every owner's bundle key: what the data of this run is."""
        keys = sorted(f"{name}:{key}" for name, key in self._bundle_keys(manifests).items())
        return store.sha256_bytes("\n".join(keys).encode())

    def lineage(self, manifests: dict | None = None) -> dict:
        """What this run's results were made from: config, every owner's bundle, the key, where it ran.
        `manifests`: the engine's verified manifests (default: the hybrid exchange store's)."""
        keys = self._bundle_keys(manifests)
        return {
            "config_path": str(self.config_path),
            "config_sha256": store.sha256_file(self.config_path),
            "key_id": self.key_id,
            "manifests": keys,
            "manifest_sha256": {name: store.sha256_file(self.paths.exchange / name / "manifest.json")
                                for name in keys},
            "exchange": self.cfg.exchange.url or str(self.paths.exchange),
            "run_dir": str(self.paths.root),
            "generation": self.paths.generation,
        }
