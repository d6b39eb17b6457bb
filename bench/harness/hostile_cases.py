"""The loaders a hostile input meets in production, and the catalogue of named bad inputs.

Every case works on a scratch copy under `scratch`, never on the genuine artifacts of the setup,
and ends in the loader that would see the input in production: the trainer's round inputs
(public context, exchange store, ciphertexts into TenSEAL, labels), the key holder's reveal, the
data owner's preparation, the checkpoint reader, the config reader, or the audit verifier.
"""

import json
import shutil
from pathlib import Path

import numpy as np

from hetrain.checkpoint import load_checkpoint
from hetrain.runtime import PUBLIC_CONTEXT, RunPaths, Runtime, packing_plan
from hetrain.core import store
from hetrain.configure import load_config
from hetrain.mpc_ops.crypto.jobs import run_jobs
from hetrain.participants import audit, data_owner

from hetrain.bench.harness.hostile_setup import OWNER, Setup, open_key_holder, request

# ---- loaders ---------------------------------------------------------------------------------


def scratch_run(setup: Setup, scratch: Path, context: bytes | None = None) -> RunPaths:
    """A copy of the run's exchange store (the owner's bundle and the public context) under `scratch`."""
    paths = RunPaths(scratch / "run")
    shutil.copytree(Path(setup.run) / "exchange" / OWNER, paths.exchange / OWNER)
    if context is None:
        shutil.copyfile(setup.paths.public_context, paths.exchange / PUBLIC_CONTEXT)
    else:
        (paths.exchange / PUBLIC_CONTEXT).write_bytes(context)
    return paths


def trainer_round(setup: Setup, paths: RunPaths) -> None:
    """What a training round reads: public context, store, every batch's ciphertexts into TenSEAL, labels."""
    rt = Runtime(setup.config, paths.root)
    for split in ("train", "test"):
        for ref in rt.store.batches(split):
            batch = rt.store.load(ref)
            run_jobs(rt.context, rt.plan.slots, [b for p in batch.parts for b in p.rows + p.cols + p.column], [])
            rt.store.labels(ref)


def key_holder_reveal(setup: Setup, scratch: Path, **changes) -> list[np.ndarray]:
    """A reveal by a copy of the setup's key holder (a reveal writes its audit log and state)."""
    directory = scratch / "key_holder"
    shutil.copytree(setup.paths.key_holder, directory)
    holder = open_key_holder(setup, directory)
    fields = {"key_id": holder.key_id, **changes}
    return holder.reveal(request(fields.pop("key_id"), Path(setup.product).read_bytes(), **fields)).values


def owner_prepare(setup: Setup, scratch: Path, context: bytes) -> None:
    """A data owner encrypting its table under the public context it read from the exchange store."""
    cfg = setup.cfg()
    data_owner.prepare(cfg, cfg.data.owners[0], context, packing_plan(cfg), scratch / "exchange")


def checkpoint_copy(setup: Setup, scratch: Path, edit) -> None:
    """Resume from a copy of round 1 after `edit(directory)` changed it."""
    directory = scratch / "checkpoints" / "round-00001"
    shutil.copytree(setup.paths.checkpoints / "round-00001", directory)
    edit(directory)
    load_checkpoint(directory)


def config_text(setup: Setup, scratch: Path, text: bytes) -> None:
    (scratch / "config.yaml").write_bytes(text)
    load_config(scratch / "config.yaml")


def audit_copy(setup: Setup, scratch: Path, edit) -> None:
    """`hetrain audit verify` on a copy of the key holder's directory after `edit(directory)`."""
    directory = scratch / "key_holder"
    shutil.copytree(setup.paths.key_holder, directory)
    edit(directory)
    audit.verify(directory)


# ---- edits of the genuine artifacts ------------------------------------------------------------


def _manifest(paths: RunPaths) -> tuple[Path, dict]:
    path = paths.exchange / OWNER / data_owner.MANIFEST
    return path, json.loads(path.read_text())


def owner_blob(setup: Setup, scratch: Path, make, fix_digest: bool = True) -> None:
    """The owner's first ciphertext replaced by make(original); a hostile owner also fixes the digest."""
    _replace_file(setup, scratch, lambda manifest: data_owner.ciphertext_entries(manifest)[0], make, fix_digest)


def _replace_file(setup: Setup, scratch: Path, pick, make, fix_digest: bool) -> None:
    """The bundle file of entry pick(manifest) replaced by make(original); with fix_digest, the manifest too."""
    paths = scratch_run(setup, scratch)
    path, manifest = _manifest(paths)
    entry = pick(manifest)
    file_path = paths.exchange / OWNER / entry["file"]
    bad = make(file_path.read_bytes())
    file_path.write_bytes(bad)
    if fix_digest:
        entry.update(sha256=store.sha256_bytes(bad), bytes=len(bad))
        path.write_text(json.dumps(manifest))
    trainer_round(setup, paths)


def manifest_edit(setup: Setup, scratch: Path, edit) -> None:
    """The owner's manifest changed by edit(manifest) (which may return replacement text)."""
    paths = scratch_run(setup, scratch)
    path, manifest = _manifest(paths)
    text = edit(manifest)
    path.write_text(text if isinstance(text, str) else json.dumps(manifest))
    trainer_round(setup, paths)


def label_file(setup: Setup, scratch: Path, make, fix_digest: bool = True) -> None:
    """The owner's train label file replaced by make(original); a hostile owner also fixes the digest."""
    _replace_file(setup, scratch, lambda manifest: manifest["labels"]["train"], make, fix_digest)


def context_in_exchange(setup: Setup, scratch: Path, context: bytes) -> None:
    """The trainer's round with `context` in place of the published public context."""
    trainer_round(setup, scratch_run(setup, scratch, context))


def checkpoint_file(name: str, make, fix_digest: bool = False):
    """An edit of one checkpoint file; with fix_digest, state.json vouches for the new bytes."""
    def edit(directory: Path) -> None:
        data = make((directory / name).read_bytes()) if (directory / name).exists() else None
        if data is None:
            (directory / name).unlink()
            return
        (directory / name).write_bytes(data)
        if fix_digest:
            state = json.loads((directory / "state.json").read_text())
            state["sha256"][name] = store.sha256_bytes(data)
            (directory / "state.json").write_text(json.dumps(state))
    return edit


def audit_lines(edit):
    """An edit of audit.jsonl's lines (bytes, without newlines)."""
    def apply(directory: Path) -> None:
        log = directory / "audit.jsonl"
        log.write_bytes(b"".join(line + b"\n" for line in edit(log.read_bytes().splitlines())))
    return apply
