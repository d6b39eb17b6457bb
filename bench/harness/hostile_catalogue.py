"""The named bad inputs: each one a short, distinct way a party (or a crash) can hand a role bad bytes."""

import io
import json
import struct
import zipfile
from pathlib import Path

import numpy as np

from hetrain.mpc_ops.crypto import wire

from hetrain.bench.harness import hostile_cases as hc
from hetrain.bench.harness import hostile_mutate as mutate
from hetrain.bench.harness.hostile_setup import Setup

TRAINER = "trainer round (Runtime.context, ExchangeStore, run_jobs, labels)"
KEY_HOLDER = "KeyHolder.reveal"
OWNER = "data_owner.prepare"
CHECKPOINT = "hetrain.checkpoint.load_checkpoint"
CONFIG = "hetrain.configure.load_config"
AUDIT = "hetrain.participants.audit.verify"


def _npy_header(shape: tuple, descr: str = "<i8") -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": descr, "fortran_order": False, "shape": shape})
    return buf.getvalue()


def _product(setup: Setup) -> bytes:
    return Path(setup.product).read_bytes()


def _config(setup: Setup) -> str:
    return Path(setup.config).read_text()


def _npz(members: dict[str, bytes]) -> bytes:
    """An uncompressed zip of raw members with correct CRCs (what np.savez writes, but any content)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buf.getvalue()


def _oversized_context(setup: Setup, scratch: Path) -> None:
    paths = hc.scratch_run(setup, scratch)
    with open(paths.public_context, "r+b") as fh:
        fh.truncate(600 << 20)  # sparse: 600 MiB on paper, no disk used
    hc.trainer_round(setup, paths)


def _owner_level_product(setup: Setup, scratch: Path) -> None:
    hc.owner_blob(setup, scratch, lambda b: _product(setup))


# name -> (loader, run(setup, scratch)); every run must end in a HetrainError to count as rejected
CASES = {
    # ciphertexts an owner publishes (a hostile owner also fixes the manifest digest)
    "blob_truncated": (TRAINER, lambda s, d: hc.owner_blob(s, d, lambda b: b[: len(b) // 2])),
    "blob_extended": (TRAINER, lambda s, d: hc.owner_blob(s, d, lambda b: b + b"\0" * 64)),
    "blob_random_bytes": (TRAINER, lambda s, d: hc.owner_blob(s, d, lambda b: np.random.default_rng(1).bytes(len(b)))),
    "blob_sizes_inconsistent": (TRAINER, lambda s, d: hc.owner_blob(s, d, lambda b: mutate.with_seal(
        b, wire.parse(b, max_slots=4096).seal_ciphertext[:-1]))),
    "blob_slot_count_over_n2": (TRAINER, lambda s, d: hc.owner_blob(s, d, lambda b: mutate.set_field(b, "size", 4097))),
    "blob_slot_count_partial": (TRAINER, lambda s, d: hc.owner_blob(s, d, lambda b: mutate.set_field(b, "size", 100))),
    "blob_wrong_scale": (TRAINER, lambda s, d: hc.owner_blob(s, d, lambda b: mutate.set_field(b, "seal_scale", 2.0**40))),
    "blob_wrong_tenseal_scale": (TRAINER, lambda s, d: hc.owner_blob(s, d, lambda b: mutate.set_field(b, "scale", 2.0**49))),
    "blob_wrong_level": (TRAINER, _owner_level_product),
    "blob_wrong_moduli_count": (TRAINER, lambda s, d: hc.owner_blob(s, d, lambda b: mutate.set_field(b, "moduli", 3))),
    "blob_wrong_degree": (TRAINER, lambda s, d: hc.owner_blob(s, d, lambda b: mutate.set_field(b, "degree", 16384))),
    "blob_three_polynomials": (TRAINER, lambda s, d: hc.owner_blob(s, d, lambda b: mutate.set_field(b, "polys", 3))),
    "blob_not_ntt_form": (TRAINER, lambda s, d: hc.owner_blob(s, d, lambda b: mutate.set_field(b, "ntt", 0))),
    "blob_coefficient_count_huge": (TRAINER, lambda s, d: hc.owner_blob(
        s, d, lambda b: mutate.set_field(b, "coefficient_count", 2**61))),
    "blob_zstd_bomb": (TRAINER, lambda s, d: hc.owner_blob(s, d, mutate.zstd_bomb)),
    "blob_zstd_trailing_frame": (TRAINER, lambda s, d: hc.owner_blob(s, d, mutate.trailing_frame)),
    "blob_coefficient_over_modulus": (TRAINER, lambda s, d: hc.owner_blob(
        s, d, lambda b: mutate.edit_payload(b, lambda p: p[:-8] + b"\xff" * 8))),
    "blob_tampered_without_digest": (TRAINER, lambda s, d: hc.owner_blob(
        s, d, lambda b: mutate.flip(b, [8 * 5000]), fix_digest=False)),
    # reveal requests the key holder receives
    "blob_foreign_key": (KEY_HOLDER, lambda s, d: hc.key_holder_reveal(s, d, blobs=[Path(s.foreign_product).read_bytes()])),
    "reveal_fresh_level_blob": (KEY_HOLDER, lambda s, d: hc.key_holder_reveal(
        s, d, blobs=[mutate.set_field(_product(s), "moduli", 2)])),
    "reveal_stride_overflow": (KEY_HOLDER, lambda s, d: hc.key_holder_reveal(s, d, stride=[2**63])),
    "reveal_counts_mismatch": (KEY_HOLDER, lambda s, d: hc.key_holder_reveal(s, d, counts=[8, 8])),
    "reveal_too_many_blobs": (KEY_HOLDER, lambda s, d: hc.key_holder_reveal(
        s, d, blobs=[_product(s)] * 4097, stride=[1] * 4097, counts=[1] * 4097)),
    "reveal_layer_not_a_string": (KEY_HOLDER, lambda s, d: hc.key_holder_reveal(s, d, layer={"enc1": 1})),
    "reveal_kind_unknown": (KEY_HOLDER, lambda s, d: hc.key_holder_reveal(s, d, kind="weights")),
    "reveal_aggregate_negative": (KEY_HOLDER, lambda s, d: hc.key_holder_reveal(s, d, aggregate=-5)),
    "reveal_key_id_foreign": (KEY_HOLDER, lambda s, d: hc.key_holder_reveal(s, d, key_id="k-" + "0" * 32)),
    "reveal_blob_not_bytes": (KEY_HOLDER, lambda s, d: hc.key_holder_reveal(s, d, blobs=["not bytes"])),
    "reveal_corrupt_coefficients": (KEY_HOLDER, lambda s, d: hc.key_holder_reveal(
        s, d, blobs=[mutate.edit_payload(_product(s), lambda p: p[:2000] + bytes(1000) + p[3000:])])),
    # public contexts read from the exchange store
    "context_private_key_in_exchange": (TRAINER, lambda s, d: hc.context_in_exchange(
        s, d, (s.paths.key_holder / "secret_context.bin").read_bytes())),
    "context_garbage": (OWNER, lambda s, d: hc.owner_prepare(s, d, np.random.default_rng(2).bytes(4096))),
    "context_truncated": (OWNER, lambda s, d: hc.owner_prepare(s, d, s.paths.public_context.read_bytes()[:100_000])),
    "context_wrong_parameters": (OWNER, lambda s, d: hc.owner_prepare(s, d, Path(s.small_context).read_bytes())),
    "context_swapped_in_exchange": (TRAINER, lambda s, d: hc.context_in_exchange(s, d, Path(s.foreign_context).read_bytes())),
    "context_oversized": (TRAINER, _oversized_context),
    "context_empty": (OWNER, lambda s, d: hc.owner_prepare(s, d, b"")),
    # manifests
    "manifest_wrong_sha": (TRAINER, lambda s, d: hc.manifest_edit(s, d, lambda m: hc.data_owner.ciphertext_entries(m)[0]
                                                                  .update(sha256="0" * 64))),
    "manifest_path_escape": (TRAINER, lambda s, d: hc.manifest_edit(s, d, lambda m: hc.data_owner.ciphertext_entries(m)[0]
                                                                    .update(file="../../../key_holder/state.json"))),
    "manifest_missing_field": (TRAINER, lambda s, d: hc.manifest_edit(s, d, lambda m: m.pop("splits"))),
    "manifest_not_json": (TRAINER, lambda s, d: hc.manifest_edit(s, d, lambda m: '{"key_id": ')),
    "manifest_deeply_nested": (TRAINER, lambda s, d: hc.manifest_edit(s, d, lambda m: "[" * 200_000 + "]" * 200_000)),
    "manifest_wrong_key_id": (TRAINER, lambda s, d: hc.manifest_edit(s, d, lambda m: m.update(key_id="k-" + "1" * 32))),
    "manifest_blob_list_short": (TRAINER, lambda s, d: hc.manifest_edit(
        s, d, lambda m: m["splits"]["train"]["batches"][0]["cols"].clear())),
    "manifest_batch_size_huge": (TRAINER, lambda s, d: hc.manifest_edit(
        s, d, lambda m: m["splits"]["train"]["batches"][0].update(n=2**40))),
    "manifest_labels_missing": (TRAINER, lambda s, d: hc.manifest_edit(s, d, lambda m: m.update(labels=None))),
    # label files (digest fixed by a hostile label owner)
    "labels_shape_bomb": (TRAINER, lambda s, d: hc.label_file(s, d, lambda b: _npy_header((2**40,)) + b"\0" * 8)),
    "labels_out_of_range": (TRAINER, lambda s, d: hc.label_file(s, d, lambda b: b[:-8] + struct.pack("<q", 9))),
    "labels_object_dtype": (TRAINER, lambda s, d: hc.label_file(s, d, lambda b: _npy_header((1,), "|O") + b"\0" * 8)),
    "labels_float_dtype": (TRAINER, lambda s, d: hc.label_file(s, d, lambda b: _npy_header((1,), "<f8") + b"\0" * 8)),
    # checkpoints read back after a crash
    "checkpoint_truncated": (CHECKPOINT, lambda s, d: hc.checkpoint_copy(s, d, hc.checkpoint_file("params.npz", lambda b: b[:100]))),
    "checkpoint_missing_file": (CHECKPOINT, lambda s, d: hc.checkpoint_copy(s, d, hc.checkpoint_file("optimizer.npz", lambda b: None))),
    "checkpoint_state_not_json": (CHECKPOINT, lambda s, d: hc.checkpoint_copy(s, d, hc.checkpoint_file("state.json", lambda b: b[:40]))),
    "checkpoint_state_wrong_types": (CHECKPOINT, lambda s, d: hc.checkpoint_copy(s, d, hc.checkpoint_file(
        "state.json", lambda b: json.dumps({**json.loads(b), "sha256": [], "round": "1"}).encode()))),
    "checkpoint_npz_shape_bomb": (CHECKPOINT, lambda s, d: hc.checkpoint_copy(s, d, hc.checkpoint_file(
        "params.npz", lambda b: _npz({"hybrid.enc1.W.npy": _npy_header((2**40,), "<f8") + b"\0" * 8}),
        fix_digest=True))),
    "checkpoint_npz_not_zip": (CHECKPOINT, lambda s, d: hc.checkpoint_copy(s, d, hc.checkpoint_file(
        "params.npz", lambda b: b"not a zip archive", fix_digest=True))),
    # configs
    "config_unknown_key": (CONFIG, lambda s, d: hc.config_text(s, d, (_config(s) + "surprise: 1\n").encode())),
    "config_alias_bomb": (CONFIG, lambda s, d: hc.config_text(s, d, (
        "a: &a [x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a]\n" + _config(s)).encode())),
    "config_not_utf8": (CONFIG, lambda s, d: hc.config_text(s, d, b"name: \xff\xfe\n")),
    "config_deeply_nested": (CONFIG, lambda s, d: hc.config_text(s, d, b"name: " + b"[" * 20_000 + b"]" * 20_000)),
    "config_insecure_ckks": (CONFIG, lambda s, d: hc.config_text(s, d, (
        _config(s) + "ckks: {poly_modulus_degree: 8192, coeff_mod_bit_sizes: [60, 60, 60, 60], scale_bits: 50}\n")
        .encode())),
    "config_python_tag": (CONFIG, lambda s, d: hc.config_text(s, d, b"name: !!python/object/apply:os.getpid []\n")),
    # the key holder's audit log
    "audit_line_edited": (AUDIT, lambda s, d: hc.audit_copy(s, d, hc.audit_lines(
        lambda lines: [lines[0].replace(b'"allow"', b'"refuse"')] + lines[1:]))),
    "audit_line_deleted": (AUDIT, lambda s, d: hc.audit_copy(s, d, hc.audit_lines(lambda lines: lines[1:]))),
    "audit_line_not_json": (AUDIT, lambda s, d: hc.audit_copy(s, d, hc.audit_lines(lambda lines: [b"{oops"] + lines[1:]))),
    "audit_line_huge": (AUDIT, lambda s, d: hc.audit_copy(s, d, hc.audit_lines(lambda lines: lines + [b" " * (1 << 20)]))),
    "audit_state_not_json": (AUDIT, lambda s, d: hc.audit_copy(s, d, lambda k: (k / "state.json").write_bytes(b"\xff"))),
}
