"""A trained run, as the attacks see it: the trainer's view (key-holder client, public context, exchange store,
its own weights) plus, for scoring only, the owners' truth."""

import hashlib
import json
import uuid
from pathlib import Path

import numpy as np

from hetrain.core.errors import BundleError, ForeignKeyError
from hetrain.mpc_ops.reveal.protocol import RevealRequest
from hetrain.mpc_ops.crypto import ckks, ring
from hetrain.mpc_ops.exchange.bundle import BatchRef
from hetrain.mpc_ops.layers.cipher_layers import CipherLinear
from hetrain.mpc_ops.reveal import verified
from hetrain.participants.data_owner import _batch_slices, load_split
from hetrain.participants.table import load_table


class Target:
    """One mode's run: the trainer after `Trainer.run`, its key holder live."""

    HEADROOM_PROBE_VALUE = 3.25  # the known value the range-check probe searches for

    def __init__(self, trainer):
        self.trainer, self.rt, self.engine = trainer, trainer.rt, trainer.engine
        self.cfg = self.rt.cfg
        self.untrusted = self.cfg.policy.trainer == "untrusted"
        self.client, self.context, self.key_id = self.rt.key_holder, self.rt.context, self.rt.key_id
        self.public = self.context.serialize(save_secret_key=False)
        self.params = self.cfg.ckks.params()
        first = self.cfg.model.layers[0]
        self.layer, self.outputs = first.name, first.out_features
        self.owner = self.cfg.data.owners[0]
        self.truth = load_split(self.cfg, self.owner)  # scoring only
        self.d = len(self.owner.features) if self.cfg.data.partition == "horizontal" else \
            sum(len(o.features) for o in self.cfg.data.owners)

    # ---- what a trainer has ------------------------------------------------------------------------
    def rows(self, n: int) -> list[str]:
        ids = self.truth.published(self.truth.ids["train"][:n])
        return ids + [uuid.uuid4().hex[:24] for _ in range(n - len(ids))]

    def product_template(self) -> bytes:
        fresh = ckks.load_vector(self.context, ckks.encrypt(self.context, np.zeros(self.params.slots)),
                                 ckks.fresh_layout(self.context))
        return ckks.multiply_plain(fresh, np.ones(self.params.slots)).serialize()

    def _batch(self, index: int = 0):
        """(encrypted batch, its standardised truth) of the first owner's training batch `index` (hybrid)."""
        ref = BatchRef("train", (self.owner.name,), index)
        x = self.truth.x["train"]
        sl = _batch_slices(len(x), self.cfg.train.batch_size, self.cfg.policy.min_batch)[index]
        return self.rt.store.load(ref), x[sl]

    def owner_ciphertext(self) -> tuple[bytes, np.ndarray]:
        """One fresh owner ciphertext from the exchange store, and the slot values it holds."""
        x = self.truth.x["train"]
        if self.untrusted:
            chunk = self.engine.store.chunk_list("train")[0]
            return self.engine.store.features(chunk)[0], x[: chunk.n, 0]
        batch, truth = self._batch()
        plan = self.rt.plan
        return batch.parts[0].rows[0], plan.rows_vector(truth[plan.chunks(len(truth))[0]])

    def _verified_request(self, weights: np.ndarray, split: str, output: int):
        """Σ_j W[j, output]·ct_j + M_output for the first chunk of `split`, as a verified request."""
        from hetrain.verified_engine import ts_load

        chunk = self.engine.store.chunk_list(split)[0]
        context = ckks.load_public_context(self.public, isolate=False)
        context.auto_rescale = False
        acc = None
        for j, blob in enumerate(self.engine.store.features(chunk)):
            term = ckks.load_vector(context, blob, ckks.fresh_layout(context)).mul(float(weights[j, output]))
            acc = term if acc is None else acc.add_(term)
        blob = acc.add_(ts_load(context, self.engine.store.mask(chunk, output))).serialize()
        return verified.new_request(self.key_id, self.layer, chunk.chunk, output, blob)

    def reveal_with_weights(self, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Revealed X·W for weights the trainer chose (5 matrices, the rank limit's worth), with the truth X."""
        if self.untrusted:
            response = self.client.reveal_verified(self._verified_request(weights, "test", 0))
            raise BundleError(f"the key holder answered a reveal under chosen weights ({len(response.values)} values)")
        batch, truth = self._batch()
        found = []
        for m in range(min(5, self.d // weights.shape[1])):
            shifted = np.roll(weights, m * weights.shape[1], axis=0)
            layer = CipherLinear(self.layer, shifted, self.context, self.rt.plan, self.params.headroom,
                                 self.cfg.policy.mask_bound)
            found.append(self.trainer.revealer.reveal(layer.forward(batch)))
        return np.concatenate(found, axis=1), truth

    def reveal_under_old_digest(self) -> tuple[np.ndarray, np.ndarray]:
        """Every feature of batch 2 through unit-vector weights, each reveal declaring the digest of one honest W."""
        if self.untrusted:  # declared fields are all this would change, and declared reveals are refused
            return self.trainer.revealer.reveal(self._untrusted_gradient()), None
        batch, truth = self._batch(2)
        honest = self._trained_weights()
        layer = CipherLinear(self.layer, honest, self.context, self.rt.plan, self.params.headroom,
                             self.cfg.policy.mask_bound)
        old = layer.forward(batch)
        self.trainer.revealer.reveal(old)  # the ledger now holds this W for these samples
        h, found = honest.shape[1], []
        for m in range(-(-self.d // h)):
            chosen = np.full((self.d, h), 1e-6)
            cols = [j for j in range(m * h, min((m + 1) * h, self.d))]
            chosen[cols, range(len(cols))] = 1.0
            enc = CipherLinear(self.layer, chosen, self.context, self.rt.plan, self.params.headroom,
                               self.cfg.policy.mask_bound).forward(batch)
            enc.meta["weights"] = old.meta["weights"]  # the lie
            found.append(self.trainer.revealer.reveal(enc)[:, : len(cols)])
        return np.concatenate(found, axis=1), truth

    def probe_headroom(self, searches: int = 3) -> tuple[list[float], int]:
        """Binary-search, `searches` times, the offset at which a known value crosses the headroom; (the value
        each search infers, decryptions). A check on unflooded values answers the same every time."""
        value = self.HEADROOM_PROBE_VALUE
        known = np.full(self.params.slots, value)
        fresh = ckks.load_vector(self.context, ckks.encrypt(self.context, known), ckks.fresh_layout(self.context))
        product = ckks.multiply_plain(fresh, np.ones(self.params.slots))
        estimates, probes = [], 0
        for _ in range(searches):
            value_seen, probes = self._search_headroom(product, probes)
            estimates.append(value_seen)
        return estimates, probes

    def _search_headroom(self, product, probes: int) -> tuple[float, int]:
        low, high, refused_once = 0.0, 2.0 * self.params.headroom, False
        for _ in range(30):
            offset = (low + high) / 2
            shift = np.zeros(self.params.slots)
            shift[0] = offset  # one slot: a constant vector would wrap around the modulus instead
            blob = ckks.add_plain(product, shift).serialize()
            request = RevealRequest(uuid.uuid4().hex, self.key_id, "gradient", self.layer, 1, [blob], [1], [1], 64,
                                    rows=self.rows(64))
            probes += 1
            try:
                self.client.reveal(request)
                low = offset
            except ForeignKeyError:  # beyond the headroom
                high, refused_once = offset, True
        if not refused_once:
            raise BundleError("the range check never refused")
        return self.params.headroom - (low + high) / 2, probes

    def one_hot_gradient(self) -> tuple[np.ndarray, np.ndarray]:
        """X^T·e_i for each of the first 8 samples i of a batch, and their truth."""
        if self.untrusted:  # the only gradient there is: a declared reveal, which this key holder refuses
            return self.trainer.revealer.reveal(self._untrusted_gradient()), None
        batch, truth = self._batch()
        weights = self._trained_weights()
        layer = CipherLinear(self.layer, weights, self.context, self.rt.plan, self.params.headroom,
                             self.cfg.policy.mask_bound)
        layer.forward(batch)
        found = []
        for i in range(8):
            delta = np.zeros((len(truth), weights.shape[1]))
            delta[i, :] = 1.0  # every output's column is sample i's feature vector
            found.append(self.trainer.revealer.reveal(layer.backward(delta))[:, 0])
        return np.array(found), truth[:8, : len(found[0])]

    def _untrusted_gradient(self):
        from hetrain.mpc_ops.crypto.tensors import EncryptedTensor

        blob = self.product_template()
        return EncryptedTensor(kind="gradient", layer=self.layer, shape=(1, 1), blobs=[blob], stride=[1], counts=[1],
                               placement=[(np.arange(1), 0)], aggregate=64, meta={"rows": self.rows(64)})

    def reveal_twice(self) -> tuple[np.ndarray, np.ndarray]:
        """The same output of the same samples, revealed twice."""
        if self.untrusted:  # the run revealed every chunk once already: this is the second time
            response = self.client.reveal_verified(self._verified_request(self.client.input_weights(self.layer),
                                                                          "train", 0))
            raise BundleError(f"the key holder revealed an output twice ({len(response.values)} values)")
        batch, _ = self._batch(1)  # another batch than the other attacks': their rank budgets stay apart
        layer = CipherLinear(self.layer, self._trained_weights(), self.context, self.rt.plan, self.params.headroom,
                             self.cfg.policy.mask_bound)
        return self.trainer.revealer.reveal(layer.forward(batch)), self.trainer.revealer.reveal(layer.forward(batch))

    def _trained_weights(self) -> np.ndarray:
        return self.engine.hybrid.model.input.W.copy()

    def pseudonym_guesses(self) -> tuple[list[str], list[str]]:
        """The pseudonyms in the exchange store, and the guesses of an attacker who knows the ID space."""
        if self.untrusted:
            chunk = self.engine.store.chunk_list("train")[0]
            published = self.engine.store._ids(self.owner.name, chunk.chunk)  # noqa: SLF001
        else:
            entry = self.rt.store.manifests[self.owner.name]["splits"]["train"]["ids"]
            published = json.loads((self.rt.paths.exchange / self.owner.name / entry["file"]).read_text())
        frame = load_table(self.owner.path, owner=self.owner.name, id_column=self.cfg.data.id_column,
                           feature_columns=self.owner.features, label_column=None)
        return published, seed_keyed(frame[self.cfg.data.id_column].to_numpy(), self.cfg.seed)

    def owner_plaintext_files(self) -> list[Path]:
        return sorted(p for p in self.rt.paths.owners.rglob("*.npz")) if self.rt.paths.owners.is_dir() else []

    def forged_verified(self) -> None:
        honest = self._verified_request(self.client.input_weights(self.layer), "train", 0)
        chunk = self.engine.store.chunk_list("train")[0]
        template = ring.read(honest.blob, self.params.slots)  # a verified result's level and scales
        coeffs = np.zeros_like(template.coeffs)
        coeffs[1] = np.uint64(2**50)
        blob = ring.write(template, coeffs)
        self.client.reveal_verified(verified.new_request(self.key_id, self.layer, chunk.chunk, 0, blob))

    # ---- what the policy reveals to an honest trainer -------------------------------------------
    def honest_views(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(revealed values Z, the weights behind them, truth X) for the training rows of the first owner."""
        x = self.truth.x["train"]
        if self.untrusted:
            weights = self.client.input_weights(self.layer)
            chunks = [c for c in self.engine.store.chunk_list("train") if c.owners == (self.owner.name,)]
            z = np.concatenate([np.load(self.rt.paths.root / "verified" / self.key_id / f"{c.chunk}.npy")
                                for c in chunks])
            cols = slice(shape_offset(self), shape_offset(self) + x.shape[1])
            return z, weights[cols], x[: len(z)]
        # the hybrid reveals X·W_r under every distinct W_r its layer trained through (checkpoints hold them);
        # the flooding σ is the key holder's, from its audit summary
        sigma = self.client.audit_summary().get("sigma") or 0.0
        weights = [self._checkpoint_weights(p) for p in sorted(self.rt.paths.checkpoints.glob("round-*"))]
        distinct = [w for i, w in enumerate(weights) if i == 0 or not np.allclose(w, weights[i - 1])]
        stacked = np.concatenate(distinct, axis=1)
        rng = np.random.default_rng(0)
        z = x @ stacked + rng.normal(0.0, sigma, size=(len(x), stacked.shape[1]))
        return z, stacked, x

    def _checkpoint_weights(self, path: Path) -> np.ndarray:
        from hetrain.checkpoint import load_checkpoint

        return load_checkpoint(path).params[f"hybrid.{self.layer}.W"]


def seed_keyed(ids, seed: int) -> list[str]:
    """What a trainer can compute for every guessed ID from the config alone (hetrain's pseudonyms until the
    owners' secret key replaced the public seed): sha256("id:{seed}:{id}")[:24]."""
    return [hashlib.sha256(f"id:{seed}:{v}".encode()).hexdigest()[:24] for v in ids]


def shape_offset(target: Target) -> int:
    from hetrain.core.shapes import feature_offset

    return feature_offset(target.cfg, target.owner.name)

