"""A long-lived child that loads mutated ciphertexts for tests/test_hostile_inputs.py.

TenSEAL runs only in this child, so if a mutation ever got past validation and crashed SEAL, the
test would see a dead worker (and the example that killed it) instead of dying itself. The child
holds a copy of the setup's key holder, so accepted blobs can be decrypted and compared, through
the key holder's own reveal, the only code allowed to decrypt.
"""

import shutil
import time
from pathlib import Path

import numpy as np

from hetrain.mpc_ops.crypto import ckks
from hetrain.core.errors import HetrainError

from hetrain.bench.harness.hostile_setup import Setup, open_key_holder, request


def _reveal(holder, blob: bytes, changes: dict) -> list:
    fields = {"key_id": holder.key_id, **changes}
    return [np.asarray(v).tolist() for v in holder.reveal(request(fields.pop("key_id"), blob, **fields)).values]


def serve(setup_file: str, scratch: str, conn) -> None:
    """Answer jobs until None arrives: ("reveal", blob, changes) sends `blob` to the key holder as a
    revealed ciphertext; ("fresh", blob, changes) loads it as an owner's ciphertext, multiplies it
    by ones as the trainer would, and reveals the product."""
    setup = Setup.load(Path(setup_file))
    directory = Path(scratch) / "key_holder"
    shutil.copytree(setup.paths.key_holder, directory)
    holder = open_key_holder(setup, directory)
    public = ckks.load_public_context(setup.paths.public_context.read_bytes(), params=setup.cfg().ckks.params())
    fresh_layout = ckks.fresh_layout(public)
    while (job := conn.recv()) is not None:
        kind, blob, changes = job
        started = time.perf_counter()
        try:
            if kind == "fresh":
                vector = ckks.load_vector(public, blob, fresh_layout)
                blob = ckks.multiply_plain(vector, np.ones(fresh_layout.slots)).serialize()
            result = {"outcome": "accepted", "values": _reveal(holder, blob, changes)}
        except HetrainError as exc:
            result = {"outcome": "rejected", "error": type(exc).__name__, "message": str(exc)}
        except Exception as exc:  # reported, so the test can fail naming it
            result = {"outcome": "uncaught", "error": type(exc).__name__, "message": str(exc)}
        conn.send({**result, "seconds": time.perf_counter() - started})
