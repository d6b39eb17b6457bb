"""The verified engine (`policy.trainer: untrusted`): the key holder's own weights, verified reveals, then plaintext.

An implementation of hetrain.engines.Engine. Owners publish column-packed features, masks and (to the key
holder only) MAC tags (participants/verified_owner). Once per chunk of samples the trainer computes each
output of the first layer as Σ_j W_jk·ct_j + M_k under the key holder's weights W, and the key holder checks
its MAC before it decrypts (mpc_ops/reveal/verified.py). The revealed X·W is kept (RUN_DIR/verified/), so
every round after that trains the plaintext layers only: no decryption, no ciphertext read. No Prefect here.
"""

import io

import numpy as np
import tenseal as ts

from hetrain.core import store
from hetrain.core.errors import BundleError, PolicyRefusal
from hetrain.mpc_ops.crypto import ckks, wire
from hetrain.mpc_ops.crypto.tensors import PlainBatch
from hetrain.mpc_ops.exchange.verified_bundle import Chunk, VerifiedStore
from hetrain.mpc_ops.reveal import verified
from hetrain.mpc_ops.reveal.revealer import Revealer
from hetrain.participants import verified_owner

from hetrain import artifacts
from hetrain.engine import Learner, Model, StepResult, make_optimizer, summarise
from hetrain.engines import prefixed, restore_learner
from hetrain.runtime import Runtime


class _Revealed:
    """The learner's front when X·W is already revealed: a batch is its rows of X·W."""

    def forward(self, batch: PlainBatch) -> np.ndarray:
        return batch.x


class VerifiedEngine:
    """Verified one-time reveal of the key holder's layer, then plaintext training of the rest."""

    name = "verified"
    twin = None  # the trainer never reads owner plaintext in this mode (config validation refuses a twin)

    def __init__(self, rt: Runtime, revealer: Revealer):
        self.rt, self.revealer = rt, revealer
        self.layer = rt.cfg.model.layers[0].name
        self.learner = Learner(Model(rt.cfg), make_optimizer(rt.cfg), _Revealed(), lambda z: z)
        self.learner.input_frozen = True  # the key holder's weights never train
        self._store: VerifiedStore | None = None
        self._z: dict[str, tuple[np.ndarray, np.ndarray]] | None = None  # split -> (X·W, labels)

    # ---- owners and data -----------------------------------------------------------------------
    def prepare_owner(self, owner: str) -> dict:
        """An in-process owner: encrypt, mask and tag; its tags go to the key holder, never the store."""
        rt = self.rt
        channel = rt.key_holder.owner_channel()
        owner_cfg = next(o for o in rt.cfg.data.owners if o.name == owner)
        public = store.read_bounded(rt.paths.public_context, ckks.MAX_CONTEXT_BYTES, "public context", BundleError)
        manifest, tags = verified_owner.prepare(rt.cfg, owner_cfg, public, channel.mac_key(), rt.owner_dir,
                                                rt.paths.owners / owner)
        channel.register_tags(owner, tags)
        rt.publish_owner(owner)
        return verified_owner.bundle_summary(manifest)

    @property
    def store(self) -> VerifiedStore:
        if self._store is None:
            self.rt.mirror_exchange()
            self._store = VerifiedStore(self.rt.paths.exchange, self.rt.cfg, self.rt.key_id)
        return self._store

    def manifests(self) -> dict:
        return self.store.manifests

    def bytes_read(self) -> int:
        return self.store.bytes_read

    # ---- the one-time verified reveal ------------------------------------------------------------
    def revealed(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """X·W and labels per split, revealed once per chunk (and kept on disk, so a resumed run asks nothing)."""
        if self._z is None:
            weights = self.rt.key_holder.input_weights(self.layer)
            self.learner.model.input.W[...] = weights
            parts: dict[str, list] = {"train": [], "test": []}
            for split in parts:
                for chunk in self.store.chunk_list(split):
                    parts[split].append((self._chunk_z(chunk, weights), self.store.labels(chunk)))
            self._z = {s: (np.concatenate([z for z, _ in p]), np.concatenate([y for _, y in p]))
                       for s, p in parts.items()}
        return self._z

    def _chunk_z(self, chunk: Chunk, weights: np.ndarray) -> np.ndarray:
        path = self.rt.paths.root / "verified" / self.rt.key_id / f"{chunk.chunk}.npy"
        if path.is_file():
            z = np.load(path, allow_pickle=False)
            if z.shape == (chunk.n, weights.shape[1]):
                return z
        context = ckks.load_public_context(self.rt.context.serialize(save_secret_key=False), isolate=False)
        context.auto_rescale = False  # the key holder checks the product before any rescale
        layout = ckks.fresh_layout(context)
        inputs = [ckks.load_vector(context, blob, layout) for blob in self.store.features(chunk)]
        masks = self.store.mask_values(chunk)
        z = np.empty((chunk.n, weights.shape[1]))
        for k in range(weights.shape[1]):
            acc = None
            for j, vector in enumerate(inputs):
                term = vector.mul(float(weights[j, k]))
                acc = term if acc is None else acc.add_(term)
            mask = ts_load(context, self.store.mask(chunk, k))
            request = verified.new_request(self.rt.key_id, self.layer, chunk.chunk, k, acc.add_(mask).serialize())
            try:
                z[:, k] = self.revealer.reveal_verified(request, masks[k])
            except PolicyRefusal as exc:
                if exc.rule == "already_revealed":
                    raise PolicyRefusal(exc.rule, f"{exc}; its result is not in {path.parent} (lost in a crash?): "
                                                  f"rotate the key (`hetrain rotate-key RUN_DIR`) and resume") from None
                raise
        buf = io.BytesIO()
        np.save(buf, z, allow_pickle=False)
        store.write_bytes(path, buf.getvalue())
        return z

    def train_refs(self) -> list[slice]:
        n = sum(c.n for c in self.store.chunk_list("train"))  # no reveal here: the round counts its decryptions
        size = self.rt.cfg.train.batch_size
        return [slice(i, min(i + size, n)) for i in range(0, n, size)]

    # ---- a round ---------------------------------------------------------------------------------
    def set_frozen(self, frozen: bool) -> None:
        """The key holder's layer never trains, whatever the rank limit says."""

    def train_group(self, refs: list[slice]) -> list[StepResult]:
        z, y = self.revealed()["train"]
        return [self.learner.train_batch(PlainBatch(f"train/{r.start}", z[r]), y[r]) for r in refs]

    def train_metrics(self, results: list[StepResult]) -> tuple[float, float]:
        return summarise(results)

    def evaluate(self) -> tuple[float, float]:
        z, y = self.revealed()["test"]
        size = self.rt.cfg.train.batch_size
        return summarise([self.learner.eval_batch(PlainBatch(f"test/{i}", z[i:i + size]), y[i:i + size])
                          for i in range(0, len(y), size)])

    def run_twin(self, order: np.ndarray, refs: list) -> None:
        return None

    def round_fields(self) -> dict:
        return {}

    # ---- checkpoint ------------------------------------------------------------------------------
    def state(self) -> tuple[dict, dict, dict]:
        return (prefixed("hybrid", self.learner.model.parameters()),
                prefixed("hybrid", self.learner.optimizer.state_dict()), {"engine": "verified"})

    def restore(self, ckpt, same_data: bool) -> None:
        restore_learner("hybrid", self.learner, ckpt)

    # ---- the run's report ------------------------------------------------------------------------
    def final_fields(self, audit: dict, rounds: list[dict]) -> dict:
        return {"policy_mode": "untrusted trainer, verified reveals"}

    def summary(self, final: dict, rounds: list[dict], owners: list[dict], audit: dict, lineage: dict) -> str:
        rt = self.rt
        plot = artifacts.plot_png(rounds, rt.paths.plot)
        w = self.learner.model.input.W
        revealed = [
            f"| trainer | first-layer activations X·W, once per sample, under the key holder's weights ({w.shape[0]} → "
            f"{w.shape[1]}, rank {w.shape[1]}, never trained); each verified against the owners' MAC tags before "
            f"decryption, flooded σ≈{audit.get('sigma', 0):.2g} | policy.trainer: untrusted |",
            "| trainer | no gradient, no metric: every declared reveal is refused | policy.trainer: untrusted |",
            "| trainer | labels, in plaintext | policy.labels: reveal |",
            f"| key holder | masked values only (owner-made masks of bound {rt.cfg.policy.mask_bound}), never true "
            f"activations; MAC tags from the owners | blinding |"]
        return artifacts.summary_markdown(rt.cfg.name, final, rounds, rt.cfg.policy.model_dump(), owners, audit,
                                          plot, rt.paths.out, lineage, revealed=revealed)


def ts_load(context, blob: bytes) -> ts.CKKSVector:
    """An owner's mask ciphertext (fresh level, scale Δ²), its structure parsed before TenSEAL sees it."""
    wire.parse(blob, max_slots=ckks.slot_count(context))
    try:
        return ts.ckks_vector_from(context, bytes(blob))
    except (RuntimeError, ValueError, TypeError) as exc:
        raise BundleError(f"mask ciphertext: TenSEAL refused it ({exc})") from None
