"""Prefect tasks: coarse steps with retries on I/O and key-holder calls only, never on the math."""

import logging
import time
from contextvars import ContextVar

import numpy as np
from prefect import task
from prefect.cache_policies import NO_CACHE

from hetrain.mpc_ops.exchange.bundle import BatchRef
from hetrain.mpc_ops.layers.cipher_layers import CipherLinear, PlainInputLinear
from hetrain.mpc_ops.crypto import ckks
from hetrain.core import store
from hetrain.core.errors import BundleError, CheckpointError, HetrainError
from hetrain.core.failpoints import failpoint
from hetrain.mpc_ops.crypto.jobs import JobRunner
from hetrain.mpc_ops.reveal.protocol import RevealRequest, RevealResponse, blind, unblind
from hetrain.mpc_ops.crypto.tensors import PlainBatch
from hetrain.participants import data_owner

from hetrain import checkpoint
from hetrain.engine import LazyBatch, Learner, Model, StepResult, make_optimizer
from hetrain.runtime import Runtime


# False runs every task's plain function (task.fn) with no Prefect engine around it: the
# benchmark uses this to measure the orchestration overhead of the very same rounds.
ENGINE: ContextVar[bool] = ContextVar("hetrain_prefect_engine", default=True)


def run(task, *args):
    """Call a task through the Prefect engine, or as a plain function when ENGINE is off."""
    return task(*args) if ENGINE.get() else task.fn(*args)


def transient_only(task, task_run, state) -> bool:
    """Retry I/O and connection faults; never a policy refusal, a bad input or a math error."""
    try:
        state.result()
    except HetrainError:
        return False
    except (OSError, ConnectionError, TimeoutError):
        return True
    except Exception:
        return False
    return False


@task(name="set-up-key-holder", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=1,
      retry_condition_fn=transient_only)
def set_up_key_holder(rt: Runtime) -> str:
    """Create or load the key, and publish the public context; returns the key id."""
    return rt.publish_public_context()


@task(name="encrypt-owner-table", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=1,
      retry_condition_fn=transient_only)
def encrypt_owner_table(rt: Runtime, owner: str) -> dict:
    """Validate, standardise and encrypt one owner's table into the exchange store."""
    owner_cfg = next(o for o in rt.cfg.data.owners if o.name == owner)
    twin_dir = rt.paths.owners / owner if rt.cfg.report.plaintext_twin else None
    public = store.read_bounded(rt.paths.public_context, ckks.MAX_CONTEXT_BYTES, "public context", BundleError)
    manifest = data_owner.prepare(rt.cfg, owner_cfg, public, rt.plan, rt.owner_dir, twin_dir)
    rt.publish_owner(owner)
    return data_owner.bundle_summary(manifest, manifest["reused"])


KEY_HOLDER_RETRY_DELAYS = (1.0, 2.0, 4.0)


def call_key_holder(rt: Runtime, request: RevealRequest, delays=KEY_HOLDER_RETRY_DELAYS) -> RevealResponse:
    """One blinded reveal, retried on transient I/O faults only, never on a refusal or bad input.

    Not a task of its own: a round makes two reveals per batch, and as task runs they cost
    about 8% of a digits round (measured by `hetrain bench`), far over the 5% budget.
    """
    for delay in (*delays, None):
        try:
            return rt.key_holder.reveal(request)
        except HetrainError:
            raise
        except (OSError, ConnectionError, TimeoutError) as exc:
            if delay is None:
                raise
            logging.getLogger("hetrain").warning("key holder call failed (%s); retrying in %.0f s", exc, delay)
            time.sleep(delay)


class Traffic:
    """Bytes and decryptions of one round, counted as they happen."""

    def __init__(self):
        self.to_key_holder = self.from_key_holder = self.reveals = 0


def cipher_reveal(rt: Runtime, round_no: int, traffic: Traffic):
    """The explicit reveal used by the hybrid learner: blind, ask the key holder, unblind."""
    def reveal(enc):
        request, masks = blind(enc, rt.context, key_id=rt.key_id, round_no=round_no,
                               mask_bound=rt.cfg.policy.mask_bound)
        response = call_key_holder(rt, request)
        failpoint("round.after_reveal")
        traffic.to_key_holder += request.n_bytes
        traffic.from_key_holder += sum(v.nbytes for v in response.values)
        traffic.reveals += 1
        return unblind(enc, response, masks)
    return reveal


def job_runner(rt: Runtime):
    """Where ciphertext jobs run: worker processes of this machine, or Dask tasks (train.compute)."""
    if rt.cfg.train.compute == "dask":
        from hetrain.dask_jobs import DaskJobRunner

        return DaskJobRunner(rt.paths.public_context, rt.plan.slots, rt.cfg.train.workers)
    return JobRunner(rt.context, rt.plan.slots, rt.cfg.train.workers)


def build_learners(rt: Runtime, round_no: int, traffic: Traffic) -> tuple[Learner, Learner | None]:
    """The hybrid learner and (if configured) its plaintext twin, freshly initialised."""
    model, twin_model = Model(rt.cfg), Model(rt.cfg)
    name = model.input.name
    dp = rt.cfg.policy.dp
    clip = dp.clip if dp else None
    hybrid = Learner(model, make_optimizer(rt.cfg),
                     CipherLinear(name, model.input.W, rt.context, rt.plan, rt.cfg.ckks.params().headroom,
                                  rt.cfg.policy.mask_bound, job_runner(rt),
                                  gradient_gain_cap=1.0 if dp else None),
                     cipher_reveal(rt, round_no, traffic), dp_clip=clip, cache_frozen=True,
                     min_rows=rt.cfg.policy.min_batch)
    twin = Learner(twin_model, make_optimizer(rt.cfg), PlainInputLinear(name, twin_model.input.W),
                   lambda x: x, dp_clip=clip, min_rows=rt.cfg.policy.min_batch) if rt.cfg.report.plaintext_twin else None
    return hybrid, twin


CACHE_PREFIX = "frozen_cache."


def _cache_params(hybrid: Learner) -> dict:
    """The frozen input layer's revealed outputs, saved so a resumed run need not reveal them again."""
    return {CACHE_PREFIX + batch_id.replace("/", "|"): z for batch_id, z in hybrid.frozen_cache.items()}


def _restore_cache(hybrid: Learner, params: dict) -> None:
    hybrid.frozen_cache = {k[len(CACHE_PREFIX):].replace("|", "/"): v for k, v in params.items()
                           if k.startswith(CACHE_PREFIX)}


def _prefixed(prefix: str, state: dict) -> dict:
    """Checkpoint keys of one learner: 'hybrid.enc1.W', 'twin.out.b', …"""
    return {f"{prefix}.{k}": v for k, v in state.items()}


def _unprefixed(prefix: str, state: dict) -> dict:
    return {k[len(prefix) + 1 :]: v for k, v in state.items() if k.startswith(prefix + ".")}


@task(name="restore-state", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=1,
      retry_condition_fn=transient_only)
def restore_state(rt: Runtime, hybrid: Learner, twin: Learner | None, round_no: int) -> dict:
    """Load the previous round's checkpoint into the learners (for round 1, a warm start's parent, if any);
    returns its extra state and its path as `parent_checkpoint` (or {})."""
    previous = rt.paths.checkpoints / f"round-{round_no - 1:05d}" if round_no > 1 else rt.warm_start_from
    if previous is None:
        return {}
    ckpt = checkpoint.load_checkpoint(previous)
    try:
        for prefix, learner in (("hybrid", hybrid), ("twin", twin)):
            params = _unprefixed(prefix, ckpt.params)
            if learner is None or (prefix == "twin" and not params):  # a twin may start mid-run
                continue
            learner.model.load(params)
            learner.optimizer.load_state_dict(_unprefixed(prefix, ckpt.optimizer_state))
        if ckpt.extra.get("data") == rt.data_digest():  # cached outputs are only valid for the same data
            _restore_cache(hybrid, ckpt.params)
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(
            f"checkpoint {previous} does not fit the current config (model or optimizer changed?): {exc}; "
            f"resume with the config it was made with, or start a new --run-dir"
        ) from None
    # the parent's state.json pins every file of it by digest: lineage names exactly what was read
    return {"parent_checkpoint": str(previous), "parent_state_sha256": store.sha256_file(previous / "state.json"),
            **ckpt.extra}


@task(name="train-batch-group", cache_policy=NO_CACHE)
def train_batch_group(rt: Runtime, hybrid: Learner, refs: list) -> list[StepResult]:
    """Forward, reveal, backward, reveal and step on a group of encrypted batches, in order."""
    return [hybrid.train_batch(_lazy(rt, ref), rt.store.labels(ref)) for ref in refs]


def _lazy(rt: Runtime, ref: BatchRef) -> LazyBatch:
    return LazyBatch(ref.batch_id, lambda: rt.store.load(ref))


@task(name="evaluate", cache_policy=NO_CACHE)
def evaluate(rt: Runtime, hybrid: Learner) -> list[StepResult]:
    """Test-set forward passes on ciphertext, revealed under the same policy."""
    return [hybrid.eval_batch(_lazy(rt, ref), rt.store.labels(ref)) for ref in rt.store.batches("test")]


@task(name="run-plaintext-twin", cache_policy=NO_CACHE)
def run_twin(rt: Runtime, twin: Learner, order: np.ndarray) -> tuple[list[StepResult], list[StepResult]]:
    """The same round on the owners' standardised plaintext (diagnostic, report.plaintext_twin)."""
    refs = rt.store.batches("train")
    train = [twin.train_batch(_twin_batch(rt, refs[i]), rt.store.labels(refs[i])) for i in order]
    test = [twin.eval_batch(_twin_batch(rt, r), rt.store.labels(r)) for r in rt.store.batches("test")]
    return train, test


def _twin_batch(rt: Runtime, ref) -> PlainBatch:
    """Each owner's twin features for the batch, side by side in the model's input order."""
    parts = [rt.store.twin_batch(rt.paths.owners / o, BatchRef(ref.split, (o,), ref.index)).x for o in ref.owners]
    return PlainBatch(ref.batch_id, np.concatenate(parts, axis=1))


@task(name="write-checkpoint", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=1,
      retry_condition_fn=transient_only)
def write_checkpoint(rt: Runtime, round_no: int, hybrid: Learner, twin: Learner | None,
                     lineage: dict, extra: dict) -> str:
    """Atomically write this round's weights, optimizer state, RNG state and lineage."""
    params, opt = {}, {}
    for prefix, learner in (("hybrid", hybrid), ("twin", twin)):
        if learner is not None:
            params.update(_prefixed(prefix, learner.model.parameters()))
            opt.update(_prefixed(prefix, learner.optimizer.state_dict()))
    params.update(_cache_params(hybrid))
    extra = {**extra, "data": rt.data_digest()}
    rng_state = np.random.default_rng([rt.cfg.seed, round_no + 1]).bit_generator.state
    path = checkpoint.save_checkpoint(rt.paths.checkpoints, round_no, params=params, optimizer_state=opt,
                                      rng_state=rng_state, lineage=lineage, extra=extra)
    return str(path)

