"""Training under strict, mixed and encrypted-label policies: the tiled engine as Prefect flows.

`train` (flows/train_flow.py) hands a run to `train_tiled` when the policy needs more than the
depth-1 hybrid path (mpc_ops/depth_plan.uses_tiled). Owners prepare their tiled bundles in a
flow run each; every round is a child flow run. Flows and tasks pass paths and small metadata.
Rounds run in one process and keep the learners in memory; each round still writes an atomic
checkpoint (weights, optimizer state, history) for lineage.
"""

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from hetrain.core import store
from hetrain.mpc_ops.layers.circuit import CipherOps, PlainOps
from hetrain.mpc_ops.reveal.policy import input_train_rounds
from hetrain.mpc_ops.reveal.protocol import blind, unblind
from hetrain.mpc_ops.crypto.tensors import EncryptedTensor
from hetrain.mpc_ops.layers.tiled import Tiling, tiling_for
from hetrain.mpc_ops.exchange.tiled_bundle import TiledRef, TiledStore
from hetrain.mpc_ops.layers.tiled_net import Inputs, Outcome, Reveal, TiledLearner, build_net, plain_reveal
from hetrain.mpc_ops.layers.cipher_layers import weights_digest
from hetrain.participants import tiled_owner

from hetrain import artifacts, checkpoint, progress
from hetrain.engine import Model, batch_order, make_optimizer
from hetrain.runtime import LocalKeyHolderClient, Runtime
from hetrain.tasks import ENGINE, Traffic, call_key_holder


def engine_on() -> bool:
    return ENGINE.get()


def local_dir(rt: Runtime) -> Path:
    return rt.paths.owners


# ---- the explicit reveal ---------------------------------------------------------------------

def cipher_reveal(rt: Runtime, round_no: int, traffic: Traffic, model: Model, net, rows_of):
    """Reveal → EncryptedTensor → blind → key holder → unblind; (count × outputs) array back."""
    def reveal(r: Reveal) -> np.ndarray:
        blobs = [v.v.serialize() for v in r.vals]
        cipher_w = np.concatenate([net.layers[i].W.ravel() for i in net.linears[: net.cipher]])
        enc = EncryptedTensor(
            kind=r.kind, layer=r.layer, shape=(r.count, len(r.vals)), blobs=blobs, stride=[r.stride] * len(blobs),
            counts=[r.count] * len(blobs), placement=[(np.arange(r.count), c) for c in range(len(blobs))],
            aggregate=r.aggregate, meta={"rows": rows_of(), "weights": weights_digest(cipher_w)})
        request, masks = blind(enc, rt.context, key_id=rt.key_id, round_no=round_no,
                               mask_bound=rt.cfg.policy.mask_bound)
        response = call_key_holder(rt, request)
        traffic.to_key_holder += request.n_bytes
        traffic.from_key_holder += sum(v.nbytes for v in response.values)
        traffic.reveals += 1
        return unblind(enc, response, masks)
    return reveal


# ---- owners ----------------------------------------------------------------------------------

@task(name="encrypt-owner-table-tiled", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=1)
def encrypt_owner_tiled(config_path: str, run_dir: str, owner: str) -> dict:
    rt = Runtime(config_path, run_dir)
    owner_cfg = next(o for o in rt.cfg.data.owners if o.name == owner)
    start = time.perf_counter()
    manifest = tiled_owner.prepare(rt.cfg, owner_cfg, rt.paths.public_context.read_bytes(), tiling_for(rt.cfg),
                                   rt.owner_dir, local_dir(rt), encrypt_test=bool(rt.cfg.policy.reveals))
    rt.publish_owner(owner)
    entries = [e for s in manifest["splits"].values() for b in s["batches"]
               for e in b["rep"] + ([b["block"]] if b["block"] else []) + b["labels"]]
    return {"owner": owner, "reused": False, "bytes": sum(e["bytes"] for e in entries), "ciphertexts": len(entries),
            "n_train": manifest["splits"]["train"]["n"], "n_test": manifest["splits"]["test"]["n"],
            "seconds": round(time.perf_counter() - start, 3)}


@flow(name="prepare-owner-tiled", flow_run_name="prepare-{owner}")
def prepare_owner_tiled(config_path: str, run_dir: str, owner: str) -> dict:
    return encrypt_owner_tiled(config_path, run_dir, owner)


# ---- the trainer's state across rounds --------------------------------------------------------

@dataclass
class Session:
    rt: Runtime
    tiling: Tiling
    learner: TiledLearner
    twin: TiledLearner | None
    traffic: Traffic
    current_rows: list = field(default_factory=lambda: [[]])  # pseudonyms of the batch being revealed
    store: TiledStore | None = None


_SESSIONS: dict[str, Session] = {}  # run_dir -> the live session (flows get paths, not objects)


def open_session(config_path: str, run_dir: str) -> Session:
    rt = Runtime(config_path, run_dir)
    tiling = tiling_for(rt.cfg)
    traffic = Traffic()
    model = Model(rt.cfg)
    net = build_net(rt.cfg, model, tiling)
    session = Session(rt, tiling, None, None, traffic)
    reveal = cipher_reveal(rt, 0, traffic, model, net, lambda: session.current_rows[0])
    session.learner = TiledLearner(model, make_optimizer(rt.cfg), net, CipherOps(rt.context), reveal)
    if rt.cfg.report.plaintext_twin:
        twin_model = Model(rt.cfg)
        twin_net = build_net(rt.cfg, twin_model, tiling)
        session.twin = TiledLearner(twin_model, make_optimizer(rt.cfg), twin_net, PlainOps(tiling.slots),
                                    plain_reveal(tiling))
    return session


def _round_reveal(session: Session, round_no: int):
    """Re-point the reveal at this round (request round numbers are audited)."""
    s = session
    s.learner.reveal = cipher_reveal(s.rt, round_no, s.traffic, s.learner.model, s.learner.net,
                                     lambda: s.current_rows[0])


@task(name="train-batch-tiled", cache_policy=NO_CACHE)
def train_batch_tiled(session: Session, ref: TiledRef) -> Outcome:
    """Forward, (reveal), loss, backward and reveal of aggregated gradients for one encrypted batch."""
    rt = session.rt
    cached = session.learner.net.frozen and ref.batch_id in session.learner.frozen_cache
    x = rt_store(session).load(session.learner.ops, ref, public_labels=rt.cfg.policy.labels == "reveal",
                               features=not cached)
    session.current_rows[0] = x.rows
    return session.learner.train_batch(x)


def rt_store(session: Session) -> TiledStore:
    if session.store is None:
        session.rt.mirror_exchange()
        session.store = TiledStore(session.rt.paths.exchange, session.rt.cfg, session.rt.key_id, session.tiling)
    return session.store


# ---- evaluation ------------------------------------------------------------------------------

def _plain_forward(model: Model, x: np.ndarray) -> np.ndarray:
    a = x
    for layer in [model.input] + list(model.body.layers):
        a = layer.forward(a)
    return a


def _local(session: Session, split: str) -> tuple[np.ndarray, np.ndarray]:
    """The owners' side: their standardised features (joined by input position) and the labels."""
    cfg, parts, y = session.rt.cfg, [], None
    owners = cfg.data.owners if cfg.data.partition == "vertical" else cfg.data.owners
    xs, ys = [], []
    for o in owners:
        with np.load(local_dir(session.rt) / f"{o.name}.npz") as data:
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


def owner_side_accuracy(session: Session, model: Model) -> tuple[float, float]:
    """Strict mode: the owners evaluate the released weights on their test rows; only (loss, accuracy) leave."""
    x, y = _local(session, "test")
    logits = _plain_forward(model, x)
    if session.rt.cfg.data.task == "binary":
        z = logits[:, 0]
        loss = float((np.logaddexp(0.0, z) - y * z).mean())
        return loss, float(((z > 0).astype(int) == y).mean())
    shifted = logits - logits.max(axis=1, keepdims=True)
    logp = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    return float(-logp[np.arange(len(y)), y].mean()), float((logits.argmax(axis=1) == y).mean())


@task(name="evaluate-tiled", cache_policy=NO_CACHE)
def evaluate_tiled(session: Session) -> tuple[float, float]:
    """With a reveal point: encrypted test forward, activation reveal, metrics (revealed aggregates under
    encrypted labels). Strict: the owners' side evaluates the released model."""
    rt = session.rt
    if not rt.cfg.policy.reveals:
        return owner_side_accuracy(session, session.learner.model)
    store_ = rt_store(session)
    outcomes = []
    for ref in store_.batches("test"):
        cached = session.learner.net.frozen and ref.batch_id in session.learner.frozen_cache
        x = store_.load(session.learner.ops, ref, public_labels=rt.cfg.policy.labels == "reveal", features=not cached)
        session.current_rows[0] = x.rows
        outcomes.append(session.learner.eval_batch(x))
    n = sum(o.m for o in outcomes)
    return sum(o.loss for o in outcomes) / n, sum(o.correct for o in outcomes) / n


@task(name="run-plaintext-twin-tiled", cache_policy=NO_CACHE)
def run_twin_tiled(session: Session, order: np.ndarray, refs: list[TiledRef]) -> float:
    """The same circuit on the owners' plaintext (numpy engine; diagnostic, report.plaintext_twin)."""
    twin, tiling, cfg = session.twin, session.tiling, session.rt.cfg
    x_all, y_all = _local(session, "train")
    ops = twin.ops
    starts = _starts(session, refs)
    classes = 1 if cfg.data.task == "binary" else cfg.data.num_classes
    for i in order:
        ref = refs[i]
        start, m = starts[ref]
        x, y = x_all[start : start + m], y_all[start : start + m]
        enc = None
        if cfg.policy.labels == "encrypted":
            enc = [ops.secret(v) for v in tiled_owner.label_vectors(cfg, tiling, y)]
        inputs = Inputs(m, [ops.secret(tiling.rep(x[:, j])) for j in range(x.shape[1])], ops.secret(tiling.block(x)),
                        labels=y, enc_labels=enc, batch_id=ref.batch_id)
        twin.train_batch(inputs)
    return owner_side_accuracy(session, twin.model)[1]


def _starts(session: Session, refs: list[TiledRef]) -> dict:
    """Offset of each batch in the owners' concatenated local arrays (the order _local joins them)."""
    store_, out, base = rt_store(session), {}, 0
    if session.rt.cfg.data.partition == "vertical":
        for ref in refs:
            out[ref] = (base, store_.size(ref))
            base += store_.size(ref)
        return out
    for owner in (o.name for o in session.rt.cfg.data.owners):
        for ref in (r for r in refs if r.owners == (owner,)):
            out[ref] = (base, store_.size(ref))
            base += store_.size(ref)
    return out


# ---- rounds ----------------------------------------------------------------------------------

@flow(name="training-round-tiled", flow_run_name="round-{round_no}")
def training_round_tiled(run_dir: str, round_no: int, max_batches: int | None = None) -> dict:
    return run_round_tiled(_SESSIONS[run_dir], round_no, max_batches)


def run_round_tiled(session: Session, round_no: int, max_batches: int | None = None) -> dict:
    start = time.perf_counter()
    rt, traffic = session.rt, session.traffic
    traffic.to_key_holder = traffic.from_key_holder = traffic.reveals = 0
    store_ = rt_store(session)
    bytes_before = store_.bytes_read
    _round_reveal(session, round_no)
    train_rounds = input_train_rounds(rt.cfg)
    frozen = train_rounds is not None and round_no > train_rounds
    for learner in (session.learner, session.twin):
        if learner is not None:
            learner.net.frozen = frozen
    refs = store_.batches("train")
    order = batch_order(rt.cfg.seed, round_no, len(refs))
    if max_batches is not None:
        order = order[:max_batches]
    decryptions_before = rt.key_holder.decryptions_used
    step = train_batch_tiled if engine_on() else train_batch_tiled.fn
    results = []
    for i in order:
        results.append(step(session, refs[i]))
        progress.notify("batch-done", round=round_no, done=len(results), total=len(order))
    train_seconds = time.perf_counter() - start
    decryptions_train = rt.key_holder.decryptions_used - decryptions_before
    eval_start = time.perf_counter()
    test_loss, test_acc = (evaluate_tiled if engine_on() else evaluate_tiled.fn)(session)
    eval_seconds = time.perf_counter() - eval_start
    known = [r for r in results if r.loss is not None]
    n = sum(r.m for r in known)
    row = {
        "round": round_no, "loss": round(sum(r.loss for r in known) / n, 6) if known else None,
        "train_accuracy": round(sum(r.correct for r in known) / n, 6) if known else None,
        "test_loss": round(test_loss, 6), "test_accuracy": round(test_acc, 6), "twin_test_accuracy": None,
        "seconds": 0.0, "train_seconds": round(train_seconds, 3), "eval_seconds": round(eval_seconds, 3),
        "batches": len(order), "bytes_from_owners": store_.bytes_read - bytes_before,
        "bytes_to_key_holder": traffic.to_key_holder, "bytes_from_key_holder": traffic.from_key_holder,
        "reveals": traffic.reveals, "decryptions": rt.key_holder.decryptions_used - decryptions_before,
        "decryptions_train": decryptions_train, "input_frozen": frozen,
    }
    if session.twin is not None:
        row["twin_test_accuracy"] = round((run_twin_tiled if engine_on() else run_twin_tiled.fn)(session, order, refs), 6)
    row["seconds"] = round(time.perf_counter() - start, 3)
    return row


def _fits(cfg) -> dict:
    """The polynomial activations' fits and the strict loss surrogate, with their worst error on range."""
    from hetrain.mpc_ops.layers.polyact import fit, linear_sigmoid

    out = {}
    for i, layer in enumerate(cfg.model.layers):
        if layer.kind in ("square", "poly_tanh", "poly_sigmoid"):
            out[f"layers[{i}]"] = fit(layer.kind, layer.degree, layer.range).summary()
    if not cfg.policy.reveals:
        out["loss_gradient"] = linear_sigmoid().summary() if cfg.data.task == "binary" else \
            {"kind": "least_squares", "note": "δ = z − one_hot(y) (squared loss on the logits)"}
    return out


def train_tiled(config_path: str, run_dir: str, max_batches: int | None = None, engine: bool = True) -> dict:
    """Prepare every owner in the tiled layout, then run the configured rounds; write metrics and a summary."""
    token = ENGINE.set(engine)
    try:
        return _train_tiled(config_path, run_dir, max_batches, engine)
    finally:
        ENGINE.reset(token)


def _train_tiled(config_path: str, run_dir: str, max_batches: int | None, engine: bool) -> dict:
    from hetrain.mpc_ops.layers.depth_plan import circuit_depth

    rt = Runtime(config_path, run_dir)
    rt.paths.root.mkdir(parents=True, exist_ok=True)
    LocalKeyHolderClient.forget()
    key_id = rt.publish_public_context()
    prepare = prepare_owner_tiled if engine else encrypt_owner_tiled.fn
    owners = [prepare(config_path, run_dir, o.name) for o in rt.cfg.data.owners]
    session = open_session(config_path, run_dir)
    _SESSIONS[str(run_dir)] = session
    rounds = []
    progress.notify("run-started", total=rt.cfg.train.rounds, first=1, done_rounds=[])
    for round_no in range(1, rt.cfg.train.rounds + 1):
        row = training_round_tiled(str(run_dir), round_no, max_batches) if engine \
            else run_round_tiled(session, round_no, max_batches)
        rounds.append(row)
        progress.notify("round-done", row=row, total=rt.cfg.train.rounds)
        _checkpoint(session, round_no, rounds)
        artifacts.write_metrics(rt.paths.metrics, rounds, {})
        if rt.cfg.train.target_accuracy is not None and row["test_accuracy"] >= rt.cfg.train.target_accuracy:
            reason = f"test accuracy {row['test_accuracy']:.4f} reached train.target_accuracy={rt.cfg.train.target_accuracy}"
            break
    else:
        reason = f"train.rounds={rt.cfg.train.rounds} rounds done"
    audit = rt.key_holder.audit_summary()
    last = rounds[-1]
    final = {
        "policy_mode": mode_name(rt.cfg), "test_accuracy": last["test_accuracy"],
        "plaintext_twin_test_accuracy": last["twin_test_accuracy"], "decryptions": audit["decryptions_used"],
        "policy_refusals": audit["refuse"], "rounds": len(rounds), "stop_reason": reason,
        "mean_seconds_per_round": round(sum(r["seconds"] for r in rounds) / len(rounds), 3),
        "mean_bytes_per_round": int(sum(r["bytes_from_owners"] + r["bytes_to_key_holder"] + r["bytes_from_key_holder"]
                                        for r in rounds) / len(rounds)),
        "key_id": key_id, "circuit_depth": circuit_depth(rt.cfg),
        "ckks": {"poly_modulus_degree": rt.cfg.ckks.poly_modulus_degree,
                 "coeff_mod_bit_sizes": rt.cfg.ckks.coeff_mod_bit_sizes, "scale_bits": rt.cfg.ckks.scale_bits},
        "sigma": audit.get("sigma"), "polynomial_fits": _fits(rt.cfg), "max_batches_per_round": max_batches,
    }
    artifacts.write_metrics(rt.paths.metrics, rounds, final)
    progress.notify("run-done", final=final)
    markdown = summary_markdown(rt.cfg, final, rounds, owners, audit)
    store.write_bytes(rt.paths.root / "summary.md", markdown.encode())
    if engine:
        artifacts.publish_summary(rt.cfg.name, markdown, rt.paths.root / "summary.md")
    return {"final": final, "rounds": rounds, "run_dir": str(rt.paths.root), "out_dir": str(rt.paths.out),
            "generation": None, "owners": owners}


def _checkpoint(session: Session, round_no: int, rounds: list[dict]) -> None:
    rt = session.rt
    params = {f"hybrid.{k}": v for k, v in session.learner.model.parameters().items()}
    opt = {f"hybrid.{k}": v for k, v in session.learner.optimizer.state_dict().items()}
    rng_state = np.random.default_rng([rt.cfg.seed, round_no + 1]).bit_generator.state
    checkpoint.save_checkpoint(rt.paths.checkpoints, round_no, params=params, optimizer_state=opt,
                               rng_state=rng_state, lineage={"key_id": rt.key_id, "config_path": str(rt.config_path)},
                               extra={"history": rounds, "engine": "tiled"})


def mode_name(cfg) -> str:
    if not cfg.policy.reveals:
        return "strict" + (" + encrypted labels" if cfg.policy.labels == "encrypted" else "")
    name = "hybrid" if len(cfg.policy.cipher_layers) == 1 else f"mixed ({len(cfg.policy.cipher_layers)} ciphertext layers)"
    return name + (" + encrypted labels" if cfg.policy.labels == "encrypted" else "")


def revealed_to_trainer(cfg) -> list[str]:
    """What the policy lets the trainer see, in words (the run summary and the README table)."""
    out = []
    if cfg.policy.reveals:
        out.append(f"pre-activations of '{cfg.policy.cipher_layers[-1]}' (flooded), within the rank limit")
    out.append(f"weight gradients summed over ≥ {cfg.policy.min_batch} samples (flooded)")
    if cfg.policy.labels == "encrypted":
        if cfg.policy.reveals:
            out.append("the batch's summed loss and correct count (aggregates linear in the encrypted labels)")
    else:
        out.append("labels in plaintext")
    if not cfg.policy.reveals:
        out.append("test accuracy computed on the owners' side (an aggregate)")
    return out


def summary_markdown(cfg, final: dict, rounds: list[dict], owners: list[dict], audit: dict) -> str:
    lines = [f"# hetrain run `{cfg.name}` ({final['policy_mode']})", "", "## Result", "", "| metric | value |",
             "| --- | --- |"]
    lines += [f"| {k} | {json.dumps(v) if isinstance(v, (dict, list)) else v} |" for k, v in final.items()]
    lines += ["", "## What was revealed to the trainer", ""] + [f"- {w}" for w in revealed_to_trainer(cfg)]
    lines += ["- the key holder sees masked values only", "", "## Key holder decisions", "",
              f"- reveals allowed: {audit.get('allow', 0)}; refused: {audit.get('refuse', 0)} {audit.get('rules') or ''}",
              f"- decryptions used: {audit.get('decryptions_used', 0)} of budget {audit.get('budget', 0)}", "",
              "## Rounds", "", "| round | test acc | twin acc | s | bytes from owners | to key holder | decryptions |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {r['round']} | {r['test_accuracy']} | {r['twin_test_accuracy']} | {r['seconds']} | "
              f"{r['bytes_from_owners']:,} | {r['bytes_to_key_holder']:,} | {r['decryptions']} |" for r in rounds]
    lines += ["", "## Owners", ""] + [f"- {o['owner']}: {o['ciphertexts']} ciphertexts, {o['bytes']:,} bytes"
                                       for o in owners]
    return "\n".join(lines) + "\n"
