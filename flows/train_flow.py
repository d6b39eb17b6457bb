"""Prefect flows around the Trainer: `train` (parent), one `training-round` child flow run per round,
and one `prepare-owner` flow per in-process data owner (or the owner's own deployment, see owner_flow).

The Trainer (hetrain.trainer) does the work; these flows only give its steps Prefect runs. Flows pass
parameters, not objects: a child flow finds the live Trainer by a run-scoped token in `_LIVE`, which
each `train` call fills and clears itself. Flows pass paths and small metadata, never ciphertexts.
"""

import secrets
from contextlib import ExitStack, contextmanager
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.events import emit_event
from prefect.runtime import deployment, flow_run
from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

from hetrain import artifacts, dask_jobs, lineage
from hetrain.owner_flow import prepare_deployed_owners
from hetrain.tasks import COMPUTE_STEPS, STEPS
from hetrain.trainer import Trainer

_LIVE: dict[str, Trainer] = {}  # run token → the Trainer of a `train` call in progress (see live_trainer)


@contextmanager
def live_trainer(trainer: Trainer):
    """Make `trainer` reachable by its child flow runs for the duration of the block; yields the token."""
    token = secrets.token_hex(8)
    _LIVE[token] = trainer
    try:
        yield token
    finally:
        _LIVE.pop(token, None)


class PrefectRunner:
    """Runs a Trainer's steps as Prefect tasks, each owner's preparation and each round as a child flow run."""

    def __init__(self, token: str):
        self.token, self.progress_id, self.round_flow, self.inline_compute = token, None, training_round, False

    def step(self, name: str, fn, *args):
        if self.inline_compute and name in COMPUTE_STEPS:
            return fn(*args)  # with Dask the cipher-jobs tasks are submitted from the round flow itself
        return STEPS[name](fn, *args)

    def run_round(self, trainer: Trainer, round_no: int) -> dict:
        with child_flow_settings():
            return self.round_flow(self.token, round_no, trainer.generation)

    def prepare_owners(self, trainer: Trainer) -> list[dict]:
        # owners on their own work pools publish the hybrid layout; the tiled engine refuses them by name
        deployed = prepare_deployed_owners(trainer.rt) if trainer.engine.name == "hybrid" else {}
        with child_flow_settings():
            return [deployed.get(o.name) or prepare_owner(self.token, o.name) for o in trainer.cfg.data.owners]

    @contextmanager
    def rounds_context(self, trainer: Trainer):
        with ExitStack() as stack:
            if trainer.cfg.train.compute == "dask":
                train = trainer.cfg.train
                address = stack.enter_context(dask_jobs.dask_cluster(train.dask_address, train.workers))
                self.round_flow = training_round.with_options(task_runner=dask_jobs.task_runner(address))
                self.inline_compute = True
                get_run_logger().info("ciphertext jobs run on the Dask scheduler at %s", address)
            yield

    def round_ids(self) -> dict:
        run_id = flow_run.get_id()
        return {"flow_run_id": str(run_id) if run_id else None,
                "train_flow_run_id": flow_run.get_parent_flow_run_id() if run_id else None}

    def run_ids(self) -> dict:
        run_id = flow_run.get_id()
        return {"flow_run_id": str(run_id) if run_id else None, "deployment_id": deployment.get_id()}

    def round_done(self, trainer: Trainer, rounds: list[dict]) -> None:
        self.progress_id = artifacts.publish_round(trainer.cfg.name, rounds, self.progress_id, trainer.cfg.train.rounds)

    def publish_summary(self, trainer: Trainer, markdown: str) -> None:
        artifacts.publish_summary(trainer.cfg.name, markdown, trainer.rt.paths.summary)


def _trainer(token: str) -> Trainer:
    trainer = _LIVE.get(token)
    if trainer is None:
        raise RuntimeError(f"no live training run has token {token!r}: child flows run only inside a `train` call")
    return trainer


@flow(name="prepare-owner", flow_run_name="prepare-{owner}")
def prepare_owner(run_token: str, owner: str) -> dict:
    """A data owner's side: validate, standardise, encrypt and publish its bundle."""
    trainer = _trainer(run_token)
    summary = trainer.step("encrypt-owner-table", trainer.engine.prepare_owner, owner)
    get_run_logger().info("owner %s: %d ciphertexts, %d bytes (%s)", owner, summary["ciphertexts"],
                          summary["bytes"], "reused" if summary["reused"] else "encrypted")
    return summary


@flow(name="training-round", flow_run_name="round-{round_no}")
def training_round(run_token: str, round_no: int, generation: int | None = None) -> dict:
    """One epoch over the encrypted training batches, then evaluation and an atomic checkpoint."""
    trainer = _trainer(run_token)
    row = trainer.run_round(round_no)
    record = lineage.read_record(Path(row["checkpoint"]))
    lin = record["lineage"]
    common = {"run_dir": str(trainer.rt.paths.root), "generation": generation, "round": round_no,
              "test_accuracy": row["test_accuracy"], "checkpoint": row["checkpoint"],
              "checkpoint_sha256": record["sha256"], "config_sha256": lin["config_sha256"],
              "key_id": lin["key_id"], "parent_checkpoint": lin["parent_checkpoint"],
              "flow_run_id": lin["flow_run_id"], "train_flow_run_id": lin["train_flow_run_id"]}
    _emit(trainer, "hetrain.round.completed", {**common, **{k: row[k] for k in ROUND_EVENT_METRICS}})
    _emit(trainer, "hetrain.checkpoint.written", {**common, "manifest_sha256": lin["manifest_sha256"],
                                                  "parent_checkpoint_sha256": lin["parent_checkpoint_sha256"]})
    return row


ROUND_EVENT_METRICS = ("loss", "train_accuracy", "test_loss", "twin_test_accuracy", "seconds", "decryptions")


def _emit(trainer: Trainer, event: str, payload: dict) -> None:
    """A Prefect event on the run's resource; its labels let automations match a run directory."""
    rt = trainer.rt
    emit_event(event=event, resource={"prefect.resource.id": f"hetrain.run.{rt.cfg.name}",
                                      "prefect.resource.name": rt.cfg.name,
                                      "hetrain.run-dir": str(rt.paths.root),
                                      "hetrain.generation": str(rt.paths.generation or 0)}, payload=payload)


def child_flow_settings():
    """In-process child flows skip their own heartbeat thread: the parent's heartbeat covers the
    process, and joining a child's heartbeat thread costs up to 1 s per round (it sleeps in 1 s steps)."""
    return temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None})


@flow(name="train", flow_run_name="{run_name}")
def train(config_path: str, run_dir: str, resume: bool = False, run_name: str = "hetrain",
          retrain: bool = False) -> dict:
    """Prepare every owner, then run rounds until the stop condition; write metrics and the summary.

    With `retrain`, each call is a new generation of `run_dir` (RUN_DIR/generations/gen-NNNN/) that
    shares its key and owners' bundles, and starts from the newest checkpoint if `train.warm_start`
    is true; `resume` then continues the newest generation instead (for every policy).
    """
    logger = get_run_logger()
    trainer = Trainer(config_path, run_dir, resume=resume, retrain=retrain)
    if trainer.generation is not None:
        logger.info("generation %d of %s: %s", trainer.generation, trainer.rt.paths.root,
                    f"warm start from {trainer.parent['path']}" if trainer.parent else "fresh start")
    if trainer.latest is not None:
        logger.info("resuming after %s", trainer.latest.name)
    with live_trainer(trainer) as token:
        result = trainer.run(PrefectRunner(token))
    _emit(trainer, "hetrain.run.completed", {"run_dir": result["run_dir"], "generation": result["generation"],
                                             "rounds": len(result["rounds"]),
                                             "test_accuracy": result["final"]["test_accuracy"],
                                             "stop_reason": result["final"]["stop_reason"], **result["lineage"]})
    return result
