"""Random mutations of genuine artifacts, each fed to the loader that would see it in production.

A spec is plain JSON (kind + parameters), drawn in the parent from a seeded RNG and applied in a
child process. Only artifacts whose every byte is checked are mutated at random: ciphertexts (by
digest at the trainer, by layout and headroom at the key holder), label files and checkpoint
arrays (by digest), the audit log (by hash chain), and reveal-request fields (by type and range).
Unauthenticated text (a config, state.json, a manifest's free fields) can be edited into another
valid value, so it is covered by the named catalogue instead.
"""

import random
from pathlib import Path

import numpy as np

from hetrain.bench.harness import hostile_cases as hc
from hetrain.bench.harness import hostile_mutate as mutate
from hetrain.bench.harness.hostile_setup import REVEALED, Setup

KINDS = ("kh_flip", "kh_truncate", "kh_extend", "kh_random", "kh_field", "owner_flip", "owner_field",
         "labels_flip", "checkpoint_flip", "audit_flip", "request_field")
LOADERS = {"kh": "KeyHolder.reveal", "owner": "trainer round", "labels": "trainer round",
           "checkpoint": "hetrain.checkpoint.load_checkpoint", "audit": "hetrain.participants.audit.verify",
           "request": "KeyHolder.reveal"}
BLOB_BITS = 131_217 * 8  # size of a product blob at the default parameters
INTERESTING = [0, 1, 2, 3, 4095, 4096, 4097, 8192, 16384, 2**31, 2**32 + 1, 2**62, 2**64 - 1]
BAD_FIELD_VALUES = {
    "stride": [[0], [-1], [4096], [2**70], ["1"], [1.5], [None], "x", None],
    "counts": [[0], [-3], [5000], [2**40], [1, 1], [], [True], None],
    "aggregate": [-1, 2**40, "64", None, 64.5, [64]],
    "round": [-1, 10**12, "1", None, True],
    "layer": [None, 5, ["enc1"], "", "e" * 65, "enc2"],
    "kind": [None, 3, "", "k" * 33, "weights"],
    "key_id": [None, "", "k" * 65, "k-" + "f" * 32],
    "request_id": [None, "", "r" * 129, 7],
    "blobs": [None, "blob", [], [b""], [b"\x0a\x02\x80\x20"], [None]],
}


def _bits(rng: random.Random, count: int, size_bits: int) -> list[int]:
    return [rng.randrange(size_bits) for _ in range(count)]


def _field_spec(rng: random.Random) -> dict:
    field = rng.choice(mutate.FIELDS)
    if field in ("seal_scale", "scale"):
        value = rng.choice([0.0, -1.0, 1.0, 2.0**49, 2.0**51, 2.0**120, 1e308, float("inf"), float("nan"),
                            rng.uniform(1.0, 2.0**60)])
    elif field == "ntt":
        value = rng.choice([0, 2, 255])
    elif field == "size":
        value = rng.choice([1, 100, 4095, 4097, 8192, rng.randrange(1, 2**40)])
    else:
        value = rng.choice(INTERESTING + [rng.randrange(2**64)])
    return {"field": field, "value": value}


def make_specs(count: int, seed: int) -> list[dict]:
    """`count` mutation specs, every one a real change of its artifact."""
    rng = random.Random(seed)
    specs = []
    for i in range(count):
        kind = KINDS[i % len(KINDS)] if i < len(KINDS) else rng.choice(KINDS)
        spec = {"kind": kind}
        if kind in ("kh_flip", "owner_flip"):
            spec["bits"] = _bits(rng, rng.choice([1, 2, 8, 64]), BLOB_BITS)
        elif kind == "kh_truncate":
            spec["length"] = rng.randrange(0, BLOB_BITS // 8)
        elif kind == "kh_extend":
            spec["extra"] = rng.randbytes(rng.choice([1, 8, 1000])).hex()
        elif kind == "kh_random":
            spec["seed"], spec["length"] = rng.randrange(2**32), rng.choice([0, 16, 1000, 131_217])
        elif kind in ("kh_field", "owner_field"):
            spec.update(_field_spec(rng))
        elif kind in ("labels_flip", "audit_flip"):
            spec["bits"] = _bits(rng, rng.choice([1, 3]), 1 << 20)  # reduced modulo the file size
        elif kind == "checkpoint_flip":
            spec["file"], spec["bits"] = rng.choice(["params.npz", "optimizer.npz"]), _bits(rng, 1, 1 << 20)
        else:
            spec["field"] = rng.choice(sorted(BAD_FIELD_VALUES))
            spec["value_index"] = rng.randrange(len(BAD_FIELD_VALUES[spec["field"]]))
        specs.append(spec)
    return specs


def _blob(setup: Setup, spec: dict) -> bytes:
    original = Path(setup.product).read_bytes()
    kind = spec["kind"]
    if kind == "kh_flip":
        return mutate.flip(original, spec["bits"])
    if kind == "kh_truncate":
        return original[: spec["length"]]
    if kind == "kh_extend":
        return original + bytes.fromhex(spec["extra"])
    if kind == "kh_random":
        return np.random.default_rng(spec["seed"]).bytes(spec["length"])
    return _set(original, spec)


def _set(blob: bytes, spec: dict) -> bytes:
    if mutate.field_value(blob, spec["field"]) == spec["value"]:  # same value: make it a real change
        spec = {**spec, "value": spec["value"] + 1}
    return mutate.set_field(blob, spec["field"], spec["value"])


def run_spec(setup: Setup, scratch: Path, spec: dict) -> str:
    """Apply one spec and run its loader; returns 'accepted' or 'equivalent' (raises on rejection)."""
    kind = spec["kind"]
    if kind.startswith("kh_"):
        values = hc.key_holder_reveal(setup, scratch, blobs=[_blob(setup, spec)])
        expected = np.load(setup.values)[:REVEALED]
        return "equivalent" if np.allclose(values[0], expected, atol=1e-3) else "accepted"
    if kind == "owner_flip":
        hc.owner_blob(setup, scratch, lambda b: mutate.flip(b, spec["bits"]), fix_digest=False)
    elif kind == "owner_field":
        hc.owner_blob(setup, scratch, lambda b: _set(b, spec))
    elif kind == "labels_flip":
        hc.label_file(setup, scratch, lambda b: mutate.flip(b, spec["bits"]), fix_digest=False)
    elif kind == "checkpoint_flip":
        hc.checkpoint_copy(setup, scratch, hc.checkpoint_file(spec["file"], lambda b: mutate.flip(b, spec["bits"])))
    elif kind == "audit_flip":
        hc.audit_copy(setup, scratch, lambda d: (d / "audit.jsonl").write_bytes(
            mutate.flip((d / "audit.jsonl").read_bytes(), spec["bits"])))
    else:
        field = spec["field"]
        hc.key_holder_reveal(setup, scratch, **{field: BAD_FIELD_VALUES[field][spec["value_index"]]})
    return "accepted"


def loader_of(spec: dict) -> str:
    return LOADERS[spec["kind"].split("_")[0]]
