"""The CKKSVector wire format: parse/build round trips, logical resizing, and strict rejection of odd blobs."""

import struct

import numpy as np
import pytest
import tenseal as ts

from mpc_ops import wire
from mpc_ops.errors import BundleError

SLOTS = 4096
SUM_ATOL = 1e-6  # CKKS error of log2(seg) rotations at scale 2^50 is ~2^-30; 1e-6 leaves ~1000x margin


@pytest.fixture(scope="module")
def private_context() -> ts.Context:
    """A test-only private context (tests may decrypt; library code outside the key holder may not)."""
    context = ts.context(ts.SCHEME_TYPE.CKKS, 8192, coeff_mod_bit_sizes=[60, 50, 60])
    context.global_scale = 2.0**50
    context.generate_galois_keys()
    return context


@pytest.fixture(scope="module")
def values() -> np.ndarray:
    return np.random.default_rng(0).uniform(-2.0, 2.0, SLOTS)


@pytest.fixture(scope="module")
def blob(private_context, values) -> bytes:
    return ts.ckks_vector(private_context, values.tolist()).serialize()


def test_parse_reads_size_scale_and_seal_header_of_a_real_ckks_vector(blob):
    # Execute
    parts = wire.parse(blob, max_slots=SLOTS)

    # Assert
    assert parts.size == SLOTS
    assert parts.scale == 2.0**50
    assert parts.seal_ciphertext[:2] == wire.SEAL_MAGIC
    assert struct.unpack_from("<Q", parts.seal_ciphertext, 8)[0] == len(parts.seal_ciphertext)


def test_build_of_parsed_parts_reproduces_the_blob_byte_for_byte(blob):
    # Execute
    rebuilt = wire.build(wire.parse(blob, max_slots=SLOTS))

    # Assert
    assert rebuilt == blob


def test_with_size_changes_only_the_logical_size(private_context, blob, values):
    # Prepare
    before = bytes(blob)

    # Execute
    resized = wire.with_size(blob, 100, max_slots=SLOTS)

    # Assert: same ciphertext and scale, TenSEAL sees 100 values, the input blob is untouched
    old, new = wire.parse(blob, max_slots=SLOTS), wire.parse(resized, max_slots=SLOTS)
    assert new.size == 100
    assert (new.seal_ciphertext, new.scale) == (old.seal_ciphertext, old.scale)
    vector = ts.ckks_vector_from(private_context, resized)
    assert vector.size() == 100
    np.testing.assert_allclose(vector.decrypt(), values[:100], atol=SUM_ATOL)
    assert blob == before


@pytest.mark.parametrize("seg", [4, 32, 128])
def test_tenseal_sum_on_a_resized_vector_sums_every_segment_into_its_first_slot(private_context, blob, values, seg):
    # Prepare
    resized = ts.ckks_vector_from(private_context, wire.with_size(blob, seg, max_slots=SLOTS))

    # Execute
    summed = resized.sum()
    full = ts.ckks_vector_from(private_context, wire.with_size(summed.serialize(), SLOTS, max_slots=SLOTS))
    got = np.asarray(full.decrypt())[::seg]

    # Assert
    np.testing.assert_allclose(got, values.reshape(-1, seg).sum(axis=1), rtol=0, atol=SUM_ATOL)


def _reordered(blob: bytes) -> bytes:
    """The same three fields with the ciphertext (field 2) written before the size (field 1)."""
    parts = wire.parse(blob, max_slots=SLOTS)
    good = wire.build(parts)
    size_field_len = 2 + good[1]
    size_field, rest = good[:size_field_len], good[size_field_len:]
    seal_field, scale_field = rest[:-9], rest[-9:]
    return seal_field + size_field + scale_field


def _with_seal(blob: bytes, seal: bytes) -> bytes:
    parts = wire.parse(blob, max_slots=SLOTS)
    return wire.build(wire.VectorBlob(size=parts.size, seal_ciphertext=seal, scale=parts.scale))


def _with(blob: bytes, **changes) -> bytes:
    parts = wire.parse(blob, max_slots=SLOTS)
    fields = {"size": parts.size, "seal_ciphertext": parts.seal_ciphertext, "scale": parts.scale, **changes}
    return wire.build(wire.VectorBlob(**fields))


MALFORMED = {
    "shorter than 32 bytes": (lambda b: b[:20], r"expected at least 32 bytes, got 20"),
    "truncated scale": (lambda b: b[:-5], r"field 3 runs past the end of the blob"),
    "truncated ciphertext": (lambda b: b[: len(b) // 2], r"field 2 runs past the end of the blob"),
    "wrong field order": (_reordered, r"expected field 1 with wire type 2, got field 2 with wire type 2"),
    "trailing bytes": (lambda b: b + b"\x00\x00\x00", r"3 trailing bytes after the scale"),
    "bad SEAL magic": (lambda b: _with_seal(b, b"\x00\x00" + wire.parse(b, max_slots=SLOTS).seal_ciphertext[2:]),
                       r"SEAL ciphertext header is missing or malformed"),
    "SEAL size mismatch": (lambda b: _with_seal(b, wire.parse(b, max_slots=SLOTS).seal_ciphertext[:-1]),
                           r"SEAL header declares \d+ bytes but \d+ are present"),
    "size 0": (lambda b: _with(b, size=0), r"logical size must be in \[1, 4096\], got 0"),
    "size above slots": (lambda b: _with(b, size=SLOTS + 1), r"logical size must be in \[1, 4096\], got 4097"),
    "huge scale": (lambda b: _with(b, scale=2.0**121), r"scale must be in \[2\^10, 2\^120\], got 2\.6"),
    "NaN scale": (lambda b: _with(b, scale=float("nan")), r"scale must be in \[2\^10, 2\^120\], got nan"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_parse_refuses_a_malformed_blob_with_a_message_naming_the_problem(blob, case):
    # Prepare
    mutate, message = MALFORMED[case]
    bad = mutate(blob)

    # Execute / Assert
    with pytest.raises(BundleError, match=message):
        wire.parse(bad, max_slots=SLOTS)


@pytest.mark.parametrize("size", [0, SLOTS + 1])
def test_with_size_refuses_a_size_outside_the_slot_range(blob, size):
    # Execute / Assert
    with pytest.raises(BundleError, match=rf"logical size must be in \[1, {SLOTS}\], got {size}"):
        wire.with_size(blob, size, max_slots=SLOTS)


def test_parse_refuses_a_blob_whose_size_exceeds_a_smaller_slot_count(blob):
    # Execute / Assert: a 4096-slot vector is too big for a 2048-slot context
    with pytest.raises(BundleError, match=r"logical size must be in \[1, 2048\], got 4096"):
        wire.parse(blob, max_slots=2048)
