"""The tiled engine: strict, mixed and encrypted-label policies (mpc_ops/layers/tiled_net.py).

An implementation of hetrain.engines.Engine, picked when the policy needs more than the depth-1
hybrid path (mpc_ops/layers/depth_plan.uses_tiled). Owners prepare tiled bundles
(participants/tiled_owner); strict runs are evaluated on the owners' side. No Prefect in here.
"""

import time

import numpy as np

from hetrain.core.errors import ConfigError
from hetrain.mpc_ops.crypto.tensors import EncryptedTensor
from hetrain.mpc_ops.exchange.tiled_bundle import TiledRef, TiledStore
from hetrain.mpc_ops.layers.cipher_layers import weights_digest
from hetrain.mpc_ops.layers.circuit import CipherOps, PlainOps
from hetrain.mpc_ops.layers.tiled import tiling_for
from hetrain.mpc_ops.layers.tiled_net import Inputs, Outcome, Reveal, TiledLearner, build_net, plain_reveal
from hetrain.mpc_ops.reveal.revealer import Revealer
from hetrain.participants import tiled_owner

from hetrain import tiled_report
from hetrain.engine import Model, make_optimizer
from hetrain.engines import cache_params, prefixed, restore_cache, restore_learner
from hetrain.runtime import Runtime


class TiledEngine:
    """Tiled training: one object per run, its learners (and the plaintext twin) kept across rounds."""

    name = "tiled"

    def __init__(self, rt: Runtime, revealer: Revealer):
        self.rt, self.revealer = rt, revealer
        self.tiling = tiling_for(rt.cfg)
        self._rows: list[str] = []  # pseudonyms of the batch being revealed (the key holder's ledger)
        self._store: TiledStore | None = None
        model = Model(rt.cfg)
        self.learner = TiledLearner(model, make_optimizer(rt.cfg), build_net(rt.cfg, model, self.tiling),
                                    CipherOps(rt.context), self._reveal)
        self.twin = None
        if rt.cfg.report.plaintext_twin:
            twin_model = Model(rt.cfg)
            self.twin = TiledLearner(twin_model, make_optimizer(rt.cfg), build_net(rt.cfg, twin_model, self.tiling),
                                     PlainOps(self.tiling.slots), plain_reveal(self.tiling))

    def _reveal(self, r: Reveal) -> np.ndarray:
        """The net's Reveal as an EncryptedTensor, through the run's Revealer; (count × outputs) back."""
        net = self.learner.net
        blobs = [v.v.serialize() for v in r.vals]
        cipher_w = np.concatenate([net.layers[i].W.ravel() for i in net.linears[: net.cipher]])
        enc = EncryptedTensor(
            kind=r.kind, layer=r.layer, shape=(r.count, len(r.vals)), blobs=blobs, stride=[r.stride] * len(blobs),
            counts=[r.count] * len(blobs), placement=[(np.arange(r.count), c) for c in range(len(blobs))],
            aggregate=r.aggregate, meta={"rows": self._rows, "weights": weights_digest(cipher_w)})
        return self.revealer.reveal(enc)

    # ---- owners and data -----------------------------------------------------------------------
    def prepare_owner(self, owner: str) -> dict:
        rt = self.rt
        owner_cfg = next(o for o in rt.cfg.data.owners if o.name == owner)
        if owner_cfg.path is None:
            raise ConfigError(f"owner '{owner}': deployment '{owner_cfg.deployment}' prepares the hybrid layout "
                              f"only; under policy mode '{tiled_report.mode_name(rt.cfg)}' give the owner's table "
                              f"as data.owners[].path")
        start = time.perf_counter()
        manifest = tiled_owner.prepare(rt.cfg, owner_cfg, rt.paths.public_context.read_bytes(), self.tiling,
                                       rt.owner_dir, rt.paths.owners, encrypt_test=bool(rt.cfg.policy.reveals))
        rt.publish_owner(owner)
        entries = [e for s in manifest["splits"].values() for b in s["batches"]
                   for e in b["rep"] + ([b["block"]] if b["block"] else []) + b["labels"]]
        return {"owner": owner, "reused": False, "bytes": sum(e["bytes"] for e in entries),
                "ciphertexts": len(entries), "n_train": manifest["splits"]["train"]["n"],
                "n_test": manifest["splits"]["test"]["n"], "seconds": round(time.perf_counter() - start, 3)}

    @property
    def store(self) -> TiledStore:
        if self._store is None:
            self.rt.mirror_exchange()
            self._store = TiledStore(self.rt.paths.exchange, self.rt.cfg, self.rt.key_id, self.tiling)
        return self._store

    def manifests(self) -> dict:
        return self.store.manifests

    def bytes_read(self) -> int:
        return self.store.bytes_read

    def train_refs(self) -> list[TiledRef]:
        return self.store.batches("train")

    def _load(self, ref: TiledRef) -> Inputs:
        cached = self.learner.net.frozen and ref.batch_id in self.learner.frozen_cache
        x = self.store.load(self.learner.ops, ref, public_labels=self.rt.cfg.policy.labels == "reveal",
                            features=not cached)
        self._rows = x.rows
        return x

    # ---- a round ---------------------------------------------------------------------------------
    def set_frozen(self, frozen: bool) -> None:
        for learner in (self.learner, self.twin):
            if learner is not None:
                learner.net.frozen = frozen

    def train_group(self, refs: list[TiledRef]) -> list[Outcome]:
        """Forward, (reveal), loss, backward and reveal of aggregated gradients, batch by batch."""
        return [self.learner.train_batch(self._load(ref)) for ref in refs]

    def train_metrics(self, results: list[Outcome]) -> tuple[float | None, float | None]:
        known = [r for r in results if r.loss is not None]  # strict: the trainer sees no loss
        n = sum(r.m for r in known)
        return (sum(r.loss for r in known) / n, sum(r.correct for r in known) / n) if known else (None, None)

    def evaluate(self) -> tuple[float, float]:
        """With a reveal point: encrypted test forward, activation reveal, metrics (revealed aggregates
        under encrypted labels). Strict: the owners' side evaluates the released model."""
        if not self.rt.cfg.policy.reveals:
            return self.owner_side_accuracy(self.learner.model)
        outcomes = [self.learner.eval_batch(self._load(ref)) for ref in self.store.batches("test")]
        n = sum(o.m for o in outcomes)
        return sum(o.loss for o in outcomes) / n, sum(o.correct for o in outcomes) / n

    def run_twin(self, order: np.ndarray, refs: list[TiledRef]) -> float | None:
        """The same circuit on the owners' plaintext (numpy engine; diagnostic, report.plaintext_twin)."""
        if self.twin is None:
            return None
        cfg, tiling, ops = self.rt.cfg, self.tiling, self.twin.ops
        x_all, y_all = self._local("train")
        starts = self._starts(refs)
        for i in order:
            ref = refs[i]
            start, m = starts[ref]
            x, y = x_all[start : start + m], y_all[start : start + m]
            enc = None
            if cfg.policy.labels == "encrypted":
                enc = [ops.secret(v) for v in tiled_owner.label_vectors(cfg, tiling, y)]
            inputs = Inputs(m, [ops.secret(tiling.rep(x[:, j])) for j in range(x.shape[1])],
                            ops.secret(tiling.block(x)), labels=y, enc_labels=enc, batch_id=ref.batch_id)
            self.twin.train_batch(inputs)
        return self.owner_side_accuracy(self.twin.model)[1]

    def round_fields(self) -> dict:
        return {}

    # ---- the owners' side of evaluation ----------------------------------------------------------
    def _local(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """The owners' side: their standardised features (joined by input position) and the labels."""
        cfg, parts, y, xs, ys = self.rt.cfg, [], None, [], []
        for o in cfg.data.owners:
            with np.load(self.rt.paths.owners / f"{o.name}.npz") as data:
                if cfg.data.partition == "vertical":
                    parts.append(data[f"x_{split}"])
                    if o.label:
                        y = data[f"y_{split}"]
                else:
                    xs.append(data[f"x_{split}"])
                    ys.append(data[f"y_{split}"])
        if cfg.data.partition == "vertical":
            return np.concatenate(parts, axis=1), y
        return np.concatenate(xs), np.concatenate(ys)

    def owner_side_accuracy(self, model: Model) -> tuple[float, float]:
        """Strict mode: the owners evaluate the released weights on their test rows; only (loss, accuracy) leave."""
        x, y = self._local("test")
        logits = x
        for layer in [model.input] + list(model.body.layers):
            logits = layer.forward(logits)
        if self.rt.cfg.data.task == "binary":
            z = logits[:, 0]
            loss = float((np.logaddexp(0.0, z) - y * z).mean())
            return loss, float(((z > 0).astype(int) == y).mean())
        shifted = logits - logits.max(axis=1, keepdims=True)
        logp = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
        return float(-logp[np.arange(len(y)), y].mean()), float((logits.argmax(axis=1) == y).mean())

    def _starts(self, refs: list[TiledRef]) -> dict:
        """Offset of each batch in the owners' concatenated local arrays (the order _local joins them)."""
        out, base = {}, 0
        if self.rt.cfg.data.partition == "vertical":
            groups = [refs]
        else:
            groups = [[r for r in refs if r.owners == (o.name,)] for o in self.rt.cfg.data.owners]
        for group in groups:
            for ref in group:
                out[ref] = (base, self.store.size(ref))
                base += self.store.size(ref)
        return out

    # ---- checkpoint ------------------------------------------------------------------------------
    def state(self) -> tuple[dict, dict, dict]:
        params, opt = {}, {}
        for prefix, learner in (("hybrid", self.learner), ("twin", self.twin)):
            if learner is not None:
                params.update(prefixed(prefix, learner.model.parameters()))
                opt.update(prefixed(prefix, learner.optimizer.state_dict()))
        params.update(cache_params(self.learner.frozen_cache))
        return params, opt, {"engine": "tiled"}

    def restore(self, ckpt, same_data: bool) -> None:
        for prefix, learner in (("hybrid", self.learner), ("twin", self.twin)):
            restore_learner(prefix, learner, ckpt)
        if same_data:
            self.learner.frozen_cache = restore_cache(ckpt.params)

    # ---- the run's report ------------------------------------------------------------------------
    def final_fields(self, audit: dict, rounds: list[dict]) -> dict:
        return tiled_report.final_fields(self.rt.cfg, audit)

    def summary(self, final: dict, rounds: list[dict], owners: list[dict], audit: dict, lineage: dict) -> str:
        return tiled_report.summary_markdown(self.rt.cfg, final, rounds, owners, audit)
