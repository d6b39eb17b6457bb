"""Prefect flows: `train` (parent), one `training-round` child flow run per round, and one
`prepare-owner` flow per data owner (or the owner's own deployment, see owner_flow). Flows pass
paths and small metadata, never ciphertexts."""

import time
from contextlib import ExitStack
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.events import emit_event
from prefect.runtime import deployment, flow_run
from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

from hetrain.core.errors import CheckpointError
from hetrain.core.failpoints import failpoint
from hetrain.mpc_ops.layers.depth_plan import uses_tiled
from hetrain.mpc_ops.reveal.policy import input_train_rounds

from hetrain import artifacts, checkpoint, dask_jobs, lineage, progress
from hetrain.engine import batch_order, input_frozen_in, summarise
from hetrain.owner_flow import prepare_deployed_owners
from hetrain.runtime import Runtime, forget_key_holders
from hetrain.tiled_flow import train_tiled
from hetrain.tasks import (ENGINE, Traffic, build_learners, run, encrypt_owner_table, evaluate, restore_state, run_twin,
                    set_up_key_holder, train_batch_group, write_checkpoint)

BATCHES_PER_TASK = 4


@flow(name="prepare-owner", flow_run_name="prepare-{owner}")
def prepare_owner(config_path: str, run_dir: str, owner: str) -> dict:
    """A data owner's side: validate, standardise, encrypt and publish its bundle."""
    rt = Runtime(config_path, run_dir)
    summary = encrypt_owner_table(rt, owner)
    get_run_logger().info("owner %s: %d ciphertexts, %d bytes (%s)", owner, summary["ciphertexts"],
                          summary["bytes"], "reused" if summary["reused"] else "encrypted")
    return summary


@flow(name="training-round", flow_run_name="round-{round_no}")
def training_round(config_path: str, run_dir: str, round_no: int, generation: int | None = None) -> dict:
    """One epoch over the encrypted training batches, then evaluation and an atomic checkpoint."""
    row = run_round(config_path, run_dir, round_no, generation)
    rt = Runtime(config_path, run_dir, generation)
    record = lineage.read_record(Path(row["checkpoint"]))
    lin = record["lineage"]
    common = {"run_dir": str(rt.paths.root), "generation": generation, "round": round_no,
              "test_accuracy": row["test_accuracy"], "checkpoint": row["checkpoint"],
              "checkpoint_sha256": record["sha256"], "config_sha256": lin["config_sha256"],
              "key_id": lin["key_id"], "parent_checkpoint": lin["parent_checkpoint"],
              "flow_run_id": lin["flow_run_id"], "train_flow_run_id": lin["train_flow_run_id"]}
    _emit(rt, "hetrain.round.completed", {**common, **{k: row[k] for k in ROUND_EVENT_METRICS}})
    _emit(rt, "hetrain.checkpoint.written", {**common, "manifest_sha256": lin["manifest_sha256"],
                                             "parent_checkpoint_sha256": lin["parent_checkpoint_sha256"]})
    return row


ROUND_EVENT_METRICS = ("loss", "train_accuracy", "test_loss", "twin_test_accuracy", "seconds", "decryptions")


def run_round(config_path: str, run_dir: str, round_no: int, generation: int | None = None) -> dict:
    """The body of a round; tasks go through `run`, so it also runs with the engine off."""
    start = time.perf_counter()
    rt = Runtime(config_path, run_dir, generation)
    traffic = Traffic()
    hybrid, twin = build_learners(rt, round_no, traffic)
    previous = run(restore_state, rt, hybrid, twin, round_no)
    trained_before = input_rounds_trained(previous)
    frozen = input_frozen_in(input_train_rounds(rt.cfg), trained_before)
    if frozen:  # the rank limit allows no new weights for the ciphertext layer
        for learner in (hybrid, twin):
            if learner is not None:
                learner.freeze_input()
    refs = rt.store.batches("train")
    order = batch_order(rt.cfg.seed, round_no, len(refs))
    # With Dask, the cipher-jobs tasks are submitted from the round flow itself, so the batch
    # loop runs in the flow rather than inside a task of its own.
    step = (lambda t, *args: t.fn(*args)) if rt.cfg.train.compute == "dask" else run
    decryptions_before = rt.key_holder.decryptions_used
    results, train_start = [], time.perf_counter()
    for g in range(0, len(order), BATCHES_PER_TASK):
        group = [refs[i] for i in order[g : g + BATCHES_PER_TASK]]
        results += step(train_batch_group, rt, hybrid, group)
        progress.notify("batch-done", round=round_no, done=len(results), total=len(refs))
    train_seconds = time.perf_counter() - train_start
    loss, train_acc = summarise(results)
    eval_start = time.perf_counter()
    test_loss, test_acc = summarise(step(evaluate, rt, hybrid))
    eval_seconds = time.perf_counter() - eval_start
    row = {
        "round": round_no, "loss": round(loss, 6), "train_accuracy": round(train_acc, 6),
        "test_loss": round(test_loss, 6), "test_accuracy": round(test_acc, 6),
        "twin_test_accuracy": None, "seconds": 0.0, "train_seconds": round(train_seconds, 3),
        "eval_seconds": round(eval_seconds, 3),
        "bytes_from_owners": rt.store.bytes_read, "bytes_to_key_holder": traffic.to_key_holder,
        "bytes_from_key_holder": traffic.from_key_holder, "reveals": traffic.reveals,
        "decryptions": rt.key_holder.decryptions_used - decryptions_before,
        "input_frozen": frozen,
    }
    if twin is not None:
        _, twin_test = run(run_twin, rt, twin, order)
        row["twin_test_accuracy"] = round(summarise(twin_test)[1], 6)
    row["seconds"] = round(time.perf_counter() - start, 3)
    row["checkpoint"] = str(rt.paths.checkpoints / f"round-{round_no:05d}")
    # A warm start's round 1 restores the parent generation's state, but starts its own history.
    history = (previous.get("history", []) if round_no > 1 else []) + [row]
    flow_run_id = flow_run.get_id() if ENGINE.get() else None
    parent = previous.get("parent_checkpoint")
    record = {**rt.lineage(), "parent_checkpoint": parent,
              "parent_checkpoint_sha256": lineage.checkpoint_digest(parent) if parent else None,
              "parent_state_sha256": previous.get("parent_state_sha256"),
              "flow_run_id": str(flow_run_id) if flow_run_id else None,
              "train_flow_run_id": flow_run.get_parent_flow_run_id() if flow_run_id else None}
    run(write_checkpoint, rt, round_no, hybrid, twin, record,
        {"history": history, "input_rounds_trained": trained_before + (0 if frozen else 1)})
    return row


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


def _emit(rt: Runtime, event: str, payload: dict) -> None:
    """A Prefect event on the run's resource; its labels let automations match a run directory."""
    emit_event(event=event, resource={"prefect.resource.id": f"hetrain.run.{rt.cfg.name}",
                                      "prefect.resource.name": rt.cfg.name,
                                      "hetrain.run-dir": str(rt.paths.root),
                                      "hetrain.generation": str(rt.paths.generation or 0)}, payload=payload)


def child_flow_settings():
    """In-process child flows skip their own heartbeat thread: the parent's heartbeat covers the
    process, and joining a child's heartbeat thread costs up to 1 s per round (it sleeps in 1 s steps)."""
    return temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None})


def _stop_reason(cfg, rounds: list[dict]) -> str | None:
    last = rounds[-1]
    if cfg.train.target_accuracy is not None and last["test_accuracy"] >= cfg.train.target_accuracy:
        return f"test accuracy {last['test_accuracy']:.4f} reached train.target_accuracy={cfg.train.target_accuracy}"
    if cfg.train.patience is not None and len(rounds) > cfg.train.patience:
        best_before = max(r["test_accuracy"] for r in rounds[: -cfg.train.patience])
        if max(r["test_accuracy"] for r in rounds[-cfg.train.patience :]) <= best_before:
            return f"no test-accuracy gain in train.patience={cfg.train.patience} rounds"
    return None


@flow(name="train", flow_run_name="{run_name}")
def train(config_path: str, run_dir: str, resume: bool = False, run_name: str = "hetrain",
          retrain: bool = False) -> dict:
    """Prepare every owner, then run rounds until the stop condition; write metrics and the summary.

    With `retrain`, each call is a new generation of `run_dir` (RUN_DIR/generations/gen-NNNN/) that
    shares its key and owners' bundles, and starts from the newest checkpoint if `train.warm_start`
    is true; `resume` then continues the newest generation instead.
    """
    logger = get_run_logger()
    rt = Runtime(config_path, run_dir)
    rt.paths.root.mkdir(parents=True, exist_ok=True)
    generation, parent = None, None
    if retrain:
        generation, parent = lineage.open_generation(rt.paths.root, resume=resume,
                                                     warm_start=rt.cfg.train.warm_start)
        rt = Runtime(config_path, run_dir, generation)
        logger.info("generation %d of %s: %s", generation, rt.paths.root,
                    f"warm start from {parent['path']}" if parent else "fresh start")
    checkpoint.cleanup_temp(rt.paths.checkpoints)  # before reading: it may put back a round a killed re-save moved aside
    latest = checkpoint.latest_checkpoint(rt.paths.checkpoints)
    if latest is not None and not resume:
        raise CheckpointError(
            f"run directory {rt.paths.out} already holds checkpoints (newest {latest.name}); pass --resume "
            f"to continue it, --retrain to start a new generation in it, or choose another --run-dir"
        )
    if uses_tiled(rt.cfg):  # strict, mixed or encrypted-label policy: the tiled engine (flows/tiled_flow.py)
        if latest is not None or retrain:
            raise CheckpointError(f"{rt.paths.root}: resuming or retraining a strict, mixed or encrypted-label run "
                                  f"is not supported yet; start a new --run-dir")
        return train_tiled(config_path, run_dir)
    forget_key_holders()
    key_id = set_up_key_holder(rt)
    logger.info("key id %s; packing %d samples per ciphertext", key_id, rt.plan.samples_per_ct)
    deployed = prepare_deployed_owners(rt)  # owners that run on their own work pools
    with child_flow_settings():
        owners = [deployed.get(o.name) or prepare_owner(config_path, run_dir, o.name) for o in rt.cfg.data.owners]

    rounds, first = [], 1
    if latest is not None:
        resumed = checkpoint.load_checkpoint(latest)
        rounds, first = resumed.extra.get("history", []), resumed.round + 1
        logger.info("resuming after %s", latest.name)
    progress.notify("run-started", total=rt.cfg.train.rounds, first=first, done_rounds=rounds)
    progress_id, reason = None, None
    if rounds:
        reason = _stop_reason(rt.cfg, rounds)
    with ExitStack() as stack:
        round_flow = training_round
        if rt.cfg.train.compute == "dask":
            address = stack.enter_context(dask_jobs.dask_cluster(rt.cfg.train.dask_address, rt.cfg.train.workers))
            round_flow = training_round.with_options(task_runner=dask_jobs.task_runner(address))
            logger.info("ciphertext jobs run on the Dask scheduler at %s", address)
        for round_no in range(first, rt.cfg.train.rounds + 1):
            if reason:
                break
            with child_flow_settings():
                row = round_flow(config_path, run_dir, round_no, generation)
            failpoint("train.after_round")
            rounds.append(row)
            progress_id = artifacts.publish_round(rt.cfg.name, rounds, progress_id, rt.cfg.train.rounds)
            artifacts.write_metrics(rt.paths.metrics, rounds, {})
            progress.notify("round-done", row=row, total=rt.cfg.train.rounds)
            reason = _stop_reason(rt.cfg, rounds)
    reason = reason or f"train.rounds={rt.cfg.train.rounds} rounds done"

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
        "key_id": key_id, "generation": generation,
        "dp_epsilon": max((led["dp_epsilon"] for led in audit["ledger"].values()
                           if led["dp_epsilon"] is not None), default=None),
    }
    run_lineage = _run_lineage(rt, parent, Path(last["checkpoint"]))
    artifacts.write_metrics(rt.paths.metrics, rounds, final, run_lineage)
    plot = artifacts.plot_png(rounds, rt.paths.plot)
    policy = rt.cfg.policy.model_dump()
    markdown = artifacts.summary_markdown(rt.cfg.name, final, rounds, policy, owners, audit, plot, rt.paths.out,
                                          run_lineage)
    artifacts.publish_summary(rt.cfg.name, markdown, rt.paths.summary)
    _emit(rt, "hetrain.run.completed", {"run_dir": str(rt.paths.root), "generation": generation,
                                        "rounds": len(rounds), "test_accuracy": final["test_accuracy"],
                                        "stop_reason": reason, **run_lineage})
    progress.notify("run-done", final=final)
    return {"final": final, "rounds": rounds, "run_dir": str(rt.paths.root), "out_dir": str(rt.paths.out),
            "generation": generation, "lineage": run_lineage}


def _run_lineage(rt: Runtime, parent: dict | None, final_checkpoint: Path) -> dict:
    """The run summary's lineage: what it was made from, what it started from, what it produced."""
    train_run = flow_run.get_id()
    return {**rt.lineage(), "parent_checkpoint": parent["path"] if parent else None,
            "parent_checkpoint_sha256": parent["sha256"] if parent else None,
            "flow_run_id": str(train_run) if train_run else None,
            "deployment_id": deployment.get_id(),
            "checkpoint": str(final_checkpoint), "checkpoint_sha256": lineage.checkpoint_digest(final_checkpoint)}
