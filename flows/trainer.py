"""One training run, for every policy: the round loop, stop rules, checkpoints, resume and the report.

A `Trainer` is built once per run (config read once, one Runtime, one engine from hetrain.engines).
It runs each coarse step through a runner: `PlainRunner` calls them directly (library use, the
benchmark's baseline); hetrain.train_flow's `PrefectRunner` makes them Prefect tasks and each round
a child flow run. No Prefect in here.
"""

import time
from contextlib import nullcontext
from pathlib import Path

from hetrain.core import store
from hetrain.core.errors import CheckpointError, ConfigError
from hetrain.core.failpoints import failpoint
from hetrain.mpc_ops.reveal.policy import input_train_rounds
from hetrain.mpc_ops.reveal.revealer import Revealer

from hetrain import artifacts, checkpoint, lineage, progress
from hetrain.engine import batch_order, input_frozen_in
from hetrain.engines import Engine, select_engine
from hetrain.runtime import RunPaths, Runtime, forget_key_holders

BATCHES_PER_TASK = 4  # one task run per group of batches: Prefect's overhead stays small


class PlainRunner:
    """Runs a Trainer's steps and rounds as plain calls, with no orchestrator around them."""

    def step(self, name: str, fn, *args):
        return fn(*args)

    def run_round(self, trainer: "Trainer", round_no: int) -> dict:
        return trainer.run_round(round_no)

    def prepare_owners(self, trainer: "Trainer") -> list[dict]:
        deployed = [o.name for o in trainer.rt.cfg.data.owners if o.deployment is not None]
        if deployed:
            raise ConfigError(f"owners {deployed} are given by `deployment:`, which needs the Prefect `train` flow "
                              f"(hetrain train); a plain run prepares in-process owners only")
        return [trainer.step("encrypt-owner-table", trainer.engine.prepare_owner, o.name)
                for o in trainer.rt.cfg.data.owners]

    def rounds_context(self, trainer: "Trainer"):
        return nullcontext()

    def round_ids(self) -> dict:
        """The Prefect ids a checkpoint records: none without Prefect."""
        return {"flow_run_id": None, "train_flow_run_id": None}

    def run_ids(self) -> dict:
        return {"flow_run_id": None, "deployment_id": None}

    def round_done(self, trainer: "Trainer", rounds: list[dict]) -> None:
        pass

    def publish_summary(self, trainer: "Trainer", markdown: str) -> None:
        store.write_bytes(trainer.rt.paths.summary, markdown.encode())


def stop_reason(cfg, rounds: list[dict]) -> str | None:
    """Why training stops after these rounds (train.target_accuracy, train.patience), or None."""
    last = rounds[-1]
    if cfg.train.target_accuracy is not None and last["test_accuracy"] >= cfg.train.target_accuracy:
        return f"test accuracy {last['test_accuracy']:.4f} reached train.target_accuracy={cfg.train.target_accuracy}"
    if cfg.train.patience is not None and len(rounds) > cfg.train.patience:
        best_before = max(r["test_accuracy"] for r in rounds[: -cfg.train.patience])
        if max(r["test_accuracy"] for r in rounds[-cfg.train.patience :]) <= best_before:
            return f"no test-accuracy gain in train.patience={cfg.train.patience} rounds"
    return None


def input_rounds_trained(previous: dict) -> int:
    """Rounds in which the ciphertext layer trained before this one, across warm-started generations.

    The key holder's rank limit counts every distinct weight a sample was revealed under, in every
    generation of the run directory; a warm start keeps counting from its parent, so a scheduled
    retrain keeps a layer frozen that its parent froze. Checkpoints written before this count was
    kept are counted from their history (the rows not marked input_frozen).
    """
    if not previous:
        return 0
    if "input_rounds_trained" in previous:
        return int(previous["input_rounds_trained"])
    return sum(1 for row in previous.get("history", []) if not row.get("input_frozen"))


class Trainer:
    """One run of `hetrain train`: built once, it owns the round loop and everything a round leaves behind."""

    def __init__(self, config_path: str | Path, run_dir: str | Path, *, resume: bool = False,
                 retrain: bool = False, max_batches: int | None = None):
        self.rt = rt = Runtime(config_path, run_dir)
        self.max_batches = max_batches
        rt.paths.root.mkdir(parents=True, exist_ok=True)
        self.generation, self.parent = None, None
        if retrain:
            self.generation, self.parent = lineage.open_generation(rt.paths.root, resume=resume,
                                                                   warm_start=rt.cfg.train.warm_start)
            rt.paths = RunPaths(rt.paths.root, self.generation)
        checkpoint.cleanup_temp(rt.paths.checkpoints)  # before reading: it may put back a round a killed re-save moved aside
        self.latest = checkpoint.latest_checkpoint(rt.paths.checkpoints)
        if self.latest is not None and not resume:
            raise CheckpointError(
                f"run directory {rt.paths.out} already holds checkpoints (newest {self.latest.name}); pass --resume "
                f"to continue it, --retrain to start a new generation in it, or choose another --run-dir"
            )
        self.runner = PlainRunner()
        self.engine: Engine | None = None
        self.revealer: Revealer | None = None
        self.owners: list[dict] = []
        self.rounds: list[dict] = []  # this run's history (a resumed run's starts with its checkpoint's)
        self.trained_before = 0  # rounds in which the ciphertext layers trained, ancestors included
        self.parent_checkpoint: str | None = None

    @property
    def cfg(self):
        return self.rt.cfg

    def step(self, name: str, fn, *args):
        """One coarse step, run by the runner (a Prefect task under PrefectRunner)."""
        return self.runner.step(name, fn, *args)

    # ---- the run ---------------------------------------------------------------------------------
    def run(self, runner=None) -> dict:
        """Key, owners, resume point, rounds until a stop rule holds; metrics, summary, the result dict."""
        self.open(runner)
        self.owners = self.runner.prepare_owners(self)
        first = self.restore()
        progress.notify("run-started", total=self.cfg.train.rounds, first=first, done_rounds=list(self.rounds))
        reason = stop_reason(self.cfg, self.rounds) if self.rounds else None
        with self.runner.rounds_context(self):
            for round_no in range(first, self.cfg.train.rounds + 1):
                if reason:
                    break
                row = self.runner.run_round(self, round_no)
                failpoint("train.after_round")
                self.rounds.append(row)
                self.runner.round_done(self, self.rounds)
                artifacts.write_metrics(self.rt.paths.metrics, self.rounds, {})
                progress.notify("round-done", row=row, total=self.cfg.train.rounds)
                reason = stop_reason(self.cfg, self.rounds)
        return self.finish(reason or f"train.rounds={self.cfg.train.rounds} rounds done")

    def open(self, runner=None) -> str:
        """Set up the key holder and the engine; returns the key id."""
        self.runner = runner or PlainRunner()
        forget_key_holders()
        key_id = self.step("set-up-key-holder", self.rt.publish_public_context)
        self.revealer = Revealer(self.rt.key_holder, self.rt.context, key_id, self.cfg.policy.mask_bound)
        self.engine = select_engine(self.rt, self.revealer)
        return key_id

    def restore(self) -> int:
        """Load the newest checkpoint (resume) or a warm start's parent into the engine; the first round to run."""
        source = self.latest or self.rt.warm_start_from
        if source is None:
            return 1
        previous = self.step("restore-state", self._load, source)
        self.trained_before = input_rounds_trained(previous)
        self.parent_checkpoint = str(source)
        if self.latest is None:  # a warm start's round 1 starts its own history
            return 1
        self.rounds = list(previous.get("history", []))
        return previous["round"] + 1

    def _load(self, path: Path) -> dict:
        ckpt = checkpoint.load_checkpoint(path)
        try:
            self.engine.restore(ckpt, same_data=ckpt.extra.get("data") == self.data_digest())
        except (ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(
                f"checkpoint {path} does not fit the current config (model or optimizer changed?): {exc}; "
                f"resume with the config it was made with, or start a new --run-dir"
            ) from None
        return {**ckpt.extra, "round": ckpt.round}

    # ---- one round -------------------------------------------------------------------------------
    def run_round(self, round_no: int) -> dict:
        """One epoch (or max_batches) of training, evaluation, the twin, then an atomic checkpoint."""
        start = time.perf_counter()
        rt, engine = self.rt, self.engine
        self.revealer.start_round(round_no)
        frozen = input_frozen_in(input_train_rounds(rt.cfg), self.trained_before)
        engine.set_frozen(frozen)  # the rank limit allows no new weights for the ciphertext layers
        refs = engine.train_refs()
        order = batch_order(rt.cfg.seed, round_no, len(refs))
        if self.max_batches is not None:
            order = order[: self.max_batches]
        bytes_before, decryptions_before = engine.bytes_read(), rt.key_holder.decryptions_used
        results = []
        for g in range(0, len(order), BATCHES_PER_TASK):
            group = [refs[i] for i in order[g : g + BATCHES_PER_TASK]]
            results += self.step("train-batch-group", engine.train_group, group)
            progress.notify("batch-done", round=round_no, done=len(results), total=len(order))
        train_seconds = time.perf_counter() - start
        decryptions_train = rt.key_holder.decryptions_used - decryptions_before
        loss, train_acc = engine.train_metrics(results)
        eval_start = time.perf_counter()
        test_loss, test_acc = self.step("evaluate", engine.evaluate)
        eval_seconds = time.perf_counter() - eval_start
        row = {
            "round": round_no, "loss": _round(loss), "train_accuracy": _round(train_acc),
            "test_loss": round(test_loss, 6), "test_accuracy": round(test_acc, 6), "twin_test_accuracy": None,
            "seconds": 0.0, "train_seconds": round(train_seconds, 3), "eval_seconds": round(eval_seconds, 3),
            "bytes_from_owners": engine.bytes_read() - bytes_before, **self.revealer.traffic(),
            "decryptions": rt.key_holder.decryptions_used - decryptions_before, "input_frozen": frozen,
        }
        if engine.name == "tiled":
            row.update({"batches": len(order), "decryptions_train": decryptions_train})
        if engine.twin is not None:
            row["twin_test_accuracy"] = _round(self.step("run-plaintext-twin", engine.run_twin, order, refs))
        row["seconds"] = round(time.perf_counter() - start, 3)
        path = rt.paths.checkpoints / f"round-{round_no:05d}"
        row["checkpoint"] = str(path)
        trained = self.trained_before + (0 if frozen else 1)
        extra = {"history": self.rounds + [row], "input_rounds_trained": trained}
        self.step("write-checkpoint", self.write_checkpoint, round_no, self.round_lineage(), extra)
        self.trained_before, self.parent_checkpoint = trained, str(path)
        return row

    def round_lineage(self) -> dict:
        """What a round's checkpoint was made from: config, bundles, key, its parent, the Prefect runs."""
        parent = self.parent_checkpoint
        digest = lineage.checkpoint_digest(parent) if parent else None
        return {**self.rt.lineage(self.engine.manifests()), "parent_checkpoint": parent,
                "parent_checkpoint_sha256": digest, "parent_state_sha256": digest, **self.runner.round_ids()}

    def write_checkpoint(self, round_no: int, record: dict, extra: dict) -> str:
        """The single checkpoint writer: weights, optimizer state, RNG state, lineage and history, atomically."""
        import numpy as np

        params, opt, engine_extra = self.engine.state()
        rng_state = np.random.default_rng([self.cfg.seed, round_no + 1]).bit_generator.state
        path = checkpoint.save_checkpoint(self.rt.paths.checkpoints, round_no, params=params, optimizer_state=opt,
                                          rng_state=rng_state, lineage=record,
                                          extra={**extra, **engine_extra, "data": self.data_digest()})
        return str(path)

    def data_digest(self) -> str:
        return self.rt.data_digest(self.engine.manifests())

    # ---- the report ------------------------------------------------------------------------------
    def finish(self, reason: str) -> dict:
        """metrics.json with the final metrics and lineage, the summary, and the result dict."""
        rt, rounds = self.rt, self.rounds
        audit = rt.key_holder.audit_summary()
        last = rounds[-1]
        final = {
            "test_accuracy": last["test_accuracy"], "plaintext_twin_test_accuracy": last["twin_test_accuracy"],
            # the key's totals over every run and generation in this run directory, then this run's own
            "decryptions": audit["decryptions_used"], "policy_refusals": audit["refuse"],
            "decryptions_this_run": sum(r.get("decryptions", 0) for r in rounds),
            "rounds": len(rounds), "stop_reason": reason,
            "mean_seconds_per_round": round(sum(r["seconds"] for r in rounds) / len(rounds), 3),
            "mean_bytes_per_round": int(sum(r["bytes_from_owners"] + r["bytes_to_key_holder"]
                                            + r["bytes_from_key_holder"] for r in rounds) / len(rounds)),
            "key_id": rt.key_id, "generation": self.generation,
            **self.engine.final_fields(audit, rounds),
        }
        if self.max_batches is not None:
            final["max_batches_per_round"] = self.max_batches
        run_lineage = self.run_lineage(Path(last["checkpoint"]))
        artifacts.write_metrics(rt.paths.metrics, rounds, final, run_lineage)
        markdown = self.engine.summary(final, rounds, self.owners, audit, run_lineage)
        self.runner.publish_summary(self, markdown)
        progress.notify("run-done", final=final)
        return {"final": final, "rounds": rounds, "run_dir": str(rt.paths.root), "out_dir": str(rt.paths.out),
                "generation": self.generation, "lineage": run_lineage}

    def run_lineage(self, final_checkpoint: Path) -> dict:
        """The run summary's lineage: what it was made from, what it started from, what it produced."""
        parent = self.parent
        return {**self.rt.lineage(self.engine.manifests()), "parent_checkpoint": parent["path"] if parent else None,
                "parent_checkpoint_sha256": parent["sha256"] if parent else None, **self.runner.run_ids(),
                "checkpoint": str(final_checkpoint), "checkpoint_sha256": lineage.checkpoint_digest(final_checkpoint)}


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 6)
