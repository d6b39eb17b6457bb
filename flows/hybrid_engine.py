"""The hybrid engine: the first layer on ciphertext (rows/column packing, depth 1), the rest in plaintext.

An implementation of hetrain.engines.Engine: owners' bundles from participants/data_owner, batches
from the exchange store, the step in hetrain.engine.Learner. No Prefect in here.
"""

import numpy as np

from hetrain.core import store
from hetrain.core.errors import BundleError
from hetrain.mpc_ops.crypto import ckks
from hetrain.mpc_ops.crypto.jobs import JobRunner
from hetrain.mpc_ops.crypto.tensors import PlainBatch
from hetrain.mpc_ops.exchange.bundle import BatchRef
from hetrain.mpc_ops.layers.cipher_layers import CipherLinear, PlainInputLinear
from hetrain.mpc_ops.reveal.revealer import Revealer
from hetrain.participants import data_owner

from hetrain import artifacts
from hetrain.engine import LazyBatch, Learner, Model, StepResult, make_optimizer, summarise
from hetrain.engines import cache_params, prefixed, restore_cache, restore_learner
from hetrain.runtime import Runtime


def job_runner(rt: Runtime):
    """Where ciphertext jobs run: worker processes of this machine, or Dask tasks (train.compute)."""
    if rt.cfg.train.compute == "dask":
        from hetrain.dask_jobs import DaskJobRunner

        return DaskJobRunner(rt.paths.public_context, rt.plan.slots, rt.cfg.train.workers)
    return JobRunner(rt.context, rt.plan.slots, rt.cfg.train.workers)


def build_learners(rt: Runtime, revealer: Revealer) -> tuple[Learner, Learner | None]:
    """The hybrid learner and (if configured) its plaintext twin, freshly initialised."""
    model, twin_model = Model(rt.cfg), Model(rt.cfg)
    name = model.input.name
    dp = rt.cfg.policy.dp
    clip = dp.clip if dp else None
    hybrid = Learner(model, make_optimizer(rt.cfg),
                     CipherLinear(name, model.input.W, rt.context, rt.plan, rt.cfg.ckks.params().headroom,
                                  rt.cfg.policy.mask_bound, job_runner(rt),
                                  gradient_gain_cap=1.0 if dp else None),
                     revealer.reveal, dp_clip=clip, cache_frozen=True, min_rows=rt.cfg.policy.min_batch)
    twin = Learner(twin_model, make_optimizer(rt.cfg), PlainInputLinear(name, twin_model.input.W),
                   lambda x: x, dp_clip=clip, min_rows=rt.cfg.policy.min_batch) if rt.cfg.report.plaintext_twin else None
    return hybrid, twin


class HybridEngine:
    """Depth-1 hybrid training: one object per run, its learners kept in memory across rounds."""

    name = "hybrid"

    def __init__(self, rt: Runtime, revealer: Revealer):
        self.rt, self.revealer = rt, revealer
        self.hybrid, self.twin = build_learners(rt, revealer)

    # ---- owners and data -----------------------------------------------------------------------
    def prepare_owner(self, owner: str) -> dict:
        """Validate, standardise and encrypt one in-process owner's table into the exchange store."""
        rt = self.rt
        owner_cfg = next(o for o in rt.cfg.data.owners if o.name == owner)
        twin_dir = rt.paths.owners / owner if rt.cfg.report.plaintext_twin else None
        public = store.read_bounded(rt.paths.public_context, ckks.MAX_CONTEXT_BYTES, "public context", BundleError)
        manifest = data_owner.prepare(rt.cfg, owner_cfg, public, rt.plan, rt.owner_dir, twin_dir)
        rt.publish_owner(owner)
        return data_owner.bundle_summary(manifest, manifest["reused"])

    def manifests(self) -> dict:
        return self.rt.store.manifests

    def bytes_read(self) -> int:
        return self.rt.store.bytes_read

    def train_refs(self) -> list:
        return self.rt.store.batches("train")

    # ---- a round ---------------------------------------------------------------------------------
    def set_frozen(self, frozen: bool) -> None:
        """The rank limit allows no new weights for the ciphertext layer: freeze it (both learners)."""
        for learner in (self.hybrid, self.twin):
            if learner is not None:
                learner.input_frozen = frozen

    def train_group(self, refs: list) -> list[StepResult]:
        """Forward, reveal, backward, reveal and step on a group of encrypted batches, in order."""
        return [self.hybrid.train_batch(self._lazy(ref), self.rt.store.labels(ref)) for ref in refs]

    def train_metrics(self, results: list[StepResult]) -> tuple[float, float]:
        return summarise(results)

    def evaluate(self) -> tuple[float, float]:
        """Test-set forward passes on ciphertext, revealed under the same policy: (loss, accuracy)."""
        return summarise([self.hybrid.eval_batch(self._lazy(ref), self.rt.store.labels(ref))
                          for ref in self.rt.store.batches("test")])

    def run_twin(self, order: np.ndarray, refs: list) -> float | None:
        """The same round on the owners' standardised plaintext (diagnostic, report.plaintext_twin)."""
        if self.twin is None:
            return None
        labels = self.rt.store.labels
        for i in order:
            self.twin.train_batch(self._twin_batch(refs[i]), labels(refs[i]))
        test = [self.twin.eval_batch(self._twin_batch(r), labels(r)) for r in self.rt.store.batches("test")]
        return summarise(test)[1]

    def round_fields(self) -> dict:
        return {}

    def _lazy(self, ref: BatchRef) -> LazyBatch:
        return LazyBatch(ref.batch_id, lambda: self.rt.store.load(ref))

    def _twin_batch(self, ref) -> PlainBatch:
        """Each owner's twin features for the batch, side by side in the model's input order."""
        rt = self.rt
        parts = [rt.store.twin_batch(rt.paths.owners / o, BatchRef(ref.split, (o,), ref.index)).x for o in ref.owners]
        return PlainBatch(ref.batch_id, np.concatenate(parts, axis=1))

    # ---- checkpoint ------------------------------------------------------------------------------
    def state(self) -> tuple[dict, dict, dict]:
        """(params, optimizer state, extra) of both learners, keyed 'hybrid.…' / 'twin.…'."""
        params, opt = {}, {}
        for prefix, learner in (("hybrid", self.hybrid), ("twin", self.twin)):
            if learner is not None:
                params.update(prefixed(prefix, learner.model.parameters()))
                opt.update(prefixed(prefix, learner.optimizer.state_dict()))
        params.update(cache_params(self.hybrid.frozen_cache))
        return params, opt, {}

    def restore(self, ckpt, same_data: bool) -> None:
        """Load a checkpoint's weights and optimizer state; the frozen layer's outputs only for the same data."""
        for prefix, learner in (("hybrid", self.hybrid), ("twin", self.twin)):
            restore_learner(prefix, learner, ckpt)
        if same_data:
            self.hybrid.frozen_cache = restore_cache(ckpt.params)

    # ---- the run's report ------------------------------------------------------------------------
    def final_fields(self, audit: dict, rounds: list[dict]) -> dict:
        return {"dp_epsilon": max((led["dp_epsilon"] for led in audit["ledger"].values()
                                   if led["dp_epsilon"] is not None), default=None)}

    def summary(self, final: dict, rounds: list[dict], owners: list[dict], audit: dict, lineage: dict) -> str:
        rt = self.rt
        plot = artifacts.plot_png(rounds, rt.paths.plot)
        return artifacts.summary_markdown(rt.cfg.name, final, rounds, rt.cfg.policy.model_dump(), owners, audit,
                                          plot, rt.paths.out, lineage)
